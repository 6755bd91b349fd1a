//! Daemon configuration: defaults, `openagi.toml`, `OPENAGI_*` environment
//! variables and command-line flags, in increasing precedence.
//!
//! All layers are merged as TOML tables first and deserialised once with
//! unknown keys refused, so a typo anywhere stops start-up with a message
//! that names the key, where it came from, and the fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openagi_net::{ConnectionLimitsConfig, Multiaddr, NetConfig, TransportMode};
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The file name of the configuration inside the data directory.
pub const CONFIG_FILE: &str = "openagi.toml";
/// Prefix of environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "OPENAGI_";

/// A configuration problem, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad or unknown key.
    #[error("{origin}: {message}")]
    Invalid {
        /// Where the bad value came from (file, variable or flag).
        origin: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn invalid(origin: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.into(),
        message: message.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `[network]`: peer-to-peer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Network id; nodes only talk to nodes with the same id.
    pub network_id: String,
    /// `tor` (embedded), `tor-system` or `direct` (TCP/QUIC over IP).
    pub transport: TransportMode,
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Multiaddrs of peers to dial at start, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Multicast DNS discovery of peers on the local network.
    pub mdns: bool,
    /// Most inbound connections.
    pub max_incoming: u32,
    /// Most outbound connections.
    pub max_outgoing: u32,
    /// Most connections per peer.
    pub max_per_peer: u32,
    /// Most connections being negotiated, each direction.
    pub max_pending: u32,
    /// Refuse new connections above this resident memory, in MiB.
    pub max_memory_mib: u64,
    /// Close connections idle this long, in seconds.
    pub idle_timeout_secs: u64,
    /// Seconds between presence announcements.
    pub announce_interval_secs: u64,
    /// Longest wait between redials of a bootstrap peer, in seconds.
    pub redial_max_secs: u64,
    /// Peer ids this node never connects to nor accepts.
    pub blocked_peers: Vec<String>,
    /// Seconds a peer banned for misbehaviour stays refused (kept across
    /// restarts).
    pub ban_secs: u64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        let limits = ConnectionLimitsConfig::default();
        Self {
            network_id: "openagi-main".into(),
            transport: TransportMode::Tor,
            listen: vec![
                "/ip4/0.0.0.0/tcp/4610".into(),
                "/ip4/0.0.0.0/udp/4610/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            mdns: false,
            max_incoming: limits.max_incoming,
            max_outgoing: limits.max_outgoing,
            max_per_peer: limits.max_per_peer,
            max_pending: limits.max_pending,
            max_memory_mib: 1024,
            idle_timeout_secs: 60,
            announce_interval_secs: 10,
            redial_max_secs: 60,
            blocked_peers: Vec::new(),
            ban_secs: openagi_net::BAN_DURATION.as_secs(),
        }
    }
}

/// `[tor]`: Tor transports (`network.transport = "tor"` or `"tor-system"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TorSection {
    /// Virtual port of this node's onion service.
    pub onion_port: u16,
    /// Also use direct TCP/QUIC beside Tor (reveals the IP address).
    pub hybrid: bool,
    /// Embedded mode: an arti configuration file (arti's TOML schema),
    /// e.g. for a private Tor network; empty for the public network.
    pub arti_config: String,
    /// System mode: tor's SOCKS5 address.
    pub socks_addr: SocketAddr,
    /// System mode: tor's ControlPort address.
    pub control_addr: SocketAddr,
    /// System mode: ControlPort password; empty for cookie or no auth.
    pub control_password: String,
    /// System mode: cookie file; empty to use the one tor names.
    pub control_cookie_file: String,
    /// Bound on one onion dial, in seconds.
    pub connect_timeout_secs: u64,
    /// Warn when Tor is not bootstrapped after this many seconds.
    pub bootstrap_warn_secs: u64,
    /// New circuits for every peer after this many seconds (0: never).
    pub circuit_rotation_secs: u64,
}

impl Default for TorSection {
    fn default() -> Self {
        let d = openagi_net::tor::TorSettings::with_dir("");
        Self {
            onion_port: d.onion_port,
            hybrid: d.hybrid,
            arti_config: String::new(),
            socks_addr: d.socks_addr,
            control_addr: d.control_addr,
            control_password: String::new(),
            control_cookie_file: String::new(),
            connect_timeout_secs: d.connect_timeout.as_secs(),
            bootstrap_warn_secs: d.bootstrap_warn_after.as_secs(),
            circuit_rotation_secs: d.circuit_rotation.as_secs(),
        }
    }
}

/// `[api]`: the local HTTP API, metrics and health endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Address of the HTTP server. Keep it on loopback: `/metrics`,
    /// `/health` and `/ready` need no token.
    pub listen: SocketAddr,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4611)),
        }
    }
}

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// Filter directives, e.g. `info` or `info,openagi_net=debug`.
    pub level: String,
    /// Also write the log to this file (relative to the data directory);
    /// empty: stderr only.
    pub file: String,
    /// Rotate the log file when a write would take it past this size.
    pub max_file_bytes: u64,
    /// Rotated log files kept (`FILE.1`, newest, to `FILE.<max_files>`).
    pub max_files: u32,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
            file: String::new(),
            max_file_bytes: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

impl LogSection {
    /// The log file, if one is configured: `file` as given when absolute,
    /// else inside `data_dir`.
    pub fn file_path(&self, data_dir: &Path) -> Option<PathBuf> {
        let file = self.file.trim();
        (!file.is_empty()).then(|| data_dir.join(file))
    }
}

/// `[node]`: process behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Seconds a SIGTERM may take to drain before the daemon exits anyway.
    pub shutdown_timeout_secs: u64,
    /// Seconds between rotations of the messaging one-time keys: a key
    /// handed out and never used stops working within two periods.
    pub one_time_key_rotation_secs: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            shutdown_timeout_secs: 10,
            one_time_key_rotation_secs: 24 * 60 * 60,
        }
    }
}

/// `[consensus]`: PBFT tunables. All validators of a network must use the
/// same `checkpoint_interval` and `window`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsensusSection {
    /// Most transactions in one batch (one block).
    pub max_batch_txs: usize,
    /// Most transaction bytes in one batch.
    pub max_batch_bytes: usize,
    /// A primary proposes a partial batch after this many milliseconds.
    pub max_batch_delay_ms: u64,
    /// A checkpoint every this many blocks.
    pub checkpoint_interval: u64,
    /// Blocks in flight above the stable checkpoint (a multiple of the
    /// checkpoint interval, at least twice it).
    pub window: u64,
    /// Milliseconds without progress before backups replace the primary;
    /// unset, it follows the transport ([`DIRECT_VIEW_CHANGE_TIMEOUT_MS`]
    /// or [`TOR_VIEW_CHANGE_TIMEOUT_MS`]).
    pub view_change_timeout_ms: Option<u64>,
    /// Largest transaction accepted, in bytes.
    pub max_tx_bytes: usize,
    /// Transactions waiting to be proposed before new ones are refused.
    pub max_pending: usize,
    /// Recent blocks kept in memory to answer lagging validators; older
    /// ones are read from disk.
    pub blocks_in_memory: usize,
}

impl Default for ConsensusSection {
    fn default() -> Self {
        let d = openagi_consensus::Config::default();
        Self {
            max_batch_txs: d.max_batch_txs,
            max_batch_bytes: d.max_batch_bytes,
            max_batch_delay_ms: d.max_batch_delay_ms,
            checkpoint_interval: d.checkpoint_interval,
            window: d.window,
            view_change_timeout_ms: None,
            max_tx_bytes: d.max_tx_bytes,
            max_pending: d.max_pending_requests,
            blocks_in_memory: d.blocks_in_memory,
        }
    }
}

/// View-change timeout with the direct transport.
pub const DIRECT_VIEW_CHANGE_TIMEOUT_MS: u64 = 2_000;
/// View-change timeout over Tor: onion round trips take 50-175 ms and
/// circuits stall for seconds; with 2 s a four-validator devnet over onion
/// services changed views 5 times in 130 s, with 10 s never.
pub const TOR_VIEW_CHANGE_TIMEOUT_MS: u64 = 10_000;

impl ConsensusSection {
    /// The replica configuration these settings give on `transport`.
    pub fn replica_config(&self, transport: TransportMode) -> openagi_consensus::Config {
        let view_change_timeout_ms = self.view_change_timeout_ms.unwrap_or(match transport {
            TransportMode::Direct => DIRECT_VIEW_CHANGE_TIMEOUT_MS,
            TransportMode::Tor | TransportMode::TorSystem => TOR_VIEW_CHANGE_TIMEOUT_MS,
        });
        openagi_consensus::Config {
            max_batch_txs: self.max_batch_txs,
            max_batch_bytes: self.max_batch_bytes,
            max_batch_delay_ms: self.max_batch_delay_ms,
            checkpoint_interval: self.checkpoint_interval,
            window: self.window,
            view_change_timeout_ms,
            max_tx_bytes: self.max_tx_bytes,
            max_pending_requests: self.max_pending,
            blocks_in_memory: self.blocks_in_memory,
            ..openagi_consensus::Config::default()
        }
    }
}

/// `[learn]`: this node's part in federated training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnSection {
    /// Local training data: empty (this node does not train), `digits`,
    /// `csv:PATH` or `mnist:DIR`. A quarter is held out for evaluation.
    pub data: String,
    /// Use only shard `K/N` of the training part (an IID split), e.g. to
    /// give each node of a test network its own slice; empty: all of it.
    pub shard: String,
    /// Which jobs to join: `fitting` (every job the data fits) or `none`.
    pub join: JoinMode,
    /// When not empty, join only jobs these coordinators submitted
    /// (libp2p peer ids or Ed25519 public keys in hex).
    pub coordinators: Vec<String>,
    /// Join only jobs with client-level differential privacy.
    pub require_dp: bool,
    /// Join only jobs whose privacy budget caps ε at this or less; 0: no
    /// such requirement.
    pub max_epsilon: f64,
    /// Join only jobs with secure aggregation (the coordinator sees sums,
    /// never this node's update).
    pub require_secure_aggregation: bool,
    /// When not empty, join only jobs of these model kinds:
    /// `logistic_regression`, `mlp`, `cnn`.
    pub models: Vec<String>,
    /// Join only jobs of at most this many rounds; 0: any.
    pub max_rounds: u64,
    /// Stop training for a job once its training has used this many
    /// seconds of CPU on this node (since it started); 0: no cap.
    pub max_cpu_secs_per_job: u64,
    /// Models kept on disk per running job besides the one it stands at:
    /// those of its latest rounds. Older ones are deleted; a finished job
    /// keeps its final model (never deleted) and no other.
    pub keep_recent_models: usize,
}

impl Default for LearnSection {
    fn default() -> Self {
        Self {
            data: String::new(),
            shard: String::new(),
            join: JoinMode::default(),
            coordinators: Vec::new(),
            require_dp: false,
            max_epsilon: 0.0,
            require_secure_aggregation: false,
            models: Vec::new(),
            max_rounds: 0,
            max_cpu_secs_per_job: 0,
            keep_recent_models: openagi_learning::catalog::RetentionPolicy::default().recent_rounds,
        }
    }
}

/// The model kinds `learn.models` may name.
pub const MODEL_KINDS: [&str; 3] = ["logistic_regression", "mlp", "cnn"];

/// `learn.join`: whether this node joins jobs at all. A node joins nothing
/// until its operator says so: training spends its CPU on others' jobs and
/// sends updates derived from its data (`openagi devnet` sets `fitting`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinMode {
    /// Every job the local data fits (and the other settings allow).
    Fitting,
    /// None: this node follows jobs but never trains.
    #[default]
    None,
}

impl LearnSection {
    /// The operator's join policy: `learn.join`, `learn.coordinators`
    /// (each a peer id or a public key) and `learn.require_dp`.
    pub fn join_policy(&self) -> Result<openagi_learning::participant::JoinPolicy, String> {
        let mut coordinators = Vec::with_capacity(self.coordinators.len());
        for entry in &self.coordinators {
            let entry = entry.trim();
            let key = match openagi_crypto::PublicKey::from_hex(entry) {
                Ok(key) => key,
                Err(_) => entry
                    .parse::<libp2p::PeerId>()
                    .ok()
                    .and_then(|peer| openagi_net::public_key_of(&peer))
                    .ok_or_else(|| {
                        format!(
                            "{entry:?} is neither a peer id (12D3KooW...) nor a 64-digit public key"
                        )
                    })?,
            };
            coordinators.push(key);
        }
        Ok(openagi_learning::participant::JoinPolicy {
            never: self.join == JoinMode::None,
            coordinators,
            require_dp: self.require_dp,
            max_epsilon: (self.max_epsilon > 0.0).then_some(self.max_epsilon),
            require_secure_aggregation: self.require_secure_aggregation,
            models: self.models.iter().map(|m| m.trim().to_string()).collect(),
            max_rounds: (self.max_rounds > 0).then_some(self.max_rounds),
            max_cpu_ms: (self.max_cpu_secs_per_job > 0)
                .then(|| self.max_cpu_secs_per_job.saturating_mul(1000)),
        })
    }

    /// The data source, if this node trains.
    pub fn source(&self) -> Result<Option<crate::common::learn_data::DataSource>, String> {
        if self.data.trim().is_empty() {
            return Ok(None);
        }
        crate::common::learn_data::parse_data(self.data.trim()).map(Some)
    }

    /// The shard as `(index from 0, count)`, if one is set.
    pub fn shard(&self) -> Result<Option<(usize, usize)>, String> {
        let text = self.shard.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let parsed = text.split_once('/').and_then(|(k, n)| {
            Some((
                k.trim().parse::<usize>().ok()?,
                n.trim().parse::<usize>().ok()?,
            ))
        });
        match parsed {
            Some((k, n)) if k >= 1 && k <= n && n <= 10_000 => Ok(Some((k - 1, n))),
            _ => Err(format!(
                "`{text}` is not K/N with 1 <= K <= N <= 10000, e.g. \"2/4\""
            )),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Process behaviour.
    pub node: NodeSection,
    /// Peer-to-peer networking.
    pub network: NetworkSection,
    /// Tor transports.
    pub tor: TorSection,
    /// Local HTTP API.
    pub api: ApiSection,
    /// Consensus tunables.
    pub consensus: ConsensusSection,
    /// Federated learning.
    pub learn: LearnSection,
    /// Logging.
    pub log: LogSection,
}

/// Settings given as command-line flags; `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    /// `--network-id`
    pub network_id: Option<String>,
    /// `--listen` (repeatable)
    pub listen: Vec<String>,
    /// `--bootstrap` (repeatable)
    pub bootstrap: Vec<String>,
    /// `--api-listen`
    pub api_listen: Option<String>,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
    /// `--log-level`
    pub log_level: Option<String>,
    /// `--mdns`
    pub mdns: Option<bool>,
}

impl Config {
    /// Loads the configuration: defaults, then `file` (or
    /// `DATA_DIR/openagi.toml` when it exists), then the environment, then
    /// `cli`.
    pub fn load(
        data_dir: &Path,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        cli: &CliOverrides,
    ) -> Result<Config, ConfigError> {
        let schema = schema_table();
        let mut merged = defaults_table();
        let mut origins: BTreeMap<String, String> = BTreeMap::new();

        let default_path = data_dir.join(CONFIG_FILE);
        let path = match file {
            Some(p) => Some(p.to_path_buf()),
            None if default_path.exists() => Some(default_path),
            None => None,
        };
        if let Some(path) = &path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let table: Table = toml::from_str(&text)
                .map_err(|e| invalid(path.display().to_string(), e.to_string()))?;
            for (section, value) in table {
                if section == VERSION_KEY {
                    check_config_version(path, &value)?;
                    continue;
                }
                let Some(known) = schema.get(&section).and_then(Value::as_table) else {
                    return Err(invalid(
                        path.display().to_string(),
                        format!(
                            "unknown section [{section}]; known sections: {}",
                            schema.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                };
                let Value::Table(entries) = value else {
                    return Err(invalid(
                        path.display().to_string(),
                        format!("`{section}` must be a [{section}] table"),
                    ));
                };
                for (key, value) in entries {
                    if !known.contains_key(&key) {
                        return Err(invalid(
                            path.display().to_string(),
                            unknown_key_message(&section, &key, known),
                        ));
                    }
                    origins.insert(format!("{section}.{key}"), path.display().to_string());
                    set(&mut merged, &section, &key, value);
                }
            }
        }

        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (name, raw) in env {
            let Some((section, key)) = env_key(&name, &schema) else {
                // Variables that configure the CLI rather than the file.
                if NON_CONFIG_ENV.contains(&name.as_str()) {
                    continue;
                }
                return Err(invalid(
                    format!("environment variable {name}"),
                    format!(
                        "does not name a setting; settings are OPENAGI_<SECTION>_<KEY>, e.g. OPENAGI_NETWORK_LISTEN (see `{CONFIG_FILE}` for the keys)"
                    ),
                ));
            };
            let template = &schema[&section][&key];
            let value = parse_like(template, &raw).map_err(|why| {
                invalid(
                    format!("environment variable {name}"),
                    format!("{why} (setting {section}.{key})"),
                )
            })?;
            origins.insert(
                format!("{section}.{key}"),
                format!("environment variable {name}"),
            );
            set(&mut merged, &section, &key, value);
        }

        let mut cli_set = |section: &str, key: &str, value: Value, flag: &str| {
            origins.insert(format!("{section}.{key}"), format!("flag {flag}"));
            set(&mut merged, section, key, value);
        };
        if let Some(v) = &cli.network_id {
            cli_set(
                "network",
                "network_id",
                Value::String(v.clone()),
                "--network-id",
            );
        }
        if !cli.listen.is_empty() {
            cli_set("network", "listen", string_array(&cli.listen), "--listen");
        }
        if !cli.bootstrap.is_empty() {
            cli_set(
                "network",
                "bootstrap",
                string_array(&cli.bootstrap),
                "--bootstrap",
            );
        }
        if let Some(v) = &cli.api_listen {
            cli_set("api", "listen", Value::String(v.clone()), "--api-listen");
        }
        if let Some(v) = cli.log_format {
            let name = if v == LogFormat::Json {
                "json"
            } else {
                "pretty"
            };
            cli_set("log", "format", Value::String(name.into()), "--log-format");
        }
        if let Some(v) = &cli.log_level {
            cli_set("log", "level", Value::String(v.clone()), "--log-level");
        }
        if let Some(v) = cli.mdns {
            cli_set("network", "mdns", Value::Boolean(v), "--mdns");
        }

        let config: Config = Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| {
                invalid(
                    "configuration",
                    format!("{} (set from: {})", e.message(), describe(&origins)),
                )
            })?;
        config.validate(&origins)?;
        Ok(config)
    }

    fn validate(&self, origins: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let origin = |key: &str| {
            origins
                .get(key)
                .cloned()
                .unwrap_or_else(|| format!("default for {key}"))
        };
        for (i, addr) in self.network.listen.iter().enumerate() {
            addr.parse::<Multiaddr>().map_err(|e| {
                invalid(
                    origin("network.listen"),
                    format!(
                        "network.listen[{i}] = {addr:?} is not a multiaddr ({e}); write e.g. \"/ip4/0.0.0.0/tcp/4610\""
                    ),
                )
            })?;
        }
        for (i, addr) in self.network.bootstrap.iter().enumerate() {
            let parsed = addr.parse::<Multiaddr>().map_err(|e| {
                invalid(
                    origin("network.bootstrap"),
                    format!(
                        "network.bootstrap[{i}] = {addr:?} is not a multiaddr ({e}); write e.g. \"/ip4/192.0.2.1/tcp/4610/p2p/12D3Koo...\""
                    ),
                )
            })?;
            if !matches!(
                parsed.iter().last(),
                Some(libp2p::multiaddr::Protocol::P2p(_))
            ) {
                return Err(invalid(
                    origin("network.bootstrap"),
                    format!(
                        "network.bootstrap[{i}] = {addr:?} has no peer id: append /p2p/<peer id> (shown by `openagi status` on that node)"
                    ),
                ));
            }
        }
        for (i, peer) in self.network.blocked_peers.iter().enumerate() {
            peer.parse::<openagi_net::PeerId>().map_err(|e| {
                invalid(
                    origin("network.blocked_peers"),
                    format!(
                        "network.blocked_peers[{i}] = {peer:?} is not a peer id ({e}); write the id `openagi status` shows, e.g. \"12D3KooW...\""
                    ),
                )
            })?;
        }
        if self.network.transport.is_tor() && self.network.mdns {
            return Err(invalid(
                origin("network.mdns"),
                format!(
                    "network.mdns = true announces this node on the LAN, which a Tor transport exists to avoid: set network.mdns = false, or network.transport = \"direct\" (transport from {})",
                    origin("network.transport")
                ),
            ));
        }
        if !self.tor.arti_config.is_empty() && !Path::new(&self.tor.arti_config).is_file() {
            return Err(invalid(
                origin("tor.arti_config"),
                format!(
                    "tor.arti_config = {:?} is not a readable file; give the path of an arti configuration, or \"\" for the public Tor network",
                    self.tor.arti_config
                ),
            ));
        }
        self.net_config("check").map_err(|e| {
            let key = if e.to_string().contains("bootstrap") {
                "network.bootstrap"
            } else {
                "network.network_id"
            };
            invalid(origin(key), format!("{key}: {e}"))
        })?;
        let positive = [
            ("network.idle_timeout_secs", self.network.idle_timeout_secs),
            (
                "network.announce_interval_secs",
                self.network.announce_interval_secs,
            ),
            ("network.redial_max_secs", self.network.redial_max_secs),
            ("network.ban_secs", self.network.ban_secs),
            ("network.max_memory_mib", self.network.max_memory_mib),
            ("tor.connect_timeout_secs", self.tor.connect_timeout_secs),
            ("tor.bootstrap_warn_secs", self.tor.bootstrap_warn_secs),
            ("tor.onion_port", u64::from(self.tor.onion_port)),
            (
                "node.shutdown_timeout_secs",
                self.node.shutdown_timeout_secs,
            ),
            (
                "node.one_time_key_rotation_secs",
                self.node.one_time_key_rotation_secs,
            ),
            (
                "consensus.blocks_in_memory",
                u64::try_from(self.consensus.blocks_in_memory).unwrap_or(u64::MAX),
            ),
            ("log.max_file_bytes", self.log.max_file_bytes),
            ("log.max_files", u64::from(self.log.max_files)),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(origin(key), format!("{key} must be at least 1")));
            }
        }
        self.learn
            .source()
            .map_err(|e| invalid(origin("learn.data"), format!("learn.data: {e}")))?;
        self.learn
            .shard()
            .map_err(|e| invalid(origin("learn.shard"), format!("learn.shard: {e}")))?;
        self.learn.join_policy().map_err(|e| {
            invalid(
                origin("learn.coordinators"),
                format!("learn.coordinators: {e}"),
            )
        })?;
        if !(self.learn.max_epsilon.is_finite() && self.learn.max_epsilon >= 0.0) {
            return Err(invalid(
                origin("learn.max_epsilon"),
                format!(
                    "learn.max_epsilon: {} is not a finite ε; use 0 for no requirement",
                    self.learn.max_epsilon
                ),
            ));
        }
        if let Some(unknown) = self
            .learn
            .models
            .iter()
            .find(|m| !MODEL_KINDS.contains(&m.trim()))
        {
            return Err(invalid(
                origin("learn.models"),
                format!(
                    "learn.models: {unknown:?} is not a model kind; use {}",
                    MODEL_KINDS.join(", ")
                ),
            ));
        }
        // Full nodes fetch blocks in ledger answers of at most 8 MiB: a
        // block with its certificate must fit one with room to spare.
        if self.consensus.max_batch_bytes > MAX_BATCH_BYTES_LIMIT {
            return Err(invalid(
                origin("consensus.max_batch_bytes"),
                format!(
                    "consensus.max_batch_bytes is {}; at most {MAX_BATCH_BYTES_LIMIT} (a block must fit the answers full nodes fetch it in)",
                    self.consensus.max_batch_bytes
                ),
            ));
        }
        self.consensus
            .replica_config(self.network.transport)
            .validate()
            .map_err(|e| {
                invalid(
                    origin("consensus.window"),
                    format!("[consensus] settings cannot work: {e}"),
                )
            })?;
        let file = self.log.file.trim();
        if file.ends_with('/') {
            return Err(invalid(
                origin("log.file"),
                format!(
                    "log.file = {:?} is a directory; name a file in it, e.g. \"{}/openagi.log\", or \"\" for stderr only",
                    self.log.file,
                    file.trim_end_matches('/')
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            invalid(
                origin("log.level"),
                format!("log.level = {:?} is not a filter ({e}); write e.g. \"info\" or \"info,openagi_net=debug\"", self.log.level),
            )
        })?;
        Ok(())
    }

    /// The networking configuration for a node whose data directory is
    /// `data_dir` (Tor keys and state live in `<data_dir>/tor`).
    pub fn net_config_for(
        &self,
        agent_version: &str,
        data_dir: &Path,
    ) -> Result<NetConfig, openagi_net::Error> {
        let mut config = self.net_config(agent_version)?;
        if let Some(tor) = config.tor.as_mut() {
            tor.dir = data_dir.join("tor");
        }
        Ok(config)
    }

    /// The Tor settings for a node whose data directory is `data_dir`.
    pub fn tor_settings(&self, data_dir: &Path) -> openagi_net::tor::TorSettings {
        let t = &self.tor;
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        openagi_net::tor::TorSettings {
            dir: data_dir.join("tor"),
            onion_port: t.onion_port,
            hybrid: t.hybrid,
            arti_config: non_empty(&t.arti_config).map(PathBuf::from),
            socks_addr: t.socks_addr,
            control_addr: t.control_addr,
            control_password: non_empty(&t.control_password),
            control_cookie_file: non_empty(&t.control_cookie_file).map(PathBuf::from),
            connect_timeout: Duration::from_secs(t.connect_timeout_secs),
            bootstrap_warn_after: Duration::from_secs(t.bootstrap_warn_secs),
            circuit_rotation: Duration::from_secs(t.circuit_rotation_secs),
        }
    }

    /// The networking configuration derived from this one; Tor state (if
    /// any) is placed relative to the working directory, see
    /// [`Config::net_config_for`].
    pub fn net_config(&self, agent_version: &str) -> Result<NetConfig, openagi_net::Error> {
        let parse = |list: &[String]| -> Result<Vec<Multiaddr>, openagi_net::Error> {
            list.iter()
                .map(|a| {
                    a.parse()
                        .map_err(|e| openagi_net::Error::Config(format!("{a}: {e}")))
                })
                .collect()
        };
        let config = NetConfig {
            network_id: self.network.network_id.clone(),
            transport: self.network.transport,
            listen: parse(&self.network.listen)?,
            bootstrap: parse(&self.network.bootstrap)?,
            mdns: self.network.mdns,
            blocked_peers: self
                .network
                .blocked_peers
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect(),
            limits: ConnectionLimitsConfig {
                max_incoming: self.network.max_incoming,
                max_outgoing: self.network.max_outgoing,
                max_per_peer: self.network.max_per_peer,
                max_pending: self.network.max_pending,
            },
            max_memory_bytes: usize::try_from(self.network.max_memory_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
            idle_timeout: Duration::from_secs(self.network.idle_timeout_secs),
            announce_interval: Duration::from_secs(self.network.announce_interval_secs),
            redial: openagi_net::Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(self.network.redial_max_secs),
            },
            agent_version: format!("openagi/{agent_version}"),
            tor: self
                .network
                .transport
                .is_tor()
                .then(|| self.tor_settings(Path::new("."))),
            // The bans still running are the daemon's to restore.
            bans: openagi_net::BanConfig {
                duration: Duration::from_secs(self.network.ban_secs),
                restored: Vec::new(),
            },
        };
        config.validate()?;
        Ok(config)
    }
}

/// Environment variables read by the CLI itself, not configuration keys.
const NON_CONFIG_ENV: &[&str] = &[
    "OPENAGI_DATA_DIR",
    "OPENAGI_CONFIG",
    "OPENAGI_BIN",
    crate::common::passphrase::PASSPHRASE_ENV,
    crate::common::passphrase::PASSPHRASE_FILE_ENV,
    crate::common::passphrase::NEW_PASSPHRASE_ENV,
    crate::common::passphrase::NEW_PASSPHRASE_FILE_ENV,
    FAULT_POISON_ENV,
    FAULT_FLOOD_ENV,
];

/// Fault injection for the daemon tests, read only by debug builds: a
/// number N makes this node a hostile peer that sends N garbage messages a
/// second, spread over every connected peer and the direct, msg, learn and
/// ledger protocols (well framed, undecodable inside). A release build
/// ignores it.
pub const FAULT_FLOOD_ENV: &str = "OPENAGI_FAULT_FLOOD";

/// Fault injection for the daemon tests, read only by debug builds (the
/// learning service): `signflip:F[:JOB]` or `scale:F[:JOB]` makes this
/// node a hostile participant that sends its update times −F (or F),
/// unclipped, for every job (or the jobs named JOB). A release build
/// ignores it.
pub const FAULT_POISON_ENV: &str = "OPENAGI_FAULT_POISON";

/// Settings without a fixed default (absent from [`defaults_table`]), with
/// a value of their type for parsing environment variables.
const OPTIONAL_KEYS: &[(&str, &str)] = &[("consensus", "view_change_timeout_ms")];

/// Every key a file or the environment may set: the defaults plus the
/// optional keys (typed by an example value; never merged in).
fn schema_table() -> Table {
    let mut schema = defaults_table();
    for (section, key) in OPTIONAL_KEYS {
        set(&mut schema, section, key, Value::Integer(0));
    }
    schema
}

fn defaults_table() -> Table {
    match Value::try_from(Config::default()) {
        Ok(Value::Table(t)) => t,
        // Serialising a plain struct of strings and numbers cannot fail;
        // an empty table would make every key "unknown", which tests catch.
        _ => Table::new(),
    }
}

fn set(table: &mut Table, section: &str, key: &str, value: Value) {
    if let Some(Value::Table(s)) = table.get_mut(section) {
        s.insert(key.to_string(), value);
    }
}

fn string_array(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

fn unknown_key_message(section: &str, key: &str, known: &Table) -> String {
    format!(
        "unknown key `{key}` in [{section}]; valid keys: {}",
        known.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

fn describe(origins: &BTreeMap<String, String>) -> String {
    if origins.is_empty() {
        return "defaults only".into();
    }
    origins
        .iter()
        .map(|(k, v)| format!("{k} from {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Maps `OPENAGI_NETWORK_LISTEN` to `("network", "listen")`.
fn env_key(name: &str, defaults: &Table) -> Option<(String, String)> {
    let rest = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
    for (section, keys) in defaults {
        let Some(key) = rest.strip_prefix(&format!("{section}_")) else {
            continue;
        };
        if keys.as_table().is_some_and(|t| t.contains_key(key)) {
            return Some((section.clone(), key.to_string()));
        }
    }
    None
}

/// Parses an environment string into a value of the same TOML type as the
/// default: lists are comma-separated, booleans are true/false.
fn parse_like(template: &Value, raw: &str) -> Result<Value, String> {
    match template {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("{raw:?} is not a whole number")),
        Value::Float(_) => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("{raw:?} is not a number")),
        Value::Boolean(_) => match raw.trim() {
            "true" | "1" | "yes" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" => Ok(Value::Boolean(false)),
            _ => Err(format!("{raw:?} is not true or false")),
        },
        Value::Array(_) => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        )),
        _ => Err("this setting cannot be set from the environment".into()),
    }
}

/// Largest `consensus.max_batch_bytes`: half a ledger answer.
pub const MAX_BATCH_BYTES_LIMIT: usize = openagi_net::MAX_LEDGER_RESPONSE_BYTES / 2;

/// The version of the `openagi.toml` format this build writes and reads;
/// UPGRADING.md lists what changed in each. A file without the key is
/// version 1.
pub const CONFIG_VERSION: i64 = 1;

/// The top-level key holding [`CONFIG_VERSION`].
const VERSION_KEY: &str = "config_version";

fn check_config_version(path: &Path, value: &Value) -> Result<(), ConfigError> {
    match value.as_integer() {
        Some(v) if (1..=CONFIG_VERSION).contains(&v) => Ok(()),
        Some(v) if v > CONFIG_VERSION => Err(invalid(
            path.display().to_string(),
            format!(
                "{VERSION_KEY} = {v} is for a newer openagi (this one reads up to {CONFIG_VERSION}); run that version or write the file again with `openagi init`"
            ),
        )),
        _ => Err(invalid(
            path.display().to_string(),
            format!("{VERSION_KEY} must be a whole number from 1 to {CONFIG_VERSION}"),
        )),
    }
}

/// The transport chosen with `openagi init --transport`: a value of
/// `network.transport`, or hybrid (embedded Tor with `tor.hybrid = true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitTransport {
    /// Tor embedded in the node (arti): peers reach it through its onion
    /// service.
    Tor,
    /// A tor you run, through its SOCKS port and ControlPort.
    TorSystem,
    /// TCP and QUIC over IP: peers learn the node's IP address.
    Direct,
    /// Embedded Tor plus direct TCP and QUIC beside it.
    Hybrid,
}

impl InitTransport {
    /// The value of `network.transport` it writes.
    pub fn mode(self) -> TransportMode {
        match self {
            InitTransport::Tor | InitTransport::Hybrid => TransportMode::Tor,
            InitTransport::TorSystem => TransportMode::TorSystem,
            InitTransport::Direct => TransportMode::Direct,
        }
    }

    /// The value of `tor.hybrid` it writes.
    pub fn hybrid(self) -> bool {
        self == InitTransport::Hybrid
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            InitTransport::Tor => "tor",
            InitTransport::TorSystem => "tor-system",
            InitTransport::Direct => "direct",
            InitTransport::Hybrid => "hybrid",
        }
    }

    /// What it means for the operator, in one sentence.
    pub fn meaning(self) -> &'static str {
        match self {
            InitTransport::Tor => {
                "Tor embedded in the node, on the public Tor network: peers reach this node through its onion service and never learn its IP address; network.listen is not used and bootstrap peers are onion addresses"
            }
            InitTransport::TorSystem => {
                "a tor you run, through its SOCKS port and ControlPort ([tor] socks_addr and control_addr): peers reach this node through its onion service; network.listen is not used and bootstrap peers are onion addresses"
            }
            InitTransport::Direct => {
                "TCP and QUIC over IP on network.listen: peers learn this node's IP address (LANs, development, validators whose addresses are known)"
            }
            InitTransport::Hybrid => {
                "embedded Tor plus direct TCP and QUIC on network.listen (tor.hybrid set to true): peers can learn this node's IP address"
            }
        }
    }

    /// The choice a configuration amounts to.
    pub fn of(config: &Config) -> Self {
        match config.network.transport {
            TransportMode::Tor if config.tor.hybrid => InitTransport::Hybrid,
            TransportMode::TorSystem if config.tor.hybrid => InitTransport::Hybrid,
            TransportMode::Tor => InitTransport::Tor,
            TransportMode::TorSystem => InitTransport::TorSystem,
            TransportMode::Direct => InitTransport::Direct,
        }
    }
}

/// A setting that differs from its default but that the configured
/// transport does not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredSetting {
    /// The key, e.g. `network.listen`.
    pub key: &'static str,
    /// Why it is not used and what to do instead.
    pub why: String,
}

impl Config {
    /// The settings changed from their defaults that `network.transport`
    /// does not use, so that `run` says so instead of silently ignoring
    /// them. (`network.mdns` with Tor is refused outright instead.)
    pub fn ignored_settings(&self) -> Vec<IgnoredSetting> {
        let d = Config::default();
        let t = &self.tor;
        let transport = transport_name(self.network.transport);
        let mut ignored = Vec::new();
        let mut note = |changed: bool, key: &'static str, why: String| {
            if changed {
                ignored.push(IgnoredSetting { key, why });
            }
        };
        match self.network.transport {
            TransportMode::Direct => {
                let tor_keys: [(&'static str, bool); 10] = [
                    ("tor.onion_port", t.onion_port != d.tor.onion_port),
                    ("tor.hybrid", t.hybrid != d.tor.hybrid),
                    ("tor.arti_config", t.arti_config != d.tor.arti_config),
                    ("tor.socks_addr", t.socks_addr != d.tor.socks_addr),
                    ("tor.control_addr", t.control_addr != d.tor.control_addr),
                    (
                        "tor.control_password",
                        t.control_password != d.tor.control_password,
                    ),
                    (
                        "tor.control_cookie_file",
                        t.control_cookie_file != d.tor.control_cookie_file,
                    ),
                    (
                        "tor.connect_timeout_secs",
                        t.connect_timeout_secs != d.tor.connect_timeout_secs,
                    ),
                    (
                        "tor.bootstrap_warn_secs",
                        t.bootstrap_warn_secs != d.tor.bootstrap_warn_secs,
                    ),
                    (
                        "tor.circuit_rotation_secs",
                        t.circuit_rotation_secs != d.tor.circuit_rotation_secs,
                    ),
                ];
                for (key, changed) in tor_keys {
                    note(
                        changed,
                        key,
                        format!(
                            "{key} is ignored: network.transport = \"direct\" does not use Tor; set network.transport = \"tor\" or \"tor-system\" to use it, or remove it"
                        ),
                    );
                }
            }
            TransportMode::Tor | TransportMode::TorSystem => {
                note(
                    !t.hybrid && self.network.listen != d.network.listen,
                    "network.listen",
                    format!(
                        "network.listen is ignored: network.transport = \"{transport}\" listens only on its onion service; set tor.hybrid = true to also listen directly (peers then learn your IP address), network.transport = \"direct\", or remove it"
                    ),
                );
                if self.network.transport == TransportMode::Tor {
                    let system_keys: [(&'static str, bool); 4] = [
                        ("tor.socks_addr", t.socks_addr != d.tor.socks_addr),
                        ("tor.control_addr", t.control_addr != d.tor.control_addr),
                        (
                            "tor.control_password",
                            t.control_password != d.tor.control_password,
                        ),
                        (
                            "tor.control_cookie_file",
                            t.control_cookie_file != d.tor.control_cookie_file,
                        ),
                    ];
                    for (key, changed) in system_keys {
                        note(
                            changed,
                            key,
                            format!(
                                "{key} is ignored: it is for a tor you run (network.transport = \"tor-system\"), and network.transport = \"tor\" embeds its own"
                            ),
                        );
                    }
                } else {
                    note(
                        t.arti_config != d.tor.arti_config,
                        "tor.arti_config",
                        "tor.arti_config is ignored: it configures the embedded Tor (network.transport = \"tor\"), and network.transport = \"tor-system\" uses your tor's own configuration".into(),
                    );
                }
            }
        }
        ignored
    }
}

/// One setting to write into an existing config file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileEdit {
    /// Its section, e.g. `network`.
    pub section: &'static str,
    /// Its key in the section, e.g. `network_id`.
    pub key: &'static str,
    /// The value to write.
    pub value: Value,
}

/// The edits `openagi init` makes for the flags it was given: the network
/// id and the transport (with `tor.hybrid`, which `hybrid` turns on and
/// every other choice off).
pub fn init_edits(network_id: Option<&str>, transport: Option<InitTransport>) -> Vec<FileEdit> {
    let mut edits = Vec::new();
    if let Some(id) = network_id {
        edits.push(FileEdit {
            section: "network",
            key: "network_id",
            value: Value::String(id.to_string()),
        });
    }
    if let Some(t) = transport {
        edits.push(FileEdit {
            section: "network",
            key: "transport",
            value: Value::String(transport_name(t.mode()).into()),
        });
        edits.push(FileEdit {
            section: "tor",
            key: "hybrid",
            value: Value::Boolean(t.hybrid()),
        });
    }
    edits
}

/// Applies `edits` to `text`, the contents of an existing config file,
/// keeping every comment and every other setting: a key's line is
/// replaced (its trailing comment kept), or else its commented-out
/// template line (`# key = ...`) is uncommented, or else the key is added
/// under its section header. An edit whose value the file already has
/// (or, for an absent key, the default) changes nothing.
///
/// Returns the new text and one line per change (`key: old -> new`). The
/// result is parsed again and compared with the original, key by key; a
/// file this cannot edit exactly (invalid TOML, a key written as a dotted
/// key or in an inline table) is refused with the reason, unchanged.
pub fn edit_config_text(text: &str, edits: &[FileEdit]) -> Result<(String, Vec<String>), String> {
    let original: Table = toml::from_str(text).map_err(|e| format!("it is not valid TOML: {e}"))?;
    let defaults = defaults_table();
    let mut out = text.to_string();
    let mut changes = Vec::new();
    let mut expected = original.clone();
    for edit in edits {
        let current = original
            .get(edit.section)
            .and_then(|s| s.get(edit.key))
            .map(|v| (v.clone(), ""))
            .or_else(|| {
                defaults
                    .get(edit.section)
                    .and_then(|s| s.get(edit.key))
                    .map(|v| (v.clone(), " (the default)"))
            });
        if current.as_ref().map(|(v, _)| v) == Some(&edit.value) {
            continue;
        }
        out = set_line(&out, edit.section, edit.key, &edit.value);
        match expected.get_mut(edit.section) {
            Some(Value::Table(section)) => {
                section.insert(edit.key.to_string(), edit.value.clone());
            }
            _ => {
                let mut section = Table::new();
                section.insert(edit.key.to_string(), edit.value.clone());
                expected.insert(edit.section.to_string(), Value::Table(section));
            }
        }
        changes.push(match current {
            Some((old, how)) => format!(
                "{}.{}: {old}{how} -> {}",
                edit.section, edit.key, edit.value
            ),
            None => format!("{}.{}: {}", edit.section, edit.key, edit.value),
        });
    }
    let edited: Table = toml::from_str(&out).map_err(|e| {
        format!("setting the keys line by line would make it invalid TOML ({e}); is a key written as a dotted key or in an inline table?")
    })?;
    if edited != expected {
        return Err(
            "setting the keys line by line would not give the values asked for; is a key written as a dotted key or in an inline table?".into(),
        );
    }
    Ok((out, changes))
}

/// `text` with `key = value` set in `[section]`, line by line (see
/// [`edit_config_text`], which checks the result).
fn set_line(text: &str, section: &str, key: &str, value: &Value) -> String {
    let new_line = format!("{key} = {value}");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut current = String::new();
    let mut header = None;
    let mut commented = None;
    let mut set = None;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') && !trimmed.starts_with("[[") {
            current = trimmed[1..]
                .split(']')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            if current == section && header.is_none() {
                header = Some(i);
            }
            continue;
        }
        if current != section {
            continue;
        }
        if key_of(trimmed) == Some(key) {
            set = Some(i);
            break;
        }
        if commented.is_none()
            && let Some(rest) = trimmed.strip_prefix('#')
            && key_of(rest.trim_start()) == Some(key)
        {
            commented = Some(i);
        }
    }
    match (set, commented, header) {
        (Some(i), _, _) => {
            let indent = &lines[i][..lines[i].len() - lines[i].trim_start().len()];
            let comment = trailing_comment(&lines[i]).unwrap_or_default();
            lines[i] = format!("{indent}{new_line}{comment}");
        }
        (None, Some(i), _) => lines[i] = new_line,
        (None, None, Some(i)) => lines.insert(i + 1, new_line),
        (None, None, None) => {
            lines.push(String::new());
            lines.push(format!("[{section}]"));
            lines.push(new_line);
        }
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') || text.is_empty() {
        out.push('\n');
    }
    out
}

/// The key a `key = value` line sets, if it is one.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    .then_some(key)
}

/// The ` # comment` after the value of a `key = value` line: the first `#`
/// before which the line still parses as TOML (a `#` inside a string does
/// not end the value).
fn trailing_comment(line: &str) -> Option<String> {
    line.char_indices()
        .filter(|(_, c)| *c == '#')
        .find(|(i, _)| toml::from_str::<Table>(&line[..*i]).is_ok())
        .map(|(i, _)| {
            let start = line[..i].trim_end().len();
            line[start..].to_string()
        })
}

/// `text` as `# ` comment lines of at most 72 columns.
fn comment_lines(text: &str) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 72 {
            lines.push(std::mem::replace(&mut line, String::from("#")));
        }
        line.push(' ');
        line.push_str(word);
    }
    lines.push(line);
    lines.join("\n")
}

/// The commented `openagi.toml` written by `openagi init` with the default
/// transport. Every setting is listed, commented out, with its default, so
/// the file documents itself and later default changes still reach nodes
/// that never edited a key; the network id and the transport are the
/// exceptions, because they are the operator's choice at `init`.
pub fn template(network_id: &str) -> String {
    template_for(network_id, InitTransport::of(&Config::default()))
}

/// [`template`] for the transport chosen with `openagi init --transport`,
/// which is written uncommented under a comment saying what it means.
pub fn template_for(network_id: &str, transport: InitTransport) -> String {
    let d = Config::default();
    let list = |items: &[String]| {
        format!(
            "[{}]",
            items
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        r#"# Open-AGI node configuration.
#
# Precedence: command-line flags > OPENAGI_<SECTION>_<KEY> environment
# variables (e.g. OPENAGI_NETWORK_LISTEN, lists comma-separated) > this
# file > built-in defaults. Every setting is shown commented out with its
# default; uncomment a line to change it. Unknown keys stop start-up.

# The version of this file's format (UPGRADING.md); newer ones are refused.
config_version = {config_version}

[node]
# Seconds a SIGTERM may take to drain (close connections, flush storage)
# before the daemon exits anyway.
# shutdown_timeout_secs = {shutdown}
# Seconds between rotations of the one-time keys peers fetch to open
# end-to-end message sessions; an unused key stops working within two.
# one_time_key_rotation_secs = {otk_rotation}

[network]
# Nodes only talk to nodes with the same network id.
network_id = "{network_id}"

# Transport, chosen with `openagi init --transport {transport_choice}`:
{transport_meaning}
# The choices: "tor" (Tor embedded in the node; peers reach it through its
# onion service), "tor-system" (a tor you run, through its SOCKS and
# ControlPort; see [tor]) or "direct" (TCP and QUIC over IP; peers learn
# your IP address); hybrid in [tor] adds direct TCP and QUIC beside Tor.
# `openagi init --transport` changes it; see doc/tor.md.
transport = "{transport}"

# Multiaddrs to listen on (direct transport, or Tor in hybrid mode).
# listen = {listen}

# Peers to dial at start and redial with backoff, each ending in
# /p2p/<peer id>, e.g. "/ip4/192.0.2.1/tcp/4610/p2p/12D3KooW...".
# bootstrap = {bootstrap}

# Multicast DNS discovery on the local network (leaks presence to the LAN).
# mdns = {mdns}

# Connection limits.
# max_incoming = {max_incoming}
# max_outgoing = {max_outgoing}
# max_per_peer = {max_per_peer}
# max_pending = {max_pending}

# Refuse new connections when the process uses more memory than this (MiB).
# max_memory_mib = {max_memory}

# Close connections idle for this many seconds.
# idle_timeout_secs = {idle}

# Seconds between presence announcements on gossip.
# announce_interval_secs = {announce}

# Longest wait between redials of an unreachable bootstrap peer (seconds).
# redial_max_secs = {redial}

# Peer ids this node never connects to nor accepts connections from, e.g.
# ["12D3KooW..."]; messages to and from them can still cross the mesh
# through other nodes.
# blocked_peers = {blocked}

# A peer that keeps sending refused or malformed messages is disconnected
# and refused for this many seconds, by its identity; bans are kept in the
# database and survive restarts.
# ban_secs = {ban_secs}

[tor]
# Virtual port of this node's onion service (its address is in
# `openagi status`; `openagi tor rotate-address` makes a new one).
# onion_port = {onion_port}

# Also listen and dial over direct TCP/QUIC beside Tor. Peers then learn
# your IP address; never enabled implicitly.
{hybrid}

# Embedded Tor: an arti configuration file (arti's TOML schema) for a
# private or test Tor network (authorities, fallback caches, ...).
# Empty: the public Tor network.
# arti_config = "{arti_config}"

# System tor (transport "tor-system"): SOCKS5 and ControlPort addresses.
# socks_addr = "{socks}"
# control_addr = "{control}"
# ControlPort authentication: SAFECOOKIE/COOKIE with the cookie file tor
# names (or this one), a password (HashedControlPassword), or none.
# control_password = "{control_password}"
# control_cookie_file = "{control_cookie}"

# Seconds one onion dial may take (circuits and rendezvous included).
# connect_timeout_secs = {connect_timeout}

# Warn when Tor is not bootstrapped after this many seconds.
# bootstrap_warn_secs = {bootstrap_warn}

# Seconds before each peer gets fresh circuits for new streams (0: never).
# circuit_rotation_secs = {rotation}

[consensus]
# PBFT tunables; used when the data directory holds a genesis.toml that
# lists this node as a validator. checkpoint_interval and window must be
# the same on every validator.
# Most transactions per block, and most transaction bytes per block.
# max_batch_txs = {max_batch_txs}
# max_batch_bytes = {max_batch_bytes}
# A primary proposes a partial block after this many milliseconds.
# max_batch_delay_ms = {max_batch_delay_ms}
# Checkpoint every N blocks; at most `window` blocks in flight above it.
# checkpoint_interval = {checkpoint_interval}
# window = {window}
# view_change_timeout_ms: milliseconds without progress before the
# validators replace the primary. Not set by default: then
# {view_change_timeout_ms} with the direct transport and {tor_view_change_timeout_ms} over Tor (onion
# round trips take 50-175 ms and circuits can stall for seconds).
# Largest transaction in bytes, and most transactions waiting to be proposed.
# max_tx_bytes = {max_tx_bytes}
# max_pending = {consensus_max_pending}
# Recent blocks kept in memory for validators catching up (older ones are
# read from disk). A restart reads the whole ledger once.
# blocks_in_memory = {blocks_in_memory}

[learn]
# Local data this node trains on when it joins federated jobs whose model
# fits it: "digits" (the embedded 8x8 digits set), "csv:PATH" (features
# then label per line) or "mnist:DIR" (the four IDX files). Empty: this
# node does not train. The data never leaves the node; only model updates
# do.
# data = ""
# Train on shard K of N of it (an IID split), e.g. "2/4".
# shard = ""
# Which jobs to join among those the data fits: "none" (follow jobs,
# never train) or "fitting" (those the data fits and the limits below
# allow). Nothing until the operator chooses: training spends this node's
# CPU and sends updates derived from its data.
# join = "none"
# Join only jobs these coordinators submitted (peer ids or Ed25519 public
# keys in hex); empty: any coordinator.
# coordinators = []
# Join only jobs with client-level differential privacy.
# require_dp = false
# Join only jobs whose privacy budget caps ε at this or less, e.g. 8.0;
# 0: no requirement.
# max_epsilon = 0.0
# Join only jobs with secure aggregation (the coordinator sees sums, never
# this node's update).
# require_secure_aggregation = false
# Join only jobs of these model kinds: "logistic_regression", "mlp",
# "cnn"; empty: any.
# models = []
# Join only jobs of at most this many rounds; 0: any.
# max_rounds = 0
# Stop training for a job once its training has used this many seconds of
# CPU on this node (counted since the daemon started); the job's later
# rounds count this node as a straggler. 0: no cap.
# max_cpu_secs_per_job = 0
# Models this node trained from or aggregated are kept on disk, served to
# any node that asks and announced in the DHT. Per job it keeps the model
# the job stands at and, while the job runs, those of its latest rounds,
# this many; older ones are deleted. A finished job keeps its final model,
# never deleted, and no other. Models no job on the ledger names are left
# alone.
# keep_recent_models = {keep_recent_models}

[api]
# Local HTTP server: /health, /ready and /metrics (no token) and /api/v1
# (bearer token from the data directory's api.token). Keep it on loopback.
# listen = "{api}"

[log]
# "pretty" or "json".
# format = "pretty"
# Filter directives: a level, or per-module levels such as
# "info,openagi_net=debug".
# level = "{level}"
# Also write the log to this file (a relative path is inside the data
# directory), in the same format, from the moment the daemon holds the
# data directory. Empty: stderr only.
# file = "{log_file}"
# When a write would take the file past max_file_bytes it is renamed to
# FILE.1 (FILE.1 to FILE.2, and so on); at most max_files old files are
# kept, so the log takes at most (max_files + 1) * max_file_bytes.
# max_file_bytes = {max_file_bytes}
# max_files = {max_files}
"#,
        config_version = CONFIG_VERSION,
        shutdown = d.node.shutdown_timeout_secs,
        otk_rotation = d.node.one_time_key_rotation_secs,
        transport_choice = transport.name(),
        transport_meaning = comment_lines(&format!("{}.", transport.meaning())),
        transport = transport_name(transport.mode()),
        onion_port = d.tor.onion_port,
        hybrid = if transport.hybrid() {
            "hybrid = true".to_string()
        } else {
            format!("# hybrid = {}", d.tor.hybrid)
        },
        arti_config = d.tor.arti_config,
        socks = d.tor.socks_addr,
        control = d.tor.control_addr,
        control_password = d.tor.control_password,
        control_cookie = d.tor.control_cookie_file,
        connect_timeout = d.tor.connect_timeout_secs,
        bootstrap_warn = d.tor.bootstrap_warn_secs,
        rotation = d.tor.circuit_rotation_secs,
        listen = list(&d.network.listen),
        bootstrap = list(&d.network.bootstrap),
        mdns = d.network.mdns,
        max_incoming = d.network.max_incoming,
        max_outgoing = d.network.max_outgoing,
        max_per_peer = d.network.max_per_peer,
        max_pending = d.network.max_pending,
        max_memory = d.network.max_memory_mib,
        idle = d.network.idle_timeout_secs,
        announce = d.network.announce_interval_secs,
        redial = d.network.redial_max_secs,
        blocked = list(&d.network.blocked_peers),
        ban_secs = d.network.ban_secs,
        api = d.api.listen,
        level = d.log.level,
        log_file = d.log.file,
        max_file_bytes = d.log.max_file_bytes,
        max_files = d.log.max_files,
        max_batch_txs = d.consensus.max_batch_txs,
        max_batch_bytes = d.consensus.max_batch_bytes,
        max_batch_delay_ms = d.consensus.max_batch_delay_ms,
        checkpoint_interval = d.consensus.checkpoint_interval,
        window = d.consensus.window,
        view_change_timeout_ms = DIRECT_VIEW_CHANGE_TIMEOUT_MS,
        tor_view_change_timeout_ms = TOR_VIEW_CHANGE_TIMEOUT_MS,
        max_tx_bytes = d.consensus.max_tx_bytes,
        consensus_max_pending = d.consensus.max_pending,
        blocks_in_memory = d.consensus.blocks_in_memory,
        keep_recent_models = d.learn.keep_recent_models,
    )
}

/// The config spelling of a transport mode.
pub fn transport_name(mode: openagi_net::TransportMode) -> &'static str {
    match mode {
        openagi_net::TransportMode::Direct => "direct",
        openagi_net::TransportMode::Tor => "tor",
        openagi_net::TransportMode::TorSystem => "tor-system",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_change_timeout_follows_the_transport_unless_set() {
        let mut section = ConsensusSection::default();
        let timeout = |s: &ConsensusSection, t| s.replica_config(t).view_change_timeout_ms;
        assert_eq!(
            timeout(&section, TransportMode::Direct),
            DIRECT_VIEW_CHANGE_TIMEOUT_MS
        );
        assert_eq!(
            timeout(&section, TransportMode::Tor),
            TOR_VIEW_CHANGE_TIMEOUT_MS
        );
        assert_eq!(
            timeout(&section, TransportMode::TorSystem),
            TOR_VIEW_CHANGE_TIMEOUT_MS
        );
        section.view_change_timeout_ms = Some(3_000);
        assert_eq!(timeout(&section, TransportMode::Tor), 3_000);
    }

    #[test]
    fn the_view_change_timeout_can_be_set_in_the_file_and_the_environment() {
        let none = CliOverrides::default();
        let c = load_text("[consensus]\nview_change_timeout_ms = 5000\n", &[], &none)
            .expect("file setting accepted");
        assert_eq!(c.consensus.view_change_timeout_ms, Some(5_000));
        let c = load_text(
            "",
            &[("OPENAGI_CONSENSUS_VIEW_CHANGE_TIMEOUT_MS", "7000")],
            &none,
        )
        .expect("environment setting accepted");
        assert_eq!(c.consensus.view_change_timeout_ms, Some(7_000));
    }

    #[test]
    fn the_config_version_is_read_and_a_newer_one_refused() {
        let none = CliOverrides::default();
        load_text("[node]\n", &[], &none).expect("no stamp reads as version 1");
        load_text("config_version = 1\n[node]\n", &[], &none).expect("current version");
        let newer = format!("config_version = {}\n", CONFIG_VERSION + 1);
        let e = load_text(&newer, &[], &none).expect_err("newer refused");
        assert!(e.to_string().contains("newer openagi"), "{e}");
        let e = load_text("config_version = \"one\"\n", &[], &none).expect_err("not a number");
        assert!(e.to_string().contains("config_version must be"), "{e}");
    }

    fn load_text(
        text: &str,
        env: &[(&str, &str)],
        cli: &CliOverrides,
    ) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, text).expect("write");
        Config::load(
            dir.path(),
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            cli,
        )
    }

    #[test]
    fn template_lists_every_setting_with_its_default() {
        let uncommented: String = template("openagi-main")
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| r.contains(" = "))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        // Read as a file is read (the loader takes config_version, which
        // is not a setting).
        let parsed =
            load_text(&uncommented, &[], &CliOverrides::default()).expect("template parses");
        assert_eq!(parsed, Config::default());
        // Every key of the defaults appears in the template.
        for (section, keys) in defaults_table() {
            for key in keys.as_table().expect("table").keys() {
                assert!(
                    uncommented.contains(&format!("\n{key} = ")),
                    "{section}.{key} missing"
                );
            }
        }
    }

    #[test]
    fn precedence_is_cli_then_env_then_file() {
        let file = "[network]\nnetwork_id = \"from-file\"\ntransport = \"direct\"\nidle_timeout_secs = 5\nmdns = true\n";
        let env = [
            ("OPENAGI_NETWORK_NETWORK_ID", "from-env"),
            ("OPENAGI_NETWORK_IDLE_TIMEOUT_SECS", "7"),
        ];
        let cli = CliOverrides {
            network_id: Some("from-cli".into()),
            ..Default::default()
        };
        let c = load_text(file, &env, &cli).expect("valid");
        assert_eq!(c.network.network_id, "from-cli");
        assert_eq!(c.network.idle_timeout_secs, 7);
        assert!(c.network.mdns);
        assert_eq!(c.api, ApiSection::default());
    }

    #[test]
    fn env_lists_are_comma_separated() {
        let env = [(
            "OPENAGI_NETWORK_LISTEN",
            "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2",
        )];
        let c = load_text("", &env, &CliOverrides::default()).expect("valid");
        assert_eq!(
            c.network.listen,
            vec!["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
        );
    }

    fn error_text(r: Result<Config, ConfigError>) -> String {
        r.expect_err("must be refused").to_string()
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = error_text(load_text(
            "[network]\nlisten_addr = []\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("listen_addr") && e.contains("valid keys"), "{e}");
        let e = error_text(load_text("[netwrk]\n", &[], &CliOverrides::default()));
        assert!(e.contains("[netwrk]"), "{e}");
        let e = error_text(load_text(
            "[network]\nidle_timeout_secs = \"soon\"\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("idle_timeout_secs"), "{e}");
        let e = error_text(load_text(
            "[network]\nlisten = [\"tcp:4610\"]\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(
            e.contains("network.listen[0]") && e.contains("/ip4/"),
            "{e}"
        );
        let e = error_text(load_text(
            "[network]\nbootstrap = [\"/ip4/127.0.0.1/tcp/1\"]\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("/p2p/"), "{e}");
        let e = error_text(load_text(
            "",
            &[("OPENAGI_NETWORK_IDLE", "3")],
            &CliOverrides::default(),
        ));
        assert!(e.contains("OPENAGI_NETWORK_IDLE"), "{e}");
        let e = error_text(load_text(
            "",
            &[("OPENAGI_NETWORK_MDNS", "maybe")],
            &CliOverrides::default(),
        ));
        assert!(
            e.contains("OPENAGI_NETWORK_MDNS") && e.contains("network.mdns"),
            "{e}"
        );
        let e = error_text(load_text(
            "[log]\nlevel = \"info,,=x=\"\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("log.level"), "{e}");
        let e = error_text(load_text(
            "[node]\nshutdown_timeout_secs = 0\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("node.shutdown_timeout_secs"), "{e}");
        let e = error_text(load_text(
            "[log]\nmax_file_bytes = 0\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("log.max_file_bytes must be at least 1"), "{e}");
        let e = error_text(load_text(
            "",
            &[("OPENAGI_LOG_MAX_FILES", "0")],
            &CliOverrides::default(),
        ));
        assert!(
            e.contains("OPENAGI_LOG_MAX_FILES") && e.contains("log.max_files"),
            "{e}"
        );
        let e = error_text(load_text(
            "[log]\nfile = \"logs/\"\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(
            e.contains("log.file") && e.contains("logs/openagi.log"),
            "{e}"
        );
    }

    #[test]
    fn the_log_file_is_relative_to_the_data_dir() {
        let mut log = LogSection::default();
        let dir = Path::new("/var/lib/openagi");
        assert_eq!(log.file_path(dir), None);
        log.file = "logs/openagi.log".into();
        assert_eq!(
            log.file_path(dir),
            Some(PathBuf::from("/var/lib/openagi/logs/openagi.log"))
        );
        log.file = "/var/log/openagi/node.log".into();
        assert_eq!(
            log.file_path(dir),
            Some(PathBuf::from("/var/log/openagi/node.log"))
        );
    }

    #[test]
    fn tor_is_the_default_and_refuses_leaky_settings() {
        let c = load_text("", &[], &CliOverrides::default()).expect("valid");
        assert_eq!(c.network.transport, TransportMode::Tor);
        let dir = Path::new("/var/lib/openagi");
        let net = c.net_config_for("1", dir).expect("net config");
        let tor = net.tor.expect("tor settings");
        assert_eq!(tor.dir, dir.join("tor"));
        assert!(!tor.hybrid);
        let e = error_text(load_text(
            "[network]\nmdns = true\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("network.mdns") && e.contains("direct"), "{e}");
        let e = error_text(load_text(
            "[network]\nbootstrap = [\"/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo\"]\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(
            e.contains("network.bootstrap") && e.contains("onion"),
            "{e}"
        );
        // hybrid is explicit and then allows direct bootstrap peers
        let c = load_text(
            "[network]\nbootstrap = [\"/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo\"]\n[tor]\nhybrid = true\n",
            &[],
            &CliOverrides::default(),
        )
        .expect("hybrid");
        assert!(c.tor.hybrid);
        let c = load_text(
            "",
            &[
                ("OPENAGI_NETWORK_TRANSPORT", "tor-system"),
                ("OPENAGI_TOR_SOCKS_ADDR", "127.0.0.1:19050"),
            ],
            &CliOverrides::default(),
        )
        .expect("system");
        assert_eq!(c.network.transport, TransportMode::TorSystem);
        assert_eq!(c.tor.socks_addr.port(), 19050);
        let e = error_text(load_text(
            "[tor]\narti_config = \"/nonexistent/arti.toml\"\n",
            &[],
            &CliOverrides::default(),
        ));
        assert!(e.contains("tor.arti_config"), "{e}");
    }

    #[test]
    fn init_writes_the_chosen_transport_and_what_it_means() {
        for choice in [
            InitTransport::Tor,
            InitTransport::TorSystem,
            InitTransport::Direct,
            InitTransport::Hybrid,
        ] {
            let text = template_for("mynet", choice);
            let parsed = load_text(&text, &[], &CliOverrides::default()).expect("template loads");
            assert_eq!(parsed.network.network_id, "mynet");
            assert_eq!(InitTransport::of(&parsed), choice, "{text}");
            assert!(
                text.contains(&format!("--transport {}`:", choice.name())),
                "{text}"
            );
            assert!(
                text.lines().all(|l| l.len() <= 80),
                "long comment lines in the {} template",
                choice.name()
            );
        }
        assert_eq!(
            template("openagi-main"),
            template_for("openagi-main", InitTransport::Tor)
        );
    }

    #[test]
    fn settings_the_transport_does_not_use_are_named() {
        let none = CliOverrides::default();
        let keys = |text: &str| -> Vec<&'static str> {
            load_text(text, &[], &none)
                .expect("valid")
                .ignored_settings()
                .into_iter()
                .map(|i| i.key)
                .collect()
        };
        assert!(keys("").is_empty());
        assert!(keys("[network]\ntransport = \"direct\"\n").is_empty());
        assert_eq!(
            keys("[network]\nlisten = [\"/ip4/0.0.0.0/tcp/1\"]\n"),
            ["network.listen"]
        );
        // Hybrid mode listens on network.listen.
        assert!(
            keys("[network]\nlisten = [\"/ip4/0.0.0.0/tcp/1\"]\n[tor]\nhybrid = true\n").is_empty()
        );
        assert_eq!(
            keys("[network]\ntransport = \"direct\"\n[tor]\nhybrid = true\nonion_port = 81\n"),
            ["tor.onion_port", "tor.hybrid"]
        );
        assert_eq!(
            keys("[tor]\nsocks_addr = \"127.0.0.1:19050\"\n"),
            ["tor.socks_addr"]
        );
        let c = load_text("[network]\nlisten = []\n", &[], &none).expect("valid");
        let why = &c.ignored_settings()[0].why;
        assert!(
            why.contains("network.listen") && why.contains("tor.hybrid"),
            "{why}"
        );
    }

    #[test]
    fn init_edits_an_existing_file_line_by_line_and_keeps_the_rest() {
        let original = template("openagi-main");
        let edits = init_edits(Some("mynet"), Some(InitTransport::Direct));
        let (text, changes) = edit_config_text(&original, &edits).expect("editable");
        assert_eq!(
            changes,
            [
                "network.network_id: \"openagi-main\" -> \"mynet\"",
                "network.transport: \"tor\" -> \"direct\"",
            ]
        );
        let removed: Vec<&str> = original
            .lines()
            .filter(|l| !text.lines().any(|m| m == *l))
            .collect();
        assert_eq!(
            removed,
            ["network_id = \"openagi-main\"", "transport = \"tor\""]
        );
        assert_eq!(text.lines().count(), original.lines().count());
        let c = load_text(&text, &[], &CliOverrides::default()).expect("loads");
        assert_eq!(c.network.network_id, "mynet");
        assert_eq!(c.network.transport, TransportMode::Direct);
        // Again: nothing to change, nothing changed.
        let (again, changes) = edit_config_text(&text, &edits).expect("editable");
        assert!(changes.is_empty());
        assert_eq!(again, text);

        // A commented-out template line is uncommented; hybrid turns on.
        let old = "[network]\nnetwork_id = \"a\"  # ours\n# transport = \"tor\"\n\n[tor]\n# hybrid = false\n";
        // The transport is already "tor" (the default): its line stays.
        let (text, changes) =
            edit_config_text(old, &init_edits(Some("b"), Some(InitTransport::Hybrid)))
                .expect("editable");
        assert_eq!(
            text,
            "[network]\nnetwork_id = \"b\"  # ours\n# transport = \"tor\"\n\n[tor]\nhybrid = true\n"
        );
        assert_eq!(
            changes,
            [
                "network.network_id: \"a\" -> \"b\"",
                "tor.hybrid: false (the default) -> true"
            ]
        );
        // A missing section is added.
        let (text, _) =
            edit_config_text("[api]\n", &init_edits(Some("b"), None)).expect("editable");
        assert_eq!(text, "[api]\n\n[network]\nnetwork_id = \"b\"\n");
    }

    #[test]
    fn a_file_init_cannot_edit_exactly_is_refused() {
        let edits = init_edits(Some("mynet"), None);
        let e = edit_config_text("network.network_id = \"x\"\n", &edits).expect_err("dotted key");
        assert!(e.contains("dotted key"), "{e}");
        let e = edit_config_text("network = { network_id = \"x\" }\n", &edits)
            .expect_err("inline table");
        assert!(e.contains("inline table"), "{e}");
        let e = edit_config_text("[network\n", &edits).expect_err("not TOML");
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn cli_only_variables_are_not_settings() {
        let c =
            load_text("", &[("OPENAGI_DATA_DIR", "/x")], &CliOverrides::default()).expect("valid");
        assert_eq!(c, Config::default());
        let c = load_text(
            "",
            &[
                ("OPENAGI_PASSPHRASE_FILE", "/p"),
                ("OPENAGI_PASSPHRASE", "x"),
            ],
            &CliOverrides::default(),
        )
        .expect("valid");
        assert_eq!(c, Config::default());
    }
    #[test]
    fn the_join_policy_is_read_and_a_bad_coordinator_is_named() {
        let key = openagi_crypto::Identity::from_seed(&[5; 32]).public();
        let text = format!(
            "[learn]\njoin = \"none\"\ncoordinators = [\"{}\"]\nrequire_dp = true\n",
            key.to_hex()
        );
        let config = load_text(&text, &[], &CliOverrides::default()).expect("loads");
        let policy = config.learn.join_policy().expect("policy");
        assert!(policy.never && policy.require_dp);
        assert_eq!(policy.coordinators, vec![key]);
        assert_eq!((policy.max_epsilon, policy.max_rounds), (None, None));
        assert_eq!(policy.max_cpu_ms, None);
        // The limits come from the file or the environment.
        let config = load_text(
            "[learn]\njoin = \"fitting\"\nmax_rounds = 50\n",
            &[
                ("OPENAGI_LEARN_MAX_EPSILON", "8"),
                ("OPENAGI_LEARN_MODELS", "mlp,cnn"),
                ("OPENAGI_LEARN_REQUIRE_SECURE_AGGREGATION", "true"),
                ("OPENAGI_LEARN_MAX_CPU_SECS_PER_JOB", "600"),
            ],
            &CliOverrides::default(),
        )
        .expect("loads");
        let policy = config.learn.join_policy().expect("policy");
        assert!(!policy.never && policy.require_secure_aggregation);
        assert_eq!(policy.max_epsilon, Some(8.0));
        assert_eq!(policy.max_rounds, Some(50));
        assert_eq!(policy.max_cpu_ms, Some(600_000));
        assert_eq!(policy.models, vec!["mlp".to_string(), "cnn".to_string()]);
        // A node joins nothing until its operator says so.
        assert!(Config::default().learn.join_policy().expect("policy").never);
        let err = load_text(
            "[learn]\nmodels = [\"transformer\"]\n",
            &[],
            &CliOverrides::default(),
        )
        .expect_err("unknown kind");
        let text = err.to_string();
        assert!(
            text.contains("learn.models") && text.contains("logistic_regression, mlp, cnn"),
            "{text}"
        );
        let err = load_text(
            "[learn]\nmax_epsilon = -1.0\n",
            &[],
            &CliOverrides::default(),
        )
        .expect_err("negative ε");
        assert!(err.to_string().contains("learn.max_epsilon"), "{err}");
        let err = load_text(
            "[learn]\ncoordinators = [\"nonsense\"]\n",
            &[],
            &CliOverrides::default(),
        )
        .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("learn.coordinators"), "{text}");
        assert!(text.contains("peer id"), "{text}");
        assert!(load_text("[learn]\njoin = \"some\"\n", &[], &CliOverrides::default()).is_err());
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn configs_example_matches_the_generated_template() {
        let shipped = include_str!("../../../configs/openagi.toml");
        assert_eq!(
            shipped,
            super::template("openagi-main"),
            "configs/openagi.toml is stale: regenerate it with `openagi init` and copy it"
        );
    }
}
