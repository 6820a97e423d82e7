//! The composite USB gadget (UVC webcam + CDC NCM network), made through configfs by
//! the `usb-gadget` crate, and what the streaming program needs to know of it once bound:
//! the V4L2 node of the UVC function, its interface numbers, the descriptor indexes of
//! its formats and frames.

use std::path::{Path, PathBuf};

use usb_gadget::function::net::{Net, NetClass};
use usb_gadget::function::video::{Format, Uvc, UvcFrame};
use usb_gadget::{Class, Config, Gadget, Id, Strings};

use crate::uvc::{FormatDesc, FrameSize, Interfaces, Pixel};
use crate::UsbError;

/// The streaming endpoint's bytes per microframe: 3 × 1024 (high-bandwidth isochronous,
/// 24 MB/s at high speed, enough for YUYV 640×480 at 30 fps).
pub const MAX_PACKET: u32 = 3072;

/// What the gadget is to the PC.
#[derive(Clone, Debug, PartialEq)]
pub struct GadgetSpec {
    pub vendor_id: u16,
    pub product_id: u16,
    pub manufacturer: String,
    pub product: String,
    /// The serial number: the device id.
    pub serial: String,
    /// Formats in the order they are offered, each with its frame sizes and rates.
    pub formats: Vec<(Pixel, Vec<FrameOffer>)>,
}

/// One frame size and the frame rates offered at it (fastest first).
#[derive(Clone, Debug, PartialEq)]
pub struct FrameOffer {
    pub width: u32,
    pub height: u32,
    pub fps: Vec<u32>,
}

/// 100 ns units.
pub fn interval_of(fps: u32) -> u32 {
    10_000_000 / fps.max(1)
}

/// The name of our gadget in configfs (`/sys/kernel/config/usb_gadget/deskcam`).
pub const GADGET_NAME: &str = "deskcam";

/// What the streaming program needs to know of the bound gadget.
#[derive(Clone, Debug, PartialEq)]
pub struct GadgetInfo {
    pub udc: String,
    /// The V4L2 output node of the UVC function.
    pub video_node: PathBuf,
    pub interfaces: Interfaces,
    pub formats: Vec<FormatDesc>,
    /// The network interface on the box's side of the USB link (`usb0`).
    pub net_ifname: String,
}

fn gadget_dir() -> PathBuf {
    Path::new("/sys/kernel/config/usb_gadget").join(GADGET_NAME)
}

/// Two locally administered MAC addresses for the link, stable per device id (so the PC
/// keeps seeing the same adapter and keeps its settings for it).
pub fn link_macs(serial: &str) -> ([u8; 6], [u8; 6]) {
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in serial.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    let dev = [0x02, b[0], b[1], b[2], b[3], b[4] & 0xfe];
    let host = [0x02, b[0], b[1], b[2], b[3], b[4] | 0x01];
    (dev, host)
}

/// Makes the gadget and binds it to the first USB device controller (a board has one),
/// replacing one left from before; [`UsbError::NoController`] if the kernel shows none.
/// It stays in configfs after this process ends (it needs root; the daemon, without
/// root, serves it); [`remove`] takes it away. The UVC function stays disconnected
/// until a program subscribes to its events.
pub fn bind(spec: &GadgetSpec) -> Result<String, UsbError> {
    remove()?;
    let udc = usb_gadget::udcs()
        .map_err(|e| UsbError::Gadget(format!("listing USB device controllers: {e}")))?
        .into_iter()
        .next()
        .ok_or(UsbError::NoController)?;
    let mut builder = Uvc::builder();
    for (pixel, frames) in &spec.formats {
        let format = match pixel {
            Pixel::Mjpeg => Format::Mjpeg,
            Pixel::Yuyv => Format::Yuyv,
        };
        for f in frames {
            builder.add_frame(UvcFrame::new(
                f.width,
                f.height,
                format,
                f.fps.iter().map(|r| interval_of(*r)),
            ));
        }
    }
    builder.streaming_max_packet = Some(MAX_PACKET);
    // No camera-terminal or processing-unit control is exposed: the PC asks for none.
    builder.processing_controls = Some(0);
    builder.camera_controls = Some(0);
    builder.function_name = Some(spec.product.clone());
    let (_uvc, uvc_handle) = builder.build();
    let (dev_mac, host_mac) = link_macs(&spec.serial);
    let mut net = Net::builder(NetClass::Ncm);
    net.dev_addr = Some(dev_mac.into());
    net.host_addr = Some(host_mac.into());
    let (_net, net_handle) = net.build();
    let mut gadget = Gadget::new(
        Class::MISCELLANEOUS_IAD,
        Id::new(spec.vendor_id, spec.product_id),
        Strings::new(&spec.manufacturer, &spec.product, &spec.serial),
    )
    .with_config(Config::new("webcam and link").with_function(uvc_handle).with_function(net_handle));
    gadget.name = Some(GADGET_NAME.into());
    let name = udc.name().to_string_lossy().into_owned();
    let mut reg = gadget.bind(&udc).map_err(|e| UsbError::Gadget(format!("binding to {name}: {e}")))?;
    reg.detach();
    Ok(name)
}

/// Removes our gadget if it is there.
pub fn remove() -> Result<(), UsbError> {
    let gadgets = match usb_gadget::registered() {
        Ok(g) => g,
        // No configfs or no libcomposite: there is nothing to remove.
        Err(_) => return Ok(()),
    };
    for g in gadgets {
        if g.name() == GADGET_NAME {
            g.remove().map_err(|e| UsbError::Gadget(format!("removing the gadget: {e}")))?;
        } else {
            let mut g = g;
            g.detach(); // not ours: left as it is
        }
    }
    Ok(())
}

/// Reads back what the kernel made of our bound gadget.
pub fn describe(spec: &GadgetSpec) -> Result<GadgetInfo, UsbError> {
    let dir = gadget_dir();
    let udc = std::fs::read_to_string(dir.join("UDC"))
        .map_err(|_| {
            UsbError::Gadget(format!("no gadget at {} (run `deskcam usb up` as root first)", dir.display()))
        })?
        .trim()
        .to_string();
    if udc.is_empty() {
        return Err(UsbError::Gadget(format!("{} is not bound to a controller", dir.display())));
    }
    let uvc = function_dir(&dir, "uvc.")?;
    let interfaces = Interfaces {
        control: read_number(&uvc.join("control/bInterfaceNumber"))?,
        streaming: read_number(&uvc.join("streaming/bInterfaceNumber"))?,
    };
    let formats = descriptor_indexes(&uvc, spec)?;
    let video_node = video_node_of(&udc)?;
    let net_ifname = function_dir(&dir, "ncm.")
        .and_then(|d| {
            std::fs::read_to_string(d.join("ifname"))
                .map_err(|e| UsbError::Gadget(format!("ncm ifname: {e}")))
        })
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Ok(GadgetInfo { udc, video_node, interfaces, formats, net_ifname })
}

fn function_dir(gadget: &Path, prefix: &str) -> Result<PathBuf, UsbError> {
    let functions = gadget.join("functions");
    std::fs::read_dir(&functions)
        .map_err(|e| UsbError::Gadget(format!("{}: {e}", functions.display())))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .ok_or_else(|| UsbError::Gadget(format!("no {prefix}* function in {}", functions.display())))
}

/// The formats the webcam offers: what the board's camera delivers (its config's
/// `camera.formats`) of MJPEG (1280×720 and 640×480) and YUYV (640×480; more would not
/// fit a high-speed link uncompressed), at 30 and 15 frames a second.
pub fn offers(camera_formats: &[String]) -> Vec<(Pixel, Vec<FrameOffer>)> {
    let has = |f: &str| camera_formats.iter().any(|c| c.eq_ignore_ascii_case(f));
    let at = |width, height| FrameOffer { width, height, fps: vec![30, 15] };
    let mut out = Vec::new();
    if has("MJPG") {
        out.push((Pixel::Mjpeg, vec![at(1280, 720), at(640, 480)]));
    }
    if has("YUYV") {
        out.push((Pixel::Yuyv, vec![at(640, 480)]));
    }
    out
}

fn read_number(path: &Path) -> Result<u8, UsbError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| UsbError::Gadget(format!("{}: {e}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| UsbError::Gadget(format!("{}: not a number: {:?}", path.display(), text.trim())))
}

/// The kernel numbers formats and frames when it links them; read its numbers back
/// rather than assume an order.
fn descriptor_indexes(dir: &Path, spec: &GadgetSpec) -> Result<Vec<FormatDesc>, UsbError> {
    let mut formats = Vec::new();
    for (pixel, frames) in &spec.formats {
        let group = match pixel {
            Pixel::Mjpeg => dir.join("streaming/mjpeg/mjpeg"),
            Pixel::Yuyv => dir.join("streaming/uncompressed/yuyv"),
        };
        let mut sizes = Vec::new();
        for f in frames {
            let frame_dir = group.join(format!("{}p", f.height));
            sizes.push(FrameSize {
                index: read_number(&frame_dir.join("bFrameIndex"))?,
                width: f.width,
                height: f.height,
                intervals: f.fps.iter().map(|r| interval_of(*r)).collect(),
            });
        }
        sizes.sort_by_key(|s| s.index);
        formats.push(FormatDesc {
            index: read_number(&group.join("bFormatIndex"))?,
            pixel: *pixel,
            frames: sizes,
        });
    }
    formats.sort_by_key(|f| f.index);
    Ok(formats)
}

/// The UVC function's V4L2 node: the video device whose parent is the controller's
/// gadget.
fn video_node_of(udc: &str) -> Result<PathBuf, UsbError> {
    let controller = std::fs::canonicalize(Path::new("/sys/class/udc").join(udc).join("device"))
        .map_err(|e| UsbError::Gadget(format!("controller {udc}: {e}")))?;
    let entries = std::fs::read_dir("/sys/class/video4linux")
        .map_err(|e| UsbError::Gadget(format!("/sys/class/video4linux: {e}")))?;
    for entry in entries.flatten() {
        let Ok(device) = std::fs::canonicalize(entry.path().join("device")) else { continue };
        if device.starts_with(&controller) {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(UsbError::Gadget(format!("no V4L2 node of the UVC function under {}", controller.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webcam_offers_what_the_camera_delivers() {
        let both = offers(&["MJPG".into(), "YUYV".into()]);
        assert_eq!(both.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [Pixel::Mjpeg, Pixel::Yuyv]);
        assert_eq!(
            both[0].1.iter().map(|f| (f.width, f.height)).collect::<Vec<_>>(),
            [(1280, 720), (640, 480)]
        );
        let yuyv = offers(&["YUYV".into()]);
        assert_eq!(yuyv.len(), 1);
        assert_eq!((yuyv[0].1[0].width, yuyv[0].1[0].fps.clone()), (640, vec![30, 15]));
        assert!(offers(&["GREY".into()]).is_empty());
        assert_eq!(interval_of(30), 333_333);
        assert_eq!(interval_of(15), 666_666);
    }

    #[test]
    fn link_addresses_are_local_unicast_distinct_and_stable() {
        let (dev, host) = link_macs("desk-0001");
        assert_ne!(dev, host);
        for m in [dev, host] {
            assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast: {m:02x?}");
        }
        assert_eq!(link_macs("desk-0001"), (dev, host));
        assert_ne!(link_macs("desk-0002").0, dev);
    }
}
