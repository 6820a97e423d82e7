//! Commands over MQTT against the running daemon and a real mosquitto: each gets a
//! reply with its id; bad ones are refused with a reason and change nothing.

use std::time::Duration;

use deskcam_testkit::*;
use rumqttc::{Client, MqttOptions, QoS};
use serde_json::Value;
use std::process::Stdio;

fn start(name: &str, extra: &str) -> Device {
    Device::start(env!("CARGO_BIN_EXE_deskcam"), name, extra, &[])
}

#[test]
fn commands_are_answered_and_bad_ones_change_nothing() {
    let extra =
        "[scan]\nmode = \"continuous\"\nfps = 4.0\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n";
    let dev = start("commands", extra);
    let (rec, dir) = (&dev.rec, &dev.dir);
    let event = rec
        .wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/event/violation"))
        .expect("an extra_person event");
    let event_id =
        serde_json::from_slice::<Value>(&event.payload).unwrap()["id"].as_str().unwrap().to_string();

    let send = |name: &str, payload: &str| dev.send(name, payload);
    let reply = |id: &str| reply_to(rec, id);

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
    let dev = start("scannow", extra);
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

fn reply_to(rec: &Recorder, id: &str) -> Value {
    let m = rec
        .wait_for(Duration::from_secs(10), |m| {
            m.topic.ends_with("/reply")
                && serde_json::from_slice::<Value>(&m.payload).is_ok_and(|v| v["id"] == id)
        })
        .unwrap_or_else(|| panic!("no reply to {id}"));
    serde_json::from_slice(&m.payload).unwrap()
}

#[test]
fn config_and_evidence_are_managed_over_mqtt_and_saved_atomically() {
    let extra =
        "[scan]\nmode = \"continuous\"\nfps = 4.0\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n";
    let dev = start("manage", extra);
    let rec = &dev.rec;
    let file = dev.dir.join("deskcam.toml");
    let retained_config = |mode: &str| {
        let want = format!("\"mode\":\"{mode}\"");
        rec.wait_for(Duration::from_secs(10), |m| {
            m.topic.ends_with("/config") && m.retain == (mode == "continuous")
                || m.topic.ends_with("/config") && String::from_utf8_lossy(&m.payload).contains(&want)
        })
        .is_some()
    };
    assert!(retained_config("continuous"), "the effective config is published, retained");
    let event =
        rec.wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/event/violation")).expect("an event");
    let event: Value = serde_json::from_slice(&event.payload).unwrap();
    let event_id = event["id"].as_str().unwrap();

    // mode: applied at once (the shutter closes), saved, published.
    dev.send("mode", r#"{"id":"m1","mode":"off"}"#);
    let r = reply_to(rec, "m1");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["changed"], serde_json::json!(["scan.mode"]));
    assert_eq!(r["data"]["saved"], true);
    assert!(rec
        .wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/state")
            && String::from_utf8_lossy(&m.payload).contains("\"mode\":\"off\"")
            && String::from_utf8_lossy(&m.payload).contains("\"shutter\":\"closed\""))
        .is_some());
    assert!(retained_config("off"));
    assert!(std::fs::read_to_string(&file).unwrap().contains("mode = \"off\""));
    dev.send("scan-now", r#"{"id":"s1"}"#);
    assert!(reply_to(rec, "s1")["error"].as_str().unwrap().contains("monitoring is off"));

    // config/set: live keys apply, a broker key waits for a restart.
    dev.send(
        "config/set",
        r#"{"id":"c1","patch":{"mqtt":{"keep_alive":"45s"},"rules":{"phone":{"min_score":0.5}}}}"#,
    );
    let r = reply_to(rec, "c1");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["restart_required"], serde_json::json!(["mqtt.keep_alive"]));
    dev.send("config/set", r#"{"id":"c2","toml":"[breaks]\nmax_break = \"45m\"\n"}"#);
    assert_eq!(reply_to(rec, "c2")["data"]["changed"], serde_json::json!(["breaks.max_break"]));

    // Bad patches: refused with the key named, the file untouched.
    let saved = std::fs::read(&file).unwrap();
    for (id, payload, want) in [
        ("x1", r#"{"id":"x1","patch":{"scan":{"fps":"fast"}}}"#, "scan.fps"),
        ("x2", r#"{"id":"x2","patch":{"preset":"none"}}"#, "preset"),
        ("x3", r#"{"id":"x3","patch":{"evidence":{"max_age":"60d"}}}"#, "evidence.max_age"),
        ("x4", r#"{"id":"x4","mode":"sometimes"}"#, "not one of"),
    ] {
        dev.send(if id == "x4" { "mode" } else { "config/set" }, payload);
        let r = reply_to(rec, id);
        assert!(r["error"].as_str().is_some_and(|e| e.contains(want)), "{id}: {r}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), saved, "a refused patch leaves the file as it was");

    dev.send("config/get", r#"{"id":"g1"}"#);
    let r = reply_to(rec, "g1");
    assert_eq!(r["data"]["scan"]["mode"], "off");
    assert_eq!(r["data"]["rules"]["phone"]["min_score"], 0.5);
    assert_eq!(r["data"]["mqtt"]["keep_alive"], "30s", "the running value until a restart");

    // Evidence: listed with its delivery, fetched whole.
    dev.send("evidence/list", r#"{"id":"l1"}"#);
    let r = reply_to(rec, "l1");
    let list = r["data"].as_array().unwrap();
    let entry = list.iter().find(|e| e["id"] == event_id).expect("the event is listed");
    assert_eq!(entry["delivered"], true);
    dev.send("evidence/get", &format!(r#"{{"id":"v1","evidence":"{event_id}"}}"#));
    let r = reply_to(rec, "v1");
    assert_eq!(r["data"]["event"]["id"], event_id);
    use base64::Engine as _;
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(r["data"]["still_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(Some(deskcam_vision::sha256_hex(&jpeg).as_str()), event["still"]["sha256"].as_str());

    // The saved file is what the next start runs with.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_deskcam"))
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let mut daemon = dev.daemon;
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon keeps running");
}

/// `deskcamctl`, built beside `deskcam` by `cargo test --workspace`.
fn ctl(dev: &Device, args: &[&str]) -> std::process::Output {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_deskcam")).with_file_name("deskcamctl");
    assert!(bin.is_file(), "{} missing: run `cargo build --workspace`", bin.display());
    std::process::Command::new(bin)
        .args(["--broker", &format!("mqtt://127.0.0.1:{}", dev.broker.port), "--device", &dev.id])
        .args(args)
        .env_remove("DESKCAM_CTL_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn every_command_good_and_bad_through_deskcamctl() {
    let extra =
        "[scan]\nmode = \"continuous\"\nfps = 4.0\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n";
    let dev = start("ctl", extra);
    dev.rec.wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/event/violation")).expect("an event");
    let cases: &[(&[&str], i32, &str)] = &[
        (&["status"], 0, "status  online"),
        (&["scan-now"], 0, "scan-now: ok"),
        (&["break", "start", "--reason", "lunch"], 0, "break/start: ok"),
        (&["break", "start", "--reason", "again"], 4, "already on a break"),
        (&["scan-now"], 4, "on a break"),
        (&["break", "end"], 0, "break/end: ok"),
        (&["break", "end"], 4, "no break in progress"),
        (&["identify", "--seconds", "2"], 4, "the camera is looking"),
        (&["mode", "off"], 0, "changed: scan.mode"),
        (&["identify", "--seconds", "2"], 0, "identify: ok"),
        (&["identify", "--seconds", "100"], 4, "1-60"),
        (&["mode", "sometimes"], 4, "not one of"),
        (
            &["config", "set", "scan.fps=2", "rules.phone.min_score=0.45"],
            0,
            "changed: rules.phone.min_score, scan.fps",
        ),
        (&["config", "set", "mqtt.keep_alive=40s"], 0, "waiting for a restart: mqtt.keep_alive"),
        (&["config", "set", "scan.fps=fast"], 4, "scan.fps"),
        (&["config", "set", "preset=none"], 4, "preset"),
        (&["config", "set", "no-equals-sign"], 1, "expected key=value"),
        (&["config", "get"], 0, "mode = \"off\""),
        (&["evidence", "list"], 0, "entries"),
        (&["evidence", "ack", "no-such-event"], 4, "no evidence"),
        (&["evidence", "get", "../etc"], 4, "event id"),
    ];
    for (args, code, want) in cases {
        let out = ctl(&dev, args);
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(*code), "deskcamctl {args:?}: {text}");
        assert!(text.contains(want), "deskcamctl {args:?}: want {want:?} in {text}");
    }

    // JSON for scripts; an evidence id from the list, fetched and acknowledged.
    let out = ctl(&dev, &["--json", "evidence", "list"]);
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = reply["data"][0]["id"].as_str().expect("an entry").to_string();
    let jpg = dev.dir.join("fetched.jpg");
    let out = ctl(&dev, &["evidence", "get", &id, "--out", jpg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let event: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(event["id"], id.as_str());
    let jpeg = std::fs::read(&jpg).unwrap();
    assert_eq!(Some(deskcam_vision::sha256_hex(&jpeg).as_str()), event["still"]["sha256"].as_str());
    assert_eq!(ctl(&dev, &["evidence", "ack", &id]).status.code(), Some(0));
    assert_eq!(ctl(&dev, &["evidence", "ack", &id]).status.code(), Some(4), "acknowledged evidence is gone");
    let out = ctl(&dev, &["--json", "config", "get"]);
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["data"]["rules"]["phone"]["min_score"], 0.45);
    let mut daemon = dev.daemon;
    assert!(daemon.0.try_wait().unwrap().is_none(), "the daemon keeps running");
}

#[test]
fn telemetry_reports_frames_speed_queues_and_store() {
    let broker = Mosquitto::start();
    let dir = tempdir("telemetry");
    std::fs::copy(demo_photos().join("basketball1.png"), dir.join("basketball1.png")).unwrap();
    let extra =
        "[scan]\nmode = \"continuous\"\nfps = 4.0\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n";
    let config =
        write_config(&dir, "itest-telemetry", &format!("dir:{}", dir.display()), true, broker.port, extra);
    let text = std::fs::read_to_string(&config).unwrap().replace("[mqtt]\n", "[mqtt]\ntelemetry_s = 1\n");
    std::fs::write(&config, text).unwrap();
    let rec = Recorder::start(broker.port, "deskcam/itest-telemetry/#");
    let _d = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_deskcam"))
            .args(["run", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let busy = |m: &deskcam_testkit::Msg| {
        m.topic.ends_with("/telemetry")
            && serde_json::from_slice::<deskcam_core::schema::Telemetry>(&m.payload)
                .is_ok_and(|t| t.frames >= 3 && t.store.entries >= 1)
    };
    let m = rec.wait_for(Duration::from_secs(30), busy).expect("telemetry with frames and stored evidence");
    assert!(!m.retain);
    let t: deskcam_core::schema::Telemetry = serde_json::from_slice(&m.payload).unwrap();
    let ms = t.inference_ms.expect("inference percentiles");
    assert!(ms.p50 > 0.0 && ms.p95 >= ms.p50, "{ms:?}");
    assert!(t.disk_free_bytes.is_some_and(|b| b > 0));
    assert!(t.store.bytes > 0 && t.mqtt_connects >= 1);
    // Several, about a second apart.
    std::thread::sleep(Duration::from_millis(2500));
    let n = rec.snapshot().iter().filter(|m| m.topic.ends_with("/telemetry")).count();
    assert!(n >= 3, "{n} telemetry messages");
}

#[test]
fn home_assistant_discovery_and_its_break_switch() {
    let dev = start("hass", "[scan]\nmode = \"off\"\n[homeassistant]\nenabled = true\n");
    let ha = Recorder::start(dev.broker.port, "homeassistant/#");
    assert!(ha.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/last_scan/config")).is_some());
    let configs = ha.snapshot();
    assert_eq!(configs.len(), deskcam_core::RuleKind::ALL.len() + 2, "one message per entity");
    assert!(configs.iter().all(|m| m.retain), "discovery is retained");
    let switch = configs.iter().find(|m| m.topic.contains("/switch/")).expect("break switch");
    let switch: Value = serde_json::from_slice(&switch.payload).unwrap();
    let command_topic = switch["command_topic"].as_str().unwrap().to_string();
    let on_break = |on: bool| {
        let want = format!("\"break\":{on}");
        dev.rec
            .wait_for(Duration::from_secs(5), |m| {
                m.topic.ends_with("/state") && String::from_utf8_lossy(&m.payload).contains(&want)
            })
            .is_some()
    };
    // What Home Assistant sends when the switch is flipped.
    let flip = |payload: &str| {
        dev.client.publish(command_topic.clone(), QoS::AtLeastOnce, false, payload.to_string()).unwrap()
    };
    flip(switch["payload_on"].as_str().unwrap());
    assert!(on_break(true), "the switch starts a break");
    flip(switch["payload_off"].as_str().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let last = dev.rec.snapshot().into_iter().rev().find(|m| m.topic.ends_with("/state")).unwrap();
    assert!(String::from_utf8_lossy(&last.payload).contains("\"break\":false"), "and ends it");
}

#[test]
fn commands_sent_while_the_device_is_offline_arrive_when_it_returns() {
    let broker = Mosquitto::start();
    let dir = tempdir("offline-cmd");
    let photos = format!("dir:{}", demo_photos().display());
    let config = write_config(&dir, "itest-offline", &photos, true, broker.port, "[scan]\nmode = \"off\"\n");
    let rec = Recorder::start(broker.port, "deskcam/itest-offline/#");
    let online = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let seen = rec
                .snapshot()
                .iter()
                .filter(|m| m.topic.ends_with("/status") && m.payload == b"online")
                .count();
            if seen >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    let (mut d, _log) = run_daemon(env!("CARGO_BIN_EXE_deskcam"), &config);
    assert!(online(1));
    // A clean stop; the broker keeps the device's session (clean session off).
    let _ = std::process::Command::new("kill").args(["-TERM", &d.0.id().to_string()]).status();
    assert!(d.0.wait().unwrap().success());

    let (client, mut conn) = Client::new(MqttOptions::new("owner-offline", "127.0.0.1", broker.port), 8);
    client
        .publish(
            "deskcam/itest-offline/cmd/break/start",
            QoS::AtLeastOnce,
            false,
            r#"{"id":"q1","reason":"queued"}"#,
        )
        .unwrap();
    for ev in conn.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = ev {
            break;
        }
    }
    let (_d, _log) = run_daemon(env!("CARGO_BIN_EXE_deskcam"), &config);
    assert!(online(2));
    let r = reply_to(&rec, "q1");
    assert_eq!(r["ok"], true, "the queued command ran after the restart: {r}");
}
