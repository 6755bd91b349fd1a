//! The data directory: what `openagi init` creates and `run` uses.
//!
//! ```text
//! DATA_DIR/            mode 0700
//!   node.key           Ed25519 identity seed, 0600: hex, or a key store
//!                      file encrypted under the operator's passphrase
//!   node.key.old-<t>   a key replaced by `openagi keys rotate` at unix time t
//!   rotations/         signed rotation statements, one per rotation
//!   api.token          bearer token of the local API, 0600
//!   openagi.toml       commented configuration
//!   node.redb          the database
//!   node.lock          held (flock) by the running daemon
//!   api.addr           address the running daemon's API is bound to
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use openagi_crypto::Identity;
use openagi_crypto::keystore::{self, KdfParams, Protection};
use openagi_keyfiles::keyfile;
use openagi_keyfiles::keystore as keystore_file;

use crate::common::config;
use crate::common::passphrase::PassphraseSource;

/// Identity key file name.
pub const KEY_FILE: &str = "node.key";
/// API token file name.
pub const TOKEN_FILE: &str = "api.token";
/// Lock file name.
pub const LOCK_FILE: &str = "node.lock";
/// File holding the bound API address of the running daemon.
pub const API_ADDR_FILE: &str = "api.addr";

/// How the identity key is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// The seed as hex on one line: protected by file permissions only.
    PlainHex,
    /// A key store file (`openagi_crypto::keystore`).
    KeyStore {
        /// Whether it is encrypted under a passphrase.
        encrypted: bool,
    },
}

impl KeyFormat {
    /// Whether the secret is encrypted at rest.
    pub fn encrypted(self) -> bool {
        matches!(self, KeyFormat::KeyStore { encrypted: true })
    }
}

/// A data directory path with helpers for its files.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

/// What `init` found and what it created.
#[derive(Debug, Default)]
pub struct InitReport {
    /// Lines for the operator, one per file.
    pub lines: Vec<String>,
    /// The node's peer id.
    pub peer_id: String,
}

/// What `openagi init` was told to write into the configuration; `None`:
/// the flag was not given (a new config then gets the default).
#[derive(Debug, Clone, Default)]
pub struct InitSettings {
    /// `--network-id`.
    pub network_id: Option<String>,
    /// `--transport`.
    pub transport: Option<config::InitTransport>,
}

/// Holds the data directory's lock until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: fs::File,
}

impl DataDir {
    /// Wraps `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The default: `$XDG_DATA_HOME/openagi` or `~/.local/share/openagi`.
    pub fn default_path() -> PathBuf {
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(xdg).join("openagi");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        PathBuf::from(home).join(".local/share/openagi")
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates whatever is missing: the directory (0700), the identity, the
    /// API token and the commented configuration with the network id and
    /// transport of `settings`. Existing files are kept.
    ///
    /// With `encrypt`, a new identity is written as a key store file under
    /// a passphrase read from `passphrase`; an existing encrypted key is
    /// unlocked with it to report the peer id.
    pub fn init(
        &self,
        settings: &InitSettings,
        passphrase: &PassphraseSource,
        encrypt: bool,
    ) -> Result<InitReport> {
        let mut report = InitReport::default();
        if !self.path.exists() {
            fs::create_dir_all(&self.path)
                .with_context(|| format!("creating data directory {}", self.path.display()))?;
            report
                .lines
                .push(format!("created data directory {}", self.path.display()));
        }
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode 0700 on {}", self.path.display()))?;

        let key_path = self.file(KEY_FILE);
        let identity = if key_path.exists() {
            let identity = self
                .identity(passphrase)
                .with_context(|| format!("existing identity {}", key_path.display()))?;
            let how = if self.key_format()?.encrypted() {
                "encrypted"
            } else {
                "unencrypted"
            };
            report.lines.push(format!(
                "found existing identity {} ({how}, kept)",
                key_path.display()
            ));
            if encrypt && how == "unencrypted" {
                report.lines.push(
                    "--encrypt does not touch an existing key; encrypt it with `openagi keys passphrase`"
                        .into(),
                );
            }
            identity
        } else {
            let identity = Identity::generate()?;
            if encrypt {
                let secret = passphrase.for_new_key().read()?;
                self.write_identity(&key_path, &identity, Some(&secret))?;
                report.lines.push(format!(
                    "generated identity {} (encrypted with Argon2id + XChaCha20-Poly1305, mode 0600)",
                    key_path.display()
                ));
            } else {
                keyfile::save_new(&key_path, &identity)?;
                report.lines.push(format!(
                    "generated identity {} (unencrypted, mode 0600)",
                    key_path.display()
                ));
            }
            identity
        };
        report.peer_id = openagi_net::keypair_from_identity(&identity)?
            .public()
            .to_peer_id()
            .to_string();

        let token_path = self.file(TOKEN_FILE);
        if token_path.exists() {
            report.lines.push(format!(
                "found existing API token {} (kept)",
                token_path.display()
            ));
        } else {
            let mut secret = [0u8; 32];
            openagi_crypto::os_random(&mut secret)?;
            keyfile::write_atomic(
                &token_path,
                format!("{}\n", hex::encode(secret)).as_bytes(),
                0o600,
            )?;
            report.lines.push(format!(
                "generated API token {} (mode 0600)",
                token_path.display()
            ));
        }

        let config_path = self.file(config::CONFIG_FILE);
        if let Some(id) = &settings.network_id {
            // Refused here rather than at the next `run`, before anything
            // is written with it.
            let mut check = config::Config::default();
            check.network.network_id = id.clone();
            check
                .net_config("init")
                .map_err(|e| anyhow::anyhow!("--network-id {id:?}: {e}"))?;
        }
        if config_path.exists() {
            report.lines.extend(update_config(&config_path, settings)?);
        } else {
            let defaults = config::Config::default();
            let network_id = settings
                .network_id
                .as_deref()
                .unwrap_or(&defaults.network.network_id);
            let transport = settings
                .transport
                .unwrap_or_else(|| config::InitTransport::of(&defaults));
            keyfile::write_atomic(
                &config_path,
                config::template_for(network_id, transport).as_bytes(),
                0o600,
            )?;
            report
                .lines
                .push(format!("wrote commented config {}", config_path.display()));
            report.lines.push(format!(
                "  network.network_id = {network_id:?}; transport {}: {}{}",
                transport.name(),
                transport.meaning(),
                if settings.transport.is_none() {
                    " (the default; choose with --transport tor|tor-system|direct|hybrid)"
                } else {
                    ""
                }
            ));
        }
        Ok(report)
    }

    /// Refuses a data directory or API token that the group or others can
    /// reach (any of the mode bits `0o077`), naming the path, the mode found
    /// and the `chmod` that fixes it. `init` creates both owner-only; a
    /// looser mode means a copy, an archive or a hand-made directory
    /// exposed the token (which controls the node) and, through the
    /// directory, the database. The key file has the same check where it
    /// is loaded.
    pub fn check_private(&self) -> Result<()> {
        let checks = [
            (self.path.clone(), 0o700, "data directory"),
            (self.file(TOKEN_FILE), 0o600, "API token"),
        ];
        for (path, wanted, what) in checks {
            let meta = match fs::metadata(&path) {
                Ok(meta) => meta,
                // A missing token is reported where it is read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && what == "API token" => {
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "no data directory at {}; run `openagi init --data-dir {}` first",
                    path.display(),
                    path.display()
                ),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!(
                    "{what} {} has mode {mode:04o}, open to group or others; it must be {wanted:04o}: run `chmod {wanted:o} {}`",
                    path.display(),
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// Takes the exclusive lock; fails at once if another daemon holds it.
    pub fn lock(&self) -> Result<DirLock> {
        let path = self.file(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => bail!(
                "another openagi daemon is already running on {} (it holds {}); stop it first or use another --data-dir",
                self.path.display(),
                path.display()
            ),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }

    /// Takes the lock shared when no daemon holds it, for a command that
    /// reads the database itself: while held, no daemon can start and
    /// write. `None` while a daemon runs.
    pub fn lock_shared(&self) -> Result<Option<DirLock>> {
        let path = self.file(LOCK_FILE);
        // Read access is enough for a lock, so an operator who may only
        // read the directory can still read a stopped node's ledger.
        let file = match fs::File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path),
            other => other,
        }
        .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock_shared() {
            Ok(()) => Ok(Some(DirLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }

    /// Loads the identity, telling the operator to run `init` if missing.
    ///
    /// This is the one place the node reads its key. Both formats load: the
    /// plain hex seed and the key store file; `passphrase` is read only
    /// when the file is encrypted. A wrong passphrase is reported as such
    /// and the file is never modified.
    pub fn identity(&self, passphrase: &PassphraseSource) -> Result<Identity> {
        let path = self.file(KEY_FILE);
        if !path.exists() {
            bail!(
                "no identity at {}; run `openagi init --data-dir {}` first",
                path.display(),
                self.path.display()
            );
        }
        match self.key_format()? {
            KeyFormat::PlainHex => Ok(keyfile::load(&path)?),
            KeyFormat::KeyStore { encrypted } => {
                let secret = if encrypted {
                    Some(passphrase.read()?)
                } else {
                    None
                };
                let (identity, _) = keystore_file::load_identity(&path, secret.as_ref().map(|s| s.as_slice()))
                    .map_err(|e| match e {
                        openagi_crypto::Error::WrongPassphrase { .. } => anyhow::anyhow!(
                            "{e}; nothing was changed (the passphrase comes from --passphrase-file, {} or {}, or the prompt)",
                            crate::common::passphrase::PASSPHRASE_FILE_ENV,
                            crate::common::passphrase::PASSPHRASE_ENV
                        ),
                        other => other.into(),
                    })?;
                Ok(identity)
            }
        }
    }

    /// How `node.key` is stored, read without any passphrase.
    pub fn key_format(&self) -> Result<KeyFormat> {
        let path = self.file(KEY_FILE);
        let mut head = [0u8; 8];
        let n = {
            use std::io::Read;
            let mut file =
                fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let mut n = 0;
            // A short file simply is not a key store file.
            while n < head.len() {
                let got = file
                    .read(&mut head[n..])
                    .with_context(|| format!("reading {}", path.display()))?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            n
        };
        if n == head.len() && &head == keystore::MAGIC {
            let info = keystore_file::inspect(&path)?;
            Ok(KeyFormat::KeyStore {
                encrypted: info.encrypted,
            })
        } else {
            Ok(KeyFormat::PlainHex)
        }
    }

    /// Writes `identity` to `path` atomically (0600), replacing any file
    /// there: encrypted under `passphrase` (Argon2id with the production
    /// parameters) or, without one, as plain hex.
    pub fn write_identity(
        &self,
        path: &Path,
        identity: &Identity,
        passphrase: Option<&[u8]>,
    ) -> Result<()> {
        match passphrase {
            Some(passphrase) => keystore_file::write(
                path,
                keystore::IDENTITY_LABEL,
                identity.seed().as_ref(),
                &Protection::Passphrase {
                    passphrase,
                    params: KdfParams::PRODUCTION,
                },
            )?,
            None => {
                let text =
                    zeroize::Zeroizing::new(format!("{}\n", hex::encode(identity.seed().as_ref())));
                keyfile::write_atomic(path, text.as_bytes(), 0o600)?;
            }
        }
        Ok(())
    }

    /// Loads the API token.
    pub fn token(&self) -> Result<String> {
        let path = self.file(TOKEN_FILE);
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "reading API token {} (run `openagi init` to create it)",
                path.display()
            )
        })?;
        let token = text.trim().to_string();
        if token.len() < 32 {
            bail!(
                "API token in {} is shorter than 32 characters; delete it and run `openagi init`",
                path.display()
            );
        }
        Ok(token)
    }

    /// The address the running daemon's API listens on.
    pub fn api_addr(&self) -> Result<String> {
        let path = self.file(API_ADDR_FILE);
        let text = fs::read_to_string(&path).with_context(|| {
            format!("no running daemon found: cannot read {} (is `openagi run` running on this data dir?)", path.display())
        })?;
        Ok(text.trim().to_string())
    }
}

/// Writes the settings `init` was given into the existing config at
/// `path`, keeping its comments, other values and file mode; returns the
/// lines that report it.
fn update_config(path: &Path, settings: &InitSettings) -> Result<Vec<String>> {
    let edits = config::init_edits(settings.network_id.as_deref(), settings.transport);
    if edits.is_empty() {
        return Ok(vec![format!(
            "found existing config {} (kept)",
            path.display()
        )]);
    }
    let text =
        fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let (edited, changes) = config::edit_config_text(&text, &edits).map_err(|why| {
        anyhow::anyhow!(
            "cannot update the existing config {}: {why}; set {} there by hand, or move the file away and run `openagi init` again for a new one",
            path.display(),
            edits
                .iter()
                .map(|e| format!("{}.{} = {}", e.section, e.key, e.value))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    if changes.is_empty() {
        return Ok(vec![format!(
            "found existing config {} (kept: it already has {})",
            path.display(),
            edits
                .iter()
                .filter(|e| e.key != "hybrid" || e.value == toml::Value::Boolean(true))
                .map(|e| format!("{}.{} = {}", e.section, e.key, e.value))
                .collect::<Vec<_>>()
                .join(", ")
        )]);
    }
    let mode = fs::metadata(path)
        .with_context(|| format!("reading the mode of {}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    keyfile::write_atomic(path, edited.as_bytes(), mode)?;
    let mut lines = vec![format!(
        "updated existing config {} (comments and other settings kept; read at the next `openagi run`):",
        path.display()
    )];
    lines.extend(changes.into_iter().map(|c| format!("  {c}")));
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testnet() -> InitSettings {
        InitSettings {
            network_id: Some("testnet".into()),
            transport: None,
        }
    }

    #[test]
    fn init_is_idempotent_and_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(tmp.path().join("node"));
        let first = dir
            .init(&testnet(), &PassphraseSource::current(None), false)
            .expect("init");
        assert!(
            first
                .lines
                .iter()
                .any(|l| l.starts_with("generated identity"))
        );
        let mode = |p: &Path| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&dir.file(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.file(TOKEN_FILE)), 0o600);
        let token = dir.token().expect("token");
        let second = dir
            .init(&testnet(), &PassphraseSource::current(None), false)
            .expect("init again");
        assert_eq!(first.peer_id, second.peer_id);
        assert!(
            second
                .lines
                .iter()
                .any(|l| l.starts_with("found existing identity"))
        );
        assert_eq!(dir.token().expect("token"), token);
    }

    #[test]
    fn second_lock_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(tmp.path());
        let held = dir.lock().expect("first lock");
        let err = dir.lock().expect_err("second lock must fail");
        assert!(err.to_string().contains("already running"), "{err}");
        drop(held);
        dir.lock().expect("free again");
    }

    #[test]
    fn a_shared_lock_is_had_only_while_no_daemon_holds_the_lock() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(tmp.path());
        let reading = dir.lock_shared().expect("locks").expect("no daemon");
        let also = dir.lock_shared().expect("locks").expect("readers share");
        assert!(dir.lock().is_err(), "no daemon starts while one reads");
        drop((reading, also));
        let daemon = dir.lock().expect("daemon locks");
        assert!(dir.lock_shared().expect("locks").is_none());
        drop(daemon);
    }
}
