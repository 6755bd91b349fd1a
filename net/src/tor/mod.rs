//! Tor-routed transport: peers reach each other through onion services.
//!
//! Two back ends share one libp2p [`Transport`](libp2p::Transport)
//! ([`OnionTransport`]):
//! - **embedded** (`tor`): arti runs inside the process, dials onion
//!   addresses with `TorClient::connect` and hosts the node's onion service
//!   with `tor-hsservice` (module `embedded`, cargo feature `tor`);
//! - **system** (`tor-system`): a separately run C tor; dials go through its
//!   SOCKS5 port and the onion service is created over its ControlPort
//!   (module `system`).
//!
//! Either way the transport only understands `/onion3/<address>:<port>`
//! multiaddrs, so in Tor mode a direct TCP dial cannot happen by accident:
//! there is no TCP transport in the swarm unless `hybrid` is configured.
//! Streams are isolated per peer (one circuit family per onion address),
//! and the isolation is renewed every `circuit_rotation` so long-lived peers
//! do not stay on one circuit forever.
//!
//! Tor streams may end with a RELAY_END cell (reason MISC) instead of a
//! clean EOF. That is harmless here: every byte above the stream is framed
//! by Noise and Yamux, so a message is either received whole or the
//! connection is reported closed.

#[cfg(all(test, feature = "tor"))]
mod bench;
mod control;
#[cfg(feature = "tor")]
mod embedded;
mod keys;
mod metrics;
mod system;
mod transport;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

pub use keys::{onion_multiaddr, parse_onion_multiaddr, rotate_address, system_onion_address};
pub use metrics::TorMetrics;
pub(crate) use transport::OnionTransport;

/// Which Tor implementation carries the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TorBackendKind {
    /// arti inside the process.
    Embedded,
    /// A C tor reached over SOCKS5 and its ControlPort.
    System,
}

impl TorBackendKind {
    /// The config spelling of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            TorBackendKind::Embedded => "tor",
            TorBackendKind::System => "tor-system",
        }
    }
}

/// Tor settings, shared by both back ends.
#[derive(Debug, Clone)]
pub struct TorSettings {
    /// Directory for Tor state: onion key, arti's state and directory
    /// cache. Normally `<data dir>/tor`.
    pub dir: PathBuf,
    /// The virtual port of this node's onion service.
    pub onion_port: u16,
    /// Also use TCP/QUIC directly (reveals the IP address).
    pub hybrid: bool,
    /// An arti configuration file (arti's `TorClientConfig` TOML) merged
    /// under the node's own settings; for private Tor networks.
    pub arti_config: Option<PathBuf>,
    /// System tor: SOCKS5 proxy address.
    pub socks_addr: SocketAddr,
    /// System tor: ControlPort address.
    pub control_addr: SocketAddr,
    /// System tor: ControlPort password (HASHEDPASSWORD auth), if any.
    pub control_password: Option<String>,
    /// System tor: cookie file to use instead of the one tor names.
    pub control_cookie_file: Option<PathBuf>,
    /// Bound on one onion dial (circuit building included).
    pub connect_timeout: Duration,
    /// Warn when Tor is not bootstrapped after this long.
    pub bootstrap_warn_after: Duration,
    /// New circuits for every peer after this long.
    pub circuit_rotation: Duration,
}

impl TorSettings {
    /// Defaults for a node whose Tor directory is `dir`.
    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            onion_port: 4610,
            hybrid: false,
            arti_config: None,
            socks_addr: SocketAddr::from(([127, 0, 0, 1], 9050)),
            control_addr: SocketAddr::from(([127, 0, 0, 1], 9051)),
            control_password: None,
            control_cookie_file: None,
            connect_timeout: Duration::from_secs(60),
            bootstrap_warn_after: Duration::from_secs(60),
            circuit_rotation: Duration::from_secs(600),
        }
    }

    /// arti's persistent state (keystore with the onion key, guards).
    pub fn arti_state_dir(&self) -> PathBuf {
        self.dir.join("arti").join("state")
    }

    /// arti's directory cache, kept so restarts bootstrap quickly.
    pub fn arti_cache_dir(&self) -> PathBuf {
        self.dir.join("arti").join("cache")
    }

    /// The system-tor onion key file.
    pub fn system_key_path(&self) -> PathBuf {
        self.dir.join(keys::SYSTEM_KEY_FILE)
    }
}

/// The nickname of the node's onion service inside arti's keystore.
pub const ONION_SERVICE_NICKNAME: &str = "openagi";

/// What the node reports about Tor (status page, `status --json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TorStatus {
    /// `tor` or `tor-system`.
    pub mode: String,
    /// Whether Tor can carry traffic.
    pub bootstrapped: bool,
    /// Bootstrap progress, 0 to 100.
    pub bootstrap_percent: u8,
    /// The latest bootstrap message from Tor.
    pub bootstrap_summary: String,
    /// This node's onion address (`<56 chars>.onion`).
    pub onion_address: Option<String>,
    /// The onion service's dialable multiaddr.
    pub onion_multiaddr: Option<String>,
    /// The onion service's state (`starting`, `publishing` (added, no
    /// descriptor uploaded yet), `running`, `degraded`, `down`, ...).
    pub onion_service: String,
    /// Also direct TCP/QUIC (hybrid).
    pub hybrid: bool,
    /// The latest problem, if any (Tor unreachable, auth failed, ...).
    pub last_error: Option<String>,
}

/// Shared, cheap-to-read Tor status.
#[derive(Debug, Clone, Default)]
pub struct TorState(Arc<RwLock<TorStatus>>);

impl TorState {
    fn new(status: TorStatus) -> Self {
        Self(Arc::new(RwLock::new(status)))
    }

    /// A copy of the current status.
    pub fn get(&self) -> TorStatus {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut TorStatus)) {
        match self.0.write() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

/// Errors of the Tor transport.
#[derive(Debug, thiserror::Error)]
pub enum TorError {
    /// The address is not an onion address this transport can dial.
    #[error("not an onion address: {0}")]
    Address(String),
    /// Tor is not reachable or not bootstrapped.
    #[error("tor unavailable: {0}")]
    Unavailable(String),
    /// The dial did not complete in time.
    #[error("onion dial timed out after {0:?}")]
    Timeout(Duration),
    /// Tor refused or failed the stream.
    #[error("onion stream failed: {0}")]
    Stream(String),
    /// The ControlPort refused us.
    #[error("tor control port: {0}")]
    Control(String),
    /// A local file or socket problem.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the swarm builder needs from a started Tor back end.
pub(crate) struct TorRuntime {
    pub transport: OnionTransport,
    pub listen: libp2p::Multiaddr,
    pub state: TorState,
}

/// Starts the Tor back end for `kind` and returns the transport and the
/// node's onion multiaddr. Tor itself may still be bootstrapping (or
/// unreachable): that is reported through [`TorState`] and retried, never
/// replaced by direct connections.
pub(crate) fn start(
    kind: TorBackendKind,
    settings: &TorSettings,
    metrics: TorMetrics,
) -> Result<TorRuntime, crate::Error> {
    std::fs::create_dir_all(&settings.dir).map_err(|e| {
        crate::Error::Setup(format!("tor directory {}: {e}", settings.dir.display()))
    })?;
    restrict_dir(&settings.dir);
    let state = TorState::new(TorStatus {
        mode: kind.as_str().into(),
        onion_service: "starting".into(),
        hybrid: settings.hybrid,
        bootstrap_summary: "starting".into(),
        ..Default::default()
    });
    let (backend, listen, incoming) = match kind {
        #[cfg(feature = "tor")]
        TorBackendKind::Embedded => embedded::start(settings, state.clone(), metrics.clone())?,
        #[cfg(not(feature = "tor"))]
        TorBackendKind::Embedded => {
            return Err(crate::Error::Config(
                "transport \"tor\" needs the embedded Tor client: rebuild with the `tor` cargo feature, or use transport = \"tor-system\"".into(),
            ));
        }
        TorBackendKind::System => system::start(settings, state.clone(), metrics.clone())?,
    };
    let onion = keys::host_of(&listen);
    state.update(|s| {
        s.onion_address = onion;
        s.onion_multiaddr = Some(listen.to_string());
    });
    let transport = OnionTransport::new(
        backend,
        metrics,
        listen.clone(),
        incoming,
        settings.connect_timeout,
        settings.circuit_rotation,
    );
    Ok(TorRuntime {
        transport,
        listen,
        state,
    })
}

/// Tor directories hold keys: owner only. Failure is not fatal (the
/// directory may belong to someone else on purpose), arti checks again.
fn restrict_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}
