//! Networking metrics, registered into the node's Prometheus registry.
//!
//! No metric is labelled with a peer id or address: label values come from
//! small fixed sets (direction, topic name, protocol name, reason), so the
//! number of series stays bounded however many peers come and go.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Direction of a connection or of traffic.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Initiated by, or flowing from, a remote peer.
    Inbound,
    /// Initiated by, or flowing to, a remote peer from this node.
    Outbound,
}

impl Direction {
    /// The lowercase label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl GossipOutcome {
    /// The lowercase label value.
    pub fn as_str(self) -> &'static str {
        match self {
            GossipOutcome::Published => "published",
            GossipOutcome::Accepted => "accepted",
            GossipOutcome::Rejected => "rejected",
            GossipOutcome::UnknownTopic => "unknown_topic",
        }
    }
}

// Prometheus label values are lowercase by convention; the derive would
// use the Rust variant names.
impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for GossipOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Labels: direction only.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Inbound or outbound.
    pub direction: Direction,
}

/// Labels: application protocol and direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// Protocol name, e.g. `gossipsub` or `rpc`.
    pub protocol: &'static str,
    /// Inbound or outbound.
    pub direction: Direction,
}

/// What happened to a gossip message.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum GossipOutcome {
    /// Published by this node.
    Published,
    /// Received, valid, delivered to the node.
    Accepted,
    /// Received and rejected as malformed; the sender is penalised.
    Rejected,
    /// Received on a topic this node does not know.
    UnknownTopic,
}

/// Labels: gossip topic and outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GossipLabels {
    /// Short topic name.
    pub topic: &'static str,
    /// What happened to the message.
    pub outcome: GossipOutcome,
}

/// Labels: a reason from a fixed set.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why the event happened.
    pub reason: &'static str,
}

/// Labels: protocol and the reason an inbound stream or message was
/// refused, both from fixed sets.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The protocol.
    pub protocol: &'static str,
    /// Why it was refused.
    pub reason: &'static str,
}

/// The network layer's own metrics.
#[derive(Debug, Clone, Default)]
pub struct NetMetrics {
    /// Bytes per connected peer (not a metric: peer ids are no labels).
    pub peer_traffic: crate::traffic::PeerTraffic,
    /// Peers with at least one established connection.
    pub connected_peers: Gauge,
    /// Connections established.
    pub connections_opened: Family<DirectionLabels, Counter>,
    /// Connections closed.
    pub connections_closed: Family<DirectionLabels, Counter>,
    /// Application payload bytes by protocol and direction.
    pub payload_bytes: Family<ProtocolLabels, Counter>,
    /// Gossip messages by topic and outcome.
    pub gossip_messages: Family<GossipLabels, Counter>,
    /// Failed outgoing dials.
    pub dial_errors: Counter,
    /// Peers disconnected, by reason.
    pub peers_refused: Family<ReasonLabels, Counter>,
    /// Events dropped because the node was not keeping up.
    pub events_dropped: Counter,
    /// Direct messages that could not be delivered.
    pub direct_failures: Counter,
    /// Inbound streams and messages refused, by protocol and reason.
    pub inbound_refused: Family<RefusalLabels, Counter>,
}

impl NetMetrics {
    /// Counts application payload of `protocol`, and to or from `peer`
    /// when the payload has one.
    pub fn count_payload(
        &self,
        peer: Option<libp2p::PeerId>,
        protocol: &'static str,
        direction: Direction,
        bytes: usize,
    ) {
        self.payload_bytes
            .get_or_create(&ProtocolLabels {
                protocol,
                direction,
            })
            .inc_by(bytes as u64);
        if let Some(peer) = peer {
            self.peer_traffic.add(peer, protocol, direction, bytes);
        }
    }

    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "peers_connected",
            "Peers with at least one established connection",
            m.connected_peers.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections established",
            m.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections closed",
            m.connections_closed.clone(),
        );
        registry.register_with_unit(
            "p2p_payload",
            "Application payload by protocol and direction",
            prometheus_client::registry::Unit::Bytes,
            m.payload_bytes.clone(),
        );
        registry.register(
            "gossip_messages",
            "Gossip messages by topic and outcome",
            m.gossip_messages.clone(),
        );
        registry.register(
            "dial_errors",
            "Failed outgoing dials",
            m.dial_errors.clone(),
        );
        registry.register(
            "peers_refused",
            "Peers disconnected by this node, by reason",
            m.peers_refused.clone(),
        );
        registry.register(
            "net_events_dropped",
            "Network events dropped because the node did not keep up",
            m.events_dropped.clone(),
        );
        registry.register(
            "direct_send_failures",
            "Direct messages that could not be delivered (peer unreachable, timeout)",
            m.direct_failures.clone(),
        );
        registry.register(
            "p2p_inbound_refused",
            "Inbound streams and messages refused before use, by protocol and reason (not allowed, too many, too large, malformed, timeout)",
            m.inbound_refused.clone(),
        );
        // Series that count rare events exist from the start at zero, so
        // rates and alert rules over them have data before the first
        // event (Prometheus cannot take the rate of a missing series).
        for direction in [Direction::Inbound, Direction::Outbound] {
            let _ = m
                .connections_closed
                .get_or_create(&DirectionLabels { direction });
        }
        for reason in ["wrong_network", "malformed_rpc", "misbehaviour", "banned"] {
            let _ = m.peers_refused.get_or_create(&ReasonLabels { reason });
        }
        let _ = m.inbound_refused.get_or_create(&RefusalLabels {
            protocol: "direct",
            reason: "not_a_validator",
        });
        let _ = m.gossip_messages.get_or_create(&GossipLabels {
            topic: crate::wire::Topic::Announce.name(),
            outcome: GossipOutcome::Rejected,
        });
        m
    }
}
