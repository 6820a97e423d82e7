//! The policy under simulated time: modes, shift, breaks, pre-warning, and random
//! input sequences checked against the privacy invariants after every action.

use super::*;
use crate::duration::Span;

/// 2026-11-23 08:00 UTC, a Monday.
const MON_0800: Millis = 1_795_420_800_000;
const HOUR: Millis = 3_600_000;
/// Start of the simulated time of tests that use an all-week shift (a clock before 2025
/// counts as unset, and the camera never looks then).
const T0: Millis = MON_0800;

fn workdays() -> Shift {
    let days: Vec<String> = ["mon", "tue", "wed", "thu", "fri"].iter().map(|d| d.to_string()).collect();
    Shift::new("UTC", &days, "08:00", "18:00").unwrap()
}

fn policy(mode: ScanMode, frames: u32, shift: Shift, seed: u64) -> Policy {
    Policy::new(
        PolicyConfig {
            mode,
            frames_per_check: frames,
            shift,
            max_break_ms: 30 * 60_000,
            camera_retry_ms: 5_000,
        },
        seed,
    )
}

/// Replays actions on a model of the hardware and checks the invariants.
struct Model {
    /// Open for a check.
    shutter: bool,
    /// Open for the PC's stream.
    stream: bool,
    led: LedPattern,
    prewarn_since: Option<Millis>,
    break_since: Option<Millis>,
}

impl Model {
    fn new() -> Self {
        Model { shutter: false, stream: false, led: LedPattern::Off, prewarn_since: None, break_since: None }
    }

    fn apply(&mut self, p: &Policy, now: Millis, actions: &[Action], shift: &Shift) {
        // Whatever mode the policy is in now (a reconfigure may have changed it).
        let warning = match p.mode() {
            ScanMode::Scheduled { warning, .. } => Some(warning.0),
            _ => None,
        };
        for a in actions {
            match a {
                Action::OpenShutter => {
                    assert_eq!(self.led, LedPattern::Analysing, "shutter opened before the LED said so");
                    assert!(!self.stream && !p.on_call(), "a check during a call");
                    assert!(!p.camera_lost(), "shutter opened while the camera is lost");
                    assert!(!p.shutter_fault(), "shutter opened after it failed to close");
                    assert!(shift.contains(now), "shutter opened outside the shift");
                    assert!(!p.on_break(), "shutter opened during a break");
                    if let Some(w) = warning {
                        let since = self.prewarn_since.expect("a scheduled scan without pre-warning");
                        assert!(now >= since + w, "pre-warning of {} ms, not {w}", now - since);
                    }
                    self.shutter = true;
                }
                Action::CloseShutter => self.shutter = false,
                Action::BeginCall => {
                    assert_eq!(self.led, LedPattern::OnCall, "stream began before the LED said so");
                    assert!(p.on_call(), "stream without a call");
                    assert!(!self.shutter, "stream while a check looks");
                    assert!(!p.camera_lost() && !p.shutter_fault(), "stream with a fault");
                    self.stream = true;
                }
                Action::EndCall => self.stream = false,
                Action::SetLed(l) => {
                    assert!(!self.stream || *l == LedPattern::OnCall, "LED left 'on a call' while streaming");
                    assert!(
                        !self.shutter || *l == LedPattern::Analysing,
                        "LED left 'analysing' with the shutter open"
                    );
                    if *l == LedPattern::PreWarning {
                        self.prewarn_since = Some(now);
                    } else if *l != LedPattern::Analysing {
                        self.prewarn_since = None;
                    }
                    self.led = *l;
                }
                Action::Capture => {
                    assert!(!self.stream && !p.on_call(), "a frame analysed during a call");
                    assert!(
                        self.shutter && self.led == LedPattern::Analysing,
                        "capture without open shutter and LED"
                    );
                    assert!(p.may_look(now), "capture while the camera may not look");
                }
                Action::ProbeCamera => {
                    assert!(!self.shutter && !self.stream, "probe with the shutter open");
                    assert!(p.may_look(now) || p.on_call(), "probe while the camera may not look");
                }
                Action::Finished => assert!(!self.shutter && !self.stream && self.led == LedPattern::Off),
                Action::Event(PolicyEvent::BreakStarted { .. }) => self.break_since = Some(now),
                Action::Event(PolicyEvent::BreakEnded { .. }) => self.break_since = None,
                Action::Event(_) | Action::Refused(_) => {}
            }
        }
        // Invariant 1: the LED is off in a break, after a short acknowledgement.
        if let Some(since) = self.break_since.filter(|_| p.on_break()) {
            if now >= since + BREAK_ACK_MS && !self.stream {
                assert_ne!(self.led, LedPattern::Break, "break pattern past its acknowledgement");
                assert_ne!(self.led, LedPattern::Analysing, "analysing during a break");
            }
        }
        if p.shutter_fault() {
            assert!(!self.shutter && !self.stream, "shutter open after it failed to close");
        }
        // Invariant 2: lit for as long as the camera streams; invariant 7: no check.
        if self.stream {
            assert_eq!(self.led, LedPattern::OnCall, "streaming without the 'on a call' LED");
            assert!(!self.shutter, "a check during a call");
        }
        if !p.on_call() {
            assert!(!self.stream, "streaming after the call ended");
        }
        if p.on_break() || !shift.contains(now) || matches!(p.mode(), ScanMode::Off) {
            assert!(!self.shutter, "shutter open while the camera may not look");
        }
    }
}

#[test]
fn continuous_keeps_the_shutter_open_at_fps() {
    let mut p = policy(ScanMode::Continuous { fps: 2.0 }, 3, Shift::always(), 1);
    assert_eq!(
        p.step(T0, Input::Tick),
        vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
    );
    assert_eq!(p.step(T0 + 100, Input::FrameCaptured), vec![]);
    assert_eq!(p.next_deadline(), Some(T0 + 600));
    assert_eq!(p.step(T0 + 300, Input::Tick), vec![]);
    assert_eq!(p.step(T0 + 600, Input::Tick), vec![Action::Capture]);
    assert_eq!(
        p.step(T0 + 700, Input::Shutdown),
        vec![Action::CloseShutter, Action::SetLed(LedPattern::Off), Action::Finished]
    );
}

#[test]
fn spot_checks_are_bursts_that_respect_min_gap_and_rate() {
    let min_gap = Span::from_secs(300);
    let mut p = policy(ScanMode::Spot { per_hour: 4.0, min_gap }, 3, Shift::always(), 42);
    assert!(p.step(T0, Input::Tick).is_empty());
    let mut now = T0;
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
    // 4 per hour: a 15 min mean gap, a little more with the floor; 200 samples of an
    // exponential keep the sample mean within about ±25 % (3.5 standard errors).
    assert!((700_000.0..1_300_000.0).contains(&mean), "mean gap {mean}");
}

#[test]
fn scan_now_takes_one_check_then_closes() {
    let mut p =
        policy(ScanMode::Spot { per_hour: 1.0, min_gap: Span::from_secs(600) }, 2, Shift::always(), 5);
    p.step(T0, Input::Tick);
    assert_eq!(
        p.step(T0 + 10, Input::ScanNow),
        vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
    );
    assert!(p.step(T0 + 20, Input::FrameCaptured).is_empty());
    assert_eq!(p.step(T0 + 520, Input::Tick), vec![Action::Capture]);
    assert_eq!(
        p.step(T0 + 530, Input::FrameCaptured),
        vec![Action::CloseShutter, Action::SetLed(LedPattern::Off)]
    );
    assert!(p.next_deadline().unwrap() >= T0 + 530 + 600_000, "the next spot check keeps min_gap");
}

#[test]
fn off_never_opens_and_refuses_scan_now() {
    let mut p = policy(ScanMode::Off, 3, Shift::always(), 1);
    for t in 0..100 {
        assert!(p.step(T0 + t * 1000, Input::Tick).is_empty());
        assert_eq!(
            p.step(T0 + t * 1000, Input::ScanNow),
            vec![Action::Refused("monitoring is off (scan.mode = \"off\")")]
        );
    }
    assert!(!p.shutter_open());
}

#[test]
fn camera_fault_closes_and_retries() {
    let mut p = policy(ScanMode::Continuous { fps: 1.0 }, 3, Shift::always(), 1);
    p.step(T0, Input::Tick);
    assert_eq!(
        p.step(T0 + 10, Input::CameraFault),
        vec![Action::CloseShutter, Action::SetLed(LedPattern::Fault), Action::Event(PolicyEvent::CameraLost)]
    );
    assert!(p.camera_lost());
    assert_eq!(
        p.step(T0 + 20, Input::ScanNow),
        vec![Action::Refused("the camera is not available (retrying)")]
    );
    // Tries with doubling gaps, up to the cap; the shutter stays closed and the LED
    // keeps the fault pattern; one lost event per outage.
    let mut at = T0 + 10;
    let mut gaps = Vec::new();
    for _ in 0..9 {
        let due = p.next_deadline().unwrap();
        gaps.push(due - at);
        assert!(p.step(due - 1, Input::Tick).is_empty());
        assert_eq!(p.step(due, Input::Tick), vec![Action::ProbeCamera]);
        assert_eq!(p.next_deadline(), None, "waits for the probe's answer");
        assert!(p.step(due + 5, Input::CameraFault).is_empty());
        at = due + 5;
    }
    assert_eq!(gaps, [5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 300_000, 300_000, 300_000]);
    let due = p.next_deadline().unwrap();
    assert_eq!(p.step(due, Input::Tick), vec![Action::ProbeCamera]);
    assert_eq!(
        p.step(due + 5, Input::CameraBack),
        vec![
            Action::Event(PolicyEvent::CameraBack { down_ms: due + 5 - (T0 + 10) }),
            Action::SetLed(LedPattern::Off),
            Action::SetLed(LedPattern::Analysing),
            Action::OpenShutter,
            Action::Capture
        ]
    );
    assert!(!p.camera_lost());
}

#[test]
fn a_shutter_that_does_not_close_keeps_the_camera_closed_until_restart() {
    let mut p = policy(ScanMode::Continuous { fps: 1.0 }, 1, Shift::always(), 1);
    p.step(T0, Input::Tick);
    assert_eq!(
        p.step(T0 + 10, Input::ShutterFault),
        vec![
            Action::CloseShutter,
            Action::SetLed(LedPattern::Fault),
            Action::Event(PolicyEvent::ShutterFault)
        ]
    );
    // Reported once however often the daemon says so.
    assert!(p.step(T0 + 20, Input::ShutterFault).is_empty());
    for t in (1..3_600).map(|s| T0 + s * 1_000) {
        assert!(p.step(t, Input::Tick).is_empty());
    }
    assert!(matches!(p.step(T0 + HOUR, Input::ScanNow)[..], [Action::Refused(_)]));
    // A break still works and keeps invariant 1; afterwards the fault shows again.
    p.step(T0 + HOUR, Input::ButtonPress);
    assert_eq!(p.step(T0 + HOUR + BREAK_ACK_MS, Input::Tick), vec![Action::SetLed(LedPattern::Off)]);
    let end = p.step(T0 + HOUR + 60_000, Input::ButtonPress);
    assert_eq!(end[0], Action::SetLed(LedPattern::Fault));
    assert!(!p.step(T0 + 2 * HOUR, Input::Tick).contains(&Action::OpenShutter));
}

#[test]
fn identify_shows_for_its_time_but_never_over_a_scan() {
    let mut p =
        policy(ScanMode::Spot { per_hour: 1.0, min_gap: Span::from_secs(3600) }, 1, Shift::always(), 3);
    p.step(T0, Input::Tick);
    assert_eq!(
        p.step(T0 + 10, Input::Identify { duration_ms: 5_000 }),
        vec![Action::SetLed(LedPattern::Identify)]
    );
    assert_eq!(p.next_deadline(), Some(T0 + 5_010));
    assert_eq!(p.step(T0 + 5_010, Input::Tick), vec![Action::SetLed(LedPattern::Off)]);
    // While the camera looks, the LED keeps saying so.
    p.step(T0 + 6_000, Input::ScanNow);
    assert_eq!(
        p.step(T0 + 6_010, Input::Identify { duration_ms: 5_000 }),
        vec![Action::Refused("the camera is looking; try again after the scan")]
    );
}

#[test]
fn nothing_outside_the_shift() {
    let mut p = policy(ScanMode::Continuous { fps: 1.0 }, 3, workdays(), 1);
    assert!(p.step(MON_0800 - 1000, Input::Tick).is_empty(), "07:59:59");
    assert_eq!(p.step(MON_0800 - 1000, Input::ScanNow), vec![Action::Refused("outside the shift")]);
    assert_eq!(
        p.step(MON_0800, Input::Tick),
        vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
    );
    p.step(MON_0800 + 10, Input::FrameCaptured);
    // 18:00: the shift ends and continuous analysis closes.
    assert_eq!(
        p.step(MON_0800 + 10 * HOUR, Input::Tick),
        vec![Action::CloseShutter, Action::SetLed(LedPattern::Off)]
    );
    // Through the week: the shutter opens only within the shift, and does open in it.
    let mut opened_in_shift = 0;
    for minute in (10 * 60 + 1)..(6 * 24 * 60) {
        let now = MON_0800 + minute * 60_000;
        let out = p.step(now, Input::Tick);
        if out.contains(&Action::Capture) {
            assert!(workdays().contains(now), "looked outside the shift at minute {minute}");
            opened_in_shift += 1;
            p.step(now + 10, Input::FrameCaptured);
        }
    }
    assert!(opened_in_shift > 0, "continuous analysis resumes the next morning");
}

#[test]
fn breaks_close_the_shutter_and_end_by_command_button_or_max_break() {
    let mut p = policy(ScanMode::Continuous { fps: 1.0 }, 3, Shift::always(), 1);
    p.step(T0, Input::Tick);
    p.step(T0 + 10, Input::FrameCaptured);
    assert_eq!(
        p.step(T0 + 100, Input::BreakStart { reason: "lunch".into() }),
        vec![
            Action::CloseShutter,
            Action::SetLed(LedPattern::Break),
            Action::Event(PolicyEvent::BreakStarted { reason: "lunch".into() })
        ]
    );
    assert_eq!(
        p.step(T0 + 200, Input::BreakStart { reason: "again".into() }),
        vec![Action::Refused("already on a break")]
    );
    assert_eq!(p.step(T0 + 300, Input::ScanNow), vec![Action::Refused("the worker is on a break")]);
    assert_eq!(
        p.step(T0 + 5_000, Input::Tick),
        vec![Action::SetLed(LedPattern::Off)],
        "no scan during a break, and the LED goes off after the acknowledgement"
    );
    let ended = p.step(T0 + 60_100, Input::BreakEnd);
    assert_eq!(
        ended,
        vec![
            // (already off since the acknowledgement)
            Action::Event(PolicyEvent::BreakEnded {
                reason: "lunch".into(),
                duration_ms: 60_000,
                overrun: false
            })
        ]
    );
    assert_eq!(p.step(T0 + 60_200, Input::BreakEnd), vec![Action::Refused("no break in progress")]);
    assert!(p.step(T0 + 60_300, Input::Tick).contains(&Action::OpenShutter), "work resumes");
    p.step(T0 + 60_310, Input::FrameCaptured);

    // The button toggles; a break longer than max_break ends by itself, reported.
    assert!(p
        .step(T0 + 70_000, Input::ButtonPress)
        .contains(&Action::Event(PolicyEvent::BreakStarted { reason: "button".into() })));
    let overrun = p.step(T0 + 70_000 + 30 * 60_000, Input::Tick);
    assert!(overrun.contains(&Action::Event(PolicyEvent::BreakEnded {
        reason: "button".into(),
        duration_ms: 30 * 60_000,
        overrun: true
    })));
}

#[test]
fn scheduled_scans_are_announced_for_warning_seconds() {
    let warning = Span::from_secs(30);
    let mode = ScanMode::Scheduled { times: vec![10 * 60, 15 * 60], warning };
    let mut p = policy(mode, 2, workdays(), 1);
    assert!(p.step(MON_0800, Input::Tick).is_empty());
    let at_10 = MON_0800 + 2 * HOUR;
    assert_eq!(p.next_deadline(), Some(at_10 - 30_000));
    assert_eq!(p.step(at_10 - 30_000, Input::Tick), vec![Action::SetLed(LedPattern::PreWarning)]);
    assert!(p.step(at_10 - 1, Input::Tick).is_empty());
    assert_eq!(
        p.step(at_10, Input::Tick),
        vec![Action::SetLed(LedPattern::Analysing), Action::OpenShutter, Action::Capture]
    );
    // Woken late (the daemon was busy): the warning still lasts its full 30 s.
    let mut p = policy(ScanMode::Scheduled { times: vec![10 * 60], warning }, 2, workdays(), 1);
    p.step(MON_0800, Input::Tick);
    assert_eq!(p.step(at_10 - 5_000, Input::Tick), vec![Action::SetLed(LedPattern::PreWarning)]);
    assert!(p.step(at_10, Input::Tick).is_empty());
    assert!(p.step(at_10 + 25_000, Input::Tick).contains(&Action::OpenShutter));
}

#[test]
fn scheduled_scan_during_a_break_is_skipped_and_reported() {
    let mode = ScanMode::Scheduled { times: vec![10 * 60], warning: Span::from_secs(10) };
    let mut p = policy(mode, 1, workdays(), 1);
    p.step(MON_0800, Input::Tick);
    let at_10 = MON_0800 + 2 * HOUR;
    p.step(at_10 - 60_000, Input::BreakStart { reason: "doctor".into() });
    let out = p.step(at_10 + 1, Input::Tick);
    assert!(out.contains(&Action::Event(PolicyEvent::ScanSkipped { due: at_10 })), "{out:?}");
    assert!(!out.contains(&Action::OpenShutter));
}

#[test]
fn scheduled_times_changed_during_a_break_are_still_reported_when_skipped() {
    let warning = Span::from_secs(10);
    let mut p = policy(ScanMode::Scheduled { times: vec![15 * 60], warning }, 1, workdays(), 1);
    p.step(MON_0800, Input::Tick);
    let at_10 = MON_0800 + 2 * HOUR;
    p.step(at_10 - 10 * 60_000, Input::BreakStart { reason: "lunch".into() });
    // The fleet owner moves the check into the break.
    let cfg = PolicyConfig {
        mode: ScanMode::Scheduled { times: vec![10 * 60], warning },
        frames_per_check: 1,
        shift: workdays(),
        max_break_ms: 30 * 60_000,
        camera_retry_ms: 5_000,
    };
    p.step(at_10 - 9 * 60_000, Input::Reconfigure(cfg));
    assert!(p.step(at_10 - 1, Input::Tick).iter().all(|a| !matches!(a, Action::Event(_))));
    let out = p.step(at_10 + 1, Input::Tick);
    assert!(out.contains(&Action::Event(PolicyEvent::ScanSkipped { due: at_10 })), "{out:?}");
    assert!(!out.contains(&Action::OpenShutter));
}

/// Random inputs at random times, across modes and shifts: after every step the
/// invariants hold (see `Model::apply`).
#[test]
fn random_input_sequences_keep_the_invariants() {
    for seed in 0..300u64 {
        let mut rng = Rng::new(seed);
        let warning = Span::from_secs(20);
        let mode = match seed % 4 {
            0 => ScanMode::Continuous { fps: 1.0 + (seed % 5) as f32 },
            1 => ScanMode::Spot { per_hour: 30.0, min_gap: Span::from_secs(10) },
            2 => ScanMode::Scheduled { times: vec![8 * 60 + 5, 9 * 60, 12 * 60 + 30, 17 * 60 + 59], warning },
            _ => ScanMode::Off,
        };
        let modes = [
            ScanMode::Continuous { fps: 2.0 },
            ScanMode::Spot { per_hour: 30.0, min_gap: Span::from_secs(10) },
            ScanMode::Scheduled { times: vec![8 * 60 + 30, 10 * 60, 16 * 60], warning },
            ScanMode::Off,
        ];
        let shift = if seed % 2 == 0 { workdays() } else { Shift::always() };
        let mut p = policy(mode, 1 + (seed % 4) as u32, shift.clone(), seed);
        let mut m = Model::new();
        let mut now = MON_0800 - HOUR + rng.next_u64() % (2 * HOUR);
        for _ in 0..400 {
            now += rng.next_u64() % 120_000;
            let input = match rng.next_u64() % 20 {
                17 => Input::Reconfigure(PolicyConfig {
                    mode: modes[(rng.next_u64() % 4) as usize].clone(),
                    frames_per_check: 1 + (rng.next_u64() % 3) as u32,
                    shift: shift.clone(),
                    max_break_ms: 60_000 + rng.next_u64() % (30 * 60_000),
                    camera_retry_ms: 1_000 + rng.next_u64() % 10_000,
                }),
                18 => Input::CameraBack,
                19 if rng.next_u64().is_multiple_of(40) => Input::ShutterFault,
                16 => Input::Identify { duration_ms: rng.next_u64() % 20_000 },
                0 => Input::ScanNow,
                1 => Input::CameraFault,
                2 => Input::BreakStart { reason: "r".into() },
                3 => Input::BreakEnd,
                4 => Input::ButtonPress,
                9 => Input::CallStarted,
                10 | 11 if p.on_call() => Input::CallEnded,
                5..=8 => Input::FrameCaptured,
                _ => Input::Tick,
            };
            let actions = p.step(now, input);
            m.apply(&p, now, &actions, &shift);
            assert_eq!(m.shutter || m.stream, p.shutter_open());
            // Usually the daemon answers a capture at once; sometimes other inputs (a
            // break, the shift's end, a fault) arrive while the frame is in flight.
            if actions.contains(&Action::Capture) && !rng.next_u64().is_multiple_of(3) {
                now += 50;
                let actions = p.step(now, Input::FrameCaptured);
                m.apply(&p, now, &actions, &shift);
            }
        }
        let actions = p.step(now, Input::Shutdown);
        m.apply(&p, now, &actions, &shift);
        assert!(!m.shutter && m.led == LedPattern::Off);
    }
}

#[test]
fn a_config_change_applies_at_once() {
    let cfg = |mode| PolicyConfig {
        mode,
        frames_per_check: 1,
        shift: Shift::always(),
        max_break_ms: 60_000,
        camera_retry_ms: 5_000,
    };
    let mut p = Policy::new(cfg(ScanMode::Continuous { fps: 1.0 }), 1);
    p.step(T0, Input::Tick);
    p.step(T0 + 10, Input::FrameCaptured);
    assert!(p.shutter_open());
    // Monitoring turned off: the shutter closes now, not at the next frame.
    assert_eq!(
        p.step(T0 + 20, Input::Reconfigure(cfg(ScanMode::Off))),
        vec![Action::CloseShutter, Action::SetLed(LedPattern::Off)]
    );
    assert_eq!(
        p.step(T0 + 30, Input::ScanNow),
        vec![Action::Refused("monitoring is off (scan.mode = \"off\")")]
    );
    // Scheduled from now on: the next scan is announced first.
    let warning = Span::from_secs(10);
    let sched = ScanMode::Scheduled { times: vec![(((T0 / 60_000) % 1440) + 1) as u16], warning };
    assert!(p.step(T0 + 40, Input::Reconfigure(cfg(sched))).is_empty());
    let at = (T0 / 60_000 + 1) * 60_000;
    assert_eq!(p.step(at - 10_000, Input::Tick), vec![Action::SetLed(LedPattern::PreWarning)]);
    assert!(p.step(at, Input::Tick).contains(&Action::OpenShutter));
}

/// Runs `input` and checks the actions against the model.
fn run(p: &mut Policy, m: &mut Model, now: Millis, input: Input, shift: &Shift) -> Vec<Action> {
    let actions = p.step(now, input);
    m.apply(p, now, &actions, shift);
    actions
}

#[test]
fn a_call_opens_the_shutter_for_the_stream_in_any_mode_and_closes_it_after() {
    for mode in [
        ScanMode::Off,
        ScanMode::Continuous { fps: 2.0 },
        ScanMode::Spot { per_hour: 4.0, min_gap: Span::from_secs(60) },
    ] {
        // Outside the shift and during a break too: only the PC starts a call.
        let shift = workdays();
        let mut p = policy(mode.clone(), 3, shift.clone(), 1);
        let mut m = Model::new();
        let sunday = MON_0800 - 24 * HOUR;
        run(&mut p, &mut m, sunday, Input::Tick, &shift);
        run(&mut p, &mut m, sunday, Input::BreakStart { reason: "lunch".into() }, &shift);
        let out = run(&mut p, &mut m, sunday + 1, Input::CallStarted, &shift);
        assert_eq!(
            out,
            [Action::Event(PolicyEvent::CallStarted), Action::SetLed(LedPattern::OnCall), Action::BeginCall],
            "{mode:?}"
        );
        assert!(p.shutter_open() && p.streaming() && p.led() == LedPattern::OnCall);
        // Nothing is taken or shown over it: scan-now, identify, the break's end.
        assert!(matches!(run(&mut p, &mut m, sunday + 2, Input::ScanNow, &shift)[..], [Action::Refused(_)]));
        let identify = Input::Identify { duration_ms: 5_000 };
        assert!(matches!(run(&mut p, &mut m, sunday + 3, identify, &shift)[..], [Action::Refused(_)]));
        run(&mut p, &mut m, sunday + 4, Input::BreakEnd, &shift);
        assert_eq!(p.led(), LedPattern::OnCall);
        let out = run(&mut p, &mut m, sunday + 60_000, Input::CallEnded, &shift);
        assert_eq!(out[..2], [Action::EndCall, Action::SetLed(LedPattern::Off)], "{mode:?}");
        assert!(out.contains(&Action::Event(PolicyEvent::CallEnded { duration_ms: 59_999 })));
        assert!(!p.shutter_open() && !p.on_call());
    }
}

#[test]
fn a_check_under_way_ends_when_a_call_starts_and_is_taken_after_it() {
    let shift = Shift::always();
    let mut p = policy(ScanMode::Spot { per_hour: 1.0, min_gap: Span::from_secs(60) }, 3, shift.clone(), 2);
    let mut m = Model::new();
    let out = run(&mut p, &mut m, T0, Input::ScanNow, &shift);
    assert!(out.contains(&Action::Capture));
    run(&mut p, &mut m, T0 + 100, Input::FrameCaptured, &shift);
    let out = run(&mut p, &mut m, T0 + 200, Input::CallStarted, &shift);
    assert_eq!(
        out,
        [
            Action::Event(PolicyEvent::CallStarted),
            Action::Event(PolicyEvent::ScanDeferred { due: T0 + 200 }),
            Action::CloseShutter,
            Action::SetLed(LedPattern::OnCall),
            Action::BeginCall
        ]
    );
    // The rest of the burst is not taken during the call.
    for t in (1..20).map(|i| T0 + i * 1_000) {
        let out = run(&mut p, &mut m, t, Input::Tick, &shift);
        assert!(!out.contains(&Action::Capture), "{out:?}");
    }
    let out = run(&mut p, &mut m, T0 + 30_000, Input::CallEnded, &shift);
    let open = out.iter().position(|a| *a == Action::OpenShutter).expect("the deferred check");
    assert!(out.iter().position(|a| *a == Action::EndCall).unwrap() < open);
    assert_eq!(out.last(), Some(&Action::Capture));
}

#[test]
fn checks_due_during_a_call_are_deferred_reported_and_taken_after_it() {
    let shift = workdays();
    let warning = Span::from_secs(30);
    let at_10 = MON_0800 + 2 * HOUR;
    let at_11 = MON_0800 + 3 * HOUR;
    let mode = ScanMode::Scheduled { times: vec![10 * 60, 11 * 60], warning };
    let mut p = policy(mode, 2, shift.clone(), 3);
    let mut m = Model::new();
    run(&mut p, &mut m, at_10 - HOUR, Input::Tick, &shift);
    run(&mut p, &mut m, at_10 - HOUR + 1, Input::CallStarted, &shift);
    // A two-hour meeting over both scheduled times: each is reported as deferred, and
    // neither the pre-warning nor a frame happens while the PC streams.
    let mut deferred = Vec::new();
    let mut t = at_10 - HOUR + 1;
    while t < at_11 + 10 * 60_000 {
        t += 10_000;
        for a in run(&mut p, &mut m, t, Input::Tick, &shift) {
            assert!(!matches!(a, Action::SetLed(_) | Action::OpenShutter | Action::Capture), "{a:?}");
            if let Action::Event(PolicyEvent::ScanDeferred { due }) = a {
                deferred.push(due);
            }
        }
    }
    assert_eq!(deferred, [at_10, at_11]);
    // After the call: one check, announced for the full warning first.
    let end = t + 1;
    let out = run(&mut p, &mut m, end, Input::CallEnded, &shift);
    assert_eq!(out.iter().filter(|a| **a == Action::SetLed(LedPattern::PreWarning)).count(), 1, "{out:?}");
    assert!(!out.contains(&Action::OpenShutter));
    let out = run(&mut p, &mut m, end + warning.0, Input::Tick, &shift);
    assert!(out.contains(&Action::OpenShutter) && out.contains(&Action::Capture), "{out:?}");
}

#[test]
fn a_fault_during_a_call_ends_the_stream_first_and_it_resumes_when_the_camera_is_back() {
    let shift = Shift::always();
    let mut p = policy(ScanMode::Off, 1, shift.clone(), 4);
    let mut m = Model::new();
    run(&mut p, &mut m, T0, Input::CallStarted, &shift);
    let out = run(&mut p, &mut m, T0 + 1_000, Input::CameraFault, &shift);
    assert_eq!(out[..2], [Action::EndCall, Action::SetLed(LedPattern::Fault)]);
    assert!(!p.shutter_open() && p.on_call());
    // Tried again while the call is on, even in mode off; the stream resumes.
    let out = run(&mut p, &mut m, T0 + 7_000, Input::Tick, &shift);
    assert_eq!(out, [Action::ProbeCamera]);
    let out = run(&mut p, &mut m, T0 + 7_100, Input::CameraBack, &shift);
    assert!(
        out.ends_with(&[Action::SetLed(LedPattern::OnCall), Action::BeginCall])
            || out.contains(&Action::BeginCall)
    );
    assert!(p.streaming());
    // A shutter that does not close ends the stream for good.
    let out = run(&mut p, &mut m, T0 + 8_000, Input::ShutterFault, &shift);
    assert_eq!(out[0], Action::EndCall);
    let out = run(&mut p, &mut m, T0 + 9_000, Input::CameraBack, &shift);
    assert!(!out.contains(&Action::BeginCall));
    // Shutting down during a call: stream stopped, closed, LED off.
    let mut p = policy(ScanMode::Off, 1, shift.clone(), 5);
    let mut m = Model::new();
    run(&mut p, &mut m, T0, Input::CallStarted, &shift);
    let out = run(&mut p, &mut m, T0 + 1, Input::Shutdown, &shift);
    assert_eq!(out, [Action::EndCall, Action::SetLed(LedPattern::Off), Action::Finished]);
}
