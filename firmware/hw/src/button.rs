//! The push button: debounced in software (works on any GPIO, whatever the chip can
//! debounce), reporting short and long presses.

use embedded_hal::digital::InputPin;

use crate::{pin_err, AnyInput, HwError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Press {
    /// Pressed and released before `long_ms`.
    Short,
    /// Held for `long_ms`: reported while still held, so the user sees the answer.
    Long,
}

/// A level must hold this long to count (contact bounce lasts a few ms).
pub const DEBOUNCE_MS: u64 = 30;
/// Held this long, a press is a long press.
pub const LONG_MS: u64 = 2_000;

pub struct Button {
    pin: AnyInput,
    active_low: bool,
    /// The last raw reading and since when it has held.
    raw: bool,
    raw_since: u64,
    /// The debounced state.
    pressed: bool,
    pressed_at: u64,
    long_sent: bool,
}

impl Button {
    pub fn new<P: InputPin + Send + 'static>(pin: P, active_low: bool) -> Self {
        Button {
            pin: AnyInput::new(pin),
            active_low,
            raw: false,
            raw_since: 0,
            pressed: false,
            pressed_at: 0,
            long_sent: false,
        }
    }

    /// Samples the button at `now_ms` (any monotonic clock); call every ~10 ms.
    pub fn poll(&mut self, now_ms: u64) -> Result<Option<Press>, HwError> {
        let high = self.pin.is_high().map_err(pin_err("button"))?;
        Ok(self.sample(high != self.active_low, now_ms))
    }

    /// The debouncing state machine on one reading (`down`: the switch is made).
    pub fn sample(&mut self, down: bool, now_ms: u64) -> Option<Press> {
        if down != self.raw {
            self.raw = down;
            self.raw_since = now_ms;
        }
        if self.raw != self.pressed && now_ms.saturating_sub(self.raw_since) >= DEBOUNCE_MS {
            self.pressed = self.raw;
            if self.pressed {
                self.pressed_at = self.raw_since;
                self.long_sent = false;
            } else if !self.long_sent {
                return Some(Press::Short);
            }
        }
        if self.pressed && !self.long_sent && now_ms.saturating_sub(self.pressed_at) >= LONG_MS {
            self.long_sent = true;
            return Some(Press::Long);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimInput;

    /// Feeds `(level, until_ms)` segments sampled every 5 ms; returns presses with times.
    fn run(b: &mut Button, line: &SimInput, segments: &[(bool, u64)]) -> Vec<(u64, Press)> {
        let mut out = Vec::new();
        let mut t = 0;
        for &(level, until) in segments {
            line.set(level);
            while t < until {
                if let Some(p) = b.poll(t).unwrap() {
                    out.push((t, p));
                }
                t += 5;
            }
        }
        out
    }

    #[test]
    fn bounces_are_ignored_and_presses_classified() {
        let line = SimInput::new(true);
        let mut b = Button::new(line.clone(), true); // to ground, pull-up
        let bouncy_short = [
            (true, 100),
            (false, 105),
            (true, 110),
            (false, 115),
            (true, 120),
            (false, 400), // held 280 ms
            (true, 410),
            (false, 415),
            (true, 1_000),
        ];
        let got = run(&mut b, &line, &bouncy_short);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, Press::Short);
        assert!(got[0].0 >= 430 && got[0].0 < 460, "{got:?}");

        // A 10 ms glitch is no press at all.
        let mut b = Button::new(line.clone(), true);
        assert!(run(&mut b, &line, &[(true, 50), (false, 60), (true, 500)]).is_empty());

        // Held for 3 s: one long press while held, nothing on release.
        let mut b = Button::new(line.clone(), true);
        let got = run(&mut b, &line, &[(true, 50), (false, 3_050), (true, 3_500)]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, Press::Long);
        assert!((2_050..2_100).contains(&got[0].0), "{got:?}");
    }
}
