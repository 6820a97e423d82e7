//! Store-and-forward of the evidence: violation events and stills go from the on-disk
//! store to the broker over a connection of their own, and an entry is marked
//! delivered only when the broker has acknowledged (PUBACK) every packet of it.
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

use deskcam_core::schema::Topics;
use rumqttc::{AsyncClient, QoS};

use crate::store::EvidenceStore;
use crate::UplinkStats;

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
    id: String,
    /// The entry's last packet: its PUBACK completes the entry.
    last: bool,
    /// Known once the event loop has sent it.
    pkid: Option<u16>,
    acked: bool,
}

pub(crate) struct Outbox {
    store: SharedStore,
    client: AsyncClient,
    topics: Topics,
    stats: Arc<UplinkStats>,
    connected: bool,
    in_flight: VecDeque<Packet>,
    /// The stamp of the last entry handed to this connection.
    cursor: Option<u64>,
    now_ms: fn() -> u64,
}

impl Outbox {
    pub(crate) fn new(
        store: SharedStore,
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
        self.in_flight.clear();
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
            if p.last {
                match lock_store(&self.store).mark_delivered(&p.id) {
                    Ok(_) => {
                        self.stats.evidence_delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::error!("evidence {}: could not mark it delivered: {e}", p.id),
                }
            }
        }
        self.fill();
    }

    /// Nothing in flight and nothing waiting: a clean stop loses nothing.
    pub(crate) fn settled(&self) -> bool {
        self.in_flight.is_empty() && lock_store(&self.store).undelivered() == 0
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Hands the next undelivered entries to the connection while the window has room.
    pub(crate) fn fill(&mut self) {
        while self.connected && self.in_flight.len() + 2 <= WINDOW {
            let mut store = lock_store(&self.store);
            // Nothing past the retention limit leaves the device, even if the scan loop
            // has not got round to deleting it.
            match store.expire((self.now_ms)()) {
                Ok(gone) if !gone.is_empty() => {
                    self.stats.expired.fetch_add(gone.len() as u64, Ordering::Relaxed);
                    tracing::warn!("evidence past evidence.max_age deleted unsent: {}", gone.join(", "));
                }
                Ok(_) => {}
                Err(e) => tracing::error!("evidence store: {e}"),
            }
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
                self.in_flight.push_back(Packet {
                    id: next.id.clone(),
                    last: i + 1 == n,
                    pkid: None,
                    acked: false,
                });
            }
        }
    }
}
