//! The device's shutter and LED as the daemon uses them. Only the simulated backend
//! exists so far; board backends (rppal, GPIO character device) plug in here.

use deskcam_core::policy::LedPattern;
use deskcam_hw::sim::{Recorder, SimPin};
use deskcam_hw::{HwError, Shutter, ShutterOpen, StatusLed};

pub struct Hardware {
    // Declaration order is drop order: the shutter closes before the LED goes off.
    shutter: Shutter<SimPin>,
    led: StatusLed<SimPin>,
    echo: bool,
}

impl Hardware {
    /// Simulated GPIO. Creating it drives the safe state: shutter closed, LED off.
    pub fn simulated(echo: bool) -> Result<Self, HwError> {
        let recorder = Recorder::default();
        // LED first, shutter second: both end in their safe state before anything runs.
        let led = StatusLed::new(SimPin::new("led", recorder.clone()), false)?;
        let shutter = Shutter::new(SimPin::new("shutter", recorder.clone()), false)?;
        Ok(Hardware { led, shutter, echo })
    }

    pub fn set_led(&mut self, p: LedPattern) -> Result<(), HwError> {
        let changed = self.led.pattern() != p;
        self.led.set(p)?;
        if changed {
            self.say(&format!("LED {}", led_name(p)));
        }
        Ok(())
    }

    pub fn open_shutter(&mut self) -> Result<ShutterOpen, HwError> {
        let token = self.shutter.open(&self.led)?;
        self.say("shutter open");
        Ok(token)
    }

    pub fn close_shutter(&mut self) -> Result<(), HwError> {
        let changed = self.shutter.is_open();
        self.shutter.close()?;
        if changed {
            self.say("shutter closed");
        }
        Ok(())
    }

    /// Closes the shutter, then turns the LED off: the order the design requires.
    pub fn safe_state(&mut self) -> Result<(), HwError> {
        self.close_shutter()?;
        self.set_led(LedPattern::Off)
    }

    fn say(&self, what: &str) {
        if self.echo {
            println!("      gpio(sim): {what}");
        } else {
            tracing::debug!("gpio(sim): {what}");
        }
    }
}

pub fn led_name(p: LedPattern) -> &'static str {
    match p {
        LedPattern::Off => "off",
        LedPattern::Analysing => "analysing",
        LedPattern::PreWarning => "pre-warning",
        LedPattern::Break => "break",
        LedPattern::Fault => "fault",
        LedPattern::Identify => "identify",
    }
}
