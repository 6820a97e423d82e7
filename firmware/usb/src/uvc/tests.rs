//! The negotiation against the requests a UVC host sends (Linux `uvcvideo`'s order:
//! GET_DEF/GET_CUR of the probe, SET_CUR probe, GET_CUR probe, SET_CUR commit).

use super::*;

/// The box as the qemu-virt board offers it: YUYV 640×480 at 30/15 fps; and, for the
/// boards with an MJPEG camera, MJPEG 1280×720 and 640×480.
fn offers() -> Vec<FormatDesc> {
    vec![
        FormatDesc {
            index: 1,
            pixel: Pixel::Mjpeg,
            frames: vec![
                FrameSize { index: 1, width: 1280, height: 720, intervals: vec![333_333, 666_666] },
                FrameSize { index: 2, width: 640, height: 480, intervals: vec![333_333, 666_666] },
            ],
        },
        FormatDesc {
            index: 2,
            pixel: Pixel::Yuyv,
            frames: vec![FrameSize { index: 1, width: 640, height: 480, intervals: vec![333_333, 666_666] }],
        },
    ]
}

const IFACES: Interfaces = Interfaces { control: 0, streaming: 1 };

fn negotiation() -> Negotiation {
    Negotiation::new(offers(), IFACES, 3072)
}

/// A class request to an interface: `bmRequestType` 0xa1 (GET) or 0x21 (SET).
fn req(request: u8, selector: u8, interface: u8, entity: u8, length: u16) -> CtrlRequest {
    let get = request & 0x80 != 0;
    CtrlRequest {
        request_type: if get { 0xa1 } else { 0x21 },
        request,
        value: u16::from(selector) << 8,
        index: (u16::from(entity) << 8) | u16::from(interface),
        length,
    }
}

fn probe(format: u8, frame: u8, interval: u32) -> [u8; STREAMING_CONTROL_LEN] {
    StreamingControl {
        hint: 1,
        format_index: format,
        frame_index: frame,
        frame_interval: interval,
        ..Default::default()
    }
    .to_bytes()
}

#[test]
fn the_setup_packet_is_read_little_endian() {
    // GET_CUR of the probe control on interface 1, 34 bytes, as the kernel hands it over.
    let r = CtrlRequest::from_bytes(&[0xa1, 0x81, 0x00, 0x01, 0x01, 0x00, 0x22, 0x00]);
    assert_eq!(r, req(GET_CUR, 1, 1, 0, 34));
}

#[test]
fn the_streaming_control_round_trips_in_34_bytes() {
    let c = StreamingControl {
        hint: 1,
        format_index: 2,
        frame_index: 1,
        frame_interval: 333_333,
        max_video_frame_size: 614_400,
        max_payload_transfer_size: 3072,
        clock_frequency: 48_000_000,
        framing_info: 3,
        preferred_version: 1,
        min_version: 1,
        max_version: 1,
        ..Default::default()
    };
    let b = c.to_bytes();
    assert_eq!(&b[..8], &[1, 0, 2, 1, 0x15, 0x16, 0x05, 0x00]);
    assert_eq!(&b[18..22], &614_400u32.to_le_bytes());
    assert_eq!(StreamingControl::from_bytes(&b), c);
}

#[test]
fn defaults_minimum_and_maximum_describe_offered_streams() {
    let mut n = negotiation();
    let def = n.setup(&req(GET_DEF, 1, 1, 0, 34));
    assert_eq!(def.length, 34);
    let d = StreamingControl::from_bytes(def.payload());
    assert_eq!((d.format_index, d.frame_index, d.frame_interval), (1, 1, 333_333));
    assert_eq!(d.max_video_frame_size, 1280 * 720 * 2);
    assert_eq!(d.max_payload_transfer_size, 3072);
    assert_eq!(n.setup(&req(GET_MIN, 1, 1, 0, 34)).payload(), def.payload());
    let max = StreamingControl::from_bytes(n.setup(&req(GET_MAX, 1, 1, 0, 34)).payload());
    assert_eq!((max.format_index, max.frame_index, max.frame_interval), (2, 1, 666_666));
    // GET_CUR before any SET_CUR: the default.
    assert_eq!(n.setup(&req(GET_CUR, 1, 1, 0, 34)).payload(), def.payload());
}

#[test]
fn probe_then_commit_gives_the_stream_the_pc_chose() {
    let mut n = negotiation();
    // SET_CUR is accepted with the length of its data stage.
    let set = n.setup(&req(SET_CUR, 1, 1, 0, 34));
    assert_eq!((set.length, set.is_stall()), (34, false));
    assert_eq!(n.data(&probe(1, 2, 666_666)), DataOutcome::Probed);
    let cur = StreamingControl::from_bytes(n.setup(&req(GET_CUR, 1, 1, 0, 34)).payload());
    assert_eq!((cur.format_index, cur.frame_index, cur.frame_interval), (1, 2, 666_666));
    assert_eq!(cur.max_video_frame_size, 640 * 480 * 2);
    assert_eq!(cur.hint, 1);
    n.setup(&req(SET_CUR, 2, 1, 0, 34));
    let committed = n.data(&cur.to_bytes());
    let want = StreamFormat {
        pixel: Pixel::Mjpeg,
        width: 640,
        height: 480,
        interval: 666_666,
        max_frame_bytes: 614_400,
    };
    assert_eq!(committed, DataOutcome::Committed(want));
    assert_eq!(n.committed(), want);
    assert!((want.fps() - 15.0).abs() < 0.01);
    // The commit control reads back what was committed.
    let commit = StreamingControl::from_bytes(n.setup(&req(GET_CUR, 2, 1, 0, 34)).payload());
    assert_eq!((commit.format_index, commit.frame_index), (1, 2));
}

#[test]
fn what_we_do_not_offer_is_fitted_to_what_we_do() {
    let mut n = negotiation();
    // An unknown format and frame: the first; an odd interval: the nearest offered.
    n.setup(&req(SET_CUR, 1, 1, 0, 34));
    n.data(&probe(9, 7, 400_000));
    let cur = StreamingControl::from_bytes(n.setup(&req(GET_CUR, 1, 1, 0, 34)).payload());
    assert_eq!((cur.format_index, cur.frame_index, cur.frame_interval), (1, 1, 333_333));
    // YUYV has one size; asking for its second gives its first.
    n.setup(&req(SET_CUR, 1, 1, 0, 34));
    n.data(&probe(2, 2, 10_000_000));
    let cur = StreamingControl::from_bytes(n.setup(&req(GET_CUR, 1, 1, 0, 34)).payload());
    assert_eq!((cur.format_index, cur.frame_index, cur.frame_interval), (2, 1, 666_666));
}

#[test]
fn a_uvc_1_0_host_sends_and_reads_26_bytes() {
    let mut n = negotiation();
    let set = n.setup(&req(SET_CUR, 1, 1, 0, 26));
    assert_eq!(set.length, 26);
    assert_eq!(n.data(&probe(2, 1, 333_333)[..26]), DataOutcome::Probed);
    let cur = n.setup(&req(GET_CUR, 1, 1, 0, 26));
    assert_eq!(cur.length, 26);
    assert_eq!(cur.payload()[2..4], [2, 1]);
}

#[test]
fn info_and_length_of_the_streaming_controls() {
    let mut n = negotiation();
    assert_eq!(n.setup(&req(GET_INFO, 1, 1, 0, 1)).payload(), [0x03]);
    assert_eq!(n.setup(&req(GET_LEN, 2, 1, 0, 2)).payload(), [34, 0]);
    // The commit control has no minimum or maximum.
    assert!(n.setup(&req(GET_MIN, 2, 1, 0, 34)).is_stall());
    assert_eq!(n.error_code(), 0x07);
}

#[test]
fn controls_we_do_not_expose_stall_and_the_error_code_says_why() {
    let mut n = negotiation();
    // Auto-exposure mode of the camera terminal (entity 1) and brightness of the
    // processing unit (entity 2): not exposed (bmControls = 0).
    assert!(n.setup(&req(GET_INFO, 0x02, 0, 1, 1)).is_stall());
    assert_eq!(n.setup(&req(GET_CUR, 0x02, 0, 0, 1)).payload(), [0x06], "invalid control");
    assert!(n.setup(&req(SET_CUR, 0x02, 0, 2, 2)).is_stall());
    // An unknown request code on the probe control: invalid request.
    assert!(n.setup(&req(0x99, 1, 1, 0, 34)).is_stall());
    assert_eq!(n.setup(&req(GET_CUR, 0x02, 0, 0, 1)).payload(), [0x07]);
    // A successful request clears it.
    n.setup(&req(GET_CUR, 1, 1, 0, 34));
    assert_eq!(n.setup(&req(GET_CUR, 0x02, 0, 0, 1)).payload(), [0x00]);
    assert_eq!(n.setup(&req(GET_INFO, 0x02, 0, 0, 1)).payload(), [0x01]);
    // A standard (not class) request never reaches us as ours to answer.
    let standard = CtrlRequest { request_type: 0x80, request: 0x06, value: 0x0100, index: 0, length: 18 };
    assert!(n.setup(&standard).is_stall());
}

#[test]
fn data_without_a_set_cur_is_ignored() {
    let mut n = negotiation();
    assert_eq!(n.data(&probe(2, 1, 333_333)), DataOutcome::Unexpected);
    // A GET between SET_CUR and its data cancels the wait.
    n.setup(&req(SET_CUR, 1, 1, 0, 34));
    n.setup(&req(GET_CUR, 1, 1, 0, 34));
    assert_eq!(n.data(&probe(2, 1, 333_333)), DataOutcome::Unexpected);
}

#[test]
fn responses_are_cut_to_the_length_the_pc_asked_for() {
    let mut n = negotiation();
    assert_eq!(n.setup(&req(GET_CUR, 1, 1, 0, 8)).length, 8);
    assert_eq!(n.setup(&req(GET_INFO, 1, 1, 0, 0)).length, 0);
}

/// One step of a recorded session: a SETUP packet and our answer (a GET's data, or for
/// a SET_CUR the accepted length), or the data stage of a SET_CUR.
enum Step {
    Setup(&'static str, i32, &'static str),
    Data(&'static str),
}

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

/// Linux 6.12's `uvcvideo` opening the box's webcam in the VM system test (from the
/// daemon's trace log, `scripts/vm-test`): GET_DEF of the probe, SET_CUR with it,
/// GET_CUR; SET_CUR at its own choice (YUYV 640x480, 666 666 × 100 ns: the frame
/// descriptor's default, 15 fps), GET_MIN, GET_MAX, SET_CUR again, GET_CUR, and the
/// commit. The answers are the ones the box gave; they must not change by accident.
#[test]
fn a_recorded_session_with_linux_uvcvideo_gives_the_same_answers() {
    // The qemu-virt board's webcam: YUYV 640x480 at 30 and 15 fps, 3072-byte packets.
    let formats = vec![FormatDesc {
        index: 1,
        pixel: Pixel::Yuyv,
        frames: vec![FrameSize { index: 1, width: 640, height: 480, intervals: vec![333_333, 666_666] }],
    }];
    let mut n = Negotiation::new(formats, IFACES, 3072);
    const DEF: &str = "00 00 01 01 15 16 05 00 00 00 00 00 00 00 00 00 00 00 00 60 09 00 00 0c 00 00 00 6c dc 02 03 01 01 01";
    const ASKED: &str = "01 00 01 01 2a 2c 0a 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00";
    const FITTED: &str = "01 00 01 01 2a 2c 0a 00 00 00 00 00 00 00 00 00 00 00 00 60 09 00 00 0c 00 00 00 6c dc 02 03 01 01 01";
    const MAX: &str = "00 00 01 01 2a 2c 0a 00 00 00 00 00 00 00 00 00 00 00 00 60 09 00 00 0c 00 00 00 6c dc 02 03 01 01 01";
    let session = [
        Step::Setup("a1 87 00 01 01 00 22 00", 34, DEF),
        Step::Setup("21 01 00 01 01 00 22 00", 34, ""),
        Step::Data(DEF),
        Step::Setup("a1 81 00 01 01 00 22 00", 34, DEF),
        Step::Setup("21 01 00 01 01 00 22 00", 34, ""),
        Step::Data(ASKED),
        Step::Setup("a1 82 00 01 01 00 22 00", 34, DEF),
        Step::Setup("a1 83 00 01 01 00 22 00", 34, MAX),
        Step::Setup("21 01 00 01 01 00 22 00", 34, ""),
        Step::Data(ASKED),
        Step::Setup("a1 81 00 01 01 00 22 00", 34, FITTED),
        // The commit: the probe as the PC read it back.
        Step::Setup("21 01 00 02 01 00 22 00", 34, ""),
        Step::Data(FITTED),
    ];
    let mut last = None;
    for (i, step) in session.iter().enumerate() {
        match step {
            Step::Setup(setup, length, payload) => {
                let b: [u8; 8] = hex(setup).try_into().unwrap();
                let r = n.setup(&CtrlRequest::from_bytes(&b));
                assert_eq!(r.length, *length, "step {i}: {setup}");
                if !payload.is_empty() {
                    assert_eq!(r.payload(), &hex(payload)[..], "step {i}: {setup}");
                }
            }
            Step::Data(data) => last = Some(n.data(&hex(data))),
        }
    }
    let want = StreamFormat {
        pixel: Pixel::Yuyv,
        width: 640,
        height: 480,
        interval: 666_666,
        max_frame_bytes: 614_400,
    };
    assert_eq!(last, Some(DataOutcome::Committed(want)));
}
