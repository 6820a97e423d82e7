//! The hardware paths of the real daemon on the simulated board, seen from MQTT and
//! from the pin trace: a camera that goes away and comes back, a shutter whose
//! end-stop does not confirm closing, the button, and `safe-state`.

use std::path::Path;
use std::time::Duration;

use deskcam_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_deskcam");

/// `(pin, level word)` per line of a simulated pin trace.
fn trace(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

fn has(m: &Msg, topic_end: &str, text: &str) -> bool {
    m.topic.ends_with(topic_end) && String::from_utf8_lossy(&m.payload).contains(text)
}

fn started(name: &str, extra: &str, env: &[(&str, &str)]) -> (Device, std::path::PathBuf) {
    let trace_file = std::env::temp_dir().join(format!("deskcam-{name}-{}.trace", std::process::id()));
    let _ = std::fs::remove_file(&trace_file);
    let mut all = vec![("DESKCAM_SIM_TRACE", trace_file.to_str().unwrap())];
    all.extend_from_slice(env);
    (Device::start(BIN, name, extra, &all), trace_file)
}

#[test]
fn a_lost_camera_closes_the_shutter_is_retried_and_resumes() {
    let (dev, trace_file) = started("camlost", "[scan]\nmode = \"continuous\"\nfps = 5.0\n", &[]);
    let wait = |what: &str, end: &str, text: &str| {
        dev.rec
            .wait_for(Duration::from_secs(20), |m| has(m, end, text))
            .unwrap_or_else(|| panic!("no {what}"))
    };
    wait("open shutter", "/state", "\"shutter\":\"open\"");
    // Unplug: the camera's directory goes away.
    let camera = dev.dir.join("camera");
    let unplugged = dev.dir.join("camera-unplugged");
    std::fs::rename(&camera, &unplugged).unwrap();
    wait("camera_lost audit entry", "/audit", "\"result\":\"camera_lost\"");
    let lost = wait("lost state", "/state", "\"camera\":\"lost\"");
    assert!(String::from_utf8_lossy(&lost.payload).contains("\"shutter\":\"closed\""));
    let lost_at = trace(&trace_file).len();
    std::thread::sleep(Duration::from_millis(1_500));
    let during = trace(&trace_file)[lost_at..].to_vec();
    assert!(during.iter().all(|(p, l)| p != "shutter" || l == "low"), "shutter moved while lost: {during:?}");
    // The fault pattern blinks: the LED goes on and off while the camera is lost.
    let led: Vec<&String> = during.iter().filter(|(p, _)| p == "led").map(|(_, l)| l).collect();
    assert!(led.iter().filter(|l| **l == "high").count() >= 3, "no fault blink: {during:?}");

    // Plugged back in: found at the next try (5 s after the loss), looking again.
    std::fs::rename(&unplugged, &camera).unwrap();
    wait("camera_back audit entry", "/audit", "\"result\":\"camera_back\"");
    wait("ok state", "/state", "\"camera\":\"ok\"");
    let msgs = dev.rec.snapshot();
    let back = msgs.iter().position(|m| has(m, "/audit", "camera_back")).unwrap();
    assert_eq!(msgs.iter().filter(|m| has(m, "/audit", "camera_lost")).count(), 1, "one entry per outage");
    assert!(
        dev.rec.wait_for(Duration::from_secs(10), |m| has(m, "/state", "\"shutter\":\"open\"")).is_some_and(
            |_| dev.rec.snapshot()[back..].iter().any(|m| has(m, "/state", "\"shutter\":\"open\""))
        ),
        "did not resume"
    );
}

#[test]
fn a_shutter_that_does_not_confirm_closing_keeps_the_camera_closed() {
    let (dev, trace_file) =
        started("jammed", "[scan]\nmode = \"continuous\"\nfps = 5.0\n", &[("DESKCAM_SIM_END_STOP", "stuck")]);
    assert!(dev
        .rec
        .wait_for(Duration::from_secs(20), |m| has(m, "/state", "\"shutter\":\"open\""))
        .is_some());
    // A break closes the shutter; the end-stop never reports it closed.
    dev.send("break/start", r#"{"id":"b1","reason":"lunch"}"#);
    assert!(dev.rec.wait_for(Duration::from_secs(10), |m| has(m, "/audit", "\"shutter_fault\"")).is_some());
    assert!(dev
        .rec
        .wait_for(Duration::from_secs(5), |m| has(m, "/state", "\"shutter\":\"fault\""))
        .is_some());
    dev.send("break/end", r#"{"id":"b2"}"#);
    dev.send("scan-now", r#"{"id":"s1"}"#);
    let reply = dev
        .rec
        .wait_for(Duration::from_secs(10), |m| has(m, "/reply", "\"s1\""))
        .expect("a reply to scan-now");
    let text = String::from_utf8_lossy(&reply.payload).to_string();
    assert!(text.contains("\"ok\":false") && text.contains("shutter did not confirm"), "{text}");
    std::thread::sleep(Duration::from_secs(2));
    // After the fault, the shutter line was never driven open again.
    let t = trace(&trace_file);
    let last_open = t.iter().rposition(|(p, l)| p == "shutter" && l == "high").unwrap();
    let first_fault_close = t.iter().skip(last_open).position(|(p, l)| p == "shutter" && l == "low");
    assert!(first_fault_close.is_some(), "{t:?}");
    let opens = t.iter().filter(|(p, l)| p == "shutter" && l == "high").count();
    assert_eq!(opens, 1, "continuous mode opens once; never again after the fault: {t:?}");
}

#[test]
fn the_button_starts_and_ends_a_break() {
    let button = std::env::temp_dir().join(format!("deskcam-button-{}", std::process::id()));
    let _ = std::fs::remove_file(&button);
    let (dev, _trace) = started(
        "button",
        "[scan]\nmode = \"continuous\"\nfps = 5.0\n",
        &[("DESKCAM_SIM_BUTTON", button.to_str().unwrap())],
    );
    assert!(dev
        .rec
        .wait_for(Duration::from_secs(20), |m| has(m, "/state", "\"shutter\":\"open\""))
        .is_some());
    let press = || {
        std::fs::write(&button, b"").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        std::fs::remove_file(&button).unwrap();
    };
    press();
    let on = dev
        .rec
        .wait_for(Duration::from_secs(5), |m| has(m, "/state", "\"break\":true"))
        .expect("a press starts a break");
    assert!(String::from_utf8_lossy(&on.payload).contains("\"shutter\":\"closed\""));
    std::thread::sleep(Duration::from_millis(500));
    press();
    assert!(
        dev.rec.wait_for(Duration::from_secs(5), |m| has(m, "/state", "\"break\":false")).is_some(),
        "a second press ends it"
    );
}

#[test]
fn safe_state_drives_the_configured_board_or_says_it_cannot() {
    let dir = tempdir("safestate");
    let sim = write_config(&dir, "itest-safe", "dir:/nonexistent", false, 1883, "");
    let out = std::process::Command::new(BIN).args(["safe-state", "--config"]).arg(&sim).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no physical shutter or LED was driven"));

    // A board with a GPIO chip this machine does not have: a clear error, not success.
    if !Path::new("/dev/gpiochip0").exists() {
        let real = dir.join("qemu.toml");
        let text = std::fs::read_to_string(&sim).unwrap().replace("board = \"sim\"", "board = \"qemu-virt\"");
        std::fs::write(&real, text).unwrap();
        let out =
            std::process::Command::new(BIN).args(["safe-state", "--config"]).arg(&real).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("/dev/gpiochip0 line 0 (deskcam-shutter)"), "{err}");
    }
}

#[test]
fn show_fault_blinks_the_led_with_the_shutter_closed_until_stopped() {
    let trace_file = std::env::temp_dir().join(format!("deskcam-showfault-{}.trace", std::process::id()));
    let _ = std::fs::remove_file(&trace_file);
    let mut child = std::process::Command::new(BIN)
        .args(["show-fault", "--board", "sim"])
        .env("DESKCAM_SIM_TRACE", &trace_file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(child.try_wait().unwrap().is_none(), "show-fault must keep running until stopped");
    let during = trace(&trace_file);
    let led_on = during.iter().filter(|(p, l)| p == "led" && l == "high").count();
    assert!(led_on >= 3, "no fault blink: {during:?}");
    assert!(during.iter().all(|(p, l)| p != "shutter" || l == "low"), "shutter moved: {during:?}");

    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = trace(&trace_file);
    let last_led = after.iter().rev().find(|(p, _)| p == "led").map(|(_, l)| l.as_str());
    assert_eq!(last_led, Some("low"), "LED left on: {after:?}");

    let out =
        std::process::Command::new(BIN).args(["show-fault", "--board", "no-such-board"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no board config 'no-such-board.toml'"));
}
