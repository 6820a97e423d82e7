//! `deskcamctl`: manage a deskcam over MQTT. `status` prints its retained status and
//! state; `watch` prints every event as it arrives; `audit` prints its audit entries;
//! the other subcommands send a command (`cmd/<name>` with a fresh id) and wait for the
//! device's reply. Text by default, `--json` for scripts.
//!
//! Connection settings come from flags, then the environment (`DESKCAM_BROKER`,
//! `DESKCAM_DEVICE`, ...), then a TOML file (`--config`, `DESKCAM_CTL_CONFIG`, or
//! `~/.config/deskcamctl.toml`) with the keys `broker`, `base_topic`, `device`,
//! `username`, `password`, `ca_file`, `cert_file` and `key_file`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use deskcam_core::config::BrokerUrl;
use deskcam_core::schema::{AuditEntry, Reply, Topics, ViolationEvent};
use rumqttc::{Client, Event, Packet, QoS};
use serde_json::json;

#[derive(Parser)]
#[command(name = "deskcamctl", version, about = "Manage deskcam devices over MQTT")]
struct Cli {
    /// Broker URL [default: mqtt://127.0.0.1:1883].
    #[arg(long, env = "DESKCAM_BROKER")]
    broker: Option<String>,
    /// Base topic [default: deskcam].
    #[arg(long, env = "DESKCAM_BASE_TOPIC")]
    base_topic: Option<String>,
    /// Device id.
    #[arg(long, short, env = "DESKCAM_DEVICE")]
    device: Option<String>,
    /// Broker login [env DESKCAM_USERNAME].
    #[arg(long, env = "DESKCAM_USERNAME")]
    username: Option<String>,
    /// Broker password [env DESKCAM_PASSWORD; better there or in the file than on the command line].
    #[arg(long, env = "DESKCAM_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// mqtts://: the broker's CA certificate (PEM).
    #[arg(long, env = "DESKCAM_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// mqtts://: this client's certificate (PEM), if the broker requires one.
    #[arg(long, env = "DESKCAM_CERT_FILE")]
    cert_file: Option<std::path::PathBuf>,
    /// ... and its private key (PEM).
    #[arg(long, env = "DESKCAM_KEY_FILE")]
    key_file: Option<std::path::PathBuf>,
    /// Connection settings file [default: ~/.config/deskcamctl.toml].
    #[arg(long, env = "DESKCAM_CTL_CONFIG")]
    config: Option<std::path::PathBuf>,
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
    /// Switch the scan mode: continuous, spot, scheduled or off (saved on the device).
    Mode { mode: String },
    /// Read or change the device's config.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the effective config (secrets removed).
    Get,
    /// Change keys: `scan.mode=off rules.phone.min_score=0.4`, and/or a TOML file of
    /// changes. A key set to `null` returns to its default. Validated as a whole.
    Set {
        /// Dotted key = TOML value (a bare word is taken as a string).
        assignments: Vec<String>,
        /// A TOML file with the keys to change.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
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
    /// List the evidence the device holds, with whether the broker has it.
    List,
    /// Fetch one piece of evidence: prints its event, writes its still.
    Get {
        id: String,
        /// Where to write the still (JPEG) [default: <id>.jpg].
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// Connection settings from a file.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    broker: Option<String>,
    base_topic: Option<String>,
    device: Option<String>,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<std::path::PathBuf>,
    cert_file: Option<std::path::PathBuf>,
    key_file: Option<std::path::PathBuf>,
}

fn settings(path: Option<&std::path::Path>) -> Result<Settings> {
    let (path, explicit) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => match std::env::var_os("HOME") {
            Some(home) => (std::path::PathBuf::from(home).join(".config/deskcamctl.toml"), false),
            None => return Ok(Settings::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Settings::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `a.b=c` assignments (values in TOML syntax, bare words as strings) and a TOML file,
/// as one JSON merge patch.
fn config_patch(assignments: &[String], file: Option<&std::path::Path>) -> Result<serde_json::Value> {
    let mut patch = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let table: toml::Table =
                text.parse().with_context(|| format!("{} is not valid TOML", f.display()))?;
            serde_json::to_value(table)?
        }
        None => json!({}),
    };
    for a in assignments {
        let (key, raw) = a.split_once('=').with_context(|| format!("'{a}': expected key=value"))?;
        let value = if raw.trim() == "null" {
            serde_json::Value::Null
        } else {
            match format!("v = {raw}").parse::<toml::Table>() {
                Ok(t) => serde_json::to_value(&t["v"])?,
                Err(_) => serde_json::Value::String(raw.to_string()),
            }
        };
        let mut node = &mut patch;
        let parts: Vec<&str> = key.trim().split('.').collect();
        anyhow::ensure!(parts.iter().all(|p| !p.is_empty()), "'{key}' is not a dotted key");
        for part in &parts[..parts.len() - 1] {
            node = node
                .as_object_mut()
                .context("a key is both a value and a table")?
                .entry(part.to_string())
                .or_insert_with(|| json!({}));
        }
        node.as_object_mut()
            .context("a key is both a value and a table")?
            .insert(parts[parts.len() - 1].to_string(), value);
    }
    anyhow::ensure!(
        patch.as_object().is_some_and(|o| !o.is_empty()),
        "nothing to set: give key=value or --file"
    );
    Ok(patch)
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
    let file = settings(cli.config.as_deref())?;
    let broker = cli.broker.or(file.broker).unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let base_topic = cli.base_topic.or(file.base_topic).unwrap_or_else(|| "deskcam".into());
    let device = cli
        .device
        .or(file.device)
        .context("no device: give --device, DESKCAM_DEVICE or `device` in the settings file")?;
    let url = BrokerUrl::parse(&broker).map_err(anyhow::Error::msg)?;
    let topics = Topics::new(&base_topic, &device);
    let credentials = match (cli.username.or(file.username), cli.password.or(file.password)) {
        (Some(u), p) => Some((u, p.unwrap_or_default())),
        (None, Some(_)) => anyhow::bail!("a password without a username"),
        (None, None) => None,
    };
    let tls = match (url.tls, cli.ca_file.or(file.ca_file)) {
        (true, Some(ca)) => {
            let client = match (cli.cert_file.or(file.cert_file), cli.key_file.or(file.key_file)) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => anyhow::bail!("a client certificate needs both --cert-file and --key-file"),
            };
            Some(deskcam_uplink::tls::client_config(&deskcam_uplink::tls::TlsFiles { ca, client })?)
        }
        (true, None) => anyhow::bail!("{url}: mqtts:// needs --ca-file (the broker's CA certificate)"),
        (false, _) => None,
    };
    let mut opts = deskcam_uplink::mqtt_options(
        &format!("deskcamctl-{}", std::process::id()),
        &url,
        credentials.as_ref(),
        tls.as_ref(),
    );
    // Room for a fetched still (base64 in a reply).
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
                eprintln!("deskcamctl: device {} has never reported to {url}", device);
                return Ok(ExitCode::from(3));
            };
            if cli.json {
                let state: serde_json::Value =
                    state.as_deref().and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
                println!("{}", serde_json::json!({"device": device, "status": status, "state": state}));
            } else {
                println!(
                    "device  {}\nstatus  {status}\nstate   {}",
                    device,
                    state.unwrap_or_else(|| "-".into())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ScanNow
        | Cmd::Break(_)
        | Cmd::Evidence(_)
        | Cmd::Identify { .. }
        | Cmd::Mode { .. }
        | Cmd::Config(_) => {
            let mut still_out = None;
            let (name, body) = match cli.command {
                Cmd::Break(BreakCmd::Start { reason }) => ("break/start", json!({ "reason": reason })),
                Cmd::Break(BreakCmd::End) => ("break/end", json!({})),
                Cmd::Evidence(EvidenceCmd::Ack { id }) => ("evidence/ack", json!({ "evidence": id })),
                Cmd::Evidence(EvidenceCmd::List) => ("evidence/list", json!({})),
                Cmd::Evidence(EvidenceCmd::Get { id, out }) => {
                    still_out = Some(out.unwrap_or_else(|| format!("{id}.jpg").into()));
                    ("evidence/get", json!({ "evidence": id }))
                }
                Cmd::Identify { seconds } => ("identify", json!({ "seconds": seconds })),
                Cmd::Mode { mode } => ("mode", json!({ "mode": mode })),
                Cmd::Config(ConfigCmd::Get) => ("config/get", json!({})),
                Cmd::Config(ConfigCmd::Set { assignments, file }) => {
                    ("config/set", json!({ "patch": config_patch(&assignments, file.as_deref())? }))
                }
                _ => ("scan-now", json!({})),
            };
            let (code, reply) = command(&client, &mut conn, &topics, cli.timeout, name, body, cli.json)?;
            if let Some(data) = reply.and_then(|r| r.data) {
                show(name, &data, cli.json, still_out.as_deref())?;
            }
            Ok(code)
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

/// Prints what a command returned (text or JSON); writes a fetched still.
fn show(name: &str, data: &serde_json::Value, json: bool, still_out: Option<&std::path::Path>) -> Result<()> {
    match name {
        "evidence/get" => {
            use base64::Engine as _;
            if let (Some(out), Some(b64)) = (still_out, data["still_base64"].as_str()) {
                let jpeg =
                    base64::engine::general_purpose::STANDARD.decode(b64).context("still is not base64")?;
                std::fs::write(out, &jpeg).with_context(|| format!("writing {}", out.display()))?;
                eprintln!("still: {} ({} bytes)", out.display(), jpeg.len());
            }
            if !json {
                println!("{}", serde_json::to_string_pretty(&data["event"])?);
            }
        }
        _ if json => {}
        "evidence/list" => {
            let list = data.as_array().cloned().unwrap_or_default();
            println!("{:<28} {:<26} {:>9}  delivered", "id", "time", "bytes");
            for e in &list {
                println!(
                    "{:<28} {:<26} {:>9}  {}",
                    e["id"].as_str().unwrap_or("?"),
                    e["time"].as_str().unwrap_or("?"),
                    e["bytes"].as_u64().unwrap_or(0),
                    if e["delivered"] == true { "yes" } else { "no" }
                );
            }
            println!("{} entries", list.len());
        }
        "config/get" => {
            let table: toml::Table = serde_json::from_value(data.clone()).context("config is not a table")?;
            print!("{}", toml::to_string(&table)?);
        }
        "config/set" | "mode" => {
            let list = |k: &str| -> String {
                let v: Vec<&str> =
                    data[k].as_array().into_iter().flatten().filter_map(|x| x.as_str()).collect();
                if v.is_empty() {
                    "-".into()
                } else {
                    v.join(", ")
                }
            };
            println!(
                "changed: {}
waiting for a restart: {}",
                list("changed"),
                list("restart_required")
            );
        }
        _ => println!("{data}"),
    }
    Ok(())
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
) -> Result<(ExitCode, Option<Reply>)> {
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
                    if !json && reply.data.is_none() {
                        println!("{name}: ok");
                    }
                    (ExitCode::SUCCESS, Some(reply))
                } else {
                    eprintln!("deskcamctl: {name} refused: {}", reply.error.clone().unwrap_or_default());
                    (ExitCode::from(EXIT_REFUSED), Some(reply))
                });
            }
            Ok(Err(e)) => anyhow::bail!("broker: {e}"),
            _ => {}
        }
    }
    eprintln!("deskcamctl: no reply to {name} within {timeout_s}s (is the device online?)");
    Ok((ExitCode::from(EXIT_NO_REPLY), None))
}
