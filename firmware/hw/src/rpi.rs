//! Raspberry Pi backend through `rppal`: BCM-numbered GPIO and the hardware PWM
//! channels (servo shutters). rppal's pins implement embedded-hal 1.0's digital traits;
//! its PWM gets a `SetDutyCycle` adapter here.

use std::time::Duration;

use embedded_hal::pwm::SetDutyCycle;
use rppal::gpio::{Gpio, InputPin, OutputPin};
use rppal::pwm::{Channel, Polarity, Pwm};

use crate::{HwError, PinError};

fn backend(what: String, e: impl std::fmt::Display) -> HwError {
    HwError::Backend { what, detail: e.to_string() }
}

/// BCM pin `bcm` as an output, starting at `high`. The pin keeps its level when the
/// process ends (rppal would otherwise return it to an input and let it float).
pub fn output(gpio: &Gpio, bcm: u8, role: &str, high: bool) -> Result<OutputPin, HwError> {
    let pin = gpio.get(bcm).map_err(|e| backend(format!("GPIO BCM {bcm} ({role})"), e))?;
    let mut out = if high { pin.into_output_high() } else { pin.into_output_low() };
    out.set_reset_on_drop(false);
    Ok(out)
}

/// BCM pin `bcm` as an input with the internal pull towards the released level.
pub fn input(gpio: &Gpio, bcm: u8, role: &str, active_low: bool) -> Result<InputPin, HwError> {
    let pin = gpio.get(bcm).map_err(|e| backend(format!("GPIO BCM {bcm} ({role})"), e))?;
    Ok(if active_low { pin.into_input_pullup() } else { pin.into_input_pulldown() })
}

pub fn gpio() -> Result<Gpio, HwError> {
    Gpio::new().map_err(|e| backend("Raspberry Pi GPIO".into(), e))
}

/// A hardware PWM channel as embedded-hal's `SetDutyCycle` (duty out of `u16::MAX`).
pub struct RpiPwm(Pwm);

/// Opens PWM channel `channel` (0 or 1; needs the `pwm` overlay) with `period_ms`,
/// enabled at `duty` (a fraction of the period) from the start.
pub fn pwm(channel: u8, period_ms: f32, duty: f32) -> Result<RpiPwm, HwError> {
    let what = || format!("PWM channel {channel} (shutter servo; is dtoverlay=pwm set?)");
    let ch = match channel {
        0 => Channel::Pwm0,
        1 => Channel::Pwm1,
        2 => Channel::Pwm2,
        3 => Channel::Pwm3,
        n => return Err(backend(what(), format!("no channel {n}"))),
    };
    let period = Duration::from_secs_f32(period_ms / 1000.0);
    let pulse = Duration::from_secs_f32(period_ms * duty.clamp(0.0, 1.0) / 1000.0);
    let p = Pwm::with_period(ch, period, pulse, Polarity::Normal, true).map_err(|e| backend(what(), e))?;
    Ok(RpiPwm(p))
}

impl embedded_hal::pwm::ErrorType for RpiPwm {
    type Error = PinError;
}

impl SetDutyCycle for RpiPwm {
    fn max_duty_cycle(&self) -> u16 {
        u16::MAX
    }
    fn set_duty_cycle(&mut self, duty: u16) -> Result<(), PinError> {
        let frac = f64::from(duty) / f64::from(u16::MAX);
        self.0.set_duty_cycle(frac).map_err(|e| PinError(e.to_string()))
    }
}
