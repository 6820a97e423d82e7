//! The audit log on the device: one JSON line per scan (time, mode, result; never an
//! image), kept within a size bound by dropping the oldest lines. The worker can read it;
//! each entry is also published on `audit`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use deskcam_core::schema::AuditEntry;

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
}

impl AuditLog {
    /// Opens (creating the directory if needed) `<dir>/audit.jsonl`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("audit.jsonl");
        // A line torn by a crash is ended, so the next entry starts on a line of its own.
        if let Ok(bytes) = std::fs::read(&path) {
            if bytes.last().is_some_and(|b| *b != b'\n') {
                OpenOptions::new().append(true).open(&path)?.write_all(b"\n")?;
            }
        }
        Ok(AuditLog { path, max_bytes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and syncs it: a scan is on record before it is reported.
    pub fn append(&self, entry: &AuditEntry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        if f.metadata()?.len() > self.max_bytes {
            self.trim()?;
        }
        Ok(())
    }

    /// Keeps the newest lines that fit in half the bound, written to a temporary file
    /// and renamed over the log, so a crash leaves either the old or the new log.
    fn trim(&self) -> io::Result<()> {
        let text = std::fs::read_to_string(&self.path)?;
        let mut keep = Vec::new();
        let mut size = 0u64;
        for line in text.lines().rev() {
            size += line.len() as u64 + 1;
            if size > self.max_bytes / 2 {
                break;
            }
            keep.push(line);
        }
        keep.reverse();
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut f = File::create(&tmp)?;
        for line in keep {
            writeln!(f, "{line}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// All entries, oldest first (lines that do not parse are skipped).
    pub fn entries(&self) -> io::Result<Vec<AuditEntry>> {
        Self::read_entries(&self.path)
    }

    /// The entries of the log at `path`, oldest first (a cut line is skipped).
    pub fn read_entries(path: &Path) -> io::Result<Vec<AuditEntry>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskcam_core::schema::{ScanResult, SCHEMA_VERSION};

    fn entry(i: u32) -> AuditEntry {
        AuditEntry {
            v: SCHEMA_VERSION,
            time: format!("t{i}"),
            mode: "spot".into(),
            result: ScanResult::Clear,
            frames: i,
            rules: vec![],
        }
    }

    #[test]
    fn appends_survive_reopening_and_stay_within_the_bound() {
        let dir = std::env::temp_dir().join(format!("deskcam-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = AuditLog::open(&dir, 4096).unwrap();
        for i in 0..500 {
            log.append(&entry(i)).unwrap();
            assert!(std::fs::metadata(log.path()).unwrap().len() <= 4096);
        }
        // A crash tore the last line: it is ended on reopen and later entries stay whole.
        OpenOptions::new().append(true).open(log.path()).unwrap().write_all(b"{\"v\":1,\"ti").unwrap();
        let again = AuditLog::open(&dir, 4096).unwrap();
        again.append(&entry(500)).unwrap();
        let all = again.entries().unwrap();
        assert!(all.len() > 20, "kept {}", all.len());
        assert_eq!(all.last().unwrap().frames, 500, "the newest entry is kept");
        let frames: Vec<u32> = all.iter().map(|e| e.frames).collect();
        assert!(frames.windows(2).all(|w| w[1] == w[0] + 1), "a contiguous, ordered tail");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
