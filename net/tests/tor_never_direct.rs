//! In the Tor modes the node dials nothing outside Tor: asked to dial an
//! IP address or a DNS name, it opens no TCP connection there (a listener
//! on that address sees nothing), because the swarm has no TCP, QUIC or
//! DNS transport unless `tor.hybrid` is set. The system-tor backend is
//! used here with no tor running, so nothing can leave through Tor either.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use openagi_net::tor::TorSettings;
use openagi_net::{Keypair, NetConfig, NetworkService, TransportMode};
use prometheus_client::registry::Registry;

fn unused_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn tor_mode_opens_no_connection_to_an_ip_or_a_dns_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tor = TorSettings::with_dir(dir.path());
    // Nothing listens there: the backend cannot reach a tor.
    tor.socks_addr = format!("127.0.0.1:{}", unused_port())
        .parse()
        .expect("addr");
    tor.control_addr = format!("127.0.0.1:{}", unused_port())
        .parse()
        .expect("addr");
    tor.hybrid = false;
    let config = NetConfig {
        network_id: "tor-only-test".into(),
        transport: TransportMode::TorSystem,
        listen: Vec::new(),
        tor: Some(tor),
        ..common::loopback_config("tor-only-test")
    };
    let mut registry = Registry::default();
    let (net, mut events, _task) =
        NetworkService::start(Keypair::generate_ed25519(), config, &mut registry)
            .expect("starts without a reachable tor");
    tokio::spawn(async move { while events.recv().await.is_some() {} });

    // A real listener the node is asked to dial, by IP and by name.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let peer = Keypair::generate_ed25519().public().to_peer_id();
    for addr in [
        format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"),
        format!("/dns4/localhost/tcp/{port}/p2p/{peer}"),
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{peer}"),
    ] {
        let _ = net.dial(addr.parse().expect("multiaddr")).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    match listener.accept() {
        Ok((_, from)) => panic!("Tor mode opened a direct TCP connection from {from}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
    }
    assert!(net.snapshot().peers.is_empty());
}
