//! Daemons that reach each other only through onion services on a private
//! Tor network (embedded arti and system tor): they gossip, four validators
//! in both modes commit blocks, restarts keep the onion address, a hybrid
//! node bridges direct and onion peers, and a daemon without Tor says so
//! instead of going direct.
//!
//! One private Tor network is shared by every test in this binary (start-up
//! costs 30–60 s); its tor processes exit with the test process. Needs
//! Debian's `tor` package; CI installs it. Set `OPENAGI_SKIP_TOR_TESTS=1` to
//! skip these tests on a machine without it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use openagi_tests::{
    Daemon, DaemonOptions, env_vars, init, init_validators, logs, use_binary, wait_for,
};
use openagi_tornet::{INSTALL_HINT, TorNet, TorNetOptions, tor_available};
use serde_json::json;

static NETWORK: OnceLock<Result<(TorNet, tempfile::TempDir), String>> = OnceLock::new();

/// The shared private Tor network, or `None` when the tests are skipped.
fn network() -> Option<&'static TorNet> {
    if std::env::var_os("OPENAGI_SKIP_TOR_TESTS").is_some() {
        // CI installs tor: a skip there would pass silently.
        assert!(
            std::env::var_os("CI").is_none(),
            "OPENAGI_SKIP_TOR_TESTS is set under CI, which runs the Tor tests"
        );
        eprintln!("OPENAGI_SKIP_TOR_TESTS is set: skipping");
        return None;
    }
    let started = NETWORK.get_or_init(|| {
        tor_available().map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("openagi-tornet")
            .tempdir()
            .map_err(|e| e.to_string())?;
        // Client tors 0 and 1 carry the system-tor test, client 2 is
        // stopped and restarted by the restart test.
        let options = TorNetOptions {
            clients: 3,
            ..Default::default()
        };
        let net = TorNet::start(&dir.path().join("net"), &options).map_err(|e| format!("{e:#}"))?;
        eprintln!(
            "private Tor network ready after {:.1} s",
            net.ready_after.as_secs_f64()
        );
        Ok((net, dir))
    });
    match started {
        Ok((net, _)) => Some(net),
        Err(e) => panic!("{e}\n({INSTALL_HINT}; or set OPENAGI_SKIP_TOR_TESTS=1)"),
    }
}

fn fresh_node(root: &std::path::Path, name: &str) -> std::path::PathBuf {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let dir = root.join(name);
    init(&dir).expect("init");
    dir
}

fn embedded_env(net: &TorNet) -> Vec<(String, String)> {
    env_vars(&[
        ("OPENAGI_NETWORK_TRANSPORT", "tor"),
        (
            "OPENAGI_TOR_ARTI_CONFIG",
            &net.arti_toml.display().to_string(),
        ),
        ("OPENAGI_TOR_CONNECT_TIMEOUT_SECS", "30"),
        ("OPENAGI_LOG_LEVEL", "info,openagi_net=debug"),
    ])
}

fn system_env(net: &TorNet, client: usize) -> Vec<(String, String)> {
    let c = &net.clients[client];
    env_vars(&[
        ("OPENAGI_NETWORK_TRANSPORT", "tor-system"),
        ("OPENAGI_TOR_SOCKS_ADDR", &c.socks.to_string()),
        ("OPENAGI_TOR_CONTROL_ADDR", &c.control.to_string()),
        ("OPENAGI_TOR_CONNECT_TIMEOUT_SECS", "30"),
    ])
}

/// The daemon's onion multiaddr with its peer id, once it reports one.
fn onion_bootstrap(d: &Daemon) -> String {
    wait_for("onion address", Duration::from_secs(30), || {
        let s = d.status().ok()?;
        let onion = s["tor"]["onion_multiaddr"].as_str()?.to_string();
        Some(format!("{onion}/p2p/{}", s["node"]["peer_id"].as_str()?))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
}

fn gossip_received(d: &Daemon) -> u64 {
    d.status()
        .ok()
        .and_then(|s| s["network"]["gossip_received"].as_u64())
        .unwrap_or(0)
}

fn metric(d: &Daemon, series: &str) -> Option<f64> {
    d.metrics().ok()?.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Checks that `d` has only onion addresses: listening and towards peers.
fn assert_onion_only(d: &Daemon) {
    let status = d.status().expect("status");
    let listen = status["network"]["listen_addrs"].to_string();
    assert!(
        listen.contains("/onion3/") && !listen.contains("/ip4/") && !listen.contains("/ip6/"),
        "listen addresses: {listen}"
    );
    assert_eq!(status["tor"]["hybrid"], false);
}

/// Both daemons connected to each other and exchanging gossip.
fn wait_connected_and_gossiping(a: &Daemon, b: &Daemon, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for("onion connection", limit, || {
        (a.connected_peers() >= 1 && b.connected_peers() >= 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log()));
    let connected = started.elapsed();
    let (ga, gb) = (gossip_received(a), gossip_received(b));
    wait_for("gossip over onion", Duration::from_secs(60), || {
        (gossip_received(a) > ga && gossip_received(b) > gb).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log()));
    connected
}

#[test]
fn embedded_daemons_connect_over_onion_services_and_keep_their_address() {
    let Some(net) = network() else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let t0 = Instant::now();
    let a_dir = fresh_node(root.path(), "a");
    let mut a = Daemon::start(
        &a_dir,
        &DaemonOptions {
            env: embedded_env(net),
            ..Default::default()
        },
    )
    .expect("a starts");
    let a_addr = onion_bootstrap(&a);
    let b = Daemon::start(
        &fresh_node(root.path(), "b"),
        &DaemonOptions {
            env: embedded_env(net),
            bootstrap: vec![a_addr.clone()],
            ..Default::default()
        },
    )
    .expect("b starts");
    wait_for("arti bootstrapped", Duration::from_secs(90), || {
        [&a, &b]
            .iter()
            .all(|d| {
                d.status()
                    .ok()
                    .is_some_and(|s| s["tor"]["bootstrapped"] == true)
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    let boot = metric(&a, "openagi_tor_bootstrap_duration_seconds");
    let first = wait_connected_and_gossiping(&a, &b, Duration::from_secs(150));
    eprintln!(
        "embedded: arti bootstrap {boot:?} s, first onion connection {:.1} s after B started ({:.1} s after A started)",
        first.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    assert_onion_only(&a);
    assert_onion_only(&b);
    let peers = b.peers().expect("peers").to_string();
    assert!(
        peers.contains("/onion3/"),
        "B reached A over onion: {peers}"
    );
    // No IP address anywhere, also not for A's inbound connection (which
    // would make all Tor peers one host to IP-keyed scoring).
    let peers = a.peers().expect("peers").to_string();
    assert!(
        peers.contains("/onion3/") && !peers.contains("/ip4/"),
        "A's view of B: {peers}"
    );
    assert!(
        metric(
            &a,
            "openagi_tor_transferred_bytes_total{direction=\"inbound\"}"
        )
        .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(metric(&a, "openagi_tor_bootstrapped"), Some(1.0));
    let rtt = b
        .peers()
        .ok()
        .and_then(|p| p["peers"].as_array()?.first()?["rtt_ms"].as_f64());
    eprintln!("embedded: ping round trip over the onion connection {rtt:?} ms");

    // A restarted node comes back on the same onion address, and B finds
    // it again there.
    a.signal(Signal::SIGTERM).expect("sigterm");
    a.wait_exit(Duration::from_secs(20)).expect("a stops");
    drop(a);
    let restart = Instant::now();
    let a = Daemon::start(
        &a_dir,
        &DaemonOptions {
            env: embedded_env(net),
            ..Default::default()
        },
    )
    .expect("a restarts");
    assert_eq!(
        onion_bootstrap(&a),
        a_addr,
        "onion address kept across restarts"
    );
    wait_connected_and_gossiping(&a, &b, Duration::from_secs(150));
    eprintln!(
        "embedded: reconnected {:.1} s after the restart",
        restart.elapsed().as_secs_f64()
    );

    // `openagi tor rotate-address` is refused while the daemon runs, and
    // gives the next start a new address.
    let dir = a_dir.to_str().expect("utf-8");
    let (status, _, _) =
        openagi_tests::openagi(&["tor", "rotate-address", "--data-dir", dir]).expect("runs");
    assert!(!status.success(), "rotation refused while running");
    let mut a = a;
    a.signal(Signal::SIGTERM).expect("sigterm");
    a.wait_exit(Duration::from_secs(20)).expect("a stops");
    drop(a);
    let (status, out, err) =
        openagi_tests::openagi(&["tor", "rotate-address", "--data-dir", dir]).expect("runs");
    assert!(status.success(), "{out}{err}");
    let a = Daemon::start(
        &a_dir,
        &DaemonOptions {
            env: embedded_env(net),
            ..Default::default()
        },
    )
    .expect("a starts after rotation");
    assert_ne!(
        onion_bootstrap(&a),
        a_addr,
        "new onion address after rotation"
    );
}

#[test]
fn system_tor_daemons_connect_through_the_networks_c_tor_clients() {
    let Some(net) = network() else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let a_dir = fresh_node(root.path(), "a");
    let mut a = Daemon::start(
        &a_dir,
        &DaemonOptions {
            env: system_env(net, 0),
            ..Default::default()
        },
    )
    .expect("a starts");
    let a_addr = onion_bootstrap(&a);
    // Running means tor has published the descriptor, which a young
    // private network can take a while to accept (the daemon waits up to
    // 120 s after bootstrap).
    wait_for("onion service published", Duration::from_secs(150), || {
        a.status()
            .ok()
            .filter(|s| s["tor"]["onion_service"] == "running" && s["tor"]["bootstrapped"] == true)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    let started = Instant::now();
    let b = Daemon::start(
        &fresh_node(root.path(), "b"),
        &DaemonOptions {
            env: system_env(net, 1),
            bootstrap: vec![a_addr.clone()],
            ..Default::default()
        },
    )
    .expect("b starts");
    wait_connected_and_gossiping(&a, &b, Duration::from_secs(150));
    eprintln!(
        "system tor: first onion connection {:.1} s after B started",
        started.elapsed().as_secs_f64()
    );
    assert_onion_only(&a);
    assert_onion_only(&b);
    assert_eq!(metric(&a, "openagi_tor_onion_service_up"), Some(1.0));
    let rtt = b
        .peers()
        .ok()
        .and_then(|p| p["peers"].as_array()?.first()?["rtt_ms"].as_f64());
    eprintln!("system tor: ping round trip over the onion connection {rtt:?} ms");

    a.signal(Signal::SIGTERM).expect("sigterm");
    a.wait_exit(Duration::from_secs(20)).expect("a stops");
    drop(a);
    let a = Daemon::start(
        &a_dir,
        &DaemonOptions {
            env: system_env(net, 0),
            ..Default::default()
        },
    )
    .expect("a restarts");
    assert_eq!(
        onion_bootstrap(&a),
        a_addr,
        "onion address kept across restarts"
    );
    wait_connected_and_gossiping(&a, &b, Duration::from_secs(150));
}

/// A new node joins by invite code over Tor alone: `init --join` with the
/// embedded Tor client redeems the short code at the inviter's onion
/// address and installs its genesis.
fn redeem_an_invite_over_tor(
    net: &TorNet,
    inviter: &Daemon,
    inviter_dir: &std::path::Path,
    root: &std::path::Path,
) {
    let (status, code, err) = openagi_tests::openagi(&[
        "invite",
        "--data-dir",
        &inviter_dir.to_string_lossy(),
        "--uses",
        "1",
    ])
    .expect("invite runs");
    assert!(status.success(), "{err}");
    let code = code.trim().to_string();
    let bootstrap = onion_bootstrap(inviter);
    let joined = root.join("joined-over-tor");
    let started = Instant::now();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_openagi"))
        .args([
            "init",
            "--data-dir",
            &joined.to_string_lossy(),
            "--transport",
            "tor",
            "--network-id",
            openagi_tests::TEST_NETWORK,
            "--join",
            &code,
            "--bootstrap",
            &bootstrap,
        ])
        .envs(embedded_env(net))
        .output()
        .expect("init runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}\n{}", inviter.log());
    assert!(text.contains("joined network"), "{text}");
    assert!(joined.join("genesis.toml").exists());
    let config = std::fs::read_to_string(joined.join("openagi.toml")).expect("config");
    assert!(
        config.contains(&bootstrap),
        "bootstrap is the onion address: {config}"
    );
    eprintln!(
        "tor invite: redeemed over onion services in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn validators_on_onion_services_commit_blocks_in_both_tor_modes() {
    let Some(net) = network() else { return };
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), 4).expect("validators");
    // Two validators embed arti, two use the network's C tor clients.
    let env_for = |i: usize| {
        if i < 2 {
            embedded_env(net)
        } else {
            system_env(net, i - 2)
        }
    };
    let started = Instant::now();
    let v0 = Daemon::start(
        &dirs[0],
        &DaemonOptions {
            env: env_for(0),
            ..Default::default()
        },
    )
    .expect("v0 starts");
    let boot = onion_bootstrap(&v0);
    let mut nodes = vec![v0];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        nodes.push(
            Daemon::start(
                dir,
                &DaemonOptions {
                    env: env_for(i),
                    bootstrap: vec![boot.clone()],
                    ..Default::default()
                },
            )
            .expect("validator starts"),
        );
    }
    // Consensus needs every validator to reach every other one; the others
    // learn each other's onion addresses through the DHT.
    wait_for(
        "validator mesh over onion",
        Duration::from_secs(180),
        || nodes.iter().all(|d| d.connected_peers() >= 3).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&nodes)));
    let meshed = started.elapsed();
    for (i, text) in ["first block over tor", "second", "third"]
        .iter()
        .enumerate()
    {
        let via = &nodes[(i + 1) % nodes.len()];
        let submitted = Instant::now();
        let (code, body) = via
            .post("/api/v1/tx", &json!({ "payload": text, "wait": true }))
            .expect("answers");
        assert_eq!(code, 200, "{body}\n{}", logs(&nodes));
        assert_eq!(body["status"], "committed", "{body}\n{}", logs(&nodes));
        eprintln!(
            "tor consensus: transaction {i} committed at height {} in {:.0} ms",
            body["height"],
            submitted.elapsed().as_secs_f64() * 1000.0
        );
    }
    eprintln!(
        "tor consensus: 4 validators meshed {:.1} s after v0 started",
        meshed.as_secs_f64()
    );
    // Every validator holds the same chain, and none has an IP address.
    let height = nodes[0].height();
    assert!(height >= 1);
    wait_for("ledgers equal", Duration::from_secs(60), || {
        nodes.iter().all(|d| d.height() >= height).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&nodes)));
    let head = |d: &Daemon| {
        let (code, body) = d
            .get(&format!("/api/v1/ledger/blocks/{height}"), Some(d.token()))
            .expect("block");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["hash"].clone()
    };
    let first = head(&nodes[0]);
    assert!(first.is_string(), "{first}");
    for d in &nodes[1..] {
        assert_eq!(head(d), first, "same block at height {height}");
    }
    for d in &nodes {
        assert_onion_only(d);
    }
    redeem_an_invite_over_tor(net, &nodes[0], &dirs[0], root.path());
    for (i, d) in nodes.iter().enumerate() {
        let rtts: Vec<f64> = d
            .peers()
            .ok()
            .and_then(|p| {
                p["peers"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p["rtt_ms"].as_f64()).collect())
            })
            .unwrap_or_default();
        eprintln!("tor consensus: v{i} ping round trips to its peers (ms): {rtts:?}");
    }
}

#[test]
fn a_hybrid_node_bridges_direct_and_onion_peers() {
    let Some(net) = network() else { return };
    let root = tempfile::tempdir().expect("tempdir");
    // D only speaks direct TCP; T only Tor; H both, explicitly.
    let d = Daemon::start(
        &fresh_node(root.path(), "direct"),
        &DaemonOptions::default(),
    )
    .expect("direct node starts");
    let mut hybrid_env = embedded_env(net);
    hybrid_env.extend(env_vars(&[
        ("OPENAGI_TOR_HYBRID", "true"),
        ("OPENAGI_NETWORK_LISTEN", "/ip4/127.0.0.1/tcp/0"),
    ]));
    let h = Daemon::start(
        &fresh_node(root.path(), "hybrid"),
        &DaemonOptions {
            env: hybrid_env,
            // Hybrid mode may dial an IP address; Tor-only mode refuses to.
            bootstrap: vec![d.multiaddr().expect("addr")],
            ..Default::default()
        },
    )
    .expect("hybrid node starts");
    let h_onion = onion_bootstrap(&h);
    let t = Daemon::start(
        &fresh_node(root.path(), "tor"),
        &DaemonOptions {
            env: embedded_env(net),
            bootstrap: vec![h_onion],
            ..Default::default()
        },
    )
    .expect("tor node starts");
    wait_connected_and_gossiping(&h, &d, Duration::from_secs(60));
    wait_connected_and_gossiping(&h, &t, Duration::from_secs(150));

    let status = h.status().expect("status");
    assert_eq!(status["tor"]["hybrid"], true);
    let listen = status["network"]["listen_addrs"].to_string();
    assert!(
        listen.contains("/onion3/") && listen.contains("/ip4/127.0.0.1/tcp/"),
        "hybrid listens on both: {listen}"
    );
    // H reaches D over IP and T over its onion service; T never learns or
    // uses an IP address, and D and T cannot meet directly.
    let peers = h.peers().expect("peers").to_string();
    assert!(
        peers.contains("/ip4/") && peers.contains("/onion3/"),
        "{peers}"
    );
    assert_onion_only(&t);
    assert_eq!(t.connected_peers(), 1, "{}", t.peers().expect("peers"));
    assert_eq!(d.connected_peers(), 1, "{}", d.peers().expect("peers"));
    let t_peers = t.peers().expect("peers").to_string();
    assert!(!t_peers.contains("/ip4/"), "{t_peers}");
}

#[test]
fn system_tor_restart_recreates_the_onion_service() {
    let Some(net) = network() else { return };
    let root = tempfile::tempdir().expect("tempdir");
    let c = Daemon::start(
        &fresh_node(root.path(), "c"),
        &DaemonOptions {
            env: system_env(net, 2),
            ..Default::default()
        },
    )
    .expect("c starts");
    let c_addr = onion_bootstrap(&c);
    let service = |want: &'static str| {
        // As above: running waits for the descriptor upload.
        wait_for(want, Duration::from_secs(150), || {
            c.status()
                .ok()
                .filter(|s| s["tor"]["onion_service"] == want)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log()))
    };
    service("running");
    net.stop_client(2).expect("stop tor");
    service("down");
    assert!(c.log().contains("system tor unavailable"), "{}", c.log());
    let restarted = Instant::now();
    net.start_client(2).expect("restart tor");
    service("running");
    eprintln!(
        "system tor: onion service re-created {:.1} s after tor came back",
        restarted.elapsed().as_secs_f64()
    );
    // Reachable again at the same address.
    assert_eq!(onion_bootstrap(&c), c_addr);
    let d = Daemon::start(
        &fresh_node(root.path(), "d"),
        &DaemonOptions {
            env: system_env(net, 1),
            bootstrap: vec![c_addr],
            ..Default::default()
        },
    )
    .expect("d starts");
    wait_connected_and_gossiping(&c, &d, Duration::from_secs(150));
}

#[test]
fn without_tor_the_daemon_says_so_and_retries_instead_of_going_direct() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    // A direct node this one could reach over TCP, if it ever tried.
    let direct = Daemon::start(
        &fresh_node(root.path(), "direct"),
        &DaemonOptions::default(),
    )
    .expect("direct node");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    // Bootstrapping from an IP address in Tor mode is a configuration
    // error, not a silent direct dial.
    let (status, _, err) = openagi_tests::openagi(&[
        "run",
        "--data-dir",
        fresh_node(root.path(), "refused").to_str().expect("utf-8"),
        "--bootstrap",
        &direct.multiaddr().expect("addr"),
    ])
    .expect("run");
    assert!(!status.success());
    assert!(
        err.contains("network.bootstrap") && err.contains("onion"),
        "{err}"
    );

    let d = Daemon::start(
        &fresh_node(root.path(), "no-tor"),
        &DaemonOptions {
            env: env_vars(&[
                ("OPENAGI_NETWORK_TRANSPORT", "tor-system"),
                ("OPENAGI_TOR_SOCKS_ADDR", &closed),
                ("OPENAGI_TOR_CONTROL_ADDR", &closed),
                ("OPENAGI_TOR_BOOTSTRAP_WARN_SECS", "1"),
            ]),
            ..Default::default()
        },
    )
    .expect("starts without tor");
    wait_for("repeated retries", Duration::from_secs(20), || {
        (d.log().matches("system tor unavailable").count() >= 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let status = d.status().expect("status");
    assert_eq!(status["tor"]["bootstrapped"], false);
    let error = status["tor"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("ControlPort"), "{status}");
    assert!(d.log().contains("no direct fallback"));
    assert_onion_only(&d);
    assert_eq!(d.connected_peers(), 0);
    assert_eq!(
        direct.connected_peers(),
        0,
        "nothing reached the direct node"
    );

    // Embedded Tor whose network cannot be reached: a directory authority
    // and fallback cache on a closed port.
    let arti = root.path().join("unreachable-arti.toml");
    std::fs::write(
        &arti,
        format!(
            "[tor_network]\n\
             fallback_caches = [ {{ rsa_identity = \"{rsa}\", ed_identity = \"{ed}\", orports = [\"{closed}\"] }} ]\n\
             [tor_network.authorities]\n\
             v3idents = [ \"{rsa}\" ]\n\
             uploads = [ [\"{closed}\"] ]\n\
             downloads = [ [\"{closed}\"] ]\n\
             votes = [ [\"{closed}\"] ]\n",
            rsa = "A".repeat(40),
            ed = "A".repeat(43),
        ),
    )
    .expect("write arti config");
    let e = Daemon::start(
        &fresh_node(root.path(), "no-arti"),
        &DaemonOptions {
            env: env_vars(&[
                ("OPENAGI_NETWORK_TRANSPORT", "tor"),
                ("OPENAGI_TOR_ARTI_CONFIG", &arti.display().to_string()),
                ("OPENAGI_TOR_BOOTSTRAP_WARN_SECS", "1"),
            ]),
            ..Default::default()
        },
    )
    .expect("starts without a reachable Tor network");
    wait_for("bootstrap warnings", Duration::from_secs(20), || {
        (e.log().matches("Tor is not bootstrapped").count() >= 2).then_some(())
    })
    .unwrap_or_else(|err| panic!("{err}\n{}", e.log()));
    assert!(e.log().contains("no direct fallback"));
    let status = e.status().expect("status");
    assert_eq!(status["tor"]["bootstrapped"], false, "{status}");
    assert_onion_only(&e);
    assert_eq!(e.connected_peers(), 0);
}
