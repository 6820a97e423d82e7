//! The on-device evidence store: each violation's event and still, kept until the
//! server acknowledges it (`cmd/evidence/ack`) and never longer than `max_age`, within
//! `max_bytes` (oldest evicted first, counted). Survives restarts.
//!
//! It is also the uplink's outbox: an entry is written here before anything is
//! published, and marked delivered only once the broker has acknowledged every packet
//! of it, so after a broker outage, a crash or a reboot the undelivered ones are sent
//! again, oldest first.
//!
//! Layout: `<dir>/<created-ms>-<id>.json` (the event), `.jpg` (the still) and `.sent`
//! (the delivery mark), each written to a temporary name, synced and renamed, so a
//! crash leaves whole entries or none. Stamps are unique and increasing, so they are
//! the delivery order. Time is an argument (`now_ms`), so expiry is tested with
//! simulated time.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use deskcam_core::config::past_retention;

/// One stored piece of evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub created_ms: u64,
    pub bytes: u64,
    /// The broker has acknowledged the event and its still.
    pub delivered: bool,
}

/// An entry's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    pub event: Vec<u8>,
    pub still: Option<Vec<u8>>,
}

pub struct EvidenceStore {
    dir: PathBuf,
    max_age_ms: u64,
    max_bytes: u64,
    /// (created_ms, id) → size on disk and delivery; ordered oldest first.
    index: BTreeMap<(u64, String), Entry>,
    evicted: u64,
    expired: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    bytes: u64,
    delivered: bool,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// Makes a rename or an unlink durable: after a power cut, acknowledged evidence must
/// not come back, nor stored evidence vanish.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl EvidenceStore {
    /// Opens the store, creating the directory, dropping leftovers of an interrupted
    /// write, and indexing what is there.
    pub fn open(dir: &Path, max_age_ms: u64, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut index = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(".tmp") {
                fs::remove_file(&path)?;
                continue;
            }
            let Some((stem, ext)) = name.rsplit_once('.') else { continue };
            if !matches!(ext, "json" | "jpg" | "sent") {
                continue;
            }
            let Some((created, id)) = stem.split_once('-') else { continue };
            let (Ok(created), true) = (created.parse::<u64>(), valid_id(id)) else { continue };
            let entry: &mut Entry = index.entry((created, id.to_string())).or_default();
            if ext == "sent" {
                entry.delivered = true;
            } else {
                entry.bytes += fs::metadata(&path)?.len();
            }
        }
        // A still or a mark without its event file is an interrupted put or removal:
        // the event file is the commit point, so drop the orphan.
        let orphans: Vec<(u64, String)> = index
            .keys()
            .filter(|(c, id)| !dir.join(format!("{c:013}-{id}.json")).exists())
            .cloned()
            .collect();
        let mut store =
            EvidenceStore { dir: dir.to_path_buf(), max_age_ms, max_bytes, index, evicted: 0, expired: 0 };
        for (c, id) in orphans {
            store.remove(c, &id)?;
        }
        Ok(store)
    }

    fn path(&self, created_ms: u64, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{created_ms:013}-{id}.{ext}"))
    }

    /// Stores an event (JSON) and its still, not yet delivered. Returns the ids evicted
    /// to stay within `max_bytes` (oldest first).
    pub fn put(
        &mut self,
        now_ms: u64,
        id: &str,
        event_json: &[u8],
        still: Option<&[u8]>,
    ) -> io::Result<Vec<String>> {
        if !valid_id(id) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("'{id}' is not an evidence id")));
        }
        if self.index.keys().any(|(_, i)| i == id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("evidence '{id}' is already stored"),
            ));
        }
        // Stamps are the delivery order: two entries in one millisecond stay in order.
        let now_ms = match self.index.keys().next_back() {
            Some((last, _)) if *last >= now_ms => last + 1,
            _ => now_ms,
        };
        // The still first: an event file is the entry's commit point.
        if let Some(jpeg) = still {
            write_atomically(&self.path(now_ms, id, "jpg"), jpeg)?;
        }
        if let Err(e) = write_atomically(&self.path(now_ms, id, "json"), event_json) {
            let _ = fs::remove_file(self.path(now_ms, id, "jpg"));
            return Err(e);
        }
        let bytes = event_json.len() as u64 + still.map_or(0, |s| s.len() as u64);
        self.index.insert((now_ms, id.to_string()), Entry { bytes, delivered: false });
        let mut evicted = Vec::new();
        while self.total_bytes() > self.max_bytes && self.index.len() > 1 {
            let Some(((created, oldest), _)) = self.index.iter().next().map(|(k, v)| (k.clone(), *v)) else {
                break;
            };
            self.remove(created, &oldest)?;
            self.evicted += 1;
            evicted.push(oldest);
        }
        Ok(evicted)
    }

    fn remove(&mut self, created: u64, id: &str) -> io::Result<()> {
        // The event file last: it is the commit point of the entry.
        for ext in ["sent", "jpg", "json"] {
            match fs::remove_file(self.path(created, id, ext)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.index.remove(&(created, id.to_string()));
        sync_dir(&self.path(created, id, "json"))
    }

    /// The server has the evidence: delete it at once. `false` if it was not here.
    pub fn ack(&mut self, id: &str) -> io::Result<bool> {
        let stamps: Vec<u64> = self.index.keys().filter(|(_, i)| i == id).map(|(c, _)| *c).collect();
        for created in &stamps {
            self.remove(*created, id)?;
        }
        Ok(!stamps.is_empty())
    }

    /// Deletes everything older than `max_age`, and anything stamped later than `now`
    /// (the clock was set back: its age is unknown, so it is not kept); returns the ids
    /// deleted. One failed deletion does not stop the others; the first error is
    /// returned after trying them all.
    pub fn expire(&mut self, now_ms: u64) -> io::Result<Vec<String>> {
        let old: Vec<(u64, String)> =
            self.index.keys().filter(|(c, _)| past_retention(*c, now_ms, self.max_age_ms)).cloned().collect();
        let mut first_error = None;
        let mut gone = Vec::new();
        for (created, id) in old {
            match self.remove(created, &id) {
                Ok(()) => {
                    self.expired += 1;
                    gone.push(id)
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(gone),
        }
    }

    /// What is stored, oldest first.
    pub fn list(&self) -> Vec<Stored> {
        self.index.iter().map(|(k, e)| stored(k, e)).collect()
    }

    /// The oldest entry not yet delivered that is younger than `after` (a stamp), if any.
    pub fn next_undelivered(&self, after: Option<u64>) -> Option<Stored> {
        let from = after.map_or(0, |a| a.saturating_add(1));
        self.index.range((from, String::new())..).find(|(_, e)| !e.delivered).map(|(k, e)| stored(k, e))
    }

    /// Entries waiting for the broker.
    pub fn undelivered(&self) -> usize {
        self.index.values().filter(|e| !e.delivered).count()
    }

    /// The broker has acknowledged every packet of the entry: it is not sent again.
    /// `false` if the entry is gone (acknowledged, expired or evicted meanwhile).
    pub fn mark_delivered(&mut self, id: &str) -> io::Result<bool> {
        let Some(((created, _), entry)) = self.index.iter_mut().find(|((_, i), _)| i == id) else {
            return Ok(false);
        };
        if !entry.delivered {
            // Synced: a mark lost in a power cut would only mean one duplicate, but a
            // half-written directory entry must not be mistaken for anything else.
            write_atomically(&self.dir.join(format!("{created:013}-{id}.sent")), b"")?;
            entry.delivered = true;
        }
        Ok(true)
    }

    /// The event JSON and the still of an entry.
    pub fn get(&self, id: &str) -> io::Result<Option<Evidence>> {
        let Some(created) = self.index.keys().find(|(_, i)| i == id).map(|(c, _)| *c) else {
            return Ok(None);
        };
        let event = fs::read(self.path(created, id, "json"))?;
        let still = match fs::read(self.path(created, id, "jpg")) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Some(Evidence { event, still }))
    }

    pub fn total_bytes(&self) -> u64 {
        self.index.values().map(|e| e.bytes).sum()
    }

    /// Entries evicted for space since the store was opened.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Entries deleted at `max_age` since the store was opened.
    pub fn expired(&self) -> u64 {
        self.expired
    }
}

fn stored((created_ms, id): &(u64, String), e: &Entry) -> Stored {
    Stored { id: id.clone(), created_ms: *created_ms, bytes: e.bytes, delivered: e.delivered }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("deskcam-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn put_get_ack_and_survive_a_restart() {
        let d = dir("basic");
        let mut s = EvidenceStore::open(&d, 7 * DAY, 1 << 20).unwrap();
        s.put(1000, "e1", b"{\"id\":\"e1\"}", Some(b"JPEG1")).unwrap();
        s.put(2000, "e2", b"{\"id\":\"e2\"}", None).unwrap();
        let e1 = Evidence { event: b"{\"id\":\"e1\"}".to_vec(), still: Some(b"JPEG1".to_vec()) };
        assert_eq!(s.get("e1").unwrap(), Some(e1));
        drop(s);
        // A restart, with the leftover of an interrupted write.
        fs::write(d.join("0000000003000-e3.json.tmp"), b"half").unwrap();
        fs::write(d.join("0000000004000-e4.jpg"), b"still whose event was never written").unwrap();
        let mut s = EvidenceStore::open(&d, 7 * DAY, 1 << 20).unwrap();
        let ids: Vec<String> = s.list().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["e1", "e2"]);
        assert!(!d.join("0000000003000-e3.json.tmp").exists());
        assert!(!d.join("0000000004000-e4.jpg").exists(), "an orphan still is dropped");
        assert!(s.ack("e1").unwrap(), "ack deletes at once");
        assert!(!s.ack("e1").unwrap());
        assert_eq!(s.get("e1").unwrap(), None);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "only e2's event file is left");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn nothing_outlives_max_age_in_simulated_time() {
        let d = dir("expiry");
        let mut s = EvidenceStore::open(&d, 7 * DAY, 1 << 20).unwrap();
        s.put(0, "old", b"{}", Some(b"x")).unwrap();
        s.put(3 * DAY, "newer", b"{}", None).unwrap();
        assert!(s.expire(7 * DAY - 1).unwrap().is_empty());
        assert_eq!(s.expire(7 * DAY).unwrap(), ["old"]);
        drop(s);
        // Expiry also applies to what a restart finds.
        let mut s = EvidenceStore::open(&d, 7 * DAY, 1 << 20).unwrap();
        assert_eq!(s.expire(10 * DAY).unwrap(), ["newer"]);
        // A clock set back makes an entry look younger than zero: it is not kept.
        s.put(20 * DAY, "future", b"{}", None).unwrap();
        assert_eq!(s.expire(19 * DAY).unwrap(), ["future"]);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn max_bytes_evicts_oldest_and_counts() {
        let d = dir("bytes");
        let mut s = EvidenceStore::open(&d, 7 * DAY, 100).unwrap();
        assert!(s.put(1, "a", &[b'x'; 40], None).unwrap().is_empty());
        assert!(s.put(2, "b", &[b'x'; 40], None).unwrap().is_empty());
        assert_eq!(s.put(3, "c", &[b'x'; 40], None).unwrap(), ["a"]);
        assert_eq!(s.evicted(), 1);
        assert!(s.total_bytes() <= 100);
        assert!(s.put(4, "../evil", b"{}", None).is_err(), "ids cannot escape the directory");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn delivery_marks_survive_a_restart_and_keep_the_order() {
        let d = dir("outbox");
        let mut s = EvidenceStore::open(&d, 7 * DAY, 1 << 20).unwrap();
        // Three entries in one millisecond: the stamps still order them.
        for id in ["a", "b", "c"] {
            s.put(5000, id, b"{}", Some(b"JPEG")).unwrap();
        }
        assert!(s.put(5000, "b", b"{}", None).is_err(), "an id is stored once");
        let order: Vec<(String, u64)> = s.list().into_iter().map(|e| (e.id, e.created_ms)).collect();
        assert_eq!(order, [("a".into(), 5000), ("b".into(), 5001), ("c".into(), 5002)]);
        assert!(s.expire(5000).unwrap().is_empty(), "a burst's stamps ahead of the clock are not 'future'");
        let first = s.next_undelivered(None).unwrap();
        assert_eq!(first.id, "a");
        assert_eq!(s.next_undelivered(Some(first.created_ms)).unwrap().id, "b");
        assert!(s.mark_delivered("a").unwrap());
        assert!(!s.mark_delivered("zz").unwrap());
        assert_eq!(s.undelivered(), 2);
        drop(s);
        let mut s = EvidenceStore::open(&d, 7 * DAY, 1 << 20).unwrap();
        assert_eq!(s.next_undelivered(None).unwrap().id, "b", "a stays delivered after a restart");
        assert!(s.list()[0].delivered);
        assert_eq!(s.list()[0].bytes, 6, "the mark takes no room");
        // A later put never goes before what is stored, even with a clock set back.
        s.put(10, "d", b"{}", None).unwrap();
        assert_eq!(s.list().last().unwrap().id, "d");
        assert!(s.ack("a").unwrap());
        assert!(!d.join("0000000005000-a.sent").exists(), "ack removes the mark too");
        let _ = fs::remove_dir_all(&d);
    }
}
