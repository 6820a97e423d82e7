//! deskcam uplink: the MQTT side. Publishes `status` (with a last will), `state`,
//! violation events and their stills to the employer's broker, and nothing else.
//!
//! The event loop is driven here, in one task that owns the connection: it reconnects
//! with backoff, re-announces `status` and `state` after every connect, and drains the
//! bounded outgoing queue only while connected. It must not look at frames or decide
//! policy; what it publishes is built by the caller from the core's schema types.

pub mod queue;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deskcam_core::config::BrokerUrl;
use deskcam_core::schema::{State, Topics, ViolationEvent, STATUS_OFFLINE, STATUS_ONLINE};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::watch;

pub use queue::DropOldest;

/// Largest packet we send or accept: a still at 1080p and quality 95 fits well.
pub const MAX_PACKET_BYTES: usize = 8 * 1024 * 1024;
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// On shutdown, how long to wait for the broker to acknowledge what is in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("{0}: TLS (mqtts://) is not supported by this firmware yet; use mqtt:// on a trusted link")]
    TlsUnsupported(String),
}

/// What the device publishes, queued for the uplink.
#[derive(Clone, Debug)]
pub enum Outgoing {
    State(State),
    Violation { event: ViolationEvent, still: Option<Vec<u8>> },
}

/// Counters shared with the daemon (for logs, the demo summary and telemetry).
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    /// Publish packets handed to the connection (QoS 1).
    pub published: AtomicU64,
    /// PUBACKs received from the broker.
    pub acked: AtomicU64,
}

impl UplinkStats {
    pub fn in_flight(&self) -> u64 {
        self.published.load(Ordering::Relaxed).saturating_sub(self.acked.load(Ordering::Relaxed))
    }
}

pub struct UplinkConfig {
    pub broker: BrokerUrl,
    pub client_id: String,
    pub topics: Topics,
    pub keep_alive: Duration,
    /// The retained state announced after every (re)connect until a newer one is queued.
    pub state: State,
}

/// Runs the MQTT connection until `shutdown` turns true, then publishes `offline`,
/// waits (bounded) for outstanding acknowledgements and disconnects.
pub async fn run(
    cfg: UplinkConfig,
    queue: Arc<DropOldest<Outgoing>>,
    stats: Arc<UplinkStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), UplinkError> {
    if cfg.broker.tls {
        return Err(UplinkError::TlsUnsupported(cfg.broker.to_string()));
    }
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.broker.host, cfg.broker.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    // Commands sent while the device was offline must still arrive (QoS 1 sessions).
    opts.set_clean_session(false);
    opts.set_last_will(LastWill::new(cfg.topics.status(), STATUS_OFFLINE, QoS::AtLeastOnce, true));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut state = cfg.state.clone();
    let mut backoff = BACKOFF_START;
    let mut draining = false;
    let mut unacked = std::collections::HashSet::new();
    let drain_deadline = tokio::time::sleep(Duration::from_secs(3600 * 24 * 365));
    tokio::pin!(drain_deadline);

    loop {
        let connected = stats.connected.load(Ordering::Relaxed);
        if draining && (queue.is_empty() || !connected) && stats.in_flight() == 0 {
            break;
        }
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    stats.connected.store(true, Ordering::Relaxed);
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    backoff = BACKOFF_START;
                    tracing::info!(broker = %cfg.broker, "connected to broker");
                    announce(&client, &cfg.topics, &state, &stats).await;
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    unacked.insert(pkid);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    // A packet resent after a reconnect is acknowledged once more:
                    // count each packet id once.
                    if unacked.remove(&ack.pkid) {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let was = stats.connected.swap(false, Ordering::Relaxed);
                    if draining {
                        break;
                    }
                    if was {
                        tracing::warn!(broker = %cfg.broker, "connection lost: {e}; reconnecting");
                    } else {
                        tracing::warn!(broker = %cfg.broker, "broker unreachable: {e}; retrying in {:.1}s", backoff.as_secs_f32());
                    }
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            },
            item = queue.pop(), if connected => {
                match item {
                    Outgoing::State(s) => {
                        state = s;
                        publish(&client, cfg.topics.state(), true, json(&state), &stats).await;
                    }
                    Outgoing::Violation { event, still } => {
                        publish(&client, cfg.topics.violation(), false, json(&event), &stats).await;
                        if let Some(jpeg) = still {
                            publish(&client, cfg.topics.still(&event.id), false, jpeg, &stats).await;
                        }
                    }
                }
            }
            _ = shutdown.changed(), if !draining => {
                if *shutdown.borrow() {
                    draining = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
            }
            _ = &mut drain_deadline, if draining => {
                tracing::warn!("gave up waiting for {} acknowledgements and {} queued messages", stats.in_flight(), queue.len());
                break;
            }
        }
    }

    if stats.connected.load(Ordering::Relaxed) {
        // A clean goodbye: the broker does not send the will on DISCONNECT, so say it.
        let _ = client.publish(cfg.topics.status(), QoS::AtLeastOnce, true, STATUS_OFFLINE).await;
        let _ = client.disconnect().await;
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(until, eventloop.poll()).await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    }
    stats.connected.store(false, Ordering::Relaxed);
    Ok(())
}

async fn announce(client: &AsyncClient, topics: &Topics, state: &State, stats: &UplinkStats) {
    publish(client, topics.status(), true, STATUS_ONLINE.as_bytes().to_vec(), stats).await;
    publish(client, topics.state(), true, json(state), stats).await;
}

async fn publish(client: &AsyncClient, topic: String, retain: bool, payload: Vec<u8>, stats: &UplinkStats) {
    match client.publish(topic.clone(), QoS::AtLeastOnce, retain, payload).await {
        Ok(()) => {
            stats.published.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::error!(topic, "could not queue publish: {e}"),
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
