//! First-boot provisioning. The user writes the card, then edits `deskcam.toml` (device
//! id, broker, certificates) on its FAT boot partition, as with the Raspberry Pi's own
//! first-boot files. At boot, before the daemon, this checks that file completely —
//! config keys, board, the certificate files it names — and only if all of it is right
//! moves it to `/data`: certificates beside it under `/data/secrets` (the key readable
//! by the service user only), the paths in the config rewritten to match (the user's
//! comments kept), and then the config and the secrets deleted from the boot partition,
//! which any PC can read. A problem leaves everything where it was, and says what is
//! wrong on stderr (the journal) and in `deskcam-error.txt` next to the file, where the
//! user finds it when they put the card back in their PC; the service's `OnFailure`
//! unit shows the LED's fault pattern.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use deskcam_core::Config;

use crate::config_file::{dir_of, save, sync_dir};

pub const ERROR_FILE: &str = "deskcam-error.txt";
pub const DONE_FILE: &str = "deskcam-provisioned.txt";
const SECRETS_DIR: &str = "secrets";

#[derive(clap::Args)]
pub struct ProvisionArgs {
    /// The config the user put on the boot partition.
    #[arg(long, default_value = "/boot/firmware/deskcam.toml")]
    pub from: PathBuf,
    /// The data partition: the config goes to DATA/deskcam.toml, certificates to
    /// DATA/secrets/.
    #[arg(long, default_value = "/data")]
    pub data: PathBuf,
    /// The board this image was built for; a config naming another board is refused.
    #[arg(long, env = "DESKCAM_BOARD")]
    pub board: Option<String>,
    /// The service user that must own (and alone read) what is moved to DATA.
    #[arg(long)]
    pub owner: Option<String>,
}

/// The three certificate keys of `[mqtt]`, and whether the file is a private key.
const CERT_KEYS: [(&str, bool); 3] = [("ca_file", false), ("cert_file", false), ("key_file", true)];

/// What was found on the boot partition and is about to move.
struct Plan {
    /// The config text with certificate paths rewritten to their new place.
    config: String,
    device_id: String,
    /// (file on the boot partition, its name under DATA/secrets, is a private key)
    certs: Vec<(PathBuf, String, bool)>,
}

pub fn run(args: ProvisionArgs) -> Result<ExitCode> {
    let boot_dir = dir_of(&args.from);
    if !args.from.exists() {
        let current = args.data.join("deskcam.toml");
        if current.exists() {
            println!("deskcam provision: no {}; keeping {}", args.from.display(), current.display());
            return Ok(ExitCode::SUCCESS);
        }
        // A card written but never set up: say so where the user will look.
        let how = format!(
            "{} is missing: this device has no config yet. Put deskcam.toml (see \
             deskcam.toml.example beside it) on the card's boot partition.",
            args.from.display()
        );
        return refuse(boot_dir, &how);
    }
    let owner = match args.owner.as_deref().map(lookup_user).transpose() {
        Ok(o) => o,
        Err(e) => return refuse(boot_dir, &e),
    };
    let plan = match check(&args.from, &args.data, args.board.as_deref()) {
        Ok(p) => p,
        Err(e) => return refuse(boot_dir, &e),
    };
    install(&plan, &args.data, owner).context("moving the config to the data partition")?;
    // Only once the data partition has everything (synced) do the originals go.
    for path in std::iter::once(&args.from).chain(plan.certs.iter().map(|(src, _, _)| src)) {
        fs::remove_file(path)
            .with_context(|| format!("removing {} from the boot partition", path.display()))?;
    }
    let _ = fs::remove_file(boot_dir.join(ERROR_FILE));
    fs::write(
        boot_dir.join(DONE_FILE),
        format!(
            "deskcam: device '{}' was provisioned from this card's deskcam.toml; the config and \
             its certificates were moved to the device and removed from here.\n",
            plan.device_id
        ),
    )
    .context("writing the provisioned note")?;
    sync_dir(boot_dir).context("syncing the boot partition")?;
    println!(
        "deskcam provision: device '{}' provisioned: {} and {} certificate file(s) moved to {}",
        plan.device_id,
        args.from.display(),
        plan.certs.len(),
        args.data.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reports a problem in the journal and on the card; exit 2 (the unit's OnFailure shows
/// the LED fault pattern).
fn refuse(boot_dir: &Path, problem: &str) -> Result<ExitCode> {
    eprintln!("deskcam provision: not provisioned, nothing was changed:\n{problem}");
    let text = format!(
        "deskcam could not use deskcam.toml from this card; nothing was changed.\n\
         Fix the file and put the card back in the device.\n\n{problem}\n"
    );
    if let Err(e) = fs::write(boot_dir.join(ERROR_FILE), text).and_then(|()| sync_dir(boot_dir)) {
        eprintln!("deskcam provision: could not write {ERROR_FILE} on the boot partition: {e}");
    }
    Ok(ExitCode::from(2))
}

/// Everything that can be wrong, found before anything is changed.
fn check(from: &Path, data: &Path, image_board: Option<&str>) -> Result<Plan, String> {
    let text = fs::read_to_string(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let config = Config::from_toml(&text).map_err(|e| format!("{}:\n{e}", from.display()))?;
    let mut problems = Vec::new();
    if let Some(b) = image_board {
        if config.board != b {
            problems.push(format!(
                "board: this card's image is for board '{b}', the config says '{}'",
                config.board
            ));
        }
    }
    if let Err(e) = crate::board::load(&config.board) {
        problems.push(e);
    }
    if !config.data_dir.starts_with(data) {
        problems.push(format!(
            "storage.data_dir: '{}' is not under {} (the only place the device can write)",
            config.data_dir.display(),
            data.display()
        ));
    }
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{}: {e}", from.display()))?;
    let boot_dir = dir_of(from);
    let mut certs = Vec::new();
    for (key, private) in CERT_KEYS {
        let Some(value) = doc.get("mqtt").and_then(|m| m.get(key)).and_then(|v| v.as_str()) else { continue };
        if value.is_empty() {
            continue;
        }
        let given = PathBuf::from(value);
        // Relative paths are files next to deskcam.toml on the boot partition.
        let path = if given.is_relative() { boot_dir.join(&given) } else { given.clone() };
        if let Err(e) = check_pem(&path, private) {
            problems.push(format!("mqtt.{key}: {e}"));
            continue;
        }
        if path.starts_with(boot_dir) {
            let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
            let target = data.join(SECRETS_DIR).join(&name);
            if let Some(v) = doc["mqtt"][key].as_value_mut() {
                // The new path in place of the old, with the user's comment after it.
                let decor = v.decor().clone();
                *v = toml_edit::Value::from(target.to_string_lossy().into_owned());
                *v.decor_mut() = decor;
            }
            certs.push((path, name, private));
        }
    }
    let mut names: Vec<&String> = certs.iter().map(|(_, n, _)| n).collect();
    names.sort();
    names.dedup();
    if names.len() != certs.len() {
        problems.push("mqtt: two certificate files have the same name".into());
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    Ok(Plan { config: doc.to_string(), device_id: config.device_id.to_string(), certs })
}

/// A readable PEM file of the right kind: a typo in a path or a certificate pasted in
/// the wrong box is found here, at first boot, rather than as a TLS error later.
fn check_pem(path: &Path, private: bool) -> Result<(), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let want = if private { "PRIVATE KEY-----" } else { "CERTIFICATE-----" };
    if !text.lines().any(|l| l.starts_with("-----BEGIN ") && l.ends_with(want)) {
        let what = if private { "a PEM private key" } else { "a PEM certificate" };
        return Err(format!("{}: not {what} (no '-----BEGIN ...{want}' line)", path.display()));
    }
    Ok(())
}

fn install(plan: &Plan, data: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let secrets = data.join(SECRETS_DIR);
    if !plan.certs.is_empty() {
        fs::create_dir_all(&secrets)?;
        fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700))?;
        for (src, name, private) in &plan.certs {
            // Written like the config: whole or not at all, and unreadable to others
            // from the first byte; a certificate (not the key) is then opened up.
            let target = secrets.join(name);
            save(&target, "", &fs::read_to_string(src)?)?;
            if !private {
                fs::set_permissions(&target, fs::Permissions::from_mode(0o644))?;
            }
            chown(&target, owner)?;
        }
        chown(&secrets, owner)?;
    }
    let config = data.join("deskcam.toml");
    save(&config, "# Moved here from the boot partition at first boot.\n", &plan.config)?;
    chown(&config, owner)?;
    sync_dir(data)
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// uid and gid of a user from /etc/passwd (the image's users are local; no NSS needed).
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| format!("--owner: no user '{name}' in /etc/passwd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

    struct Card {
        root: PathBuf,
    }

    impl Card {
        fn new(tag: &str) -> Card {
            let root = std::env::temp_dir().join(format!("deskcam-provision-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("boot")).unwrap();
            fs::create_dir_all(root.join("data")).unwrap();
            Card { root }
        }
        fn boot(&self, name: &str) -> PathBuf {
            self.root.join("boot").join(name)
        }
        fn data(&self) -> PathBuf {
            self.root.join("data")
        }
        fn config(&self, extra: &str) -> String {
            format!(
                "# my desk\ndevice_id = \"desk-7\"\nboard = \"sim\"\n[storage]\ndata_dir = \"{}\"\n{extra}",
                self.data().display()
            )
        }
        fn provision(&self, board: Option<&str>) -> ExitCode {
            run(ProvisionArgs {
                from: self.boot("deskcam.toml"),
                data: self.data(),
                board: board.map(str::to_string),
                owner: None,
            })
            .unwrap()
        }
    }

    impl Drop for Card {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn moves_config_and_certificates_and_removes_them_from_the_card() {
        let card = Card::new("ok");
        let tls = "[mqtt]\nurl = \"mqtts://broker.example:8883\"\nusername = \"desk-7\"\npassword = \"hunter2\"\nca_file = \"ca.pem\"\n\
                   cert_file = \"desk-7.crt\"\nkey_file = \"desk-7.key\"  # the key\n";
        fs::write(card.boot("deskcam.toml"), card.config(tls)).unwrap();
        fs::write(card.boot("ca.pem"), CERT).unwrap();
        fs::write(card.boot("desk-7.crt"), CERT).unwrap();
        fs::write(card.boot("desk-7.key"), KEY).unwrap();
        fs::write(card.boot(ERROR_FILE), "old problem").unwrap();
        assert_eq!(card.provision(Some("sim")), ExitCode::SUCCESS);

        for gone in ["deskcam.toml", "ca.pem", "desk-7.crt", "desk-7.key", ERROR_FILE] {
            assert!(!card.boot(gone).exists(), "{gone} still on the boot partition");
        }
        assert!(fs::read_to_string(card.boot(DONE_FILE)).unwrap().contains("desk-7"));
        let moved = card.data().join("deskcam.toml");
        let text = fs::read_to_string(&moved).unwrap();
        assert!(text.contains("# my desk") && text.contains("# the key"), "comments kept: {text}");
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(config.mqtt.ca_file.as_deref(), Some(card.data().join("secrets/ca.pem").as_path()));
        let (cert, key) = config.mqtt.client_cert.clone().unwrap();
        assert_eq!(fs::read_to_string(cert).unwrap(), CERT);
        assert_eq!(fs::read_to_string(&key).unwrap(), KEY);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&moved), 0o600, "the config holds the broker password");
        assert_eq!(mode(&card.data().join("secrets")), 0o700);

        // A second boot finds nothing to do and leaves the device's config alone.
        assert_eq!(card.provision(Some("sim")), ExitCode::SUCCESS);
        assert_eq!(fs::read_to_string(&moved).unwrap(), text);
    }

    #[test]
    fn a_bad_card_changes_nothing_and_says_why_on_the_card() {
        let card = Card::new("bad");
        let bad =
            "[mqtt]\nurl = \"mqtts://broker.example:8883\"\nca_file = \"ca.pem\"\nkey_file = \"k.pem\"\n\
                   cert_file = \"c.pem\"\n[scan]\nmode = \"sometimes\"\n";
        let original = card.config(bad);
        fs::write(card.boot("deskcam.toml"), &original).unwrap();
        fs::write(card.boot("ca.pem"), KEY).unwrap(); // a key where the CA belongs
        fs::write(card.boot("c.pem"), CERT).unwrap();
        fs::write(card.data().join("deskcam.toml"), "device_id = \"old\"\n").unwrap();

        // The config errors come first (with their keys); fixing them shows the files'.
        assert_eq!(card.provision(Some("sim")), ExitCode::from(2));
        let why = fs::read_to_string(card.boot(ERROR_FILE)).unwrap();
        assert!(why.contains("scan.mode"), "{why}");
        fs::write(card.boot("deskcam.toml"), original.replace("sometimes", "spot")).unwrap();
        assert_eq!(card.provision(Some("rpi4-64")), ExitCode::from(2));
        let why = fs::read_to_string(card.boot(ERROR_FILE)).unwrap();
        assert!(why.contains("mqtt.ca_file") && why.contains("not a PEM certificate"), "{why}");
        assert!(why.contains("mqtt.key_file") && why.contains("k.pem"), "{why}");
        assert!(why.contains("image is for board 'rpi4-64'"), "{why}");

        assert!(card.boot("deskcam.toml").exists() && card.boot("ca.pem").exists());
        assert_eq!(fs::read_to_string(card.data().join("deskcam.toml")).unwrap(), "device_id = \"old\"\n");
        assert!(!card.data().join("secrets").exists());
    }

    #[test]
    fn a_card_never_set_up_is_a_fault_and_a_provisioned_device_needs_nothing() {
        let card = Card::new("empty");
        assert_eq!(card.provision(None), ExitCode::from(2));
        assert!(fs::read_to_string(card.boot(ERROR_FILE)).unwrap().contains("no config yet"));
        fs::write(card.data().join("deskcam.toml"), "device_id = \"d\"\n").unwrap();
        assert_eq!(card.provision(None), ExitCode::SUCCESS);
    }

    #[test]
    fn data_dir_must_be_on_the_data_partition() {
        let card = Card::new("datadir");
        let text = card.config("").replace(&card.data().display().to_string(), "/var/lib/deskcam");
        fs::write(card.boot("deskcam.toml"), text).unwrap();
        assert_eq!(card.provision(None), ExitCode::from(2));
        let why = fs::read_to_string(card.boot(ERROR_FILE)).unwrap();
        assert!(why.contains("storage.data_dir"), "{why}");
    }
}
