//! deskcam hardware: the privacy shutter, the status LED and the button, written
//! against embedded-hal 1.0 traits (`OutputPin`, `InputPin`, `SetDutyCycle`) so a
//! driver never knows which board it is on.
//!
//! Backends are thin pin types behind cargo features: `sim` (always built: records
//! every transition; demo and tests), `gpiocdev` (any Linux GPIO character device) and
//! `rppal` (Raspberry Pi GPIO and hardware PWM). Every driver drives its safe state
//! (shutter closed, LED off) when it is created and again when it is dropped.
//! This crate must not read frames, talk to the network or decide policy.

mod button;
#[cfg(feature = "gpiocdev")]
pub mod cdev;
mod led;
#[cfg(feature = "rppal")]
pub mod rpi;
mod shared;
mod shutter;
pub mod sim;

pub use button::{Button, Press};
pub use led::{led_levels, Colour, StatusLed};
pub use shared::{AnyInput, AnyOutput, AnyPwm, PinError, Shared};
pub use shutter::{EndStop, Shutter};

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
    /// The end-stop did not report the shutter closed after it was driven closed.
    #[error("shutter: driven closed, but the end-stop does not confirm it after {waited_ms} ms")]
    NotClosed { waited_ms: u64 },
    #[error("shutter: refusing to open while the LED shows {0}")]
    LedNotLit(&'static str),
    /// A GPIO chip, line or PWM channel could not be had.
    #[error("{what}: {detail}")]
    Backend { what: String, detail: String },
}

pub(crate) fn pin_err<E: core::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> HwError {
    move |e| HwError::Pin { what, detail: format!("{e:?}") }
}
