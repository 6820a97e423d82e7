//! Frame sources behind one trait: a V4L2 camera or a directory of photos.

mod dir;
#[cfg(feature = "v4l2")]
mod v4l2;

use std::path::PathBuf;

use deskcam_core::config::{CameraConfig, SourceSpec};
use deskcam_hw::ShutterOpen;

pub use dir::DirSource;
#[cfg(feature = "v4l2")]
pub use v4l2::V4l2Source;

use crate::Frame;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("camera {path}: no such device (is the camera plugged in and its driver loaded?)")]
    Missing { path: PathBuf },
    #[error("camera {path}: busy, another program is using it")]
    Busy { path: PathBuf },
    #[error("camera {path}: permission denied (is the service user in the 'video' group?)")]
    Denied { path: PathBuf },
    #[error("camera {path}: no usable format: tried {tried}; the device offers {offered}")]
    Unsupported { path: PathBuf, tried: String, offered: String },
    #[error("camera {path}: no frame within {timeout_ms} ms")]
    Timeout { path: PathBuf, timeout_ms: u64 },
    #[error("camera {path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("photo {path}: cannot decode: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("photo directory {path}: {reason}")]
    BadDirectory { path: PathBuf, reason: String },
    #[error("photo directory: no more photos")]
    Exhausted,
    #[error("source built without {0} support")]
    NotBuilt(&'static str),
}

impl CaptureError {
    /// Whether the next read may succeed (a bad photo among good ones), as opposed to a
    /// fault of the source itself.
    pub fn is_skippable(&self) -> bool {
        matches!(self, CaptureError::Corrupt { .. })
    }
}

/// Something that yields frames. Reading requires proof that the shutter is open and
/// the LED says so (privacy invariant 2).
pub trait FrameSource: Send {
    fn next_frame(&mut self, shutter: &ShutterOpen) -> Result<Frame, CaptureError>;

    /// The shutter is closing: stop streaming so the sensor does not run behind a
    /// closed shutter and no stale frame waits in a buffer for the next scan.
    fn pause(&mut self) {}

    /// A one-line description for logs: device and negotiated format, or directory.
    fn describe(&self) -> String;
}

/// Opens the source the config names.
pub fn open_source(cfg: &CameraConfig) -> Result<Box<dyn FrameSource>, CaptureError> {
    match &cfg.source {
        SourceSpec::Dir(p) => Ok(Box::new(DirSource::open(p, cfg.looped)?)),
        #[cfg(feature = "v4l2")]
        SourceSpec::V4l2(p) => {
            Ok(Box::new(V4l2Source::open(p, cfg.width, cfg.height, cfg.timeout.as_millis())?))
        }
        #[cfg(not(feature = "v4l2"))]
        SourceSpec::V4l2(_) => Err(CaptureError::NotBuilt("V4L2")),
    }
}
