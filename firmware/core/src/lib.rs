//! deskcam's pure core: validated configuration, the rules that turn detections into
//! findings, the policy that decides when the camera may look, and the schema of every
//! message that leaves the device.
//!
//! This crate must stay pure: no file, network or device IO, no async runtime and no
//! clock. Time is always an argument (`Millis`), so every decision can be replayed and
//! tested with simulated time.

pub mod alloc_count;
pub mod board;
pub mod command;
pub mod config;
pub mod detection;
pub mod duration;
pub mod eval;
pub mod homeassistant;
pub mod policy;
pub mod rules;
pub mod schedule;
pub mod schema;
pub mod time;

pub use config::{Config, ConfigError, ConfigErrors};
pub use detection::{BBox, Detection, COCO_CLASSES};
pub use rules::{Finding, FrameFacts, RuleEngine, RuleKind};

/// Milliseconds on a monotonic or wall clock chosen by the caller. The core never reads
/// a clock itself; the daemon passes real time, tests pass simulated time.
pub type Millis = u64;
