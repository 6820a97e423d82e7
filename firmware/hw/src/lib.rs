//! deskcam hardware: the privacy shutter, the status LED and (later) the button,
//! written against embedded-hal traits so a driver never knows which board it is on.
//!
//! Backends are thin pin types: `sim` (records every transition; demo and tests) now,
//! Raspberry Pi and Linux GPIO character devices behind cargo features later.
//! Every driver has a safe state (shutter closed, LED off) that it restores on drop.
//! This crate must not read frames, talk to the network or decide policy.

pub mod sim;

use deskcam_core::policy::LedPattern;
use embedded_hal::digital::OutputPin;

/// Proof that the shutter has been opened while the LED shows that the camera looks.
///
/// Frame sources require a reference to one before they read a frame (privacy
/// invariant 2). Only [`Shutter::open`] creates it (the field is private to this
/// crate), after checking the LED; it cannot be cloned.
#[derive(Debug)]
pub struct ShutterOpen {
    _private: (),
}

#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("{what}: pin error: {detail}")]
    Pin { what: &'static str, detail: String },
}

fn pin_err<E: core::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> HwError {
    move |e| HwError::Pin { what, detail: format!("{e:?}") }
}

/// A shutter moved by one output pin (high = open, unless `active_low`).
pub struct Shutter<P: OutputPin> {
    pin: P,
    active_low: bool,
    open: bool,
}

impl<P: OutputPin> Shutter<P> {
    /// Takes the pin and drives it closed at once: the safe state comes first.
    pub fn new(pin: P, active_low: bool) -> Result<Self, HwError> {
        let mut s = Shutter { pin, active_low, open: true };
        s.close()?;
        Ok(s)
    }

    fn drive(&mut self, open: bool) -> Result<(), HwError> {
        let high = open != self.active_low;
        if high { self.pin.set_high() } else { self.pin.set_low() }.map_err(pin_err("shutter"))?;
        self.open = open;
        Ok(())
    }

    /// Opens the shutter. Requires the LED to show that the camera looks: the caller
    /// passes the LED to prove it. Returns the token that frame sources require.
    pub fn open<L: OutputPin>(&mut self, led: &StatusLed<L>) -> Result<ShutterOpen, HwError> {
        if led.pattern() != LedPattern::Analysing {
            return Err(HwError::Pin {
                what: "shutter",
                detail: format!("refusing to open while the LED shows {:?}", led.pattern()),
            });
        }
        self.drive(true)?;
        Ok(ShutterOpen { _private: () })
    }

    pub fn close(&mut self) -> Result<(), HwError> {
        self.drive(false)
    }

    pub fn is_open(&self) -> bool {
        self.open
    }
}

impl<P: OutputPin> Drop for Shutter<P> {
    fn drop(&mut self) {
        // Safe state on every exit path, including unwinding.
        let _ = self.close();
    }
}

/// A single status LED. Patterns map to steady levels for now: analysing and fault
/// light it (a blinking fault pattern comes with the board drivers).
pub struct StatusLed<P: OutputPin> {
    pin: P,
    active_low: bool,
    pattern: LedPattern,
}

impl<P: OutputPin> StatusLed<P> {
    pub fn new(pin: P, active_low: bool) -> Result<Self, HwError> {
        let mut l = StatusLed { pin, active_low, pattern: LedPattern::Analysing };
        l.set(LedPattern::Off)?;
        Ok(l)
    }

    pub fn set(&mut self, pattern: LedPattern) -> Result<(), HwError> {
        let lit = pattern != LedPattern::Off;
        let high = lit != self.active_low;
        if high { self.pin.set_high() } else { self.pin.set_low() }.map_err(pin_err("led"))?;
        self.pattern = pattern;
        Ok(())
    }

    pub fn pattern(&self) -> LedPattern {
        self.pattern
    }
}

impl<P: OutputPin> Drop for StatusLed<P> {
    fn drop(&mut self) {
        let _ = self.set(LedPattern::Off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Level, Recorder, SimPin};

    #[test]
    fn shutter_and_led_start_safe_and_return_to_safe_on_drop() {
        let rec = Recorder::default();
        {
            let mut led = StatusLed::new(SimPin::new("led", rec.clone()), false).unwrap();
            let mut shutter = Shutter::new(SimPin::new("shutter", rec.clone()), false).unwrap();
            assert_eq!(rec.level("shutter"), Some(Level::Low));
            assert_eq!(rec.level("led"), Some(Level::Low));
            led.set(LedPattern::Analysing).unwrap();
            let _token = shutter.open(&led).unwrap();
            assert_eq!(rec.level("shutter"), Some(Level::High));
        }
        assert_eq!(rec.level("shutter"), Some(Level::Low));
        assert_eq!(rec.level("led"), Some(Level::Low));
    }

    #[test]
    fn shutter_refuses_to_open_with_led_off() {
        let rec = Recorder::default();
        let led = StatusLed::new(SimPin::new("led", rec.clone()), false).unwrap();
        let mut shutter = Shutter::new(SimPin::new("shutter", rec.clone()), true).unwrap();
        assert!(shutter.open(&led).is_err());
        assert!(!shutter.is_open());
        // Active-low: closed means the line is high.
        assert_eq!(rec.level("shutter"), Some(Level::High));
    }
}
