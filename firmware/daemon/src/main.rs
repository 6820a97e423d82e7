//! `deskcam`: the device daemon and its tools.
//!
//! `run` is what the service starts; `demo` runs the whole pipeline on photos with
//! simulated GPIO and an embedded broker; `config` prints or checks configuration;
//! `safe-state` closes the shutter and turns the LED off (the service's stop hook).

mod audit;
mod bench;
mod board;
#[cfg(feature = "embedded-broker")]
mod broker;
mod config_file;
mod demo;
mod eval;
mod hardware;
mod model;
mod notify;
mod page;
mod pipeline;
mod provision;
mod sent;
mod telemetry;
mod usb;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use deskcam_core::board::{Board, GpioBackend};
use deskcam_core::schema::{ModelInfo, State, Topics};
use deskcam_core::Config;
use deskcam_uplink::{DropOldest, UplinkConfig, UplinkStats};
use deskcam_vision::Detector;
use tracing::Level;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

use crate::hardware::Hardware;
use crate::pipeline::{Pipeline, Report, Summary};

const DEFAULT_CONFIG_PATH: &str = "/data/deskcam.toml";

/// The system allocator, counted (`deskcam bench` reports allocations per frame).
#[global_allocator]
static ALLOCATOR: deskcam_core::alloc_count::Counting = deskcam_core::alloc_count::Counting;
/// Audit entries waiting for the broker (they are on disk already).
const AUDIT_QUEUE: usize = 256;
/// Replies waiting for the broker, and commands waiting for the scan loop.
const REPLY_QUEUE: usize = 64;
const COMMAND_INBOX: usize = 32;
/// Lets `run` read a real camera with simulated shutter and LED pins (development only:
/// on a device this would look without a physical shutter or LED).
const ALLOW_SIM_GPIO_ENV: &str = "DESKCAM_ALLOW_SIMULATED_GPIO";

#[derive(Parser)]
#[command(name = "deskcam", version, about = "deskcam: a privacy-first clean-desk camera")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the device: camera, detector, rules, evidence, MQTT.
    Run {
        /// Config file [env DESKCAM_CONFIG, default /data/deskcam.toml].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The whole pipeline on photos (or a webcam), simulated GPIO, an embedded broker.
    Demo(demo::DemoArgs),
    /// The detector's accuracy on labelled photos: per-class precision, recall and AP
    /// at IoU 0.5, mAP, and the image-level rules.
    Eval(eval::EvalArgs),
    /// Inference time per frame (median, p95) for models at thread counts, the whole
    /// scan path, and peak memory.
    Bench(bench::BenchArgs),
    /// Print the default config or check a config file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Model files.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Close the shutter and turn the LED off on the configured board, then exit
    /// (service stop hook). Exit 3: the board's GPIO is simulated, nothing moved.
    SafeState {
        /// Config file [env DESKCAM_CONFIG, default /data/deskcam.toml].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// First boot: check deskcam.toml (and the certificates it names) on the boot
    /// partition and move them to the data partition. Exit 2: nothing changed, the
    /// problems are in the journal and in deskcam-error.txt beside the file.
    Provision(provision::ProvisionArgs),
    /// Close the shutter and show the LED's fault pattern until stopped (a device that
    /// cannot start, e.g. a card with a bad config); then the LED goes off.
    ShowFault {
        /// The board (a file in board-configs/) [env DESKCAM_BOARD].
        #[arg(long, env = "DESKCAM_BOARD")]
        board: String,
    },
    /// The USB device side (root: configfs): `up` makes the composite gadget (webcam +
    /// network link) from the config and board, `down` removes it. A board without a
    /// USB device controller is told so, with exit 0.
    #[command(subcommand)]
    Usb(UsbCmd),
    /// Print the audit log kept on this device (one line per scan, JSON).
    Audit {
        /// Config file [env DESKCAM_CONFIG, default /data/deskcam.toml].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UsbCmd {
    Up {
        /// Config file [env DESKCAM_CONFIG, default /data/deskcam.toml].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    Down,
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Write an ONNX model as tract's NNEF archive (`*.nnef.tar`), the form boards with
    /// `model.form = "nnef"` load.
    ExportNnef { onnx: PathBuf, out: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the embedded default configuration.
    Default,
    /// Check a config file; every error is reported with its key.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `DESKCAM_LOG`: a level, then `target=level` pairs ("info,rumqttc=debug"). A target
    // filter rather than tracing's EnvFilter: the same syntax for what we use, without
    // a regex engine in the board binary.
    let default_filter = || {
        Targets::new()
            .with_default(Level::INFO)
            .with_targets([("rumqttd", LevelFilter::OFF), ("rumqttc", LevelFilter::WARN)])
    };
    let filter = match std::env::var("DESKCAM_LOG") {
        Ok(text) => text.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("deskcam: DESKCAM_LOG={text:?} is not a log filter ({e}); using the default");
            default_filter()
        }),
        Err(_) => default_filter(),
    };
    tracing_subscriber::registry()
        // Colours on a terminal only: under systemd the journal keeps plain text.
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
    let result = match cli.command {
        Command::Config(ConfigCmd::Default) => {
            print!("{}", deskcam_core::config::DEFAULT_TOML);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCmd::Check { file }) => config_check(&file),
        Command::Model(ModelCmd::ExportNnef { onnx, out }) => export_nnef(&onnx, &out),
        Command::SafeState { config } => safe_state(config),
        Command::Audit { config } => print_audit(config),
        Command::Provision(args) => provision::run(args),
        Command::ShowFault { board } => show_fault(&board),
        Command::Usb(UsbCmd::Up { config }) => usb::up(config),
        Command::Usb(UsbCmd::Down) => usb::down(),
        Command::Run { config } => run_daemon(config),
        Command::Demo(args) => demo::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deskcam: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads and validates a config file and the board config it names. Invalid configs
/// are reported in full.
pub fn load_config(path: &Path) -> Result<Result<(Config, Board), String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let config = match Config::from_toml(&text) {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("{}: {e}", path.display()))),
    };
    Ok(board::load(&config.board)
        .map(|(board_path, board)| {
            tracing::info!(
                "board {} ({}), GPIO {:?}, from {}",
                board.name,
                board.description,
                board.backend,
                board_path.display()
            );
            (config, board)
        })
        .map_err(|e| format!("{}: {e}\n", path.display())))
}

fn config_check(file: &Path) -> Result<ExitCode> {
    match load_config(file)? {
        Ok(_) => {
            println!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprint!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

#[cfg(feature = "onnx")]
fn export_nnef(onnx: &Path, out: &Path) -> Result<ExitCode> {
    if !deskcam_vision::detector::is_nnef(out) {
        eprintln!("deskcam model export-nnef: the output must be named *.nnef.tar");
        return Ok(ExitCode::from(2));
    }
    deskcam_vision::detector::export_nnef(onnx, out)?;
    let sha = deskcam_vision::sha256_hex(&std::fs::read(out)?);
    println!("{sha}  {}", out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "onnx"))]
fn export_nnef(_onnx: &Path, _out: &Path) -> Result<ExitCode> {
    eprintln!("deskcam model export-nnef: this build has no ONNX front end (cargo feature `onnx`)");
    Ok(ExitCode::from(2))
}

fn safe_state(config: Option<PathBuf>) -> Result<ExitCode> {
    let board = match load_config(&config_path(config))? {
        Ok((_, board)) => board,
        Err(e) => {
            eprint!("deskcam safe-state: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    // Requesting the lines drives them to their safe levels; then the drivers do it
    // again, the end-stop included.
    let mut hw = Hardware::open(&board, board.backend == GpioBackend::Sim, false).context("opening GPIO")?;
    let checked = hw.safe_state();
    if hw.simulated() {
        // Say plainly that no physical pin moved: a stop hook must not report a safety
        // action it did not take.
        eprintln!(
            "deskcam safe-state: board '{}' has simulated GPIO; no physical shutter or LED was driven",
            board.name
        );
        return Ok(ExitCode::from(3));
    }
    checked.context("driving the safe state")?;
    eprintln!("deskcam safe-state: shutter closed, LED off ({})", board.name);
    Ok(ExitCode::SUCCESS)
}

fn show_fault(name: &str) -> Result<ExitCode> {
    let board = match board::load(name) {
        Ok((_, b)) => b,
        Err(e) => {
            eprintln!("deskcam show-fault: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut hw = Hardware::open(&board, board.backend == GpioBackend::Sim, false).context("opening GPIO")?;
    // A shutter that will not confirm closing is one more fault: show the pattern anyway.
    if let Err(e) = hw.close_shutter() {
        eprintln!("deskcam show-fault: {e}");
    }
    hw.set_led(deskcam_core::policy::LedPattern::Fault).context("lighting the LED")?;
    eprintln!("deskcam show-fault: the LED shows the fault pattern on {} until stopped", board.name);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        std::io::Result::Ok(())
    })?;
    hw.safe_state().context("driving the safe state")?;
    Ok(ExitCode::SUCCESS)
}

fn config_path(config: Option<PathBuf>) -> PathBuf {
    config
        .or_else(|| std::env::var_os("DESKCAM_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

fn print_audit(config: Option<PathBuf>) -> Result<ExitCode> {
    let config = match load_config(&config_path(config))? {
        Ok((c, _)) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let log = audit::AuditLog::open(&config.data_dir, config.audit_max_bytes)
        .with_context(|| format!("opening the audit log in {}", config.data_dir.display()))?;
    for e in log.entries().with_context(|| format!("reading {}", log.path().display()))? {
        println!("{}", serde_json::to_string(&e)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_daemon(config: Option<PathBuf>) -> Result<ExitCode> {
    let path = config_path(config);
    let (config, board) = match load_config(&path)? {
        Ok(c) => c,
        Err(e) => {
            eprint!("deskcam: refusing to start: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if matches!(config.camera.source, deskcam_core::config::SourceSpec::V4l2(_))
        && board.backend == GpioBackend::Sim
        && std::env::var_os(ALLOW_SIM_GPIO_ENV).is_none()
    {
        eprintln!(
            "deskcam: refusing to start: board '{}' has simulated GPIO, so a real camera \
             would look without a physical shutter or LED. Use the board's own config, a photo directory \
             (camera.source = \"dir:...\"), `deskcam demo`, or set {ALLOW_SIM_GPIO_ENV}=1 on a development machine.",
            board.name
        );
        return Ok(ExitCode::from(2));
    }
    let summary = run_pipeline(config, board, Some(path), Report::Log, None, None)?;
    tracing::info!(frames = summary.frames, events = summary.events.values().sum::<u64>(), "stopped");
    Ok(ExitCode::SUCCESS)
}

/// Exit status after a stalled scan loop (sysexits' EX_SOFTWARE).
const EXIT_STALLED: i32 = 70;

enum Progress {
    /// The scan loop moved; `ping` if it moved since the last keep-alive.
    Moving {
        ping: bool,
    },
    Stalled(Duration),
}

/// Watches the scan loop's progress counter: keep-alives only follow real progress.
struct ProgressGuard {
    last: u64,
    moved_at: std::time::Instant,
    pinged_at: std::time::Instant,
    moved_since_ping: bool,
}

impl ProgressGuard {
    fn new(now: u64) -> Self {
        let t = std::time::Instant::now();
        ProgressGuard { last: now, moved_at: t, pinged_at: t, moved_since_ping: true }
    }

    fn check(&mut self, counter: u64, limit: Duration) -> Progress {
        if counter != self.last {
            self.last = counter;
            self.moved_at = std::time::Instant::now();
            self.moved_since_ping = true;
        }
        let idle = self.moved_at.elapsed();
        if idle > limit {
            Progress::Stalled(idle)
        } else {
            Progress::Moving { ping: self.moved_since_ping }
        }
    }

    /// Whether a keep-alive is due; records it as sent.
    fn due(&mut self, every: Duration) -> bool {
        if self.pinged_at.elapsed() >= every {
            self.pinged_at = std::time::Instant::now();
            self.moved_since_ping = false;
            true
        } else {
            false
        }
    }
}

/// On a panic anywhere, the shutter closes and the LED goes off before anything else
/// (the drivers also do it when they are dropped, but a panic may not unwind to them).
fn install_panic_hook(emergency: hardware::Emergency) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        emergency();
        eprintln!("deskcam: panic: shutter closed, LED off");
        default(info);
    }));
}

/// Everything `run` and `demo` share: load the model, start the uplink, run the scan
/// loop until it finishes or a signal arrives, then stop in order (scan loop and
/// hardware safe state first, then the uplink drains and says `offline`).
pub fn run_pipeline(
    config: Config,
    board: Board,
    config_path: Option<PathBuf>,
    report: Report,
    stats_out: Option<&mut Arc<UplinkStats>>,
    max_frames: Option<u64>,
) -> Result<Summary> {
    // The board's cores for the network (tract's executor is process-wide).
    let threads = deskcam_vision::detector::set_inference_threads(board.model_threads as usize);
    let model_path = model::locate(config.detector.model.as_ref(), board.model_form, board.model_precision)
        .map_err(anyhow::Error::msg)?;
    let t = std::time::Instant::now();
    let detector = Detector::load(&model_path, config.detector.min_score, config.detector.nms_iou)
        .context("loading the detector")?;
    // Loading and optimising freed as much as the model weighs (the weights before
    // packing); glibc keeps freed pages in the middle of its heaps until asked. Once,
    // here: the per-frame path is not trimmed (its pages would fault in again each frame).
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only hands free pages back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    tracing::info!(
        "model {} loaded and optimised in {} ms, {} inference thread(s)",
        model_path.display(),
        t.elapsed().as_millis(),
        threads
    );
    // The input size is the model file's; the board names the one its image ships.
    if detector.input_size() != board.model_input_size as usize {
        tracing::warn!(
            "the model's input is {0}x{0}, the board {1} expects {2}x{2} (a model other than the image's?)",
            detector.input_size(),
            board.name,
            board.model_input_size
        );
    }
    // The demo always simulates the board's lines; `run` uses the board's backend.
    let simulate = report == Report::Print || board.backend == GpioBackend::Sim;
    let hardware = Hardware::open(&board, simulate, report == Report::Print).context("opening GPIO")?;
    tracing::info!(
        "GPIO: {}",
        if hardware.simulated() { "simulated".to_string() } else { format!("{:?}", board.backend) }
    );
    let emergency = hardware.emergency();
    install_panic_hook(emergency.clone());
    let notifier = notify::Notifier::from_env();

    let initial_state = State {
        v: deskcam_core::schema::SCHEMA_VERSION,
        device_id: config.device_id.to_string(),
        mode: config.scan.name().into(),
        shutter: "closed".into(),
        on_break: false,
        camera: "ok".into(),
        firmware: env!("CARGO_PKG_VERSION").into(),
        model: ModelInfo {
            name: model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            sha256: detector.sha256().to_string(),
        },
    };
    let audit_out = Arc::new(DropOldest::new(AUDIT_QUEUE));
    let replies = Arc::new(DropOldest::new(REPLY_QUEUE));
    let (commands_tx, commands) = std::sync::mpsc::sync_channel(COMMAND_INBOX);
    let audit = crate::audit::AuditLog::open(&config.data_dir, config.audit_max_bytes)
        .with_context(|| format!("opening the audit log in {}", config.data_dir.display()))?;
    let store_dir = config.data_dir.join("evidence");
    let store = deskcam_uplink::store::EvidenceStore::open(
        &store_dir,
        config.evidence.max_age.as_millis(),
        config.evidence.max_bytes,
    )
    .with_context(|| format!("opening the evidence store in {}", store_dir.display()))?;
    let undelivered = store.undelivered();
    if undelivered > 0 {
        tracing::info!("{undelivered} pieces of evidence from an earlier run wait for the broker");
    }
    let store = Arc::new(std::sync::Mutex::new(store));
    let evidence_ready = Arc::new(tokio::sync::Notify::new());
    let (state_tx, state_rx) = tokio::sync::watch::channel(initial_state);
    let (config_tx, config_rx) = tokio::sync::watch::channel(config.effective_json());
    let (telemetry_tx, telemetry_rx) = tokio::sync::watch::channel(None);
    let live = Arc::new(telemetry::LiveStats::default());
    let telemetry_every = Duration::from_secs(u64::from(config.mqtt.telemetry_s));
    let data_dir = config.data_dir.clone();
    let stats = Arc::new(UplinkStats::default());
    if let Some(out) = stats_out {
        *out = stats.clone();
    }
    let uplink_cfg = UplinkConfig {
        broker: config.mqtt.url.clone(),
        client_id: format!("deskcam-{}", config.device_id),
        topics: Topics::new(&config.mqtt.base_topic, config.device_id.as_str()),
        keep_alive: Duration::from_millis(config.mqtt.keep_alive.as_millis()),
        credentials: config.mqtt.credentials.clone(),
        discovery: match &config.homeassistant {
            Some(prefix) => deskcam_core::homeassistant::discovery(
                prefix,
                &Topics::new(&config.mqtt.base_topic, config.device_id.as_str()),
                config.device_id.as_str(),
                &config.board,
                env!("CARGO_PKG_VERSION"),
            )
            .into_iter()
            .map(|(t, v)| (t, v.to_string().into_bytes()))
            .collect(),
            None => Vec::new(),
        },
        tls: config
            .mqtt
            .ca_file
            .clone()
            .map(|ca| deskcam_uplink::tls::TlsFiles { ca, client: config.mqtt.client_cert.clone() }),
    };

    // Fail at start on unreadable TLS files, not with a connection that never comes up.
    if let Some(files) = &uplink_cfg.tls {
        deskcam_uplink::tls::client_config(files).context("mqtt TLS settings")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shutdown_rx_page = shutdown_rx.clone();
    let page_commands = commands_tx.clone();
    let link = deskcam_uplink::Link {
        store: store.clone(),
        evidence_ready: evidence_ready.clone(),
        audit: audit_out.clone(),
        replies: replies.clone(),
        commands: commands_tx,
        state: state_rx,
        config: config_rx,
        telemetry: telemetry_rx,
    };
    if !telemetry_every.is_zero() {
        let sources = telemetry::Sources {
            start: std::time::Instant::now(),
            live: live.clone(),
            store: store.clone(),
            audit: audit_out.clone(),
            replies: replies.clone(),
            uplink: stats.clone(),
            button_drops: hardware.press_drops(),
            data_dir,
        };
        runtime.spawn(telemetry::run(sources, telemetry_every, telemetry_tx, shutdown_rx.clone()));
    }
    let uplink = runtime.spawn(deskcam_uplink::run(uplink_cfg, link, stats.clone(), shutdown_rx));

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (usb, usb_thread) = match usb::start(&config, &board, stop.clone()) {
        Some((link, thread)) => (Some(link), Some(thread)),
        None => (None, None),
    };
    let sent = Arc::new(
        sent::SentLog::open(&config.data_dir, config.evidence.max_age.as_millis())
            .with_context(|| format!("opening the sent-events log in {}", config.data_dir.display()))?,
    );
    // The worker's page, on the USB link's address only: where this daemon runs the
    // gadget, or everywhere when the config says another program makes the link.
    let page_stats = match (&usb, config.usb.page) {
        (Some(link), _) => Some(link.stats.clone()),
        (None, deskcam_core::config::PageServing::Always) if config.usb.enabled => Some(Arc::default()),
        _ => None,
    };
    if let Some(usb_stats) = page_stats {
        let device = Arc::new(page::PageDevice {
            device_id: config.device_id.to_string(),
            retention_ms: config.evidence.max_age.as_millis(),
            state: state_tx.subscribe(),
            config: config_tx.subscribe(),
            store: store.clone(),
            audit_path: audit.path().to_path_buf(),
            sent: sent.clone(),
            commands: page_commands,
            usb: usb_stats,
            next_id: std::sync::atomic::AtomicU64::new(1),
        });
        let mut until = shutdown_rx_page;
        runtime.spawn(async move {
            let stop = async move {
                let _ = until.wait_for(|s| *s).await;
            };
            if let Err(e) = deskcam_page::serve(page::address(), page::LINK_NET, device, stop).await {
                tracing::error!("{e}");
            }
        });
    }
    let pipeline = Pipeline {
        usb,
        sent,
        progress: progress.clone(),
        config,
        detector,
        hardware,
        audit,
        store: store.clone(),
        evidence_ready,
        commands,
        replies,
        audit_out,
        state: state_tx,
        config_out: config_tx,
        live: live.clone(),
        config_path,
        report,
        stop: stop.clone(),
        max_frames,
    };
    let scan = std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || pipeline.run())
        .context("starting the scan thread")?;

    notifier.send("READY=1\nSTATUS=scanning");
    // The stall guard: with a systemd watchdog, its interval; otherwise a minute (a
    // frame read is bounded by camera.timeout, an inference by a few seconds).
    let stall_limit = notifier.watchdog_limit.unwrap_or(Duration::from_secs(60));
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut guard = ProgressGuard::new(progress.load(Ordering::Relaxed));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; stopping"); break; }
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
                    tracing::info!("terminated; stopping");
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if scan.is_finished() { break; }
                    match guard.check(progress.load(Ordering::Relaxed), stall_limit) {
                        Progress::Moving { ping } => {
                            if ping && notifier.watchdog_every.is_some_and(|every| guard.due(every)) {
                                notifier.send("WATCHDOG=1");
                            }
                        }
                        Progress::Stalled(for_) => {
                            // The scan loop is stuck (a hung read or inference): close the
                            // shutter from here and exit, so the service restarts.
                            emergency();
                            tracing::error!("scan loop stalled for {for_:?}: shutter closed, LED off; exiting for a restart");
                            notifier.send("STATUS=stalled");
                            std::process::exit(EXIT_STALLED);
                        }
                    }
                }
            }
        }
    });
    notifier.send("STOPPING=1");
    stop.store(true, Ordering::Relaxed);
    let summary = scan.join();
    if let Some(t) = usb_thread {
        // It ends its stream (camera released) and closes the node within a poll tick.
        let _ = t.join();
    }
    // Whatever happened to the scan loop, the uplink drains and says goodbye.
    let _ = shutdown_tx.send(true);
    match runtime.block_on(uplink) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e).context("MQTT uplink"),
        Err(e) => anyhow::bail!("MQTT uplink task failed: {e}"),
    }
    let left = deskcam_uplink::lock_store(&store).undelivered();
    if left > 0 {
        tracing::info!(
            "{left} pieces of evidence wait on disk for the broker; they are sent after the restart"
        );
    }
    summary.map_err(|_| anyhow::anyhow!("the scan thread panicked (shutter and LED were reset)"))
}
