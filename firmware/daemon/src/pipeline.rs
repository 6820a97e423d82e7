//! The scan loop: the policy decides, this loop executes its actions on the hardware
//! and the camera, runs the detector and the rules on each frame, renders evidence and
//! queues it for the uplink. It runs on its own thread because capture and inference
//! block; the uplink runs on the async runtime and is joined by a bounded queue.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deskcam_core::command::Command;
use deskcam_core::config::ScanMode;
use deskcam_core::policy::{Action, Input, Policy, PolicyConfig, PolicyEvent};
use deskcam_core::rules::{Finding, FrameFacts, RuleEngine, RuleKind};
use deskcam_core::schema::{
    AuditEntry, EventBox, FrameSize, Reply, ScanResult, State, StillInfo, ViolationEvent, SCHEMA_VERSION,
};
use deskcam_core::{Config, Detection};
use deskcam_hw::{HwError, Press, ShutterOpen};
use deskcam_uplink::{lock_store, DropOldest, SharedStore, MAX_PACKET_BYTES};
use deskcam_vision::source::open_source;
use deskcam_vision::{render_still, CaptureError, Detector, Frame, FrameSource};

use crate::hardware::Hardware;

/// A finding's event and still, ready to be stored and sent.
struct Prepared {
    time: u64,
    event: ViolationEvent,
    still: Option<Vec<u8>>,
}

/// The scan under way: frames analysed, rules fired, evidence waiting for the audit entry.
#[derive(Default)]
struct Scan {
    frames: u32,
    rules: Vec<RuleKind>,
    evidence: Vec<Prepared>,
}

impl Scan {
    fn add(&mut self, more: Scan) {
        self.frames += more.frames;
        for r in more.rules {
            if !self.rules.contains(&r) {
                self.rules.push(r);
            }
        }
        self.evidence.extend(more.evidence);
    }
}

/// An input for the policy; a command's carries its reply context (id, command name).
type Pending = (Input, Option<(Option<String>, String)>);

/// How the loop reports frames: one printed line each (demo) or log records (daemon).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Print,
    Log,
}

/// What happened during a run, for the demo's summary and the logs.
#[derive(Default, Debug)]
pub struct Summary {
    pub frames: u64,
    pub skipped: u64,
    pub faults: u64,
    pub positives: BTreeMap<&'static str, u64>,
    pub events: BTreeMap<&'static str, u64>,
    pub stills: u64,
    pub still_bytes: u64,
    pub inference_ms: Vec<f32>,
}

impl Summary {
    pub fn percentile_ms(&self, p: f32) -> f32 {
        crate::telemetry::percentile(&self.inference_ms, p).unwrap_or(0.0)
    }
}

pub struct Pipeline {
    pub config: Config,
    pub detector: Detector,
    pub hardware: Hardware,
    pub audit: crate::audit::AuditLog,
    /// Evidence kept until the server acknowledges it, never longer than `max_age`; the
    /// uplink sends from it.
    pub store: SharedStore,
    /// Tells the uplink that new evidence is stored.
    pub evidence_ready: Arc<tokio::sync::Notify>,
    pub commands: std::sync::mpsc::Receiver<deskcam_uplink::IncomingCommand>,
    pub replies: Arc<DropOldest<Reply>>,
    pub audit_out: Arc<DropOldest<AuditEntry>>,
    pub state: tokio::sync::watch::Sender<State>,
    /// The effective config (secrets removed), for the retained `config` topic.
    pub config_out: tokio::sync::watch::Sender<serde_json::Value>,
    /// Where `config/set` saves the config; `None` (the demo) applies it unsaved.
    pub config_path: Option<std::path::PathBuf>,
    /// Frames and inference times, for telemetry.
    pub live: Arc<crate::telemetry::LiveStats>,
    pub report: Report,
    pub stop: Arc<AtomicBool>,
    /// Stop after this many analysed frames (demo on a camera, tests).
    pub max_frames: Option<u64>,
    /// Counts the scan loop's turns: the watchdog is fed only while it moves.
    pub progress: Arc<std::sync::atomic::AtomicU64>,
    /// The webcam side, on boards that are a USB device: whether the PC streams, and
    /// the gate that lets the stream read the camera.
    pub usb: Option<crate::usb::UsbLink>,
    /// What was sent about the worker, for the worker's page (kept for the retention
    /// period, after the store has deleted the evidence).
    pub sent: Arc<crate::sent::SentLog>,
}

/// How long a long press of the button shows the identify pattern.
const LONG_PRESS_IDENTIFY_MS: u64 = 5_000;

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Pipeline {
    /// Runs until the policy finishes (a photo directory ran out) or `stop` is set.
    /// The hardware is in its safe state when this returns, whatever happened.
    pub fn run(mut self) -> Summary {
        // Wall-clock time: the shift is a wall-clock schedule.
        let now = unix_ms;
        let seed = unix_ms() ^ u64::from(std::process::id());
        let mut policy = Policy::new(policy_config(&self.config), seed);
        let mut rules = RuleEngine::new(self.config.rules.clone());
        let mut source: Option<Box<dyn FrameSource>> = None;
        let mut token: Option<ShutterOpen> = None;
        // The shutter held open for the PC's stream (never used to read a frame here).
        let mut call_token: Option<ShutterOpen> = None;
        let mut pc_streaming = false;
        let mut summary = Summary::default();
        let mut seq = 0u64;
        let mut pending: Vec<Pending> = vec![(Input::Tick, None)];
        let mut scan: Option<Scan> = None;
        if let Some(e) = self.hardware.start_fault() {
            tracing::error!("{e}; the camera stays closed");
            pending.push((Input::ShutterFault, None));
        }

        'outer: loop {
            self.progress.fetch_add(1, Ordering::Relaxed);
            #[cfg(debug_assertions)]
            fault_injection(summary.frames);
            // Retention is enforced continuously, not only when something new arrives.
            let expired = lock_store(&self.store).expire(now());
            match expired {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!("evidence past max_age deleted: {}", gone.join(", "))
                }
                Ok(_) => {}
                Err(e) => tracing::error!("evidence store: {e}"),
            }
            let enough = self.max_frames.is_some_and(|n| summary.frames >= n);
            if self.stop.load(Ordering::Relaxed) || enough {
                pending = vec![(Input::Shutdown, None)];
            }
            // The PC starting or stopping its stream is a state, read each turn: nothing
            // to queue, nothing to lose.
            if let Some(usb) = &mut self.usb {
                let now_streaming = usb.watch.streaming(usb.stats.pc_streaming.load(Ordering::Relaxed));
                // The stream's camera failing during a call is a camera fault like any
                // other: the policy stops the stream, closes the shutter, shows the fault
                // and probes the camera until it is back (then the call goes on). Pushed
                // first, so a call starting or ending in the same turn is taken before it.
                let stopping = self.stop.load(Ordering::Relaxed);
                let fault = usb.stats.camera_fault.swap(false, Ordering::Relaxed);
                if fault && (pc_streaming || now_streaming) && !stopping {
                    summary.faults += 1;
                    pending.push((Input::CameraFault, None));
                }
                if now_streaming != pc_streaming && !stopping {
                    pc_streaming = now_streaming;
                    pending.push((if now_streaming { Input::CallStarted } else { Input::CallEnded }, None));
                }
            }
            // Commands are taken while running, not once stopping has begun.
            if !self.stop.load(Ordering::Relaxed) {
                self.take_commands(&mut pending, &mut rules);
            }
            while let Some((input, ctx)) = pending.pop() {
                let shutting_down = input == Input::Shutdown;
                let actions = policy.step(now(), input);
                if let Some((id, name)) = ctx {
                    let refused = actions.iter().find_map(|a| match a {
                        Action::Refused(why) => Some(why.to_string()),
                        _ => None,
                    });
                    self.reply(id, &name, refused.map_or(Ok(None), Err));
                }
                for action in actions {
                    match action {
                        Action::SetLed(p) => {
                            if let Err(e) = self.hardware.set_led(p) {
                                tracing::error!("LED: {e}");
                            }
                        }
                        Action::OpenShutter => {
                            // The camera must be there before the shutter opens: a missing
                            // device is a fault with the shutter still closed.
                            if let Err(e) = self.ensure_source(&mut source, &mut rules, now()) {
                                summary.faults += 1;
                                tracing::error!("{e}");
                                pending.push((Input::CameraFault, None));
                                continue;
                            }
                            match self.hardware.open_shutter() {
                                Ok(t) => {
                                    token = Some(t);
                                    scan = Some(Scan::default());
                                    rules.begin_check();
                                    self.publish_state("open");
                                }
                                Err(e) => {
                                    tracing::error!("shutter: {e}");
                                    pending.push((Input::CameraFault, None));
                                }
                            }
                        }
                        Action::CloseShutter => {
                            token = None;
                            if let Some(done) = scan.take() {
                                self.finish_scan(done);
                            }
                            if let Some(s) = source.as_mut() {
                                s.pause();
                            }
                            self.close_shutter(&mut pending);
                            if !shutting_down {
                                self.publish_state("closed");
                            }
                        }
                        Action::BeginCall => {
                            // The stream opens the camera itself: analysis lets go of it.
                            if let Some(s) = source.as_mut() {
                                s.pause();
                            }
                            source = None;
                            match self.hardware.open_shutter() {
                                Ok(t) => {
                                    call_token = Some(t);
                                    if let Some(usb) = &self.usb {
                                        usb.gate.allow();
                                    }
                                    tracing::info!(
                                        "on a call: the PC streams from the webcam; nothing is analysed"
                                    );
                                }
                                Err(e) => {
                                    tracing::error!("shutter: {e}");
                                    pending.push((Input::CameraFault, None));
                                }
                            }
                        }
                        Action::EndCall => {
                            // The stream stops reading before the shutter closes.
                            if let Some(usb) = &self.usb {
                                let wait = deskcam_usb::stream::RELEASE_WAIT;
                                if !usb.gate.forbid(wait) {
                                    tracing::warn!(
                                        "the webcam stream did not release the camera in {} s; closing the shutter",
                                        wait.as_secs()
                                    );
                                }
                            }
                            call_token = None;
                            self.close_shutter(&mut pending);
                        }
                        Action::Capture => {
                            // (The policy never asks for a frame during a call: invariant 7.)
                            debug_assert!(call_token.is_none(), "a frame analysed during a call");
                            let Some(t) = token.as_ref() else {
                                pending.push((Input::CameraFault, None));
                                continue;
                            };
                            let outcome = match source.as_mut() {
                                Some(s) => s.next_frame(t),
                                None => Err(CaptureError::Exhausted),
                            };
                            let input = match outcome {
                                Ok(frame) => {
                                    seq += 1;
                                    let (fired, prepared) =
                                        self.analyse(&frame, now(), seq, &mut rules, &mut summary);
                                    let looked = Scan { frames: 1, rules: fired, evidence: prepared };
                                    match scan.as_mut() {
                                        // A check (spot, scheduled, scan-now) is one scan.
                                        Some(current)
                                            if !matches!(self.config.scan, ScanMode::Continuous { .. }) =>
                                        {
                                            current.add(looked)
                                        }
                                        // A continuous watch is a scan per frame.
                                        _ => self.finish_scan(looked),
                                    }
                                    Input::FrameCaptured
                                }
                                Err(e) if e.is_skippable() => {
                                    summary.skipped += 1;
                                    self.line(format!("skipped: {e}"), true);
                                    Input::FrameCaptured
                                }
                                Err(CaptureError::Exhausted) => Input::SourceExhausted,
                                Err(e) => {
                                    summary.faults += 1;
                                    tracing::error!("{e}; closing the shutter");
                                    // Reopen from scratch next time: the device may come back
                                    // under the same path.
                                    source = None;
                                    Input::CameraFault
                                }
                            };
                            pending.push((input, None));
                        }
                        Action::ProbeCamera => {
                            let input = match self.ensure_source(&mut source, &mut rules, now()) {
                                Ok(()) => Input::CameraBack,
                                Err(e) => {
                                    summary.faults += 1;
                                    tracing::warn!("{e}; still lost");
                                    Input::CameraFault
                                }
                            };
                            pending.push((input, None));
                        }
                        Action::Event(e) => {
                            match &e {
                                PolicyEvent::CameraLost => {
                                    // Opened afresh next time: it may come back under the same path.
                                    source = None;
                                    self.record(ScanResult::CameraLost, 0, Vec::new());
                                    self.state.send_modify(|s| s.camera = "lost".into());
                                }
                                PolicyEvent::CameraBack { down_ms } => {
                                    tracing::info!("camera back after {} s", down_ms / 1000);
                                    self.record(ScanResult::CameraBack, 0, Vec::new());
                                    self.state.send_modify(|s| s.camera = "ok".into());
                                }
                                PolicyEvent::ShutterFault => {
                                    source = None;
                                    self.record(ScanResult::ShutterFault, 0, Vec::new());
                                    self.state.send_modify(|s| s.shutter = "fault".into());
                                }
                                PolicyEvent::BreakEnded { .. } => {
                                    rules.restart_presence(now());
                                    self.state.send_modify(|s| s.on_break = false);
                                }
                                PolicyEvent::ScanSkipped { .. } => {
                                    self.record(ScanResult::Skipped, 0, Vec::new())
                                }
                                PolicyEvent::ScanDeferred { .. } => {
                                    self.record(ScanResult::Deferred, 0, Vec::new())
                                }
                                // Kept on the device (the journal): a meeting is none of
                                // the fleet owner's business.
                                PolicyEvent::CallStarted | PolicyEvent::CallEnded { .. } => {}
                                PolicyEvent::BreakStarted { .. } => {
                                    self.state.send_modify(|s| s.on_break = true)
                                }
                            }
                            self.line(format!("policy: {e:?}"), true);
                        }
                        // Already answered in the command's reply.
                        Action::Refused(_) => {}
                        Action::Finished => break 'outer,
                    }
                }
            }
            // Sleep until the policy's next deadline, waking often enough to notice stop.
            let wait = policy.next_deadline().map(|d| d.saturating_sub(now())).unwrap_or(100).min(100);
            if wait > 0 {
                std::thread::sleep(Duration::from_millis(wait));
            }
            pending.push((Input::Tick, None));
        }
        if let Err(e) = self.hardware.safe_state() {
            tracing::error!("could not reach the safe state: {e}");
        }
        self.publish_state("closed");
        summary
    }

    /// Drives the shutter closed; an end-stop that does not confirm it is a shutter fault.
    fn close_shutter(&mut self, pending: &mut Vec<Pending>) {
        match self.hardware.close_shutter() {
            Ok(()) => {}
            Err(e @ HwError::NotClosed { .. }) => {
                tracing::error!("{e}; the camera stays closed");
                pending.push((Input::ShutterFault, None));
            }
            Err(e) => tracing::error!("shutter: {e}"),
        }
    }

    /// Opens the camera if it is not open. A (re)opened camera starts a new watch of
    /// the desk: the `absent` grace counts from now, not from before an outage.
    fn ensure_source(
        &self,
        source: &mut Option<Box<dyn FrameSource>>,
        rules: &mut RuleEngine,
        now: u64,
    ) -> Result<(), CaptureError> {
        if source.is_none() {
            let s = open_source(&self.config.camera)?;
            tracing::info!("camera: {}", s.describe());
            *source = Some(s);
            rules.restart_presence(now);
        }
        Ok(())
    }

    /// Records a finished scan on the audit log, then stores and sends its evidence:
    /// nothing leaves the device about a scan that is not on record.
    fn finish_scan(&mut self, scan: Scan) {
        if scan.frames > 0 {
            self.record(ScanResult::from_rules(&scan.rules), scan.frames, scan.rules);
        }
        for p in scan.evidence {
            self.commit(p);
        }
    }

    /// Takes the commands that arrived: policy commands become inputs (replied to when
    /// the policy has answered); the others are done here and answered at once.
    fn take_commands(&mut self, pending: &mut Vec<Pending>, rules: &mut RuleEngine) {
        // The button: a press starts or ends a break; a long press shows "identify".
        for press in self.hardware.presses() {
            self.line(format!("button: {press:?} press"), true);
            pending.push((
                match press {
                    Press::Short => Input::ButtonPress,
                    Press::Long => Input::Identify { duration_ms: LONG_PRESS_IDENTIFY_MS },
                },
                None,
            ));
        }
        let mut taken = Vec::new();
        while let Ok((name, payload)) = self.commands.try_recv() {
            let parsed = deskcam_core::command::parse(&name, &payload);
            let id = parsed.id;
            let command = match parsed.command {
                Ok(c) => c,
                Err(e) => {
                    self.reply(id, &name, Err(e));
                    continue;
                }
            };
            tracing::info!("command {name}");
            let input = match command {
                Command::ScanNow => Input::ScanNow,
                Command::BreakStart { reason } => Input::BreakStart { reason },
                Command::BreakEnd => Input::BreakEnd,
                Command::Identify { seconds } => Input::Identify { duration_ms: u64::from(seconds) * 1000 },
                Command::Mode { mode } => {
                    let patch = serde_json::json!({ "scan": { "mode": mode } });
                    let patch = patch.as_object().cloned().unwrap_or_default();
                    let result = self.apply_config(&patch, rules, &mut taken);
                    self.reply(id, &name, result);
                    continue;
                }
                Command::ConfigSet { patch } => {
                    let result = self.apply_config(&patch, rules, &mut taken);
                    self.reply(id, &name, result);
                    continue;
                }
                other => {
                    let result = self.evidence_command(other);
                    self.reply(id, &name, result);
                    continue;
                }
            };
            taken.push((input, Some((id, name))));
        }
        // `pending` is popped from the end: push in reverse so commands run in order.
        pending.extend(taken.into_iter().rev());
    }

    /// `config/get` and the evidence commands: answered from the config and the store.
    fn evidence_command(&mut self, command: Command) -> Result<Option<serde_json::Value>, String> {
        let mut store = lock_store(&self.store);
        match command {
            Command::ConfigGet => Ok(Some(self.config.effective_json())),
            Command::EvidenceAck { evidence } => match store.ack(&evidence) {
                Ok(true) => Ok(None),
                Ok(false) => Err(format!("no evidence '{evidence}' on the device")),
                Err(e) => Err(format!("evidence store: {e}")),
            },
            Command::EvidenceList => {
                let list: Vec<serde_json::Value> = store
                    .list()
                    .into_iter()
                    .map(|e| {
                        serde_json::json!({
                            "id": e.id,
                            "time": deskcam_core::time::rfc3339_utc(e.created_ms),
                            "bytes": e.bytes,
                            "delivered": e.delivered,
                        })
                    })
                    .collect();
                Ok(Some(serde_json::Value::Array(list)))
            }
            Command::EvidenceGet { evidence } => match store.get(&evidence) {
                Ok(Some(e)) => {
                    let event: serde_json::Value = serde_json::from_slice(&e.event)
                        .map_err(|e| format!("stored event unreadable: {e}"))?;
                    use base64::Engine as _;
                    let still = e.still.map(|jpeg| base64::engine::general_purpose::STANDARD.encode(jpeg));
                    Ok(Some(serde_json::json!({ "event": event, "still_base64": still })))
                }
                Ok(None) => Err(format!("no evidence '{evidence}' on the device")),
                Err(e) => Err(format!("evidence store: {e}")),
            },
            other => Err(format!("{other:?} is not answered here")),
        }
    }

    /// Validates a config patch, saves the new file atomically (the old one stays if
    /// anything fails), and applies what can change while running: the policy's mode,
    /// shift and limits, the rules, redaction and the detector's thresholds.
    fn apply_config(
        &mut self,
        patch: &serde_json::Map<String, serde_json::Value>,
        rules: &mut RuleEngine,
        taken: &mut Vec<Pending>,
    ) -> Result<Option<serde_json::Value>, String> {
        let patched = self.config.patched(patch).map_err(|e| e.to_string().trim_end().replace('\n', "; "))?;
        let saved = match &self.config_path {
            Some(path) if !patched.changed.is_empty() => {
                crate::config_file::save(
                    path,
                    "# Written by deskcam (config/set). Keys not listed have their defaults.\n",
                    &patched.file,
                )
                .map_err(|e| format!("could not save {}: {e}; nothing changed", path.display()))?;
                true
            }
            _ => false,
        };
        let old = std::mem::replace(&mut self.config, patched.live);
        let new = &self.config;
        self.detector.set_thresholds(new.detector.min_score, new.detector.nms_iou);
        if old.rules != new.rules {
            *rules = RuleEngine::new(new.rules.clone());
            rules.restart_presence(unix_ms());
        }
        let policy = policy_config(new);
        if policy != policy_config(&old) {
            taken.push((Input::Reconfigure(policy), None));
        }
        let mode = new.scan.name().to_string();
        self.state.send_if_modified(|s| std::mem::replace(&mut s.mode, mode.clone()) != mode);
        self.config_out.send_replace(new.effective_json());
        if !patched.changed.is_empty() {
            tracing::info!(
                "config changed: {} (waiting for a restart: {})",
                patched.changed.join(", "),
                if patched.restart.is_empty() { "none".into() } else { patched.restart.join(", ") }
            );
        }
        Ok(Some(serde_json::json!({
            "changed": patched.changed,
            "restart_required": patched.restart,
            "saved": saved,
        })))
    }

    /// Replies to a command that carried an id, and to every refused one.
    fn reply(&self, id: Option<String>, command: &str, result: Result<Option<serde_json::Value>, String>) {
        let (data, error) = match result {
            Ok(data) => (data, None),
            Err(e) => {
                tracing::warn!("command {command} refused: {e}");
                (None, Some(e))
            }
        };
        if id.is_some() || error.is_some() {
            self.replies.push(Reply {
                v: SCHEMA_VERSION,
                id,
                command: command.to_string(),
                ok: error.is_none(),
                error,
                data,
            });
        }
    }

    /// Writes one audit entry (synced to disk) and queues it for `audit`.
    fn record(&self, result: ScanResult, frames: u32, rules: Vec<RuleKind>) {
        let entry = AuditEntry {
            v: SCHEMA_VERSION,
            time: deskcam_core::time::rfc3339_utc(unix_ms()),
            mode: self.config.scan.name().into(),
            result,
            frames,
            rules,
        };
        if let Err(e) = self.audit.append(&entry) {
            tracing::error!("audit log {}: {e}", self.audit.path().display());
        }
        self.audit_out.push(entry);
        // The audit entries leave on the evidence connection, ahead of the evidence.
        self.evidence_ready.notify_one();
    }

    /// Analyses one frame; returns the rules that fired and their evidence, prepared.
    fn analyse(
        &mut self,
        frame: &Frame,
        now: u64,
        seq: u64,
        rules: &mut RuleEngine,
        summary: &mut Summary,
    ) -> (Vec<RuleKind>, Vec<Prepared>) {
        summary.frames += 1;
        let t = Instant::now();
        let detections = match self.detector.detect(frame) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("detector: {e}");
                return (Vec::new(), Vec::new());
            }
        };
        let ms = t.elapsed().as_secs_f32() * 1000.0;
        summary.inference_ms.push(ms);
        self.live.frame(ms);
        let (_, stddev) = frame.luma_stats();
        let verdict = rules.evaluate(&FrameFacts {
            now,
            width: frame.width(),
            height: frame.height(),
            detections: &detections,
            luma_stddev: stddev,
        });
        for r in &verdict.positive {
            *summary.positives.entry(r.name()).or_default() += 1;
        }
        let seen: Vec<String> = detections
            .iter()
            .filter(|d| d.score >= 0.3)
            .map(|d| format!("{} {:.2}", d.label(), d.score))
            .collect();
        self.line(
            format!(
                "[{seq:>4}] {:<24} {:>5.0} ms  {}",
                truncate(frame.origin(), 24),
                ms,
                if seen.is_empty() { "-".to_string() } else { seen.join(", ") }
            ),
            false,
        );
        let fired: Vec<RuleKind> = verdict.findings.iter().map(|f| f.rule).collect();
        let mut prepared = Vec::new();
        for (n, finding) in verdict.findings.into_iter().enumerate() {
            prepared.push(self.prepare(frame, &detections, finding, seq, n, summary));
        }
        (fired, prepared)
    }

    /// Builds a finding's event and redacted still. Nothing is stored or sent yet: that
    /// happens in [`Pipeline::commit`], after the scan is on the audit log.
    fn prepare(
        &mut self,
        frame: &Frame,
        detections: &[Detection],
        finding: Finding,
        seq: u64,
        nth: usize,
        summary: &mut Summary,
    ) -> Prepared {
        let time = unix_ms();
        // Unique per finding: several rules can fire on one frame.
        let id = format!("{time:x}-{seq:x}-{nth}");
        let still = match render_still(frame, detections, &finding.objects, &self.config.evidence) {
            // Leave room for the topic and headers in the packet.
            Ok(Some(s)) if s.jpeg.len() > MAX_PACKET_BYTES - 4096 => {
                tracing::error!(
                    "still of {} bytes exceeds the packet limit; publishing metadata only",
                    s.jpeg.len()
                );
                None
            }
            Ok(s) => s,
            Err(e) => {
                tracing::error!("evidence for {}: {e}; publishing metadata only", finding.rule.name());
                None
            }
        };
        let event = ViolationEvent {
            v: SCHEMA_VERSION,
            id: id.clone(),
            device_id: self.config.device_id.to_string(),
            time: deskcam_core::time::rfc3339_utc(time),
            rule: finding.rule,
            score: finding.score,
            boxes: finding.objects.iter().map(EventBox::from).collect(),
            frame: FrameSize { width: frame.width(), height: frame.height() },
            origin: frame.origin().to_string(),
            still: still.as_ref().map(|s| StillInfo {
                sha256: s.sha256.clone(),
                size: s.jpeg.len(),
                content_type: "image/jpeg".into(),
                width: s.width,
                height: s.height,
                redaction: self.config.evidence.redaction.name().into(),
                redacted: s.redacted.clone(),
            }),
        };
        *summary.events.entry(finding.rule.name()).or_default() += 1;
        let what = match &still {
            Some(s) => {
                summary.stills += 1;
                summary.still_bytes += s.jpeg.len() as u64;
                format!(
                    "event/violation {id} + still {} kB ({} redacted)",
                    s.jpeg.len() / 1024,
                    s.redacted.len()
                )
            }
            None => format!("event/violation {id} (no still)"),
        };
        self.line(
            format!("       {:<12} score {:.2} -> {what}", rule_label(finding.rule), finding.score),
            true,
        );
        Prepared { time, event, still: still.map(|s| s.jpeg) }
    }

    /// Stores a prepared piece of evidence and tells the uplink, which sends it from the
    /// store: on disk before it can leave, so a crash loses nothing.
    fn commit(&mut self, p: Prepared) {
        let json = serde_json::to_vec(&p.event).unwrap_or_default();
        let stored = lock_store(&self.store).put(p.time, &p.event.id, &json, p.still.as_deref());
        if stored.is_ok() {
            let sent =
                crate::sent::Sent { t: p.time, id: p.event.id.clone(), rule: p.event.rule.name().into() };
            if let Err(e) = self.sent.append(&sent) {
                tracing::error!("sent-events log: {e}");
            }
        }
        match stored {
            Ok(evicted) if !evicted.is_empty() => {
                tracing::warn!("evidence store full: evicted the oldest {}", evicted.join(", "))
            }
            Ok(_) => {}
            // Not stored means not sent: nothing leaves that could not be kept to the
            // retention and ack rules.
            Err(e) => tracing::error!("evidence {} not stored, so not sent: {e}", p.event.id),
        }
        self.evidence_ready.notify_one();
    }

    fn publish_state(&mut self, shutter: &str) {
        self.state.send_if_modified(|s| {
            let changed = s.shutter != shutter;
            s.shutter = shutter.to_string();
            changed
        });
    }

    fn line(&self, text: String, notable: bool) {
        match self.report {
            Report::Print => println!("{text}"),
            Report::Log if notable => tracing::info!("{}", text.trim_start()),
            Report::Log => tracing::debug!("{}", text.trim_start()),
        }
    }
}

/// Test builds only: `DESKCAM_FAULT=panic:N` panics and `stall:N` hangs the scan loop
/// once N frames are analysed, to test the panic hook, the stall guard and the watchdog.
#[cfg(debug_assertions)]
fn fault_injection(frames: u64) {
    let Ok(spec) = std::env::var("DESKCAM_FAULT") else { return };
    let Some((what, n)) = spec.split_once(':') else { return };
    if n.parse::<u64>().is_ok_and(|n| frames >= n) {
        match what {
            "panic" => panic!("injected fault after {frames} frames"),
            "stall" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => {}
        }
    }
}

/// What the policy needs from the config.
fn policy_config(c: &Config) -> PolicyConfig {
    PolicyConfig {
        mode: c.scan.clone(),
        frames_per_check: c.frames_per_check,
        shift: c.shift.clone(),
        max_break_ms: c.max_break.as_millis(),
        camera_retry_ms: c.camera.retry.as_millis(),
    }
}

fn rule_label(r: RuleKind) -> String {
    format!("{}!", r.name())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s.chars().rev().take(n - 1).collect::<Vec<_>>().into_iter().rev().collect();
        format!("…{tail}")
    }
}
