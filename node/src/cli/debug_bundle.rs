//! `openagi debug bundle`: one archive an operator attaches to a bug
//! report.
//!
//! It holds what a maintainer asks for first (versions, the configuration,
//! what the daemon reports, recent logs, the shape of the data directory)
//! and never a secret: no key, token or passphrase, no database contents.
//! Only files listed here are read; the data directory is otherwise only
//! listed (names and sizes). As a second guard every file put in the
//! archive is scrubbed of the API token and, when it is stored
//! unencrypted, the identity seed (hex or raw).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use zeroize::Zeroizing;

use crate::cli::client::ApiClient;
use crate::common::config::{CliOverrides, Config};
use crate::common::datadir::{DataDir, KEY_FILE, KeyFormat, TOKEN_FILE};

/// The most bytes of each log file the bundle takes (the newest ones).
const LOG_TAIL_BYTES: u64 = 2 * 1024 * 1024;
/// Rotated log files included beside the current one.
const ROTATED_LOGS: u32 = 1;
/// The most data-directory entries listed (a runaway directory, e.g. of
/// models, must not make the bundle huge).
const MAX_LISTED: usize = 10_000;
/// What replaces a secret value.
const REDACTED: &str = "<redacted>";

/// What `debug bundle` wrote.
#[derive(Debug)]
pub struct BundleReport {
    /// The archive.
    pub path: PathBuf,
    /// The files in it, in order.
    pub entries: Vec<String>,
    /// Whether a running daemon answered.
    pub daemon_running: bool,
}

/// Writes the bundle of `dir` to `out` (default:
/// `openagi-debug-<unix time>.tar.gz` in the working directory), mode 0600.
pub fn write(dir: &DataDir, out: Option<&Path>) -> Result<BundleReport> {
    let now = crate::unix_ms() / 1000;
    let name = format!("openagi-debug-{now}");
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{name}.tar.gz")));
    let secrets = Secrets::load(dir);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();

    files.push(("README.txt".into(), readme(dir).into_bytes()));
    files.push(("versions.txt".into(), versions().into_bytes()));

    let config = Config::load(dir.path(), None, std::env::vars(), &CliOverrides::default());
    match &config {
        Ok(config) => files.push(("config.toml".into(), redacted_config(config)?.into_bytes())),
        Err(e) => files.push((
            "config-error.txt".into(),
            format!("the configuration does not load: {e}\n").into_bytes(),
        )),
    }

    let daemon_running = match daemon_documents(dir) {
        Ok((addr, status, metrics)) => {
            files.push((
                "daemon.txt".into(),
                format!("daemon running, API at {addr}\n").into_bytes(),
            ));
            files.push(("status.json".into(), status.into_bytes()));
            files.push(("metrics.txt".into(), metrics.into_bytes()));
            true
        }
        Err(e) => {
            files.push((
                "daemon.txt".into(),
                format!("daemon not running ({e:#})\n").into_bytes(),
            ));
            false
        }
    };

    match config
        .as_ref()
        .ok()
        .and_then(|c| c.log.file_path(dir.path()))
    {
        Some(log) => {
            let mut found = false;
            for n in 0..=ROTATED_LOGS {
                let file = if n == 0 {
                    log.clone()
                } else {
                    crate::common::logfile::RotatingFile::rotated_path(&log, n)
                };
                if let Some(tail) = tail(&file, LOG_TAIL_BYTES)? {
                    let base = file
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "log".into());
                    files.push((format!("logs/{base}"), tail));
                    found = true;
                }
            }
            if !found {
                files.push((
                    "logs/none.txt".into(),
                    format!("log.file is {} but it does not exist yet\n", log.display())
                        .into_bytes(),
                ));
            }
        }
        None => files.push((
            "logs/none.txt".into(),
            b"no log file configured (log.file is empty): the daemon logs to stderr only; \
              attach e.g. `journalctl -u openagi --since -1h` instead\n"
                .to_vec(),
        )),
    }

    files.push((
        "store.txt".into(),
        store_report(dir, daemon_running).into_bytes(),
    ));
    files.push(("files.txt".into(), listing(dir.path()).into_bytes()));

    let entries: Vec<String> = files.iter().map(|(n, _)| format!("{name}/{n}")).collect();
    write_archive(&path, &name, files, &secrets)?;
    Ok(BundleReport {
        path,
        entries,
        daemon_running,
    })
}

/// The secrets every file is scrubbed of.
struct Secrets(Vec<Zeroizing<Vec<u8>>>);

impl Secrets {
    /// Reads the token and, if `node.key` is plain hex, the seed: only to
    /// make sure neither ends up in the bundle. A key store file is
    /// encrypted (or at least not hex) and never read.
    fn load(dir: &DataDir) -> Self {
        let mut secrets = Vec::new();
        if let Ok(token) = fs::read_to_string(dir.file(TOKEN_FILE)).map(Zeroizing::new) {
            let token = token.trim();
            if !token.is_empty() {
                secrets.push(Zeroizing::new(token.as_bytes().to_vec()));
            }
        }
        if matches!(dir.key_format(), Ok(KeyFormat::PlainHex))
            && let Ok(text) = fs::read_to_string(dir.file(KEY_FILE)).map(Zeroizing::new)
        {
            let hex_text = text.trim();
            if !hex_text.is_empty() {
                secrets.push(Zeroizing::new(hex_text.to_ascii_lowercase().into_bytes()));
                secrets.push(Zeroizing::new(hex_text.to_ascii_uppercase().into_bytes()));
                if let Ok(raw) = hex::decode(hex_text).map(Zeroizing::new) {
                    secrets.push(raw);
                }
            }
        }
        Self(secrets)
    }

    /// `bytes` with every occurrence of a secret replaced.
    fn scrub(&self, bytes: Vec<u8>) -> Vec<u8> {
        let mut bytes = bytes;
        for secret in &self.0 {
            if secret.is_empty() {
                continue;
            }
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i..].starts_with(secret) {
                    out.extend_from_slice(REDACTED.as_bytes());
                    i += secret.len();
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            bytes = out;
        }
        bytes
    }
}

fn readme(dir: &DataDir) -> String {
    format!(
        "openagi debug bundle of {}\n\n\
         versions.txt   binary, git commit, compiler, OS and kernel\n\
         config.toml    the configuration as the data directory and this shell's OPENAGI_* \
         environment give it (flags given to `run` are not known), secrets redacted\n\
         daemon.txt     whether a daemon was running; then status.json and metrics.txt from it\n\
         logs/          the end of the log file (log.file) and its newest rotated file\n\
         store.txt      database schema version and sizes\n\
         files.txt      every file in the data directory: name, size, mode (no contents)\n\n\
         Never included: node.key, api.token, passphrases, database contents.\n",
        dir.path().display()
    )
}

fn versions() -> String {
    let kernel = fs::read_to_string("/proc/version")
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    format!(
        "openagi {}\ngit commit {}\n{}\nos {os}\narch {}\nkernel {kernel}\n",
        crate::common::version::VERSION,
        crate::common::version::GIT_COMMIT,
        crate::common::version::RUSTC_VERSION,
        std::env::consts::ARCH,
    )
}

/// The configuration as TOML with every secret setting replaced.
fn redacted_config(config: &Config) -> Result<String> {
    let mut value = toml::Value::try_from(config).context("encoding the configuration")?;
    // The settings that hold secrets; a new secret setting must be added
    // here (the test of this module lists them).
    for (section, key) in SECRET_SETTINGS {
        if let Some(v) = value
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .and_then(|s| s.get_mut(*key))
            && v.as_str().is_some_and(|s| !s.is_empty())
        {
            *v = toml::Value::String(REDACTED.into());
        }
    }
    toml::to_string(&value).context("encoding the configuration")
}

/// Configuration keys whose values are secrets.
const SECRET_SETTINGS: &[(&str, &str)] = &[("tor", "control_password")];

/// The address, status document and metrics of the daemon running on
/// `dir`, or why there is none.
fn daemon_documents(dir: &DataDir) -> Result<(String, String, String)> {
    let addr = dir.api_addr()?;
    let client = ApiClient::from_data_dir(dir)?;
    let status = client.get_json("/api/v1/status").with_context(|| {
        format!(
            "{} names {addr}, which does not answer",
            dir.file(crate::common::datadir::API_ADDR_FILE).display()
        )
    })?;
    let metrics = client
        .get_text("/metrics")
        .unwrap_or_else(|e| format!("metrics not available: {e:#}\n"));
    Ok((addr, serde_json::to_string_pretty(&status)?, metrics))
}

/// The last `limit` bytes of `path` (from the start of a line), or `None`
/// if it does not exist.
fn tail(path: &Path, limit: u64) -> Result<Option<Vec<u8>>> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(limit);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    if start > 0
        && let Some(newline) = bytes.iter().position(|b| *b == b'\n')
    {
        bytes.drain(..=newline);
    }
    Ok(Some(bytes))
}

fn store_report(dir: &DataDir, daemon_running: bool) -> String {
    use crate::common::store::{SCHEMA_VERSION, Store};
    let schema = match Store::schema_version_at(dir.path()) {
        Ok(Some(found)) => format!("{found} (this binary uses {SCHEMA_VERSION})"),
        Ok(None) => "no database yet".to_string(),
        // The daemon holds the database; it runs only on its own schema.
        Err(_) if daemon_running => format!(
            "{SCHEMA_VERSION} (held open by the running daemon, which runs only on the schema of its version)"
        ),
        Err(e) => format!("unreadable: {e}"),
    };
    let mut text = format!("schema version: {schema}\n");
    for name in [
        crate::common::store::STORE_FILE,
        crate::common::store::TX_INDEX_FILE,
    ] {
        match fs::metadata(dir.file(name)) {
            Ok(meta) => text.push_str(&format!("{name}: {} bytes\n", meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                text.push_str(&format!("{name}: absent\n"))
            }
            Err(e) => text.push_str(&format!("{name}: {e}\n")),
        }
    }
    text
}

/// Every entry under `root` (not following links): path, size, mode.
fn listing(root: &Path) -> String {
    let mut lines = Vec::new();
    let mut stack = vec![PathBuf::new()];
    let mut truncated = false;
    while let Some(relative) = stack.pop() {
        let entries = match fs::read_dir(root.join(&relative)) {
            Ok(e) => e,
            Err(e) => {
                lines.push(format!("{}/\t(unreadable: {e})", relative.display()));
                continue;
            }
        };
        for entry in entries.flatten() {
            if lines.len() >= MAX_LISTED {
                truncated = true;
                break;
            }
            let path = relative.join(entry.file_name());
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => {
                    lines.push(format!(
                        "{}/\t-\t{:04o}",
                        path.display(),
                        meta.mode() & 0o7777
                    ));
                    stack.push(path);
                }
                Ok(meta) => lines.push(format!(
                    "{}\t{}\t{:04o}",
                    path.display(),
                    meta.len(),
                    meta.mode() & 0o7777
                )),
                Err(e) => lines.push(format!("{}\t(unreadable: {e})", path.display())),
            }
        }
    }
    lines.sort();
    let mut text = String::from("# path\tbytes\tmode\n");
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    if truncated {
        text.push_str(&format!("# listing stopped at {MAX_LISTED} entries\n"));
    }
    text
}

fn write_archive(
    path: &Path,
    name: &str,
    files: Vec<(String, Vec<u8>)>,
    secrets: &Secrets,
) -> Result<()> {
    // Owner-only: peer ids, addresses and logs are the operator's to share.
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut archive = tar::Builder::new(encoder);
    let mtime = crate::unix_ms() / 1000;
    for (file_name, contents) in files {
        let contents = secrets.scrub(contents);
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        archive
            .append_data(
                &mut header,
                format!("{name}/{file_name}"),
                contents.as_slice(),
            )
            .with_context(|| format!("adding {file_name} to {}", path.display()))?;
    }
    let mut file = archive
        .into_inner()
        .and_then(|encoder| encoder.finish())
        .with_context(|| format!("writing {}", path.display()))?;
    file.flush()?;
    file.sync_all()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_settings_are_redacted() {
        let mut config = Config::default();
        config.tor.control_password = "hunter2".into();
        let text = redacted_config(&config).expect("encodes");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("control_password = \"<redacted>\""), "{text}");
        // Every string setting whose name suggests a secret is listed.
        let value = toml::Value::try_from(Config::default()).expect("encodes");
        for (section, keys) in value.as_table().expect("table") {
            for key in keys.as_table().expect("table").keys() {
                if ["password", "passphrase", "secret", "token"]
                    .iter()
                    .any(|w| key.contains(w))
                {
                    assert!(
                        SECRET_SETTINGS.contains(&(section.as_str(), key.as_str())),
                        "{section}.{key} looks secret but is not redacted"
                    );
                }
            }
        }
    }

    #[test]
    fn scrubbing_replaces_every_occurrence() {
        let secrets = Secrets(vec![Zeroizing::new(b"s3cret".to_vec())]);
        assert_text(
            secrets.scrub(b"a s3cret and s3cret.".to_vec()),
            b"a <redacted> and <redacted>.",
        );
    }

    fn assert_text(got: Vec<u8>, want: &[u8]) {
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    }
}
