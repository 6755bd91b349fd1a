//! Networking configuration, validated before the swarm starts.

use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};

use crate::{Backoff, Error};

/// How the node reaches its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportMode {
    /// TCP and QUIC straight over the network, for LANs and development.
    /// Reveals the node's IP address to its peers.
    Direct,
    /// Onion services through Tor embedded in the process (arti).
    Tor,
    /// Onion services through a separately run tor (SOCKS5 + ControlPort).
    TorSystem,
}

impl TransportMode {
    /// Whether peer traffic goes through Tor.
    pub fn is_tor(self) -> bool {
        matches!(self, TransportMode::Tor | TransportMode::TorSystem)
    }
}

/// Limits on connections, enforced by libp2p's connection-limits behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionLimitsConfig {
    /// Most established inbound connections.
    pub max_incoming: u32,
    /// Most established outbound connections.
    pub max_outgoing: u32,
    /// Most connections to one peer.
    pub max_per_peer: u32,
    /// Most connections still being negotiated, each direction.
    pub max_pending: u32,
}

impl Default for ConnectionLimitsConfig {
    fn default() -> Self {
        Self {
            max_incoming: 64,
            max_outgoing: 64,
            max_per_peer: 2,
            max_pending: 32,
        }
    }
}

/// Everything the network layer needs to start.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Identifies the network; peers with another id are disconnected.
    pub network_id: String,
    /// Transport mode.
    pub transport: TransportMode,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers dialled at start and redialled with backoff; each ends in
    /// `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Local-network discovery by multicast DNS.
    pub mdns: bool,
    /// Peers this node never connects to or accepts connections from.
    pub blocked_peers: Vec<libp2p::PeerId>,
    /// Connection limits.
    pub limits: ConnectionLimitsConfig,
    /// Refuse new connections once the process uses this many bytes.
    pub max_memory_bytes: usize,
    /// Close connections idle for this long.
    pub idle_timeout: Duration,
    /// How often this node announces itself on gossip.
    pub announce_interval: Duration,
    /// Redial schedule for bootstrap peers.
    pub redial: Backoff,
    /// Version string announced to peers.
    pub agent_version: String,
    /// Tor settings; required by the Tor transports.
    pub tor: Option<crate::tor::TorSettings>,
    /// How misbehaving peers are banned.
    pub bans: BanConfig,
}

/// How peers that reach the penalty limit are banned (see
/// [`crate::score`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanConfig {
    /// How long a banned peer is refused.
    pub duration: std::time::Duration,
    /// Bans still running from before a restart: each peer with what is
    /// left of its ban ([`crate::NetEvent::PeerBanned`] says when to
    /// record one).
    pub restored: Vec<(libp2p::PeerId, std::time::Duration)>,
}

impl Default for BanConfig {
    fn default() -> Self {
        Self {
            duration: crate::score::BAN_DURATION,
            restored: Vec::new(),
        }
    }
}

impl NetConfig {
    /// Checks the configuration for values that cannot work.
    pub fn validate(&self) -> Result<(), Error> {
        if self.network_id.is_empty()
            || !self
                .network_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(Error::Config(format!(
                "network id {:?} must be non-empty ASCII letters, digits, '-', '_' or '.'",
                self.network_id
            )));
        }
        for addr in &self.bootstrap {
            if peer_id_of(addr).is_none() {
                return Err(Error::Config(format!(
                    "bootstrap address {addr} has no peer id: append /p2p/<peer id>"
                )));
            }
        }
        if self.transport.is_tor() {
            let hybrid = self.tor.as_ref().is_some_and(|t| t.hybrid);
            if self.tor.is_none() {
                return Err(Error::Config("Tor transport without Tor settings".into()));
            }
            if self.mdns {
                return Err(Error::Config(
                    "mDNS announces this node on the LAN and cannot be used with a Tor transport: set network.mdns = false".into(),
                ));
            }
            if !hybrid {
                for addr in &self.bootstrap {
                    if crate::tor::parse_onion_multiaddr(addr).is_none() {
                        return Err(Error::Config(format!(
                            "bootstrap address {addr} is not an onion address (/onion3/<address>:<port>/p2p/<peer id>); Tor mode never dials directly (set tor.hybrid = true to allow it)"
                        )));
                    }
                }
            }
        }
        if self.announce_interval.is_zero() {
            return Err(Error::Config("announce interval must be positive".into()));
        }
        Ok(())
    }

    /// The libp2p protocol version string; identify exchanges it, and a
    /// peer announcing another one is on another network.
    pub fn protocol_version(&self) -> String {
        format!("/openagi/{}/1", self.network_id)
    }
}

/// The peer id at the end of a multiaddr, if there is one.
pub(crate) fn peer_id_of(addr: &Multiaddr) -> Option<libp2p::PeerId> {
    addr.iter().last().and_then(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}
