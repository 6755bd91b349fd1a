//! What the network tests share: a node configuration for loopback.

use std::time::Duration;

use openagi_net::{Backoff, ConnectionLimitsConfig, NetConfig, TransportMode};

/// A direct-transport node on an ephemeral loopback port, no discovery
/// beyond its bootstrap list; tests override the fields they are about.
pub fn loopback_config(network_id: &str) -> NetConfig {
    NetConfig {
        network_id: network_id.into(),
        transport: TransportMode::Direct,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap: Vec::new(),
        mdns: false,
        blocked_peers: Vec::new(),
        limits: ConnectionLimitsConfig::default(),
        max_memory_bytes: usize::MAX,
        idle_timeout: Duration::from_secs(60),
        announce_interval: Duration::from_secs(1),
        redial: Backoff::default(),
        agent_version: "test".into(),
        tor: None,
        bans: openagi_net::BanConfig::default(),
    }
}
