//! Half-open connections: one host keeps hundreds of TCP connections in
//! negotiation (the multistream header, then nothing) and renews each as
//! soon as the node drops it. A legitimate peer from another address must
//! still connect.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openagi_net::{Backoff, Keypair, NetConfig, NetHandle, NetworkService};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(bootstrap: Vec<openagi_net::Multiaddr>) -> NetConfig {
    NetConfig {
        bootstrap,
        redial: Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
        },
        ..common::loopback_config("half-open-test")
    }
}

fn start(bootstrap: Vec<openagi_net::Multiaddr>) -> NetHandle {
    let mut registry = Registry::default();
    let (net, mut events, _task) = NetworkService::start(
        Keypair::generate_ed25519(),
        config(bootstrap),
        &mut registry,
    )
    .expect("starts");
    // Nobody reads this node's events here; drain them.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    net
}

/// Holds one connection from 127.0.0.2 in negotiation until the node
/// closes it, then opens the next, until `stop`.
async fn half_open(target: std::net::SocketAddr, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        if socket.bind("127.0.0.2:0".parse().expect("addr")).is_err() {
            return;
        }
        let Ok(mut stream) = socket.connect(target).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // A multistream-select header, then silence.
        let _ = stream.write_all(b"\x13/multistream/1.0.0\n").await;
        let mut sink = [0u8; 256];
        loop {
            tokio::select! {
                read = stream.read(&mut sink) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_holding_half_open_connections_cannot_lock_out_a_peer() {
    let a = start(vec![]);
    let listen = loop {
        if let Some(addr) = a.snapshot().listen_addrs.first() {
            break addr.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let port: u16 = listen
        .rsplit('/')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("tcp port");
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (0..200)
        .map(|_| tokio::spawn(half_open(target, stop.clone())))
        .collect();
    // Let the attack fill every slot it can.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let a_addr: openagi_net::Multiaddr = format!("{listen}/p2p/{}", a.local_peer_id())
        .parse()
        .expect("addr");
    let b = start(vec![a_addr]);
    let mut connected = false;
    for _ in 0..300 {
        if b.snapshot()
            .peers
            .contains_key(&a.local_peer_id().to_string())
        {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.abort();
    }
    assert!(connected, "the peer got in within 15 s despite the attack");
}
