//! Bad input and bad luck, each with a clear error or a recovery: invalid config, a
//! missing camera, a corrupt photo, a broker that is down at start, a killed daemon.

use std::process::Stdio;
use std::time::Duration;

use deskcam_testkit::*;

fn deskcam() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deskcam"));
    c.env("DESKCAM_LOG", "info");
    c
}

fn one_photo_dir(name: &str) -> std::path::PathBuf {
    let dir = tempdir(name);
    std::fs::copy(demo_photos().join("basketball1.png"), dir.join("basketball1.png")).unwrap();
    dir
}

#[test]
fn invalid_config_is_refused_with_every_key_named() {
    let dir = tempdir("badconfig");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "device_id = \"no spaces allowed\"\nfoo = 1\n[scan]\nmode = \"sometimes\"\n[evidence]\nmax_age = \"60d\"\n")
        .unwrap();

    let check = deskcam().args(["config", "check"]).arg(&path).output().unwrap();
    assert_eq!(check.status.code(), Some(2));
    let err = String::from_utf8_lossy(&check.stderr);
    for key in ["device_id", "foo: unknown key", "scan.mode", "evidence.max_age"] {
        assert!(err.contains(key), "config check does not mention {key}: {err}");
    }

    let run = deskcam().arg("run").arg("--config").arg(&path).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("refusing to start") && err.contains("scan.mode"), "{err}");

    let missing = deskcam().args(["run", "--config", "/nonexistent/deskcam.toml"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/deskcam.toml"));
}

#[test]
fn default_config_round_trips_through_check() {
    let dir = tempdir("defaultconfig");
    let out = deskcam().args(["config", "default"]).output().unwrap();
    assert!(out.status.success());
    let path = dir.join("default.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let check = deskcam().args(["config", "check"]).arg(&path).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn missing_camera_is_reported_and_retried_while_the_device_stays_online() {
    let broker = Mosquitto::start();
    let dir = tempdir("nocamera");
    let device = "itest-nocamera";
    let config = write_config(
        &dir,
        device,
        "v4l2:/dev/video-missing-42",
        false,
        broker.port,
        "[scan]\nmode = \"continuous\"\n",
    );
    let rec = Recorder::start(broker.port, &format!("deskcam/{device}/#"));

    // A real camera with only simulated GPIO is refused unless explicitly allowed.
    let refused = deskcam().arg("run").arg("--config").arg(&config).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("simulated GPIO"));

    let mut child = deskcam()
        .env("DESKCAM_ALLOW_SIMULATED_GPIO", "1")
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = capture_stderr(&mut child);
    let mut d = ChildGuard(child);
    assert!(
        wait_text(&err, "camera /dev/video-missing-42: no such device", Duration::from_secs(20)),
        "no clear error: {}",
        err.lock().unwrap()
    );
    assert!(rec
        .wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/status") && m.payload == b"online")
        .is_some());
    // It keeps running (camera-lost, retrying) rather than exiting.
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.0.try_wait().unwrap().is_none(), "daemon exited on a missing camera");
    // Reported as a camera-lost state and one audit entry.
    assert!(rec
        .wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/state")
            && String::from_utf8_lossy(&m.payload).contains("\"camera\":\"lost\""))
        .is_some());
    assert!(rec
        .wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/audit")
            && String::from_utf8_lossy(&m.payload).contains("camera_lost"))
        .is_some());
    // Nothing was published about violations (no frame was read), and the shutter
    // never opened: the camera is checked before the shutter moves.
    let msgs = rec.snapshot();
    assert!(msgs.iter().all(|m| !m.topic.contains("/event/")));
    assert!(msgs.iter().all(|m| !String::from_utf8_lossy(&m.payload).contains("\"shutter\":\"open\"")));
}

#[test]
fn corrupt_photo_is_skipped_with_its_name_and_the_rest_analysed() {
    let broker = Mosquitto::start();
    let dir = one_photo_dir("corrupt");
    std::fs::write(dir.join("aaa-broken.jpg"), b"\xff\xd8\xff\xe0 truncated jpeg").unwrap();
    let device = "itest-corrupt";
    let rules = "[scan]\nmode = \"continuous\"\nfps = 30.0\n[rules.extra_person]\nframes = 1\n";
    let config = write_config(&dir, device, &format!("dir:{}", dir.display()), false, broker.port, rules);
    let rec = Recorder::start(broker.port, &format!("deskcam/{device}/#"));
    let out = deskcam().arg("run").arg("--config").arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("aaa-broken.jpg") && err.contains("cannot decode"), "{err}");
    assert!(
        rec.wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/event/violation")
            && String::from_utf8_lossy(&m.payload).contains("basketball1.png"))
            .is_some(),
        "the good photo after the broken one was analysed"
    );
}

#[test]
fn broker_down_at_start_is_retried_until_it_comes_up() {
    let port = free_port();
    let dir = one_photo_dir("brokerdown");
    let device = "itest-brokerdown";
    let extra =
        "[scan]\nmode = \"continuous\"\nfps = 2.0\n[rules.extra_person]\nframes = 1\ncooldown = \"0s\"\n";
    let config = write_config(&dir, device, &format!("dir:{}", dir.display()), true, port, extra);
    let mut child = deskcam().arg("run").arg("--config").arg(&config).stderr(Stdio::piped()).spawn().unwrap();
    let err = capture_stderr(&mut child);
    let _d = ChildGuard(child);
    assert!(wait_text(&err, "broker unreachable", Duration::from_secs(20)), "{}", err.lock().unwrap());
    assert!(err.lock().unwrap().contains(&format!("127.0.0.1:{port}")), "the message names the broker");

    let broker = Mosquitto::start_on(port);
    let rec = Recorder::start(broker.port, &format!("deskcam/{device}/#"));
    assert!(
        rec.wait_for(Duration::from_secs(40), |m| m.topic.ends_with("/status") && m.payload == b"online")
            .is_some(),
        "never connected: {}",
        err.lock().unwrap()
    );
    assert!(rec.wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/event/violation")).is_some());
}

/// A daemon analysing one photo in a loop (continuous mode), with a broker and a
/// recorder of the device's top-level topics.
fn looping_daemon(name: &str) -> (Mosquitto, Recorder, ChildGuard) {
    let broker = Mosquitto::start();
    let dir = one_photo_dir(name);
    let device = format!("itest-{name}");
    let source = format!("dir:{}", dir.display());
    let config = write_config(&dir, &device, &source, true, broker.port, "[scan]\nmode = \"continuous\"\n");
    let rec = Recorder::start(broker.port, &format!("deskcam/{device}/+"));
    let child = deskcam().arg("run").arg("--config").arg(&config).stderr(Stdio::null()).spawn().unwrap();
    (broker, rec, ChildGuard(child))
}

#[test]
fn status_goes_offline_when_the_daemon_is_killed() {
    let (_broker, rec, mut d) = looping_daemon("killed");
    let status = |payload: &'static [u8]| move |m: &Msg| m.topic.ends_with("/status") && m.payload == payload;
    assert!(rec.wait_for(Duration::from_secs(20), status(b"online")).is_some());
    // SIGKILL: no goodbye from the daemon; the broker publishes the last will.
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    assert!(rec.wait_for(Duration::from_secs(10), status(b"offline")).is_some(), "no last will after a kill");
}

#[test]
fn sigterm_stops_cleanly_with_the_shutter_closed_and_status_offline() {
    let (_broker, rec, mut d) = looping_daemon("sigterm");
    // Continuous mode: the shutter is open while it analyses.
    assert!(rec
        .wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/state")
            && String::from_utf8_lossy(&m.payload).contains("\"shutter\":\"open\""))
        .is_some());
    let pid = d.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = d.0.wait().unwrap();
    assert!(status.success(), "a SIGTERM is a normal stop: {status:?}");
    // The broker may still be forwarding the goodbye to the recorder.
    rec.wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/status") && m.payload == b"offline");
    let msgs = rec.snapshot();
    let last_state = msgs.iter().rev().find(|m| m.topic.ends_with("/state")).unwrap();
    assert!(String::from_utf8_lossy(&last_state.payload).contains("\"shutter\":\"closed\""));
    assert_eq!(msgs.iter().rev().find(|m| m.topic.ends_with("/status")).unwrap().payload, b"offline");
}

#[test]
fn an_unknown_board_or_a_board_with_a_pin_conflict_is_refused() {
    let dir = tempdir("badboard");
    let config = dir.join("deskcam.toml");
    std::fs::write(&config, "board = \"rpi9\"\n").unwrap();
    let out = deskcam().args(["config", "check"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no board config 'rpi9.toml'"), "{err}");

    // A board file whose LED takes the shutter's line: refused, with both keys named.
    let boards = dir.join("boards");
    std::fs::create_dir_all(&boards).unwrap();
    let good = std::fs::read_to_string(repo().join("board-configs/rpi0-2w-64.toml")).unwrap();
    std::fs::write(boards.join("rpi0-2w-64.toml"), good.replace("lines = [27]", "lines = [17]")).unwrap();
    std::fs::write(&config, "board = \"rpi0-2w-64\"\n").unwrap();
    let out = deskcam()
        .args(["config", "check"])
        .arg(&config)
        .env("DESKCAM_BOARD_CONFIGS", &boards)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("led.lines[0]: line 17 is already used by shutter.line"), "{err}");
}

/// The simulated pins' trace: (pin, high) in order.
fn trace(path: &std::path::Path) -> Vec<(String, bool)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].to_string(), f[2] == "high")
        })
        .collect()
}

/// The privacy invariants at the pin level: safe levels first, the LED lit whenever the
/// shutter opens and for as long as it is open, and both low at the end with the
/// shutter closed first.
fn assert_safe_trace(t: &[(String, bool)]) {
    assert!(t.len() >= 4, "{t:?}");
    assert_eq!(
        &t[..2],
        &[("led".into(), false), ("shutter".into(), false)],
        "safe state before anything else"
    );
    let (mut led, mut shutter) = (false, false);
    for (pin, high) in t {
        match pin.as_str() {
            "led" => {
                assert!(*high || !shutter, "LED off while the shutter is open: {t:?}");
                led = *high;
            }
            _ => {
                assert!(!*high || led, "shutter opened with the LED off: {t:?}");
                shutter = *high;
            }
        }
    }
    assert!(!led && !shutter, "left unsafe: {t:?}");
    // After the last opening, the shutter closes before the LED goes off. (The drivers
    // may drive the safe levels again on the way out; repeats change nothing.)
    let opened = t.iter().rposition(|(p, h)| p == "shutter" && *h).unwrap();
    let closed = opened + t[opened..].iter().position(|(p, h)| p == "shutter" && !*h).unwrap();
    let led_off = opened + t[opened..].iter().position(|(p, h)| p == "led" && !*h).unwrap();
    assert!(closed < led_off, "the shutter closes before the LED goes off: {t:?}");
}

fn traced_daemon(name: &str, env: &[(&str, &str)]) -> (ChildGuard, std::path::PathBuf, Mosquitto) {
    let broker = Mosquitto::start();
    let dir = one_photo_dir(name);
    let config = write_config(
        &dir,
        &format!("itest-{name}"),
        &format!("dir:{}", dir.display()),
        true,
        broker.port,
        "[scan]\nmode = \"continuous\"\nfps = 5.0\n",
    );
    let trace_file = dir.join("pins.trace");
    let mut cmd = deskcam();
    cmd.args(["run", "--config"]).arg(&config).env("DESKCAM_SIM_TRACE", &trace_file).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    (ChildGuard(cmd.spawn().unwrap()), trace_file, broker)
}

fn wait_for_open(trace_file: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !trace(trace_file).iter().any(|(p, h)| p == "shutter" && *h) {
        assert!(std::time::Instant::now() < deadline, "the shutter never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_and_panic_leave_the_pins_safe() {
    let (mut d, trace_file, _b) = traced_daemon("trace-term", &[]);
    wait_for_open(&trace_file);
    std::thread::sleep(Duration::from_millis(500));
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &d.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert!(d.0.wait().unwrap().success());
    assert_safe_trace(&trace(&trace_file));

    let (mut d, trace_file, _b) = traced_daemon("trace-panic", &[("DESKCAM_FAULT", "panic:3")]);
    let log = capture_stderr(&mut d.0);
    assert!(!d.0.wait().unwrap().success());
    assert!(
        wait_text(&log, "panic: shutter closed, LED off", Duration::from_secs(5)),
        "{}",
        log.lock().unwrap()
    );
    assert_safe_trace(&trace(&trace_file));
}

#[test]
fn a_stalled_scan_loop_stops_the_watchdog_closes_the_shutter_and_exits() {
    let dir = tempdir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (mut d, trace_file, _b) = traced_daemon(
        "stall",
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
            ("DESKCAM_FAULT", "stall:5"),
        ],
    );
    let mut msgs = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let mut buf = [0u8; 512];
        if let Ok(n) = socket.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if let Some(s) = d.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no exit after the stall: {msgs:?}");
    };
    assert_eq!(status.code(), Some(70), "{msgs:?}");
    assert!(msgs[0].starts_with("READY=1"), "{msgs:?}");
    assert!(msgs.iter().any(|m| m == "WATCHDOG=1"), "keep-alives while it runs: {msgs:?}");
    assert_eq!(msgs.last().map(String::as_str), Some("STATUS=stalled"), "{msgs:?}");
    assert_safe_trace(&trace(&trace_file));
}
