//! The device against a mosquitto that requires TLS client certificates and keeps each
//! device to its own subtree with an ACL, and against one that requires a login.
//! Certificates are made by the test (rcgen).

use std::time::{Duration, Instant};

use deskcam_core::config::BrokerUrl;
use deskcam_testkit::*;
use rumqttc::{Client, Event, Packet, QoS};

const DEVICE: &str = "itest-tls";
const BUSY: &str =
    "[scan]\nmode = \"continuous\"\nfps = 4.0\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n";

fn options(
    port: u16,
    id: &str,
    ca: &std::path::Path,
    client: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<rumqttc::MqttOptions, String> {
    let url = BrokerUrl::parse(&format!("mqtts://127.0.0.1:{port}")).unwrap();
    let files = deskcam_uplink::tls::TlsFiles { ca: ca.to_path_buf(), client };
    let tls = deskcam_uplink::tls::client_config(&files).map_err(|e| e.to_string())?;
    Ok(deskcam_uplink::mqtt_options(id, &url, None, Some(&tls)))
}

/// Connects and reports whether the broker accepted the connection.
fn connects(opts: rumqttc::MqttOptions) -> bool {
    let (_client, mut conn) = Client::new(opts, 8);
    for ev in conn.iter().take(3) {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(a))) => return a.code == rumqttc::ConnectReturnCode::Success,
            Err(_) => return false,
            Ok(_) => {}
        }
    }
    false
}

fn daemon(config: &std::path::Path) -> (ChildGuard, std::sync::Arc<std::sync::Mutex<String>>) {
    run_daemon(env!("CARGO_BIN_EXE_deskcam"), config)
}

#[test]
fn client_certificates_and_an_acl_keep_the_device_in_its_subtree() {
    let dir = tempdir("tls");
    let pki = Pki::new(&dir, "fleet");
    let (server_cert, server_key) = pki.issue("broker", true);
    let device = pki.issue(DEVICE, false);
    let owner = pki.issue("fleet-owner", false);
    let acl = dir.join("acl");
    std::fs::write(&acl, "user fleet-owner\ntopic readwrite deskcam/#\n\npattern readwrite deskcam/%u/#\n")
        .unwrap();
    let port = free_port();
    let broker = Mosquitto::start_with(
        port,
        &format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             use_identity_as_username true\nacl_file {}\n",
            pki.ca_file("fleet").display(),
            server_cert.display(),
            server_key.display(),
            acl.display()
        ),
    );
    let ca = pki.ca_file("fleet");
    let rec = Recorder::start_opts(options(port, "owner", &ca, Some(owner)).unwrap(), "deskcam/#");

    // The device, with its certificate: it works as on a plain broker.
    std::fs::copy(demo_photos().join("basketball1.png"), dir.join("basketball1.png")).unwrap();
    let tls = format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:{port}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        ca.display(),
        device.0.display(),
        device.1.display()
    );
    let config = write_config(&dir, DEVICE, &format!("dir:{}", dir.display()), true, broker.port, BUSY);
    // write_config sets a plain mqtt:// url; the TLS table replaces it.
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(&format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n"), &tls);
    std::fs::write(&config, text).unwrap();
    let (_d, log) = daemon(&config);
    let root = format!("deskcam/{DEVICE}");
    assert!(
        rec.wait_for(Duration::from_secs(30), |m| m.topic == format!("{root}/status")
            && m.payload == b"online")
            .is_some(),
        "device online over TLS; log:\n{}",
        log.lock().unwrap()
    );
    let event = rec.wait_for(Duration::from_secs(30), |m| m.topic == format!("{root}/event/violation"));
    assert!(event.is_some(), "events over TLS");
    assert!(
        rec.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/still")).is_some(),
        "stills over TLS"
    );

    // With the device's certificate, a publish outside its subtree is dropped by the broker.
    let (client, mut conn) = Client::new(options(port, "intruder", &ca, Some(device.clone())).unwrap(), 8);
    std::thread::spawn(move || for _ in conn.iter() {});
    client.publish("deskcam/someone-else/event/violation", QoS::AtLeastOnce, false, "forged").unwrap();
    client.publish(format!("{root}/probe"), QoS::AtLeastOnce, false, "own subtree").unwrap();
    assert!(rec.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/probe")).is_some());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !rec.snapshot().iter().any(|m| m.topic.starts_with("deskcam/someone-else")),
        "the ACL refuses a publish outside the device's subtree"
    );

    // Without a certificate, or with one from another CA, no connection.
    assert!(!connects(options(port, "anonymous", &ca, None).unwrap()), "no client certificate");
    let rogue = Pki::new(&dir, "rogue");
    let forged = rogue.issue(DEVICE, false);
    assert!(!connects(options(port, "forged", &ca, Some(forged)).unwrap()), "certificate from another CA");
    // And a broker whose certificate is not from the configured CA is refused by us.
    assert!(!connects(options(port, "wrong-ca", &rogue.ca_file("rogue"), None).unwrap()));
    drop(broker);
}

#[test]
fn a_login_is_used_and_the_password_never_published() {
    let dir = tempdir("login");
    let passwd = dir.join("passwd");
    let ok = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["desk", "s3cret-pass"])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(ok.success());
    let port = free_port();
    let _broker = Mosquitto::start_with(
        port,
        &format!("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n", passwd.display()),
    );
    let mut opts = rumqttc::MqttOptions::new("owner", "127.0.0.1", port);
    opts.set_credentials("desk", "s3cret-pass");
    let rec = Recorder::start_opts(opts, "deskcam/#");

    let login = "[mqtt]\nusername = \"desk\"\npassword = \"s3cret-pass\"\n";
    let photos = format!("dir:{}", demo_photos().display());
    let config = write_config(&dir, "itest-login", &photos, true, port, "[scan]\nmode = \"off\"\n");
    let text = std::fs::read_to_string(&config).unwrap().replace("[mqtt]\n", login);
    std::fs::write(&config, text).unwrap();
    let (_d, _log) = daemon(&config);
    let retained = rec
        .wait_for(Duration::from_secs(20), |m| m.topic == "deskcam/itest-login/config")
        .expect("config published after logging in");
    let text = String::from_utf8_lossy(&retained.payload);
    assert!(!text.contains("s3cret-pass"), "the password never leaves the device: {text}");
    assert!(text.contains("\"password\":\"(set)\""), "{text}");

    // A wrong password: the daemon says why and keeps retrying.
    let dir2 = tempdir("login-wrong");
    let config = write_config(&dir2, "itest-login2", &photos, true, port, "[scan]\nmode = \"off\"\n");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("[mqtt]\n", &login.replace("s3cret", "wrong"));
    std::fs::write(&config, text).unwrap();
    let (mut d, log) = daemon(&config);
    assert!(wait_text(&log, "broker unreachable", Duration::from_secs(10)), "{}", log.lock().unwrap());
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        assert!(d.0.try_wait().unwrap().is_none(), "keeps running");
        std::thread::sleep(Duration::from_millis(100));
    }
}
