//! deskcam uplink: the MQTT side. Publishes `status` (with a last will), `state`,
//! violation events and their stills to the employer's broker, and nothing else.
//!
//! The event loop is driven here, in one task that owns the connection: it reconnects
//! with backoff, re-announces `status` and `state` after every connect, and drains the
//! bounded outgoing queue only while connected. It must not look at frames or decide
//! policy; what it publishes is built by the caller from the core's schema types.

pub mod queue;
pub mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deskcam_core::config::BrokerUrl;
use deskcam_core::schema::{AuditEntry, Reply, State, Topics, ViolationEvent, STATUS_OFFLINE, STATUS_ONLINE};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::watch;

pub use queue::DropOldest;

/// Largest packet we send or accept: a still at 1080p and quality 95 fits well.
pub const MAX_PACKET_BYTES: usize = 8 * 1024 * 1024;
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// On shutdown, how long to wait for the broker to acknowledge what is in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one publish may wait for room in rumqttc's request channel.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("{0}: TLS (mqtts://) is not supported by this firmware yet; use mqtt:// on a trusted link")]
    TlsUnsupported(String),
}

/// A violation event and its still, queued for the uplink.
#[derive(Clone, Debug)]
pub struct Violation {
    pub event: ViolationEvent,
    pub still: Option<Vec<u8>>,
    /// When it was found (wall clock, ms): nothing older than `max_age` is sent.
    pub created_ms: u64,
}

impl Violation {
    /// Past the retention limit (or from a clock that was set back): the evidence store
    /// has deleted it, and its queued copy must not leave the device either.
    pub fn expired(&self, now_ms: u64, max_age: Duration) -> bool {
        deskcam_core::config::past_retention(self.created_ms, now_ms, max_age.as_millis() as u64)
    }
}

/// Counters shared with the daemon (for logs, the demo summary and telemetry).
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    /// Publish packets handed to the connection (QoS 1).
    pub published: AtomicU64,
    /// Commands dropped because the daemon had not taken the previous ones.
    pub commands_dropped: AtomicU64,
    /// PUBACKs received from the broker.
    pub acked: AtomicU64,
    /// Publishes the broker's fresh session discarded before acknowledging them.
    pub lost: AtomicU64,
    /// Queued events dropped unsent because they passed the retention limit.
    pub expired: AtomicU64,
}

impl UplinkStats {
    pub fn in_flight(&self) -> u64 {
        let done = self.acked.load(Ordering::Relaxed) + self.lost.load(Ordering::Relaxed);
        self.published.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// A command as it arrived: its name under `cmd/` and its payload.
pub type IncomingCommand = (String, Vec<u8>);

/// What joins the daemon to the uplink: bounded queues of what to publish, the latest
/// state, and the inbox for commands.
pub struct Link {
    pub events: Arc<DropOldest<Violation>>,
    pub audit: Arc<DropOldest<AuditEntry>>,
    pub replies: Arc<DropOldest<Reply>>,
    pub commands: std::sync::mpsc::SyncSender<IncomingCommand>,
    pub state: watch::Receiver<State>,
}

pub struct UplinkConfig {
    pub broker: BrokerUrl,
    pub client_id: String,
    pub topics: Topics,
    pub keep_alive: Duration,
    /// Evidence retention (`evidence.max_age`): queued events older than this are dropped.
    pub max_age: Duration,
}

/// Runs the MQTT connection until `shutdown` turns true, then drains what is queued
/// (bounded by a timeout), publishes `offline` and disconnects.
///
/// Two tasks: one only polls rumqttc's event loop (connection, acknowledgements,
/// reconnect backoff), so it never waits on anything else; this one feeds it the
/// retained `state` (kept in its own slot: only the latest matters), the events and the
/// audit entries.
pub async fn run(
    cfg: UplinkConfig,
    link: Link,
    stats: Arc<UplinkStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), UplinkError> {
    let Link { events, audit, replies, commands, mut state } = link;
    if cfg.broker.tls {
        return Err(UplinkError::TlsUnsupported(cfg.broker.to_string()));
    }
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.broker.host, cfg.broker.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    // Commands sent while the device was offline must still arrive (QoS 1 sessions).
    opts.set_clean_session(false);
    opts.set_last_will(LastWill::new(cfg.topics.status(), STATUS_OFFLINE, QoS::AtLeastOnce, true));
    let (client, eventloop) = AsyncClient::new(opts, 64);
    let (connected_tx, mut connected) = watch::channel(false);
    let (disconnected_tx, disconnected) = tokio::sync::oneshot::channel();
    let driver = tokio::spawn(drive(
        eventloop,
        cfg.broker.clone(),
        cfg.topics.clone(),
        commands,
        stats.clone(),
        connected_tx,
        disconnected_tx,
    ));

    let mut draining = false;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365);
    loop {
        let up = *connected.borrow();
        let settled = events.is_empty()
            && audit.is_empty()
            && replies.is_empty()
            && !state.has_changed().unwrap_or(false)
            && stats.in_flight() == 0;
        if draining && (!up || settled) {
            break;
        }
        tokio::select! {
            changed = connected.changed() => {
                if changed.is_err() {
                    break; // the driver ended
                }
                if *connected.borrow() {
                    // After every (re)connect: who we are and what state we are in.
                    let current = state.borrow_and_update().clone();
                    if let Err(e) = client.subscribe(cfg.topics.commands(), QoS::AtLeastOnce).await {
                        tracing::error!("could not subscribe to commands: {e}");
                    }
                    publish(&client, cfg.topics.status(), true, STATUS_ONLINE.as_bytes().to_vec(), &stats).await;
                    publish(&client, cfg.topics.state(), true, json(&current), &stats).await;
                }
            }
            changed = state.changed(), if up => {
                if changed.is_ok() {
                    let current = state.borrow_and_update().clone();
                    publish(&client, cfg.topics.state(), true, json(&current), &stats).await;
                }
            }
            v = events.pop(), if up => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                if v.expired(now_ms, cfg.max_age) {
                    stats.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("event {} passed evidence.max_age while the broker was away: not sent", v.event.id);
                    continue;
                }
                publish(&client, cfg.topics.violation(), false, json(&v.event), &stats).await;
                if let Some(jpeg) = v.still {
                    publish(&client, cfg.topics.still(&v.event.id), false, jpeg, &stats).await;
                }
            }
            r = replies.pop(), if up => {
                publish(&client, cfg.topics.reply(), false, json(&r), &stats).await;
            }
            a = audit.pop(), if up => {
                publish(&client, cfg.topics.audit(), false, json(&a), &stats).await;
            }
            r = shutdown.changed(), if !draining => {
                // A dropped sender means the daemon is gone: stop as well.
                if r.is_err() || *shutdown.borrow() {
                    draining = true;
                    deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                }
            }
            _ = tokio::time::sleep_until(deadline), if draining => {
                tracing::warn!("gave up waiting for {} acknowledgements and {} queued events", stats.in_flight(), events.len());
                break;
            }
            // Re-check the drain condition as acknowledgements arrive.
            _ = tokio::time::sleep(Duration::from_millis(50)), if draining => {}
        }
    }

    if *connected.borrow() {
        // A clean goodbye: the broker does not send the will on DISCONNECT, so say it.
        let _ = client.publish(cfg.topics.status(), QoS::AtLeastOnce, true, STATUS_OFFLINE).await;
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), disconnected).await;
    }
    driver.abort();
    stats.connected.store(false, Ordering::Relaxed);
    Ok(())
}

/// Polls the event loop forever: reports connection changes and counts each packet's
/// acknowledgement once; on errors it backs off with jitter and lets rumqttc reconnect.
async fn drive(
    mut eventloop: rumqttc::EventLoop,
    broker: BrokerUrl,
    topics: Topics,
    commands: std::sync::mpsc::SyncSender<IncomingCommand>,
    stats: Arc<UplinkStats>,
    connected: watch::Sender<bool>,
    disconnected: tokio::sync::oneshot::Sender<()>,
) {
    let mut disconnected = Some(disconnected);
    let mut backoff = BACKOFF_START;
    let mut unacked = std::collections::HashSet::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if !ack.session_present {
                    // rumqttc drops its pending publishes when the broker has no session
                    // for us: count them as lost rather than wait for them.
                    let lost = stats.in_flight();
                    stats.lost.fetch_add(lost, Ordering::Relaxed);
                    unacked.clear();
                    if lost > 0 {
                        tracing::warn!("{lost} publishes were lost with the broker's session");
                    }
                }
                stats.connected.store(true, Ordering::Relaxed);
                stats.connects.fetch_add(1, Ordering::Relaxed);
                backoff = BACKOFF_START;
                tracing::info!(broker = %broker, "connected to broker");
                let _ = connected.send(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(name) = topics.command_name(&p.topic) {
                    if p.retain {
                        // A command left retained on the broker would run again at every
                        // connect: commands are for now, not for later.
                        tracing::warn!("ignored retained command {name}");
                        continue;
                    }
                    // Only what parsing needs to refuse an oversized payload is kept.
                    let keep = p.payload.len().min(deskcam_core::command::MAX_COMMAND_BYTES + 1);
                    // Never block the connection on the daemon: a full inbox drops, counted.
                    if commands.try_send((name.to_string(), p.payload[..keep].to_vec())).is_err() {
                        stats.commands_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("command {name} dropped: the daemon is busy");
                    }
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                unacked.insert(pkid);
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                // A packet resent after a reconnect is acknowledged once more: count
                // each packet id once.
                if unacked.remove(&ack.pkid) {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                if let Some(tx) = disconnected.take() {
                    let _ = tx.send(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                let was = stats.connected.swap(false, Ordering::Relaxed);
                let _ = connected.send(false);
                if disconnected.is_none() {
                    return; // we asked to disconnect
                }
                if was {
                    tracing::warn!(broker = %broker, "connection lost: {e}; reconnecting");
                } else {
                    tracing::warn!(broker = %broker, "broker unreachable: {e}; retrying in {:.1}s", backoff.as_secs_f32());
                }
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn publish(client: &AsyncClient, topic: String, retain: bool, payload: Vec<u8>, stats: &UplinkStats) {
    // Bounded: with the broker gone and rumqttc's request channel full, waiting here
    // forever would also stop this task from seeing the shutdown.
    let queued = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        client.publish(topic.clone(), QoS::AtLeastOnce, retain, payload),
    );
    match queued.await {
        Ok(Ok(())) => {
            stats.published.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => tracing::error!(topic, "could not queue publish: {e}"),
        Err(_) => {
            tracing::error!(topic, "dropped: the connection did not take it within {PUBLISH_TIMEOUT:?}")
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Our schema types serialise infallibly (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

/// ±20 % so a fleet that lost its broker does not reconnect in lockstep.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.8 + 0.4 * (nanos % 1000) as f64 / 1000.0;
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskcam_core::rules::RuleKind;
    use deskcam_core::schema::{FrameSize, SCHEMA_VERSION};

    #[test]
    fn queued_evidence_past_retention_is_not_sent() {
        let v = Violation {
            event: ViolationEvent {
                v: SCHEMA_VERSION,
                id: "e".into(),
                device_id: "d".into(),
                time: "t".into(),
                rule: RuleKind::Phone,
                score: 0.5,
                boxes: vec![],
                frame: FrameSize { width: 1, height: 1 },
                origin: "o".into(),
                still: None,
            },
            still: None,
            created_ms: 1_000,
        };
        let week = Duration::from_secs(7 * 86_400);
        assert!(!v.expired(1_000 + 7 * 86_400_000 - 1, week));
        assert!(v.expired(1_000 + 7 * 86_400_000, week));
        assert!(v.expired(999, week), "a clock set back: age unknown, not sent");
    }
}
