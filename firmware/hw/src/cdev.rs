//! Linux GPIO character device backend (`/dev/gpiochipN`, uAPI v2) for any board:
//! one requested line per pin, labelled so `gpioinfo` and debugfs show who holds it.

use std::path::Path;
use std::sync::Arc;

use embedded_hal::digital::{ErrorType, InputPin, OutputPin};
use gpiocdev::line::{Bias, Value};
use gpiocdev::Request;

use crate::{HwError, PinError};

/// One line of a chip, requested as an output or an input.
pub struct CdevLine {
    req: Arc<Request>,
    offset: u32,
}

fn backend(chip: &Path, line: u32, consumer: &str, e: gpiocdev::Error) -> HwError {
    HwError::Backend {
        what: format!("GPIO {} line {line} ({consumer})", chip.display()),
        detail: format!("{e} (does the board config name the right chip and line, and is it free?)"),
    }
}

/// Requests `line` as an output driven to `high` from the first instant: the request
/// itself sets the level, so the line never shows anything else.
pub fn output(chip: &Path, line: u32, consumer: &str, high: bool) -> Result<CdevLine, HwError> {
    let value = if high { Value::Active } else { Value::Inactive };
    let req = Request::builder()
        .on_chip(chip)
        .with_consumer(consumer)
        .with_line(line)
        .as_output(value)
        .request()
        .map_err(|e| backend(chip, line, consumer, e))?;
    Ok(CdevLine { req: Arc::new(req), offset: line })
}

/// Requests `line` as an input, with a pull-up when the switch pulls it low (and a
/// pull-down otherwise) where the chip can bias lines.
pub fn input(chip: &Path, line: u32, consumer: &str, active_low: bool) -> Result<CdevLine, HwError> {
    let bias = if active_low { Bias::PullUp } else { Bias::PullDown };
    let request = |bias: Option<Bias>| {
        Request::builder()
            .on_chip(chip)
            .with_consumer(consumer)
            .with_line(line)
            .as_input()
            .with_bias(bias)
            .request()
    };
    // Some chips (QEMU's PL061) cannot bias: external resistors do the job there.
    let req = request(Some(bias)).or_else(|_| request(None)).map_err(|e| backend(chip, line, consumer, e))?;
    Ok(CdevLine { req: Arc::new(req), offset: line })
}

fn pin_error(e: gpiocdev::Error) -> PinError {
    PinError(e.to_string())
}

impl ErrorType for CdevLine {
    type Error = PinError;
}

impl OutputPin for CdevLine {
    fn set_low(&mut self) -> Result<(), PinError> {
        self.req.set_value(self.offset, Value::Inactive).map(|_| ()).map_err(pin_error)
    }
    fn set_high(&mut self) -> Result<(), PinError> {
        self.req.set_value(self.offset, Value::Active).map(|_| ()).map_err(pin_error)
    }
}

impl InputPin for CdevLine {
    fn is_high(&mut self) -> Result<bool, PinError> {
        self.req.value(self.offset).map(|v| v == Value::Active).map_err(pin_error)
    }
    fn is_low(&mut self) -> Result<bool, PinError> {
        self.is_high().map(|h| !h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Level;
    use std::path::PathBuf;

    #[test]
    fn a_missing_chip_names_the_chip_and_line() {
        let e = output(Path::new("/dev/gpiochip-none"), 4, "deskcam-shutter", false).err().unwrap();
        let text = e.to_string();
        assert!(text.contains("/dev/gpiochip-none line 4 (deskcam-shutter)"), "{text}");
    }

    /// Against a real chip: `DESKCAM_TEST_GPIOCHIP=/dev/gpiochip0 cargo test -- --ignored`
    /// (the arm64 VM test runs it on QEMU's PL061). Drives two lines, reads them back
    /// through a second request-free view (the line's own value) and through debugfs.
    #[test]
    #[ignore = "needs a GPIO chip: set DESKCAM_TEST_GPIOCHIP"]
    fn drives_and_reads_back_real_lines() {
        let chip = PathBuf::from(std::env::var("DESKCAM_TEST_GPIOCHIP").expect("DESKCAM_TEST_GPIOCHIP"));
        let mut shutter = output(&chip, 0, "deskcam-test-shutter", false).unwrap();
        let mut led = output(&chip, 1, "deskcam-test-led", true).unwrap();
        for (s, l) in [(true, false), (false, true), (true, true), (false, false)] {
            if s { shutter.set_high() } else { shutter.set_low() }.unwrap();
            if l { led.set_high() } else { led.set_low() }.unwrap();
            assert_eq!(shutter.is_high().unwrap(), s);
            assert_eq!(led.is_high().unwrap(), l);
            if let Ok(dbg) = std::fs::read_to_string("/sys/kernel/debug/gpio") {
                let lvl = |name: &str| {
                    let line = dbg.lines().find(|x| x.contains(name)).unwrap_or_default().to_string();
                    if line.contains(" hi") {
                        Level::High
                    } else {
                        Level::Low
                    }
                };
                assert_eq!(lvl("deskcam-test-shutter"), if s { Level::High } else { Level::Low }, "{dbg}");
                assert_eq!(lvl("deskcam-test-led"), if l { Level::High } else { Level::Low }, "{dbg}");
                // The VM test checks that this independent view was read.
                eprintln!("debugfs: {}", dbg.lines().filter(|x| x.contains("deskcam-test")).count());
            }
        }
        // A line already held is refused clearly.
        let e = output(&chip, 0, "deskcam-test-again", false).err().unwrap().to_string();
        assert!(e.contains("line 0"), "{e}");
    }
}
