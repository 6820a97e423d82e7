//! A V4L2 capture device: negotiates MJPEG or YUYV at the configured size, reads with
//! a timeout through mmap buffers and converts to RGB.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deskcam_hw::ShutterOpen;
use image::RgbImage;
use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, FourCC};

use super::{CaptureError, FrameSource};
use crate::Frame;

/// Formats we can convert, in order of preference: MJPEG keeps USB bandwidth low.
const PREFERRED: [&[u8; 4]; 2] = [b"MJPG", b"YUYV"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pixel {
    Mjpeg,
    Yuyv,
}

/// Buffers in the capture queue. Two is the fewest that keeps the driver streaming
/// while we read one; reading `BUFFERS` frames returns one captured after the call.
const BUFFERS: u32 = 2;
/// Frames thrown away after the stream starts, while exposure and white balance settle.
const WARMUP_FRAMES: usize = 4;

pub struct V4l2Source {
    path: PathBuf,
    // Field order matters: the stream (which unmaps its buffers) drops before the device.
    stream: Option<Stream<'static>>,
    device: Device,
    pixel: Pixel,
    width: u32,
    height: u32,
    /// Bytes per line of a YUYV frame (drivers may pad lines).
    stride: usize,
    timeout_ms: u64,
}

fn map_open_err(path: &Path, what: &'static str, e: io::Error) -> CaptureError {
    let path = path.to_path_buf();
    match e.raw_os_error() {
        Some(libc_enoent) if libc_enoent == 2 || libc_enoent == 19 || libc_enoent == 6 => {
            CaptureError::Missing { path }
        }
        Some(16) => CaptureError::Busy { path },
        Some(13) | Some(1) => CaptureError::Denied { path },
        _ => CaptureError::Io { path, what, source: e },
    }
}

impl V4l2Source {
    pub fn open(path: &Path, width: u32, height: u32, timeout_ms: u64) -> Result<Self, CaptureError> {
        if !path.exists() {
            return Err(CaptureError::Missing { path: path.to_path_buf() });
        }
        let dev = Device::with_path(path).map_err(|e| map_open_err(path, "open", e))?;
        let caps = dev.query_caps().map_err(|e| map_open_err(path, "query capabilities", e))?;
        if !caps.capabilities.contains(v4l::capability::Flags::VIDEO_CAPTURE) {
            return Err(CaptureError::Unsupported {
                path: path.to_path_buf(),
                tried: "a video capture device".into(),
                offered: format!("'{}' which cannot capture video", caps.card),
            });
        }
        let offered = dev
            .enum_formats()
            .map(|fs| fs.iter().map(|f| f.fourcc.to_string()).collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|_| "nothing it would list".into());

        let mut tried = Vec::new();
        let mut chosen = None;
        for fourcc in PREFERRED {
            tried.push(format!("{} {width}x{height}", String::from_utf8_lossy(fourcc)));
            let mut fmt = dev.format().map_err(|e| map_open_err(path, "get format", e))?;
            fmt.width = width;
            fmt.height = height;
            fmt.fourcc = FourCC::new(fourcc);
            let got = dev.set_format(&fmt).map_err(|e| map_open_err(path, "set format", e))?;
            if got.fourcc == FourCC::new(fourcc) {
                let pixel = if fourcc == b"MJPG" { Pixel::Mjpeg } else { Pixel::Yuyv };
                chosen = Some((pixel, got.width, got.height));
                break;
            }
        }
        let Some((pixel, w, h)) = chosen else {
            return Err(CaptureError::Unsupported {
                path: path.to_path_buf(),
                tried: tried.join(", "),
                offered,
            });
        };
        if (w, h) != (width, height) {
            tracing::warn!(device = %path.display(), "asked for {width}x{height}, the driver gives {w}x{h}");
        }
        let stride = dev.format().map(|f| f.stride as usize).unwrap_or(0).max(w as usize * 2);
        Ok(V4l2Source {
            path: path.to_path_buf(),
            stream: None,
            device: dev,
            pixel,
            width: w,
            height: h,
            stride,
            timeout_ms,
        })
    }
}

fn read_err(path: &Path, timeout_ms: u64, e: io::Error) -> CaptureError {
    if e.kind() == io::ErrorKind::TimedOut {
        CaptureError::Timeout { path: path.to_path_buf(), timeout_ms }
    } else {
        map_open_err(path, "read frame", e)
    }
}

/// Stops and frees a stream without the v4l crate's panic on a failed STREAMOFF
/// (a device that broke rather than vanished): such a stream is leaked instead.
fn release(mut stream: Stream<'static>) {
    use v4l::io::traits::Stream as _;
    match stream.stop() {
        Ok(()) => drop(stream),
        Err(e) if e.raw_os_error() == Some(19) => drop(stream),
        Err(e) => {
            tracing::warn!("camera: stopping the stream failed ({e}); releasing it without stopping");
            std::mem::forget(stream);
        }
    }
}

impl Drop for V4l2Source {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            release(s);
        }
    }
}

impl FrameSource for V4l2Source {
    fn next_frame(&mut self, _shutter: &ShutterOpen) -> Result<Frame, CaptureError> {
        // Start streaming on the first read after the shutter opened, and let the
        // sensor settle; then read as many frames as there are buffers, so the frame
        // returned was captured now and not while the previous scan ended.
        let fresh_start = self.stream.is_none();
        if fresh_start {
            let mut stream = Stream::with_buffers(&self.device, Type::VideoCapture, BUFFERS)
                .map_err(|e| map_open_err(&self.path, "allocate buffers", e))?;
            stream.set_timeout(Duration::from_millis(self.timeout_ms));
            self.stream = Some(stream);
        }
        let skip = if fresh_start { WARMUP_FRAMES } else { BUFFERS as usize - 1 };
        for _ in 0..skip {
            let r = self.stream.as_mut().map(|s| s.next().map(|_| ()));
            if let Some(Err(e)) = r {
                return Err(read_err(&self.path, self.timeout_ms, e));
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(CaptureError::Exhausted);
        };
        let (buf, meta) = match stream.next() {
            Ok(x) => x,
            Err(e) => return Err(read_err(&self.path, self.timeout_ms, e)),
        };
        let used = (meta.bytesused as usize).min(buf.len());
        let bytes = &buf[..used];
        let origin = self.path.display().to_string();
        let corrupt = |reason: String| CaptureError::Corrupt { path: self.path.clone(), reason };
        let img = match self.pixel {
            Pixel::Mjpeg => image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
                .map_err(|e| corrupt(format!("MJPEG frame: {e}")))?
                .to_rgb8(),
            Pixel::Yuyv => yuyv_to_rgb(bytes, self.width, self.height, self.stride).ok_or_else(|| {
                corrupt(format!("YUYV frame of {used} bytes is short for {}x{}", self.width, self.height))
            })?,
        };
        Ok(Frame::new(img, origin))
    }

    fn pause(&mut self) {
        if let Some(s) = self.stream.take() {
            release(s);
        }
    }

    fn describe(&self) -> String {
        format!("{} {:?} {}x{}", self.path.display(), self.pixel, self.width, self.height)
    }
}

/// Packed YUYV 4:2:2 (BT.601, limited range) to RGB; lines are `stride` bytes apart.
pub(crate) fn yuyv_to_rgb(data: &[u8], width: u32, height: u32, stride: usize) -> Option<RgbImage> {
    let (w, h) = (width as usize, height as usize);
    if w % 2 != 0 || stride < w * 2 || h == 0 || data.len() < stride * (h - 1) + w * 2 {
        return None;
    }
    let mut out = Vec::with_capacity(w * h * 3);
    for px in (0..h).flat_map(|y| data[y * stride..y * stride + w * 2].chunks_exact(4)) {
        let (y0, u, y1, v) = (px[0] as f32, px[1] as f32 - 128.0, px[2] as f32, px[3] as f32 - 128.0);
        for y in [y0, y1] {
            let c = 1.164 * (y - 16.0);
            out.push((c + 1.596 * v).round().clamp(0.0, 255.0) as u8);
            out.push((c - 0.392 * u - 0.813 * v).round().clamp(0.0, 255.0) as u8);
            out.push((c + 2.017 * u).round().clamp(0.0, 255.0) as u8);
        }
    }
    RgbImage::from_raw(width, height, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_grey_white_black_and_red() {
        // Two pixels per 4 bytes: Y0 U Y1 V.
        let img = yuyv_to_rgb(&[235, 128, 16, 128], 2, 1, 4).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [0, 0, 0]);
        // BT.601 red: Y=81 U=90 V=240.
        let img = yuyv_to_rgb(&[81, 90, 81, 240], 2, 1, 4).unwrap();
        let [r, g, b] = img.get_pixel(0, 0).0;
        assert!(r > 245 && g < 10 && b < 10, "{r} {g} {b}");
        assert!(yuyv_to_rgb(&[0; 3], 2, 1, 4).is_none());
        // Padded lines: 2 pixels per line in 8-byte lines; the padding is skipped.
        let img = yuyv_to_rgb(&[235, 128, 235, 128, 9, 9, 9, 9, 16, 128, 16, 128], 2, 2, 8).unwrap();
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(0, 1).0, [0, 0, 0]);
    }

    #[test]
    fn read_errors_at_the_device_boundary_become_faults_not_skips() {
        // What the kernel answers a read on an unplugged camera (ENODEV), a device whose
        // driver went away under an open file (ENXIO), a stalled stream (timeout), a
        // device taken by another program (EBUSY) and a bus error (EIO).
        let p = Path::new("/dev/video0");
        let e = |code: i32| read_err(p, 500, io::Error::from_raw_os_error(code));
        assert!(matches!(e(19), CaptureError::Missing { .. }));
        assert!(matches!(e(6), CaptureError::Missing { .. }));
        assert!(matches!(e(16), CaptureError::Busy { .. }));
        assert!(matches!(e(5), CaptureError::Io { .. }));
        let stalled = read_err(p, 500, io::Error::from(io::ErrorKind::TimedOut));
        assert!(matches!(stalled, CaptureError::Timeout { timeout_ms: 500, .. }), "{stalled}");
        // None of them is a bad frame to skip: each closes the shutter and is retried.
        for err in [e(19), e(6), e(16), e(5), stalled] {
            assert!(!err.is_skippable(), "{err}");
            assert!(err.to_string().contains("/dev/video0"), "{err}");
        }
    }

    #[test]
    fn missing_device_names_the_path() {
        let e = V4l2Source::open(Path::new("/dev/video-does-not-exist"), 640, 480, 1000).err().unwrap();
        assert!(matches!(e, CaptureError::Missing { .. }));
        assert!(e.to_string().contains("/dev/video-does-not-exist"), "{e}");
    }

    #[test]
    fn a_non_camera_device_is_refused_clearly() {
        // /dev/null exists but is no V4L2 device: the ioctl fails with ENOTTY.
        let e = V4l2Source::open(Path::new("/dev/null"), 640, 480, 1000).err().unwrap();
        assert!(e.to_string().contains("/dev/null"), "{e}");
    }
}
