//! deskcam's USB device side: the composite gadget (a UVC webcam for the worker's
//! meetings and a CDC NCM network link for the worker's page) and the program that
//! answers the UVC function and queues camera frames to it.
//!
//! Invariant 7 of the design lives partly here: the frames this crate moves from the
//! camera to the PC never go anywhere else (no copy is kept, nothing is analysed), and
//! the camera is read only while the daemon's gate says the shutter is open for the
//! call.

pub mod gadget;
pub mod stream;
pub mod sys;
pub mod uvc;

#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    #[error("no USB device controller (nothing in /sys/class/udc): the board cannot be a USB device")]
    NoController,
    #[error("USB gadget: {0}")]
    Gadget(String),
    #[error("UVC node {path}: {source}")]
    Node { path: String, source: std::io::Error },
    #[error("camera for the webcam stream {path}: {why}")]
    Camera { path: String, why: String },
}
