//! The direct protocol between two real swarms on loopback: a peer that is
//! not allowed is refused when its stream opens (counted, nothing
//! delivered), an allowed peer's messages all arrive, and an
//! oversized message is refused by the sender.

mod common;

use std::time::Duration;

use openagi_net::{Keypair, NetConfig, NetHandle, NetworkService};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

fn config(bootstrap: Vec<openagi_net::Multiaddr>) -> NetConfig {
    NetConfig {
        bootstrap,
        ..common::loopback_config("direct-test")
    }
}

struct Node {
    net: NetHandle,
    inbox: mpsc::Receiver<openagi_net::DirectMessage>,
    registry: Registry,
}

fn start(bootstrap: Vec<openagi_net::Multiaddr>) -> Node {
    start_with(Keypair::generate_ed25519(), config(bootstrap))
}

fn start_with(keypair: Keypair, config: NetConfig) -> Node {
    let mut registry = Registry::with_prefix("openagi");
    let (net, mut events, _task) =
        NetworkService::start(keypair, config, &mut registry).expect("starts");
    // Direct messages come through their own inbox; drain the rest.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let inbox = net.take_direct_inbox().expect("first taker");
    assert!(net.take_direct_inbox().is_none(), "taken once");
    Node {
        net,
        inbox,
        registry,
    }
}

fn metrics(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text
}

/// Waits for the next direct message.
async fn next_direct(
    inbox: &mut mpsc::Receiver<openagi_net::DirectMessage>,
    limit: Duration,
) -> Option<Vec<u8>> {
    tokio::time::timeout(limit, inbox.recv())
        .await
        .ok()
        .flatten()
        .map(|m| m.data)
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
        next_direct(&mut a.inbox, Duration::from_secs(2)).await,
        None
    );
    let text = metrics(&a.registry);
    // Refused at once (the sender tries a second stream, refused too).
    let refused: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"openagi_p2p_inbound_refused_total{protocol="direct",reason="not_a_validator"} "#,
            )?
            .parse()
            .ok()
        })
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "{text}");

    // Once B is allowed all its messages arrive.
    a.net.allow_direct_from([b.net.local_peer_id()]);
    for i in 0..20u8 {
        b.net
            .send_direct(a.net.local_peer_id(), vec![i; 100 + i as usize])
            .await
            .expect("queued");
    }
    let mut received = Vec::new();
    for _ in 0..20u8 {
        let Some(data) = next_direct(&mut a.inbox, Duration::from_secs(10)).await else {
            panic!(
                "after {} messages\nA:\n{}\nB:\n{}",
                received.len(),
                metrics(&a.registry),
                metrics(&b.registry)
            );
        };
        received.push(data);
    }
    // Each peer's streams are read in the order they reach this node; two
    // connections between the same peers can swap neighbours, so compare
    // as sets.
    received.sort_by_key(Vec::len);
    for (i, data) in received.iter().enumerate() {
        assert_eq!(*data, vec![i as u8; 100 + i], "message {i}");
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

/// A ban recorded before a restart refuses the peer from the start: the
/// node hands its running bans back to the network layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_from_before_a_restart_still_refuses_the_peer() {
    let returning = Keypair::generate_ed25519();
    let mut banned_config = config(vec![]);
    banned_config.bans.restored = vec![(returning.public().to_peer_id(), Duration::from_secs(300))];
    let a = start_with(Keypair::generate_ed25519(), banned_config);
    let listen = loop {
        if let Some(addr) = a.net.snapshot().listen_addrs.first() {
            break addr.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let a_addr: openagi_net::Multiaddr = format!("{listen}/p2p/{}", a.net.local_peer_id())
        .parse()
        .expect("addr");
    let _b = start_with(returning, config(vec![a_addr.clone()]));
    // An unbanned peer gets in; the returning one is refused each time.
    let _c = start(vec![a_addr]);
    let mut refused = false;
    for _ in 0..200 {
        let text = metrics(&a.registry);
        if text.contains(r#"openagi_peers_refused_total{reason="banned"}"#)
            && a.net.snapshot().peers.len() == 1
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused, "{}", metrics(&a.registry));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.net.snapshot().peers.len(), 1, "only the unbanned peer");
}
