//! Home Assistant MQTT discovery (optional, `[homeassistant]`): the device announces a
//! binary sensor per rule (on when that rule fires, off again after a minute), a switch
//! for break mode and a sensor with the last scan's result, each tied to the device's
//! availability (`status`). Only metadata the device publishes anyway is referenced.
//!
//! <https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery>

use serde_json::{json, Value};

use crate::rules::RuleKind;
use crate::schema::{Topics, STATUS_OFFLINE, STATUS_ONLINE};

/// How long a rule's binary sensor stays on after a violation.
pub const RULE_ON_S: u32 = 60;

/// The retained discovery messages: (topic, config).
pub fn discovery(
    prefix: &str,
    topics: &Topics,
    device_id: &str,
    board: &str,
    firmware: &str,
) -> Vec<(String, Value)> {
    let node = format!("deskcam_{}", device_id.replace('-', "_"));
    let device = json!({
        "identifiers": [node],
        "name": format!("deskcam {device_id}"),
        "manufacturer": "deskcam",
        "model": board,
        "sw_version": firmware,
    });
    let common = |name: &str, key: &str| {
        json!({
            "name": name,
            "unique_id": format!("{node}_{key}"),
            "object_id": format!("{node}_{key}"),
            "device": device,
            "availability_topic": topics.status(),
            "payload_available": STATUS_ONLINE,
            "payload_not_available": STATUS_OFFLINE,
        })
    };
    let mut out = Vec::new();
    for rule in RuleKind::ALL {
        let name = rule.name();
        let mut c = common(&format!("{name} violation"), name);
        c["state_topic"] = json!(topics.violation());
        // Events of other rules are not about this sensor: HA ignores a payload that is
        // neither ON nor OFF.
        c["value_template"] = json!(format!("{{{{ 'ON' if value_json.rule == '{name}' else 'other' }}}}"));
        c["payload_on"] = json!("ON");
        c["payload_off"] = json!("OFF");
        c["off_delay"] = json!(RULE_ON_S);
        c["device_class"] = json!("problem");
        out.push((format!("{prefix}/binary_sensor/{node}/{name}/config"), c));
    }
    let mut c = common("break", "break");
    c["command_topic"] = json!(format!("{}/cmd/break/set", topics.root()));
    c["payload_on"] = json!(r#"{"on":true,"reason":"Home Assistant"}"#);
    c["payload_off"] = json!(r#"{"on":false}"#);
    c["state_topic"] = json!(topics.state());
    c["value_template"] = json!("{{ 'ON' if value_json['break'] else 'OFF' }}");
    c["state_on"] = json!("ON");
    c["state_off"] = json!("OFF");
    c["icon"] = json!("mdi:coffee");
    out.push((format!("{prefix}/switch/{node}/break/config"), c));
    let mut c = common("last scan", "last_scan");
    c["state_topic"] = json!(topics.audit());
    c["value_template"] = json!("{{ value_json.result }}");
    c["json_attributes_topic"] = json!(topics.audit());
    c["icon"] = json!("mdi:cctv");
    out.push((format!("{prefix}/sensor/{node}/last_scan/config"), c));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entity_per_rule_plus_break_switch_and_last_scan() {
        let topics = Topics::new("deskcam", "desk-7");
        let d = discovery("homeassistant", &topics, "desk-7", "rpi5", "0.1.0");
        assert_eq!(d.len(), RuleKind::ALL.len() + 2);
        let ids: std::collections::HashSet<&str> =
            d.iter().map(|(_, c)| c["unique_id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), d.len(), "unique ids");
        let (topic, phone) = &d[0];
        assert_eq!(topic, "homeassistant/binary_sensor/deskcam_desk_7/phone/config");
        assert_eq!(phone["state_topic"], "deskcam/desk-7/event/violation");
        assert_eq!(phone["value_template"], "{{ 'ON' if value_json.rule == 'phone' else 'other' }}");
        assert_eq!(phone["availability_topic"], "deskcam/desk-7/status");
        let (_, switch) = &d[RuleKind::ALL.len()];
        assert_eq!(switch["command_topic"], "deskcam/desk-7/cmd/break/set");
        // The switch's payloads are valid commands.
        for p in ["payload_on", "payload_off"] {
            let parsed = crate::command::parse("break/set", switch[p].as_str().unwrap().as_bytes());
            assert!(parsed.command.is_ok(), "{p}: {parsed:?}");
        }
        for (topic, c) in &d {
            assert!(topic.starts_with("homeassistant/") && topic.ends_with("/config"));
            assert_eq!(c["device"]["identifiers"][0], "deskcam_desk_7");
        }
    }
}
