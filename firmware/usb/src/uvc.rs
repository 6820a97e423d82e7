//! The UVC class requests a webcam answers, as a pure state machine (no IO).
//!
//! The kernel's UVC function hands every class request of the PC to userspace as a
//! `UVC_EVENT_SETUP` (and the data stage of a SET_CUR as a `UVC_EVENT_DATA`); the answer
//! goes back with `UVCIOC_SEND_RESPONSE`. This module decides the answers: the video
//! probe/commit negotiation (UVC 1.1, section 4.3.1.1) of the formats we offer, the
//! interface's request error code, and a stall for every control we do not expose (the
//! gadget exposes no camera-terminal or processing-unit control: its `bmControls` are 0).

/// `uvc_request_data.data`: the most a response carries.
pub const MAX_RESPONSE: usize = 60;
/// The length of the streaming control of UVC 1.1 (`bcdUVC` 0x0110, what the kernel's
/// function reports).
pub const STREAMING_CONTROL_LEN: usize = 34;

// Request codes (UVC 1.1, A.8).
pub const SET_CUR: u8 = 0x01;
pub const GET_CUR: u8 = 0x81;
pub const GET_MIN: u8 = 0x82;
pub const GET_MAX: u8 = 0x83;
pub const GET_RES: u8 = 0x84;
pub const GET_LEN: u8 = 0x85;
pub const GET_INFO: u8 = 0x86;
pub const GET_DEF: u8 = 0x87;

// Selectors.
const VS_PROBE_CONTROL: u8 = 0x01;
const VS_COMMIT_CONTROL: u8 = 0x02;
const VC_REQUEST_ERROR_CODE_CONTROL: u8 = 0x02;

// Request error codes (UVC 1.1, 4.2.1.2).
const ERR_NONE: u8 = 0x00;
const ERR_INVALID_CONTROL: u8 = 0x06;
const ERR_INVALID_REQUEST: u8 = 0x07;

/// The 8-byte SETUP packet of a control request (`struct usb_ctrlrequest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtrlRequest {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl CtrlRequest {
    pub fn from_bytes(b: &[u8; 8]) -> Self {
        CtrlRequest {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }
}

/// What goes back to the kernel: `length` bytes of `data`, or a stall (a negative
/// length, as `uvc_request_data` has it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub length: i32,
    pub data: [u8; MAX_RESPONSE],
}

impl Response {
    /// The PC's request is refused: the endpoint stalls.
    pub fn stall() -> Self {
        Response { length: -libc::EL2HLT, data: [0; MAX_RESPONSE] }
    }

    fn bytes(b: &[u8], max: u16) -> Self {
        let n = b.len().min(usize::from(max)).min(MAX_RESPONSE);
        let mut data = [0; MAX_RESPONSE];
        data[..n].copy_from_slice(&b[..n]);
        Response { length: n as i32, data }
    }

    /// Accepts a SET_CUR: the data stage of `len` bytes follows as a DATA event.
    fn accept(len: u16) -> Self {
        Response { length: i32::from(len), data: [0; MAX_RESPONSE] }
    }

    pub fn is_stall(&self) -> bool {
        self.length < 0
    }

    pub fn payload(&self) -> &[u8] {
        &self.data[..usize::try_from(self.length).unwrap_or(0)]
    }
}

/// The pixel formats the gadget offers (the camera delivers them as they are sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pixel {
    Mjpeg,
    Yuyv,
}

impl std::fmt::Display for Pixel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pixel::Mjpeg => "MJPEG",
            Pixel::Yuyv => "YUYV",
        })
    }
}

impl Pixel {
    /// The V4L2 fourcc of the format.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            Pixel::Mjpeg => *b"MJPG",
            Pixel::Yuyv => *b"YUYV",
        }
    }
}

/// One frame size of a format, with the frame intervals offered (100 ns units,
/// fastest first: the first is the default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSize {
    /// `bFrameIndex`, 1-based.
    pub index: u8,
    pub width: u32,
    pub height: u32,
    pub intervals: Vec<u32>,
}

impl FrameSize {
    /// `dwMaxVideoFrameBufferSize` as the gadget declares it (two bytes a pixel, what
    /// YUYV needs and what bounds a JPEG of the same size).
    pub fn max_frame_bytes(&self) -> u32 {
        self.width.saturating_mul(self.height).saturating_mul(2)
    }
}

/// One format descriptor of the streaming interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatDesc {
    /// `bFormatIndex`, 1-based.
    pub index: u8,
    pub pixel: Pixel,
    pub frames: Vec<FrameSize>,
}

/// What the PC committed to: the stream to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamFormat {
    pub pixel: Pixel,
    pub width: u32,
    pub height: u32,
    /// 100 ns units.
    pub interval: u32,
    pub max_frame_bytes: u32,
}

impl StreamFormat {
    pub fn fps(&self) -> f64 {
        10_000_000.0 / f64::from(self.interval.max(1))
    }
}

/// The video probe and commit control (UVC 1.1, table 4-47), 34 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamingControl {
    pub hint: u16,
    pub format_index: u8,
    pub frame_index: u8,
    pub frame_interval: u32,
    pub key_frame_rate: u16,
    pub p_frame_rate: u16,
    pub comp_quality: u16,
    pub comp_window_size: u16,
    pub delay: u16,
    pub max_video_frame_size: u32,
    pub max_payload_transfer_size: u32,
    pub clock_frequency: u32,
    pub framing_info: u8,
    pub preferred_version: u8,
    pub min_version: u8,
    pub max_version: u8,
}

impl StreamingControl {
    pub fn to_bytes(&self) -> [u8; STREAMING_CONTROL_LEN] {
        let mut b = [0u8; STREAMING_CONTROL_LEN];
        b[0..2].copy_from_slice(&self.hint.to_le_bytes());
        b[2] = self.format_index;
        b[3] = self.frame_index;
        b[4..8].copy_from_slice(&self.frame_interval.to_le_bytes());
        b[8..10].copy_from_slice(&self.key_frame_rate.to_le_bytes());
        b[10..12].copy_from_slice(&self.p_frame_rate.to_le_bytes());
        b[12..14].copy_from_slice(&self.comp_quality.to_le_bytes());
        b[14..16].copy_from_slice(&self.comp_window_size.to_le_bytes());
        b[16..18].copy_from_slice(&self.delay.to_le_bytes());
        b[18..22].copy_from_slice(&self.max_video_frame_size.to_le_bytes());
        b[22..26].copy_from_slice(&self.max_payload_transfer_size.to_le_bytes());
        b[26..30].copy_from_slice(&self.clock_frequency.to_le_bytes());
        b[30] = self.framing_info;
        b[31] = self.preferred_version;
        b[32] = self.min_version;
        b[33] = self.max_version;
        b
    }

    /// Reads what the PC sent; a short data stage (a UVC 1.0 host sends 26 bytes) leaves
    /// the rest zero.
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut b = [0u8; STREAMING_CONTROL_LEN];
        let n = data.len().min(STREAMING_CONTROL_LEN);
        b[..n].copy_from_slice(&data[..n]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        StreamingControl {
            hint: u16_at(0),
            format_index: b[2],
            frame_index: b[3],
            frame_interval: u32_at(4),
            key_frame_rate: u16_at(8),
            p_frame_rate: u16_at(10),
            comp_quality: u16_at(12),
            comp_window_size: u16_at(14),
            delay: u16_at(16),
            max_video_frame_size: u32_at(18),
            max_payload_transfer_size: u32_at(22),
            clock_frequency: u32_at(26),
            framing_info: b[30],
            preferred_version: b[31],
            min_version: b[32],
            max_version: b[33],
        }
    }
}

/// The result of a DATA event (the data stage of a SET_CUR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// The PC proposed a stream; GET_CUR will answer with what we can do.
    Probed,
    /// The PC committed: this is the stream it will start.
    Committed(StreamFormat),
    /// No SET_CUR was waiting for data.
    Unexpected,
}

/// The interface numbers of the UVC function (from configfs after the gadget is bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interfaces {
    pub control: u8,
    pub streaming: u8,
}

/// The class-request side of the webcam: negotiation state and request error code.
#[derive(Clone, Debug)]
pub struct Negotiation {
    formats: Vec<FormatDesc>,
    interfaces: Interfaces,
    max_payload: u32,
    probe: StreamingControl,
    commit: StreamingControl,
    /// The SET_CUR whose data stage is awaited (its selector).
    pending: Option<u8>,
    error: u8,
}

#[derive(Clone, Copy)]
enum Pick {
    Default,
    Max,
}

impl Negotiation {
    /// `formats` in descriptor order (non-empty, each with at least one frame size and
    /// interval); `max_payload` is the streaming endpoint's bytes per (micro)frame.
    pub fn new(formats: Vec<FormatDesc>, interfaces: Interfaces, max_payload: u32) -> Self {
        let mut n = Negotiation {
            formats,
            interfaces,
            max_payload,
            probe: StreamingControl::default(),
            commit: StreamingControl::default(),
            pending: None,
            error: ERR_NONE,
        };
        n.probe = n.pick(Pick::Default);
        n.commit = n.probe;
        n
    }

    pub fn formats(&self) -> &[FormatDesc] {
        &self.formats
    }

    /// Answers one SETUP event.
    pub fn setup(&mut self, req: &CtrlRequest) -> Response {
        self.pending = None;
        // Only class requests to an interface reach a webcam program.
        let class_to_interface = req.request_type & 0x60 == 0x20 && req.request_type & 0x1f == 0x01;
        if !class_to_interface {
            return self.fail(ERR_INVALID_REQUEST);
        }
        let interface = (req.index & 0xff) as u8;
        let entity = (req.index >> 8) as u8;
        let selector = (req.value >> 8) as u8;
        if interface == self.interfaces.streaming && entity == 0 {
            self.streaming_request(req, selector)
        } else if interface == self.interfaces.control && entity == 0 {
            self.control_request(req, selector)
        } else {
            // A unit or terminal control: we expose none (bmControls = 0).
            self.fail(ERR_INVALID_CONTROL)
        }
    }

    /// Takes the data stage of the SET_CUR that [`Negotiation::setup`] accepted.
    pub fn data(&mut self, data: &[u8]) -> DataOutcome {
        let Some(selector) = self.pending.take() else { return DataOutcome::Unexpected };
        let asked = StreamingControl::from_bytes(data);
        let fitted = self.fit(&asked);
        match selector {
            VS_PROBE_CONTROL => {
                self.probe = fitted;
                DataOutcome::Probed
            }
            _ => {
                self.commit = fitted;
                DataOutcome::Committed(self.stream_format(&fitted))
            }
        }
    }

    /// The stream of the last commit.
    pub fn committed(&self) -> StreamFormat {
        self.stream_format(&self.commit)
    }

    fn streaming_request(&mut self, req: &CtrlRequest, selector: u8) -> Response {
        if selector != VS_PROBE_CONTROL && selector != VS_COMMIT_CONTROL {
            return self.fail(ERR_INVALID_CONTROL);
        }
        let control = match req.request {
            SET_CUR => {
                self.error = ERR_NONE;
                self.pending = Some(selector);
                return Response::accept(req.length.min(STREAMING_CONTROL_LEN as u16));
            }
            GET_CUR if selector == VS_PROBE_CONTROL => self.probe,
            GET_CUR => self.commit,
            // The commit control has only CUR (UVC 1.1, 4.3.1.1).
            GET_MIN | GET_DEF if selector == VS_PROBE_CONTROL => self.pick(Pick::Default),
            GET_MAX if selector == VS_PROBE_CONTROL => self.pick(Pick::Max),
            GET_RES if selector == VS_PROBE_CONTROL => StreamingControl::default(),
            GET_LEN => return self.ok(&(STREAMING_CONTROL_LEN as u16).to_le_bytes(), req.length),
            // Supports GET and SET.
            GET_INFO => return self.ok(&[0x03], req.length),
            _ => return self.fail(ERR_INVALID_REQUEST),
        };
        self.ok(&control.to_bytes(), req.length)
    }

    fn control_request(&mut self, req: &CtrlRequest, selector: u8) -> Response {
        if selector != VC_REQUEST_ERROR_CODE_CONTROL {
            return self.fail(ERR_INVALID_CONTROL);
        }
        match req.request {
            // Read-only, and reading it does not change it.
            GET_CUR => Response::bytes(&[self.error], req.length),
            GET_INFO => Response::bytes(&[0x01], req.length),
            _ => self.fail(ERR_INVALID_REQUEST),
        }
    }

    fn ok(&mut self, bytes: &[u8], max: u16) -> Response {
        self.error = ERR_NONE;
        Response::bytes(bytes, max)
    }

    fn fail(&mut self, code: u8) -> Response {
        self.error = code;
        Response::stall()
    }

    /// The default (first format, its first size, its first interval) or the maximum
    /// (last format, its last size, its longest interval) stream.
    fn pick(&self, which: Pick) -> StreamingControl {
        let format = match which {
            Pick::Default => self.formats.first(),
            Pick::Max => self.formats.last(),
        };
        let Some(format) = format else { return StreamingControl::default() };
        let frame = match which {
            Pick::Default => format.frames.first(),
            Pick::Max => format.frames.last(),
        };
        let Some(frame) = frame else { return StreamingControl::default() };
        let interval = match which {
            Pick::Default => frame.intervals.first(),
            Pick::Max => frame.intervals.iter().max(),
        };
        self.control_for(format, frame, interval.copied().unwrap_or(333_333))
    }

    /// What we can do of what the PC asked: its format and size where we have them
    /// (else the first), and the offered interval nearest to the one it asked for.
    fn fit(&self, asked: &StreamingControl) -> StreamingControl {
        let Some(format) =
            self.formats.iter().find(|f| f.index == asked.format_index).or(self.formats.first())
        else {
            return StreamingControl::default();
        };
        let Some(frame) =
            format.frames.iter().find(|f| f.index == asked.frame_index).or(format.frames.first())
        else {
            return StreamingControl::default();
        };
        let interval = frame
            .intervals
            .iter()
            .copied()
            .min_by_key(|i| i.abs_diff(asked.frame_interval))
            .unwrap_or(333_333);
        let mut c = self.control_for(format, frame, interval);
        c.hint = asked.hint;
        c
    }

    fn control_for(&self, format: &FormatDesc, frame: &FrameSize, interval: u32) -> StreamingControl {
        StreamingControl {
            format_index: format.index,
            frame_index: frame.index,
            frame_interval: interval,
            max_video_frame_size: frame.max_frame_bytes(),
            max_payload_transfer_size: self.max_payload,
            // (The kernel function timestamps nothing itself; 48 MHz is what webcams say.)
            clock_frequency: 48_000_000,
            // Frame ID and end-of-frame bits are in every payload header.
            framing_info: 0x03,
            preferred_version: 1,
            min_version: 1,
            max_version: 1,
            ..StreamingControl::default()
        }
    }

    fn stream_format(&self, c: &StreamingControl) -> StreamFormat {
        let format = self.formats.iter().find(|f| f.index == c.format_index).or(self.formats.first());
        let frame =
            format.and_then(|f| f.frames.iter().find(|fr| fr.index == c.frame_index).or(f.frames.first()));
        match (format, frame) {
            (Some(f), Some(fr)) => StreamFormat {
                pixel: f.pixel,
                width: fr.width,
                height: fr.height,
                interval: c.frame_interval,
                max_frame_bytes: fr.max_frame_bytes(),
            },
            _ => StreamFormat {
                pixel: Pixel::Yuyv,
                width: 0,
                height: 0,
                interval: 333_333,
                max_frame_bytes: 0,
            },
        }
    }

    /// The last request error code (`VC_REQUEST_ERROR_CODE_CONTROL`), for tests.
    pub fn error_code(&self) -> u8 {
        self.error
    }
}

#[cfg(test)]
mod tests;
