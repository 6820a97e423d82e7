//! The privacy shutter: a solenoid or motor on one output line, or a hobby servo on a
//! PWM channel, optionally with an end-stop switch that confirms the closed position.

use std::time::{Duration, Instant};

use deskcam_core::policy::LedPattern;
use embedded_hal::digital::{InputPin, OutputPin};
use embedded_hal::pwm::SetDutyCycle;

use crate::{pin_err, AnyInput, HwError, ShutterOpen, StatusLed};

type Drive = Box<dyn FnMut(bool) -> Result<(), HwError> + Send>;

/// A switch that is made when the shutter is fully closed.
pub struct EndStop {
    pin: AnyInput,
    active_low: bool,
    /// How long the mechanism may take to close.
    settle: Duration,
}

impl EndStop {
    pub fn new<P: InputPin + Send + 'static>(pin: P, active_low: bool, settle: Duration) -> Self {
        EndStop { pin: AnyInput::new(pin), active_low, settle }
    }

    fn closed(&mut self) -> Result<bool, HwError> {
        let high = self.pin.is_high().map_err(pin_err("end-stop"))?;
        Ok(high != self.active_low)
    }

    /// Waits up to the settle time for the switch to report closed.
    fn confirm(&mut self) -> Result<(), HwError> {
        let start = Instant::now();
        loop {
            if self.closed()? {
                return Ok(());
            }
            if start.elapsed() >= self.settle {
                return Err(HwError::NotClosed { waited_ms: start.elapsed().as_millis() as u64 });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The shutter. Creating it drives it closed; dropping it drives it closed.
pub struct Shutter {
    drive: Drive,
    end_stop: Option<EndStop>,
    open: bool,
}

impl Shutter {
    /// A shutter moved by one output line (high = open, unless `active_low`).
    pub fn with_pin<P: OutputPin + Send + 'static>(mut pin: P, active_low: bool) -> Result<Self, HwError> {
        let drive: Drive = Box::new(move |open| {
            let high = open != active_low;
            if high { pin.set_high() } else { pin.set_low() }.map_err(pin_err("shutter"))
        });
        Self::start(drive, None)
    }

    /// A shutter pulled open by one line and closed by another (an H-bridge's two inputs,
    /// a bistable solenoid's two coils): exactly one is active at a time, and the side
    /// that is ending is released before the other is driven.
    pub fn with_pin_pair<P, Q>(mut open_pin: P, mut close_pin: Q, active_low: bool) -> Result<Self, HwError>
    where
        P: OutputPin + Send + 'static,
        Q: OutputPin + Send + 'static,
    {
        let drive: Drive = Box::new(move |open| {
            // `true`: drive the line high.
            let (on, off) = (!active_low, active_low);
            if open {
                if off { close_pin.set_high() } else { close_pin.set_low() }.map_err(pin_err("shutter"))?;
                if on { open_pin.set_high() } else { open_pin.set_low() }.map_err(pin_err("shutter"))
            } else {
                if off { open_pin.set_high() } else { open_pin.set_low() }.map_err(pin_err("shutter"))?;
                if on { close_pin.set_high() } else { close_pin.set_low() }.map_err(pin_err("shutter"))
            }
        });
        Self::start(drive, None)
    }

    /// A servo on a PWM channel; the duties are fractions of the period (a 1 ms pulse in
    /// a 20 ms period is 0.05).
    pub fn with_servo<W: SetDutyCycle + Send + 'static>(
        mut pwm: W,
        open_duty: f32,
        closed_duty: f32,
    ) -> Result<Self, HwError> {
        let drive: Drive = Box::new(move |open| {
            let frac = if open { open_duty } else { closed_duty };
            let duty = (frac.clamp(0.0, 1.0) * f32::from(pwm.max_duty_cycle())).round() as u16;
            pwm.set_duty_cycle(duty).map_err(pin_err("shutter servo"))
        });
        Self::start(drive, None)
    }

    /// Adds an end-stop. The caller checks it with [`Shutter::close`] at once: a
    /// shutter that does not report closed at start is a fault, and is never opened.
    pub fn with_end_stop(mut self, end_stop: EndStop) -> Self {
        self.end_stop = Some(end_stop);
        self
    }

    fn start(drive: Drive, end_stop: Option<EndStop>) -> Result<Self, HwError> {
        // The safe state comes first: closed before anything else happens.
        let mut s = Shutter { drive, end_stop, open: true };
        s.close()?;
        Ok(s)
    }

    /// Opens the shutter. Requires the LED to show that the camera looks ("analysing"
    /// for a check, "on a call" for the PC's stream): the caller passes the LED to
    /// prove it. Returns the token that frame sources require.
    pub fn open(&mut self, led: &StatusLed) -> Result<ShutterOpen, HwError> {
        if !matches!(led.pattern(), LedPattern::Analysing | LedPattern::OnCall) {
            return Err(HwError::LedNotLit(match led.pattern() {
                LedPattern::Off => "off",
                LedPattern::PreWarning => "pre-warning",
                LedPattern::Break => "break",
                LedPattern::Fault => "fault",
                LedPattern::Identify => "identify",
                LedPattern::Analysing | LedPattern::OnCall => "lit",
            }));
        }
        (self.drive)(true)?;
        self.open = true;
        Ok(ShutterOpen { _private: () })
    }

    /// Drives the shutter closed and, with an end-stop, waits for it to confirm:
    /// [`HwError::NotClosed`] if it does not.
    pub fn close(&mut self) -> Result<(), HwError> {
        (self.drive)(false)?;
        self.open = false;
        match self.end_stop.as_mut() {
            Some(e) => e.confirm(),
            None => Ok(()),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }
}

impl Drop for Shutter {
    fn drop(&mut self) {
        // Safe state on every exit path, including unwinding. (No end-stop wait here.)
        let _ = (self.drive)(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Level, Recorder, SimInput, SimPin, SimPwm};
    use deskcam_core::board::LedKind;

    fn led(rec: &Recorder) -> StatusLed {
        StatusLed::new(LedKind::Single, vec![SimPin::new("led", rec.clone())], false).unwrap()
    }

    #[test]
    fn shutter_and_led_start_safe_and_return_to_safe_on_drop() {
        let rec = Recorder::default();
        {
            let mut led = led(&rec);
            let mut shutter = Shutter::with_pin(SimPin::new("shutter", rec.clone()), false).unwrap();
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
    fn shutter_refuses_to_open_unless_the_led_shows_analysing() {
        let rec = Recorder::default();
        let mut led = led(&rec);
        let mut shutter = Shutter::with_pin(SimPin::new("shutter", rec.clone()), true).unwrap();
        for p in [LedPattern::Off, LedPattern::PreWarning, LedPattern::Fault, LedPattern::Identify] {
            led.set(p).unwrap();
            assert!(shutter.open(&led).is_err(), "{p:?}");
        }
        assert!(!shutter.is_open());
        // Active-low: closed means the line is high.
        assert_eq!(rec.level("shutter"), Some(Level::High));
    }

    #[test]
    fn a_pin_pair_never_drives_both_sides() {
        let rec = Recorder::default();
        let mut led = led(&rec);
        let mut s = Shutter::with_pin_pair(
            SimPin::new("open", rec.clone()),
            SimPin::new("close", rec.clone()),
            false,
        )
        .unwrap();
        assert_eq!((rec.level("open"), rec.level("close")), (Some(Level::Low), Some(Level::High)));
        led.set(LedPattern::Analysing).unwrap();
        let _t = s.open(&led).unwrap();
        assert_eq!((rec.level("open"), rec.level("close")), (Some(Level::High), Some(Level::Low)));
        drop(s);
        assert_eq!((rec.level("open"), rec.level("close")), (Some(Level::Low), Some(Level::High)));
        // Replaying the transitions, the two lines are never high together.
        let (mut open, mut close) = (false, false);
        for t in rec.transitions().iter().filter(|t| t.pin != "led") {
            let high = t.level == Level::High;
            if t.pin == "open" {
                open = high
            } else {
                close = high
            }
            assert!(!(open && close), "both sides driven: {:?}", rec.transitions());
        }
    }

    #[test]
    fn servo_moves_between_the_two_duties() {
        let rec = Recorder::default();
        let mut led = led(&rec);
        let mut s = Shutter::with_servo(SimPwm::new("servo", rec.clone()), 0.10, 0.05).unwrap();
        assert_eq!(rec.level("servo"), Some(Level::Duty(3277)));
        led.set(LedPattern::Analysing).unwrap();
        let _t = s.open(&led).unwrap();
        assert_eq!(rec.level("servo"), Some(Level::Duty(6554)));
        drop(s);
        assert_eq!(rec.level("servo"), Some(Level::Duty(3277)));
    }

    #[test]
    fn an_end_stop_that_does_not_confirm_is_a_fault() {
        let rec = Recorder::default();
        let mut led = led(&rec);
        // Active-low microswitch: low = closed.
        let stop = SimInput::new(false);
        let mut s = Shutter::with_pin(SimPin::new("shutter", rec.clone()), false)
            .unwrap()
            .with_end_stop(EndStop::new(stop.clone(), true, Duration::from_millis(50)));
        s.close().unwrap();
        led.set(LedPattern::Analysing).unwrap();
        let _t = s.open(&led).unwrap();
        stop.set(true); // the shutter moved away from the switch
                        // Something blocks the shutter: the switch never closes again.
        match s.close() {
            Err(HwError::NotClosed { waited_ms }) => assert!(waited_ms >= 50),
            other => panic!("expected NotClosed, got {other:?}"),
        }
        // Driven closed regardless.
        assert_eq!(rec.level("shutter"), Some(Level::Low));
        assert!(!s.is_open());
        stop.set(false);
        s.close().unwrap();
        // A shutter stuck open at start is refused at once.
        let stuck = SimInput::new(true);
        let mut s2 = Shutter::with_pin(SimPin::new("s2", rec), false).unwrap().with_end_stop(EndStop::new(
            stuck,
            true,
            Duration::from_millis(20),
        ));
        assert!(matches!(s2.close(), Err(HwError::NotClosed { .. })));
    }
}
