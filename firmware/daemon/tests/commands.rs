//! Commands over MQTT against the running daemon and a real mosquitto: each gets a
//! reply with its id; bad ones are refused with a reason and change nothing.

use std::process::Stdio;
use std::time::Duration;

use deskcam_testkit::*;
use rumqttc::{Client, MqttOptions, QoS};
use serde_json::Value;

/// A running daemon analysing basketball1.png (two people) in a loop, its broker, a
/// recorder of everything it publishes, and a client to send commands with.
struct Device {
    _broker: Mosquitto,
    rec: Recorder,
    daemon: ChildGuard,
    client: Client,
    dir: std::path::PathBuf,
    id: String,
}

impl Device {
    fn start(name: &str, extra: &str) -> Device {
        let broker = Mosquitto::start();
        let dir = tempdir(name);
        std::fs::copy(demo_photos().join("basketball1.png"), dir.join("basketball1.png")).unwrap();
        let id = format!("itest-{name}");
        let config = write_config(&dir, &id, &format!("dir:{}", dir.display()), true, broker.port, extra);
        let rec = Recorder::start(broker.port, &format!("deskcam/{id}/#"));
        let daemon = ChildGuard(
            std::process::Command::new(env!("CARGO_BIN_EXE_deskcam"))
                .arg("run")
                .arg("--config")
                .arg(&config)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        assert!(rec
            .wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/status") && m.payload == b"online")
            .is_some());
        let (client, mut conn) =
            Client::new(MqttOptions::new(format!("fleet-owner-{name}"), "127.0.0.1", broker.port), 16);
        std::thread::spawn(move || for _ in conn.iter() {});
        Device { _broker: broker, rec, daemon, client, dir, id }
    }

    fn send(&self, name: &str, payload: &str) {
        let topic = format!("deskcam/{}/cmd/{name}", self.id);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).unwrap();
    }
}

#[test]
fn commands_are_answered_and_bad_ones_change_nothing() {
    let extra =
        "[scan]\nmode = \"continuous\"\nfps = 4.0\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n";
    let dev = Device::start("commands", extra);
    let (rec, dir) = (&dev.rec, &dev.dir);
    let event = rec
        .wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/event/violation"))
        .expect("an extra_person event");
    let event_id =
        serde_json::from_slice::<Value>(&event.payload).unwrap()["id"].as_str().unwrap().to_string();

    let send = |name: &str, payload: &str| dev.send(name, payload);
    let reply = |id: &str| -> Value {
        let m = rec
            .wait_for(Duration::from_secs(10), |m| {
                m.topic.ends_with("/reply")
                    && serde_json::from_slice::<Value>(&m.payload).is_ok_and(|v| v["id"] == id)
            })
            .unwrap_or_else(|| panic!("no reply to {id}"));
        serde_json::from_slice(&m.payload).unwrap()
    };

    send("break/start", r#"{"id":"b1","reason":"lunch"}"#);
    assert_eq!(reply("b1")["ok"], true);
    // The break closes the shutter, and nothing is analysed during it.
    assert!(rec
        .wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/state")
            && String::from_utf8_lossy(&m.payload).contains("\"shutter\":\"closed\""))
        .is_some());
    std::thread::sleep(Duration::from_millis(300));
    let audits = |r: &Recorder| r.snapshot().iter().filter(|m| m.topic.ends_with("/audit")).count();
    let before = audits(rec);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(audits(rec), before, "no scan during a break");

    send("break/start", r#"{"id":"b2","reason":"again"}"#);
    let r = reply("b2");
    assert_eq!((r["ok"].as_bool(), r["error"].as_str()), (Some(false), Some("already on a break")));

    // Bad commands: refused with a reason, nothing changes.
    send("break/start", r#"{"id":"bad1","reason":42}"#);
    assert!(reply("bad1")["error"].as_str().unwrap().contains("invalid type"));
    send("reboot", r#"{"id":"bad2"}"#);
    assert!(reply("bad2")["error"].as_str().unwrap().contains("unknown command"));
    send("scan-now", "{not json");
    assert!(rec
        .wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/reply")
            && String::from_utf8_lossy(&m.payload).contains("not JSON"))
        .is_some());
    send("scan-now", r#"{"id":"s1"}"#);
    assert_eq!(reply("s1")["error"], "the worker is on a break");

    send("break/end", r#"{"id":"e1"}"#);
    assert_eq!(reply("e1")["ok"], true);
    send("break/end", r#"{"id":"e2"}"#);
    assert_eq!(reply("e2")["error"], "no break in progress");

    // Evidence ack deletes the evidence at once; a second ack finds nothing.
    let evidence = dir.join("data/evidence");
    let has = |id: &str| {
        std::fs::read_dir(&evidence)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(&format!("-{id}.")))
    };
    assert!(has(&event_id));
    send("evidence/ack", &format!(r#"{{"id":"a1","evidence":"{event_id}"}}"#));
    assert_eq!(reply("a1")["ok"], true);
    assert!(!has(&event_id), "acknowledged evidence is deleted");
    send("evidence/ack", &format!(r#"{{"id":"a2","evidence":"{event_id}"}}"#));
    assert!(reply("a2")["error"].as_str().unwrap().contains("no evidence"));

    let mut daemon = dev.daemon;
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon keeps running through bad commands");
}

#[test]
fn a_spot_check_ordered_by_scan_now_is_audited_before_its_evidence_leaves() {
    // Spot mode with checks a day apart: only scan-now will look.
    let extra = "[scan]\nmode = \"spot\"\nper_hour = 0.001\nmin_gap = \"1d\"\nframes_per_check = 3\n";
    let dev = Device::start("scannow", extra);
    let rec = &dev.rec;
    dev.send("scan-now", r#"{"id":"n1"}"#);

    let event =
        rec.wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/event/violation")).expect("an event");
    let msgs = rec.snapshot();
    let audit_at = msgs.iter().position(|m| m.topic.ends_with("/audit")).expect("an audit entry");
    let event_at = msgs.iter().position(|m| m.payload == event.payload).unwrap();
    assert!(audit_at < event_at, "the scan is on record before its evidence is sent");
    let audit: Value = serde_json::from_slice(&msgs[audit_at].payload).unwrap();
    assert_eq!((audit["mode"].as_str(), audit["frames"].as_u64()), (Some("spot"), Some(3)), "{audit}");
    assert_eq!(audit["result"], "violation");
    assert_eq!(
        audit["rules"][0], "extra_person",
        "three positive frames in one check fire the debounced rule"
    );
    // After the check the shutter is closed again.
    std::thread::sleep(Duration::from_millis(500));
    let msgs = rec.snapshot();
    let last_state = msgs.iter().rev().find(|m| m.topic.ends_with("/state")).unwrap();
    assert!(String::from_utf8_lossy(&last_state.payload).contains("\"shutter\":\"closed\""));
}
