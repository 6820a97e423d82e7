//! The policy: a pure state machine that decides when the camera may look.
//!
//! `step(now, input) -> actions`, with `now` in wall-clock milliseconds since the Unix
//! epoch (the shift is a wall-clock schedule). The daemon executes the actions in order
//! and feeds back what happened. The ordering guarantees of the design live here: the
//! LED shows "analysing" before the shutter opens, the shutter closes before the LED
//! goes off, a capture is only requested while the shutter is open, and the camera
//! never looks outside the shift, during a break or in mode `off`.
//!
//! The worker's PC may use the box as its webcam (invariant 7 of the design): from
//! `CallStarted` (the PC's STREAMON) to `CallEnded` (STREAMOFF, unplug) the LED shows
//! "on a call" and the shutter is open for the stream, in any mode, shift or break,
//! since only the PC starts it; nothing is analysed in that time, and a check that
//! falls due is audited as deferred and taken after the call. The stream's camera use
//! ends (`EndCall`) before the shutter closes, at the end of the call and on any fault.

use crate::config::ScanMode;
use crate::schedule::Shift;
use crate::Millis;

/// What the status LED shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedPattern {
    Off,
    /// The camera is looking.
    Analysing,
    /// A scheduled scan is about to start.
    PreWarning,
    /// A break has begun: shown for [`BREAK_ACK_MS`] to acknowledge the command or
    /// button, then the LED goes off for the rest of the break (invariant 1).
    Break,
    Fault,
    /// `cmd/identify`: "this is the device you mean", for a few seconds.
    Identify,
    /// The worker's PC streams from the camera (a meeting): lit for as long as it does.
    OnCall,
}

/// Something that happened, fed to [`Policy::step`].
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Time passed (the daemon ticks at least by [`Policy::next_deadline`]).
    Tick,
    /// `cmd/scan-now`: one check now, if the camera may look now.
    ScanNow,
    /// `cmd/break/start` with the worker's reason.
    BreakStart { reason: String },
    /// `cmd/break/end`.
    BreakEnd,
    /// A (short) press of the button: starts a break, or ends the current one.
    ButtonPress,
    /// `cmd/identify`: show the identify pattern for this long (not while looking).
    Identify { duration_ms: Millis },
    /// The frame requested by [`Action::Capture`] was read and handed to analysis.
    FrameCaptured,
    /// The camera failed (missing, unplugged, stalled), or a probe found it still gone.
    CameraFault,
    /// The probe requested by [`Action::ProbeCamera`] opened the camera again.
    CameraBack,
    /// The end-stop did not confirm that the shutter closed. Latched until restart:
    /// the camera stays closed and the LED shows the fault.
    ShutterFault,
    /// The source has no more frames (a directory without `loop`).
    SourceExhausted,
    /// The worker's PC started streaming from the box's webcam function (STREAMON).
    CallStarted,
    /// The PC stopped streaming (STREAMOFF) or the cable was unplugged (DISCONNECT).
    CallEnded,
    /// The daemon is stopping.
    Shutdown,
    /// The config changed (`cmd/mode`, `cmd/config/set`): the new mode, shift and
    /// limits apply from now; a check under way ends.
    Reconfigure(PolicyConfig),
}

/// Something the policy reports, for the audit log and MQTT.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyEvent {
    BreakStarted {
        reason: String,
    },
    /// A break ended, by command or button, or because it reached `max_break`
    /// (`overrun`), which is reported as an event.
    BreakEnded {
        reason: String,
        duration_ms: Millis,
        overrun: bool,
    },
    /// A scheduled scan fell outside the shift or into a break and was not taken.
    ScanSkipped {
        due: Millis,
    },
    /// The camera failed; retries follow with growing gaps.
    CameraLost,
    /// The camera is back after `down_ms`.
    CameraBack {
        down_ms: Millis,
    },
    /// The shutter did not confirm closing; the camera stays closed until restart.
    ShutterFault,
    /// A check fell due while the worker's PC streamed; it is taken after the call.
    ScanDeferred {
        due: Millis,
    },
    /// The PC started streaming (kept on the device: a meeting is none of the
    /// employer's business, only the deferred checks are audited).
    CallStarted,
    /// The PC stopped streaming, after `duration_ms`.
    CallEnded {
        duration_ms: Millis,
    },
}

/// What the daemon must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    SetLed(LedPattern),
    OpenShutter,
    CloseShutter,
    /// Read one frame and analyse it; answer with `FrameCaptured` or `CameraFault`.
    Capture,
    /// The LED shows "on a call": open the shutter and let the PC's stream read the
    /// camera (nothing it reads is analysed).
    BeginCall,
    /// Stop the stream's camera reads, then close the shutter.
    EndCall,
    /// The camera is lost: try to open it (no frame is read, the shutter stays closed);
    /// answer with `CameraBack` or `CameraFault`.
    ProbeCamera,
    Event(PolicyEvent),
    /// A command was refused; nothing changed. The text says why.
    Refused(&'static str),
    /// Nothing more will happen: the daemon may exit.
    Finished,
}

/// A small, seedable PRNG (SplitMix64) so spot checks are random on the device and
/// reproducible in tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// How long the break pattern acknowledges the start of a break before the LED goes off.
pub const BREAK_ACK_MS: Millis = 3_000;
/// The longest gap between two tries of a lost camera (the gaps double up to this).
pub const CAMERA_RETRY_MAX_MS: Millis = 300_000;
/// Frames of one check (spot check or scan-now) are this far apart: close enough to be
/// one look at the desk, far enough apart to debounce a one-frame detector error.
const BURST_GAP_MS: Millis = 500;

/// Everything the policy needs from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    pub mode: ScanMode,
    pub frames_per_check: u32,
    pub shift: Shift,
    pub max_break_ms: Millis,
    /// The first gap before a lost camera is tried again (`camera.retry`).
    pub camera_retry_ms: Millis,
}

#[derive(Clone, Debug)]
struct Lost {
    since: Millis,
    failures: u32,
}

#[derive(Clone, Debug)]
struct OnBreak {
    since: Millis,
    reason: String,
}

#[derive(Clone, Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    rng: Rng,
    shutter_open: bool,
    led: LedPattern,
    /// A capture (or a camera probe) has been requested and not yet answered.
    capturing: bool,
    /// The camera failed and has not come back.
    camera_lost: Option<Lost>,
    /// The shutter did not confirm closing (latched).
    shutter_fault: bool,
    /// Frames still to take in the current check; 0 when not in a check (continuous
    /// mode keeps looking instead).
    burst_left: u32,
    next_scan: Option<Millis>,
    /// Scheduled mode: when the pre-warning of the next scan began.
    prewarn_since: Option<Millis>,
    on_break: Option<OnBreak>,
    /// Until when the identify pattern shows.
    identify_until: Option<Millis>,
    /// Until when the break pattern acknowledges a new break.
    break_ack_until: Option<Millis>,
    /// The worker's PC streams (from `CallStarted` to `CallEnded`), since when.
    call: Option<Millis>,
    /// The stream may read the camera (`BeginCall` given, `EndCall` not yet): false
    /// during a call while the camera is lost or the shutter failed.
    streaming: bool,
    /// A check fell due during the call: it is taken when the call ends.
    deferred: bool,
    finished: bool,
}

impl Policy {
    pub fn new(cfg: PolicyConfig, seed: u64) -> Self {
        Policy {
            cfg,
            rng: Rng::new(seed),
            shutter_open: false,
            led: LedPattern::Off,
            capturing: false,
            camera_lost: None,
            shutter_fault: false,
            burst_left: 0,
            next_scan: None,
            prewarn_since: None,
            on_break: None,
            identify_until: None,
            break_ack_until: None,
            call: None,
            streaming: false,
            deferred: false,
            finished: false,
        }
    }

    /// Whether the shutter is open: for a check, or for the PC's stream.
    pub fn shutter_open(&self) -> bool {
        self.shutter_open || self.streaming
    }

    /// Whether the worker's PC is streaming from the box (a call is on).
    pub fn on_call(&self) -> bool {
        self.call.is_some()
    }

    /// Whether the PC's stream may read the camera now.
    pub fn streaming(&self) -> bool {
        self.streaming
    }

    pub fn led(&self) -> LedPattern {
        self.led
    }

    pub fn mode(&self) -> &ScanMode {
        &self.cfg.mode
    }

    pub fn on_break(&self) -> bool {
        self.on_break.is_some()
    }

    pub fn camera_lost(&self) -> bool {
        self.camera_lost.is_some()
    }

    pub fn shutter_fault(&self) -> bool {
        self.shutter_fault
    }

    /// Whether the camera may look at `now`: in the shift, not on a break, not `off`.
    pub fn may_look(&self, now: Millis) -> bool {
        !matches!(self.cfg.mode, ScanMode::Off) && self.on_break.is_none() && self.cfg.shift.contains(now)
    }

    /// When the policy next wants a `Tick`, if ever. The daemon also ticks regularly,
    /// so shift boundaries are noticed without a deadline of their own.
    pub fn next_deadline(&self) -> Option<Millis> {
        if self.capturing || self.finished {
            return None;
        }
        let scan = self.next_scan.map(|due| match (&self.cfg.mode, self.prewarn_since) {
            (ScanMode::Scheduled { warning, .. }, None) => due.saturating_sub(warning.0),
            (ScanMode::Scheduled { warning, .. }, Some(since)) => due.max(since.saturating_add(warning.0)),
            _ => due,
        });
        let break_end = self.on_break.as_ref().map(|b| b.since.saturating_add(self.cfg.max_break_ms));
        [scan, break_end, self.identify_until, self.break_ack_until].into_iter().flatten().min()
    }

    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        // Temporary LED patterns end on time whatever the input.
        self.expire_led(now, &mut out);
        match input {
            Input::Shutdown => {
                self.stop_stream(&mut out);
                self.close(&mut out, LedPattern::Off);
                self.finish(&mut out);
            }
            Input::SourceExhausted => {
                self.capturing = false;
                self.stop_stream(&mut out);
                self.close(&mut out, LedPattern::Off);
                self.finish(&mut out);
            }
            Input::CameraFault => {
                self.capturing = false;
                self.burst_left = 0;
                self.prewarn_since = None;
                let first = self.camera_lost.is_none();
                let lost = self.camera_lost.get_or_insert(Lost { since: now, failures: 0 });
                lost.failures = lost.failures.saturating_add(1);
                let failures = lost.failures;
                // Closed first, then reported; a call goes on without the camera.
                self.stop_stream(&mut out);
                let idle = self.idle_led();
                self.close(&mut out, idle);
                if first {
                    out.push(Action::Event(PolicyEvent::CameraLost));
                }
                self.next_scan = Some(now.saturating_add(self.retry_gap(failures)));
            }
            // (Only the answer to a probe: the camera was lost.)
            Input::CameraBack => {
                let Some(lost) = self.camera_lost.take() else { return out };
                self.capturing = false;
                out.push(Action::Event(PolicyEvent::CameraBack { down_ms: now.saturating_sub(lost.since) }));
                if self.call.is_some() && !self.shutter_fault {
                    // The call, still on, has its camera back.
                    self.begin_stream(&mut out);
                }
                let idle = self.idle_led();
                self.set_led(&mut out, idle);
                // Checks resume as after a start: the next one under the current mode.
                self.next_scan = None;
                self.tick(now, &mut out);
            }
            Input::ShutterFault => {
                self.capturing = false;
                self.burst_left = 0;
                self.prewarn_since = None;
                let first = !std::mem::replace(&mut self.shutter_fault, true);
                // The daemon has driven it closed already; nothing reads a frame again,
                // not even for the PC's stream.
                self.stop_stream(&mut out);
                let idle = self.idle_led();
                self.close(&mut out, idle);
                self.next_scan = None;
                if first {
                    out.push(Action::Event(PolicyEvent::ShutterFault));
                }
            }
            Input::ScanNow => {
                if let Some(why) = self.refusal(now) {
                    out.push(Action::Refused(why));
                } else if matches!(self.cfg.mode, ScanMode::Scheduled { .. }) && !self.shutter_open {
                    // Where scans are announced, an ordered one is announced too: it
                    // becomes the next scheduled scan, pre-warning included.
                    self.next_scan = Some(now);
                    self.tick(now, &mut out);
                } else if !self.capturing {
                    // While continuous analysis looks anyway, scan-now is the next frame.
                    if !self.shutter_open {
                        self.burst_left = self.cfg.frames_per_check;
                    }
                    self.begin_capture(&mut out);
                }
            }
            Input::Identify { duration_ms } => {
                if self.shutter_open || self.streaming {
                    // The LED must keep saying that the camera looks.
                    out.push(Action::Refused("the camera is looking; try again after the scan"));
                } else {
                    self.identify_until = Some(now.saturating_add(duration_ms));
                    self.set_led(&mut out, LedPattern::Identify);
                }
            }
            Input::BreakStart { reason } => self.start_break(now, reason, &mut out),
            Input::BreakEnd => self.end_break(now, false, &mut out),
            Input::ButtonPress => {
                if self.on_break.is_some() {
                    self.end_break(now, false, &mut out);
                } else {
                    self.start_break(now, "button".into(), &mut out);
                }
            }
            Input::CallStarted => self.start_call(now, &mut out),
            Input::CallEnded => self.end_call(now, &mut out),
            Input::FrameCaptured => {
                self.capturing = false;
                if self.call.is_some() {
                    // A frame read before the call began; the check ended with it.
                } else if !self.may_look(now) {
                    self.burst_left = 0;
                    self.close(&mut out, self.idle_led());
                } else if self.burst_left > 1 {
                    self.burst_left -= 1;
                    self.next_scan = Some(now.saturating_add(BURST_GAP_MS));
                } else if self.burst_left == 1 || !matches!(self.cfg.mode, ScanMode::Continuous { .. }) {
                    self.burst_left = 0;
                    let idle = self.idle_led();
                    self.close(&mut out, idle);
                    self.schedule_next(now);
                } else {
                    // Continuous: keep looking, the shutter stays open.
                    self.schedule_next(now);
                }
            }
            Input::Tick => self.tick(now, &mut out),
            Input::Reconfigure(cfg) => {
                self.cfg = cfg;
                // The check under way ends (a frame in flight finishes it), and the next
                // one is planned under the new mode, announced again if scheduled.
                self.burst_left = 0;
                self.next_scan = None;
                self.prewarn_since = None;
                // Where the camera may no longer look, it stops now, as for a break.
                if !self.capturing || !self.may_look(now) {
                    self.capturing = false;
                    let idle = self.idle_led();
                    self.close(&mut out, idle);
                }
                self.tick(now, &mut out);
            }
        }
        out
    }

    fn expire_led(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.identify_until.is_some_and(|until| now >= until) {
            self.identify_until = None;
            if self.led == LedPattern::Identify {
                let idle = self.idle_led();
                self.set_led(out, idle);
            }
        }
        if self.break_ack_until.is_some_and(|until| now >= until) {
            self.break_ack_until = None;
            if self.led == LedPattern::Break {
                let idle = self.idle_led();
                self.set_led(out, idle);
            }
        }
    }

    fn tick(&mut self, now: Millis, out: &mut Vec<Action>) {
        if let Some(b) = &self.on_break {
            if now.saturating_sub(b.since) >= self.cfg.max_break_ms {
                self.end_break(now, true, out);
            }
        }
        if self.capturing || self.shutter_fault {
            return;
        }
        if self.camera_lost.is_some() {
            // Tried again when the gap is over, and only when the camera may look then
            // (or the PC wants it for a call): a probe opens the device but reads
            // nothing, and the shutter stays closed.
            if !self.may_look(now) && self.call.is_none() {
                let idle = self.idle_led();
                self.close(out, idle);
            } else if self.next_scan.is_none_or(|due| now >= due) {
                self.capturing = true;
                out.push(Action::ProbeCamera);
            }
            return;
        }
        if self.call.is_some() {
            self.defer_due_checks(now, out);
            return;
        }
        if !self.may_look(now) {
            // Outside the shift (or on a break, or off): nothing looks. A continuous
            // watch closes; a scheduled scan that falls due now is skipped.
            self.burst_left = 0;
            self.close(out, self.idle_led());
            // A check that falls due now is skipped (and a scheduled one reported), so
            // no check is taken the moment the shift starts or a break ends. Scheduled
            // times stay planned here (also after a config change during a break), so
            // each one that passes unseen is reported.
            if self.next_scan.is_none() && matches!(self.cfg.mode, ScanMode::Scheduled { .. }) {
                self.schedule_first(now);
            }
            if let Some(due) = self.next_scan.filter(|due| now >= *due) {
                if matches!(self.cfg.mode, ScanMode::Scheduled { .. }) {
                    out.push(Action::Event(PolicyEvent::ScanSkipped { due }));
                }
                self.prewarn_since = None;
                self.schedule_next(now);
            }
            if matches!(self.cfg.mode, ScanMode::Continuous { .. }) {
                self.next_scan = None;
            }
            return;
        }
        if self.next_scan.is_none() {
            self.schedule_first(now);
        }
        let Some(due) = self.next_scan else { return };
        // (The frames of a check already under way need no new warning.)
        if let (ScanMode::Scheduled { warning, .. }, false) = (&self.cfg.mode, self.shutter_open) {
            let warning = *warning;
            // Warn first; the scan waits until the warning has lasted its full time.
            if self.prewarn_since.is_none() && now >= due.saturating_sub(warning.0) {
                self.prewarn_since = Some(now);
                self.set_led(out, LedPattern::PreWarning);
            }
            let Some(since) = self.prewarn_since else { return };
            if now < due.max(since.saturating_add(warning.0)) {
                return;
            }
            self.prewarn_since = None;
        } else if now < due {
            return;
        }
        self.next_scan = None;
        if !self.shutter_open && !matches!(self.cfg.mode, ScanMode::Continuous { .. }) {
            self.burst_left = self.cfg.frames_per_check;
        }
        self.begin_capture(out);
    }

    fn refusal(&self, now: Millis) -> Option<&'static str> {
        if self.shutter_fault {
            Some("the shutter did not confirm closing: the camera stays closed until the device is serviced")
        } else if self.call.is_some() {
            Some("the worker's PC is using the camera (a call); the check is taken after it")
        } else if matches!(self.cfg.mode, ScanMode::Off) {
            Some("monitoring is off (scan.mode = \"off\")")
        } else if self.on_break.is_some() {
            Some("the worker is on a break")
        } else if !self.cfg.shift.contains(now) {
            Some("outside the shift")
        } else if self.camera_lost.is_some() {
            Some("the camera is not available (retrying)")
        } else {
            None
        }
    }

    /// What the LED shows when the camera does not look: in a break its short
    /// acknowledgement, then nothing (invariant 1, whatever else is wrong); otherwise a
    /// lasting fault, else nothing.
    fn idle_led(&self) -> LedPattern {
        if self.streaming {
            // Invariant 2: lit for as long as the camera streams, whatever else is on.
            LedPattern::OnCall
        } else if self.on_break.is_some() {
            if self.break_ack_until.is_some() {
                LedPattern::Break
            } else {
                LedPattern::Off
            }
        } else if self.shutter_fault || self.camera_lost.is_some() {
            LedPattern::Fault
        } else {
            LedPattern::Off
        }
    }

    /// Gaps between tries of a lost camera: `camera.retry`, doubling, at most
    /// [`CAMERA_RETRY_MAX_MS`].
    fn retry_gap(&self, failures: u32) -> Millis {
        let base = self.cfg.camera_retry_ms.max(1);
        base.saturating_mul(1 << failures.saturating_sub(1).min(20)).min(CAMERA_RETRY_MAX_MS.max(base))
    }

    fn start_break(&mut self, now: Millis, reason: String, out: &mut Vec<Action>) {
        if self.on_break.is_some() {
            out.push(Action::Refused("already on a break"));
            return;
        }
        self.capturing = false;
        self.burst_left = 0;
        self.prewarn_since = None;
        self.on_break = Some(OnBreak { since: now, reason: reason.clone() });
        self.break_ack_until = Some(now.saturating_add(BREAK_ACK_MS));
        // During a call the LED keeps saying that the camera streams.
        let led = if self.streaming { LedPattern::OnCall } else { LedPattern::Break };
        self.close(out, led);
        out.push(Action::Event(PolicyEvent::BreakStarted { reason }));
    }

    fn end_break(&mut self, now: Millis, overrun: bool, out: &mut Vec<Action>) {
        let Some(b) = self.on_break.take() else {
            out.push(Action::Refused("no break in progress"));
            return;
        };
        self.break_ack_until = None;
        let idle = self.idle_led();
        self.set_led(out, idle);
        out.push(Action::Event(PolicyEvent::BreakEnded {
            reason: b.reason,
            duration_ms: now.saturating_sub(b.since),
            overrun,
        }));
        // Checks resume from here: a spot gap or the next scheduled time.
        self.next_scan = None;
    }

    fn start_call(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.call.is_some() {
            return; // a second STREAMON of the same call
        }
        self.call = Some(now);
        out.push(Action::Event(PolicyEvent::CallStarted));
        // A check under way (or announced) ends here and is taken after the call.
        let checking = self.shutter_open || self.burst_left > 0 || self.prewarn_since.is_some();
        if checking && !matches!(self.cfg.mode, ScanMode::Continuous { .. }) {
            self.deferred = true;
            out.push(Action::Event(PolicyEvent::ScanDeferred { due: now }));
        }
        if self.camera_lost.is_none() {
            // (A probe in flight stays in flight: its answer is awaited.)
            self.capturing = false;
        }
        self.burst_left = 0;
        self.prewarn_since = None;
        if self.shutter_fault {
            self.close(out, LedPattern::Fault);
            out.push(Action::Refused("the shutter did not confirm closing: the camera stays closed"));
        } else if self.camera_lost.is_some() {
            self.close(out, LedPattern::Fault);
            out.push(Action::Refused("the camera is not available (retrying)"));
        } else {
            self.close(out, LedPattern::OnCall);
            self.begin_stream(out);
        }
    }

    fn end_call(&mut self, now: Millis, out: &mut Vec<Action>) {
        let Some(since) = self.call.take() else { return };
        self.stop_stream(out);
        let idle = self.idle_led();
        self.set_led(out, idle);
        out.push(Action::Event(PolicyEvent::CallEnded { duration_ms: now.saturating_sub(since) }));
        if std::mem::take(&mut self.deferred) {
            // The deferred check is due now (announced first where scans are).
            self.next_scan = Some(now);
        } else if matches!(self.cfg.mode, ScanMode::Continuous { .. }) {
            self.next_scan = None;
        }
        self.tick(now, out);
    }

    /// During a call: a check that falls due is deferred (one check after the call,
    /// each due time audited), or skipped as usual where the camera could not look.
    fn defer_due_checks(&mut self, now: Millis, out: &mut Vec<Action>) {
        match self.cfg.mode {
            // A watch pauses and resumes after the call: nothing to defer.
            ScanMode::Continuous { .. } | ScanMode::Off => self.next_scan = None,
            ScanMode::Spot { .. } | ScanMode::Scheduled { .. } => {
                if self.next_scan.is_none() {
                    self.schedule_first(now);
                }
                if let Some(due) = self.next_scan.filter(|due| now >= *due) {
                    if self.may_look(now) {
                        self.deferred = true;
                        out.push(Action::Event(PolicyEvent::ScanDeferred { due }));
                    } else if matches!(self.cfg.mode, ScanMode::Scheduled { .. }) {
                        out.push(Action::Event(PolicyEvent::ScanSkipped { due }));
                    }
                    self.schedule_next(now);
                }
            }
        }
    }

    fn begin_stream(&mut self, out: &mut Vec<Action>) {
        if !self.streaming {
            // LED first, as for a check.
            self.set_led(out, LedPattern::OnCall);
            self.streaming = true;
            out.push(Action::BeginCall);
        }
    }

    fn stop_stream(&mut self, out: &mut Vec<Action>) {
        if self.streaming {
            self.streaming = false;
            out.push(Action::EndCall);
        }
    }

    fn set_led(&mut self, out: &mut Vec<Action>, led: LedPattern) {
        if !matches!(led, LedPattern::PreWarning | LedPattern::Analysing) {
            // A warning that is no longer shown does not count for the next scan.
            self.prewarn_since = None;
        }
        if self.led != led {
            self.led = led;
            out.push(Action::SetLed(led));
        }
    }

    fn begin_capture(&mut self, out: &mut Vec<Action>) {
        if !self.shutter_open {
            // LED first: the person in front of the camera is told before it looks.
            self.set_led(out, LedPattern::Analysing);
            self.shutter_open = true;
            out.push(Action::OpenShutter);
        }
        self.capturing = true;
        out.push(Action::Capture);
    }

    fn close(&mut self, out: &mut Vec<Action>, led: LedPattern) {
        if self.shutter_open {
            self.shutter_open = false;
            out.push(Action::CloseShutter);
        }
        self.set_led(out, led);
    }

    fn finish(&mut self, out: &mut Vec<Action>) {
        self.finished = true;
        self.capturing = false;
        self.next_scan = None;
        out.push(Action::Finished);
    }

    fn schedule_first(&mut self, now: Millis) {
        self.next_scan = match self.cfg.mode {
            ScanMode::Continuous { .. } => Some(now),
            _ => self.after(now),
        };
    }

    fn schedule_next(&mut self, now: Millis) {
        self.next_scan = match self.cfg.mode {
            ScanMode::Continuous { fps } => Some(now.saturating_add((1000.0 / fps.max(0.001)) as Millis)),
            _ => self.after(now),
        };
    }

    /// The next spot check or scheduled scan after `now`.
    fn after(&mut self, now: Millis) -> Option<Millis> {
        match &self.cfg.mode {
            ScanMode::Spot { .. } => Some(now.saturating_add(self.spot_gap())),
            ScanMode::Scheduled { times, .. } => {
                times.iter().filter_map(|t| self.cfg.shift.next_local(now, *t)).min()
            }
            ScanMode::Continuous { .. } | ScanMode::Off => None,
        }
    }

    /// Exponentially distributed gaps (a Poisson process at `per_hour`), never below
    /// `min_gap`, so a worker cannot predict the next check.
    fn spot_gap(&mut self) -> Millis {
        let ScanMode::Spot { per_hour, min_gap } = self.cfg.mode else { return 0 };
        let mean_ms = 3_600_000.0 / per_hour.max(0.001) as f64;
        // Capped at a day: the exponential's tail is long and a gap must stay finite.
        let gap = (-mean_ms * self.rng.unit().ln()).min(86_400_000.0);
        (gap as Millis).max(min_gap.0)
    }
}

#[cfg(test)]
mod tests;
