//! The policy: a pure state machine that decides when the camera may look.
//!
//! `step(now, input) -> actions`. The daemon executes the actions in order and feeds
//! back what happened. The ordering guarantees of the design live here: the LED shows
//! "analysing" before the shutter opens, the shutter closes before the LED goes off,
//! and a capture is only ever requested while the shutter is open.
//!
//! This first version knows the scan modes `continuous`, `spot` and `off`, `scan-now`
//! and camera faults; breaks, shift hours and schedules build on it.

use crate::config::ScanMode;
use crate::Millis;

/// What the status LED shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedPattern {
    Off,
    Analysing,
    Fault,
}

/// Something that happened, fed to [`Policy::step`].
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Time passed (the daemon ticks at least by [`Policy::next_deadline`]).
    Tick,
    /// `cmd/scan-now` or a test: analyse one frame now.
    ScanNow,
    /// The frame requested by [`Action::Capture`] was read and handed to analysis.
    FrameCaptured,
    /// The camera failed (missing, unplugged, stalled).
    CameraFault,
    /// The source has no more frames (a directory without `loop`).
    SourceExhausted,
    /// The daemon is stopping.
    Shutdown,
}

/// What the daemon must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    SetLed(LedPattern),
    OpenShutter,
    CloseShutter,
    /// Read one frame and analyse it; answer with `FrameCaptured` or `CameraFault`.
    Capture,
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

/// How long to wait before retrying a failed camera.
const FAULT_RETRY_MS: Millis = 5_000;
/// Frames of one check (spot check or scan-now) are this far apart: close enough to be
/// one look at the desk, far enough apart to debounce a one-frame detector error.
const BURST_GAP_MS: Millis = 500;

#[derive(Clone, Debug)]
pub struct Policy {
    mode: ScanMode,
    rng: Rng,
    shutter_open: bool,
    led: LedPattern,
    /// A capture has been requested and not yet answered.
    capturing: bool,
    /// Frames per check (spot check or scan-now).
    frames_per_check: u32,
    /// Frames still to take in the current check; 0 when not in a check (continuous
    /// mode keeps looking instead).
    burst_left: u32,
    next_scan: Option<Millis>,
    finished: bool,
}

impl Policy {
    pub fn new(mode: ScanMode, frames_per_check: u32, seed: u64) -> Self {
        Policy {
            mode,
            rng: Rng::new(seed),
            shutter_open: false,
            led: LedPattern::Off,
            capturing: false,
            frames_per_check: frames_per_check.max(1),
            burst_left: 0,
            next_scan: None,
            finished: false,
        }
    }

    pub fn shutter_open(&self) -> bool {
        self.shutter_open
    }

    pub fn led(&self) -> LedPattern {
        self.led
    }

    pub fn mode(&self) -> &ScanMode {
        &self.mode
    }

    /// When the policy next wants a `Tick`, if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        if self.capturing || self.finished {
            None
        } else {
            self.next_scan
        }
    }

    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match input {
            Input::Shutdown => {
                self.close(&mut out, LedPattern::Off);
                self.finish(&mut out);
            }
            Input::SourceExhausted => {
                self.capturing = false;
                self.close(&mut out, LedPattern::Off);
                self.finish(&mut out);
            }
            Input::CameraFault => {
                self.capturing = false;
                self.burst_left = 0;
                self.close(&mut out, LedPattern::Fault);
                if !matches!(self.mode, ScanMode::Off) {
                    self.next_scan = Some(now.saturating_add(FAULT_RETRY_MS));
                }
            }
            Input::ScanNow => {
                // While continuous analysis looks anyway, scan-now is the next frame.
                if !self.capturing && !matches!(self.mode, ScanMode::Off) {
                    if !self.shutter_open {
                        self.burst_left = self.frames_per_check;
                    }
                    self.begin_capture(&mut out);
                }
            }
            Input::FrameCaptured => {
                self.capturing = false;
                if self.burst_left > 1 {
                    self.burst_left -= 1;
                    self.next_scan = Some(now.saturating_add(BURST_GAP_MS));
                } else if self.burst_left == 1 || !matches!(self.mode, ScanMode::Continuous { .. }) {
                    self.burst_left = 0;
                    self.close(&mut out, LedPattern::Off);
                    self.schedule_next(now);
                } else {
                    // Continuous: keep looking, the shutter stays open.
                    self.schedule_next(now);
                }
            }
            Input::Tick => {
                if self.next_scan.is_none() && !self.capturing {
                    self.schedule_first(now);
                }
                if let Some(due) = self.next_scan {
                    if now >= due && !self.capturing {
                        self.next_scan = None;
                        if !self.shutter_open && matches!(self.mode, ScanMode::Spot { .. }) {
                            self.burst_left = self.frames_per_check;
                        }
                        self.begin_capture(&mut out);
                    }
                }
            }
        }
        out
    }

    fn begin_capture(&mut self, out: &mut Vec<Action>) {
        if !self.shutter_open {
            // LED first: the person in front of the camera is told before it looks.
            self.led = LedPattern::Analysing;
            out.push(Action::SetLed(LedPattern::Analysing));
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
        if self.led != led {
            self.led = led;
            out.push(Action::SetLed(led));
        }
    }

    fn finish(&mut self, out: &mut Vec<Action>) {
        self.finished = true;
        self.capturing = false;
        self.next_scan = None;
        out.push(Action::Finished);
    }

    fn schedule_first(&mut self, now: Millis) {
        self.next_scan = match self.mode {
            ScanMode::Continuous { .. } => Some(now),
            ScanMode::Spot { .. } => Some(now.saturating_add(self.spot_gap())),
            ScanMode::Off => None,
        };
    }

    fn schedule_next(&mut self, now: Millis) {
        self.next_scan = match self.mode {
            ScanMode::Continuous { fps } => Some(now.saturating_add((1000.0 / fps.max(0.001)) as Millis)),
            ScanMode::Spot { .. } => Some(now.saturating_add(self.spot_gap())),
            ScanMode::Off => None,
        };
    }

    /// Exponentially distributed gaps (a Poisson process at `per_hour`), never below
    /// `min_gap`, so a worker cannot predict the next check.
    fn spot_gap(&mut self) -> Millis {
        let ScanMode::Spot { per_hour, min_gap } = self.mode else { return 0 };
        let mean_ms = 3_600_000.0 / per_hour.max(0.001) as f64;
        // Capped at a day: the exponential's tail is long and a gap must stay finite.
        let gap = (-mean_ms * self.rng.unit().ln()).min(86_400_000.0);
        (gap as Millis).max(min_gap.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::Span;

    /// Replays inputs and checks the hardware invariants after every action.
    fn check_invariants(actions: &[Action], shutter: &mut bool, led: &mut LedPattern) {
        for a in actions {
            match a {
                Action::OpenShutter => {
                    assert_eq!(*led, LedPattern::Analysing, "shutter opened before the LED said so");
                    *shutter = true;
                }
                Action::CloseShutter => *shutter = false,
                Action::SetLed(p) => {
                    assert!(
                        !*shutter || *p == LedPattern::Analysing,
                        "LED left 'analysing' while the shutter is open"
                    );
                    *led = *p;
                }
                Action::Capture => assert!(*shutter, "capture with the shutter closed"),
                Action::Finished => assert!(!*shutter && *led == LedPattern::Off),
            }
        }
    }

    #[test]
    fn continuous_keeps_the_shutter_open_at_fps() {
        let mut p = Policy::new(ScanMode::Continuous { fps: 2.0 }, 3, 1);
        assert_eq!(
            p.step(0, Input::Tick),
            vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
        );
        assert_eq!(p.step(100, Input::FrameCaptured), vec![]);
        assert_eq!(p.next_deadline(), Some(600));
        assert_eq!(p.step(300, Input::Tick), vec![]);
        assert_eq!(p.step(600, Input::Tick), vec![Action::Capture]);
        assert_eq!(
            p.step(700, Input::Shutdown),
            vec![Action::CloseShutter, Action::SetLed(LedPattern::Off), Action::Finished]
        );
    }

    #[test]
    fn spot_checks_open_briefly_and_respect_min_gap() {
        let min_gap = Span::from_secs(300);
        let mut p = Policy::new(ScanMode::Spot { per_hour: 4.0, min_gap }, 3, 42);
        assert!(p.step(0, Input::Tick).is_empty());
        let mut now = 0;
        let mut gaps = Vec::new();
        for _ in 0..200 {
            let due = p.next_deadline().unwrap();
            gaps.push(due - now);
            assert_eq!(
                p.step(due, Input::Tick),
                vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
            );
            // A check is a burst of 3 frames, half a second apart, shutter open throughout.
            assert!(p.step(due + 50, Input::FrameCaptured).is_empty());
            assert_eq!(p.step(due + 550, Input::Tick), vec![Action::Capture]);
            assert!(p.step(due + 600, Input::FrameCaptured).is_empty());
            assert_eq!(p.step(due + 1100, Input::Tick), vec![Action::Capture]);
            assert_eq!(
                p.step(due + 1150, Input::FrameCaptured),
                vec![Action::CloseShutter, Action::SetLed(LedPattern::Off)]
            );
            now = due + 1150;
        }
        assert!(gaps.iter().all(|g| *g >= 300_000));
        let mean = gaps.iter().sum::<u64>() as f64 / gaps.len() as f64;
        // 4 per hour on average: 15 min mean (a little more with the floor).
        assert!((700_000.0..1_300_000.0).contains(&mean), "mean gap {mean}");
    }

    #[test]
    fn scan_now_takes_one_check_then_closes() {
        let mut p = Policy::new(ScanMode::Spot { per_hour: 1.0, min_gap: Span::from_secs(600) }, 2, 5);
        p.step(0, Input::Tick);
        assert_eq!(
            p.step(10, Input::ScanNow),
            vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
        );
        assert!(p.step(20, Input::FrameCaptured).is_empty());
        assert_eq!(p.step(520, Input::Tick), vec![Action::Capture]);
        assert_eq!(
            p.step(530, Input::FrameCaptured),
            vec![Action::CloseShutter, Action::SetLed(LedPattern::Off)]
        );
        assert!(p.next_deadline().unwrap() >= 530 + 600_000, "the next spot check keeps min_gap");
    }

    #[test]
    fn off_never_opens_even_on_scan_now() {
        let mut p = Policy::new(ScanMode::Off, 3, 1);
        for t in 0..100 {
            assert!(p.step(t * 1000, Input::Tick).is_empty());
            assert!(p.step(t * 1000, Input::ScanNow).is_empty());
        }
        assert!(!p.shutter_open());
    }

    #[test]
    fn camera_fault_closes_and_retries() {
        let mut p = Policy::new(ScanMode::Continuous { fps: 1.0 }, 3, 1);
        p.step(0, Input::Tick);
        assert_eq!(
            p.step(10, Input::CameraFault),
            vec![Action::CloseShutter, Action::SetLed(LedPattern::Fault)]
        );
        assert_eq!(p.next_deadline(), Some(5_010));
        assert_eq!(
            p.step(5_010, Input::Tick),
            vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
        );
    }

    #[test]
    fn random_input_sequences_keep_led_and_shutter_ordering() {
        for seed in 0..200u64 {
            let mut rng = Rng::new(seed);
            let mode = match seed % 3 {
                0 => ScanMode::Continuous { fps: 1.0 + (seed % 5) as f32 },
                1 => ScanMode::Spot { per_hour: 30.0, min_gap: Span::from_secs(10) },
                _ => ScanMode::Off,
            };
            let mut p = Policy::new(mode, 1 + (seed % 4) as u32, seed);
            let (mut shutter, mut led) = (false, LedPattern::Off);
            let mut now = 0;
            for _ in 0..300 {
                now += rng.next_u64() % 5_000;
                let input = match rng.next_u64() % 10 {
                    0 => Input::ScanNow,
                    1 => Input::CameraFault,
                    2..=4 => Input::FrameCaptured,
                    _ => Input::Tick,
                };
                let actions = p.step(now, input);
                check_invariants(&actions, &mut shutter, &mut led);
                assert_eq!(shutter, p.shutter_open());
            }
            let actions = p.step(now, Input::Shutdown);
            check_invariants(&actions, &mut shutter, &mut led);
            assert!(!shutter && led == LedPattern::Off);
        }
    }
}
