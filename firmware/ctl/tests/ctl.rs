//! deskcamctl against a real mosquitto, with a device's retained messages in place.

use std::process::Command;
use std::time::Duration;

use deskcam_testkit::Mosquitto;
use rumqttc::{Client, MqttOptions, QoS};

fn ctl(broker: &Mosquitto) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deskcamctl"));
    c.args(["--broker", &broker.url()]);
    c
}

/// Publishes what a device leaves retained on the broker.
fn retain(broker: &Mosquitto, device: &str, status: &str, state: &str) {
    let (client, mut conn) = Client::new(MqttOptions::new("test-device", "127.0.0.1", broker.port), 8);
    client.publish(format!("deskcam/{device}/status"), QoS::AtLeastOnce, true, status).unwrap();
    client.publish(format!("deskcam/{device}/state"), QoS::AtLeastOnce, true, state).unwrap();
    let mut acks = 0;
    for ev in conn.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = ev {
            acks += 1;
            if acks == 2 {
                break;
            }
        }
    }
    client.disconnect().unwrap();
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn status_prints_retained_status_and_state_as_text_and_json() {
    let broker = Mosquitto::start();
    retain(&broker, "desk-7", "online", r#"{"v":1,"mode":"spot","shutter":"closed"}"#);
    let out = ctl(&broker).args(["--device", "desk-7", "status"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status  online") && text.contains("\"mode\":\"spot\""), "{text}");

    let out = ctl(&broker).args(["--device", "desk-7", "--json", "status"]).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["status"], "online");
    assert_eq!(j["state"]["shutter"], "closed");
}

#[test]
fn unknown_device_and_unreachable_broker_are_distinct_failures() {
    let broker = Mosquitto::start();
    let out = ctl(&broker).args(["--device", "never-seen", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never-seen"));

    let port = deskcam_testkit::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_deskcamctl"))
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}"), "--device", "d", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&port.to_string()));
}

#[test]
fn audit_prints_entries_as_they_arrive() {
    let broker = Mosquitto::start();
    let mut child = ctl(&broker)
        .args(["--device", "desk-9", "audit", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (client, mut conn) = Client::new(MqttOptions::new("test-audit", "127.0.0.1", broker.port), 8);
    std::thread::spawn(move || for _ in conn.iter() {});
    let entry = r#"{"v":1,"time":"2026-11-24T10:00:00.000Z","mode":"spot","result":"violation","frames":3,"rules":["phone"]}"#;
    // Publish until the CLI (which subscribes on start) has taken one and exited.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "deskcamctl audit did not print an entry");
        client.publish("deskcam/desk-9/audit", QoS::AtLeastOnce, false, entry).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("violation") && text.contains("phone") && text.contains("frames 3"), "{text}");
}

/// Stands in for a device's command handling: answers `break/start` with ok and
/// `break/end` with the refusal the daemon gives when no break is running.
fn fake_device(broker: &Mosquitto, device: &'static str) {
    let (client, mut conn) = Client::new(MqttOptions::new("fake-device", "127.0.0.1", broker.port), 8);
    client.subscribe(format!("deskcam/{device}/cmd/#"), QoS::AtLeastOnce).unwrap();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev else { continue };
            let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
            let name = p.topic.rsplit_once("/cmd/").map(|(_, n)| n.to_string()).unwrap_or_default();
            let reply = match name.as_str() {
                "break/start" if body["reason"] == "lunch" => {
                    serde_json::json!({"v": 1, "id": body["id"], "command": name, "ok": true})
                }
                _ => {
                    serde_json::json!({"v": 1, "id": body["id"], "command": name, "ok": false, "error": "no break in progress"})
                }
            };
            client
                .publish(format!("deskcam/{device}/reply"), QoS::AtLeastOnce, false, reply.to_string())
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn commands_wait_for_the_reply_and_exit_by_outcome() {
    let broker = Mosquitto::start();
    fake_device(&broker, "desk-c");
    let ok =
        ctl(&broker).args(["--device", "desk-c", "break", "start", "--reason", "lunch"]).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("break/start: ok"));

    let refused = ctl(&broker).args(["--device", "desk-c", "break", "end"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no break in progress"));

    let silent = ctl(&broker).args(["--device", "nobody", "--timeout", "1", "scan-now"]).output().unwrap();
    assert_eq!(silent.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&silent.stderr).contains("no reply"));
}

#[test]
fn connection_settings_come_from_a_file_below_flags_and_env() {
    let broker = Mosquitto::start();
    retain(&broker, "desk-file", "online", r#"{"v":1}"#);
    let dir = deskcam_testkit::tempdir("ctl-settings");
    let file = dir.join("deskcamctl.toml");
    std::fs::write(&file, format!("broker = \"{}\"\ndevice = \"desk-file\"\n", broker.url())).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_deskcamctl"))
            .args(args)
            .env_remove("DESKCAM_BROKER")
            .env_remove("DESKCAM_DEVICE")
            .output()
            .unwrap()
    };
    let out = run(&["--config", file.to_str().unwrap(), "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("device  desk-file"), "{out:?}");
    // A flag wins over the file: that device never reported.
    let out = run(&["--config", file.to_str().unwrap(), "--device", "desk-other", "status"]);
    assert_eq!(out.status.code(), Some(3));
    // A settings file with a typo is an error naming it, not silently ignored.
    std::fs::write(&file, "brokr = \"x\"\n").unwrap();
    let out = run(&["--config", file.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deskcamctl.toml"), "{out:?}");
}
