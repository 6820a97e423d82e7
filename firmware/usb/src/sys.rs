//! The V4L2 output node of the kernel's UVC function, with typed ioctls: events
//! (`VIDIOC_SUBSCRIBE_EVENT`, `VIDIOC_DQEVENT`), answers to class requests
//! (`UVCIOC_SEND_RESPONSE`, `linux/usb/g_uvc.h`), the format, and an mmap buffer queue
//! mapped once per stream (`VIDIOC_REQBUFS`, `QUERYBUF`, `QBUF`, `DQBUF`, `STREAMON`,
//! `STREAMOFF`). The structures are those of `linux/videodev2.h` as bindgen made them for
//! the target (the `v4l` crate's `v4l_sys`).

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use v4l::v4l_sys::{
    v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_OUTPUT as BUF_TYPE_OUTPUT, v4l2_buffer, v4l2_event,
    v4l2_event_subscription, v4l2_field_V4L2_FIELD_NONE as FIELD_NONE, v4l2_format,
    v4l2_memory_V4L2_MEMORY_MMAP as MEMORY_MMAP, v4l2_requestbuffers, V4L2_EVENT_PRIVATE_START,
};

use crate::uvc::{CtrlRequest, Response, StreamFormat, MAX_RESPONSE};

// linux/usb/g_uvc.h
pub const UVC_EVENT_CONNECT: u32 = V4L2_EVENT_PRIVATE_START;
pub const UVC_EVENT_DISCONNECT: u32 = V4L2_EVENT_PRIVATE_START + 1;
pub const UVC_EVENT_STREAMON: u32 = V4L2_EVENT_PRIVATE_START + 2;
pub const UVC_EVENT_STREAMOFF: u32 = V4L2_EVENT_PRIVATE_START + 3;
pub const UVC_EVENT_SETUP: u32 = V4L2_EVENT_PRIVATE_START + 4;
pub const UVC_EVENT_DATA: u32 = V4L2_EVENT_PRIVATE_START + 5;

/// `struct uvc_request_data`.
#[repr(C)]
struct UvcRequestData {
    length: i32,
    data: [u8; MAX_RESPONSE],
}

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, type, nr, size)` of the generic ioctl layout (x86_64, aarch64, arm).
const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

const VIDIOC_S_FMT: u64 = ioc(IOC_READ | IOC_WRITE, b'V', 5, size_of::<v4l2_format>());
const VIDIOC_REQBUFS: u64 = ioc(IOC_READ | IOC_WRITE, b'V', 8, size_of::<v4l2_requestbuffers>());
const VIDIOC_QUERYBUF: u64 = ioc(IOC_READ | IOC_WRITE, b'V', 9, size_of::<v4l2_buffer>());
const VIDIOC_QBUF: u64 = ioc(IOC_READ | IOC_WRITE, b'V', 15, size_of::<v4l2_buffer>());
const VIDIOC_DQBUF: u64 = ioc(IOC_READ | IOC_WRITE, b'V', 17, size_of::<v4l2_buffer>());
const VIDIOC_STREAMON: u64 = ioc(IOC_WRITE, b'V', 18, size_of::<libc::c_int>());
const VIDIOC_STREAMOFF: u64 = ioc(IOC_WRITE, b'V', 19, size_of::<libc::c_int>());
const VIDIOC_DQEVENT: u64 = ioc(IOC_READ, b'V', 89, size_of::<v4l2_event>());
const VIDIOC_SUBSCRIBE_EVENT: u64 = ioc(IOC_WRITE, b'V', 90, size_of::<v4l2_event_subscription>());
const UVCIOC_SEND_RESPONSE: u64 = ioc(IOC_WRITE, b'U', 1, size_of::<UvcRequestData>());

fn ioctl<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the structure the request is defined with (its size is part of
    // the request number), valid and exclusively borrowed for the call.
    let r = unsafe { libc::syscall(libc::SYS_ioctl, fd.as_raw_fd(), request, arg as *mut T as *mut c_void) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What the UVC function tells its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UvcEvent {
    Connect,
    Disconnect,
    StreamOn,
    StreamOff,
    Setup(CtrlRequest),
    Data { len: usize, bytes: [u8; MAX_RESPONSE] },
    Other(u32),
}

/// One mmap'ed buffer of the output queue.
struct Mapped {
    ptr: *mut u8,
    len: usize,
}

/// The gadget's V4L2 output node.
pub struct GadgetNode {
    file: File,
    buffers: Vec<Mapped>,
    /// Buffers that userspace holds (not queued to the kernel).
    free: Vec<u32>,
}

// SAFETY: the mapped buffers belong to the node and are only touched through `&mut self`.
unsafe impl Send for GadgetNode {}

impl GadgetNode {
    /// Opens the node non-blocking (events and buffers are polled).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(path)?;
        Ok(GadgetNode { file, buffers: Vec::new(), free: Vec::new() })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Subscribes to every UVC event: this is what lets the function connect.
    pub fn subscribe(&self) -> io::Result<()> {
        for ty in [
            UVC_EVENT_CONNECT,
            UVC_EVENT_DISCONNECT,
            UVC_EVENT_STREAMON,
            UVC_EVENT_STREAMOFF,
            UVC_EVENT_SETUP,
            UVC_EVENT_DATA,
        ] {
            // SAFETY: a plain C struct; all-zero is valid.
            let mut sub: v4l2_event_subscription = unsafe { std::mem::zeroed() };
            sub.type_ = ty;
            ioctl(self.fd(), VIDIOC_SUBSCRIBE_EVENT, &mut sub)?;
        }
        Ok(())
    }

    /// The next pending event, if any (`None` when none is pending).
    pub fn next_event(&self) -> io::Result<Option<UvcEvent>> {
        // SAFETY: a plain C struct; all-zero is valid.
        let mut ev: v4l2_event = unsafe { std::mem::zeroed() };
        match ioctl(self.fd(), VIDIOC_DQEVENT, &mut ev) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
        // SAFETY: `data` is the union's raw 64 bytes, valid for every member.
        let raw: [u8; 64] = unsafe { ev.u.data };
        Ok(Some(match ev.type_ {
            UVC_EVENT_CONNECT => UvcEvent::Connect,
            UVC_EVENT_DISCONNECT => UvcEvent::Disconnect,
            UVC_EVENT_STREAMON => UvcEvent::StreamOn,
            UVC_EVENT_STREAMOFF => UvcEvent::StreamOff,
            UVC_EVENT_SETUP => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&raw[..8]);
                UvcEvent::Setup(CtrlRequest::from_bytes(&b))
            }
            UVC_EVENT_DATA => {
                let len = i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]).clamp(0, MAX_RESPONSE as i32);
                let mut bytes = [0u8; MAX_RESPONSE];
                bytes.copy_from_slice(&raw[4..4 + MAX_RESPONSE]);
                UvcEvent::Data { len: len as usize, bytes }
            }
            other => UvcEvent::Other(other),
        }))
    }

    pub fn send_response(&self, r: &Response) -> io::Result<()> {
        let mut data = UvcRequestData { length: r.length, data: r.data };
        ioctl(self.fd(), UVCIOC_SEND_RESPONSE, &mut data)
    }

    /// Sets the output format to the committed stream.
    pub fn set_format(&self, f: &StreamFormat) -> io::Result<()> {
        // SAFETY: a plain C struct; all-zero is valid.
        let mut fmt: v4l2_format = unsafe { std::mem::zeroed() };
        fmt.type_ = BUF_TYPE_OUTPUT;
        // SAFETY: `pix` is the member for a video output buffer type.
        let pix = unsafe { &mut fmt.fmt.pix };
        pix.width = f.width;
        pix.height = f.height;
        pix.pixelformat = u32::from_le_bytes(f.pixel.fourcc());
        pix.field = FIELD_NONE;
        pix.sizeimage = f.max_frame_bytes;
        pix.bytesperline = if f.pixel == crate::uvc::Pixel::Yuyv { f.width * 2 } else { 0 };
        ioctl(self.fd(), VIDIOC_S_FMT, &mut fmt)
    }

    /// Allocates and maps `count` buffers (all held by us), then starts the stream.
    pub fn start(&mut self, count: u32) -> io::Result<()> {
        self.stop()?;
        // SAFETY: a plain C struct; all-zero is valid.
        let mut req: v4l2_requestbuffers = unsafe { std::mem::zeroed() };
        req.count = count;
        req.type_ = BUF_TYPE_OUTPUT;
        req.memory = MEMORY_MMAP;
        ioctl(self.fd(), VIDIOC_REQBUFS, &mut req)?;
        for index in 0..req.count {
            let mut buf = self.buffer(index);
            ioctl(self.fd(), VIDIOC_QUERYBUF, &mut buf)?;
            // SAFETY: offset is the member for MMAP memory.
            let offset = unsafe { buf.m.offset };
            let len = buf.length as usize;
            // SAFETY: maps the driver's buffer at the offset it gave; unmapped in `stop`.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            self.buffers.push(Mapped { ptr: ptr.cast(), len });
            self.free.push(index);
        }
        let mut ty = BUF_TYPE_OUTPUT as libc::c_int;
        ioctl(self.fd(), VIDIOC_STREAMON, &mut ty)
    }

    /// Stops the stream and releases the buffers (nothing happens if none).
    pub fn stop(&mut self) -> io::Result<()> {
        if self.buffers.is_empty() {
            return Ok(());
        }
        let mut ty = BUF_TYPE_OUTPUT as libc::c_int;
        let off = ioctl(self.fd(), VIDIOC_STREAMOFF, &mut ty);
        for m in self.buffers.drain(..) {
            // SAFETY: mapped in `start` with this length, not used after this.
            unsafe { libc::munmap(m.ptr.cast(), m.len) };
        }
        self.free.clear();
        // SAFETY: a plain C struct; all-zero is valid.
        let mut req: v4l2_requestbuffers = unsafe { std::mem::zeroed() };
        req.type_ = BUF_TYPE_OUTPUT;
        req.memory = MEMORY_MMAP;
        let freed = ioctl(self.fd(), VIDIOC_REQBUFS, &mut req);
        off.and(freed)
    }

    /// Takes back the buffers the kernel has sent (non-blocking).
    pub fn reclaim(&mut self) -> io::Result<()> {
        while !self.buffers.is_empty() {
            let mut buf = self.buffer(0);
            match ioctl(self.fd(), VIDIOC_DQBUF, &mut buf) {
                Ok(()) => self.free.push(buf.index),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether a buffer is free to fill.
    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Fills a free buffer with `fill` (which returns the bytes used) and queues it.
    /// Returns false if no buffer was free.
    pub fn queue_with(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> io::Result<bool> {
        let Some(index) = self.free.pop() else { return Ok(false) };
        let Some(m) = self.buffers.get(index as usize) else { return Ok(false) };
        // SAFETY: the buffer is mapped with this length and held by us (not queued).
        let slice = unsafe { std::slice::from_raw_parts_mut(m.ptr, m.len) };
        let used = fill(slice).min(m.len);
        let mut buf = self.buffer(index);
        buf.bytesused = used as u32;
        if let Err(e) = ioctl(self.fd(), VIDIOC_QBUF, &mut buf) {
            self.free.push(index);
            return Err(e);
        }
        Ok(true)
    }

    fn buffer(&self, index: u32) -> v4l2_buffer {
        // SAFETY: a plain C struct; all-zero is valid.
        let mut buf: v4l2_buffer = unsafe { std::mem::zeroed() };
        buf.index = index;
        buf.type_ = BUF_TYPE_OUTPUT;
        buf.memory = MEMORY_MMAP;
        buf.field = FIELD_NONE;
        buf
    }
}

impl Drop for GadgetNode {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
