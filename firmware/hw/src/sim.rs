//! The simulated GPIO backend: pins that record every transition with a timestamp and
//! optionally print it. Used by the demo and the tests in place of board GPIO.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use embedded_hal::digital::{ErrorType, InputPin, OutputPin};
use embedded_hal::pwm::SetDutyCycle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Low,
    High,
    /// A PWM channel's duty cycle, out of `u16::MAX`.
    Duty(u16),
}

impl Level {
    fn word(self) -> String {
        match self {
            Level::Low => "low".into(),
            Level::High => "high".into(),
            Level::Duty(d) => format!("duty={d}"),
        }
    }
}

/// One recorded level change.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub pin: &'static str,
    pub level: Level,
    pub at_ms: u128,
}

/// Shared log of all simulated pins' transitions.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    log: Arc<Mutex<Vec<Transition>>>,
    echo: bool,
    /// Also appended here, one line per transition (`<ms> <pin> high|low`), so a test
    /// can read the pins of a process it has signalled or that panicked.
    trace: Option<Arc<Mutex<std::fs::File>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder { start: Instant::now(), log: Arc::default(), echo: false, trace: None }
    }
}

impl Recorder {
    /// A recorder that also prints each transition to stdout (the demo).
    pub fn printing() -> Self {
        Recorder { echo: true, ..Recorder::default() }
    }

    /// Appends every transition to `path` as well.
    pub fn tracing_to(mut self, path: &std::path::Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        self.trace = Some(Arc::new(Mutex::new(f)));
        Ok(self)
    }

    pub fn transitions(&self) -> Vec<Transition> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The last level a pin was driven to.
    pub fn level(&self, pin: &str) -> Option<Level> {
        self.transitions().iter().rev().find(|t| t.pin == pin).map(|t| t.level)
    }
}

impl Recorder {
    fn record(&self, pin: &'static str, level: Level) {
        let t = Transition { pin, level, at_ms: self.start.elapsed().as_millis() };
        if self.echo {
            println!("  gpio {pin:<8} -> {level:?}");
        }
        if let Some(trace) = &self.trace {
            use std::io::Write;
            // Whatever state the process is in (a panic, a signal), the line reaches
            // the kernel: one write per transition, no buffering.
            let line = format!("{} {} {}\n", t.at_ms, t.pin, level.word());
            let mut f = trace.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(line.as_bytes());
        }
        if let Ok(mut log) = self.log.lock() {
            log.push(t);
        }
    }
}

/// A simulated output pin.
pub struct SimPin {
    name: &'static str,
    rec: Recorder,
}

impl SimPin {
    pub fn new(name: &'static str, rec: Recorder) -> Self {
        SimPin { name, rec }
    }

    fn record(&mut self, level: Level) {
        self.rec.record(self.name, level);
    }
}

impl Clone for SimPin {
    /// Another handle on the same simulated line (the emergency path uses one).
    fn clone(&self) -> Self {
        SimPin { name: self.name, rec: self.rec.clone() }
    }
}

impl ErrorType for SimPin {
    type Error = Infallible;
}

impl OutputPin for SimPin {
    fn set_low(&mut self) -> Result<(), Infallible> {
        self.record(Level::Low);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Infallible> {
        self.record(Level::High);
        Ok(())
    }
}

/// A simulated input line; clones share the level, which a test sets.
#[derive(Clone, Default)]
pub struct SimInput(Arc<AtomicBool>);

impl SimInput {
    pub fn new(high: bool) -> Self {
        SimInput(Arc::new(AtomicBool::new(high)))
    }

    pub fn set(&self, high: bool) {
        self.0.store(high, Ordering::SeqCst);
    }
}

impl ErrorType for SimInput {
    type Error = Infallible;
}

impl InputPin for SimInput {
    fn is_high(&mut self) -> Result<bool, Infallible> {
        Ok(self.0.load(Ordering::SeqCst))
    }
    fn is_low(&mut self) -> Result<bool, Infallible> {
        Ok(!self.0.load(Ordering::SeqCst))
    }
}

/// A simulated PWM channel (a servo's), recording each duty cycle it is set to.
#[derive(Clone)]
pub struct SimPwm {
    name: &'static str,
    rec: Recorder,
}

impl SimPwm {
    pub fn new(name: &'static str, rec: Recorder) -> Self {
        SimPwm { name, rec }
    }
}

impl embedded_hal::pwm::ErrorType for SimPwm {
    type Error = Infallible;
}

impl SetDutyCycle for SimPwm {
    fn max_duty_cycle(&self) -> u16 {
        u16::MAX
    }
    fn set_duty_cycle(&mut self, duty: u16) -> Result<(), Infallible> {
        self.rec.record(self.name, Level::Duty(duty));
        Ok(())
    }
}

/// A token from simulated hardware, obtained the real way (LED to analysing, then the
/// shutter driver opens), for analysing photos offline: tests, evaluation, examples.
pub fn simulated_open() -> crate::ShutterOpen {
    let rec = Recorder::default();
    let mut led = crate::StatusLed::new(
        deskcam_core::board::LedKind::Single,
        vec![SimPin::new("led", rec.clone())],
        false,
    )
    .expect("sim pins cannot fail");
    led.set(deskcam_core::policy::LedPattern::Analysing).expect("sim pins cannot fail");
    let mut shutter =
        crate::Shutter::with_pin(SimPin::new("shutter", rec), false).expect("sim pins cannot fail");
    shutter.open(&led).expect("the LED shows analysing")
}
