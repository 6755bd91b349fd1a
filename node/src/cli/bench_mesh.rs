//! `openagi bench mesh`: messages relayed along a line of daemons.
//!
//! Starts a sender, `--relays` relays and a recipient as `openagi run`
//! child processes in a line, each refusing every node but its neighbours
//! (`network.blocked_peers`), so every message crosses every relay. After
//! a first message that opens the session (hello, key bundle, message,
//! receipt), it sends `--messages` messages one at a time and times each
//! to the recipient's inbox (one way) and to the sender's `delivered`
//! (the signed receipt back). It also reads what the first relay received
//! on `/openagi/msg/1` per message (the envelope and the receipt's, with
//! framing), and fills an in-process router to its limits to show what a
//! full relay queue holds in memory. With `--tor` the line runs over onion
//! services of a private Tor network.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use openagi_mesh::{Envelope, Limits, MAX_BODY_BYTES, MAX_LIFETIME_MS, Router};
use serde_json::{Value, json};
use tokio::process::Child;

use crate::cli::client::ApiClient;
use crate::cli::devnet;
use crate::common::bench_log::Figure;
use crate::common::datadir::DataDir;
use crate::common::passphrase::PassphraseSource;

/// What `openagi bench mesh` runs.
#[derive(Debug, Clone)]
pub struct MeshBench {
    /// Relays between sender and recipient.
    pub relays: usize,
    /// Messages timed after the first.
    pub messages: usize,
    /// Bytes of text per message.
    pub text_bytes: usize,
    /// Over a private Tor network's onion services.
    pub tor: bool,
    /// Keep the nodes' data here instead of a temporary directory.
    pub dir: Option<PathBuf>,
}

struct LineNode {
    data_dir: DataDir,
    child: Child,
    client: Option<ApiClient>,
    peer_id: String,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Resident memory in MiB of the process whose `status` file is `path`.
fn vm_rss_mib(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn get(client: &ApiClient, path: &str) -> Result<Value> {
    let (client, path) = (client.clone(), path.to_string());
    tokio::task::spawn_blocking(move || client.get_json(&path))
        .await
        .context("API task")?
}

async fn post(client: &ApiClient, path: &str, body: Value) -> Result<Value> {
    let (client, path) = (client.clone(), path.to_string());
    tokio::task::spawn_blocking(move || client.post_json(&path, &body))
        .await
        .context("API task")?
}

fn client(node: &LineNode) -> Result<&ApiClient> {
    node.client.as_ref().context("node API not ready")
}

/// Runs the benchmark, prints its table and returns its figures.
pub async fn mesh(options: MeshBench) -> Result<Vec<Figure>> {
    // A relay k hops from the sender passes the envelope on with
    // DEFAULT_HOPS - k left; the last relay hands it to the recipient,
    // which needs no budget.
    if options.relays == 0 || options.relays > usize::from(openagi_mesh::DEFAULT_HOPS) {
        bail!(
            "--relays must be between 1 and {} (the hop budget a sender gives)",
            openagi_mesh::DEFAULT_HOPS
        );
    }
    // The daemon refuses texts over its limit with a clear answer.
    if options.text_bytes == 0 {
        bail!("--text-bytes must be positive");
    }
    let (dir, temp) = crate::cli::bench::bench_dir(options.dir.as_deref(), "mesh")?;
    println!(
        "bench mesh: sender, {} relay(s) and recipient in a line{}, {} B messages, {} timed",
        options.relays,
        if options.tor {
            " over a private Tor network"
        } else {
            " on loopback"
        },
        options.text_bytes,
        options.messages
    );
    let result = tokio::select! {
        result = run_line(&dir, &options) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(temp);
    let mut figures = result?;
    figures.extend(full_relay_memory()?);
    Ok(figures)
}

async fn run_line(dir: &Path, options: &MeshBench) -> Result<Vec<Figure>> {
    let count = options.relays + 2;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut dirs = Vec::with_capacity(count);
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let d = DataDir::new(dir.join(format!("node-{i}")));
        let settings = crate::common::datadir::InitSettings {
            network_id: Some(devnet::DEVNET_NETWORK_ID.into()),
            transport: Some(if options.tor {
                crate::common::config::InitTransport::Tor
            } else {
                crate::common::config::InitTransport::Direct
            }),
        };
        let report = d.init(&settings, &PassphraseSource::current(None), false)?;
        ids.push(report.peer_id);
        dirs.push(d);
    }
    let tornet = if options.tor {
        let net_dir = dir.join("tornet");
        println!("starting a private Tor network (30-60 s)...");
        let net = tokio::task::spawn_blocking(move || {
            openagi_tornet::TorNet::start(&net_dir, &openagi_tornet::TorNetOptions::default())
        })
        .await
        .context("starting the private Tor network")??;
        Some(net)
    } else {
        None
    };
    let exe = std::env::current_exe().context("locating the openagi binary")?;
    let mut nodes: Vec<LineNode> = Vec::with_capacity(count);
    let mut previous: Option<String> = None;
    let started = Instant::now();
    for (i, data_dir) in dirs.into_iter().enumerate() {
        let port = devnet::free_port()?;
        let config = data_dir.file("bench-mesh.toml");
        devnet::write_node_config(
            &config,
            port,
            previous.as_deref(),
            tornet.as_ref().map(|t| t.arti_toml.as_path()),
            None,
            "",
        )?;
        // Everyone but the neighbours is refused, so the line holds.
        let blocked: Vec<&str> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| j.abs_diff(i) > 1)
            .map(|(_, id)| id.as_str())
            .collect();
        let _ = std::fs::remove_file(data_dir.file(crate::common::datadir::API_ADDR_FILE));
        let child = devnet::spawn_daemon(
            &exe,
            &data_dir,
            &config,
            &[("OPENAGI_NETWORK_BLOCKED_PEERS", blocked.join(","))],
        )
        .with_context(|| format!("starting node {i}"))?;
        let mut node = LineNode {
            data_dir,
            child,
            client: None,
            peer_id: ids[i].clone(),
        };
        wait_for_api(&mut node, Duration::from_secs(30)).await?;
        previous = Some(if options.tor {
            onion_address(&node).await?
        } else {
            format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", node.peer_id)
        });
        nodes.push(node);
    }
    let limit = if options.tor {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(60)
    };
    wait_for_line(&nodes, limit).await?;
    println!(
        "line of {count} nodes connected after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let result = measure(&nodes, options).await;
    for node in &mut nodes {
        let _ = node.child.start_kill();
    }
    for node in &mut nodes {
        let _ = node.child.wait().await;
    }
    drop(tornet);
    result
}

async fn wait_for_api(node: &mut LineNode, limit: Duration) -> Result<()> {
    let until = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = node.child.try_wait() {
            bail!(
                "a node exited during start-up ({status}); see {}",
                node.data_dir.file("daemon.log").display()
            );
        }
        if let Ok(client) = ApiClient::from_data_dir(&node.data_dir) {
            node.client = Some(client);
            return Ok(());
        }
        if Instant::now() > until {
            bail!("a node did not start its API within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn onion_address(node: &LineNode) -> Result<String> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = get(client(node)?, "/api/v1/status").await
            && let Some(onion) = status["tor"]["onion_multiaddr"].as_str()
        {
            return Ok(format!("{onion}/p2p/{}", node.peer_id));
        }
        if Instant::now() > until {
            bail!("no onion address within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_line(nodes: &[LineNode], limit: Duration) -> Result<()> {
    let until = Instant::now() + limit;
    loop {
        let mut ready = true;
        for (i, node) in nodes.iter().enumerate() {
            let want = if i == 0 || i + 1 == nodes.len() { 1 } else { 2 };
            let have = get(client(node)?, "/api/v1/status")
                .await
                .ok()
                .and_then(|s| s["network"]["connected_peers"].as_u64())
                .unwrap_or(0);
            if have != want {
                ready = false;
            }
        }
        if ready {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "the line did not connect within {} s; logs under each node's data directory",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn inbox_len(node: &LineNode) -> Result<usize> {
    Ok(
        get(client(node)?, "/api/v1/inbox?limit=1000").await?["messages"]
            .as_array()
            .map_or(0, Vec::len),
    )
}

async fn outbox_state(node: &LineNode, number: u64) -> Result<String> {
    let outbox = get(client(node)?, "/api/v1/outbox?limit=20").await?;
    Ok(outbox["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|e| e["number"].as_u64() == Some(number)))
        .and_then(|e| e["state"].as_str())
        .unwrap_or_default()
        .to_string())
}

async fn msg_bytes_in(node: &LineNode) -> Result<f64> {
    let text = tokio::task::spawn_blocking({
        let client = client(node)?.clone();
        move || client.get_text("/metrics")
    })
    .await
    .context("API task")??;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("openagi_p2p_payload_bytes_total{")
                && l.contains("protocol=\"msg\"")
                && l.contains("direction=\"inbound\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Sends one message and waits for it in the recipient's inbox and for
/// the sender's receipt; returns (one way, round trip) in milliseconds.
async fn one_message(
    sender: &LineNode,
    recipient: &LineNode,
    text: &str,
    expected_inbox: usize,
    poll: Duration,
    limit: Duration,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    let answer = post(
        client(sender)?,
        "/api/v1/msg",
        json!({ "to": recipient.peer_id, "text": text }),
    )
    .await?;
    let number = answer["number"].as_u64().context("no outbox number")?;
    let mut one_way = None;
    loop {
        if one_way.is_none() && inbox_len(recipient).await? >= expected_inbox {
            one_way = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        if one_way.is_some() && outbox_state(sender, number).await? == "delivered" {
            let round_trip = started.elapsed().as_secs_f64() * 1000.0;
            return Ok((one_way.unwrap_or(round_trip), round_trip));
        }
        if started.elapsed() > limit {
            bail!(
                "message {number} not delivered within {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(poll).await;
    }
}

async fn measure(nodes: &[LineNode], options: &MeshBench) -> Result<Vec<Figure>> {
    let (sender, recipient, relay) = (&nodes[0], &nodes[nodes.len() - 1], &nodes[1]);
    let poll = if options.tor {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(2)
    };
    let limit = Duration::from_secs(if options.tor { 120 } else { 30 });
    let text: String = "m".repeat(options.text_bytes);
    let (first_one_way, first_round_trip) =
        one_message(sender, recipient, &text, 1, poll, limit).await?;
    let bytes_before = msg_bytes_in(relay).await?;
    let mut one_way = Vec::with_capacity(options.messages);
    let mut round_trip = Vec::with_capacity(options.messages);
    for n in 0..options.messages {
        let (a, b) = one_message(sender, recipient, &text, n + 2, poll, limit).await?;
        one_way.push(a);
        round_trip.push(b);
    }
    let relayed_bytes =
        (msg_bytes_in(relay).await? - bytes_before) / options.messages.max(1) as f64;
    let relay_rss = nodes[1..nodes.len() - 1]
        .iter()
        .filter_map(|n| n.child.id())
        .map(|pid| vm_rss_mib(&format!("/proc/{pid}/status")))
        .fold(0.0f64, f64::max);
    one_way.sort_by(f64::total_cmp);
    round_trip.sort_by(f64::total_cmp);
    let links = options.relays + 1;
    println!(
        "first message (hello, key bundle, message, receipt): {first_one_way:.1} ms to the inbox, {first_round_trip:.1} ms to delivered"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        format!("{} relay(s), {links} links", options.relays),
        "p50 ms",
        "p90 ms",
        "max ms"
    );
    for (name, values) in [
        ("to the recipient's inbox", &one_way),
        ("to the signed receipt", &round_trip),
    ] {
        println!(
            "{name:<34} {:>9.1} {:>9.1} {:>9.1}",
            quantile(values, 0.5),
            quantile(values, 0.9),
            values.last().copied().unwrap_or(0.0)
        );
    }
    println!(
        "the first relay received {relayed_bytes:.0} B per {} B message on /openagi/msg/1 \
         (its envelope and the receipt's, framed): {:.0} B of overhead per message and hop",
        options.text_bytes,
        relayed_bytes - options.text_bytes as f64
    );
    println!("largest relay resident memory after the run: {relay_rss:.0} MiB");
    let label = format!("{} relays", options.relays);
    Ok(vec![
        Figure::new(
            format!("one-way p50, {label}"),
            quantile(&one_way, 0.5),
            "ms",
        ),
        Figure::new(
            format!("receipt p50, {label}"),
            quantile(&round_trip, 0.5),
            "ms",
        ),
        Figure::new(format!("first contact, {label}"), first_round_trip, "ms"),
        Figure::new(
            "relay bytes per message and hop",
            relayed_bytes - options.text_bytes as f64,
            "B",
        ),
        Figure::new("relay resident memory", relay_rss, "MiB"),
    ])
}

/// Fills a router in this process to its byte limit with the largest
/// envelopes and reports the memory it holds (what a relay whose queue is
/// full keeps besides its store).
fn full_relay_memory() -> Result<Vec<Figure>> {
    let limits = Limits::default();
    let me = openagi_crypto::Identity::from_seed(&[1; 32]).public();
    let to = openagi_crypto::Identity::from_seed(&[2; 32]).public();
    let mut router = Router::new(me, limits);
    let before = vm_rss_mib("/proc/self/status");
    let now = crate::unix_ms();
    let mut n: u64 = 0;
    'fill: for upstream_seed in 3u8..=255 {
        let upstream = openagi_crypto::Identity::from_seed(&[upstream_seed; 32]).public();
        for _ in 0..limits.max_held_per_upstream {
            // Written, not zeroed, so every page is resident.
            let mut body = vec![0xa5u8; MAX_BODY_BYTES];
            body[..8].copy_from_slice(&n.to_le_bytes());
            n += 1;
            let envelope = Envelope {
                to,
                expires_unix_ms: now + MAX_LIFETIME_MS,
                hops_left: 1,
                body,
            };
            if router.handle_incoming(upstream, envelope, now).is_err() {
                break 'fill;
            }
        }
    }
    let stats = router.stats();
    let held = vm_rss_mib("/proc/self/status") - before;
    println!(
        "a full relay queue: {} envelopes, {:.1} MiB of bodies (limit {} MiB), {held:.1} MiB resident in the router",
        stats.relaying,
        stats.relaying_bytes as f64 / (1024.0 * 1024.0),
        limits.max_held_bytes / (1024 * 1024)
    );
    Ok(vec![Figure::new("full relay queue resident", held, "MiB")])
}
