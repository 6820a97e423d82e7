//! The status LED: single, bi-colour (green + red) or RGB, active-high or active-low,
//! showing the policy's patterns as colours and blink rhythms.

use std::time::Instant;

use deskcam_core::board::LedKind;
use deskcam_core::policy::LedPattern;
use embedded_hal::digital::OutputPin;

use crate::{pin_err, AnyOutput, HwError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Colour {
    Red,
    Green,
    Amber,
    Blue,
    White,
}

/// How a pattern looks: a colour, lit for `on_ms` of every `on_ms + off_ms`
/// (`off_ms == 0`: steady).
struct Look {
    colour: Colour,
    on_ms: u64,
    off_ms: u64,
}

fn look(p: LedPattern) -> Option<Look> {
    let (colour, on_ms, off_ms) = match p {
        LedPattern::Off => return None,
        // Steady for as long as the camera looks: invariant 2 says "lit", not "blinking".
        LedPattern::Analysing => (Colour::Red, 1, 0),
        // A slow blink: a scan is coming.
        LedPattern::PreWarning => (Colour::Amber, 500, 500),
        LedPattern::Break => (Colour::Blue, 1, 0),
        // A fast blink that nobody mistakes for the steady "analysing".
        LedPattern::Fault => (Colour::Red, 100, 100),
        LedPattern::Identify => (Colour::White, 150, 150),
        // Steady like "analysing" (invariant 2: lit while the camera streams), in its
        // own colour where the LED has colours; a single LED cannot tell them apart
        // without blinking, and a blink would say the camera is not looking.
        LedPattern::OnCall => (Colour::Green, 1, 0),
    };
    Some(Look { colour, on_ms, off_ms })
}

/// Which lines are lit (before polarity) for `pattern`, `phase_ms` after it began.
/// Lines: single = [led]; bi-colour = [green, red]; RGB = [red, green, blue].
pub fn led_levels(kind: LedKind, pattern: LedPattern, phase_ms: u64) -> Vec<bool> {
    let n = lines_of(kind);
    let Some(l) = look(pattern) else { return vec![false; n] };
    if l.off_ms > 0 && phase_ms % (l.on_ms + l.off_ms) >= l.on_ms {
        return vec![false; n];
    }
    match kind {
        LedKind::Single => vec![true],
        // A bi-colour LED has no blue: green stands in for the calm colours.
        LedKind::Bicolour => match l.colour {
            Colour::Red => vec![false, true],
            Colour::Green | Colour::Blue => vec![true, false],
            Colour::Amber | Colour::White => vec![true, true],
        },
        LedKind::Rgb => match l.colour {
            Colour::Red => vec![true, false, false],
            Colour::Green => vec![false, true, false],
            Colour::Amber => vec![true, true, false],
            Colour::Blue => vec![false, false, true],
            Colour::White => vec![true, true, true],
        },
    }
}

fn lines_of(kind: LedKind) -> usize {
    match kind {
        LedKind::Single => 1,
        LedKind::Bicolour => 2,
        LedKind::Rgb => 3,
    }
}

/// The status LED. [`StatusLed::tick`] advances blink patterns; whoever owns the LED
/// calls it every few tens of milliseconds.
pub struct StatusLed {
    kind: LedKind,
    lines: Vec<AnyOutput>,
    active_low: bool,
    pattern: LedPattern,
    since: Instant,
    /// What each line was last driven to (`None`: not yet), so a tick writes only changes.
    shown: Vec<Option<bool>>,
}

impl StatusLed {
    /// Takes the lines (as many as the kind has) and turns the LED off at once.
    pub fn new<P: OutputPin + Send + 'static>(
        kind: LedKind,
        pins: Vec<P>,
        active_low: bool,
    ) -> Result<Self, HwError> {
        if pins.len() != lines_of(kind) {
            return Err(HwError::Backend {
                what: "led".into(),
                detail: format!("a {kind:?} LED has {} line(s), got {}", lines_of(kind), pins.len()),
            });
        }
        let shown = vec![None; pins.len()];
        let lines = pins.into_iter().map(AnyOutput::new).collect();
        let mut l =
            StatusLed { kind, lines, active_low, pattern: LedPattern::Off, since: Instant::now(), shown };
        l.render(0)?;
        Ok(l)
    }

    /// Shows `pattern` from its beginning (unless it is already showing: then it goes
    /// on where it is, rather than jumping back to the first phase of a blink).
    pub fn set(&mut self, pattern: LedPattern) -> Result<(), HwError> {
        if pattern != self.pattern {
            self.pattern = pattern;
            self.since = Instant::now();
        }
        self.tick()
    }

    /// Advances a blinking pattern to now.
    pub fn tick(&mut self) -> Result<(), HwError> {
        self.render(self.since.elapsed().as_millis() as u64)
    }

    /// Drives the lines for the current pattern `phase_ms` after it began.
    pub fn render(&mut self, phase_ms: u64) -> Result<(), HwError> {
        let want = led_levels(self.kind, self.pattern, phase_ms);
        for ((line, shown), lit) in self.lines.iter_mut().zip(self.shown.iter_mut()).zip(want) {
            if *shown == Some(lit) {
                continue;
            }
            let high = lit != self.active_low;
            if high { line.set_high() } else { line.set_low() }.map_err(pin_err("led"))?;
            *shown = Some(lit);
        }
        Ok(())
    }

    pub fn pattern(&self) -> LedPattern {
        self.pattern
    }
}

impl Drop for StatusLed {
    fn drop(&mut self) {
        let _ = self.set(LedPattern::Off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Level, Recorder, SimPin};

    const ALL: [LedPattern; 6] = [
        LedPattern::Off,
        LedPattern::Analysing,
        LedPattern::PreWarning,
        LedPattern::Break,
        LedPattern::Fault,
        LedPattern::Identify,
    ];

    #[test]
    fn analysing_is_steady_and_lit_on_every_kind_and_off_is_dark() {
        for kind in [LedKind::Single, LedKind::Bicolour, LedKind::Rgb] {
            for phase in (0..5_000).step_by(7) {
                assert!(led_levels(kind, LedPattern::Analysing, phase).iter().any(|l| *l), "{kind:?}");
                assert!(led_levels(kind, LedPattern::Off, phase).iter().all(|l| !*l), "{kind:?}");
            }
        }
    }

    #[test]
    fn patterns_are_told_apart_on_colour_leds() {
        // Over two seconds, the sequence of line states differs for every pair of patterns.
        for kind in [LedKind::Bicolour, LedKind::Rgb] {
            let seen: Vec<Vec<Vec<bool>>> = ALL
                .iter()
                .map(|p| (0..2_000).step_by(50).map(|t| led_levels(kind, *p, t)).collect())
                .collect();
            for i in 0..ALL.len() {
                for j in i + 1..ALL.len() {
                    assert_ne!(seen[i], seen[j], "{kind:?}: {:?} looks like {:?}", ALL[i], ALL[j]);
                }
            }
        }
        // A single LED cannot show colours, but the camera-looking pattern is the only
        // steady lit one besides the break acknowledgement.
        let fault: Vec<bool> =
            (0..1_000).step_by(50).map(|t| led_levels(LedKind::Single, LedPattern::Fault, t)[0]).collect();
        assert!(fault.contains(&true) && fault.contains(&false));
    }

    #[test]
    fn blinking_writes_only_changes_and_active_low_inverts() {
        let rec = Recorder::default();
        let pins = vec![SimPin::new("green", rec.clone()), SimPin::new("red", rec.clone())];
        {
            let mut led = StatusLed::new(LedKind::Bicolour, pins, true).unwrap();
            // Off on an active-low LED: both lines high.
            assert_eq!((rec.level("green"), rec.level("red")), (Some(Level::High), Some(Level::High)));
            led.set(LedPattern::Fault).unwrap();
            assert_eq!(rec.level("red"), Some(Level::Low));
            let before = rec.transitions().len();
            for t in [10, 20, 30] {
                led.render(t).unwrap();
            }
            assert_eq!(rec.transitions().len(), before, "no writes within the lit half");
            led.render(150).unwrap();
            assert_eq!(rec.level("red"), Some(Level::High));
        }
        assert_eq!((rec.level("green"), rec.level("red")), (Some(Level::High), Some(Level::High)));
        let wrong = StatusLed::new(LedKind::Rgb, vec![SimPin::new("x", rec)], false);
        assert!(wrong.is_err());
    }
}
