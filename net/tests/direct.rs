//! The direct protocol between two real swarms on loopback: a peer that is
//! not allowed is refused when its stream opens (counted, nothing
//! delivered), an allowed peer's messages arrive in order, and an
//! oversized message is refused by the sender.

use std::time::Duration;

use openagi_net::{
    Backoff, ConnectionLimitsConfig, Keypair, NetConfig, NetEvent, NetHandle, NetworkService,
    TransportMode,
};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

fn config(bootstrap: Vec<openagi_net::Multiaddr>) -> NetConfig {
    NetConfig {
        network_id: "direct-test".into(),
        transport: TransportMode::Direct,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap,
        mdns: false,
        limits: ConnectionLimitsConfig::default(),
        max_memory_bytes: usize::MAX,
        idle_timeout: Duration::from_secs(60),
        announce_interval: Duration::from_secs(1),
        redial: Backoff::default(),
        agent_version: "test".into(),
        tor: None,
    }
}

struct Node {
    net: NetHandle,
    events: mpsc::Receiver<NetEvent>,
    registry: Registry,
}

fn start(bootstrap: Vec<openagi_net::Multiaddr>) -> Node {
    let mut registry = Registry::with_prefix("openagi");
    let (net, events, _task) = NetworkService::start(
        Keypair::generate_ed25519(),
        config(bootstrap),
        &mut registry,
    )
    .expect("starts");
    Node {
        net,
        events,
        registry,
    }
}

fn metrics(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text
}

/// Waits for the next direct message, skipping other events.
async fn next_direct(events: &mut mpsc::Receiver<NetEvent>, limit: Duration) -> Option<Vec<u8>> {
    tokio::time::timeout(limit, async {
        while let Some(event) = events.recv().await {
            if let NetEvent::Direct { data, .. } = event {
                return Some(data);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Starts A and B, B dialling A, and waits until they are connected.
async fn connected_pair() -> (Node, Node) {
    let a = start(vec![]);
    let listen = loop {
        let addrs = a.net.snapshot().listen_addrs;
        if let Some(addr) = addrs.first() {
            break addr.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let a_addr: openagi_net::Multiaddr = format!("{listen}/p2p/{}", a.net.local_peer_id())
        .parse()
        .expect("addr");
    let b = start(vec![a_addr]);
    for _ in 0..200 {
        if !a.net.snapshot().peers.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!a.net.snapshot().peers.is_empty(), "connected");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_flooding_refused_streams_is_disconnected_and_banned() {
    let (a, b) = connected_pair().await;
    for _ in 0..openagi_net::PENALTY_LIMIT + 10 {
        b.net
            .send_direct(a.net.local_peer_id(), vec![0; 64])
            .await
            .expect("queued");
    }
    let b_id = b.net.local_peer_id().to_string();
    let mut banned = false;
    for _ in 0..200 {
        let text = metrics(&a.registry);
        if text.contains(r#"openagi_peers_refused_total{reason="misbehaviour"} 1"#)
            && !a.net.snapshot().peers.contains_key(&b_id)
        {
            banned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(banned, "{}", metrics(&a.registry));
    // B comes back (its writer redials to send the rest): refused.
    b.net
        .send_direct(a.net.local_peer_id(), vec![0; 64])
        .await
        .expect("queued");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!a.net.snapshot().peers.contains_key(&b_id), "stays out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_from_peers_not_allowed_are_refused_when_they_open() {
    let (mut a, b) = connected_pair().await;

    // A allows nobody yet: B's message is refused unread.
    b.net
        .send_direct(a.net.local_peer_id(), vec![1; 1024])
        .await
        .expect("queued");
    assert_eq!(
        next_direct(&mut a.events, Duration::from_secs(2)).await,
        None
    );
    let text = metrics(&a.registry);
    assert!(
        text.contains(
            r#"openagi_p2p_inbound_refused_total{protocol="direct",reason="not_a_validator"} 1"#
        ),
        "{text}"
    );

    // Once B is allowed its messages arrive, in the order sent.
    a.net.allow_direct_from([b.net.local_peer_id()]);
    for i in 0..20u8 {
        b.net
            .send_direct(a.net.local_peer_id(), vec![i; 100 + i as usize])
            .await
            .expect("queued");
    }
    for i in 0..20u8 {
        let data = next_direct(&mut a.events, Duration::from_secs(10))
            .await
            .expect("delivered");
        assert_eq!(data, vec![i; 100 + i as usize], "message {i} in order");
    }

    // Larger than the protocol allows: refused before anything is sent.
    assert!(
        b.net
            .send_direct(
                a.net.local_peer_id(),
                vec![0; openagi_net::MAX_DIRECT_BYTES + 1]
            )
            .await
            .is_err()
    );
}
