//! The worker's page in a real browser: Debian's headless Chromium, driven over the
//! DevTools protocol (through a pipe, no port), against `deskcam run` in network
//! namespaces made by the test:
//!
//! ```text
//!   pc  [usbpc 10.199.77.2/29] ==== [usb0 10.199.77.1/29]  box  [eth0 192.168.77.1/24] ==== [lan0 192.168.77.2/24]  lan
//!       Chromium, another site          deskcam run, mosquitto                                   Chromium (the employer's side)
//! ```
//!
//! `usb0` stands in for the NCM link (a veth pair); `eth0` for the box's own network.
//! The browser runs with scripts disabled throughout (the page needs none). Checked: the
//! page shows the device's state and what was sent; the break button starts a break with
//! a reason (state `break: true` on MQTT, the reason not published) and the end button
//! ends it; a form on another site posting to the page is refused and changes nothing;
//! from the other network the page does not answer, neither on the box's address there
//! nor on the link's address routed through the box. Screenshots of every step are kept
//! (the path is printed). Run by `scripts/page-browser-test` (root: network namespaces).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskcam_testkit::*;
use serde_json::{json, Value};

const DEVICE: &str = "page-desk-1";
const REASON: &str = "doctor's appointment";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Three namespaces and the two links between them, removed on drop.
struct Net {
    pc: String,
    boxed: String,
    lan: String,
}

impl Net {
    fn new() -> Net {
        let id = std::process::id();
        let net = Net { pc: format!("dcpc{id}"), boxed: format!("dcbox{id}"), lan: format!("dclan{id}") };
        for ns in [&net.pc, &net.boxed, &net.lan] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (pc, bx, lan) = (net.pc.as_str(), net.boxed.as_str(), net.lan.as_str());
        ip(&["-n", bx, "link", "add", "usb0", "type", "veth", "peer", "name", "usbpc", "netns", pc]);
        ip(&["-n", bx, "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", lan]);
        for (ns, dev, addr) in [
            (bx, "usb0", "10.199.77.1/29"),
            (pc, "usbpc", "10.199.77.2/29"),
            (bx, "eth0", "192.168.77.1/24"),
            (lan, "lan0", "192.168.77.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        // The employer's side tries the link's address too, through the box.
        ip(&["-n", lan, "route", "add", "10.199.77.0/29", "via", "192.168.77.1"]);
        // The image's sysctl settings (image/rootfs/etc/sysctl.d/60-deskcam.conf).
        for (key, value) in [
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv4.conf.all.rp_filter", "1"),
            ("net.ipv4.conf.default.rp_filter", "1"),
        ] {
            ip(&["netns", "exec", bx, "sysctl", "-q", "-w", &format!("{key}={value}")]);
        }
        net
    }

    fn exec(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.pc, &self.boxed, &self.lan] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Headless Chromium with the DevTools protocol on fds 3 (to it) and 4 (from it).
struct Browser {
    child: ChildGuard,
    to: std::io::PipeWriter,
    from: Receiver<Value>,
    events: VecDeque<Value>,
    next: u64,
    session: String,
    shots: PathBuf,
}

impl Browser {
    fn start(mut cmd: Command, profile: &Path, shots: &Path) -> Browser {
        let (to_read, to_write) = std::io::pipe().unwrap();
        let (from_read, from_write) = std::io::pipe().unwrap();
        let (a, b) = (to_read.as_raw_fd(), from_write.as_raw_fd());
        // Its own process group: the renderers and the zygote go with it at the end.
        cmd.process_group(0);
        cmd.args([
            "chromium",
            "--headless",
            "--no-sandbox", // root, in a namespace of the test's own
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec. The pipe ends are
        // first moved above 4 so that placing them on 3 and 4 cannot overwrite each other.
        unsafe {
            cmd.pre_exec(move || {
                let a2 = libc::fcntl(a, libc::F_DUPFD, 10);
                let b2 = libc::fcntl(b, libc::F_DUPFD, 10);
                if a2 < 0 || b2 < 0 || libc::dup2(a2, 3) < 0 || libc::dup2(b2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = ChildGuard(cmd.spawn().expect("chromium (scripts/setup installs it)"));
        drop((to_read, from_write));
        let (tx, from) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from_read);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            to: to_write,
            from,
            events: VecDeque::new(),
            next: 1,
            session: String::new(),
            shots: shots.to_path_buf(),
        };
        b.new_tab();
        b
    }

    /// A new tab, scripts off, that the calls go to from now on. (A tab that showed the
    /// browser's own error page may answer no more page commands.)
    fn new_tab(&mut self) {
        let target = self.browser_call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = self
            .browser_call("Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true}));
        self.session = attached["sessionId"].as_str().unwrap().to_string();
        self.call("Page.enable", json!({}));
        self.call("Network.enable", json!({}));
        self.call("Emulation.setScriptExecutionDisabled", json!({"value": true}));
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Result<Value, Value> {
        let id = self.next;
        self.next += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.recv(deadline).unwrap_or_else(|| panic!("{method}: no answer from the browser"));
            if v["id"] == json!(id) {
                return match v.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
            if v.get("method").is_some() {
                self.events.push_back(v);
            }
        }
    }

    fn recv(&mut self, deadline: Instant) -> Option<Value> {
        match self.from.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(v) => Some(v),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the browser exited"),
        }
    }

    fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None).unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// A page command; right after a navigation that changed renderer process the page
    /// may answer "Not attached to an active page" for a moment: asked again, up to 3 s.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let mut tries = 0;
        loop {
            match self.try_call(method, params.clone()) {
                Ok(v) => return v,
                Err(e) if tries < 15 && e.to_string().contains("Not attached") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{method}: {e}"),
            }
        }
    }

    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let s = self.session.clone();
        self.send(method, params, Some(s))
    }

    /// Waits for the document loaded by the current navigation and returns its HTTP
    /// status.
    fn document_status(&mut self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut status = None;
        loop {
            let v = match self.events.pop_front() {
                Some(v) => v,
                None => self.recv(deadline).expect("no page load within 30 s"),
            };
            match v["method"].as_str() {
                Some("Network.responseReceived") if v["params"]["type"] == "Document" => {
                    status = v["params"]["response"]["status"].as_u64();
                }
                // A load event before this navigation's document response belongs to an
                // earlier page (the blank one a new target starts with can report late
                // when the machine is busy): wait on for this one's.
                Some("Page.loadEventFired") => {
                    if let Some(status) = status {
                        return status;
                    }
                }
                _ => {}
            }
        }
    }

    fn drain(&mut self) {
        while let Ok(v) = self.from.try_recv() {
            self.events.push_back(v);
        }
        self.events.clear();
    }

    /// Opens `url`: the HTTP status, or the browser's error text.
    fn open(&mut self, url: &str) -> Result<u64, String> {
        self.drain();
        let nav = self.call("Page.navigate", json!({"url": url}));
        if let Some(e) = nav.get("errorText") {
            return Err(e.as_str().unwrap_or("").to_string());
        }
        Ok(self.document_status())
    }

    fn html(&mut self) -> String {
        let root = self.call("DOM.getDocument", json!({"depth": 0}));
        let out = self.call("DOM.getOuterHTML", json!({"nodeId": root["root"]["nodeId"]}));
        out["outerHTML"].as_str().unwrap().to_string()
    }

    fn node(&mut self, selector: &str) -> Value {
        let root = self.call("DOM.getDocument", json!({"depth": 0}));
        let n =
            self.call("DOM.querySelector", json!({"nodeId": root["root"]["nodeId"], "selector": selector}));
        assert_ne!(n["nodeId"], json!(0), "no {selector} on the page:\n{}", self.html());
        n["nodeId"].clone()
    }

    fn type_into(&mut self, selector: &str, text: &str) {
        let node = self.node(selector);
        self.call("DOM.focus", json!({"nodeId": node}));
        self.call("Input.insertText", json!({"text": text}));
    }

    /// A real mouse click on the middle of `selector`; returns the status of the page
    /// the click led to.
    fn click(&mut self, selector: &str) -> u64 {
        let node = self.node(selector);
        self.call("DOM.scrollIntoViewIfNeeded", json!({"nodeId": node}));
        let model = self.call("DOM.getBoxModel", json!({"nodeId": node}));
        let q: Vec<f64> =
            model["model"]["content"].as_array().unwrap().iter().filter_map(Value::as_f64).collect();
        let (x, y) = ((q[0] + q[4]) / 2.0, (q[1] + q[5]) / 2.0);
        self.drain();
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
        self.document_status()
    }

    fn screenshot(&mut self, name: &str) {
        let shot =
            self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true}));
        let png = base64_decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    fn close(mut self) {
        let _ = self.send("Browser.close", json!({}), None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    /// The whole process group (`ip netns exec` execs Chromium, so the child's pid is the
    /// group's), also when a check failed half-way.
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) of the process group this test started.
        unsafe { libc::kill(-(self.child.0.id() as i32), libc::SIGKILL) };
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).expect("a screenshot in base64")
}

/// A line-by-line record of a child's stdout.
fn record(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let l = lines.clone();
    std::thread::spawn(move || {
        // Stills are binary: lossy text, not `lines()` (which stops at invalid UTF-8).
        let mut r = BufReader::new(out);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            l.lock().unwrap().push(String::from_utf8_lossy(&buf).trim_end().to_string());
            buf.clear();
        }
    });
    lines
}

fn wait_line(
    lines: &Arc<Mutex<Vec<String>>>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(l) = lines.lock().unwrap().iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The text of the element with `id` in `html` (the page's values have ids).
fn field(html: &str, id: &str) -> String {
    let Some(start) = html.find(&format!("id=\"{id}\">")) else { return String::new() };
    let rest = &html[start + id.len() + 6..];
    rest[..rest.find('<').unwrap_or(rest.len())].to_string()
}

#[test]
#[ignore = "needs root and chromium; run by scripts/page-browser-test"]
fn the_workers_page_in_a_browser() {
    let dir = tempdir("page-browser");
    let shots = std::env::var_os("DESKCAM_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("artefacts"))
        .join("page-browser");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let net = Net::new();

    // The box: its broker on its own loopback, a subscriber recording everything, and
    // the daemon analysing a photo of two people (an event with a still to show).
    std::fs::write(dir.join("mosquitto.conf"), "listener 1883 127.0.0.1\nallow_anonymous true\n").unwrap();
    let _broker = ChildGuard(
        net.exec(&net.boxed)
            .arg("mosquitto")
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut sub = net.exec(&net.boxed);
    sub.args(["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", "1883", "-v", "-t", "#"])
        .stdout(Stdio::piped());
    let mut sub = ChildGuard(sub.spawn().unwrap());
    let mqtt = record(&mut sub.0);
    let photos = dir.join("camera");
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::copy(demo_photos().join("basketball1.png"), photos.join("basketball1.png")).unwrap();
    let config = write_config(
        &dir,
        DEVICE,
        &format!("dir:{}", photos.display()),
        true,
        1883,
        "[scan]\nmode = \"continuous\"\nfps = 1.0\n[rules.extra_person]\nframes = 1\ncooldown = \"1h\"\n[usb]\npage = \"always\"\n",
    );
    let mut daemon = net.exec(&net.boxed);
    daemon
        .args([env!("CARGO_BIN_EXE_deskcam"), "run", "--config"])
        .arg(&config)
        .env("DESKCAM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut daemon = ChildGuard(daemon.spawn().unwrap());
    let log = capture_stderr(&mut daemon.0);
    assert!(
        wait_text(&log, "worker's page on http://10.199.77.1:80/", Duration::from_secs(30)),
        "the page did not start:\n{}",
        log.lock().unwrap()
    );
    let event = format!("deskcam/{DEVICE}/event/violation ");
    assert!(
        wait_line(&mqtt, Duration::from_secs(60), |l| l.starts_with(&event)).is_some(),
        "no violation event:\n{}",
        log.lock().unwrap()
    );

    // Another site the worker might open on the PC, with a form aimed at the page.
    let site = dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(
        site.join("index.html"),
        "<!doctype html><title>another site</title><form method=post action=\"http://10.199.77.1/break\">\
         <input name=reason value=\"forged\"><button id=forge type=submit>Win a prize</button></form>",
    )
    .unwrap();
    let _site = ChildGuard(
        net.exec(&net.pc)
            .args(["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000", "--directory"])
            .arg(&site)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let mut pc = Browser::start(net.exec(&net.pc), &dir.join("profile-pc"), &shots);
    assert_eq!(pc.open("http://10.199.77.1/"), Ok(200));
    let html = pc.html();
    pc.screenshot("1-page");
    assert!(html.contains("Your desk camera"), "{html}");
    assert_eq!(field(&html, "mode"), "continuous", "{html}");
    assert_eq!(field(&html, "break"), "not on a break");
    assert_eq!(field(&html, "call"), "not in use");
    assert!(["open", "closed"].contains(&field(&html, "shutter").as_str()), "{html}");
    assert!(html.contains("extra_person"), "the event sent is listed: {html}");
    assert!(html.contains("id=\"audit\""), "the checks are listed: {html}");

    // A form on another origin posting to the page: refused, nothing changes.
    assert_eq!(pc.open("http://127.0.0.1:8000/"), Ok(200));
    assert_eq!(pc.click("#forge"), 403, "a cross-origin POST must be refused");
    let refused = pc.html();
    pc.screenshot("2-cross-origin-post-refused");
    assert!(refused.contains("refused: not sent from this page"), "{refused}");
    assert_eq!(pc.open("http://10.199.77.1/"), Ok(200));
    assert_eq!(field(&pc.html(), "break"), "not on a break");

    // The break button, with a reason typed in.
    pc.type_into("#reason", REASON);
    pc.screenshot("3-reason-typed");
    assert_eq!(pc.click("#start-break"), 200);
    let html = pc.html();
    pc.screenshot("4-break-started");
    assert!(html.contains("Your break has started"), "{html}");
    assert_eq!(field(&html, "break"), "on a break");
    let state = format!("deskcam/{DEVICE}/state ");
    assert!(
        wait_line(&mqtt, Duration::from_secs(10), |l| l.starts_with(&state) && l.contains("\"break\":true"))
            .is_some(),
        "the break is not in the state on MQTT:\n{}",
        mqtt.lock().unwrap().join("\n")
    );
    assert_eq!(pc.click("#end-break"), 200);
    let html = pc.html();
    pc.screenshot("5-break-ended");
    assert!(html.contains("Your break has ended"), "{html}");
    assert_eq!(field(&html, "break"), "not on a break");
    pc.close();

    // The employer's side: nothing on the box's own address, and the link's address
    // routed through the box is refused.
    let mut lan = Browser::start(net.exec(&net.lan), &dir.join("profile-lan"), &shots);
    let own = lan.open("http://192.168.77.1/");
    assert_eq!(own, Err("net::ERR_CONNECTION_REFUSED".to_string()), "the page on the box's own network");
    lan.new_tab();
    let routed = lan.open("http://10.199.77.1/");
    lan.screenshot("6-from-the-other-network");
    assert_eq!(routed, Ok(403), "the page through the box from the other network");
    let html = lan.html();
    assert!(html.contains("refused: this page is served only over the USB cable"), "{html}");
    assert!(!html.contains("Your desk camera"), "{html}");
    lan.close();
    assert!(log.lock().unwrap().contains("refused 192.168.77.2"), "{}", log.lock().unwrap());

    // The break reason typed on the page stays on the device; the forged one never
    // reached it.
    let published = mqtt.lock().unwrap().join("\n");
    assert!(!published.contains("appointment") && !published.contains("forged"), "{published}");
    let audit = std::fs::read_to_string(dir.join("data/audit.jsonl")).expect("the device's audit log");
    assert!(!audit.contains("forged"), "{audit}");
    drop(daemon);
    println!(
        "page-browser: page, cross-origin POST refused, break started and ended, other network refused; screenshots in {}",
        shots.display()
    );
}
