//! Pin handles the drivers and the emergency path share, and type-erased pins so the
//! daemon can hold whichever backend the board config names.

use std::sync::{Arc, Mutex};

use embedded_hal::digital::{ErrorType, InputPin, OutputPin};
use embedded_hal::pwm::SetDutyCycle;

/// A backend's error, as text: the daemon only reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinError(pub String);

impl embedded_hal::digital::Error for PinError {
    fn kind(&self) -> embedded_hal::digital::ErrorKind {
        embedded_hal::digital::ErrorKind::Other
    }
}

impl embedded_hal::pwm::Error for PinError {
    fn kind(&self) -> embedded_hal::pwm::ErrorKind {
        embedded_hal::pwm::ErrorKind::Other
    }
}

struct Inner<P> {
    pin: P,
    /// Set by [`Shared::freeze`]: the line stays where the emergency path left it and
    /// ordinary writes are ignored, so a blinking LED cannot light again after a panic.
    frozen: bool,
}

/// One line (or PWM channel) behind a lock, with as many handles as needed: the driver
/// owns one, the emergency path another. Writes through a frozen handle do nothing.
pub struct Shared<P>(Arc<Mutex<Inner<P>>>);

impl<P> Clone for Shared<P> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<P> Shared<P> {
    pub fn new(pin: P) -> Self {
        Shared(Arc::new(Mutex::new(Inner { pin, frozen: false })))
    }

    /// Drives the line with `f` and freezes it there. Works whatever state the other
    /// handles are in, including a poisoned lock after a panic.
    pub fn freeze(&self, f: impl FnOnce(&mut P)) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut inner.pin);
        inner.frozen = true;
    }

    fn with<R>(&self, idle: R, f: impl FnOnce(&mut P) -> R) -> R {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if inner.frozen {
            idle
        } else {
            f(&mut inner.pin)
        }
    }
}

impl<P: ErrorType> ErrorType for Shared<P> {
    type Error = <P as ErrorType>::Error;
}

impl<P: OutputPin> OutputPin for Shared<P> {
    fn set_low(&mut self) -> Result<(), <P as ErrorType>::Error> {
        self.with(Ok(()), |p| p.set_low())
    }
    fn set_high(&mut self) -> Result<(), <P as ErrorType>::Error> {
        self.with(Ok(()), |p| p.set_high())
    }
}

impl<P: embedded_hal::pwm::ErrorType> embedded_hal::pwm::ErrorType for Shared<P> {
    type Error = <P as embedded_hal::pwm::ErrorType>::Error;
}

impl<P: SetDutyCycle> SetDutyCycle for Shared<P> {
    fn max_duty_cycle(&self) -> u16 {
        let inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.pin.max_duty_cycle()
    }
    fn set_duty_cycle(&mut self, duty: u16) -> Result<(), <P as embedded_hal::pwm::ErrorType>::Error> {
        self.with(Ok(()), |p| p.set_duty_cycle(duty))
    }
}

fn text<E: core::fmt::Debug>(e: E) -> PinError {
    PinError(format!("{e:?}"))
}

/// Any output pin.
pub struct AnyOutput(Box<dyn FnMut(bool) -> Result<(), PinError> + Send>);

impl AnyOutput {
    pub fn new<P: OutputPin + Send + 'static>(mut pin: P) -> Self {
        AnyOutput(Box::new(move |high| if high { pin.set_high() } else { pin.set_low() }.map_err(text)))
    }
}

impl ErrorType for AnyOutput {
    type Error = PinError;
}

impl OutputPin for AnyOutput {
    fn set_low(&mut self) -> Result<(), PinError> {
        (self.0)(false)
    }
    fn set_high(&mut self) -> Result<(), PinError> {
        (self.0)(true)
    }
}

/// Any input pin.
pub struct AnyInput(Box<dyn FnMut() -> Result<bool, PinError> + Send>);

impl AnyInput {
    pub fn new<P: InputPin + Send + 'static>(mut pin: P) -> Self {
        AnyInput(Box::new(move || pin.is_high().map_err(text)))
    }
}

impl ErrorType for AnyInput {
    type Error = PinError;
}

impl InputPin for AnyInput {
    fn is_high(&mut self) -> Result<bool, PinError> {
        (self.0)()
    }
    fn is_low(&mut self) -> Result<bool, PinError> {
        (self.0)().map(|h| !h)
    }
}

/// Any PWM channel.
pub struct AnyPwm {
    max: u16,
    set: Box<dyn FnMut(u16) -> Result<(), PinError> + Send>,
}

impl AnyPwm {
    pub fn new<P: SetDutyCycle + Send + 'static>(mut pwm: P) -> Self {
        AnyPwm { max: pwm.max_duty_cycle(), set: Box::new(move |d| pwm.set_duty_cycle(d).map_err(text)) }
    }
}

impl embedded_hal::pwm::ErrorType for AnyPwm {
    type Error = PinError;
}

impl SetDutyCycle for AnyPwm {
    fn max_duty_cycle(&self) -> u16 {
        self.max
    }
    fn set_duty_cycle(&mut self, duty: u16) -> Result<(), PinError> {
        (self.set)(duty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Level, Recorder, SimPin};

    #[test]
    fn a_frozen_line_ignores_later_writes() {
        let rec = Recorder::default();
        let line = Shared::new(SimPin::new("led", rec.clone()));
        let mut driver = AnyOutput::new(line.clone());
        driver.set_high().unwrap();
        line.freeze(|p| p.set_low().unwrap());
        driver.set_high().unwrap();
        assert_eq!(rec.level("led"), Some(Level::Low));
        assert_eq!(rec.transitions().len(), 2);
    }
}
