//! Helpers of deskcam's system tests: a real mosquitto on a free loopback port, a
//! subscriber that records everything, temp dirs, the repository's photos, and the
//! daemon's test configs. Test-only: never a dependency of the firmware.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// A child process killed (and reaped) on drop, so a failing test leaves nothing behind.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deskcam-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The repository root (this crate lives in firmware/testkit).
pub fn repo() -> PathBuf {
    // Cargo sets the running test's package directory (two levels below the root);
    // the compile-time one can name another checkout whose build was reused.
    let package = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(package).join("../..")
}

pub fn shared_frames() -> Option<PathBuf> {
    let d = repo().join("../shared/data/frames");
    d.join("labels.json").is_file().then_some(d)
}

pub fn demo_photos() -> PathBuf {
    let d = std::env::var_os("DESKCAM_DEMO_PHOTOS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/deskcam/demo-photos")
    });
    assert!(
        d.join("astronaut.png").is_file(),
        "{}: no demo photos; run scripts/fetch-demo-photos",
        d.display()
    );
    d
}

/// A mosquitto broker on 127.0.0.1, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    conf: PathBuf,
    pub dir: PathBuf,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    /// Anonymous, in memory only.
    pub fn start_on(port: u16) -> Mosquitto {
        Self::start_with(
            port,
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
    }

    /// Anonymous, with its sessions and queued messages saved in `dir` when it stops
    /// (SIGTERM), so a restarted broker still has a subscriber's session.
    pub fn start_persistent(port: u16, dir: &Path) -> Mosquitto {
        Self::start_with(
            port,
            &format!(
                // As root mosquitto drops to its own user, which cannot write a test's
                // directory; `user` is ignored when not started as root.
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\npersistence_location {}/\n",
                dir.display()
            ),
        )
    }

    /// With the given configuration (its listeners must include 127.0.0.1:`port`).
    pub fn start_with(port: u16, conf_body: &str) -> Mosquitto {
        let dir = tempdir(&format!("mosquitto-{port}"));
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, format!("{conf_body}message_size_limit 0\nlog_dest stderr\n")).unwrap();
        let child = Self::spawn(&conf, port);
        Mosquitto { port, child, conf, dir }
    }

    fn spawn(conf: &Path, port: u16) -> Child {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is not installed: run scripts/setup");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) to the broker.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
        assert!(ok.map(|s| s.success()).unwrap_or(false), "kill -{sig} mosquitto");
    }

    /// Stops the broker (SIGTERM: it saves what it persists) and waits for it.
    pub fn stop(&mut self) {
        self.signal("TERM");
        let _ = self.child.wait();
    }

    /// Starts the stopped broker again with the same configuration and port.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.conf, self.port);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as a subscriber saw it.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Subscribes to `filter` and records every message in a background thread.
pub struct Recorder {
    pub msgs: Arc<Mutex<Vec<Msg>>>,
}

impl Recorder {
    pub fn start(port: u16, filter: &str) -> Recorder {
        Self::start_opts(
            MqttOptions::new(format!("test-recorder-{}", free_port()), "127.0.0.1", port),
            filter,
        )
    }

    /// A subscriber whose session the broker keeps while it is away (clean session
    /// off, fixed client id): nothing published meanwhile is missed.
    pub fn start_session(port: u16, filter: &str, client_id: &str) -> Recorder {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_clean_session(false);
        Self::start_opts(opts, filter)
    }

    /// With the given connection options (TLS, login, session).
    pub fn start_opts(mut opts: MqttOptions, filter: &str) -> Recorder {
        opts.set_max_packet_size(16 << 20, 1 << 16);
        let (client, mut conn) = Client::new(opts, 64);
        client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let m = msgs.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _client = client;
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        m.lock().unwrap().push(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("subscription acknowledged");
        Recorder { msgs }
    }

    pub fn snapshot(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Waits until some message satisfies `pred`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Option<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.snapshot().into_iter().find(|m| pred(m)) {
                return Some(m);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A shift of every day, all day: tests run whenever CI runs.
pub const ALL_WEEK: &str =
    "[shift]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nstart = \"00:00\"\nend = \"24:00\"\n";

/// Writes a daemon config for tests: the given source (looped or not), broker port and
/// extra tables; the device's data (audit log) goes to `<dir>/data`.
pub fn write_config(dir: &Path, device: &str, source: &str, looped: bool, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("deskcam.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    let data = dir.join("data").display().to_string();
    // The simulated board: tests drive no physical pins.
    write!(
        f,
        "device_id = \"{device}\"\nboard = \"sim\"\n{extra}\n[camera]\nsource = \"{source}\"\nloop = {looped}\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n[storage]\ndata_dir = \"{data}\"\n{ALL_WEEK}"
    )
    .unwrap();
    path
}

/// Reads a child's stderr on a thread into a shared string.
pub fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().expect("stderr piped");
    let o = out.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            o.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

pub fn wait_text(text: &Arc<Mutex<String>>, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if text.lock().unwrap().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A test PKI made with rcgen: a CA, a server certificate for 127.0.0.1 and client
/// certificates whose common name is the MQTT identity (mosquitto's
/// `use_identity_as_username`). Files are PEM in `dir`.
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Pki { dir: dir.to_path_buf(), ca, ca_key }
    }

    pub fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// A certificate signed by this CA: for `127.0.0.1` when `server`, else a client
    /// certificate with `cn` as its common name. Returns (cert, key) paths.
    pub fn issue(&self, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if server {
            params.subject_alt_names.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        } else {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (self.dir.join(format!("{cn}.pem")), self.dir.join(format!("{cn}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// Starts `deskcam run --config <config>` (the binary at `bin`) with info logs, its
/// stderr captured for the test to read.
pub fn run_daemon(bin: &str, config: &Path) -> (ChildGuard, Arc<Mutex<String>>) {
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("DESKCAM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = capture_stderr(&mut child);
    (ChildGuard(child), log)
}

/// A running daemon analysing basketball1.png (two people) in a loop, its broker, a
/// recorder of everything it publishes, and a client to send commands with.
pub struct Device {
    pub broker: Mosquitto,
    pub rec: Recorder,
    pub daemon: ChildGuard,
    pub client: Client,
    pub dir: PathBuf,
    pub id: String,
}

impl Device {
    /// `bin run` on a copy of basketball1.png with `extra` config and `env` set.
    pub fn start(bin: &str, name: &str, extra: &str, env: &[(&str, &str)]) -> Device {
        let broker = Mosquitto::start();
        let dir = tempdir(name);
        // The "camera": a directory of its own, so a test can unplug it.
        let photos = dir.join("camera");
        std::fs::create_dir_all(&photos).unwrap();
        std::fs::copy(demo_photos().join("basketball1.png"), photos.join("basketball1.png")).unwrap();
        let id = format!("itest-{name}");
        let config = write_config(&dir, &id, &format!("dir:{}", photos.display()), true, broker.port, extra);
        let rec = Recorder::start(broker.port, &format!("deskcam/{id}/#"));
        let daemon = ChildGuard(
            Command::new(bin)
                .envs(env.iter().copied())
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
        Device { broker, rec, daemon, client, dir, id }
    }

    pub fn send(&self, name: &str, payload: &str) {
        let topic = format!("deskcam/{}/cmd/{name}", self.id);
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).unwrap();
    }
}
