//! Store-and-forward of the evidence: violation events and stills go from the on-disk
//! store to the broker over a connection of their own, and an entry is marked
//! delivered only when the broker has acknowledged (PUBACK) every packet of it.
//!
//! The audit entries go the same way, ahead of the evidence: one ordered stream, so a
//! subscriber always has a scan's audit entry before its evidence. They are on the
//! device's audit log already; in flight they are kept in memory and sent again after
//! a reconnect.
//!
//! rumqttc keeps unacknowledged publishes in memory only, and replays them by its own
//! rules; this connection therefore uses a clean session and, whenever it drops,
//! forgets everything in flight (rumqttc's copies included) and starts again from the
//! oldest undelivered entry in the store. An entry whose PUBACK was lost with the
//! connection is sent again with the same event id: delivery is at least once, and a
//! duplicate is the same event. A connection of its own also keeps multi-megabyte
//! stills from delaying command replies and state on the control connection.
//!
//! Exactly one task sends on this connection at a time (whoever holds the outbox
//! lock), and the driver resets the outbox and empties rumqttc's queues under the same
//! discipline, so every `Outgoing::Publish` the event loop reports is, in order, one of
//! the packets recorded here: that is how a packet id is tied to its entry.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use deskcam_core::schema::{AuditEntry, Topics};
use rumqttc::{AsyncClient, QoS};

use crate::store::EvidenceStore;
use crate::{DropOldest, UplinkStats};

/// Packets in flight on the evidence connection: enough to fill a link, few enough to
/// stay far below rumqttc's own in-flight limit and request channel.
pub(crate) const WINDOW: usize = 16;
/// rumqttc's request channel: never full, since at most `WINDOW` requests are queued.
pub(crate) const CHANNEL: usize = 2 * WINDOW + 4;

/// The evidence store, shared by the scan loop (which puts, acknowledges and expires)
/// and the outbox (which sends and marks delivered).
pub type SharedStore = Arc<Mutex<EvidenceStore>>;

/// Locks the store; a panic elsewhere while it was held leaves its index consistent
/// (every change is one map operation after the files), so the lock is taken anyway.
pub fn lock_store(store: &SharedStore) -> MutexGuard<'_, EvidenceStore> {
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
struct Packet {
    what: What,
    /// Known once the event loop has sent it.
    pkid: Option<u16>,
    acked: bool,
}

#[derive(Debug)]
enum What {
    /// A packet of a stored entry; the last one's PUBACK completes it.
    Evidence { id: String, last: bool },
    /// An audit entry (its JSON), sent again if the connection drops first.
    Audit(Vec<u8>),
}

pub(crate) struct Outbox {
    store: SharedStore,
    client: AsyncClient,
    topics: Topics,
    stats: Arc<UplinkStats>,
    connected: bool,
    in_flight: VecDeque<Packet>,
    audit: Arc<DropOldest<AuditEntry>>,
    /// Audit entries that were in flight when the connection dropped, oldest first.
    audit_retry: VecDeque<Vec<u8>>,
    /// The stamp of the last entry handed to this connection.
    cursor: Option<u64>,
    now_ms: fn() -> u64,
}

impl Outbox {
    pub(crate) fn new(
        store: SharedStore,
        audit: Arc<DropOldest<AuditEntry>>,
        client: AsyncClient,
        topics: Topics,
        stats: Arc<UplinkStats>,
        now_ms: fn() -> u64,
    ) -> Self {
        Outbox {
            store,
            client,
            topics,
            stats,
            connected: false,
            in_flight: VecDeque::new(),
            audit,
            audit_retry: VecDeque::new(),
            cursor: None,
            now_ms,
        }
    }

    /// A new connection: send from the oldest undelivered entry.
    pub(crate) fn connected(&mut self) {
        self.connected = true;
        self.in_flight.clear();
        self.cursor = None;
        self.fill();
    }

    /// The connection is gone: nothing in flight counts any more. The caller then
    /// empties rumqttc's queues, so nothing of this connection is sent later.
    pub(crate) fn disconnected(&mut self) {
        self.connected = false;
        for p in self.in_flight.drain(..) {
            if let What::Audit(json) = p.what {
                self.audit_retry.push_back(json);
            }
        }
        self.cursor = None;
    }

    /// The event loop put a publish on the wire: the oldest packet without an id is it.
    pub(crate) fn sent(&mut self, pkid: u16) {
        match self.in_flight.iter_mut().find(|p| p.pkid.is_none()) {
            Some(p) => p.pkid = Some(pkid),
            None => tracing::error!(pkid, "evidence connection sent a packet the outbox did not queue"),
        }
    }

    /// A PUBACK: entries whose packets are all acknowledged, in order, are delivered.
    pub(crate) fn acked(&mut self, pkid: u16) {
        match self.in_flight.iter_mut().find(|p| p.pkid == Some(pkid) && !p.acked) {
            Some(p) => p.acked = true,
            None => {
                tracing::warn!(pkid, "PUBACK for a packet not in flight");
                return;
            }
        }
        while self.in_flight.front().is_some_and(|p| p.acked) {
            let Some(p) = self.in_flight.pop_front() else { break };
            match p.what {
                What::Evidence { id, last: true } => match lock_store(&self.store).mark_delivered(&id) {
                    Ok(_) => {
                        self.stats.evidence_delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::error!("evidence {id}: could not mark it delivered: {e}"),
                },
                What::Evidence { .. } => {}
                What::Audit(_) => {
                    self.stats.audit_delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.fill();
    }

    /// Nothing in flight and nothing waiting: a clean stop loses nothing.
    pub(crate) fn settled(&self) -> bool {
        self.in_flight.is_empty()
            && self.audit_retry.is_empty()
            && self.audit.is_empty()
            && lock_store(&self.store).undelivered() == 0
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Hands the waiting audit entries, then the next undelivered evidence, to the
    /// connection while the window has room.
    pub(crate) fn fill(&mut self) {
        while self.connected && self.in_flight.len() < WINDOW {
            let Some(json) = self.audit_retry.pop_front().or_else(|| self.audit.try_pop().map(|a| json(&a)))
            else {
                break;
            };
            if let Err(e) =
                self.client.try_publish(self.topics.audit(), QoS::AtLeastOnce, false, json.clone())
            {
                tracing::error!("audit entry: could not queue: {e}");
                self.audit_retry.push_front(json);
                return;
            }
            self.in_flight.push_back(Packet { what: What::Audit(json), pkid: None, acked: false });
        }
        if !self.connected {
            return;
        }
        // Nothing past the retention limit leaves the device, even if the scan loop has
        // not got round to deleting it. Once per fill: the scan is over the whole store.
        match lock_store(&self.store).expire((self.now_ms)()) {
            Ok(gone) if !gone.is_empty() => {
                tracing::warn!("evidence past evidence.max_age deleted unsent: {}", gone.join(", "))
            }
            Ok(_) => {}
            Err(e) => tracing::error!("evidence store: {e}"),
        }
        while self.connected && self.in_flight.len() + 2 <= WINDOW {
            let store = lock_store(&self.store);
            let Some(next) = store.next_undelivered(self.cursor) else { return };
            self.cursor = Some(next.created_ms);
            let evidence = match store.get(&next.id) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => {
                    // Left undelivered: it is tried again on the next connection.
                    tracing::error!("evidence {}: unreadable, skipped for now: {e}", next.id);
                    continue;
                }
            };
            drop(store);
            let mut packets = vec![(self.topics.violation(), evidence.event)];
            if let Some(jpeg) = evidence.still {
                packets.push((self.topics.still(&next.id), jpeg));
            }
            let n = packets.len();
            for (i, (topic, payload)) in packets.into_iter().enumerate() {
                if let Err(e) = self.client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                    // Only when the event loop is gone: the entry stays undelivered.
                    tracing::error!("evidence {}: could not queue: {e}", next.id);
                    return;
                }
                self.stats.evidence_sent.fetch_add(1, Ordering::Relaxed);
                let what = What::Evidence { id: next.id.clone(), last: i + 1 == n };
                self.in_flight.push_back(Packet { what, pkid: None, acked: false });
            }
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Our schema types serialise infallibly (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}
