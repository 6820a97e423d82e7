//! The UVC streaming program: answers the UVC function's events and, between the PC's
//! STREAMON and STREAMOFF, moves camera frames into the gadget's output queue.
//!
//! The camera is read only while the daemon's [`Gate`] allows it (the policy has put the
//! LED on "on a call" and the shutter is open); the daemon closes the gate, and waits
//! for the camera to be released, before it closes the shutter. The program closes the
//! camera by itself at STREAMOFF and DISCONNECT. Frames go from the camera's mmap
//! buffer to the gadget's mmap buffer and nowhere else: nothing here keeps, analyses or
//! forwards them (invariant 7).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::capture::Parameters;
use v4l::video::Capture;
use v4l::{Device, FourCC};

use crate::sys::{GadgetNode, UvcEvent};
use crate::uvc::{DataOutcome, Negotiation, Pixel, StreamFormat};
use crate::UsbError;

/// Gadget output buffers: enough to keep the isochronous pipe fed while the next
/// frame is read.
const GADGET_BUFFERS: u32 = 4;
const CAMERA_BUFFERS: u32 = 4;
/// No camera frame within this is a camera fault (the call goes on without frames).
const CAMERA_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the daemon waits in [`Gate::forbid`] before it closes the shutter: longer
/// than a camera read can take, so the read under way ends before the shutter closes
/// (invariant 2: no frame is read with the shutter closed).
pub const RELEASE_WAIT: Duration = Duration::from_secs(CAMERA_TIMEOUT.as_secs() + 1);

/// Whether the stream may read the camera; the daemon opens and closes it.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    allowed: bool,
    camera_open: bool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The LED shows "on a call" and the shutter is open: the stream may read.
    pub fn allow(&self) {
        self.lock().allowed = true;
        self.changed.notify_all();
    }

    /// The stream must stop reading: returns once the camera is closed (true), or after
    /// `wait` (false: the shutter closes anyway, which covers the lens).
    pub fn forbid(&self, wait: Duration) -> bool {
        let mut s = self.lock();
        s.allowed = false;
        let (s, _) =
            self.changed.wait_timeout_while(s, wait, |s| s.camera_open).unwrap_or_else(|p| p.into_inner());
        !s.camera_open
    }

    fn allowed(&self) -> bool {
        self.lock().allowed
    }

    /// Marks the camera open if reading is allowed.
    fn hold(&self) -> bool {
        let mut s = self.lock();
        s.camera_open = s.allowed;
        s.allowed
    }

    fn release(&self) {
        self.lock().camera_open = false;
        self.changed.notify_all();
    }
}

/// What the daemon sees of the stream.
#[derive(Default)]
pub struct StreamStats {
    /// The PC is streaming (between STREAMON and STREAMOFF/DISCONNECT).
    pub pc_streaming: AtomicBool,
    /// The camera went away while the stream was allowed to read it: the daemon takes
    /// it (`swap(false)`) and tells the policy, which stops the stream, closes the
    /// shutter and reports the camera lost until a probe finds it again.
    pub camera_fault: AtomicBool,
}

/// The camera, opened for a call at the committed format.
struct CallCamera {
    stream: Stream<'static>,
    /// Bytes per line of a YUYV frame as the camera lays it out.
    stride: usize,
    /// The device's descriptor, polled for its removal (POLLERR/POLLHUP) also while
    /// no frame is wanted.
    fd: std::os::raw::c_int,
    /// A frame has been read: the camera streams, so it can be polled for the next.
    streaming: bool,
}

/// What came first while the stream waited for a camera frame.
#[derive(Debug, PartialEq, Eq)]
enum Ready {
    Frame,
    /// A gadget event (STREAMOFF, DISCONNECT, a request): it is answered before the read.
    Event,
    /// The camera's device went away (POLLERR/POLLHUP).
    Gone,
    Timeout,
}

/// Waits for a frame on `camera` or an event on `gadget`, whichever comes first, so that
/// a STREAMOFF or DISCONNECT never waits behind a camera read (up to `timeout`).
fn wait_frame_or_event(gadget: std::os::raw::c_int, camera: std::os::raw::c_int, timeout: Duration) -> Ready {
    let mut fds = [
        libc::pollfd { fd: gadget, events: libc::POLLPRI, revents: 0 },
        libc::pollfd { fd: camera, events: libc::POLLIN, revents: 0 },
    ];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: valid pollfds for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if n < 0 {
        // EINTR: let the caller's read decide (it waits again).
        return Ready::Frame;
    }
    if fds[0].revents & libc::POLLPRI != 0 {
        Ready::Event
    } else if fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        Ready::Gone
    } else if fds[1].revents & libc::POLLIN != 0 {
        Ready::Frame
    } else {
        Ready::Timeout
    }
}

impl CallCamera {
    fn open(path: &Path, f: &StreamFormat) -> Result<Self, UsbError> {
        let err = |why: String| UsbError::Camera { path: path.display().to_string(), why };
        let dev = Device::with_path(path).map_err(|e| err(format!("open: {e}")))?;
        let mut fmt = dev.format().map_err(|e| err(format!("get format: {e}")))?;
        fmt.width = f.width;
        fmt.height = f.height;
        fmt.fourcc = FourCC::new(&f.pixel.fourcc());
        let got = dev.set_format(&fmt).map_err(|e| err(format!("set format: {e}")))?;
        if got.fourcc != fmt.fourcc || got.width != f.width || got.height != f.height {
            return Err(err(format!(
                "asked for {} {}x{}, it gives {} {}x{} (the board config's camera formats are wrong)",
                fmt.fourcc, f.width, f.height, got.fourcc, got.width, got.height
            )));
        }
        // A camera that cannot set its rate keeps its own; the PC takes what comes.
        let fps = f.fps().round().max(1.0) as u32;
        if let Err(e) = dev.set_params(&Parameters::with_fps(fps)) {
            tracing::debug!("camera: frame rate {fps}: {e}");
        }
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, CAMERA_BUFFERS)
            .map_err(|e| err(format!("allocate buffers: {e}")))?;
        stream.set_timeout(CAMERA_TIMEOUT);
        let fd = stream.handle().fd();
        Ok(CallCamera { stream, stride: got.stride as usize, fd, streaming: false })
    }
}

/// The streaming program of one bound gadget.
pub struct Streamer {
    node: GadgetNode,
    negotiation: Negotiation,
    camera_path: PathBuf,
    gate: Arc<Gate>,
    stats: Arc<StreamStats>,
    stop: Arc<AtomicBool>,
    format: Option<StreamFormat>,
    camera: Option<CallCamera>,
    /// Frames queued in the current stream.
    stream_frames: u64,
}

impl Streamer {
    /// Opens the UVC node and subscribes to its events: from here the PC can enumerate
    /// the webcam.
    pub fn open(
        node_path: &Path,
        negotiation: Negotiation,
        camera_path: &Path,
        gate: Arc<Gate>,
        stats: Arc<StreamStats>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, UsbError> {
        let node_err = |source| UsbError::Node { path: node_path.display().to_string(), source };
        let node = GadgetNode::open(node_path).map_err(node_err)?;
        node.subscribe().map_err(node_err)?;
        Ok(Streamer {
            node,
            negotiation,
            camera_path: camera_path.to_path_buf(),
            gate,
            stats,
            stop,
            format: None,
            camera: None,
            stream_frames: 0,
        })
    }

    /// Runs until `stop` is set. Errors of one request or frame are logged and the
    /// program goes on: the PC may try again.
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            let busy = self.format.is_some() && self.camera.is_some() && self.node.has_free();
            if self.wait_for_event(if busy { 0 } else { 100 }) {
                // (Also while no frame is wanted: the PC not taking them.)
                self.camera_removed();
            }
            loop {
                match self.node.next_event() {
                    Ok(Some(ev)) => self.handle(ev),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("UVC: reading an event: {e}");
                        break;
                    }
                }
            }
            if self.format.is_some() {
                self.pump();
            }
        }
        self.end_stream();
    }

    /// Waits for a gadget event (or the timeout); true when the camera held for the
    /// stream reports an error or hang-up (a V4L2 device unregistered under an open
    /// descriptor polls as POLLERR | POLLHUP).
    fn wait_for_event(&self, timeout_ms: i32) -> bool {
        let gadget = libc::pollfd { fd: self.node.fd().as_raw_fd(), events: libc::POLLPRI, revents: 0 };
        // Events 0: only the conditions always reported (error, hang-up, invalid).
        let camera = self.camera.as_ref().map(|c| libc::pollfd { fd: c.fd, events: 0, revents: 0 });
        let mut fds = [gadget, camera.unwrap_or(libc::pollfd { fd: -1, events: 0, revents: 0 })];
        // SAFETY: valid pollfds for the duration of the call (a negative fd is ignored).
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        camera.is_some() && fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
    }

    fn handle(&mut self, ev: UvcEvent) {
        match ev {
            UvcEvent::Connect => {
                tracing::info!("USB: the PC enumerated the webcam");
            }
            UvcEvent::Disconnect => {
                tracing::info!("USB: disconnected");
                self.end_stream();
            }
            UvcEvent::StreamOn => self.begin_stream(),
            UvcEvent::StreamOff => {
                tracing::info!("USB: the PC stopped the webcam stream");
                self.end_stream();
            }
            UvcEvent::Setup(req) => {
                let resp = self.negotiation.setup(&req);
                tracing::trace!(?req, ?resp.length, payload = ?resp.payload(), "UVC setup");
                if let Err(e) = self.node.send_response(&resp) {
                    tracing::warn!("UVC: answering {req:?}: {e}");
                }
            }
            UvcEvent::Data { len, bytes } => {
                let data = &bytes[..len];
                tracing::trace!(?data, "UVC data");
                if let DataOutcome::Committed(f) = self.negotiation.data(data) {
                    tracing::info!(
                        "USB: the PC chose {} {}x{} at {:.0} fps",
                        f.pixel,
                        f.width,
                        f.height,
                        f.fps()
                    );
                }
            }
            UvcEvent::Other(ty) => tracing::debug!("UVC: event {ty:#x} ignored"),
        }
    }

    fn begin_stream(&mut self) {
        let f = self.negotiation.committed();
        // The kernel completes the PC's SET_INTERFACE only when the stream starts here.
        let started = self.node.set_format(&f).and_then(|()| self.node.start(GADGET_BUFFERS));
        match started {
            Ok(()) => {
                tracing::info!(
                    "USB: the PC started the webcam stream ({} {}x{})",
                    f.pixel,
                    f.width,
                    f.height
                );
                self.format = Some(f);
                self.stats.pc_streaming.store(true, Ordering::Relaxed);
            }
            Err(e) => tracing::error!("UVC: starting the stream: {e}"),
        }
    }

    fn end_stream(&mut self) {
        if self.format.is_some() {
            tracing::info!("USB: the stream ended after {} frames", self.stream_frames);
        }
        self.stream_frames = 0;
        self.close_camera();
        self.format = None;
        self.stats.pc_streaming.store(false, Ordering::Relaxed);
        if let Err(e) = self.node.stop() {
            tracing::debug!("UVC: stopping the stream: {e}");
        }
    }

    fn close_camera(&mut self) {
        if self.camera.take().is_some() {
            tracing::debug!("USB: camera released");
        }
        self.gate.release();
    }

    /// The camera's device went away under the stream (its driver unbound), perhaps with
    /// no frame wanted: let go of it at once, so the driver can go, and report the fault.
    fn camera_removed(&mut self) {
        tracing::error!("camera {} removed during a call", self.camera_path.display());
        self.close_camera();
        self.camera_failed(true);
    }

    /// A camera read that failed during a call: the camera is closed (opened again for
    /// the next frame), a fault only if it went away.
    fn camera_read_failed(&mut self, why: impl std::fmt::Display) {
        tracing::error!("camera {} during a call: {why}", self.camera_path.display());
        self.close_camera();
        self.camera_failed(false);
    }

    /// A camera fault the daemon must hear of: the camera went away (`removed`, or its
    /// node is gone), unless the stream was told to stop meanwhile. A camera that is
    /// there but fails for the stream only (a format it refuses, a read timeout) is
    /// retried quietly: the daemon's probe would find it present and resume the call at
    /// once, and the shutter would flap (with a camera_lost/camera_back pair published
    /// each time) for the whole call.
    fn camera_failed(&self, removed: bool) {
        if self.gate.allowed() && (removed || !self.camera_path.exists()) {
            self.stats.camera_fault.store(true, Ordering::Relaxed);
        }
    }

    /// One step of the stream: follow the gate, take back sent buffers, send a frame.
    fn pump(&mut self) {
        if !self.gate.allowed() {
            // (Without a camera nothing is held: `hold` was never granted or was released.)
            if self.camera.is_some() {
                self.close_camera();
            }
            return;
        }
        if let Err(e) = self.node.reclaim() {
            tracing::warn!("UVC: taking back buffers: {e}");
        }
        if !self.node.has_free() {
            return;
        }
        let Some(f) = self.format else { return };
        if self.camera.is_none() {
            if !self.gate.hold() {
                return;
            }
            match CallCamera::open(&self.camera_path, &f) {
                Ok(c) => {
                    tracing::debug!("USB: camera {} open for the call", self.camera_path.display());
                    self.camera = Some(c)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    self.gate.release();
                    self.camera_failed(false);
                    // Not again at once: the stream goes on without frames for a while.
                    std::thread::sleep(Duration::from_millis(500));
                    return;
                }
            }
        }
        let Some(cam) = self.camera.as_ref() else { return };
        // Once the camera streams, wait for its frame and the gadget's events together.
        // (Before its first frame the camera is not streaming yet and polls as an error.)
        if cam.streaming {
            match wait_frame_or_event(self.node.fd().as_raw_fd(), cam.fd, CAMERA_TIMEOUT) {
                Ready::Frame => {}
                Ready::Event => return,
                Ready::Gone => return self.camera_removed(),
                Ready::Timeout => {
                    return self.camera_read_failed(format!("no frame in {} s", CAMERA_TIMEOUT.as_secs()))
                }
            }
        }
        let Some(cam) = self.camera.as_mut() else { return };
        cam.streaming = true;
        let frame = match cam.stream.next() {
            Ok(x) => x,
            Err(e) => return self.camera_read_failed(e),
        };
        let (buf, meta) = frame;
        let used = (meta.bytesused as usize).min(buf.len());
        let stride = cam.stride;
        let queued = self.node.queue_with(|out| copy_frame(&buf[..used], out, &f, stride));
        match queued {
            Ok(true) => {
                self.stream_frames += 1;
                if self.stream_frames == 1 {
                    tracing::info!("USB: first frame queued to the PC ({used} bytes)");
                }
            }
            Ok(false) => {}
            // The gadget's queue is marked disconnected when its transfers are shut
            // down (the cable pulled), and the DISCONNECT event may come late or not at
            // all: the PC receives nothing more, so the stream (and the call) ends here.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                tracing::info!("USB: the PC is gone (the gadget's queue is disconnected)");
                self.end_stream();
            }
            Err(e) => tracing::warn!("UVC: queueing a frame: {e}"),
        }
    }
}

/// Copies one camera frame into a gadget buffer; returns the bytes used. YUYV lines are
/// repacked when the camera pads them; a JPEG is copied as it is.
pub fn copy_frame(src: &[u8], dst: &mut [u8], f: &StreamFormat, stride: usize) -> usize {
    let line = f.width as usize * 2;
    if f.pixel == Pixel::Yuyv && stride > line {
        let mut n = 0;
        for row in src.chunks(stride).take(f.height as usize) {
            let row = &row[..line.min(row.len())];
            let Some(out) = dst.get_mut(n..n + row.len()) else { break };
            out.copy_from_slice(row);
            n += row.len();
        }
        n
    } else {
        let n = src.len().min(dst.len());
        dst[..n].copy_from_slice(&src[..n]);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn yuyv(width: u32, height: u32) -> StreamFormat {
        StreamFormat {
            pixel: Pixel::Yuyv,
            width,
            height,
            interval: 333_333,
            max_frame_bytes: width * height * 2,
        }
    }

    #[test]
    fn padded_yuyv_lines_are_repacked_and_jpeg_is_copied_as_it_is() {
        // 2x2 YUYV (4 bytes a line) in lines of 6 bytes.
        let src = [1, 2, 3, 4, 0xee, 0xee, 5, 6, 7, 8, 0xee, 0xee];
        let mut dst = [0u8; 16];
        assert_eq!(copy_frame(&src, &mut dst, &yuyv(2, 2), 6), 8);
        assert_eq!(&dst[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        // Unpadded: one copy.
        assert_eq!(copy_frame(&src[..8], &mut dst, &yuyv(2, 2), 4), 8);
        // A JPEG of any length, cut to the buffer if it were ever larger.
        let jpeg = StreamFormat { pixel: Pixel::Mjpeg, ..yuyv(2, 2) };
        assert_eq!(copy_frame(&[0xff, 0xd8, 0xff, 0xd9], &mut dst, &jpeg, 0), 4);
        let mut small = [0u8; 3];
        assert_eq!(copy_frame(&[0xff, 0xd8, 0xff, 0xd9], &mut small, &jpeg, 0), 3);
    }

    #[test]
    fn a_gadget_event_is_seen_before_a_camera_read_and_a_removed_camera_at_once() {
        use std::io::Write;
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // The gadget's event is POLLPRI: urgent data on a loopback TCP connection stands in.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (gadget, _) = listener.accept().unwrap();
        // The camera is POLLIN / POLLHUP: a pipe stands in.
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (camera, frame_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let short = Duration::from_millis(50);
        let t = Instant::now();
        assert_eq!(wait_frame_or_event(gadget.as_raw_fd(), camera.as_raw_fd(), short), Ready::Timeout);
        assert!(t.elapsed() >= short);
        let mut frames = std::fs::File::from(frame_end);
        frames.write_all(b"f").unwrap();
        assert_eq!(wait_frame_or_event(gadget.as_raw_fd(), camera.as_raw_fd(), short), Ready::Frame);
        // An event and a frame together: the event first.
        let sent = unsafe { libc::send(sender.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
        assert_eq!(sent, 1);
        let t = Instant::now();
        assert_eq!(wait_frame_or_event(gadget.as_raw_fd(), camera.as_raw_fd(), CAMERA_TIMEOUT), Ready::Event);
        assert!(t.elapsed() < Duration::from_secs(1), "not after a read's wait");
        // The camera gone (its other end closed: POLLHUP) while no event waits.
        drop(sender);
        drop(gadget);
        let idle = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (quiet, _) = listener.accept().unwrap();
        drop(frames);
        let mut buf = [0u8; 1];
        assert_eq!(unsafe { libc::read(camera.as_raw_fd(), buf.as_mut_ptr().cast(), 1) }, 1);
        assert_eq!(wait_frame_or_event(quiet.as_raw_fd(), camera.as_raw_fd(), short), Ready::Gone);
        drop(idle);
    }

    #[test]
    fn the_gate_lets_the_stream_hold_the_camera_only_while_allowed() {
        let gate = Arc::new(Gate::default());
        assert!(!gate.hold(), "closed at start");
        gate.allow();
        assert!(gate.hold());
        // Forbidding waits for the stream to let go of the camera.
        let g = gate.clone();
        let releaser = std::thread::spawn(move || {
            while g.allowed() {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            g.release();
        });
        let t = Instant::now();
        assert!(gate.forbid(Duration::from_secs(5)));
        assert!(t.elapsed() >= Duration::from_millis(40), "returned before the release");
        releaser.join().unwrap();
        assert!(!gate.hold(), "closed again");
        // A stream that never lets go: forbid gives up after its wait.
        gate.allow();
        assert!(gate.hold());
        assert!(!gate.forbid(Duration::from_millis(20)));
    }
}
