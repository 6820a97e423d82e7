//! deskcam vision: frame sources (V4L2 camera, photo directory), the on-device
//! detector (NanoDet on tract) and evidence encoding (redaction, JPEG).
//!
//! Privacy boundary: a [`Frame`]'s pixels are private to this crate. Other crates can
//! ask for its size, statistics and detections, and can obtain pixels only through
//! [`evidence::render_still`] and [`evidence::render_redacted`], which redact first. This crate must not
//! publish, store or decide anything.

pub mod detector;
mod direct_conv;
pub mod evidence;
pub mod frame;
mod fused;
mod int8_pack;
mod nnef_quant;
mod packed_product;
mod reuse;
pub mod source;
mod winograd;

pub use detector::{Detector, DetectorError};
pub use evidence::{render_redacted, render_still, EvidenceError, Still};
pub use frame::Frame;
pub use source::{open_source, CaptureError, FrameSource};

/// Lower-case hex sha256, as checksums are written in events, `state` and models/.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of a digest, as `sha256sum` prints it.
pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
