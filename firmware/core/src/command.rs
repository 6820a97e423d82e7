//! Commands from the fleet owner (`cmd/<name>` topics): parsed and validated here, so a
//! bad command is refused with a clear reason before anything changes.

use serde::Deserialize;
use serde_json::Value;

/// Larger payloads are refused unread.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// A valid command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    ScanNow,
    BreakStart {
        reason: String,
    },
    BreakEnd,
    EvidenceAck {
        evidence: String,
    },
    /// What evidence the device holds.
    EvidenceList,
    /// One piece of evidence: its event in the reply, its still published again.
    EvidenceGet {
        evidence: String,
    },
    /// Switch the scan mode (saved in the config, like `config/set`).
    Mode {
        mode: String,
    },
    ConfigGet,
    /// A JSON merge patch of the config (from `patch`, or from `toml` text).
    ConfigSet {
        patch: serde_json::Map<String, Value>,
    },
    /// Show the identify LED pattern for this many seconds (1-60).
    Identify {
        seconds: u32,
    },
}

/// A command as received: its `id` (echoed in the reply) and what it asks, or why it
/// cannot be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub id: Option<String>,
    pub command: Result<Command, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {
    // Accepted here so unknown fields can be refused; checked separately above.
    #[serde(default, rename = "id")]
    _id: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakStart {
    // Accepted here so unknown fields can be refused; checked separately above.
    #[serde(default, rename = "id")]
    _id: Option<Value>,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Identify {
    // Accepted here so unknown fields can be refused; checked separately above.
    #[serde(default, rename = "id")]
    _id: Option<Value>,
    #[serde(default = "identify_default")]
    seconds: u32,
}

fn identify_default() -> u32 {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvidenceAck {
    // Accepted here so unknown fields can be refused; checked separately above.
    #[serde(default, rename = "id")]
    _id: Option<Value>,
    evidence: String,
}

/// `break/set`: one topic for both directions (Home Assistant's switch).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakSet {
    // Accepted here so unknown fields can be refused; checked separately above.
    #[serde(default, rename = "id")]
    _id: Option<Value>,
    on: bool,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mode {
    // Accepted here so unknown fields can be refused; checked separately above.
    #[serde(default, rename = "id")]
    _id: Option<Value>,
    mode: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigSet {
    // Accepted here so unknown fields can be refused; checked separately above.
    #[serde(default, rename = "id")]
    _id: Option<Value>,
    patch: Option<serde_json::Map<String, Value>>,
    toml: Option<String>,
}

/// The scan modes a `mode` command may name.
pub const MODES: [&str; 4] = ["continuous", "spot", "scheduled", "off"];

fn token_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn break_start(name: &str, reason: &str) -> Result<Command, String> {
    let reason = reason.trim().to_string();
    if reason.is_empty() || reason.chars().count() > 200 || reason.chars().any(char::is_control) {
        Err(format!("{name}: reason must be 1-200 printable characters"))
    } else {
        Ok(Command::BreakStart { reason })
    }
}

/// Every command name, for help and errors.
pub const KNOWN: [&str; 11] = [
    "scan-now",
    "break/start",
    "break/end",
    "break/set",
    "mode",
    "config/get",
    "config/set",
    "evidence/list",
    "evidence/get",
    "evidence/ack",
    "identify",
];

/// Parses `cmd/<name>` with its payload (a JSON object; empty means `{}`).
pub fn parse(name: &str, payload: &[u8]) -> Parsed {
    if payload.len() > MAX_COMMAND_BYTES {
        return Parsed {
            id: None,
            command: Err(format!("payload of {} bytes is over {MAX_COMMAND_BYTES}", payload.len())),
        };
    }
    let value: Value = if payload.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        match serde_json::from_slice(payload) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Parsed { id: None, command: Err("payload must be a JSON object".into()) },
            Err(e) => return Parsed { id: None, command: Err(format!("payload is not JSON: {e}")) },
        }
    };
    // The id is echoed even when the rest is wrong, so the sender can match the error.
    let id = value.get("id").and_then(Value::as_str).filter(|s| token_ok(s)).map(String::from);
    if let Some(raw) = value.get("id") {
        if !raw.as_str().is_some_and(token_ok) {
            return Parsed { id: None, command: Err("id must be 1-64 letters, digits, '-' or '_'".into()) };
        }
    }
    let bad = |e: serde_json::Error| format!("{name}: {e}");
    let command = match name {
        "scan-now" => serde_json::from_value::<Empty>(value).map(|_| Command::ScanNow).map_err(bad),
        "break/end" => serde_json::from_value::<Empty>(value).map(|_| Command::BreakEnd).map_err(bad),
        "break/start" => serde_json::from_value::<BreakStart>(value)
            .map_err(bad)
            .and_then(|b| break_start(name, &b.reason)),
        "break/set" => {
            serde_json::from_value::<BreakSet>(value).map_err(bad).and_then(|b| match (b.on, b.reason) {
                (true, Some(reason)) => break_start(name, &reason),
                (true, None) => Err("break/set: a break needs a reason".into()),
                (false, None) => Ok(Command::BreakEnd),
                (false, Some(_)) => Err("break/set: a reason only goes with \"on\": true".into()),
            })
        }
        "evidence/ack" | "evidence/get" => {
            serde_json::from_value::<EvidenceAck>(value).map_err(bad).and_then(|a| {
                if !token_ok(&a.evidence) {
                    Err(format!("{name}: evidence must be an event id"))
                } else if name == "evidence/ack" {
                    Ok(Command::EvidenceAck { evidence: a.evidence })
                } else {
                    Ok(Command::EvidenceGet { evidence: a.evidence })
                }
            })
        }
        "evidence/list" => serde_json::from_value::<Empty>(value).map(|_| Command::EvidenceList).map_err(bad),
        "config/get" => serde_json::from_value::<Empty>(value).map(|_| Command::ConfigGet).map_err(bad),
        "mode" => serde_json::from_value::<Mode>(value).map_err(bad).and_then(|m| {
            if MODES.contains(&m.mode.as_str()) {
                Ok(Command::Mode { mode: m.mode })
            } else {
                Err(format!("mode: '{}' is not one of {}", m.mode, MODES.join(", ")))
            }
        }),
        "config/set" => {
            serde_json::from_value::<ConfigSet>(value).map_err(bad).and_then(|c| match (c.patch, c.toml) {
                (Some(patch), None) => Ok(Command::ConfigSet { patch }),
                (None, Some(text)) => match text.parse::<toml::Table>() {
                    Ok(table) => match serde_json::to_value(table) {
                        Ok(Value::Object(patch)) => Ok(Command::ConfigSet { patch }),
                        _ => Err("config/set: the TOML cannot be expressed as a patch".into()),
                    },
                    Err(e) => Err(format!("config/set: toml is not valid TOML: {}", e.message())),
                },
                _ => Err("config/set: give exactly one of `patch` (a JSON object) or `toml` (text)".into()),
            })
        }
        "identify" => serde_json::from_value::<Identify>(value).map_err(bad).and_then(|i| {
            if (1..=60).contains(&i.seconds) {
                Ok(Command::Identify { seconds: i.seconds })
            } else {
                Err("identify: seconds must be 1-60".into())
            }
        }),
        other => Err(format!("unknown command '{other}' (known: {})", KNOWN.join(", "))),
    };
    Parsed { id, command }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_commands() {
        assert_eq!(parse("scan-now", b"").command, Ok(Command::ScanNow));
        let p = parse("break/start", br#"{"id":"c1","reason":" lunch "}"#);
        assert_eq!(p.id.as_deref(), Some("c1"));
        assert_eq!(p.command, Ok(Command::BreakStart { reason: "lunch".into() }));
        assert_eq!(
            parse("evidence/ack", br#"{"evidence":"abc-1"}"#).command,
            Ok(Command::EvidenceAck { evidence: "abc-1".into() })
        );
        assert_eq!(parse("identify", b"").command, Ok(Command::Identify { seconds: 10 }));
        assert!(parse("identify", br#"{"seconds":-3}"#).command.is_err(), "negative durations are refused");
        assert!(parse("identify", br#"{"seconds":600}"#).command.unwrap_err().contains("1-60"));
    }

    #[test]
    fn management_commands() {
        assert_eq!(parse("mode", br#"{"mode":"off"}"#).command, Ok(Command::Mode { mode: "off".into() }));
        assert!(parse("mode", br#"{"mode":"sometimes"}"#).command.unwrap_err().contains("not one of"));
        assert_eq!(parse("config/get", b"").command, Ok(Command::ConfigGet));
        assert_eq!(parse("evidence/list", b"{}").command, Ok(Command::EvidenceList));
        assert_eq!(
            parse("evidence/get", br#"{"evidence":"e-1"}"#).command,
            Ok(Command::EvidenceGet { evidence: "e-1".into() })
        );
        let from_json = parse("config/set", br#"{"patch":{"scan":{"mode":"off"}}}"#).command.unwrap();
        let from_toml = parse("config/set", br#"{"toml":"[scan]\nmode = \"off\"\n"}"#).command.unwrap();
        assert_eq!(from_json, from_toml);
        for (payload, want) in [
            (&br#"{"patch":{},"toml":""}"#[..], "exactly one"),
            (br#"{}"#, "exactly one"),
            (br#"{"patch":[1]}"#, "invalid type"),
            (br#"{"toml":"[scan"}"#, "not valid TOML"),
        ] {
            let err = parse("config/set", payload).command.unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn bad_commands_say_why_and_keep_their_id() {
        let cases: [(&str, &[u8], &str); 9] = [
            ("reboot", b"{}", "unknown command"),
            ("scan-now", b"{not json", "not JSON"),
            ("scan-now", b"[1]", "JSON object"),
            ("scan-now", br#"{"id":"x","force":true}"#, "unknown field"),
            ("break/start", br#"{"id":"x"}"#, "missing field `reason`"),
            ("break/start", br#"{"id":"x","reason":42}"#, "invalid type"),
            ("break/start", br#"{"id":"x","reason":""}"#, "1-200 printable"),
            ("evidence/ack", br#"{"id":"x","evidence":"../../etc"}"#, "event id"),
            ("scan-now", br#"{"id":"bad id!"}"#, "id must be"),
        ];
        for (name, payload, want) in cases {
            let p = parse(name, payload);
            let err = p.command.expect_err(name);
            assert!(err.contains(want), "{name} {:?}: {err}", String::from_utf8_lossy(payload));
        }
        assert_eq!(parse("break/start", br#"{"id":"x"}"#).id.as_deref(), Some("x"));
        assert!(parse("scan-now", &vec![b' '; MAX_COMMAND_BYTES + 1]).command.is_err());
    }
}
