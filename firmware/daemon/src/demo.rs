//! `deskcam demo`: the main job end to end for a newcomer. Photos (or a webcam) go
//! through the real detector, rules and redaction; simulated GPIO prints the shutter
//! and LED; events go to a broker (embedded unless `--broker` is given), and a
//! subscriber, standing in for the fleet owner, saves the stills it receives.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use deskcam_core::config::BrokerUrl;
use deskcam_core::schema::{Topics, ViolationEvent};
use deskcam_core::Config;
use deskcam_uplink::UplinkStats;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use crate::pipeline::{Report, Summary};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Photos to analyse [default: the webcam at /dev/video0 if there is one, else the
    /// demo photos of scripts/fetch-demo-photos, else ../shared/data/frames].
    #[arg(long)]
    photos: Option<PathBuf>,
    /// A V4L2 camera to analyse instead of photos (runs until Ctrl-C).
    #[arg(long, conflicts_with = "photos")]
    camera: Option<PathBuf>,
    /// Use this broker instead of the embedded one, e.g. mqtt://127.0.0.1:1883.
    #[arg(long)]
    broker: Option<String>,
    /// Where the subscriber saves the stills and events it receives.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Start from this config file instead of the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Frames analysed per second.
    #[arg(long, default_value_t = 4.0)]
    fps: f64,
    /// Stop after this many frames (a camera otherwise runs until Ctrl-C).
    #[arg(long)]
    frames: Option<u64>,
}

/// What the stand-in fleet owner received.
#[derive(Default)]
struct Received {
    status: Vec<String>,
    events: u64,
    audit: u64,
    stills: u64,
    still_bytes: u64,
    other: Vec<String>,
}

fn default_photos() -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("DESKCAM_DEMO_PHOTOS") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cache/deskcam/demo-photos"));
    }
    dirs.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/frames")));
    dirs.into_iter().find(|d| d.is_dir())
}

fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut t = table;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let mut table: toml::Table = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            text.parse().with_context(|| format!("{} is not valid TOML", p.display()))?
        }
        None => {
            let mut t = toml::Table::new();
            set(&mut t, "device_id", "demo-desk".into());
            t
        }
    };

    let (source, what) = match (&args.photos, &args.camera) {
        (Some(p), _) => (format!("dir:{}", p.display()), format!("photos in {}", p.display())),
        (None, Some(c)) => (format!("v4l2:{}", c.display()), format!("camera {}", c.display())),
        (None, None) if Path::new("/dev/video0").exists() => ("v4l2:/dev/video0".into(), "webcam /dev/video0".into()),
        (None, None) => match default_photos() {
            Some(p) => (format!("dir:{}", p.display()), format!("photos in {}", p.display())),
            None => bail!("no photos to analyse: run scripts/fetch-demo-photos, or pass --photos DIR or --camera /dev/videoN"),
        },
    };
    set(&mut table, "camera.source", source.into());
    set(&mut table, "scan.mode", "continuous".into());
    // The demo runs whenever it is started: a shift of every day, all day.
    let all_days: Vec<toml::Value> =
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"].iter().map(|d| (*d).into()).collect();
    set(&mut table, "shift.days", toml::Value::Array(all_days));
    set(&mut table, "shift.start", "00:00".into());
    set(&mut table, "shift.end", "24:00".into());
    set(&mut table, "scan.fps", args.fps.into());
    // Each photo is a different scene: let every rule fire on its first positive
    // frame and repeat at once, and count absence from the first empty frame.
    for rule in ["phone", "paper", "extra_person", "absent", "covered"] {
        set(&mut table, &format!("rules.{rule}.frames"), 1.into());
        set(&mut table, &format!("rules.{rule}.cooldown"), "0s".into());
    }
    set(&mut table, "rules.absent.grace", "0s".into());

    let broker_url = match &args.broker {
        Some(u) => u.clone(),
        #[cfg(feature = "embedded-broker")]
        None => {
            let port = crate::broker::start_embedded()?;
            format!("mqtt://127.0.0.1:{port}")
        }
        #[cfg(not(feature = "embedded-broker"))]
        None => anyhow::bail!("this build has no embedded broker: give --broker mqtt://host:port"),
    };
    set(&mut table, "mqtt.url", broker_url.clone().into());
    // The demo's pins are simulated, and its model is the ONNX one in the source tree.
    set(&mut table, "board", "sim".into());
    // The device's own files (the audit log) go beside the stills, not to /data.
    let data_dir = args.out.join("device-data");
    set(&mut table, "storage.data_dir", data_dir.display().to_string().into());
    let config = Config::from_table(table).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    let (_, board) = crate::board::load(&config.board).map_err(anyhow::Error::msg)?;

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    println!("deskcam demo: {what}");
    println!("  broker {broker_url}{}", if args.broker.is_none() { " (embedded)" } else { "" });
    println!("  stills saved by a subscriber to {}/", args.out.display());
    println!("  redaction: {}", config.evidence.redaction.name());
    println!();

    let topics = Topics::new(&config.mqtt.base_topic, config.device_id.as_str());
    let url = BrokerUrl::parse(&broker_url).map_err(anyhow::Error::msg)?;
    let received = Arc::new(Mutex::new(Received::default()));
    subscribe(&url, &topics, &args.out, received.clone())?;

    let mut stats = Arc::new(UplinkStats::default());
    let summary = crate::run_pipeline(config, board, None, Report::Print, Some(&mut stats), args.frames)?;

    // Give the subscriber a moment to receive what the broker acknowledged.
    let want = summary.events.values().sum::<u64>();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until && received.lock().map(|r| r.events < want).unwrap_or(false) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = received.lock().map_err(|_| anyhow::anyhow!("subscriber thread panicked"))?;
    print_summary(&summary, &stats, &r, &args.out);
    Ok(ExitCode::SUCCESS)
}

fn subscribe(url: &BrokerUrl, topics: &Topics, out: &Path, received: Arc<Mutex<Received>>) -> Result<()> {
    let mut opts =
        MqttOptions::new(format!("deskcam-demo-viewer-{}", std::process::id()), &url.host, url.port);
    opts.set_max_packet_size(deskcam_uplink::MAX_PACKET_BYTES, deskcam_uplink::MAX_PACKET_BYTES);
    let (client, mut connection) = Client::new(opts, 16);
    client.subscribe(format!("{}/#", topics.root()), QoS::AtLeastOnce).context("subscribing")?;
    let out = out.to_path_buf();
    let root = format!("{}/", topics.root());
    std::thread::Builder::new()
        .name("demo-viewer".into())
        .spawn(move || {
            for ev in connection.iter() {
                let Ok(Event::Incoming(Packet::Publish(p))) = ev else {
                    if ev.is_err() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    continue;
                };
                let sub = p.topic.strip_prefix(&root).unwrap_or(&p.topic).to_string();
                let Ok(mut r) = received.lock() else { return };
                if sub == "status" {
                    r.status.push(String::from_utf8_lossy(&p.payload).into_owned());
                } else if sub == "event/violation" {
                    r.events += 1;
                    if let Ok(e) = serde_json::from_slice::<ViolationEvent>(&p.payload) {
                        let _ =
                            std::fs::write(out.join(format!("{}-{}.json", e.id, e.rule.name())), &p.payload);
                    }
                } else if let Some(id) =
                    sub.strip_prefix("event/violation/").and_then(|s| s.strip_suffix("/still"))
                {
                    r.stills += 1;
                    r.still_bytes += p.payload.len() as u64;
                    let _ = std::fs::write(out.join(format!("{id}.jpg")), &p.payload);
                } else if sub == "audit" {
                    r.audit += 1;
                } else if !matches!(sub.as_str(), "state" | "config" | "telemetry" | "reply")
                    && !sub.starts_with("cmd/")
                {
                    // Anything else is outside DESIGN.md's topic table: the demo says so.
                    r.other.push(sub);
                }
            }
        })
        .context("starting the demo subscriber")?;
    Ok(())
}

fn print_summary(s: &Summary, stats: &UplinkStats, r: &Received, out: &Path) {
    use std::sync::atomic::Ordering::Relaxed;
    println!();
    println!("== summary ==");
    println!(
        "frames analysed       {:>6}   (unreadable photos skipped: {}, camera faults: {})",
        s.frames, s.skipped, s.faults
    );
    println!("inference p50 / p95   {:>6.0} / {:.0} ms", s.percentile_ms(0.5), s.percentile_ms(0.95));
    println!();
    println!("{:<14} {:>16} {:>8}", "rule", "positive frames", "events");
    for rule in deskcam_core::RuleKind::ALL {
        let n = rule.name();
        println!("{:<14} {:>16} {:>8}", n, s.positives.get(n).unwrap_or(&0), s.events.get(n).unwrap_or(&0));
    }
    println!();
    let events: u64 = s.events.values().sum();
    println!(
        "published   {events} events, {} stills ({} kB); {} delivered (acknowledged by the broker); \
         control messages acknowledged {} of {}",
        s.stills,
        s.still_bytes / 1024,
        stats.evidence_delivered.load(Relaxed),
        stats.acked.load(Relaxed),
        stats.published.load(Relaxed)
    );
    println!(
        "received    {} events, {} stills, {} audit entries by a subscriber -> {}/   status seen: {}",
        r.events,
        r.stills,
        r.audit,
        out.display(),
        r.status.join(" -> ")
    );
    if !r.other.is_empty() {
        println!("UNEXPECTED topics: {}", r.other.join(", "));
    }
}
