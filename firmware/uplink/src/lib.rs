//! deskcam uplink: the MQTT side. Publishes `status` (with a last will), `state`,
//! violation events and their stills to the employer's broker, and nothing else.
//!
//! Two connections: the control connection (status with its last will, state, config,
//! command replies, commands in) and the record connection ([`outbox`]: audit entries,
//! then events and stills from the on-disk store, marked delivered on PUBACK). Each event loop is
//! driven by a task that owns it: it reconnects with backoff and jitter, and the
//! control side re-announces `status` and `state` after every connect. The uplink
//! must not look at frames or decide policy; what it publishes is built by the caller
//! from the core's schema types.

pub mod outbox;
pub mod queue;
pub mod store;
pub mod tls;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deskcam_core::config::BrokerUrl;
use deskcam_core::schema::{AuditEntry, Reply, State, Telemetry, Topics, STATUS_OFFLINE, STATUS_ONLINE};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{watch, Notify};

pub use outbox::{lock_store, SharedStore};
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
    #[error("TLS: {0}")]
    Tls(String),
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
    /// The evidence connection is up.
    pub evidence_connected: AtomicBool,
    /// Evidence packets (events and stills) handed to the evidence connection,
    /// resends after a reconnect included.
    pub evidence_sent: AtomicU64,
    /// Evidence entries the broker acknowledged completely.
    pub evidence_delivered: AtomicU64,
    /// Audit entries the broker acknowledged.
    pub audit_delivered: AtomicU64,
}

impl UplinkStats {
    pub fn in_flight(&self) -> u64 {
        let done = self.acked.load(Ordering::Relaxed) + self.lost.load(Ordering::Relaxed);
        self.published.load(Ordering::Relaxed).saturating_sub(done)
    }
}

/// A command as it arrived: its name under `cmd/` and its payload.
pub type IncomingCommand = (String, Vec<u8>);

/// What joins the daemon to the uplink: the evidence store with its doorbell, bounded
/// queues of what else to publish, the latest state, and the inbox for commands.
pub struct Link {
    pub store: SharedStore,
    /// Rung by the daemon after it stores new evidence or queues an audit entry.
    pub evidence_ready: Arc<Notify>,
    pub audit: Arc<DropOldest<AuditEntry>>,
    pub replies: Arc<DropOldest<Reply>>,
    pub commands: std::sync::mpsc::SyncSender<IncomingCommand>,
    pub state: watch::Receiver<State>,
    /// The effective config (secrets removed), retained on `config`.
    pub config: watch::Receiver<serde_json::Value>,
    /// The latest telemetry, sent at QoS 0 when it changes (a missed one is not resent).
    pub telemetry: watch::Receiver<Option<Telemetry>>,
}

pub struct UplinkConfig {
    pub broker: BrokerUrl,
    pub client_id: String,
    pub topics: Topics,
    pub keep_alive: Duration,
    pub credentials: Option<(String, String)>,
    /// For `mqtts://`.
    pub tls: Option<tls::TlsFiles>,
    /// Retained messages announced after every connect, outside the device's subtree
    /// (Home Assistant discovery): (topic, payload).
    pub discovery: Vec<(String, Vec<u8>)>,
}

/// Connection options shared by deskcam's MQTT clients: address, keep-alive, packet
/// limit, login, and TLS when the URL is `mqtts://`.
pub fn mqtt_options(
    client_id: &str,
    broker: &BrokerUrl,
    credentials: Option<&(String, String)>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, &broker.host, broker.port);
    opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if let Some((user, password)) = credentials {
        opts.set_credentials(user, password);
    }
    if let Some(config) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            config.clone(),
        )));
    }
    opts
}

/// Runs both MQTT connections until `shutdown` turns true, then drains what is queued
/// (bounded by a timeout), publishes `offline` and disconnects.
///
/// Each event loop is polled by a task that does nothing else; this task feeds the
/// control connection the retained `state` and `config` (each in its own slot: only the
/// latest matters) and the replies; the outbox feeds the record connection.
pub async fn run(
    cfg: UplinkConfig,
    link: Link,
    stats: Arc<UplinkStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), UplinkError> {
    let Link {
        store,
        evidence_ready,
        audit,
        replies,
        commands,
        mut state,
        config: mut config_rx,
        mut telemetry,
    } = link;
    let tls = match (&cfg.tls, cfg.broker.tls) {
        (Some(files), true) => Some(tls::client_config(files)?),
        (None, true) => return Err(UplinkError::Tls(format!("{}: no CA file configured", cfg.broker))),
        _ => None,
    };
    let options = |client_id: &str| {
        let mut opts = mqtt_options(client_id, &cfg.broker, cfg.credentials.as_ref(), tls.as_ref());
        opts.set_keep_alive(cfg.keep_alive);
        opts
    };
    let mut opts = options(&cfg.client_id);
    // Commands sent while the device was offline must still arrive (QoS 1 sessions).
    opts.set_clean_session(false);
    opts.set_last_will(LastWill::new(cfg.topics.status(), STATUS_OFFLINE, QoS::AtLeastOnce, true));
    let (client, eventloop) = AsyncClient::new(opts, 64);
    // The record connection: a clean session (the store, not the broker or rumqttc,
    // holds what is unsent) and no last will (the control connection has it).
    let mut record_opts = options(&format!("{}-record", cfg.client_id));
    record_opts.set_clean_session(true);
    record_opts.set_inflight(4 * outbox::WINDOW as u16);
    let (evidence_client, evidence_loop) = AsyncClient::new(record_opts, outbox::CHANNEL);
    let outbox = Arc::new(std::sync::Mutex::new(outbox::Outbox::new(
        store,
        audit.clone(),
        evidence_client.clone(),
        cfg.topics.clone(),
        stats.clone(),
        unix_ms,
    )));
    let evidence_driver =
        tokio::spawn(drive_evidence(evidence_loop, outbox.clone(), cfg.broker.clone(), stats.clone()));
    let doorbell = tokio::spawn(ring_outbox(outbox.clone(), evidence_ready));
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

    // Telemetry, config and state channels still open.
    let mut open = [true; 3];
    let mut draining = false;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365);
    loop {
        let up = *connected.borrow();
        let evidence_up = stats.evidence_connected.load(Ordering::Relaxed);
        // Each connection drains what it can: a connection that is down has nothing in
        // flight. (The evidence connection reconnects on its own: while the control one
        // is still down, evidence the broker has taken waits for its acknowledgements
        // here, else it would be marked undelivered and sent again after the restart.)
        let evidence_settled = !evidence_up || lock_outbox(&outbox).settled();
        let control_settled = !up
            || (replies.is_empty()
                && !state.has_changed().unwrap_or(false)
                && !config_rx.has_changed().unwrap_or(false)
                && stats.in_flight() == 0);
        if draining && evidence_settled && control_settled {
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
                    let config = config_rx.borrow_and_update().clone();
                    publish(&client, cfg.topics.config(), true, json(&config), &stats).await;
                    for (topic, payload) in &cfg.discovery {
                        publish(&client, topic.clone(), true, payload.clone(), &stats).await;
                    }
                }
            }
            changed = telemetry.changed(), if up && open[0] => {
                open[0] = changed.is_ok();
                let current = telemetry.borrow_and_update().clone();
                if let (Ok(()), Some(t)) = (changed, current) {
                    // QoS 0: telemetry is replaced by the next one, never queued.
                    if let Err(e) = client.try_publish(cfg.topics.telemetry(), QoS::AtMostOnce, false, json(&t)) {
                        tracing::debug!("telemetry not sent: {e}");
                    }
                }
            }
            changed = config_rx.changed(), if up && open[1] => {
                open[1] = changed.is_ok();
                if changed.is_ok() {
                    let config = config_rx.borrow_and_update().clone();
                    publish(&client, cfg.topics.config(), true, json(&config), &stats).await;
                }
            }
            changed = state.changed(), if up && open[2] => {
                // A closed channel (the scan loop has ended) is not a change to wait on.
                open[2] = changed.is_ok();
                if changed.is_ok() {
                    let current = state.borrow_and_update().clone();
                    publish(&client, cfg.topics.state(), true, json(&current), &stats).await;
                }
            }
            r = replies.pop(), if up => {
                publish(&client, cfg.topics.reply(), false, json(&r), &stats).await;
            }
            r = shutdown.changed(), if !draining => {
                // A dropped sender means the daemon is gone: stop as well.
                if r.is_err() || *shutdown.borrow() {
                    draining = true;
                    deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                }
            }
            _ = tokio::time::sleep_until(deadline), if draining => {
                tracing::warn!(
                    "gave up waiting for {} acknowledgements and {} evidence packets in flight",
                    stats.in_flight(),
                    lock_outbox(&outbox).in_flight()
                );
                break;
            }
            // Re-check the drain condition as acknowledgements arrive.
            _ = tokio::time::sleep(Duration::from_millis(50)), if draining => {}
        }
    }

    if *connected.borrow() {
        // A clean goodbye: the broker does not send the will on DISCONNECT, so say it.
        // (Counted like every other control publish, so acknowledged ≤ published.)
        if client.publish(cfg.topics.status(), QoS::AtLeastOnce, true, STATUS_OFFLINE).await.is_ok() {
            stats.published.fetch_add(1, Ordering::Relaxed);
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), disconnected).await;
    }
    doorbell.abort();
    if stats.evidence_connected.load(Ordering::Relaxed) {
        let _ = evidence_client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while stats.evidence_connected.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    evidence_driver.abort();
    driver.abort();
    stats.connected.store(false, Ordering::Relaxed);
    stats.evidence_connected.store(false, Ordering::Relaxed);
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock_outbox(outbox: &std::sync::Mutex<outbox::Outbox>) -> std::sync::MutexGuard<'_, outbox::Outbox> {
    outbox.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends newly stored evidence when the daemon rings, and looks at the store every
/// second anyway (a missed ring, or entries left by an earlier run).
async fn ring_outbox(outbox: Arc<std::sync::Mutex<outbox::Outbox>>, ready: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = ready.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        lock_outbox(&outbox).fill();
    }
}

/// Polls the evidence connection's event loop: ties packet ids to the outbox's packets
/// and PUBACKs to deliveries; when the connection drops, resets the outbox and then
/// empties rumqttc's queues, in that order (see [`outbox`]).
async fn drive_evidence(
    mut eventloop: rumqttc::EventLoop,
    outbox: Arc<std::sync::Mutex<outbox::Outbox>>,
    broker: BrokerUrl,
    stats: Arc<UplinkStats>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_START;
                stats.evidence_connected.store(true, Ordering::Relaxed);
                tracing::info!(broker = %broker, "evidence connection up");
                lock_outbox(&outbox).connected();
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => lock_outbox(&outbox).sent(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => lock_outbox(&outbox).acked(ack.pkid),
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                lock_outbox(&outbox).disconnected();
                stats.evidence_connected.store(false, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                lock_outbox(&outbox).disconnected();
                // Whatever was queued before the reset is dropped here; what is queued
                // after it waits for `connected`, which starts from the store again.
                eventloop.clean();
                eventloop.pending.clear();
                if stats.evidence_connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(broker = %broker, "evidence connection lost: {e}; reconnecting");
                }
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
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
