//! Configuration: the embedded default, the user's TOML merged over it, and validation
//! into types that cannot hold an invalid value.
//!
//! Parsing happens in two steps, as in ripgrep: the merged TOML is deserialised into a
//! raw mirror of the file (collecting every unknown key on the way), then validated
//! into [`Config`], collecting every error with its key. A config is either fully valid
//! or rejected with the whole list, never half-applied.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::duration::{parse_span, Span};

/// The default configuration, shipped inside the binary (`deskcam config default`).
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// Retention can be shortened but never stretched beyond this (privacy invariant 5).
pub const MAX_RETENTION: Span = Span(20 * 86_400_000);

/// How far in the future a stamp may be and still count as now: the evidence store
/// stamps a burst of findings a millisecond apart to keep their order, so its newest
/// stamps can run slightly ahead of the clock.
pub const FUTURE_SLACK_MS: u64 = 60_000;

/// Whether evidence made at `created_ms` must be gone at `now_ms`: older than `max_age`,
/// or stamped well in the future (the clock was set back, so its age is unknown).
pub fn past_retention(created_ms: u64, now_ms: u64, max_age_ms: u64) -> bool {
    if created_ms > now_ms {
        return created_ms - now_ms > FUTURE_SLACK_MS;
    }
    now_ms - created_ms >= max_age_ms
}

/// One problem in a config file: the dotted key and why it is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.key, self.reason)
        }
    }
}

/// Every problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} error{} in config:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn one(key: &str, reason: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError { key: key.into(), reason: reason.into() }])
    }
}

// ---------------------------------------------------------------------------------
// Raw mirror of the file. Field names are the config keys.

#[derive(Deserialize)]
struct Raw {
    device_id: String,
    board: String,
    preset: String,
    shift: RawShift,
    storage: RawStorage,
    breaks: RawBreaks,
    camera: RawCamera,
    detector: RawDetector,
    mqtt: RawMqtt,
    scan: RawScan,
    rules: RawRules,
    evidence: RawEvidence,
    homeassistant: RawHomeAssistant,
    usb: RawUsb,
}

#[derive(Deserialize)]
struct RawUsb {
    enabled: bool,
    vendor_id: i64,
    product_id: i64,
    manufacturer: String,
    product: String,
    page: String,
    uplink_via_pc: bool,
}

#[derive(Deserialize)]
struct RawHomeAssistant {
    enabled: bool,
    prefix: String,
}

#[derive(Deserialize)]
struct RawShift {
    timezone: String,
    days: Vec<String>,
    start: String,
    end: String,
}

#[derive(Deserialize)]
struct RawStorage {
    data_dir: String,
    audit_max_bytes: i64,
}

#[derive(Deserialize)]
struct RawBreaks {
    max_break: String,
}

#[derive(Deserialize)]
struct RawCamera {
    source: String,
    width: i64,
    height: i64,
    timeout: String,
    retry: String,
    #[serde(rename = "loop")]
    looped: bool,
}

#[derive(Deserialize)]
struct RawDetector {
    model: String,
    min_score: f64,
    nms_iou: f64,
}

#[derive(Deserialize)]
struct RawMqtt {
    url: String,
    base_topic: String,
    keep_alive: String,
    telemetry_s: i64,
    username: String,
    password: String,
    ca_file: String,
    cert_file: String,
    key_file: String,
}

#[derive(Deserialize)]
struct RawScan {
    mode: String,
    fps: f64,
    per_hour: f64,
    min_gap: String,
    frames_per_check: i64,
    times: Vec<String>,
    warning_s: i64,
}

#[derive(Deserialize)]
struct RawRules {
    phone: RawObjectRule,
    paper: RawObjectRule,
    extra_person: RawExtraPerson,
    absent: RawAbsent,
    covered: RawCovered,
}

#[derive(Deserialize)]
struct RawObjectRule {
    enabled: bool,
    min_score: f64,
    frames: i64,
    cooldown: String,
    region: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct RawExtraPerson {
    enabled: bool,
    min_score: f64,
    min_count: i64,
    frames: i64,
    cooldown: String,
}

#[derive(Deserialize)]
struct RawAbsent {
    enabled: bool,
    min_score: f64,
    grace: String,
    frames: i64,
    cooldown: String,
}

#[derive(Deserialize)]
struct RawCovered {
    enabled: bool,
    max_stddev: f64,
    frames: i64,
    cooldown: String,
}

#[derive(Deserialize)]
struct RawEvidence {
    redaction: String,
    person_min_score: f64,
    region: Vec<Vec<f64>>,
    max_age: String,
    max_bytes: i64,
    jpeg_quality: i64,
}

// ---------------------------------------------------------------------------------
// Validated configuration.

/// A device id: safe as one MQTT topic level and as a file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where frames come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A V4L2 capture device such as `/dev/video0`.
    V4l2(PathBuf),
    /// JPEG/PNG photos in a directory, in name order (demo and tests).
    Dir(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
pub struct CameraConfig {
    pub source: SourceSpec,
    pub width: u32,
    pub height: u32,
    pub timeout: Span,
    /// The first gap before a lost camera is tried again; the gaps double.
    pub retry: Span,
    pub looped: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DetectorConfig {
    /// `None` means "auto": the daemon looks in the install and source locations.
    pub model: Option<PathBuf>,
    pub min_score: f32,
    pub nms_iou: f32,
}

/// A broker address from `mqtt://host:port` or `mqtts://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    /// The broker is on the box itself (its traffic never leaves it).
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
    }

    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!("'{url}' must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            // [::1]:1883
            let (h, p) = v6.split_once(']').ok_or_else(|| format!("'{url}': unclosed '['"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("'{url}': expected mqtt://host:port"));
        }
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("'{url}': port '{p}' is not a number in 1..65535"))?,
        };
        Ok(BrokerUrl { tls, host, port })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MqttConfig {
    pub url: BrokerUrl,
    pub base_topic: String,
    pub keep_alive: Span,
    /// Seconds between `telemetry` messages; 0: none.
    pub telemetry_s: u32,
    /// Username and password, if the broker asks for them.
    pub credentials: Option<(String, String)>,
    /// TLS (`mqtts://`): the CA that signed the broker's certificate.
    pub ca_file: Option<PathBuf>,
    /// TLS client certificate and its key, if the broker asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Keys whose values never leave the device (`config` topic, `config/get`).
pub const SECRET_KEYS: &[&str] = &["mqtt.password"];
/// What a secret shows as when it is set.
pub const REDACTED: &str = "(set)";

/// A regional preset: the scan modes a jurisdiction allows. A config asking for a mode
/// its preset forbids is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// No restriction beyond the design's invariants.
    None,
    /// Unannounced spot checks are not allowed.
    NoSpotChecks,
    /// Only checks announced by the LED beforehand (`scheduled`), or none.
    AnnouncedOnly,
    /// Monitoring is not allowed at all: the camera is never opened.
    NoMonitoring,
}

impl Preset {
    pub const ALL: [Preset; 4] =
        [Preset::None, Preset::NoSpotChecks, Preset::AnnouncedOnly, Preset::NoMonitoring];

    pub fn name(self) -> &'static str {
        match self {
            Preset::None => "none",
            Preset::NoSpotChecks => "no-spot-checks",
            Preset::AnnouncedOnly => "announced-only",
            Preset::NoMonitoring => "no-monitoring",
        }
    }

    /// The modes this preset allows, by name.
    pub fn allowed_modes(self) -> &'static [&'static str] {
        match self {
            Preset::None => &["continuous", "spot", "scheduled", "off"],
            Preset::NoSpotChecks => &["continuous", "scheduled", "off"],
            Preset::AnnouncedOnly => &["scheduled", "off"],
            Preset::NoMonitoring => &["off"],
        }
    }
}

/// When the camera may look.
#[derive(Clone, Debug, PartialEq)]
pub enum ScanMode {
    /// Analyse `fps` frames per second.
    Continuous { fps: f32 },
    /// Random spot checks, `per_hour` on average, never closer than `min_gap`.
    Spot { per_hour: f32, min_gap: Span },
    /// Checks at fixed local times (minutes of the day), announced by the LED
    /// `warning` before each.
    Scheduled { times: Vec<u16>, warning: Span },
    /// The camera is never opened.
    Off,
}

impl ScanMode {
    pub fn name(&self) -> &'static str {
        match self {
            ScanMode::Continuous { .. } => "continuous",
            ScanMode::Spot { .. } => "spot",
            ScanMode::Scheduled { .. } => "scheduled",
            ScanMode::Off => "off",
        }
    }
}

/// A polygon in frame-relative coordinates (0..1); empty means the whole frame.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Region(pub Vec<(f32, f32)>);

impl Region {
    /// Whether a point, in frame-relative coordinates, lies inside the region
    /// (even-odd rule).
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let pts = &self.0;
        if pts.is_empty() {
            return true;
        }
        let mut inside = false;
        let mut j = pts.len() - 1;
        for i in 0..pts.len() {
            let (xi, yi) = pts[i];
            let (xj, yj) = pts[j];
            if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                inside = !inside;
            }
            j = i;
        }
        inside
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ObjectRule {
    pub enabled: bool,
    pub min_score: f32,
    pub frames: u32,
    pub cooldown: Span,
    pub region: Region,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExtraPersonRule {
    pub enabled: bool,
    pub min_score: f32,
    pub min_count: u32,
    pub frames: u32,
    pub cooldown: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AbsentRule {
    pub enabled: bool,
    pub min_score: f32,
    pub grace: Span,
    pub frames: u32,
    pub cooldown: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CoveredRule {
    pub enabled: bool,
    pub max_stddev: f32,
    pub frames: u32,
    pub cooldown: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RulesConfig {
    pub phone: ObjectRule,
    pub paper: ObjectRule,
    pub extra_person: ExtraPersonRule,
    pub absent: AbsentRule,
    pub covered: CoveredRule,
}

/// What a violation's still may show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redaction {
    /// No still at all: the event carries metadata only.
    MetadataOnly,
    /// The whole frame with every person pixelated.
    BlurPeople,
    /// Only the offending object's box with a margin, people in it pixelated.
    CropToObject,
    /// The frame as captured. Allowed by the design, never the default.
    None,
}

impl Redaction {
    pub fn name(self) -> &'static str {
        match self {
            Redaction::MetadataOnly => "metadata-only",
            Redaction::BlurPeople => "blur-people",
            Redaction::CropToObject => "crop-to-object",
            Redaction::None => "none",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvidenceConfig {
    pub redaction: Redaction,
    pub person_min_score: f32,
    /// Everything outside this polygon is black in a still (empty: the whole frame).
    pub region: Region,
    pub max_age: Span,
    pub max_bytes: u64,
    pub jpeg_quality: u8,
}

/// The USB device side: a webcam for the worker's meetings and a network link to the
/// worker's page. The serial number is the device id.
#[derive(Clone, Debug, PartialEq)]
pub struct UsbConfig {
    pub enabled: bool,
    pub vendor_id: u16,
    pub product_id: u16,
    pub manufacturer: String,
    pub product: String,
    pub page: PageServing,
    /// The box's way out (MQTT) through the worker's PC, for a box without a network of
    /// its own: a route via the PC on the USB link, after any other (README).
    pub uplink_via_pc: bool,
}

/// Where the daemon serves the worker's page (always on the USB link's address only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageServing {
    /// Where this daemon runs the USB gadget (the link is its NCM function).
    WithGadget,
    /// Also without the gadget: the link's address is made by someone else (a board
    /// whose USB side another program sets up, or a test's network namespace).
    Always,
}

/// A validated configuration. Only [`Config::from_toml`] and [`Config::default`] make one.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub device_id: DeviceId,
    pub board: String,
    pub preset: Preset,
    pub camera: CameraConfig,
    pub detector: DetectorConfig,
    pub mqtt: MqttConfig,
    pub shift: crate::schedule::Shift,
    pub max_break: Span,
    /// Where the audit log (and later the evidence queue) is kept.
    pub data_dir: PathBuf,
    pub audit_max_bytes: u64,
    pub scan: ScanMode,
    /// Frames taken by one spot check or scan-now.
    pub frames_per_check: u32,
    pub rules: RulesConfig,
    pub evidence: EvidenceConfig,
    /// Home Assistant discovery prefix, when discovery is on.
    pub homeassistant: Option<String>,
    /// The box as the worker's PC sees it over USB (boards with a device controller).
    pub usb: UsbConfig,
    /// The merged TOML this config was validated from (for `config` reporting).
    effective: toml::Table,
    /// What the config file said (the keys it changes), for patches.
    user: toml::Table,
}

/// Keys that a running daemon cannot change: they name the device, its camera, broker
/// and storage, or the model. A patch of them is saved and applies at the next start.
pub const RESTART_KEYS: &[&str] = &[
    "device_id",
    "board",
    "camera",
    "mqtt",
    "storage",
    "detector.model",
    "evidence.max_age",
    "evidence.max_bytes",
];

/// Keys that are not set over MQTT, only in the file on the device: the regional preset
/// (the owner's legal limit) and what decides how much of a still is hidden (redaction
/// level, blur threshold, desk region), so the fleet owner cannot widen what leaves the
/// device (privacy invariant 3); and the USB side, which is the worker's (their webcam
/// and their page, invariant 8), not the fleet owner's to switch off.
pub const LOCAL_ONLY_KEYS: &[&str] =
    &["preset", "evidence.redaction", "evidence.person_min_score", "evidence.region", "usb"];

/// A validated patch: the config to run now, the file to save, and which changed keys
/// wait for a restart.
#[derive(Clone, Debug)]
pub struct Patched {
    /// The new config with the [`RESTART_KEYS`] kept as they are running.
    pub live: Config,
    /// The config file's new contents (TOML): the old file's keys with the patch.
    pub file: String,
    /// Changed keys that take effect at the next start.
    pub restart: Vec<String>,
    /// Every key whose effective value changed.
    pub changed: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        // The embedded default is validated by a unit test, so this cannot fail in a
        // released binary.
        Config::from_toml("").expect("embedded default config is valid")
    }
}

impl Config {
    /// Parses `text` as TOML, merges it over the embedded default and validates the
    /// result. Reports every problem found, each with its key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let user: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors::one("", format!("not valid TOML: {}", e.message()))
        })?;
        Self::from_table(user)
    }

    /// Like [`Config::from_toml`] for an already parsed table.
    pub fn from_table(user: toml::Table) -> Result<Config, ConfigErrors> {
        let mut merged: toml::Table = DEFAULT_TOML.parse().expect("embedded default is TOML");
        let mut errors = Vec::new();
        merge(&mut merged, user.clone(), "", &mut errors);
        let mut unknown = Vec::new();
        let raw: Result<Raw, _> = serde_ignored::deserialize(toml::Value::Table(merged.clone()), |path| {
            unknown.push(path.to_string())
        });
        for key in unknown {
            errors.push(ConfigError { key, reason: "unknown key".into() });
        }
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                errors.push(ConfigError { key: String::new(), reason: e.to_string() });
                return Err(ConfigErrors(errors));
            }
        };
        let mut v = Validator { errors };
        let mut config = v.validate(raw, merged);
        config.user = user;
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }

    /// The effective configuration as TOML, with secrets removed.
    pub fn effective_toml(&self) -> String {
        toml::to_string(&self.redacted()).unwrap_or_default()
    }

    /// The effective configuration as JSON, with secrets removed.
    pub fn effective_json(&self) -> serde_json::Value {
        serde_json::to_value(self.redacted()).unwrap_or(serde_json::Value::Null)
    }

    /// The effective table with every secret that is set replaced by [`REDACTED`].
    fn redacted(&self) -> toml::Table {
        let mut t = self.effective.clone();
        for key in SECRET_KEYS {
            if get_path(&t, key).and_then(toml::Value::as_str).is_some_and(|v| !v.is_empty()) {
                set_path(&mut t, key, Some(toml::Value::String(REDACTED.into())));
            }
        }
        t
    }

    /// Applies a JSON merge patch (RFC 7386: an object's keys are set, `null` removes a
    /// key so it falls back to its default) to the config file's keys, and validates
    /// the result as a whole. Nothing changes unless everything is valid.
    pub fn patched(
        &self,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Patched, ConfigErrors> {
        let mut errors = Vec::new();
        for key in LOCAL_ONLY_KEYS {
            if patch_touches(patch, key) {
                errors.push(ConfigError {
                    key: (*key).into(),
                    reason: "is set in the config file on the device, not over MQTT".into(),
                });
            }
        }
        let mut user = self.user.clone();
        apply_patch(&mut user, patch, "", &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let file = toml::to_string(&user).map_err(|e| ConfigErrors::one("", e.to_string()))?;
        let next = Config::from_table(user)?;
        // Changed relative to the file, not to what runs: a key already saved and
        // waiting for a restart is not reported again.
        let before = Config::from_table(self.user.clone())?;
        let mut changed = Vec::new();
        diff(&before.effective, &next.effective, "", &mut changed);
        let restart: Vec<String> = changed
            .iter()
            .filter(|k| RESTART_KEYS.iter().any(|r| *k == r || k.starts_with(&format!("{r}."))))
            .cloned()
            .collect();
        // The running daemon keeps its restart keys: rebuild the live config from the
        // new effective table with those values put back.
        let mut live_table = next.effective.clone();
        for key in RESTART_KEYS {
            set_path(&mut live_table, key, get_path(&self.effective, key).cloned());
        }
        let mut live = Config::from_table(live_table)?;
        live.user = next.user.clone();
        Ok(Patched { live, file, restart, changed })
    }
}

/// Whether a merge patch changes the dotted `key`: sets it, or replaces or removes
/// (`null`) a table it is in.
fn patch_touches(patch: &serde_json::Map<String, serde_json::Value>, key: &str) -> bool {
    let mut table = patch;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        match table.get(part) {
            None => return false,
            Some(serde_json::Value::Object(inner)) if parts.peek().is_some() => table = inner,
            Some(_) => return true,
        }
    }
    false
}

/// `a.b.c` in a table.
fn get_path<'a>(t: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

fn set_path(t: &mut toml::Table, path: &str, value: Option<toml::Value>) {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (Some(parent), last),
        None => (None, path),
    };
    let mut table = t;
    if let Some(parent) = parent {
        for p in parent.split('.') {
            let Some(toml::Value::Table(next)) = table.get_mut(p) else { return };
            table = next;
        }
    }
    match value {
        Some(v) => {
            table.insert(last.to_string(), v);
        }
        None => {
            table.remove(last);
        }
    }
}

/// The keys (dotted, down to values) whose values differ between two tables.
fn diff(a: &toml::Table, b: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (a.get(k), b.get(k)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => diff(x, y, &key, out),
            (x, y) if x != y => out.push(key),
            _ => {}
        }
    }
}

/// RFC 7386 merge of a JSON object into a TOML table.
fn apply_patch(
    t: &mut toml::Table,
    patch: &serde_json::Map<String, serde_json::Value>,
    prefix: &str,
    errors: &mut Vec<ConfigError>,
) {
    for (k, v) in patch {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            serde_json::Value::Null => {
                t.remove(k);
            }
            serde_json::Value::Object(inner) => {
                let entry = t.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(sub) => apply_patch(sub, inner, &key, errors),
                    // A table where the file has a value: let validation name the key.
                    other => match toml::Value::try_from(v) {
                        Ok(value) => *other = value,
                        Err(e) => errors.push(ConfigError { key, reason: e.to_string() }),
                    },
                }
            }
            _ => match toml::Value::try_from(v) {
                Ok(value) => {
                    t.insert(k.clone(), value);
                }
                Err(e) => errors.push(ConfigError { key, reason: format!("cannot be stored in TOML: {e}") }),
            },
        }
    }
}

/// Deep-merges `user` into `base`. A key the default does not have is kept so that the
/// deserialiser reports it as unknown; a table given where a value is expected (or the
/// reverse) is an error here because serde's message would lack the key.
fn merge(base: &mut toml::Table, user: toml::Table, prefix: &str, errors: &mut Vec<ConfigError>) {
    for (k, v) in user {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u, &key, errors),
            (Some(toml::Value::Table(_)), _) => {
                errors.push(ConfigError { key, reason: "expected a table ([section])".into() })
            }
            (Some(old), v) => {
                if old.type_str() != v.type_str() && !(old.is_float() && v.is_integer()) {
                    errors.push(ConfigError {
                        key,
                        reason: format!(
                            "expected {}, found {}",
                            article(old.type_str()),
                            article(v.type_str())
                        ),
                    });
                } else if old.is_float() && v.is_integer() {
                    *old = toml::Value::Float(v.as_integer().unwrap_or_default() as f64);
                } else {
                    *old = v;
                }
            }
            (None, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn article(t: &str) -> String {
    match t {
        "integer" | "array" => format!("an {t}"),
        _ => format!("a {t}"),
    }
}

struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    fn err(&mut self, key: &str, reason: impl Into<String>) {
        self.errors.push(ConfigError { key: key.into(), reason: reason.into() });
    }

    fn span(&mut self, key: &str, text: &str) -> Span {
        parse_span(text).unwrap_or_else(|e| {
            self.err(key, e);
            Span(0)
        })
    }

    fn fraction(&mut self, key: &str, v: f64) -> f32 {
        if !(0.0..=1.0).contains(&v) {
            self.err(key, format!("{v} is outside 0..1"));
        }
        v as f32
    }

    fn int_in(&mut self, key: &str, v: i64, lo: i64, hi: i64) -> u32 {
        if v < lo || v > hi {
            self.err(key, format!("{v} is outside {lo}..{hi}"));
            return lo as u32;
        }
        v as u32
    }

    /// A USB string descriptor: printable ASCII (what every host shows alike), 1-63
    /// characters.
    fn usb_string(&mut self, key: &str, v: String) -> String {
        if v.is_empty() || v.len() > 63 || !v.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            self.err(key, format!("'{v}' must be 1-63 printable ASCII characters"));
        }
        v
    }

    fn region(&mut self, key: &str, pts: &[Vec<f64>]) -> Region {
        if pts.is_empty() {
            return Region::default();
        }
        if pts.len() < 3 {
            self.err(key, "a region needs at least 3 points, or [] for the whole frame");
        }
        let mut out = Vec::with_capacity(pts.len());
        for (i, p) in pts.iter().enumerate() {
            if p.len() != 2 || p.iter().any(|c| !(0.0..=1.0).contains(c)) {
                self.err(key, format!("point {i} must be [x, y] with both in 0..1"));
                continue;
            }
            out.push((p[0] as f32, p[1] as f32));
        }
        Region(out)
    }

    fn object_rule(&mut self, key: &str, r: RawObjectRule) -> ObjectRule {
        ObjectRule {
            enabled: r.enabled,
            min_score: self.fraction(&format!("{key}.min_score"), r.min_score),
            frames: self.int_in(&format!("{key}.frames"), r.frames, 1, 100),
            cooldown: self.span(&format!("{key}.cooldown"), &r.cooldown),
            region: self.region(&format!("{key}.region"), &r.region),
        }
    }

    fn validate(&mut self, raw: Raw, effective: toml::Table) -> Config {
        let id_ok = !raw.device_id.is_empty()
            && raw.device_id.len() <= 64
            && raw.device_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            self.err("device_id", format!("'{}' must be 1-64 letters, digits, '-' or '_'", raw.device_id));
        }
        if raw.board.is_empty()
            || !raw.board.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.err("board", format!("'{}' is not a board name (see board-configs/)", raw.board));
        }

        let source = if let Some(p) = raw.camera.source.strip_prefix("v4l2:") {
            SourceSpec::V4l2(PathBuf::from(p))
        } else if let Some(p) = raw.camera.source.strip_prefix("dir:") {
            SourceSpec::Dir(PathBuf::from(p))
        } else {
            self.err(
                "camera.source",
                format!("'{}' must be \"v4l2:/dev/videoN\" or \"dir:/path/to/photos\"", raw.camera.source),
            );
            SourceSpec::Dir(PathBuf::new())
        };
        if matches!(&source, SourceSpec::V4l2(p) | SourceSpec::Dir(p) if p.as_os_str().is_empty())
            && (raw.camera.source.starts_with("v4l2:") || raw.camera.source.starts_with("dir:"))
        {
            self.err("camera.source", "the path after the prefix is empty");
        }
        let width = self.int_in("camera.width", raw.camera.width, 16, 4096);
        let height = self.int_in("camera.height", raw.camera.height, 16, 4096);
        if !width.is_multiple_of(2) {
            self.err("camera.width", "must be even (YUYV packs two pixels)");
        }
        let timeout = self.span("camera.timeout", &raw.camera.timeout);
        if !(100..=60_000).contains(&timeout.0) {
            self.err("camera.timeout", "must be between 100ms and 60s");
        }
        let retry = self.span("camera.retry", &raw.camera.retry);
        if !(1_000..=300_000).contains(&retry.0) {
            self.err("camera.retry", "must be between 1s and 5m");
        }

        let model = match raw.detector.model.as_str() {
            "auto" => None,
            "" => {
                self.err("detector.model", "empty path (use \"auto\" to search the usual places)");
                None
            }
            p => Some(PathBuf::from(p)),
        };
        let detector = DetectorConfig {
            model,
            min_score: self.fraction("detector.min_score", raw.detector.min_score),
            nms_iou: self.fraction("detector.nms_iou", raw.detector.nms_iou),
        };

        let url = BrokerUrl::parse(&raw.mqtt.url).unwrap_or_else(|e| {
            self.err("mqtt.url", e);
            BrokerUrl { tls: false, host: String::new(), port: 1883 }
        });
        let bt = &raw.mqtt.base_topic;
        if bt.is_empty() || bt.contains(['+', '#', '\0']) || bt.starts_with('/') || bt.ends_with('/') {
            self.err(
                "mqtt.base_topic",
                format!("'{bt}' must be a non-empty topic without wildcards or leading/trailing '/'"),
            );
        }
        let keep_alive = self.span("mqtt.keep_alive", &raw.mqtt.keep_alive);
        if !(5_000..=3_600_000).contains(&keep_alive.0) {
            self.err("mqtt.keep_alive", "must be between 5s and 1h");
        }
        let ha = &raw.homeassistant;
        if ha.enabled && (ha.prefix.is_empty() || ha.prefix.contains(['+', '#', '\0', '/'])) {
            self.err(
                "homeassistant.prefix",
                format!("'{}' must be one topic level without wildcards", ha.prefix),
            );
        }
        let homeassistant = ha.enabled.then(|| ha.prefix.clone());
        let telemetry_s = self.int_in("mqtt.telemetry_s", raw.mqtt.telemetry_s, 0, 86_400);
        let m = &raw.mqtt;
        let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
        let credentials = match (m.username.is_empty(), m.password.is_empty()) {
            (true, true) => None,
            (false, _) => Some((m.username.clone(), m.password.clone())),
            (true, false) => {
                self.err("mqtt.password", "is set without mqtt.username");
                None
            }
        };
        let ca_file = path(&m.ca_file);
        if url.tls && ca_file.is_none() {
            self.err("mqtt.ca_file", "mqtts:// needs the CA certificate (PEM) that signed the broker's");
        }
        if !url.tls && (ca_file.is_some() || !m.cert_file.is_empty()) {
            self.err("mqtt.url", "TLS files are set but the URL is mqtt://; use mqtts://");
        }
        let client_cert = match (path(&m.cert_file), path(&m.key_file)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                self.err("mqtt.key_file", "mqtt.cert_file needs its private key");
                None
            }
            (None, Some(_)) => {
                self.err("mqtt.cert_file", "mqtt.key_file needs its certificate");
                None
            }
        };

        let scan = match raw.scan.mode.as_str() {
            "continuous" => {
                if !(raw.scan.fps > 0.0 && raw.scan.fps <= 30.0) {
                    self.err("scan.fps", format!("{} is outside (0, 30]", raw.scan.fps));
                }
                ScanMode::Continuous { fps: raw.scan.fps as f32 }
            }
            "spot" => {
                if !(raw.scan.per_hour > 0.0 && raw.scan.per_hour <= 60.0) {
                    self.err("scan.per_hour", format!("{} is outside (0, 60]", raw.scan.per_hour));
                }
                let min_gap = self.span("scan.min_gap", &raw.scan.min_gap);
                if min_gap.0 > 86_400_000 {
                    self.err("scan.min_gap", "must be at most 1d");
                }
                ScanMode::Spot { per_hour: raw.scan.per_hour as f32, min_gap }
            }
            "off" => ScanMode::Off,
            "scheduled" => {
                let mut times = Vec::new();
                for t in &raw.scan.times {
                    match crate::schedule::parse_clock(t) {
                        Ok(m) if m < 1440 => times.push(m),
                        Ok(_) => self.err("scan.times", "24:00 is not a time of a check; use 00:00"),
                        Err(e) => self.err("scan.times", e),
                    }
                }
                if raw.scan.times.is_empty() {
                    self.err("scan.times", "scheduled mode needs at least one time, e.g. [\"10:00\"]");
                }
                let warning = self.int_in("scan.warning_s", raw.scan.warning_s, 0, 3600);
                ScanMode::Scheduled { times, warning: Span::from_secs(warning as u64) }
            }
            other => {
                self.err("scan.mode", format!("'{other}' is not one of continuous, spot, scheduled, off"));
                ScanMode::Off
            }
        };

        let preset = Preset::ALL.into_iter().find(|p| p.name() == raw.preset).unwrap_or_else(|| {
            self.err(
                "preset",
                format!("'{}' is not one of none, no-spot-checks, announced-only, no-monitoring", raw.preset),
            );
            Preset::None
        });
        // (An unknown mode has its own error above.)
        let mode = raw.scan.mode.as_str();
        if Preset::None.allowed_modes().contains(&mode) && !preset.allowed_modes().contains(&mode) {
            self.err(
                "scan.mode",
                format!(
                    "'{}' is not allowed by preset '{}' (allowed: {})",
                    raw.scan.mode,
                    preset.name(),
                    preset.allowed_modes().join(", ")
                ),
            );
        }

        let r = raw.rules;
        let rules = RulesConfig {
            phone: self.object_rule("rules.phone", r.phone),
            paper: self.object_rule("rules.paper", r.paper),
            extra_person: ExtraPersonRule {
                enabled: r.extra_person.enabled,
                min_score: self.fraction("rules.extra_person.min_score", r.extra_person.min_score),
                min_count: self.int_in("rules.extra_person.min_count", r.extra_person.min_count, 2, 50),
                frames: self.int_in("rules.extra_person.frames", r.extra_person.frames, 1, 100),
                cooldown: self.span("rules.extra_person.cooldown", &r.extra_person.cooldown),
            },
            absent: AbsentRule {
                enabled: r.absent.enabled,
                min_score: self.fraction("rules.absent.min_score", r.absent.min_score),
                grace: self.span("rules.absent.grace", &r.absent.grace),
                frames: self.int_in("rules.absent.frames", r.absent.frames, 1, 100),
                cooldown: self.span("rules.absent.cooldown", &r.absent.cooldown),
            },
            covered: CoveredRule {
                enabled: r.covered.enabled,
                max_stddev: {
                    if !(0.0..=128.0).contains(&r.covered.max_stddev) {
                        self.err(
                            "rules.covered.max_stddev",
                            format!("{} is outside 0..128", r.covered.max_stddev),
                        );
                    }
                    r.covered.max_stddev as f32
                },
                frames: self.int_in("rules.covered.frames", r.covered.frames, 1, 100),
                cooldown: self.span("rules.covered.cooldown", &r.covered.cooldown),
            },
        };

        let shift = crate::schedule::Shift::new(
            &raw.shift.timezone,
            &raw.shift.days,
            &raw.shift.start,
            &raw.shift.end,
        )
        .unwrap_or_else(|errs| {
            for (field, reason) in errs {
                self.err(&format!("shift.{field}"), reason);
            }
            crate::schedule::Shift::always()
        });
        if raw.storage.data_dir.is_empty() {
            self.err("storage.data_dir", "must be a directory path");
        }
        let audit_max_bytes =
            self.int_in("storage.audit_max_bytes", raw.storage.audit_max_bytes, 4096, 1 << 30) as u64;
        let max_break = self.span("breaks.max_break", &raw.breaks.max_break);
        if !(60_000..=86_400_000).contains(&max_break.0) {
            self.err("breaks.max_break", "must be between 1m and 1d");
        }
        let frames_per_check = self.int_in("scan.frames_per_check", raw.scan.frames_per_check, 1, 20);
        if matches!(scan, ScanMode::Spot { .. } | ScanMode::Scheduled { .. }) {
            // A check is the only look: a debounce longer than it can never fire.
            let rs = &rules;
            for (key, enabled, frames) in [
                ("rules.phone.frames", rs.phone.enabled, rs.phone.frames),
                ("rules.paper.frames", rs.paper.enabled, rs.paper.frames),
                ("rules.extra_person.frames", rs.extra_person.enabled, rs.extra_person.frames),
                ("rules.absent.frames", rs.absent.enabled, rs.absent.frames),
                ("rules.covered.frames", rs.covered.enabled, rs.covered.frames),
            ] {
                if enabled && frames > frames_per_check {
                    self.err(key, format!("{frames} frames can never be seen in a check of scan.frames_per_check = {frames_per_check}"));
                }
            }
        }

        let redaction = match raw.evidence.redaction.as_str() {
            "metadata-only" => Redaction::MetadataOnly,
            "blur-people" => Redaction::BlurPeople,
            "crop-to-object" => Redaction::CropToObject,
            "none" => Redaction::None,
            other => {
                self.err(
                    "evidence.redaction",
                    format!("'{other}' is not one of metadata-only, blur-people, crop-to-object, none"),
                );
                Redaction::BlurPeople
            }
        };
        let max_age = self.span("evidence.max_age", &raw.evidence.max_age);
        if max_age > MAX_RETENTION {
            self.err("evidence.max_age", format!("{max_age} is longer than the limit of {MAX_RETENTION}"));
        } else if max_age.0 == 0 {
            self.err("evidence.max_age", "must be longer than 0");
        }
        let person_min_score = self.fraction("evidence.person_min_score", raw.evidence.person_min_score);
        if detector.min_score > person_min_score {
            self.err(
                "evidence.person_min_score",
                format!(
                    "{person_min_score} is below detector.min_score = {}: people scored in between would not be blurred",
                    detector.min_score
                ),
            );
        }
        let evidence = EvidenceConfig {
            redaction,
            person_min_score,
            region: self.region("evidence.region", &raw.evidence.region),
            max_age,
            max_bytes: self.int_in("evidence.max_bytes", raw.evidence.max_bytes, 1 << 20, i64::from(u32::MAX))
                as u64,
            jpeg_quality: self.int_in("evidence.jpeg_quality", raw.evidence.jpeg_quality, 1, 100) as u8,
        };
        let usb = UsbConfig {
            enabled: raw.usb.enabled,
            vendor_id: self.int_in("usb.vendor_id", raw.usb.vendor_id, 0, 0xffff) as u16,
            product_id: self.int_in("usb.product_id", raw.usb.product_id, 0, 0xffff) as u16,
            manufacturer: self.usb_string("usb.manufacturer", raw.usb.manufacturer),
            product: self.usb_string("usb.product", raw.usb.product),
            page: match raw.usb.page.as_str() {
                "with-gadget" => PageServing::WithGadget,
                "always" => PageServing::Always,
                other => {
                    self.err("usb.page", format!("'{other}' is not one of with-gadget, always"));
                    PageServing::WithGadget
                }
            },
            uplink_via_pc: raw.usb.uplink_via_pc,
        };
        // Through the worker's PC only encrypted and with the broker's certificate checked:
        // in clear, the PC could read the box's messages and change its commands.
        if usb.uplink_via_pc && !url.tls && !url.is_loopback() {
            self.err(
                "usb.uplink_via_pc",
                "MQTT through the PC needs an mqtts:// broker (in clear the PC could read and change it)",
            );
        }

        Config {
            device_id: DeviceId(raw.device_id),
            board: raw.board,
            preset,
            shift,
            max_break,
            data_dir: PathBuf::from(raw.storage.data_dir),
            audit_max_bytes,
            camera: CameraConfig { source, width, height, timeout, retry, looped: raw.camera.looped },
            detector,
            mqtt: MqttConfig {
                url,
                base_topic: raw.mqtt.base_topic,
                keep_alive,
                telemetry_s,
                credentials,
                ca_file,
                client_cert,
            },
            scan,
            usb,
            frames_per_check,
            rules,
            evidence,
            homeassistant,
            effective,
            user: toml::Table::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(e: &ConfigErrors) -> Vec<&str> {
        e.0.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn embedded_default_is_valid_and_matches_design() {
        let c = Config::default();
        assert_eq!(c.device_id.as_str(), "desk-0001");
        assert_eq!(c.camera.source, SourceSpec::V4l2("/dev/video0".into()));
        assert_eq!(c.scan.name(), "spot");
        assert_eq!(c.evidence.redaction, Redaction::BlurPeople);
        assert_eq!(c.evidence.max_age, Span(7 * 86_400_000));
        assert_eq!(c.mqtt.url, BrokerUrl { tls: false, host: "127.0.0.1".into(), port: 1883 });
    }

    #[test]
    fn user_values_override_defaults() {
        let c = Config::from_toml(
            "device_id = \"desk-7\"\n[camera]\nsource = \"dir:/tmp/x\"\n[scan]\nmode = \"continuous\"\nfps = 2\n",
        )
        .unwrap();
        assert_eq!(c.device_id.as_str(), "desk-7");
        assert_eq!(c.camera.source, SourceSpec::Dir("/tmp/x".into()));
        assert_eq!(c.scan, ScanMode::Continuous { fps: 2.0 });
        assert_eq!(c.camera.width, 640, "unchanged keys keep the default");
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let e = Config::from_toml(
            r#"
device_id = "bad id!"
colour = "blue"
[camera]
sourc = "v4l2:/dev/video0"
width = 7
[scan]
mode = "sometimes"
[rules.phone]
min_score = 1.5
[evidence]
max_age = "30d"
redaction = "pixelate"
"#,
        )
        .unwrap_err();
        let k = keys(&e);
        for want in [
            "device_id",
            "colour",
            "camera.sourc",
            "camera.width",
            "scan.mode",
            "rules.phone.min_score",
            "evidence.max_age",
            "evidence.redaction",
        ] {
            assert!(k.contains(&want), "missing error for {want}: {e}");
        }
        assert!(e.to_string().contains("unknown key"));
    }

    #[test]
    fn wrong_types_and_bad_toml_are_errors() {
        let e = Config::from_toml("[camera]\nwidth = \"wide\"\n").unwrap_err();
        assert_eq!(keys(&e), vec!["camera.width"]);
        assert!(e.0[0].reason.contains("expected an integer, found a string"), "{e}");
        let e = Config::from_toml("camera = 3").unwrap_err();
        assert_eq!(keys(&e), vec!["camera"]);
        let e = Config::from_toml("[camera\n").unwrap_err();
        assert!(e.to_string().contains("not valid TOML"));
    }

    #[test]
    fn spot_checks_must_be_long_enough_for_the_debounce() {
        let e = Config::from_toml("[scan]\nmode = \"spot\"\nframes_per_check = 2\n").unwrap_err();
        assert!(keys(&e).contains(&"rules.phone.frames"), "{e}");
        assert!(Config::from_toml("[scan]\nmode = \"continuous\"\nframes_per_check = 2\n").is_ok());
    }

    #[test]
    fn people_below_the_detector_threshold_could_not_be_blurred() {
        let e = Config::from_toml("[detector]\nmin_score = 0.5\n").unwrap_err();
        assert_eq!(keys(&e), vec!["evidence.person_min_score"]);
    }

    #[test]
    fn shift_and_schedule_errors_name_their_keys() {
        let e = Config::from_toml(
            "[shift]\ntimezone = \"Nowhere/City\"\nstart = \"9am\"\n[scan]\nmode = \"scheduled\"\ntimes = [\"10:00\", \"25:00\"]\n\
             [breaks]\nmax_break = \"10s\"\n",
        )
        .unwrap_err();
        for key in ["shift.timezone", "shift.start", "scan.times", "breaks.max_break"] {
            assert!(keys(&e).contains(&key), "{key} missing: {e}");
        }
        let c = Config::from_toml(
            "[shift]\ntimezone = \"Europe/Berlin\"\n[scan]\nmode = \"scheduled\"\ntimes = [\"10:00\", \"15:30\"]\nwarning_s = 45\n",
        )
        .unwrap();
        assert_eq!(c.scan, ScanMode::Scheduled { times: vec![600, 930], warning: Span::from_secs(45) });
        assert_eq!(c.shift.timezone(), "Europe/Berlin");
    }

    #[test]
    fn presets_reject_the_modes_they_forbid() {
        let e = Config::from_toml("preset = \"no-spot-checks\"\n[scan]\nmode = \"spot\"\n").unwrap_err();
        assert_eq!(keys(&e), vec!["scan.mode"]);
        assert!(e.0[0].reason.contains("not allowed by preset 'no-spot-checks'"), "{e}");
        let e = Config::from_toml("preset = \"no-monitoring\"\n[scan]\nmode = \"continuous\"\n").unwrap_err();
        assert!(e.0[0].reason.contains("allowed: off"), "{e}");
        assert!(Config::from_toml("preset = \"no-monitoring\"\n[scan]\nmode = \"off\"\n").is_ok());
        assert!(Config::from_toml("preset = \"announced-only\"\n[scan]\nmode = \"scheduled\"\n").is_ok());
        assert!(Config::from_toml("preset = \"announced-only\"\n[scan]\nmode = \"continuous\"\n").is_err());
        let e = Config::from_toml("preset = \"lax\"\n").unwrap_err();
        assert_eq!(keys(&e), vec!["preset"]);
    }

    #[test]
    fn retention_is_capped_at_twenty_days() {
        assert!(Config::from_toml("[evidence]\nmax_age = \"20d\"").is_ok());
        assert!(Config::from_toml("[evidence]\nmax_age = \"21d\"").is_err());
        assert!(Config::from_toml("[evidence]\nmax_age = \"0s\"").is_err());
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example:8884").unwrap(),
            BrokerUrl { tls: true, host: "broker.example".into(), port: 8884 }
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1999").unwrap().host, "::1");
        assert_eq!(BrokerUrl::parse("mqtt://h").unwrap().port, 1883);
        assert!(BrokerUrl::parse("http://h:1").is_err());
        assert!(BrokerUrl::parse("mqtt://h:0").is_err());
        assert!(BrokerUrl::parse("mqtt://h:99999").is_err());
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1999").unwrap().to_string(), "mqtt://[::1]:1999");
    }

    #[test]
    fn region_polygon() {
        let c = Config::from_toml("[rules.phone]\nregion = [[0.0, 0.5], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0]]")
            .unwrap();
        assert!(c.rules.phone.region.contains(0.5, 0.75));
        assert!(!c.rules.phone.region.contains(0.5, 0.25));
        assert!(Region::default().contains(0.1, 0.1));
        let e = Config::from_toml("[rules.phone]\nregion = [[0.0, 0.5], [2.0, 0.5]]").unwrap_err();
        assert_eq!(keys(&e), vec!["rules.phone.region", "rules.phone.region"]);
    }

    fn patch(json: &str) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn patches_apply_live_or_at_restart_and_keep_the_file_keys() {
        let c = Config::from_toml("device_id = \"d1\"\n[scan]\nmode = \"off\"\n").unwrap();
        let p = c.patched(&patch(r#"{"scan": {"mode": "continuous", "fps": 2}}"#)).unwrap();
        assert_eq!(p.live.scan, ScanMode::Continuous { fps: 2.0 });
        assert_eq!(p.changed, ["scan.fps", "scan.mode"]);
        assert!(p.restart.is_empty());
        let saved = Config::from_toml(&p.file).unwrap();
        assert_eq!(saved.device_id.as_str(), "d1", "the file's own keys stay");
        assert_eq!(saved.scan, p.live.scan);

        // A broker change is saved but waits for a restart; live keys in the same patch apply.
        let p = c
            .patched(&patch(
                r#"{"mqtt": {"url": "mqtt://10.0.0.9:1883"}, "rules": {"phone": {"frames": 1}}}"#,
            ))
            .unwrap();
        assert_eq!(p.restart, ["mqtt.url"]);
        assert_eq!(p.live.mqtt.url, c.mqtt.url, "the running daemon keeps its broker");
        assert_eq!(p.live.rules.phone.frames, 1);
        assert_eq!(Config::from_toml(&p.file).unwrap().mqtt.url.to_string(), "mqtt://10.0.0.9:1883");

        // null removes the file's key: back to the default.
        let p = c.patched(&patch(r#"{"scan": {"mode": null}}"#)).unwrap();
        assert_eq!(p.live.scan.name(), "spot");
        assert_eq!(c.patched(&patch("{}")).unwrap().changed, Vec::<String>::new());
    }

    #[test]
    fn the_usb_identity_is_checked_and_not_set_over_mqtt() {
        let c = Config::default();
        assert_eq!((c.usb.vendor_id, c.usb.product_id, c.usb.enabled), (0x1d6b, 0x0104, true));
        assert_eq!(c.usb.page, PageServing::WithGadget);
        assert!(!c.usb.uplink_via_pc, "the PC carries nothing for the box unless asked");
        let clear =
            Config::from_toml("[usb]\nuplink_via_pc = true\n[mqtt]\nurl = \"mqtt://10.0.0.9:1883\"\n")
                .unwrap_err()
                .to_string();
        assert!(clear.contains("usb.uplink_via_pc") && clear.contains("mqtts://"), "{clear}");
        let local =
            Config::from_toml("[usb]\nuplink_via_pc = true\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n");
        assert!(local.is_ok_and(|c| c.usb.uplink_via_pc), "a broker on the box never goes through the PC");
        for host in ["localhost", "[::1]"] {
            let url = format!("[usb]\nuplink_via_pc = true\n[mqtt]\nurl = \"mqtt://{host}:1883\"\n");
            assert!(Config::from_toml(&url).is_ok(), "{host}");
        }
        let e = Config::from_toml("[usb]\nvendor_id = 70000\nproduct = \"caf\u{00e9}\"\npage = \"never\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("usb.vendor_id") && e.contains("usb.product") && e.contains("usb.page"), "{e}");
        let always = Config::from_toml("[usb]\npage = \"always\"\n").unwrap();
        assert_eq!(always.usb.page, PageServing::Always);
        let patch = serde_json::json!({"usb": {"enabled": false}});
        let e = c.patched(patch.as_object().unwrap()).unwrap_err().to_string();
        assert!(e.contains("usb") && e.contains("not over MQTT"), "{e}");
    }

    #[test]
    fn bad_patches_change_nothing_and_name_the_key() {
        let c = Config::from_toml("preset = \"no-spot-checks\"\n[scan]\nmode = \"off\"\n").unwrap();
        let e = c.patched(&patch(r#"{"scan": {"mode": "spot"}}"#)).unwrap_err();
        assert!(e.to_string().contains("not allowed by preset 'no-spot-checks'"), "{e}");
        let e = c.patched(&patch(r#"{"preset": "none"}"#)).unwrap_err();
        assert_eq!(keys(&e), ["preset"]);
        // What a still hides is set on the device only, also through a parent table.
        for (p, key) in [
            (r#"{"evidence": {"redaction": "none"}}"#, "evidence.redaction"),
            (r#"{"evidence": {"person_min_score": 0.9}}"#, "evidence.person_min_score"),
            (r#"{"evidence": {"region": []}}"#, "evidence.region"),
            (r#"{"evidence": null}"#, "evidence.redaction"),
        ] {
            let e = c.patched(&patch(p)).unwrap_err();
            assert!(keys(&e).contains(&key), "{p}: {e}");
        }
        assert!(
            c.patched(&patch(r#"{"evidence": {"jpeg_quality": 70}}"#)).is_ok(),
            "other evidence keys may change"
        );
        let e = c
            .patched(&patch(r#"{"scan": {"fps": "fast"}, "evidence": {"max_age": "30d"}, "nope": 1}"#))
            .unwrap_err();
        let k = keys(&e);
        for want in ["scan.fps", "evidence.max_age", "nope"] {
            assert!(k.contains(&want), "{want} in {k:?}");
        }
        let e = c.patched(&patch(r#"{"scan": {"times": [null]}}"#)).unwrap_err();
        assert_eq!(keys(&e), ["scan.times"]);
        assert_eq!(c.scan, ScanMode::Off, "the running config is untouched");
    }
}
