//! The device's shutter, LED and button as the daemon uses them, on the backend the
//! board config names (`rppal`, `gpiocdev`) or simulated (`sim` boards, the demo).
//!
//! Besides the drivers, the hardware hands out an emergency handle: other handles on
//! the same lines that drive them to the safe levels (shutter closed, then LED off) and
//! freeze them there, without going through the drivers, for the panic hook and the
//! stall guard. A panel thread advances the LED's blink patterns and samples the
//! button; presses reach the scan loop through a bounded queue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskcam_core::board::{Board, GpioBackend, LedKind, ShutterDrive};
use deskcam_core::policy::LedPattern;
use deskcam_hw::sim::{Level, Recorder, SimPin, SimPwm};
use deskcam_hw::{
    AnyInput, AnyOutput, AnyPwm, Button, EndStop, HwError, Press, Shared, Shutter, ShutterOpen, StatusLed,
};
use embedded_hal::digital::{ErrorType, InputPin, OutputPin};
use embedded_hal::pwm::SetDutyCycle;

/// Drives the safe levels from any thread, whatever the drivers' state.
pub type Emergency = Arc<dyn Fn() + Send + Sync>;

/// Environment variable: append every simulated pin transition to this file.
pub const SIM_TRACE_ENV: &str = "DESKCAM_SIM_TRACE";
/// Environment variable: the simulated button is held while this file exists.
pub const SIM_BUTTON_ENV: &str = "DESKCAM_SIM_BUTTON";
/// Environment variable: `stuck` makes the simulated end-stop report the shutter open
/// once it has opened (a jammed shutter), to exercise the fault path.
pub const SIM_END_STOP_ENV: &str = "DESKCAM_SIM_END_STOP";

/// How often the panel thread advances the LED and samples the button.
const PANEL_TICK: Duration = Duration::from_millis(10);
/// Button presses waiting for the scan loop; more are dropped and counted.
const PRESS_QUEUE: usize = 8;

#[derive(Clone)]
enum ShutterLine {
    /// `close`: the line that pulls the shutter closed, on two-line drives.
    Pin {
        line: Shared<AnyOutput>,
        close: Option<Shared<AnyOutput>>,
        active_low: bool,
    },
    Servo {
        pwm: Shared<AnyPwm>,
        open: f32,
        closed: f32,
    },
}

impl ShutterLine {
    fn drive_closed(&self) {
        match self {
            ShutterLine::Pin { line, close, active_low } => {
                line.freeze(|p| {
                    let _ = if *active_low { p.set_high() } else { p.set_low() };
                });
                if let Some(c) = close {
                    c.freeze(|p| {
                        let _ = if *active_low { p.set_low() } else { p.set_high() };
                    });
                }
            }
            ShutterLine::Servo { pwm, closed, .. } => pwm.freeze(|w| {
                let duty = (closed * f32::from(w.max_duty_cycle())).round() as u16;
                let _ = w.set_duty_cycle(duty);
            }),
        }
    }
}

/// The lines a backend hands over, each already at its safe level.
struct Lines {
    shutter: ShutterLine,
    led: Vec<Shared<AnyOutput>>,
    end_stop: Option<AnyInput>,
    button: Option<AnyInput>,
}

fn led_names(kind: LedKind) -> &'static [&'static str] {
    match kind {
        LedKind::Single => &["led"],
        LedKind::Bicolour => &["led-green", "led-red"],
        LedKind::Rgb => &["led-red", "led-green", "led-blue"],
    }
}

/// An input computed by a closure (the simulated end-stop and button).
struct FnInput<F>(F);

impl<F> ErrorType for FnInput<F> {
    type Error = std::convert::Infallible;
}

impl<F: FnMut() -> bool> InputPin for FnInput<F> {
    fn is_high(&mut self) -> Result<bool, Self::Error> {
        Ok((self.0)())
    }
    fn is_low(&mut self) -> Result<bool, Self::Error> {
        Ok(!(self.0)())
    }
}

/// What a board backend offers, by board line: outputs requested at a level (`true`:
/// high), inputs (`true`: the switch pulls the line low), and a PWM channel for a servo
/// (channel, period in ms, starting duty). `role` names the line in errors and labels.
#[cfg(any(feature = "gpiocdev", feature = "rppal"))]
struct Backend<'a> {
    output: &'a dyn Fn(u32, &'static str, bool) -> Result<AnyOutput, HwError>,
    input: &'a dyn Fn(u32, &'static str, bool) -> Result<AnyInput, HwError>,
    pwm: &'a dyn Fn(u8, f32, f32) -> Result<AnyPwm, HwError>,
}

/// The board's lines from a board backend (`sim_lines` builds the simulated ones), each
/// requested at its safe level: the shutter closed (a two-line drive: the closing side
/// active), then the LED off.
#[cfg(any(feature = "gpiocdev", feature = "rppal"))]
fn board_lines(board: &Board, b: Backend) -> Result<Lines, HwError> {
    let out = |line, role, high| (b.output)(line, role, high).map(Shared::new);
    let shutter = match &board.shutter {
        ShutterDrive::Pin { line, close_line, active_low } => ShutterLine::Pin {
            line: out(*line, "shutter", *active_low)?,
            close: close_line.map(|c| out(c, "shutter-close", !*active_low)).transpose()?,
            active_low: *active_low,
        },
        ShutterDrive::Servo { channel, period_ms, open_duty, closed_duty } => ShutterLine::Servo {
            pwm: Shared::new((b.pwm)(*channel, *period_ms, *closed_duty)?),
            open: *open_duty,
            closed: *closed_duty,
        },
    };
    let led = board
        .led_lines
        .iter()
        .zip(led_names(board.led_kind))
        .map(|(line, name)| out(*line, name, board.led_active_low))
        .collect::<Result<_, _>>()?;
    let end_stop = board.end_stop.map(|e| (b.input)(e.line, "end-stop", e.active_low)).transpose()?;
    let button = board.button.map(|e| (b.input)(e.line, "button", e.active_low)).transpose()?;
    Ok(Lines { shutter, led, end_stop, button })
}

fn sim_lines(board: &Board) -> Result<Lines, HwError> {
    let mut recorder = Recorder::default();
    if let Some(path) = std::env::var_os(SIM_TRACE_ENV) {
        recorder = recorder.tracing_to(std::path::Path::new(&path)).map_err(|e| HwError::Backend {
            what: "sim trace".into(),
            detail: format!("{}: {e}", path.to_string_lossy()),
        })?;
    }
    let led_off = board.led_active_low;
    let led = led_names(board.led_kind)
        .iter()
        .map(|name| {
            let mut p = SimPin::new(name, recorder.clone());
            let _ = if led_off { p.set_high() } else { p.set_low() };
            Shared::new(AnyOutput::new(p))
        })
        .collect();
    let (shutter, closed_level) = match &board.shutter {
        ShutterDrive::Pin { active_low, close_line, .. } => {
            let mut p = SimPin::new("shutter", recorder.clone());
            let _ = if *active_low { p.set_high() } else { p.set_low() };
            let level = if *active_low { Level::High } else { Level::Low };
            let close = close_line.map(|_| {
                let mut c = SimPin::new("shutter-close", recorder.clone());
                let _ = if *active_low { c.set_low() } else { c.set_high() };
                Shared::new(AnyOutput::new(c))
            });
            (ShutterLine::Pin { line: Shared::new(AnyOutput::new(p)), close, active_low: *active_low }, level)
        }
        ShutterDrive::Servo { open_duty, closed_duty, .. } => {
            let duty = (closed_duty * f32::from(u16::MAX)).round() as u16;
            let mut w = SimPwm::new("shutter", recorder.clone());
            let _ = w.set_duty_cycle(duty);
            let pwm = Shared::new(AnyPwm::new(w));
            (ShutterLine::Servo { pwm, open: *open_duty, closed: *closed_duty }, Level::Duty(duty))
        }
    };
    // The simulated end-stop follows the shutter line, unless told to jam.
    let end_stop = board.end_stop.map(|e| {
        let rec = recorder.clone();
        let stuck = std::env::var(SIM_END_STOP_ENV).is_ok_and(|v| v == "stuck");
        AnyInput::new(FnInput(move || {
            let closed = rec.level("shutter") == Some(closed_level);
            // Jammed: once it has opened, it never reaches the switch again.
            let jammed =
                stuck && rec.transitions().iter().any(|t| t.pin == "shutter" && t.level != closed_level);
            let made = closed && !jammed;
            made != e.active_low
        }))
    });
    let button = board.button.map(|b| {
        let file = std::env::var_os(SIM_BUTTON_ENV);
        AnyInput::new(FnInput(move || {
            let down = file.as_ref().is_some_and(|f| std::path::Path::new(f).exists());
            down != b.active_low
        }))
    });
    Ok(Lines { shutter, led, end_stop, button })
}

#[cfg(feature = "gpiocdev")]
fn cdev_lines(board: &Board) -> Result<Lines, HwError> {
    use deskcam_hw::cdev;
    let chip = board.chip.clone().ok_or_else(|| HwError::Backend {
        what: "gpio.chip".into(),
        detail: "the board config names no chip".into(),
    })?;
    // Labelled `deskcam-<role>`, as `gpioinfo` and debugfs show them.
    let output =
        |line, role, high| cdev::output(&chip, line, &format!("deskcam-{role}"), high).map(AnyOutput::new);
    let input = |line, role, active_low| {
        cdev::input(&chip, line, &format!("deskcam-{role}"), active_low).map(AnyInput::new)
    };
    // A servo's hardware PWM is the kernel's sysfs PWM, which rppal drives on any
    // kernel (its register access to the GPIO, not used here, needs /dev/gpiomem).
    #[cfg(feature = "rppal")]
    let pwm = |channel, period_ms, duty| deskcam_hw::rpi::pwm(channel, period_ms, duty).map(AnyPwm::new);
    #[cfg(not(feature = "rppal"))]
    let pwm =
        |_channel, _period_ms, _duty| -> Result<AnyPwm, HwError> { Err(not_built("rppal (sysfs PWM)")) };
    board_lines(board, Backend { output: &output, input: &input, pwm: &pwm })
}

#[cfg(feature = "rppal")]
fn rppal_lines(board: &Board) -> Result<Lines, HwError> {
    use deskcam_hw::rpi;
    let gpio = rpi::gpio()?;
    let bcm = |line: u32| u8::try_from(line).unwrap_or(u8::MAX);
    let output = |line, role, high| rpi::output(&gpio, bcm(line), role, high).map(AnyOutput::new);
    let input = |line, role, active_low| rpi::input(&gpio, bcm(line), role, active_low).map(AnyInput::new);
    let pwm = |channel, period_ms, duty| rpi::pwm(channel, period_ms, duty).map(AnyPwm::new);
    board_lines(board, Backend { output: &output, input: &input, pwm: &pwm })
}

#[cfg(not(all(feature = "gpiocdev", feature = "rppal")))]
fn not_built(backend: &str) -> HwError {
    HwError::Backend {
        what: format!("GPIO backend {backend}"),
        detail: format!("this build has no {backend} support (cargo feature `{backend}`)"),
    }
}

pub struct Hardware {
    // Declaration order is drop order: the panel thread stops first, then the shutter
    // closes, then the LED goes off.
    panel: Panel,
    shutter: Shutter,
    led: Arc<Mutex<StatusLed>>,
    presses: Receiver<Press>,
    echo: bool,
    emergency: Emergency,
    simulated: bool,
    /// The end-stop did not confirm the shutter closed at start.
    start_fault: Option<String>,
}

struct Panel {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl Drop for Panel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_panel(led: Arc<Mutex<StatusLed>>, mut button: Option<Button>, tx: SyncSender<Press>) -> Panel {
    let stop = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let (s, d) = (stop.clone(), dropped.clone());
    let thread = std::thread::Builder::new()
        .name("panel".into())
        .spawn(move || {
            let start = Instant::now();
            let mut reported = false;
            while !s.load(Ordering::SeqCst) {
                if let Err(e) = led.lock().unwrap_or_else(|p| p.into_inner()).tick() {
                    if !std::mem::replace(&mut reported, true) {
                        tracing::error!("LED: {e}");
                    }
                }
                if let Some(b) = button.as_mut() {
                    match b.poll(start.elapsed().as_millis() as u64) {
                        Ok(Some(p)) => {
                            if tx.try_send(p).is_err() {
                                d.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            if !std::mem::replace(&mut reported, true) {
                                tracing::error!("button: {e}");
                            }
                        }
                    }
                }
                std::thread::sleep(PANEL_TICK);
            }
        })
        .ok();
    Panel { stop, thread, dropped }
}

impl Hardware {
    /// The board's lines on its backend, or simulated ones of the same layout. Every
    /// line is requested at its safe level (shutter closed, LED off) before anything
    /// else; with an end-stop, the closed position is checked at once.
    pub fn open(board: &Board, simulate: bool, echo: bool) -> Result<Self, HwError> {
        let backend = if simulate { GpioBackend::Sim } else { board.backend };
        let lines = match backend {
            GpioBackend::Sim => sim_lines(board)?,
            #[cfg(feature = "gpiocdev")]
            GpioBackend::Gpiocdev => cdev_lines(board)?,
            #[cfg(not(feature = "gpiocdev"))]
            GpioBackend::Gpiocdev => return Err(not_built("gpiocdev")),
            #[cfg(feature = "rppal")]
            GpioBackend::Rppal => rppal_lines(board)?,
            #[cfg(not(feature = "rppal"))]
            GpioBackend::Rppal => return Err(not_built("rppal")),
        };
        let (shutter_line, led_lines) = (lines.shutter.clone(), lines.led.clone());
        let led_active_low = board.led_active_low;
        let emergency: Emergency = Arc::new(move || {
            shutter_line.drive_closed();
            for l in &led_lines {
                l.freeze(|p| {
                    let _ = if led_active_low { p.set_high() } else { p.set_low() };
                });
            }
        });
        let led = StatusLed::new(board.led_kind, lines.led, board.led_active_low)?;
        let mut shutter = match lines.shutter {
            ShutterLine::Pin { line, close: None, active_low } => Shutter::with_pin(line, active_low)?,
            ShutterLine::Pin { line, close: Some(c), active_low } => {
                Shutter::with_pin_pair(line, c, active_low)?
            }
            ShutterLine::Servo { pwm, open, closed } => Shutter::with_servo(pwm, open, closed)?,
        };
        let mut start_fault = None;
        if let (Some(pin), Some(e)) = (lines.end_stop, board.end_stop) {
            // A servo swings for a few hundred ms; a solenoid snaps.
            let settle = match board.shutter {
                ShutterDrive::Servo { .. } => Duration::from_millis(800),
                ShutterDrive::Pin { .. } => Duration::from_millis(200),
            };
            shutter = shutter.with_end_stop(EndStop::new(pin, e.active_low, settle));
            if let Err(e) = shutter.close() {
                start_fault = Some(e.to_string());
            }
        }
        let button = lines.button.zip(board.button).map(|(pin, b)| Button::new(pin, b.active_low));
        let led = Arc::new(Mutex::new(led));
        let (tx, presses) = std::sync::mpsc::sync_channel(PRESS_QUEUE);
        let panel = spawn_panel(led.clone(), button, tx);
        Ok(Hardware {
            panel,
            shutter,
            led,
            presses,
            echo,
            emergency,
            simulated: backend == GpioBackend::Sim,
            start_fault,
        })
    }

    pub fn emergency(&self) -> Emergency {
        self.emergency.clone()
    }

    /// Whether the lines are simulated (no physical shutter or LED moves).
    pub fn simulated(&self) -> bool {
        self.simulated
    }

    /// The end-stop's complaint at start, if the shutter did not confirm closed.
    pub fn start_fault(&self) -> Option<&str> {
        self.start_fault.as_deref()
    }

    /// Button presses since the last call.
    pub fn presses(&self) -> Vec<Press> {
        self.presses.try_iter().collect()
    }

    /// Counts presses dropped because the scan loop did not take them in time.
    pub fn press_drops(&self) -> Arc<AtomicU64> {
        self.panel.dropped.clone()
    }

    fn led(&self) -> std::sync::MutexGuard<'_, StatusLed> {
        self.led.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_led(&mut self, p: LedPattern) -> Result<(), HwError> {
        let changed = {
            let mut led = self.led();
            let changed = led.pattern() != p;
            led.set(p)?;
            changed
        };
        if changed {
            self.say(&format!("LED {}", led_name(p)));
        }
        Ok(())
    }

    pub fn open_shutter(&mut self) -> Result<ShutterOpen, HwError> {
        let token = {
            let led = self.led.lock().unwrap_or_else(|p| p.into_inner());
            self.shutter.open(&led)?
        };
        self.say("shutter open");
        Ok(token)
    }

    /// Drives the shutter closed; with an end-stop, [`HwError::NotClosed`] if it does
    /// not confirm.
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
        let closed = self.close_shutter();
        self.set_led(LedPattern::Off)?;
        closed
    }

    fn say(&self, what: &str) {
        if self.echo {
            println!("      gpio: {what}");
        } else {
            tracing::debug!("gpio: {what}");
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
        LedPattern::OnCall => "on-call",
    }
}
