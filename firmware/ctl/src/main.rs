//! `deskcamctl`: manage a deskcam over MQTT. This first version watches a device:
//! `status` prints its retained status and state; `watch` prints every event as it
//! arrives; `audit` prints its audit entries; `scan-now`, `break start|end` and
//! `evidence ack` send a command and wait for the device's reply. Config and the other
//! commands come with the management plane.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use deskcam_core::config::BrokerUrl;
use deskcam_core::schema::{AuditEntry, Reply, Topics, ViolationEvent};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::json;

#[derive(Parser)]
#[command(name = "deskcamctl", version, about = "Manage deskcam devices over MQTT")]
struct Cli {
    /// Broker URL [env DESKCAM_BROKER].
    #[arg(long, env = "DESKCAM_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Base topic.
    #[arg(long, default_value = "deskcam")]
    base_topic: String,
    /// Device id.
    #[arg(long, short, env = "DESKCAM_DEVICE")]
    device: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for a command's reply.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the device's retained status and state.
    Status,
    /// Print events as they arrive, one line each (Ctrl-C to stop).
    Watch,
    /// Print the device's audit entries (one per scan) as they arrive.
    Audit {
        /// Exit after this many entries.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Ask for one check now (refused outside the shift, in a break, in mode off).
    ScanNow,
    /// Start or end the worker's break.
    #[command(subcommand)]
    Break(BreakCmd),
    /// Manage evidence kept on the device.
    #[command(subcommand)]
    Evidence(EvidenceCmd),
    /// Make the device's LED show the identify pattern.
    Identify {
        #[arg(long, default_value_t = 10)]
        seconds: u32,
    },
}

#[derive(Subcommand)]
enum BreakCmd {
    /// Start a break, with the worker's reason.
    Start {
        #[arg(long)]
        reason: String,
    },
    /// End the break.
    End,
}

#[derive(Subcommand)]
enum EvidenceCmd {
    /// Tell the device the server has this evidence: it deletes it at once.
    Ack { id: String },
}

/// Exit codes a script can rely on.
const EXIT_REFUSED: u8 = 4;
const EXIT_NO_REPLY: u8 = 5;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("deskcamctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let url = BrokerUrl::parse(&cli.broker).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!url.tls, "mqtts:// is not supported by this version of deskcamctl");
    let topics = Topics::new(&cli.base_topic, &cli.device);
    let mut opts = MqttOptions::new(format!("deskcamctl-{}", std::process::id()), &url.host, url.port);
    opts.set_max_packet_size(16 * 1024 * 1024, 64 * 1024);
    let (client, mut conn) = Client::new(opts, 16);
    match cli.command {
        Cmd::Status => {
            client.subscribe(topics.status(), QoS::AtLeastOnce).context("subscribe")?;
            client.subscribe(topics.state(), QoS::AtLeastOnce).context("subscribe")?;
            let (mut status, mut state) = (None, None);
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until && (status.is_none() || state.is_none()) {
                match conn.recv_timeout(Duration::from_millis(200)) {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let text = String::from_utf8_lossy(&p.payload).into_owned();
                        if p.topic == topics.status() {
                            status = Some(text);
                        } else {
                            state = Some(text);
                        }
                    }
                    Ok(Err(e)) => anyhow::bail!("broker {url}: {e}"),
                    _ => {}
                }
            }
            let Some(status) = status else {
                eprintln!("deskcamctl: device {} has never reported to {url}", cli.device);
                return Ok(ExitCode::from(3));
            };
            if cli.json {
                let state: serde_json::Value =
                    state.as_deref().and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
                println!("{}", serde_json::json!({"device": cli.device, "status": status, "state": state}));
            } else {
                println!(
                    "device  {}\nstatus  {status}\nstate   {}",
                    cli.device,
                    state.unwrap_or_else(|| "-".into())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ScanNow | Cmd::Break(_) | Cmd::Evidence(_) | Cmd::Identify { .. } => {
            let (name, body) = match cli.command {
                Cmd::Break(BreakCmd::Start { reason }) => ("break/start", json!({ "reason": reason })),
                Cmd::Break(BreakCmd::End) => ("break/end", json!({})),
                Cmd::Evidence(EvidenceCmd::Ack { id }) => ("evidence/ack", json!({ "evidence": id })),
                Cmd::Identify { seconds } => ("identify", json!({ "seconds": seconds })),
                _ => ("scan-now", json!({})),
            };
            command(&client, &mut conn, &topics, cli.timeout, name, body, cli.json)
        }
        Cmd::Audit { count } => {
            client.subscribe(topics.audit(), QoS::AtLeastOnce).context("subscribe")?;
            let mut seen = 0;
            for ev in conn.iter() {
                let p = match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    Err(e) => anyhow::bail!("broker {url}: {e}"),
                };
                match serde_json::from_slice::<AuditEntry>(&p.payload) {
                    Ok(_) if cli.json => println!("{}", String::from_utf8_lossy(&p.payload)),
                    Ok(a) => {
                        let rules: Vec<&str> = a.rules.iter().map(|r| r.name()).collect();
                        println!(
                            "{}  {:<10} {:<9} frames {:<2} {}",
                            a.time,
                            a.mode,
                            serde_json::to_value(a.result)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            a.frames,
                            rules.join(",")
                        );
                    }
                    Err(e) => eprintln!("deskcamctl: unreadable audit entry: {e}"),
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Watch => {
            client.subscribe(format!("{}/#", topics.root()), QoS::AtLeastOnce).context("subscribe")?;
            for ev in conn.iter() {
                let p = match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    Err(e) => anyhow::bail!("broker {url}: {e}"),
                };
                let sub =
                    p.topic.strip_prefix(&format!("{}/", topics.root())).unwrap_or(&p.topic).to_string();
                if cli.json && !sub.ends_with("/still") {
                    println!("{{\"topic\":{:?},\"payload\":{}}}", sub, String::from_utf8_lossy(&p.payload));
                } else if sub == "event/violation" {
                    match serde_json::from_slice::<ViolationEvent>(&p.payload) {
                        Ok(e) => {
                            println!("{}  {:<12} score {:.2}  id {}", e.time, e.rule.name(), e.score, e.id)
                        }
                        Err(err) => println!("event (unreadable: {err})"),
                    }
                } else if sub.ends_with("/still") {
                    println!("{sub}  {} bytes", p.payload.len());
                } else {
                    println!("{sub}  {}", String::from_utf8_lossy(&p.payload));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends `cmd/<name>` with a fresh id and waits for the device's reply to it.
/// Exit: 0 done, 4 refused by the device (its reason printed), 5 no reply in time.
fn command(
    client: &Client,
    conn: &mut rumqttc::Connection,
    topics: &Topics,
    timeout_s: u64,
    name: &str,
    mut body: serde_json::Value,
    json: bool,
) -> Result<ExitCode> {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let id = format!("ctl-{}-{nanos}", std::process::id());
    body["id"] = serde_json::Value::String(id.clone());
    // Subscribe first, so the reply cannot come before we listen.
    client.subscribe(topics.reply(), QoS::AtLeastOnce).context("subscribe")?;
    let topic = format!("{}/cmd/{name}", topics.root());
    let mut sent = false;
    let until = Instant::now() + Duration::from_secs(timeout_s);
    while Instant::now() < until {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if !sent => {
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, body.to_string())
                    .context("publish")?;
                sent = true;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == topics.reply() => {
                let Ok(reply) = serde_json::from_slice::<Reply>(&p.payload) else { continue };
                if reply.id.as_deref() != Some(id.as_str()) {
                    continue;
                }
                if json {
                    println!("{}", String::from_utf8_lossy(&p.payload));
                }
                return Ok(if reply.ok {
                    if !json {
                        println!("{name}: ok");
                    }
                    ExitCode::SUCCESS
                } else {
                    eprintln!("deskcamctl: {name} refused: {}", reply.error.unwrap_or_default());
                    ExitCode::from(EXIT_REFUSED)
                });
            }
            Ok(Err(e)) => anyhow::bail!("broker: {e}"),
            _ => {}
        }
    }
    eprintln!("deskcamctl: no reply to {name} within {timeout_s}s (is the device online?)");
    Ok(ExitCode::from(EXIT_NO_REPLY))
}
