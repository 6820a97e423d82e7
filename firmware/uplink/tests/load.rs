//! Load: 1,000 violations with 100 kB stills stored as fast as the disk takes them,
//! sent to a real mosquitto as fast as it acknowledges them. Every one arrives, in
//! order, and the uplink's memory stays bounded by its in-flight window, not by the
//! backlog (100 MB of stills pass through). Prints the rate and the memory figure.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskcam_core::config::BrokerUrl;
use deskcam_core::schema::{State, Topics};
use deskcam_testkit::{free_port, tempdir, Mosquitto};
use deskcam_uplink::store::EvidenceStore;
use deskcam_uplink::{DropOldest, Link, UplinkConfig, UplinkStats};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const EVENTS: usize = 1000;
const STILL_BYTES: usize = 100 * 1024;

/// kB of a /proc/self/status field.
fn status_kb(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_thousand_events_at_full_rate_in_bounded_memory() {
    let broker = Mosquitto::start();
    let dir = tempdir("load");
    let store =
        Arc::new(Mutex::new(EvidenceStore::open(&dir.join("evidence"), 7 * 86_400_000, 1 << 30).unwrap()));
    let topics = Topics::new("deskcam", "load");

    // A subscriber that keeps only the order of event ids and a count of stills.
    let received = Arc::new(Mutex::new((Vec::<String>::new(), 0usize)));
    let mut opts = MqttOptions::new(format!("load-sub-{}", free_port()), "127.0.0.1", broker.port);
    opts.set_max_packet_size(1 << 20, 1 << 16);
    let (client, mut conn) = Client::new(opts, 64);
    client.subscribe("deskcam/load/event/#", QoS::AtLeastOnce).unwrap();
    let r = received.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _client = client;
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let mut r = r.lock().unwrap();
                    if p.topic.ends_with("/still") {
                        r.1 += 1;
                    } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                        r.0.push(v["id"].as_str().unwrap_or_default().to_string());
                    }
                }
                _ => {}
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let stats = Arc::new(UplinkStats::default());
    let ready = Arc::new(tokio::sync::Notify::new());
    let (commands, _inbox) = std::sync::mpsc::sync_channel(8);
    let (_state_tx, state) = tokio::sync::watch::channel(State {
        v: 1,
        device_id: "load".into(),
        mode: "continuous".into(),
        shutter: "closed".into(),
        on_break: false,
        camera: "ok".into(),
        firmware: "test".into(),
        model: deskcam_core::schema::ModelInfo { name: "m".into(), sha256: "0".repeat(64) },
    });
    let (_config_tx, config) = tokio::sync::watch::channel(serde_json::json!({}));
    let (_telemetry_tx, telemetry) = tokio::sync::watch::channel(None);
    let link = Link {
        store: store.clone(),
        evidence_ready: ready.clone(),
        audit: Arc::new(DropOldest::new(16)),
        replies: Arc::new(DropOldest::new(16)),
        commands,
        state,
        config,
        telemetry,
    };
    let cfg = UplinkConfig {
        broker: BrokerUrl::parse(&broker.url()).unwrap(),
        client_id: "deskcam-load".into(),
        topics: topics.clone(),
        keep_alive: Duration::from_secs(30),
        credentials: None,
        tls: None,
        discovery: Vec::new(),
    };
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let baseline_kb = status_kb("VmRSS:");
    let uplink = rt.spawn(deskcam_uplink::run(cfg, link, stats.clone(), shutdown));

    let t = Instant::now();
    let still = vec![0xA5u8; STILL_BYTES];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let id = format!("load-{n:04}");
        let event = format!(r#"{{"v":1,"id":"{id}"}}"#);
        store.lock().unwrap().put(now, &id, event.as_bytes(), Some(&still)).unwrap();
        ready.notify_one();
        ids.push(id);
    }
    let stored_s = t.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(240);
    while stats.evidence_delivered.load(Ordering::Relaxed) < EVENTS as u64 {
        assert!(
            Instant::now() < deadline,
            "only {} delivered",
            stats.evidence_delivered.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent_s = t.elapsed().as_secs_f64();
    let peak_kb = status_kb("VmHWM:");
    shutdown_tx.send(true).unwrap();
    rt.block_on(uplink).unwrap().unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while received.lock().unwrap().0.len() < EVENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (got, stills) = received.lock().unwrap().clone();
    assert_eq!(got, ids, "every event, once, in order");
    assert_eq!(stills, EVENTS);
    assert_eq!(store.lock().unwrap().undelivered(), 0);
    let total_mb = (EVENTS * STILL_BYTES) as f64 / 1e6;
    let growth_mb = peak_kb.saturating_sub(baseline_kb) as f64 / 1024.0;
    println!(
        "load: {EVENTS} events + {total_mb:.0} MB of stills: stored in {stored_s:.1} s, delivered in {sent_s:.1} s \
         ({:.0} events/s); peak RSS grew {growth_mb:.1} MB over {:.1} MB at start",
        EVENTS as f64 / sent_s,
        baseline_kb as f64 / 1024.0
    );
    // The backlog lives on disk: memory holds at most the in-flight window.
    assert!(growth_mb < total_mb / 4.0, "memory grew {growth_mb:.1} MB for {total_mb:.0} MB of evidence");
}
