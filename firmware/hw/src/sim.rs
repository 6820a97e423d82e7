//! The simulated GPIO backend: pins that record every transition with a timestamp and
//! optionally print it. Used by the demo and the tests in place of board GPIO.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use embedded_hal::digital::{ErrorType, OutputPin};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Low,
    High,
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
        let t = Transition { pin: self.name, level, at_ms: self.rec.start.elapsed().as_millis() };
        if self.rec.echo {
            println!("  gpio {:<8} -> {:?}", self.name, level);
        }
        if let Some(trace) = &self.rec.trace {
            use std::io::Write;
            // Whatever state the process is in (a panic, a signal), the line reaches
            // the kernel: one write per transition, no buffering.
            let line =
                format!("{} {} {}\n", t.at_ms, t.pin, if level == Level::High { "high" } else { "low" });
            let mut f = trace.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(line.as_bytes());
        }
        if let Ok(mut log) = self.rec.log.lock() {
            log.push(t);
        }
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

/// A token from simulated hardware, obtained the real way (LED to analysing, then the
/// shutter driver opens), for analysing photos offline: tests, evaluation, examples.
pub fn simulated_open() -> crate::ShutterOpen {
    let rec = Recorder::default();
    let mut led =
        crate::StatusLed::new(SimPin::new("led", rec.clone()), false).expect("sim pins cannot fail");
    led.set(deskcam_core::policy::LedPattern::Analysing).expect("sim pins cannot fail");
    let mut shutter = crate::Shutter::new(SimPin::new("shutter", rec), false).expect("sim pins cannot fail");
    shutter.open(&led).expect("the LED shows analysing")
}
