//! Board configs (`board-configs/<board>.toml`): which GPIO backend drives the shutter,
//! the LED and the button, on which lines and with which polarity; the camera device and
//! formats; the model's input size, threads and form; whether the board can be a USB
//! device. Parsed and checked here (pure), so every file is validated by a unit test and
//! a wrong or duplicate pin is an error naming the key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{ConfigError, ConfigErrors};

/// How pins are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpioBackend {
    /// Raspberry Pi GPIO (BCM numbers) and hardware PWM, through `rppal`.
    Rppal,
    /// Any Linux board: a GPIO character device (`chip` + line offsets).
    Gpiocdev,
    /// Simulated pins that record every transition (demo, tests).
    Sim,
}

/// What moves the privacy shutter.
#[derive(Clone, Debug, PartialEq)]
pub enum ShutterDrive {
    /// A solenoid or motor driver on one output line (active = open), or on two: `line`
    /// pulls it open and `close_line` pulls it closed (an H-bridge's inputs, a bistable
    /// solenoid's coils), exactly one active at a time.
    Pin { line: u32, close_line: Option<u32>, active_low: bool },
    /// A hobby servo on a hardware PWM channel; duty cycles as fractions of the period.
    Servo { channel: u8, period_ms: f32, open_duty: f32, closed_duty: f32 },
}

/// An input line (button, end-stop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputLine {
    pub line: u32,
    /// Pressed / reached reads low (a pull-up and a switch to ground).
    pub active_low: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedKind {
    Single,
    /// Two LEDs in one package (e.g. green + red).
    Bicolour,
    Rgb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelForm {
    Onnx,
    Nnef,
}

/// Which of the committed models a board runs (`model.precision`): the int8 model pays
/// off only where tract has integer dot-product kernels (Cortex-A76 and later; measured
/// in models/MODEL_CARD.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelPrecision {
    Fp32,
    Int8,
}

/// A validated board config.
#[derive(Clone, Debug, PartialEq)]
pub struct Board {
    pub name: String,
    pub description: String,
    pub backend: GpioBackend,
    /// `gpiocdev`: the character device, e.g. `/dev/gpiochip0`.
    pub chip: Option<PathBuf>,
    pub shutter: ShutterDrive,
    /// Confirms that the shutter is closed, where fitted.
    pub end_stop: Option<InputLine>,
    pub led_kind: LedKind,
    pub led_lines: Vec<u32>,
    pub led_active_low: bool,
    pub button: Option<InputLine>,
    pub camera_device: PathBuf,
    pub camera_formats: Vec<String>,
    pub model_input_size: u32,
    pub model_threads: u32,
    pub model_form: ModelForm,
    pub model_precision: ModelPrecision,
    /// The board has a USB device controller (it can be the PC's webcam).
    pub usb_device: bool,
    /// How `scripts/build-image` makes the SD image; `None`: the board has no image.
    pub image: Option<ImageSpec>,
}

/// The SD image of a board (`[image]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSpec {
    pub boot: BootKind,
    /// Device trees the firmware may load (file names from Debian's kernel package).
    pub dtbs: Vec<String>,
    /// Lines of the Raspberry Pi firmware's `config.txt`: the camera, and the PWM and
    /// USB device overlays that the shutter and the USB port above need (checked).
    pub config_txt: Vec<String>,
    /// Debian's mosquitto on the device (the fleet broker is elsewhere by default).
    pub local_broker: bool,
    /// Kernel modules loaded at boot (a camera driver that is not probed by itself).
    pub modules: Vec<String>,
    /// Kernel modules never loaded (a driver that would claim one of the lines above).
    pub blacklist: Vec<String>,
    /// Debian packages beyond the common set (the VM test board's camera tools).
    pub packages: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootKind {
    /// The Raspberry Pi firmware (`raspi-firmware`) loads the kernel from the boot
    /// partition, configured by `config.txt` and `cmdline.txt`.
    Raspi,
    /// A boot loader outside the card (QEMU's `-kernel`) takes the kernel and initrd
    /// from the boot partition.
    External,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    description: String,
    gpio: RawGpio,
    shutter: RawShutter,
    led: RawLed,
    button: Option<RawInput>,
    camera: RawCamera,
    model: RawModel,
    usb: RawUsb,
    image: Option<RawImage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    boot: String,
    #[serde(default)]
    dtbs: Vec<String>,
    #[serde(default)]
    config_txt: Vec<String>,
    #[serde(default)]
    local_broker: bool,
    #[serde(default)]
    modules: Vec<String>,
    #[serde(default)]
    blacklist: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpio {
    backend: String,
    chip: Option<String>,
    /// Lines the board offers; a pin outside is an error.
    lines: u32,
    /// Lines that must not be used (e.g. a line wired to something else).
    #[serde(default)]
    reserved: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutter {
    drive: String,
    line: Option<u32>,
    close_line: Option<u32>,
    #[serde(default)]
    active_low: bool,
    pwm_channel: Option<u8>,
    /// Lines the PWM channel occupies (so no other pin takes them).
    pwm_line: Option<u32>,
    period_ms: Option<f32>,
    open_duty: Option<f32>,
    closed_duty: Option<f32>,
    end_stop: Option<RawInput>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    line: u32,
    #[serde(default)]
    active_low: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLed {
    kind: String,
    lines: Vec<u32>,
    #[serde(default)]
    active_low: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCamera {
    device: String,
    formats: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    input_size: u32,
    threads: u32,
    form: String,
    /// `fp32` when absent.
    precision: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsb {
    device_controller: bool,
}

impl Board {
    /// Parses and validates `board-configs/<name>.toml`; every problem with its key.
    pub fn from_toml(file_name: &str, text: &str) -> Result<Board, ConfigErrors> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let key = e.span().map(|s| text[..s.start].lines().count().to_string()).unwrap_or_default();
            ConfigErrors(vec![ConfigError { key: format!("line {key}"), reason: e.message().to_string() }])
        })?;
        let mut errors = Vec::new();
        let mut err = |key: &str, reason: String| errors.push(ConfigError { key: key.into(), reason });
        if raw.name != file_name {
            err("name", format!("'{}' does not match the file name '{file_name}'", raw.name));
        }
        let backend = match raw.gpio.backend.as_str() {
            "rppal" => GpioBackend::Rppal,
            "gpiocdev" => GpioBackend::Gpiocdev,
            "sim" => GpioBackend::Sim,
            other => {
                err("gpio.backend", format!("'{other}' is not one of rppal, gpiocdev, sim"));
                GpioBackend::Sim
            }
        };
        let chip = raw.gpio.chip.map(PathBuf::from);
        if backend == GpioBackend::Gpiocdev && chip.is_none() {
            err("gpio.chip", "gpiocdev needs the chip, e.g. \"/dev/gpiochip0\"".into());
        }

        // Every line with the key that claims it: out of range and duplicates are errors.
        let mut claims: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let mut claim = |line: u32, key: &str| claims.entry(line).or_default().push(key.to_string());
        let shutter = match raw.shutter.drive.as_str() {
            "pin" => match raw.shutter.line {
                Some(line) => {
                    claim(line, "shutter.line");
                    let close_line = raw.shutter.close_line;
                    if let Some(c) = close_line {
                        claim(c, "shutter.close_line");
                    }
                    ShutterDrive::Pin { line, close_line, active_low: raw.shutter.active_low }
                }
                None => {
                    err("shutter.line", "drive = \"pin\" needs the output line".into());
                    ShutterDrive::Pin { line: 0, close_line: None, active_low: false }
                }
            },
            "servo" => {
                let s = &raw.shutter;
                if let Some(l) = s.pwm_line {
                    claim(l, "shutter.pwm_line");
                }
                let (Some(channel), Some(open), Some(closed)) = (s.pwm_channel, s.open_duty, s.closed_duty)
                else {
                    err("shutter", "drive = \"servo\" needs pwm_channel, open_duty and closed_duty".into());
                    return Err(ConfigErrors(errors));
                };
                for (key, d) in [("shutter.open_duty", open), ("shutter.closed_duty", closed)] {
                    if !(0.0..=1.0).contains(&d) {
                        err(key, format!("{d} is not a fraction of the period (0..1)"));
                    }
                }
                if (open - closed).abs() < 0.01 {
                    err("shutter.open_duty", "open and closed positions are the same".into());
                }
                let period_ms = s.period_ms.unwrap_or(20.0);
                if !(1.0..=100.0).contains(&period_ms) {
                    err("shutter.period_ms", format!("{period_ms} is outside 1..100"));
                }
                ShutterDrive::Servo { channel, period_ms, open_duty: open, closed_duty: closed }
            }
            other => {
                err("shutter.drive", format!("'{other}' is not one of pin, servo"));
                ShutterDrive::Pin { line: 0, close_line: None, active_low: false }
            }
        };
        let end_stop = raw.shutter.end_stop.map(|e| {
            claim(e.line, "shutter.end_stop.line");
            InputLine { line: e.line, active_low: e.active_low }
        });
        let (led_kind, want) = match raw.led.kind.as_str() {
            "single" => (LedKind::Single, 1),
            "bicolour" => (LedKind::Bicolour, 2),
            "rgb" => (LedKind::Rgb, 3),
            other => {
                err("led.kind", format!("'{other}' is not one of single, bicolour, rgb"));
                (LedKind::Single, 1)
            }
        };
        if raw.led.lines.len() != want {
            err(
                "led.lines",
                format!("a {} LED has {want} line(s), not {}", raw.led.kind, raw.led.lines.len()),
            );
        }
        for (i, l) in raw.led.lines.iter().enumerate() {
            claim(*l, &format!("led.lines[{i}]"));
        }
        let button = raw.button.map(|b| {
            claim(b.line, "button.line");
            InputLine { line: b.line, active_low: b.active_low }
        });
        for (line, keys) in &claims {
            if *line >= raw.gpio.lines {
                err(
                    &keys[0],
                    format!("line {line} does not exist (the board has 0..{})", raw.gpio.lines - 1),
                );
            }
            if raw.gpio.reserved.contains(line) {
                err(&keys[0], format!("line {line} is reserved on this board"));
            }
            if keys.len() > 1 {
                err(&keys[1], format!("line {line} is already used by {}", keys[0]));
            }
        }

        if !raw.camera.device.starts_with("/dev/video") {
            err("camera.device", format!("'{}' is not a /dev/videoN device", raw.camera.device));
        }
        for f in &raw.camera.formats {
            if !matches!(f.as_str(), "MJPG" | "YUYV") {
                err("camera.formats", format!("'{f}' is not one of MJPG, YUYV"));
            }
        }
        if raw.camera.formats.is_empty() {
            err("camera.formats", "at least one format".into());
        }
        let m = &raw.model;
        if !(160..=640).contains(&m.input_size) || !m.input_size.is_multiple_of(32) {
            err("model.input_size", format!("{} is not a multiple of 32 in 160..640", m.input_size));
        }
        if !(1..=8).contains(&m.threads) {
            err("model.threads", format!("{} is outside 1..8", m.threads));
        }
        let model_form = match m.form.as_str() {
            "onnx" => ModelForm::Onnx,
            "nnef" => ModelForm::Nnef,
            other => {
                err("model.form", format!("'{other}' is not one of onnx, nnef"));
                ModelForm::Onnx
            }
        };
        let model_precision = match m.precision.as_deref().unwrap_or("fp32") {
            "fp32" => ModelPrecision::Fp32,
            "int8" => ModelPrecision::Int8,
            other => {
                err("model.precision", format!("'{other}' is not one of fp32, int8"));
                ModelPrecision::Fp32
            }
        };
        let image = raw.image.map(|i| {
            let boot = match i.boot.as_str() {
                "raspi" => BootKind::Raspi,
                "external" => BootKind::External,
                other => {
                    err("image.boot", format!("'{other}' is not one of raspi, external"));
                    BootKind::External
                }
            };
            let has = |prefix: &str, parts: &[&str]| {
                i.config_txt.iter().any(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)))
            };
            match boot {
                BootKind::Raspi => {
                    if i.dtbs.is_empty() {
                        err("image.dtbs", "the Raspberry Pi firmware needs the board's device tree".into());
                    }
                    // What the hardware above needs from the firmware: the servo's PWM
                    // pin, the USB port in device mode.
                    if let (ShutterDrive::Servo { .. }, Some(pin)) = (&shutter, raw.shutter.pwm_line) {
                        let pin = format!("pin={pin}");
                        if !has("dtoverlay=pwm", &[pin.as_str()]) {
                            err(
                                "image.config_txt",
                                format!("the servo shutter needs a dtoverlay=pwm line with {pin}"),
                            );
                        }
                    }
                    if raw.usb.device_controller && !has("dtoverlay=dwc2", &["dr_mode=peripheral"]) {
                        err(
                            "image.config_txt",
                            "usb.device_controller needs dtoverlay=dwc2,dr_mode=peripheral".into(),
                        );
                    }
                }
                BootKind::External => {
                    if !i.config_txt.is_empty() {
                        err("image.config_txt", "only the Raspberry Pi firmware reads config.txt".into());
                    }
                }
            }
            for p in i.packages.iter().filter(|p| {
                p.is_empty()
                    || !p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
            }) {
                err("image.packages", format!("'{p}' is not a Debian package name"));
            }
            for (key, list) in [("image.modules", &i.modules), ("image.blacklist", &i.blacklist)] {
                for m in list.iter().filter(|m| {
                    m.is_empty() || !m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                }) {
                    err(key, format!("'{m}' is not a kernel module name"));
                }
            }
            ImageSpec {
                boot,
                dtbs: i.dtbs,
                config_txt: i.config_txt,
                local_broker: i.local_broker,
                modules: i.modules,
                blacklist: i.blacklist,
                packages: i.packages,
            }
        });
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Board {
            name: raw.name,
            description: raw.description,
            backend,
            chip,
            shutter,
            end_stop,
            led_kind,
            led_lines: raw.led.lines,
            led_active_low: raw.led.active_low,
            button,
            camera_device: PathBuf::from(raw.camera.device),
            camera_formats: raw.camera.formats,
            model_input_size: m.input_size,
            model_threads: m.threads,
            model_form,
            model_precision,
            usb_device: raw.usb.device_controller,
            image,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board_dir() -> PathBuf {
        // The runtime package directory: a reused build may name another checkout.
        let package =
            std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
        PathBuf::from(package).join("../../board-configs")
    }

    #[test]
    fn every_board_config_in_the_repository_is_valid() {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(board_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let board = Board::from_toml(&name, &text).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
            assert!(!board.description.is_empty());
            names.push(name);
        }
        names.sort();
        assert_eq!(names, ["cm4", "qemu-virt", "rpi0-2w-64", "rpi4-64", "rpi5", "sim"]);
    }

    #[test]
    fn wrong_and_duplicate_pins_are_named() {
        let text = std::fs::read_to_string(board_dir().join("qemu-virt.toml")).unwrap();
        let dup = text.replace("lines = [1]", "lines = [0]");
        assert_ne!(dup, text, "the fixture has a single LED on line 1");
        let e = Board::from_toml("qemu-virt", &dup).unwrap_err().to_string();
        assert!(e.contains("led.lines[0]") && e.contains("line 0 is already used by shutter.line"), "{e}");
        let far = text.replace("lines = [1]", "lines = [40]");
        let e = Board::from_toml("qemu-virt", &far).unwrap_err().to_string();
        assert!(e.contains("line 40 does not exist"), "{e}");
        let bad = text
            .replace("kind = \"single\"", "kind = \"rgb\"")
            .replace("form = \"nnef\"", "form = \"tflite\"")
            .replace("precision = \"int8\"", "precision = \"int4\"");
        let e = Board::from_toml("qemu-virt", &bad).unwrap_err().to_string();
        assert!(e.contains("led.lines") && e.contains("model.form") && e.contains("model.precision"), "{e}");
        let e = Board::from_toml("rpi5", &text).unwrap_err().to_string();
        assert!(e.contains("does not match the file name"), "{e}");
        assert!(Board::from_toml("qemu-virt", "name = 1").is_err());
    }

    #[test]
    fn the_image_enables_what_the_board_uses() {
        let text = std::fs::read_to_string(board_dir().join("rpi4-64.toml")).unwrap();
        let board = Board::from_toml("rpi4-64", &text).unwrap();
        let image = board.image.expect("rpi4-64 has an image");
        assert_eq!(image.boot, BootKind::Raspi);
        assert!(!image.local_broker);
        let no_pwm: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("\"dtoverlay=pwm"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = Board::from_toml("rpi4-64", &no_pwm).unwrap_err().to_string();
        assert!(e.contains("image.config_txt") && e.contains("pin=18"), "{e}");
        let no_usb: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("\"dtoverlay=dwc2"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = Board::from_toml("rpi4-64", &no_usb).unwrap_err().to_string();
        assert!(e.contains("dr_mode=peripheral"), "{e}");
        let qemu = std::fs::read_to_string(board_dir().join("qemu-virt.toml")).unwrap();
        let image = Board::from_toml("qemu-virt", &qemu).unwrap().image.unwrap();
        assert_eq!(image.boot, BootKind::External);
        assert!(image.local_broker, "the VM test talks to a broker in the guest");
        assert_eq!(image.modules, ["vivid", "usbip_vudc"]);
        assert_eq!(image.blacklist, ["gpio_keys"], "the kernel must leave the button's line alone");
        let bad = qemu.replace(
            "modules = [\"vivid\", \"usbip_vudc\"]",
            "modules = [\"vivid; reboot\", \"usbip_vudc\"]",
        );
        let e = Board::from_toml("qemu-virt", &bad).unwrap_err().to_string();
        assert!(e.contains("image.modules"), "{e}");
    }
}
