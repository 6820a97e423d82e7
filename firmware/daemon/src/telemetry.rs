//! The periodic `telemetry` message: uptime, analysis rate and speed, queue drops, the
//! evidence store, disk space and temperature. How the device is doing, never what it
//! saw.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskcam_core::schema::{
    AuditEntry, Percentiles, QueueDrops, Reply, StoreTelemetry, Telemetry, SCHEMA_VERSION,
};
use deskcam_uplink::{lock_store, DropOldest, SharedStore, UplinkStats};

/// Inference times kept for the percentiles.
const RECENT: usize = 200;

/// What the scan loop reports as it goes.
#[derive(Default)]
pub struct LiveStats {
    frames: AtomicU64,
    recent_ms: Mutex<VecDeque<f32>>,
}

impl LiveStats {
    pub fn frame(&self, inference_ms: f32) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        let mut recent = self.recent_ms.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(inference_ms);
    }

    fn percentiles(&self) -> Option<Percentiles> {
        let v: Vec<f32> = self.recent_ms.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        Some(Percentiles { p50: percentile(&v, 0.5)?, p95: percentile(&v, 0.95)? })
    }
}

/// The `p` quantile (0..1) of `values` (nearest rank), if there are any.
pub fn percentile<T: Copy + PartialOrd>(values: &[T], p: f32) -> Option<T> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    // (Times and durations: never NaN.)
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(v[((v.len() - 1) as f32 * p).round() as usize])
}

/// Where the figures come from.
pub struct Sources {
    pub start: Instant,
    pub live: Arc<LiveStats>,
    pub store: SharedStore,
    pub audit: Arc<DropOldest<AuditEntry>>,
    pub replies: Arc<DropOldest<Reply>>,
    pub uplink: Arc<UplinkStats>,
    /// Button presses the scan loop did not take in time.
    pub button_drops: Arc<std::sync::atomic::AtomicU64>,
    pub data_dir: PathBuf,
}

pub fn snapshot(src: &Sources) -> Telemetry {
    let (store, evicted, expired) = {
        let s = lock_store(&src.store);
        let t = StoreTelemetry {
            entries: s.list().len() as u64,
            undelivered: s.undelivered() as u64,
            bytes: s.total_bytes(),
        };
        (t, s.evicted(), s.expired())
    };
    Telemetry {
        v: SCHEMA_VERSION,
        uptime_s: src.start.elapsed().as_secs(),
        frames: src.live.frames.load(Ordering::Relaxed),
        inference_ms: src.live.percentiles(),
        drops: QueueDrops {
            audit: src.audit.dropped(),
            replies: src.replies.dropped(),
            commands: src.uplink.commands_dropped.load(Ordering::Relaxed),
            button: src.button_drops.load(Ordering::Relaxed),
            evidence_evicted: evicted,
            // The store counts every deletion at max_age, by the scan loop or the outbox.
            evidence_expired: expired,
        },
        store,
        disk_free_bytes: disk_free(&src.data_dir),
        cpu_temp_c: cpu_temp(Path::new("/sys/class/thermal/thermal_zone0/temp")),
        mqtt_connects: src.uplink.connects.load(Ordering::Relaxed),
    }
}

/// Publishes a snapshot every `interval` until `stop` is set.
pub async fn run(
    src: Sources,
    interval: Duration,
    out: tokio::sync::watch::Sender<Option<Telemetry>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => { out.send_replace(Some(snapshot(&src))); }
            _ = stop.changed() => return,
        }
    }
}

fn disk_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The kernel's thermal zone reads in millidegrees Celsius.
fn cpu_temp(path: &Path) -> Option<f32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse::<f32>().ok().map(|m| m / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_recent_frames_and_readings_from_the_system() {
        let live = LiveStats::default();
        assert_eq!(live.percentiles(), None);
        for ms in 1..=300 {
            live.frame(ms as f32);
        }
        // Only the last 200 (101..=300) count.
        assert_eq!(live.percentiles(), Some(Percentiles { p50: 201.0, p95: 290.0 }));
        assert_eq!(live.frames.load(Ordering::Relaxed), 300);
        assert!(disk_free(Path::new("/")).is_some_and(|b| b > 0));
        assert_eq!(disk_free(Path::new("/no/such/dir")), None);
        let f = std::env::temp_dir().join(format!("deskcam-temp-{}", std::process::id()));
        std::fs::write(&f, "48312\n").unwrap();
        assert_eq!(cpu_temp(&f), Some(48.312));
        let _ = std::fs::remove_file(f);
    }
}
