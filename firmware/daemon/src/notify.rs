//! systemd's notify protocol (`sd_notify`): READY when the device is in its safe state
//! and the scan loop runs, STATUS lines, STOPPING, and WATCHDOG keep-alives that the
//! daemon sends only while the scan loop makes progress, so a stalled pipeline is
//! restarted by systemd (and closed by `deskcam safe-state`, the unit's stop hook).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of `WATCHDOG_USEC`, if systemd asked for keep-alives for this process.
    pub watchdog_every: Option<Duration>,
    /// All of `WATCHDOG_USEC`: how long the scan loop may make no progress.
    pub watchdog_limit: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace) and
    /// `WATCHDOG_USEC` / `WATCHDOG_PID`. Without them it does nothing.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let s = s.to_string_lossy().into_owned();
            let addr = if let Some(name) = s.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&s).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us =
            std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == std::process::id().to_string());
        let usec =
            std::env::var("WATCHDOG_USEC").ok().and_then(|u| u.trim().parse::<u64>().ok()).filter(|u| *u > 0);
        let limit = usec.filter(|_| for_us).map(Duration::from_micros);
        Notifier { socket, watchdog_every: limit.map(|l| l / 2), watchdog_limit: limit }
    }

    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!("sd_notify {state:?}: {e}");
            }
        }
    }
}
