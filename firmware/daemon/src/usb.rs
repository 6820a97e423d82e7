//! The USB device side in the daemon: `deskcam usb up|down` (root, before and after
//! the service: configfs needs it) make and remove the composite gadget; `deskcam run`
//! serves it without root (the UVC node is in the `video` group) on a thread of its own.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use deskcam_core::board::Board;
use deskcam_core::config::SourceSpec;
use deskcam_core::Config;
use deskcam_usb::gadget::{self, GadgetSpec};
use deskcam_usb::stream::{Gate, StreamStats, Streamer};
use deskcam_usb::uvc::Negotiation;
use deskcam_usb::UsbError;

/// What the scan loop sees of the USB side.
pub struct UsbLink {
    pub stats: Arc<StreamStats>,
    pub gate: Arc<Gate>,
    pub watch: LinkWatch,
}

/// The device controller's own state, watched by the scan loop while the PC streams,
/// apart from the stream's thread: a cable pulled must close the shutter also when the
/// stream's thread is held up (in a camera driver's call) or the gadget's DISCONNECT
/// event never comes.
pub struct LinkWatch {
    /// `/sys/class/udc/<controller>/state`.
    state: PathBuf,
    /// The controller has said "configured" during this stream: it reports its states
    /// (not every controller does), so a later lower state means the PC is gone.
    seen_configured: bool,
    /// The PC went away during this stream: the call stays ended until the stream does.
    lost: bool,
}

impl LinkWatch {
    pub fn new(udc: &str) -> Self {
        LinkWatch {
            state: PathBuf::from("/sys/class/udc").join(udc).join("state"),
            seen_configured: false,
            lost: false,
        }
    }

    /// Whether the PC streams as far as the policy is told: the stream says so, and the
    /// controller has not fallen back from "configured" since it started.
    pub fn streaming(&mut self, stream_says: bool) -> bool {
        if !stream_says {
            self.seen_configured = false;
            self.lost = false;
            return false;
        }
        if !self.lost {
            let state = std::fs::read_to_string(&self.state).unwrap_or_default();
            self.lost = link_dropped(state.trim(), &mut self.seen_configured);
            if self.lost {
                tracing::warn!(
                    "USB: the controller is {:?} during the stream: the PC is gone, the call ends",
                    state.trim()
                );
            }
        }
        !self.lost
    }
}

/// Whether a controller state means the PC has gone (unplugged, reset, deconfigured),
/// given whether this controller has been seen "configured" (`seen`, updated).
fn link_dropped(state: &str, seen: &mut bool) -> bool {
    match state {
        "configured" => {
            *seen = true;
            false
        }
        "not attached" | "attached" | "powered" | "reconnecting" | "default" | "addressed" => *seen,
        // Suspended (the PC's bus asleep; a resume goes on with the stream), or a state
        // this controller does not report: not a judgement the loop makes.
        _ => false,
    }
}

/// Why this device has no USB side, if it has none (said once in the log).
fn unavailable(config: &Config, board: &Board) -> Option<String> {
    if !board.usb_device {
        return Some(format!("board {} has no USB device controller: no webcam, no USB link", board.name));
    }
    if !config.usb.enabled {
        return Some("usb.enabled = false: no webcam, no USB link".into());
    }
    if !matches!(config.camera.source, SourceSpec::V4l2(_)) {
        return Some("the camera is a photo directory: no webcam, no USB link".into());
    }
    if gadget::offers(&board.camera_formats).is_empty() {
        return Some(format!(
            "board {}: the camera delivers neither MJPEG nor YUYV ({:?}): no webcam",
            board.name, board.camera_formats
        ));
    }
    None
}

fn spec(config: &Config, board: &Board) -> GadgetSpec {
    GadgetSpec {
        vendor_id: config.usb.vendor_id,
        product_id: config.usb.product_id,
        manufacturer: config.usb.manufacturer.clone(),
        product: config.usb.product.clone(),
        serial: config.device_id.to_string(),
        formats: gadget::offers(&board.camera_formats),
    }
}

/// `deskcam usb up`: makes and binds the gadget. A board without a controller (or a
/// config without the USB side) is not an error: it says so and exits 0.
pub fn up(config: Option<PathBuf>) -> Result<ExitCode> {
    let path = crate::config_path(config);
    let (config, board) = match crate::load_config(&path)? {
        Ok(c) => c,
        Err(e) => {
            eprint!("deskcam: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(why) = unavailable(&config, &board) {
        println!("{why}");
        gadget::remove().context("removing an old gadget")?;
        return Ok(ExitCode::SUCCESS);
    }
    let spec = spec(&config, &board);
    let udc = match gadget::bind(&spec) {
        Ok(udc) => udc,
        // The board can be a device, but the kernel shows no controller: the overlay is
        // missing, or the module did not load. The daemon runs without the USB side.
        Err(UsbError::NoController) => {
            println!(
                "board {} should have a USB device controller, but /sys/class/udc is empty \
                 (is dtoverlay=dwc2,dr_mode=peripheral in config.txt?): no webcam, no USB link",
                board.name
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e).context("making the USB gadget"),
    };
    // The route out through the PC, when asked for; a drop-in of an earlier boot is gone
    // with /run, and one of an earlier `usb up` is removed when no longer asked for.
    let dropin = std::path::Path::new(NETWORK_DROPIN);
    let changed = if config.usb.uplink_via_pc {
        write_network_dropin(dropin, &uplink_dropin()).map(|()| true)
    } else {
        remove_network_dropin(dropin)
    };
    match changed {
        Ok(true) => {
            // networkd reads drop-ins when it starts; it runs already, so it is reloaded.
            let reload = std::process::Command::new("networkctl")
                .arg("reload")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if !matches!(reload, Ok(s) if s.success()) {
                eprintln!("deskcam: networkctl reload failed: the route through the PC waits for networkd's next start");
            }
        }
        Ok(false) => {}
        // The link itself works without it; only the way out through the PC is missing.
        Err(e) => eprintln!("deskcam: {NETWORK_DROPIN}: {e:#}"),
    }
    if config.usb.uplink_via_pc {
        println!("USB link: MQTT may go out through the PC ({PC_ADDR}), after any network of the box's own");
    }
    let info = gadget::describe(&spec).context("reading the bound gadget")?;
    println!(
        "USB gadget on {udc}: webcam {} ({} format(s)), network link {}",
        info.video_node.display(),
        info.formats.len(),
        if info.net_ifname.is_empty() { "(no interface)" } else { &info.net_ifname }
    );
    Ok(ExitCode::SUCCESS)
}

/// The PC's address on the link: the only address in the pool of the box's DHCP server
/// (image/rootfs/etc/systemd/network/10-deskcam-usb.network), so the box knows where
/// the PC is. One PC per cable; the box restarts with a new PC (it is powered by it).
const PC_ADDR: &str = "10.199.77.2";
/// Written at `usb up` when `usb.uplink_via_pc` is on, in /run (the root file system is
/// read-only): a drop-in of the image's `10-deskcam-usb.network`.
const NETWORK_DROPIN: &str = "/run/systemd/network/10-deskcam-usb.network.d/50-uplink-via-pc.conf";
/// After any route of the box's own network (networkd gives DHCP routes 1024).
const UPLINK_METRIC: u32 = 4096;

/// The networkd drop-in for `usb.uplink_via_pc`: a default route through the PC, used
/// only when no network of the box's own has one. It routes the box's own traffic; the
/// box still forwards nothing.
fn uplink_dropin() -> String {
    format!(
        "# Written by `deskcam usb up`: usb.uplink_via_pc = true.\n\
         [Route]\nGateway={PC_ADDR}\nMetric={UPLINK_METRIC}\n"
    )
}

/// Writes the drop-in atomically (networkd never reads half of one), readable by
/// networkd (it runs as its own user; the unit's umask would make what it creates
/// private, so the modes are set: the drop-in directory and the one above it, which
/// this may have created too).
fn write_network_dropin(path: &std::path::Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} readable", d.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("making {} readable", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Removes the drop-in; whether there was one.
fn remove_network_dropin(path: &std::path::Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// `deskcam usb down`: removes the gadget (the PC sees the box go).
pub fn down() -> Result<ExitCode> {
    gadget::remove().context("removing the USB gadget")?;
    Ok(ExitCode::SUCCESS)
}

/// How long the daemon waits for the gadget's video node to become its own. `deskcam
/// usb up` (run as root just before the daemon) makes the node, and udev gives it to
/// the video group a moment later: on a slow boot the daemon gets there first.
const NODE_WAIT: Duration = Duration::from_secs(30);

/// Opens the gadget's node, again while it is missing or not yet the daemon's (udev at
/// work, see [`NODE_WAIT`]); `None`, logged, when it cannot be had.
fn open_node(
    node: &std::path::Path,
    negotiation: Negotiation,
    camera: &std::path::Path,
    gate: Arc<Gate>,
    stats: Arc<StreamStats>,
    stop: Arc<AtomicBool>,
) -> Option<Streamer> {
    let until = std::time::Instant::now() + NODE_WAIT;
    loop {
        match Streamer::open(node, negotiation.clone(), camera, gate.clone(), stats.clone(), stop.clone()) {
            Ok(s) => return Some(s),
            Err(UsbError::Node { source, .. })
                if matches!(source.kind(), ErrorKind::PermissionDenied | ErrorKind::NotFound)
                    && std::time::Instant::now() < until
                    && !stop.load(Ordering::Relaxed) =>
            {
                tracing::debug!("USB: {} not yet ours ({source}); trying again", node.display());
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => {
                tracing::error!("USB: {e}; running without the webcam");
                return None;
            }
        }
    }
}

/// Starts serving the gadget that `deskcam usb up` made, if there is one.
pub fn start(
    config: &Config,
    board: &Board,
    stop: Arc<AtomicBool>,
) -> Option<(UsbLink, std::thread::JoinHandle<()>)> {
    if let Some(why) = unavailable(config, board) {
        tracing::info!("{why}");
        return None;
    }
    let SourceSpec::V4l2(camera) = &config.camera.source else { return None };
    let spec = spec(config, board);
    let info = match gadget::describe(&spec) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("USB: {e}; running without the webcam and the USB link");
            return None;
        }
    };
    let negotiation = Negotiation::new(info.formats.clone(), info.interfaces, gadget::MAX_PACKET);
    let gate = Arc::new(Gate::default());
    let stats = Arc::new(StreamStats::default());
    let formats = info
        .formats
        .iter()
        .map(|f| {
            format!(
                "{} {}",
                f.pixel,
                f.frames.iter().map(|s| format!("{}x{}", s.width, s.height)).collect::<Vec<_>>().join("/")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let (node, camera, link_gate, link_stats) =
        (info.video_node.clone(), camera.clone(), gate.clone(), stats.clone());
    let thread = std::thread::Builder::new()
        .name("uvc".into())
        .spawn(move || {
            let Some(streamer) = open_node(&node, negotiation, &camera, link_gate, link_stats, stop) else {
                return;
            };
            tracing::info!("USB: webcam on {} ({formats}), waiting for the PC", node.display());
            streamer.run()
        })
        .ok()?;
    Some((UsbLink { stats, gate, watch: LinkWatch::new(&info.udc) }, thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controller_falling_back_from_configured_means_the_pc_is_gone() {
        let mut seen = false;
        // A controller that never says "configured" is never judged.
        assert!(!link_dropped("not attached", &mut seen));
        assert!(!link_dropped("UNKNOWN", &mut seen));
        assert!(!link_dropped("configured", &mut seen));
        assert!(seen);
        for gone in ["not attached", "default", "addressed", "powered"] {
            assert!(link_dropped(gone, &mut seen.clone()), "{gone}");
        }
        assert!(!link_dropped("suspended", &mut seen));
        assert!(!link_dropped("", &mut seen), "an unreadable state is no judgement");
    }

    #[test]
    fn the_watch_ends_the_call_at_the_drop_and_keeps_it_ended_until_the_stream_ends() {
        let dir = std::env::temp_dir().join(format!("deskcam-linkwatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state");
        let mut w = LinkWatch { state: state.clone(), seen_configured: false, lost: false };
        let set = |s: &str| std::fs::write(&state, format!("{s}\n")).unwrap();
        set("configured");
        assert!(w.streaming(true));
        set("default");
        assert!(!w.streaming(true), "the cable pulled: the call ends");
        set("configured");
        assert!(!w.streaming(true), "plugged again, but the stream never ended: still ended");
        assert!(!w.streaming(false));
        assert!(w.streaming(true), "a new stream");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_uplink_dropin_is_a_route_through_the_pc_after_the_boxs_own() {
        let text = uplink_dropin();
        assert!(text.contains("[Route]\nGateway=10.199.77.2\nMetric=4096\n"), "{text}");
        // Written whole and readable by networkd; removed when no longer asked for.
        let dir = std::env::temp_dir().join(format!("deskcam-dropin-{}", std::process::id()));
        let path = dir.join("10-deskcam-usb.network.d/50-uplink-via-pc.conf");
        write_network_dropin(&path, "old").unwrap();
        write_network_dropin(&path, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert!(remove_network_dropin(&path).unwrap());
        assert!(!remove_network_dropin(&path).unwrap(), "nothing to remove");
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
