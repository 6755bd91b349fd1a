//! The composed libp2p behaviour: one sub-behaviour per protocol.

// The derive generates `NodeBehaviourEvent` with one variant per field and
// no doc comments; the fields below document what each variant carries.
#![allow(missing_docs)]

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, allow_block_list, connection_limits, gossipsub, identify, identity::Keypair,
    kad, mdns, memory_connection_limits, ping, request_response,
};

use crate::wire::{self, RpcRequest, RpcResponse};
use crate::{Error, NetConfig};

/// The request-response protocol name.
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/openagi/rpc/1");

/// DHT values this node stores (none: inbound PUT_VALUE is filtered out,
/// the node publishes no values).
pub const MAX_DHT_RECORDS: usize = 1024;
/// Largest DHT value stored.
pub const MAX_DHT_VALUE_BYTES: usize = 16 * 1024;
/// Keys the DHT store holds provider records for: this node's own (each
/// model it holds is one) and at most
/// [`crate::MAX_FOREIGN_PROVIDER_KEYS`] that other nodes announced, which
/// the node admits itself (`crate::providers`); past it, content is still
/// served but not announced.
pub const MAX_PROVIDED_KEYS: usize = 4096;
/// Providers remembered per key, for lookups by others.
pub const MAX_PROVIDERS_PER_KEY: usize = 20;
/// Providers a lookup returns: enough to try several holders of a model.
pub const MAX_PROVIDERS_FOUND: usize = 8;

/// Everything the node speaks, composed into one behaviour.
#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    /// Refuses every connection to or from the peers the operator blocked
    /// (`network.blocked_peers`), before any other behaviour sees it.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Refuses a new inbound connection from an address that already has
    /// a few in negotiation, so one host cannot hold every pending slot.
    pub pending: crate::pending::PendingPerSource,
    /// Refuses connections beyond the configured counts. Listed first so it
    /// vetoes a connection before any other behaviour sets up state.
    pub limits: connection_limits::Behaviour,
    /// Refuses new connections when the process is short of memory.
    pub memory: memory_connection_limits::Behaviour,
    /// Exchanges protocol version, agent and listen addresses.
    pub identify: identify::Behaviour,
    /// Liveness and round-trip time of connections.
    pub ping: ping::Behaviour,
    /// Peer routing (distributed hash table).
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Local-network discovery; absent when disabled.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Topic-based message dissemination.
    pub gossipsub: gossipsub::Behaviour,
    /// Direct requests between two nodes.
    pub rpc: request_response::cbor::Behaviour<RpcRequest, RpcResponse>,
    /// Opaque one-way messages to one peer (consensus traffic), as plain
    /// streams so the sender is checked before anything is read.
    pub direct: libp2p_stream::Behaviour,
    /// End-to-end encrypted messages: key bundles and ratchet messages.
    pub msg: request_response::Behaviour<crate::msg::MsgCodec>,
    /// Federated learning: model chunks and client updates.
    pub learn: request_response::Behaviour<crate::msg::MsgCodec>,
    /// Committed blocks for followers, forwarded transactions.
    pub ledger: request_response::Behaviour<crate::msg::MsgCodec>,
}

impl NodeBehaviour {
    /// Builds the behaviour for `keypair` under `config`.
    pub fn new(keypair: &Keypair, config: &NetConfig) -> Result<Self, Error> {
        let peer_id = keypair.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established_incoming(Some(config.limits.max_incoming))
            .with_max_established_outgoing(Some(config.limits.max_outgoing))
            .with_max_established_per_peer(Some(config.limits.max_per_peer))
            .with_max_pending_incoming(Some(config.limits.max_pending))
            .with_max_pending_outgoing(Some(config.limits.max_pending));

        let identify = identify::Behaviour::new(
            identify::Config::new(config.protocol_version(), keypair.public())
                .with_agent_version(config.agent_version.clone())
                .with_interval(Duration::from_secs(60)),
        );

        let mut kad_config = kad::Config::new(StreamProtocol::new("/openagi/kad/1"));
        kad_config.set_query_timeout(Duration::from_secs(30));
        // Inbound records go through the node's admission (bounded per
        // peer and in all) instead of straight into the store.
        kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
        // The store's own bounds, named so they are stated rather than
        // inherited; what other peers may add is bounded before it.
        let store_config = kad::store::MemoryStoreConfig {
            max_records: MAX_DHT_RECORDS,
            max_value_bytes: MAX_DHT_VALUE_BYTES,
            max_provided_keys: MAX_PROVIDED_KEYS,
            max_providers_per_key: MAX_PROVIDERS_PER_KEY,
        };
        let mut kad = kad::Behaviour::with_config(
            peer_id,
            kad::store::MemoryStore::with_config(peer_id, store_config),
            kad_config,
        );
        // Every node serves the DHT: without AutoNAT confirming an external
        // address kad would stay a client and nobody would route to it.
        kad.set_mode(Some(kad::Mode::Server));

        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| Error::Setup(format!("mDNS: {e}")))?,
            )
        } else {
            None
        };

        let gossip_config = gossipsub::ConfigBuilder::default()
            .max_transmit_size(wire::MAX_GOSSIP_BYTES)
            .validation_mode(gossipsub::ValidationMode::Strict)
            // The node checks each message before it is forwarded, so a
            // malformed message stops at the first honest hop.
            .validate_messages()
            .heartbeat_interval(Duration::from_secs(1))
            .build()
            .map_err(|e| Error::Config(format!("gossipsub: {e}")))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(keypair.clone()),
            gossip_config,
        )
        .map_err(|e| Error::Config(format!("gossipsub: {e}")))?;
        gossipsub
            .with_peer_score(
                gossipsub::PeerScoreParams::default(),
                gossipsub::PeerScoreThresholds::default(),
            )
            .map_err(|e| Error::Config(format!("gossipsub scoring: {e}")))?;

        let codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(wire::MAX_RPC_REQUEST_BYTES)
            .set_response_size_maximum(wire::MAX_RPC_RESPONSE_BYTES);
        let rpc = request_response::Behaviour::with_codec(
            codec,
            [(RPC_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(20))
                .with_max_concurrent_streams(64),
        );

        let direct = libp2p_stream::Behaviour::new();

        let learn = request_response::Behaviour::with_codec(
            crate::msg::MsgCodec::learn(),
            [(
                crate::msg::LEARN_PROTOCOL,
                request_response::ProtocolSupport::Full,
            )],
            // A large update over Tor may take a while.
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(120))
                .with_max_concurrent_streams(64),
        );

        let ledger = request_response::Behaviour::with_codec(
            crate::msg::MsgCodec::ledger(),
            [(
                crate::msg::LEDGER_PROTOCOL,
                request_response::ProtocolSupport::Full,
            )],
            // Up to 8 MiB of blocks, over Tor too.
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(60))
                .with_max_concurrent_streams(32),
        );

        let msg = request_response::Behaviour::with_codec(
            crate::msg::MsgCodec::msg(),
            [(
                crate::msg::MSG_PROTOCOL,
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(20))
                .with_max_concurrent_streams(64),
        );

        let mut blocked = allow_block_list::Behaviour::default();
        for peer in &config.blocked_peers {
            blocked.block_peer(*peer);
        }
        Ok(Self {
            blocked,
            pending: crate::pending::PendingPerSource::default(),
            direct,
            msg,
            learn,
            ledger,
            limits: connection_limits::Behaviour::new(limits),
            memory: memory_connection_limits::Behaviour::with_max_bytes(config.max_memory_bytes),
            identify,
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
            kad,
            mdns: mdns.into(),
            gossipsub,
            rpc,
        })
    }
}
