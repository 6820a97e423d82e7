//! The MQTT topic tree and the JSON payloads of everything the device publishes.
//! Every payload carries `v`, the schema version, so consumers can evolve with us.

use serde::{Deserialize, Serialize};

use crate::detection::{BBox, Detection};
use crate::rules::RuleKind;

/// Schema version of every JSON payload.
pub const SCHEMA_VERSION: u32 = 1;

/// The topics of one device: `<base>/<device-id>/...`. The only way to build a topic,
/// so nothing can be published outside the device's subtree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Topics {
    pub fn new(base_topic: &str, device_id: &str) -> Self {
        Topics { root: format!("{base_topic}/{device_id}") }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn status(&self) -> String {
        format!("{}/status", self.root)
    }

    pub fn state(&self) -> String {
        format!("{}/state", self.root)
    }

    pub fn violation(&self) -> String {
        format!("{}/event/violation", self.root)
    }

    pub fn still(&self, event_id: &str) -> String {
        format!("{}/event/violation/{event_id}/still", self.root)
    }

    pub fn audit(&self) -> String {
        format!("{}/audit", self.root)
    }

    /// The effective config, retained, secrets removed.
    pub fn config(&self) -> String {
        format!("{}/config", self.root)
    }

    pub fn telemetry(&self) -> String {
        format!("{}/telemetry", self.root)
    }

    /// The subscription filter for commands: `<root>/cmd/#`.
    pub fn commands(&self) -> String {
        format!("{}/cmd/#", self.root)
    }

    /// The command name of a topic under `cmd/`, e.g. `break/start`.
    pub fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(self.root.as_str())?.strip_prefix("/cmd/")
    }

    pub fn reply(&self) -> String {
        format!("{}/reply", self.root)
    }
}

/// Payloads of the retained `status` topic (the last will says `offline`).
pub const STATUS_ONLINE: &str = "online";
pub const STATUS_OFFLINE: &str = "offline";

/// The retained `state` message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub v: u32,
    pub device_id: String,
    pub mode: String,
    /// `open`, `closed`, or `fault` (the end-stop did not confirm closing).
    pub shutter: String,
    #[serde(rename = "break")]
    pub on_break: bool,
    /// `ok`, or `lost` while the camera is missing, unplugged or stalled.
    pub camera: String,
    pub firmware: String,
    pub model: ModelInfo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub sha256: String,
}

/// One object box in an event, in pixels of the analysed frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventBox {
    pub class: String,
    pub score: f32,
    pub bbox: BBox,
}

impl From<&Detection> for EventBox {
    fn from(d: &Detection) -> Self {
        EventBox { class: d.label().to_string(), score: d.score, bbox: d.bbox }
    }
}

/// Describes the still published separately on `event/violation/<id>/still`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StillInfo {
    pub sha256: String,
    pub size: usize,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub redaction: String,
    /// Regions pixelated in the still (people), in pixels of the still.
    pub redacted: Vec<BBox>,
}

/// The `event/violation` message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViolationEvent {
    pub v: u32,
    pub id: String,
    pub device_id: String,
    /// RFC 3339 UTC.
    pub time: String,
    pub rule: RuleKind,
    pub score: f32,
    pub boxes: Vec<EventBox>,
    pub frame: FrameSize,
    /// The camera device, or the photo's file name for a photo directory.
    pub origin: String,
    /// `None` when the redaction level is `metadata-only`.
    pub still: Option<StillInfo>,
}

/// The answer to a command that carried an `id` (and to every refused one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub id: Option<String>,
    pub command: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the command returns (`config/get`, `config/set`, `evidence/list`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// The periodic `telemetry` message: how the device is doing, never what it saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub v: u32,
    pub uptime_s: u64,
    /// Frames analysed since start.
    pub frames: u64,
    /// Inference time over the most recent frames (up to 200), if any.
    pub inference_ms: Option<Percentiles>,
    /// Items dropped by each bounded queue since start (oldest first).
    pub drops: QueueDrops,
    pub store: StoreTelemetry,
    /// Free space where the device keeps its data, if known.
    pub disk_free_bytes: Option<u64>,
    /// SoC temperature, where the board reports one.
    pub cpu_temp_c: Option<f32>,
    pub mqtt_connects: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f32,
    pub p95: f32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueDrops {
    pub audit: u64,
    pub replies: u64,
    pub commands: u64,
    /// Button presses not taken in time.
    #[serde(default)]
    pub button: u64,
    /// Evidence evicted from the store for space (`evidence.max_bytes`).
    pub evidence_evicted: u64,
    /// Evidence deleted unsent at `evidence.max_age`.
    pub evidence_expired: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreTelemetry {
    pub entries: u64,
    /// Entries the broker has not acknowledged yet.
    pub undelivered: u64,
    pub bytes: u64,
}

/// What a scan came to, in the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanResult {
    /// Looked, found nothing.
    Clear,
    /// Looked, one or more rules fired.
    Violation,
    /// A scheduled scan fell outside the shift or into a break and was not taken.
    Skipped,
    /// A check fell due while the worker's PC streamed from the webcam; it is taken
    /// after the call (invariant 7).
    Deferred,
    /// The camera failed (missing, unplugged, stalled); nothing was looked at.
    /// Recorded once per outage; retries follow with growing gaps.
    CameraLost,
    /// The camera is back after an outage.
    CameraBack,
    /// The end-stop did not confirm that the shutter closed: the camera stays closed
    /// until the device is serviced.
    ShutterFault,
}

impl ScanResult {
    /// `violation` when any rule fired, else `clear`.
    pub fn from_rules(rules: &[RuleKind]) -> Self {
        if rules.is_empty() {
            ScanResult::Clear
        } else {
            ScanResult::Violation
        }
    }
}

/// One line of the audit log (`audit` topic, `audit.jsonl` on the device): every scan,
/// with or without a finding. Never an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub v: u32,
    /// RFC 3339 UTC.
    pub time: String,
    pub mode: String,
    pub result: ScanResult,
    /// Frames analysed in this scan.
    pub frames: u32,
    /// Rules that fired (empty unless `result` is `violation`).
    pub rules: Vec<RuleKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameSize {
    pub width: u32,
    pub height: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_stay_in_the_device_subtree() {
        let t = Topics::new("deskcam", "desk-1");
        assert_eq!(t.status(), "deskcam/desk-1/status");
        assert_eq!(t.still("e1"), "deskcam/desk-1/event/violation/e1/still");
        for topic in [t.status(), t.state(), t.violation(), t.still("x"), t.audit()] {
            assert!(topic.starts_with("deskcam/desk-1/"));
        }
    }

    #[test]
    fn audit_entry_has_no_room_for_an_image() {
        let e = AuditEntry {
            v: SCHEMA_VERSION,
            time: "t".into(),
            mode: "spot".into(),
            result: ScanResult::Violation,
            frames: 3,
            rules: vec![RuleKind::Phone],
        };
        let j = serde_json::to_value(&e).unwrap();
        let keys: Vec<&String> = j.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["frames", "mode", "result", "rules", "time", "v"]);
        assert_eq!(j["result"], "violation");
    }

    #[test]
    fn event_json_has_version_and_rule_name() {
        let e = ViolationEvent {
            v: SCHEMA_VERSION,
            id: "e1".into(),
            device_id: "d".into(),
            time: "1970-01-01T00:00:00.000Z".into(),
            rule: RuleKind::ExtraPerson,
            score: 0.5,
            boxes: vec![],
            frame: FrameSize { width: 640, height: 480 },
            origin: "/dev/video0".into(),
            still: None,
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["v"], 1);
        assert_eq!(j["rule"], "extra_person");
        assert!(j["still"].is_null());
        let back: ViolationEvent = serde_json::from_value(j).unwrap();
        assert_eq!(back, e);
    }
}
