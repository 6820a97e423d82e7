//! What was sent about the worker, kept for the retention period (invariant 8): one JSON
//! line per violation event queued for the broker, in `<data_dir>/sent.jsonl`. The
//! evidence store deletes an event at the server's ack; this log keeps its metadata
//! (time, rule, id) so the worker's page can still show it, and drops lines older than
//! the retention limit.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    /// Unix milliseconds.
    pub t: u64,
    pub id: String,
    pub rule: String,
}

pub struct SentLog {
    path: PathBuf,
    max_age_ms: u64,
    lock: Mutex<()>,
}

impl SentLog {
    pub fn open(dir: &Path, max_age_ms: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(SentLog { path: dir.join("sent.jsonl"), max_age_ms, lock: Mutex::new(()) })
    }

    /// Appends one event (synced), and drops the lines past the retention limit.
    pub fn append(&self, entry: &Sent) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(&line)?;
        f.sync_all()?;
        let all = self.read()?;
        let keep: Vec<&Sent> = all.iter().filter(|s| entry.t.saturating_sub(s.t) < self.max_age_ms).collect();
        if keep.len() < all.len() {
            let mut text = Vec::new();
            for s in keep {
                text.extend(serde_json::to_vec(s).map_err(io::Error::other)?);
                text.push(b'\n');
            }
            crate::config_file::save(&self.path, "", &String::from_utf8_lossy(&text))?;
        }
        Ok(())
    }

    /// The events sent within the retention period before `now`, newest first.
    pub fn recent(&self, now: u64) -> io::Result<Vec<Sent>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Sent> =
            self.read()?.into_iter().filter(|s| now.saturating_sub(s.t) < self.max_age_ms).collect();
        v.reverse();
        Ok(v)
    }

    fn read(&self) -> io::Result<Vec<Sent>> {
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // A line cut by a power loss is skipped, not fatal.
        Ok(BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_kept_for_the_retention_period_newest_first() {
        let dir = std::env::temp_dir().join(format!("deskcam-sent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = SentLog::open(&dir, 1_000).unwrap();
        let at = |t: u64, id: &str| Sent { t, id: id.into(), rule: "phone".into() };
        log.append(&at(100, "a")).unwrap();
        log.append(&at(600, "b")).unwrap();
        assert_eq!(log.recent(700).unwrap().iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(log.recent(1_200).unwrap().len(), 1, "a is past the retention period");
        // Appending later drops the old line from the file itself.
        log.append(&at(1_500, "c")).unwrap();
        let text = std::fs::read_to_string(dir.join("sent.jsonl")).unwrap();
        assert!(!text.contains("\"a\"") && text.contains("\"b\"") && text.contains("\"c\""), "{text}");
        // A cut line is skipped.
        std::fs::write(dir.join("sent.jsonl"), format!("{text}{{\"t\":16")).unwrap();
        assert_eq!(log.recent(1_550).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
