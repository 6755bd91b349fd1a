//! Measurements on a private Tor network (ignored by default; needs
//! Debian's `tor`):
//!
//! ```sh
//! cargo test -p openagi-net --lib tor::bench -- --ignored --nocapture
//! ```
//!
//! Starts the private network, two embedded (arti) back ends and two
//! system-tor back ends, and reports arti bootstrap time, first onion
//! connection time, and round-trip latency and throughput over raw onion
//! streams (no Noise/Yamux) against plain TCP on loopback.

use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::Transport;
use libp2p::core::Endpoint;
use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportEvent};
use openagi_tornet::{TorNet, TorNetOptions};
use prometheus_client::registry::Registry;

use super::transport::{BoxedIo, OnionTransport, TorStream};
use super::{TorBackendKind, TorMetrics, TorSettings, start};

const ROUND_TRIPS: usize = 50;
const BULK: usize = 4 << 20;

fn settings(dir: &std::path::Path, net: &TorNet, client: usize) -> TorSettings {
    let mut s = TorSettings::with_dir(dir);
    s.arti_config = Some(net.arti_toml.clone());
    s.socks_addr = net.clients[client].socks;
    s.control_addr = net.clients[client].control;
    s.connect_timeout = Duration::from_secs(30);
    s
}

async fn next_incoming(t: &mut OnionTransport) -> TorStream {
    loop {
        let event = futures::future::poll_fn(|cx| std::pin::Pin::new(&mut *t).poll(cx)).await;
        if let TransportEvent::Incoming { upgrade, .. } = event {
            return upgrade.await.expect("incoming");
        }
    }
}

/// Echo server side: reads and writes back until EOF.
async fn echo<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Client side: `ROUND_TRIPS` 1-byte round trips (median), then `BULK`
/// bytes echoed back (throughput of the slower direction).
async fn measure<S: futures::AsyncRead + futures::AsyncWrite + Unpin>(mut s: S) -> (Duration, f64) {
    let mut rtts = Vec::new();
    let mut one = [0u8; 1];
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        s.write_all(b"x").await.expect("write");
        s.flush().await.expect("flush");
        s.read_exact(&mut one).await.expect("read");
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    let (mut r, mut w) = s.split();
    let t = Instant::now();
    let writer = async {
        let chunk = vec![7u8; 16 * 1024];
        let mut sent = 0;
        while sent < BULK {
            w.write_all(&chunk).await.expect("write");
            sent += chunk.len();
        }
        w.flush().await.expect("flush");
    };
    let reader = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < BULK {
            let n = r.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream ended early");
            got += n;
        }
    };
    futures::join!(writer, reader);
    let mbps = BULK as f64 / t.elapsed().as_secs_f64() / 1e6;
    (median, mbps)
}

async fn onion_pair(kind: TorBackendKind, net: &TorNet, root: &std::path::Path) {
    let mut registry = Registry::default();
    let metrics = TorMetrics::register(&mut registry);
    let t0 = Instant::now();
    let a = start(kind, &settings(&root.join("a"), net, 0), metrics.clone()).expect("a");
    let b = start(kind, &settings(&root.join("b"), net, 1), metrics.clone()).expect("b");
    let (mut ta, mut tb) = (a.transport, b.transport);
    ta.listen_on(ListenerId::next(), a.listen.clone())
        .expect("listen");
    let _ = next_event_new_address(&mut ta).await;
    for s in [&a.state, &b.state] {
        while !s.get().bootstrapped {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let boot = t0.elapsed();
    let opts = DialOpts {
        role: Endpoint::Dialer,
        port_use: PortUse::New,
    };
    let server = tokio::spawn(async move {
        let s = next_incoming(&mut ta).await;
        echo(s).await;
        ta
    });
    let mut first = None;
    let t1 = Instant::now();
    let mut stream = None;
    for attempt in 1..=10 {
        match tb.dial(a.listen.clone(), opts).expect("dial").await {
            Ok(s) => {
                first = Some((t1.elapsed(), attempt));
                stream = Some(s);
                break;
            }
            Err(e) => {
                eprintln!("{kind:?}: dial attempt {attempt} failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let stream = stream.expect("onion dial");
    let (rtt, mbps) = measure(stream).await;
    eprintln!(
        "{kind:?}: both back ends bootstrapped {:.2} s after start; first onion stream {:.2} s (attempt {}); median round trip {:.1} ms; throughput {mbps:.2} MB/s",
        boot.as_secs_f64(),
        first.map(|f| f.0.as_secs_f64()).unwrap_or(0.0),
        first.map(|f| f.1).unwrap_or(0),
        rtt.as_secs_f64() * 1e3
    );
    server.abort();
}

async fn next_event_new_address(t: &mut OnionTransport) -> libp2p::Multiaddr {
    loop {
        let event = futures::future::poll_fn(|cx| std::pin::Pin::new(&mut *t).poll(cx)).await;
        if let TransportEvent::NewAddress { listen_addr, .. } = event {
            return listen_addr;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a private Tor network (30-60 s); run with --ignored"]
async fn onion_vs_direct() {
    let root = tempfile::tempdir().expect("tempdir");
    let net_dir = root.path().join("net");
    let net =
        tokio::task::spawn_blocking(move || TorNet::start(&net_dir, &TorNetOptions::default()))
            .await
            .expect("join")
            .expect("private Tor network");
    eprintln!(
        "private Tor network ready after {:.1} s",
        net.ready_after.as_secs_f64()
    );

    // Direct TCP on loopback, same routine.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (s, _) = listener.accept().await.expect("accept");
        echo(s.compat()).await;
    });
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (rtt, mbps) = {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        measure(Box::new(s.compat()) as BoxedIo).await
    };
    eprintln!(
        "direct TCP: median round trip {:.3} ms; throughput {mbps:.1} MB/s",
        rtt.as_secs_f64() * 1e3
    );

    onion_pair(
        TorBackendKind::Embedded,
        &net,
        &root.path().join("embedded"),
    )
    .await;
    onion_pair(TorBackendKind::System, &net, &root.path().join("system")).await;
}
