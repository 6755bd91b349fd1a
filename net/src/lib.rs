//! Peer-to-peer networking of an Open-AGI node, built on libp2p.
//!
//! One [`NodeBehaviour`] composes one libp2p behaviour per protocol
//! (identify, ping, Kademlia, mDNS, gossipsub, request-response, connection
//! and memory limits). [`NetworkService::start`] builds the swarm and drives
//! it on its own task; the rest of the node talks to it through a bounded
//! command channel ([`NetHandle`]), receives [`NetEvent`]s on a bounded
//! channel, and reads a shared [`NetSnapshot`] for status pages.
//!
//! Invariants kept here:
//! - every channel and buffer is bounded, and every inbound message is size
//!   limited before it is decoded;
//! - a peer that sends malformed data is penalised through gossipsub's
//!   scoring and counted, never able to crash the task;
//! - peers on another network id are disconnected after identify;
//! - bootstrap peers are redialled with exponential backoff forever, so a
//!   node recovers from restarts of its peers without operator action.

mod backoff;
mod behaviour;
mod bounded;
mod budget;
mod config;
mod direct;
mod metrics;
mod msg;
mod pending;
mod providers;
mod score;
mod service;
pub mod tor;
mod traffic;
mod transport;
mod wire;

pub use backoff::Backoff;
pub use behaviour::{
    MAX_DHT_RECORDS, MAX_DHT_VALUE_BYTES, MAX_PROVIDED_KEYS, MAX_PROVIDERS_FOUND,
    MAX_PROVIDERS_PER_KEY, NodeBehaviour, NodeBehaviourEvent,
};
pub use budget::{BUDGET_BURST_BYTES, BUDGET_BYTES_PER_SEC};
pub use config::{BanConfig, ConnectionLimitsConfig, NetConfig, TransportMode};
pub use direct::{
    DIRECT_INBOX, DIRECT_PROTOCOL, DIRECT_READ_TIMEOUT, DirectMessage, MAX_DIRECT_BYTES,
    MAX_QUEUED_STREAMS_PER_PEER, OUTBOUND_QUEUE_PER_PEER,
};
pub use libp2p::{Multiaddr, PeerId, identity::Keypair};
pub use metrics::NetMetrics;
pub use msg::{
    LEARN_PROTOCOL, LEDGER_PROTOCOL, MAX_LEARN_REQUEST_BYTES, MAX_LEARN_RESPONSE_BYTES,
    MAX_LEDGER_REQUEST_BYTES, MAX_LEDGER_RESPONSE_BYTES, MAX_MSG_REQUEST_BYTES,
    MAX_MSG_RESPONSE_BYTES, MSG_PROTOCOL,
};
pub use pending::MAX_PENDING_PER_SOURCE;
pub use providers::{
    MAX_FOREIGN_PROVIDER_KEYS, MAX_PROVIDER_ADDR_BYTES, MAX_PROVIDER_ADDRS, MAX_PROVIDER_KEY_BYTES,
    MAX_PROVIDER_KEYS_PER_PEER,
};
pub use score::{BAN_DURATION, MAX_TRACKED_PEERS, PENALTY_LIMIT, PENALTY_WINDOW};
pub use service::{
    AppProtocol, MsgReply, NetEvent, NetHandle, NetSnapshot, NetworkService, PeerSnapshot,
    ReceivedGossip,
};
pub use wire::{Announce, NodeInfo, RpcRequest, RpcResponse, Topic};

/// Coarse classification of networking errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The configuration cannot work (bad address, bad key).
    Config,
    /// A local resource failed (binding a port, the OS).
    Local,
    /// The network task has stopped.
    Stopped,
    /// A peer or the network refused or failed the operation.
    Remote,
}

/// Errors returned by the networking layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value cannot be used.
    #[error("network configuration: {0}")]
    Config(String),
    /// Building the transport or listening failed.
    #[error("network setup failed: {0}")]
    Setup(String),
    /// The network task is no longer running.
    #[error("the network task has stopped")]
    Stopped,
    /// Publishing to gossip failed.
    #[error("publish failed: {0}")]
    Publish(String),
    /// A request to a peer failed (unreachable, timed out, refused).
    #[error("request to {peer} failed: {detail}")]
    Request {
        /// The peer.
        peer: String,
        /// What went wrong.
        detail: String,
    },
    /// A DHT lookup could not run or found nothing in time.
    #[error("DHT lookup failed: {0}")]
    Lookup(String),
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::Config,
            Error::Setup(_) => ErrorKind::Local,
            Error::Stopped => ErrorKind::Stopped,
            Error::Publish(_) | Error::Request { .. } | Error::Lookup(_) => ErrorKind::Remote,
        }
    }
}

/// `error` and every cause under it, joined by `: `.
///
/// libp2p's `TransportError::Other` displays as an empty string and keeps
/// the actual reason (say, "Address already in use") in its source, so
/// formatting only the outer error loses what the operator needs. Levels
/// that print nothing, or only repeat what an outer level already said
/// (an `io::Error` wrapping a custom error prints that error), are skipped.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut level = Some(error);
    while let Some(e) = level {
        let text = e.to_string();
        let repeated = parts.iter().any(|p| p.contains(text.as_str()));
        if !text.is_empty() && !repeated {
            parts.push(text);
        }
        level = e.source();
    }
    if parts.is_empty() {
        // Nothing printable anywhere in the chain: the debug form at least
        // names the error's type and fields.
        return format!("{error:?}");
    }
    parts.join(": ")
}

/// The node identity behind a peer id: peer ids of Open-AGI nodes embed
/// their Ed25519 public key, so this needs no lookup. `None` for peer ids
/// of other key types or hashed keys.
pub fn public_key_of(peer: &PeerId) -> Option<openagi_crypto::PublicKey> {
    let key = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    openagi_crypto::PublicKey::from_bytes(&ed.to_bytes()).ok()
}

/// The peer id of the node whose identity is `key` (the inverse of
/// [`public_key_of`]).
pub fn peer_id_of_key(key: &openagi_crypto::PublicKey) -> PeerId {
    match libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.to_bytes()) {
        Ok(ed) => libp2p::identity::PublicKey::from(ed).to_peer_id(),
        // A PublicKey is a valid Ed25519 point by construction; libp2p
        // accepts every such encoding.
        Err(_) => unreachable!("an Ed25519 public key libp2p refuses"),
    }
}

/// Converts a node identity seed into the libp2p keypair, so the libp2p
/// peer id is derived from the same Ed25519 key the node signs with.
pub fn keypair_from_identity(identity: &openagi_crypto::Identity) -> Result<Keypair, Error> {
    let mut seed = *identity.seed();
    Keypair::ed25519_from_bytes(&mut seed).map_err(|e| Error::Config(format!("identity key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::transport::TransportError;

    #[test]
    fn peer_ids_and_node_keys_convert_both_ways() {
        let identity = openagi_crypto::Identity::from_seed(&[4; 32]);
        let peer = keypair_from_identity(&identity)
            .expect("keypair")
            .public()
            .to_peer_id();
        assert_eq!(peer_id_of_key(&identity.public()), peer);
        assert_eq!(public_key_of(&peer), Some(identity.public()));
    }

    #[test]
    fn error_chain_reaches_the_cause_under_an_empty_transport_error() {
        let inner = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let outer: TransportError<std::io::Error> = TransportError::Other(inner);
        assert_eq!(
            outer.to_string(),
            "",
            "libp2p changed; this helper may be moot"
        );
        assert_eq!(error_chain(&outer), "Address already in use");
    }

    #[test]
    fn error_chain_skips_levels_that_repeat_an_outer_one() {
        let wrapped = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "Address already in use",
        ));
        assert_eq!(error_chain(&wrapped), "Address already in use");
    }
}
