//! Application bytes per connected peer, by protocol and direction: what
//! an operator's dashboard shows per peer. Metrics cannot carry peer ids
//! as labels (unbounded series), so this table is kept beside them, for
//! connected peers only (a peer's entry goes when its last connection
//! closes), and read through [`crate::NetHandle::snapshot`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use serde::Serialize;

use crate::metrics::Direction;

/// Most peers tracked: the connection limits keep far fewer connected.
pub const MAX_TRACKED_PEERS: usize = 4096;

/// Bytes of one protocol in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProtocolBytes {
    /// The protocol (`direct`, `gossipsub`, `msg`, `learn`, `rpc`).
    pub protocol: &'static str,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Bytes since the peer connected.
    pub bytes: u64,
}

/// One peer's bytes by (protocol, direction).
type Counts = BTreeMap<(&'static str, &'static str), u64>;

/// The table (cheap to clone: shared).
#[derive(Debug, Clone, Default)]
pub struct PeerTraffic {
    peers: Arc<Mutex<HashMap<PeerId, Counts>>>,
}

impl PeerTraffic {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Counts>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `bytes` of `protocol` to or from `peer`.
    pub fn add(&self, peer: PeerId, protocol: &'static str, direction: Direction, bytes: usize) {
        let mut table = self.table();
        if table.len() >= MAX_TRACKED_PEERS && !table.contains_key(&peer) {
            return;
        }
        *table
            .entry(peer)
            .or_default()
            .entry((protocol, direction.as_str()))
            .or_default() += bytes as u64;
    }

    /// Forgets a peer (its last connection closed).
    pub fn forget(&self, peer: &PeerId) {
        self.table().remove(peer);
    }

    /// A peer's bytes by protocol and direction.
    pub fn of(&self, peer: &PeerId) -> Vec<ProtocolBytes> {
        self.table()
            .get(peer)
            .map(|m| {
                m.iter()
                    .map(|((protocol, direction), bytes)| ProtocolBytes {
                        protocol,
                        direction,
                        bytes: *bytes,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_add_up_per_protocol_and_go_with_the_peer() {
        let t = PeerTraffic::default();
        let peer = PeerId::random();
        t.add(peer, "direct", Direction::Inbound, 10);
        t.add(peer, "direct", Direction::Inbound, 5);
        t.add(peer, "gossipsub", Direction::Outbound, 7);
        assert_eq!(
            t.of(&peer),
            vec![
                ProtocolBytes {
                    protocol: "direct",
                    direction: "inbound",
                    bytes: 15
                },
                ProtocolBytes {
                    protocol: "gossipsub",
                    direction: "outbound",
                    bytes: 7
                },
            ]
        );
        t.forget(&peer);
        assert!(t.of(&peer).is_empty());
    }
}
