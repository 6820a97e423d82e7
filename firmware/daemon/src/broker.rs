//! The demo's embedded MQTT broker (rumqttd) on a free loopback port, so a newcomer
//! needs no broker installed. Never used by the device itself.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use anyhow::{Context, Result};

/// Starts the broker on 127.0.0.1 and returns its port. The broker runs on its own
/// threads until the process exits.
pub fn start_embedded() -> Result<u16> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("finding a free loopback port for the embedded broker")?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let config_text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 32
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "demo"
listen = "{listen}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max}
max_inflight_count = 100
dynamic_filters = true
"#,
        max = deskcam_uplink::MAX_PACKET_BYTES
    );
    let config: rumqttd::Config = toml::from_str(&config_text).context("embedded broker config")?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("embedded broker stopped: {e}");
            }
        })
        .context("starting the embedded broker thread")?;
    // Wait until it accepts connections.
    for _ in 0..100 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok(port);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!("embedded broker did not start listening on {listen}")
}
