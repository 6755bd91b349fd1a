//! Messages on the wire: gossip topics and request-response payloads.
//!
//! Everything decoded from a peer goes through a size check first and a
//! strict decoder second; a failure is an error value, never a panic.

use serde::{Deserialize, Serialize};

/// Largest gossip message accepted on any topic, in bytes.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;
/// Largest request-response request, in bytes.
pub const MAX_RPC_REQUEST_BYTES: u64 = 64 * 1024;
/// Largest request-response response, in bytes.
pub const MAX_RPC_RESPONSE_BYTES: u64 = 1024 * 1024;
/// Longest version or agent string accepted from a peer.
pub const MAX_TEXT_LEN: usize = 128;

/// Gossip topics the node subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Periodic presence announcements.
    Announce,
}

impl Topic {
    /// Every topic, in a fixed order.
    pub const ALL: [Topic; 1] = [Topic::Announce];

    /// The short name used in metrics labels and the API.
    pub fn name(self) -> &'static str {
        match self {
            Topic::Announce => "announce",
        }
    }

    /// The full gossipsub topic string for `network_id`.
    pub fn topic_string(self, network_id: &str) -> String {
        format!("openagi/{network_id}/{}/1", self.name())
    }
}

/// A node's periodic presence announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Software version of the announcing node.
    pub version: String,
    /// Seconds since the announcing node started.
    pub uptime_secs: u64,
    /// Increases with every announcement of one run.
    pub sequence: u64,
}

impl Announce {
    /// Encodes for gossip.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// Decodes and validates bytes from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(format!("{} bytes exceeds {MAX_GOSSIP_BYTES}", bytes.len()));
        }
        let announce: Announce = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        if announce.version.len() > MAX_TEXT_LEN {
            return Err("version string too long".into());
        }
        Ok(announce)
    }
}

/// What a node tells a peer about itself on request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Network id the node belongs to.
    pub network_id: String,
    /// Software version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
}

/// Requests on the `/openagi/rpc/1` request-response protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcRequest {
    /// Ask for the peer's [`NodeInfo`].
    Info,
}

/// Responses on the `/openagi/rpc/1` request-response protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcResponse {
    /// The responder's information.
    Info(NodeInfo),
    /// The request was understood but refused.
    Refused(String),
}

impl NodeInfo {
    /// Checks fields received from a peer.
    pub fn validate(&self) -> Result<(), String> {
        if self.network_id.len() > MAX_TEXT_LEN || self.version.len() > MAX_TEXT_LEN {
            return Err("node info string too long".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_round_trips() {
        let a = Announce {
            version: "0.1.0".into(),
            uptime_secs: 5,
            sequence: 9,
        };
        assert_eq!(
            Announce::decode(&a.encode().expect("encodes")).expect("decodes"),
            a
        );
    }

    #[test]
    fn hostile_announces_are_errors() {
        assert!(Announce::decode(&[0xff; 7]).is_err());
        assert!(Announce::decode(&vec![0u8; MAX_GOSSIP_BYTES + 1]).is_err());
        let long = Announce {
            version: "x".repeat(MAX_TEXT_LEN + 1),
            uptime_secs: 0,
            sequence: 0,
        };
        assert!(Announce::decode(&long.encode().expect("encodes")).is_err());
        assert!(Announce::decode(&[]).is_err());
    }

    #[test]
    fn topic_strings_are_namespaced_by_network() {
        assert_eq!(
            Topic::Announce.topic_string("devnet"),
            "openagi/devnet/announce/1"
        );
    }
}
