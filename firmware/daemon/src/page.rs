//! The daemon's side of the worker's page (`deskcam-page`): what it shows, read from the
//! running device when the page is asked for, and the break it starts. Served on the
//! USB link's address only (`image/rootfs/etc/systemd/network/10-deskcam-usb.network`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deskcam_core::schedule::Shift;
use deskcam_core::schema::State;
use deskcam_page::{AuditRow, Device, EventRow, Snapshot};
use deskcam_uplink::{lock_store, IncomingCommand, SharedStore};
use deskcam_usb::stream::StreamStats;

use crate::sent::SentLog;

/// The box's address on the USB link, and the link's network.
pub const LINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 199, 77, 1);
pub const LINK_NET: (IpAddr, u8) = (IpAddr::V4(Ipv4Addr::new(10, 199, 77, 0)), 29);
/// Port 80 (the image lets unprivileged services bind it: /etc/sysctl.d/60-deskcam.conf).
pub const PORT: u16 = 80;
/// The newest checks the page lists.
const AUDIT_ROWS: usize = 200;

pub fn address() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(LINK_ADDR), PORT)
}

pub struct PageDevice {
    pub device_id: String,
    pub retention_ms: u64,
    pub state: tokio::sync::watch::Receiver<State>,
    /// The effective config (JSON), as `config/set` leaves it.
    pub config: tokio::sync::watch::Receiver<serde_json::Value>,
    pub store: SharedStore,
    pub audit_path: PathBuf,
    pub sent: Arc<SentLog>,
    pub commands: std::sync::mpsc::SyncSender<IncomingCommand>,
    pub usb: Arc<StreamStats>,
    pub next_id: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The shift and the next announced check, from the effective config.
fn schedule(config: &serde_json::Value, mode: &str, now: u64) -> (String, Option<String>) {
    let shift = &config["shift"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let days: Vec<String> =
        shift["days"].as_array().map(|a| a.iter().map(text).collect()).unwrap_or_default();
    let described = format!(
        "{} {}-{} ({})",
        days.join(", "),
        text(&shift["start"]),
        text(&shift["end"]),
        text(&shift["timezone"])
    );
    let next = match mode {
        "scheduled" => {
            Shift::new(&text(&shift["timezone"]), &days, &text(&shift["start"]), &text(&shift["end"]))
                .ok()
                .and_then(|s| {
                    let times = config["scan"]["times"].as_array()?;
                    times
                        .iter()
                        .filter_map(|t| deskcam_core::schedule::parse_clock(t.as_str()?).ok())
                        .filter_map(|m| s.next_local(now, m))
                        .min()
                })
                .map(|t| format!("{} (announced by the LED first)", deskcam_core::time::rfc3339_utc(t)))
        }
        // Spot checks are random by design: nobody, the worker included, knows the next.
        "spot" => Some("random spot checks: not announced".into()),
        "continuous" => Some("continuous: the camera looks all the time in the shift".into()),
        _ => None,
    };
    (described, next)
}

impl Device for PageDevice {
    fn snapshot(&self) -> Snapshot {
        let now = now_ms();
        let state = self.state.borrow().clone();
        let (shift, next_scan) = schedule(&self.config.borrow(), &state.mode, now);
        let store = lock_store(&self.store);
        let held: std::collections::HashMap<String, bool> =
            store.list().into_iter().map(|s| (s.id, s.delivered)).collect();
        drop(store);
        let events = self
            .sent
            .recent(now)
            .unwrap_or_default()
            .into_iter()
            .map(|s| EventRow {
                still: held.contains_key(&s.id),
                time: deskcam_core::time::rfc3339_utc(s.t),
                rules: match held.get(&s.id) {
                    Some(false) => format!("{} (waiting to be sent)", s.rule),
                    _ => s.rule,
                },
                id: s.id,
            })
            .collect();
        let audit = crate::audit::AuditLog::read_entries(&self.audit_path)
            .unwrap_or_default()
            .into_iter()
            .rev()
            .take(AUDIT_ROWS)
            .map(|a| AuditRow {
                time: a.time,
                result: serde_json::to_value(a.result)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                rules: a.rules.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "),
            })
            .collect();
        Snapshot {
            device_id: self.device_id.clone(),
            mode: state.mode,
            shift,
            next_scan,
            shutter: state.shutter,
            camera: state.camera,
            on_break: state.on_break,
            on_call: self.usb.pc_streaming.load(Ordering::Relaxed),
            retention: format!("{} days", self.retention_ms.div_ceil(86_400_000)),
            events,
            audit,
        }
    }

    fn still(&self, id: &str) -> Option<Vec<u8>> {
        lock_store(&self.store).get(id).ok().flatten().and_then(|e| e.still)
    }

    fn start_break(&self, reason: &str) -> Result<(), String> {
        self.command("break/start", serde_json::json!({ "reason": reason }), true)
    }

    fn end_break(&self) -> Result<(), String> {
        self.command("break/end", serde_json::json!({}), false)
    }
}

impl PageDevice {
    /// Hands a command to the scan loop as MQTT would, and waits (at most 3 s) for the
    /// break state it should lead to.
    fn command(&self, name: &str, mut body: serde_json::Value, on_break: bool) -> Result<(), String> {
        // Already so (a page loaded before the button changed it): the scan loop would
        // refuse, and the wait below would take the old state for success.
        if self.state.borrow().on_break == on_break {
            return Err(if on_break { "already on a break" } else { "no break in progress" }.into());
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        body["id"] = serde_json::Value::String(format!("page-{n}"));
        let payload = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        self.commands
            .try_send((name.to_string(), payload))
            .map_err(|_| "the device is busy; try again".to_string())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.state.borrow().on_break == on_break {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("the device did not answer in 3 s; see its state above".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_announces_scheduled_checks_only() {
        let config = serde_json::json!({
            "shift": {"timezone": "UTC", "days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00"},
            "scan": {"times": ["10:00", "15:00"]}
        });
        // Monday 2026-11-23 09:00 UTC.
        let monday_9 = 1_795_424_400_000;
        let (shift, next) = schedule(&config, "scheduled", monday_9);
        assert_eq!(shift, "mon, tue, wed, thu, fri 08:00-18:00 (UTC)");
        assert!(next.as_deref().unwrap_or("").starts_with("2026-11-23T10:00:00"), "{next:?}");
        // Spot checks stay unpredictable, for the worker too.
        let (_, next) = schedule(&config, "spot", monday_9);
        assert!(next.unwrap().contains("not announced"));
        assert_eq!(schedule(&config, "off", monday_9).1, None);
    }

    #[test]
    fn a_break_already_on_or_off_is_refused_without_a_command() {
        let dir = std::env::temp_dir().join(format!("deskcam-page-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = State {
            v: 1,
            device_id: "d".into(),
            mode: "spot".into(),
            shutter: "closed".into(),
            on_break: true,
            camera: "ok".into(),
            firmware: "0".into(),
            model: deskcam_core::schema::ModelInfo { name: "m".into(), sha256: "0".into() },
        };
        let (state_tx, state_rx) = tokio::sync::watch::channel(state);
        let (commands, inbox) = std::sync::mpsc::sync_channel(4);
        let store =
            deskcam_uplink::store::EvidenceStore::open(&dir.join("evidence"), 1_000, 1 << 20).unwrap();
        let page = PageDevice {
            device_id: "d".into(),
            retention_ms: 1_000,
            state: state_rx,
            config: tokio::sync::watch::channel(serde_json::json!({})).1,
            store: Arc::new(std::sync::Mutex::new(store)),
            audit_path: dir.join("audit.jsonl"),
            sent: Arc::new(SentLog::open(&dir, 1_000).unwrap()),
            commands,
            usb: Arc::new(StreamStats::default()),
            next_id: AtomicU64::new(1),
        };
        assert_eq!(page.start_break("lunch").unwrap_err(), "already on a break");
        assert!(inbox.try_recv().is_err(), "nothing handed to the scan loop");
        // Ending it goes to the scan loop, and succeeds when the state says so.
        let ender = std::thread::spawn(move || {
            let (name, payload) = inbox.recv().unwrap();
            state_tx.send_modify(|s| s.on_break = false);
            (name, payload)
        });
        page.end_break().unwrap();
        let (name, payload) = ender.join().unwrap();
        assert_eq!(name, "break/end");
        assert!(String::from_utf8_lossy(&payload).contains("\"id\":\"page-1\""));
        assert_eq!(page.end_break().unwrap_err(), "no break in progress");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
