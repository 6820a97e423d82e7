//! The device's shutter and LED as the daemon uses them. Only the simulated backend
//! exists so far; board backends (rppal, GPIO character device) plug in here.
//!
//! Besides the drivers, the hardware hands out an emergency handle: other handles on
//! the same lines that drive them to the safe levels (shutter closed, then LED off)
//! without going through the drivers, for the panic hook and the stall guard.

use std::sync::{Arc, Mutex};

use deskcam_core::policy::LedPattern;
use deskcam_hw::sim::{Recorder, SimPin};
use deskcam_hw::{HwError, Shutter, ShutterOpen, StatusLed};
use embedded_hal::digital::OutputPin;

/// Drives the safe levels from any thread, whatever the drivers' state.
pub type Emergency = Arc<dyn Fn() + Send + Sync>;

/// Environment variable: append every simulated pin transition to this file.
pub const SIM_TRACE_ENV: &str = "DESKCAM_SIM_TRACE";

pub struct Hardware {
    // Declaration order is drop order: the shutter closes before the LED goes off.
    shutter: Shutter<SimPin>,
    led: StatusLed<SimPin>,
    echo: bool,
    emergency: Emergency,
}

impl Hardware {
    /// Simulated GPIO. Creating it drives the safe state: shutter closed, LED off.
    pub fn simulated(echo: bool) -> Result<Self, HwError> {
        let mut recorder = Recorder::default();
        if let Some(path) = std::env::var_os(SIM_TRACE_ENV) {
            recorder = recorder.tracing_to(std::path::Path::new(&path)).map_err(|e| HwError::Pin {
                what: "sim trace",
                detail: format!("{}: {e}", path.to_string_lossy()),
            })?;
        }
        let (led_pin, shutter_pin) = (SimPin::new("led", recorder.clone()), SimPin::new("shutter", recorder));
        let spare = Mutex::new((shutter_pin.clone(), led_pin.clone()));
        // Active-high lines: low is closed and off.
        let emergency: Emergency = Arc::new(move || {
            let mut pins = spare.lock().unwrap_or_else(|p| p.into_inner());
            let _ = pins.0.set_low();
            let _ = pins.1.set_low();
        });
        // LED first, shutter second: both end in their safe state before anything runs.
        let led = StatusLed::new(led_pin, false)?;
        let shutter = Shutter::new(shutter_pin, false)?;
        Ok(Hardware { led, shutter, echo, emergency })
    }

    pub fn emergency(&self) -> Emergency {
        self.emergency.clone()
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
