//! Store-and-forward against a real mosquitto: the broker goes away while violations
//! happen, and the daemon is killed with evidence in flight. Every event and still that
//! the device stored reaches a subscriber, in the order they were found; a duplicate
//! (a packet whose PUBACK was lost with the connection, sent again) carries the same
//! event id, so a consumer deduplicates by id.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deskcam_core::schema::ViolationEvent;
use deskcam_testkit::*;

/// Continuous analysis of the demo photos in a loop, every rule firing on every
/// positive frame: a steady stream of violations with stills.
const BUSY: &str = "[scan]\nmode = \"continuous\"\nfps = 5.0\n\
    [rules.phone]\nframes = 1\ncooldown = \"0s\"\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n\
    [rules.covered]\nframes = 1\ncooldown = \"0s\"\n[rules.paper]\nframes = 1\ncooldown = \"0s\"\n";

fn start(config: &std::path::Path) -> (ChildGuard, std::sync::Arc<std::sync::Mutex<String>>) {
    run_daemon(env!("CARGO_BIN_EXE_deskcam"), config)
}

fn stop(d: &mut ChildGuard) {
    let _ = std::process::Command::new("kill").arg("-TERM").arg(d.0.id().to_string()).status();
    let status = d.0.wait().unwrap();
    assert!(status.success(), "daemon exit {status}");
}

/// The evidence the device stored, in its stamp (delivery) order, and which of it is
/// marked delivered.
fn stored(work: &std::path::Path) -> (Vec<String>, usize) {
    let dir = work.join("data/evidence");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|r| r.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    let ids = names
        .iter()
        .filter_map(|n| n.strip_suffix(".json"))
        .map(|stem| stem.split_once('-').expect("<stamp>-<id>").1.to_string())
        .collect();
    let sent = names.iter().filter(|n| n.ends_with(".sent")).count();
    (ids, sent)
}

/// What a subscriber received: event ids in order of arrival (with duplicates), and
/// each still's bytes by id.
struct Received {
    events: Vec<ViolationEvent>,
    stills: HashMap<String, Vec<Vec<u8>>>,
}

fn received(rec: &Recorder) -> Received {
    let mut events = Vec::new();
    let mut stills: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for m in rec.snapshot() {
        if m.topic.ends_with("/event/violation") {
            events.push(serde_json::from_slice(&m.payload).expect("event JSON"));
        } else if let Some(id) =
            m.topic.rsplit_once("/event/violation/").and_then(|(_, r)| r.strip_suffix("/still"))
        {
            stills.entry(id.to_string()).or_default().push(m.payload);
        }
    }
    Received { events, stills }
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Everything stored arrived, first arrivals in stamp order, each still intact and
/// matching its event; duplicates are repeats of the same id. Returns the duplicates.
fn assert_all_delivered_in_order(work: &std::path::Path, rec: &Recorder) -> usize {
    let (ids, sent) = stored(work);
    let r = received(rec);
    let mut first: Vec<String> = Vec::new();
    for e in &r.events {
        if !first.contains(&e.id) {
            first.push(e.id.clone());
        }
    }
    assert_eq!(first, ids, "every stored event arrives, in the order it was found");
    assert_eq!(sent, ids.len(), "every entry is marked delivered");
    for e in &r.events {
        let info = e.still.as_ref().expect("these rules send stills");
        let copies = r.stills.get(&e.id).unwrap_or_else(|| panic!("still of {}", e.id));
        for jpeg in copies {
            assert_eq!(deskcam_vision::sha256_hex(jpeg), info.sha256, "still of {} intact", e.id);
        }
    }
    r.events.len() - first.len()
}

#[test]
fn broker_outage_loses_no_evidence_and_keeps_the_order() {
    let port = free_port();
    let work = tempdir("outage");
    let mut broker = Mosquitto::start_persistent(port, &work);
    let device = "itest-outage";
    // The subscriber's session survives the broker's restart: what the device sends
    // after the outage is queued for it even before it has reconnected.
    let rec = Recorder::start_session(port, &format!("deskcam/{device}/event/#"), "outage-recorder");
    let source = format!("dir:{}", demo_photos().display());
    let config = write_config(&work, device, &source, true, port, BUSY);
    let (mut d, log) = start(&config);

    assert!(wait_until(Duration::from_secs(60), || received(&rec).events.len() >= 3), "first events");
    broker.stop();
    let before = received(&rec).events.len();
    // Violations keep happening while the broker is away: stored, not lost.
    assert!(
        wait_until(Duration::from_secs(30), || stored(&work).0.len() >= before + 4),
        "evidence is stored while the broker is down"
    );
    assert!(wait_text(&log, "evidence connection lost", Duration::from_secs(5)));
    broker.restart();
    let (ids_at_restart, _) = stored(&work);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let got: Vec<String> = received(&rec).events.into_iter().map(|e| e.id).collect();
            ids_at_restart.iter().all(|id| got.contains(id))
        }),
        "the backlog arrives after the outage; stored {:?}, received {}; log:\n{}",
        stored(&work),
        received(&rec).events.len(),
        log.lock().unwrap()
    );
    stop(&mut d);
    let dups = assert_all_delivered_in_order(&work, &rec);
    println!(
        "outage: {} events stored, {before} received before the outage, {dups} duplicates (same id)",
        stored(&work).0.len()
    );
}

#[test]
fn daemon_killed_mid_publish_loses_nothing() {
    let broker = Mosquitto::start();
    let work = tempdir("sigkill");
    let device = "itest-sigkill";
    let rec = Recorder::start(broker.port, &format!("deskcam/{device}/event/#"));
    let source = format!("dir:{}", demo_photos().display());
    let config = write_config(&work, device, &source, true, broker.port, BUSY);
    let (mut d, _log) = start(&config);
    assert!(wait_until(Duration::from_secs(60), || received(&rec).events.len() >= 2), "first events");

    // A frozen broker takes packets but acknowledges nothing: publishes are in flight
    // when the daemon dies.
    broker.signal("STOP");
    let before = received(&rec).events.len();
    assert!(
        wait_until(Duration::from_secs(30), || stored(&work).0.len() >= before + 3),
        "evidence is stored while the broker is frozen"
    );
    let _ = d.0.kill();
    let _ = d.0.wait();
    broker.signal("CONT");
    let (ids, sent) = stored(&work);
    assert!(sent < ids.len(), "some evidence was undelivered when the daemon died");

    // Restarted with monitoring off: whatever arrives now is the old backlog.
    let config = write_config(&work, device, &source, true, broker.port, "[scan]\nmode = \"off\"\n");
    let (mut d, _log) = start(&config);
    assert!(
        wait_until(Duration::from_secs(60), || stored(&work).1 == ids.len()),
        "the backlog is delivered after the restart"
    );
    stop(&mut d);
    assert_eq!(stored(&work).0, ids, "mode off: nothing new was found");
    // The still of a packet that reached the broker only from the dead daemon's socket
    // is whole too: checked with the rest.
    let dups = assert_all_delivered_in_order(&work, &rec);
    println!(
        "sigkill: {} events, {} undelivered at the kill, {dups} duplicates (same id)",
        ids.len(),
        ids.len() - sent
    );
    drop(broker);
}
