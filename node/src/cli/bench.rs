//! `openagi bench ...`: performance measurements that print figures.
//!
//! `bench consensus` starts real validator daemons on loopback (the same
//! binary, as child processes), offers an open-loop load of opaque
//! transactions to the primary through the binary batch endpoint, and
//! reports committed throughput, submission-to-commit latency measured
//! inside the primary, and the latency a client sees: probes posted to a
//! backup with `"wait": true`, timed from the request to the answer that
//! says the transaction committed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::bench_log::Figure;
use anyhow::{Context, Result, bail};
use openagi_consensus::{ClientId, Transaction};

use crate::cli::client::ApiClient;
use crate::cli::devnet;

/// Options of `openagi bench consensus`.
#[derive(Debug, Clone)]
pub struct ConsensusBench {
    /// Validators.
    pub nodes: usize,
    /// Offered transactions per second.
    pub rate: u64,
    /// Measured period.
    pub duration: Duration,
    /// Load before measuring starts.
    pub warmup: Duration,
    /// Bytes of each transaction's payload.
    pub payload_bytes: usize,
    /// Most transactions per block.
    pub batch_txs: usize,
    /// Where the nodes' data directories go (default: a temporary one).
    pub dir: Option<PathBuf>,
    /// Run the validators over onion services of a private Tor network.
    pub tor: bool,
}

/// What [`run_load`] counted.
#[derive(Default)]
pub(crate) struct LoadCounters {
    pub(crate) offered: AtomicU64,
    accepted: AtomicU64,
    /// Transactions in posts the node answered "busy" (503) to.
    busy: AtomicU64,
    failed_posts: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

/// Offers `rate` transactions a second to `client` in ticks of 10 ms until
/// `stop`; a tick that falls more than a second behind is skipped rather
/// than sent late, so the offered load stays open-loop.
pub(crate) fn run_load(
    client: ApiClient,
    rate: u64,
    payload_bytes: usize,
    stop: Arc<AtomicBool>,
    counters: Arc<LoadCounters>,
) {
    const TICK: Duration = Duration::from_millis(10);
    let mut identity = [0u8; 32];
    // One client id per bench run; sequence numbers from 1.
    let _ = openagi_crypto::os_random(&mut identity);
    let client_id = ClientId(identity);
    let per_tick = (rate as f64 * TICK.as_secs_f64()).max(1.0);
    let started = Instant::now();
    let mut seq: u64 = 0;
    let mut owed = 0.0f64;
    let mut tick: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick += 1;
        let due = started + TICK * tick;
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        } else if now - due > Duration::from_secs(1) {
            continue;
        }
        owed += per_tick;
        let count = owed.floor() as usize;
        owed -= count as f64;
        let mut txs = Vec::with_capacity(count);
        for _ in 0..count {
            seq += 1;
            let mut payload = vec![0u8; payload_bytes];
            let stamp = seq.to_le_bytes();
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte = stamp[i % 8] ^ (i as u8);
            }
            txs.push(Transaction {
                client: client_id,
                seq,
                payload: payload.into(),
            });
        }
        counters.offered.fetch_add(count as u64, Ordering::Relaxed);
        let Ok(body) = postcard::to_stdvec(&txs) else {
            continue;
        };
        match client.post_bytes("/api/v1/tx/batch", body) {
            Ok(answer) => {
                let queued = answer["queued"].as_u64().unwrap_or(0);
                counters.accepted.fetch_add(queued, Ordering::Relaxed);
            }
            Err(e)
                if e.downcast_ref::<crate::cli::client::Refusal>()
                    .is_some_and(|r| r.status == 503) =>
            {
                // Pushed back: an open-loop client drops these and goes on
                // at its rate, as a real overload would.
                counters.busy.fetch_add(count as u64, Ordering::Relaxed);
            }
            Err(e) => {
                counters.failed_posts.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = counters.first_failure.lock() {
                    first.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
    }
}

/// How often a latency probe is sent.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// A probe's send time and its client-side latency to the commit answer
/// (`None`: the node answered before it committed, or refused).
type ProbeSamples = Arc<std::sync::Mutex<Vec<(Instant, Option<Duration>)>>>;

/// End-to-end probes as a user sees them: every [`PROBE_INTERVAL`] one
/// transaction is posted with `"wait": true` to `client` (a backup, so the
/// path includes the relay to the primary), and the time from sending the
/// request to the answer that says it committed is recorded. Probes use
/// their own client id, so they wait in no other client's queue.
fn run_probes(
    client: ApiClient,
    payload_bytes: usize,
    stop: Arc<AtomicBool>,
    samples: ProbeSamples,
) {
    let mut identity = [0u8; 32];
    let _ = openagi_crypto::os_random(&mut identity);
    let client_hex = hex::encode(identity);
    let payload = "ab".repeat(payload_bytes);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let body = serde_json::json!({
            "payload_hex": payload,
            "client": client_hex,
            "seq": seq,
            "wait": true,
        });
        let sent = Instant::now();
        let latency = match client.post_json("/api/v1/tx", &body) {
            Ok(answer) if answer["status"] == "committed" => Some(sent.elapsed()),
            _ => None,
        };
        if let Ok(mut all) = samples.lock() {
            all.push((sent, latency));
        }
        std::thread::sleep(PROBE_INTERVAL.saturating_sub(sent.elapsed()));
    }
}

/// The `q` quantile of sorted `values` (nearest rank).
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values[((values.len() - 1) as f64 * q).round() as usize]
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Where a benchmark's nodes keep their data: `dir` when given (the
/// operator's, kept), otherwise a temporary directory that is removed
/// however the run ends, failed start-ups included (drop the second value
/// last).
pub(crate) fn bench_dir(
    dir: Option<&std::path::Path>,
    name: &str,
) -> Result<(std::path::PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => Ok((d.to_path_buf(), None)),
        None => {
            let temp = tempfile::Builder::new()
                .prefix(&format!("openagi-bench-{name}-{}-", std::process::id()))
                .tempdir()
                .context("creating the benchmark's temporary directory")?;
            Ok((temp.path().to_path_buf(), Some(temp)))
        }
    }
}

/// Runs the consensus benchmark, prints a table and returns its headline
/// figures (for the data directory's benchmark log).
pub async fn consensus(options: ConsensusBench) -> Result<Vec<Figure>> {
    if options.rate == 0 {
        bail!("--rate must be positive");
    }
    let consensus = bench_replica_config(&options)?;
    let (dir, temp) = bench_dir(options.dir.as_deref(), "consensus")?;
    let extra = format!(
        "[consensus]\nmax_batch_txs = {}\nmax_batch_bytes = {}\nmax_pending = {}\n\
         checkpoint_interval = {}\nwindow = {}\n",
        consensus.max_batch_txs,
        consensus.max_batch_bytes,
        pending_capacity(&consensus),
        consensus.checkpoint_interval,
        consensus.window
    );
    println!(
        "bench consensus: {} validators {}, {} B transactions, batches of up to {} \
         (checkpoint every {}, window {}), offered {} tx/s open-loop, warm-up {} s, measuring {} s",
        options.nodes,
        if options.tor {
            "over onion services of a private Tor network"
        } else {
            "on loopback"
        },
        options.payload_bytes,
        consensus.max_batch_txs,
        consensus.checkpoint_interval,
        consensus.window,
        options.rate,
        options.warmup.as_secs(),
        options.duration.as_secs()
    );
    // The private Tor network lives as long as `_tornet`.
    let (mut nodes, _tornet) = devnet::start_local_network(
        &dir,
        options.nodes,
        0,
        &extra,
        options.tor,
        crate::common::genesis::GenesisConsensus {
            checkpoint_interval: consensus.checkpoint_interval,
            window: consensus.window,
            ..devnet::devnet_consensus()
        },
    )
    .await?;
    // Ctrl-C stops the load, the nodes and removes the temporary
    // directory too.
    let stop = Arc::new(AtomicBool::new(false));
    let result = tokio::select! {
        result = measure(&nodes, &options, stop.clone()) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    stop.store(true, Ordering::Relaxed);
    devnet::stop_all(&mut nodes).await;
    drop(temp);
    result
}

/// Runs the consensus benchmark once per validator count in `counts` and,
/// for more than one, prints the sweep side by side; figures are named
/// with their count.
pub async fn consensus_sweep(counts: &[usize], options: ConsensusBench) -> Result<Vec<Figure>> {
    if counts.is_empty() {
        bail!("--nodes needs at least one count");
    }
    let mut all = Vec::new();
    let mut rows = Vec::new();
    for &nodes in counts {
        let figures = consensus(ConsensusBench {
            nodes,
            ..options.clone()
        })
        .await?;
        let value = |name: &str| {
            figures
                .iter()
                .find(|f| f.name == name)
                .map_or(0.0, |f| f.value)
        };
        rows.push((
            nodes,
            value("committed throughput"),
            value("commit latency p50"),
            value("commit latency p99"),
            value("client latency at a backup p50"),
        ));
        if counts.len() == 1 {
            return Ok(figures);
        }
        all.extend(figures.into_iter().map(|f| Figure {
            name: format!("{nodes} validators: {}", f.name),
            ..f
        }));
    }
    println!();
    println!(
        "| validators | committed tx/s | commit p50 ms | commit p99 ms | client p50 at a backup ms |"
    );
    println!("|---|---|---|---|---|");
    for (nodes, tps, p50, p99, client) in rows {
        println!("| {nodes} | {tps:.0} | {p50:.0} | {p99:.0} | {client:.0} |");
    }
    Ok(all)
}

/// Client transactions the primary holds before it answers "busy": the
/// node's default, or two full batches if that is more, so an overload is
/// pushed back at the door instead of queueing seconds of latency (and
/// memory) inside the node. (Pending transactions are held until they
/// commit, so this also bounds what is in flight.)
fn pending_capacity(consensus: &openagi_consensus::Config) -> usize {
    openagi_consensus::Config::default()
        .max_pending_requests
        .max(2 * consensus.max_batch_txs)
}

/// The replica settings of a benchmark run: the requested batch size,
/// with the checkpoint window shrunk until the largest possible new view
/// (a quorum of view changes, each carrying every prepared batch of the
/// window) fits one message, as the replica requires at start-up.
/// Refused before any node starts when even the smallest window
/// (checkpoint interval 1, window 2) cannot fit.
fn bench_replica_config(options: &ConsensusBench) -> Result<openagi_consensus::Config> {
    if options.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if options.batch_txs == 0 {
        bail!("--batch-txs must be at least 1");
    }
    let mut consensus = openagi_consensus::Config {
        max_batch_txs: options.batch_txs,
        max_batch_bytes: options.batch_txs * (options.payload_bytes + 64),
        ..openagi_consensus::Config::default()
    };
    if consensus.max_batch_bytes > crate::common::config::MAX_BATCH_BYTES_LIMIT {
        bail!(
            "--batch-txs {} with {} B payloads makes batches of up to {} bytes; a node takes at \
             most {} (a block must fit the answers full nodes fetch it in); lower --batch-txs \
             or --payload",
            options.batch_txs,
            options.payload_bytes,
            consensus.max_batch_bytes,
            crate::common::config::MAX_BATCH_BYTES_LIMIT
        );
    }
    let fits = |c: &openagi_consensus::Config| {
        c.max_new_view_bytes(options.nodes) <= c.max_message_bytes as u64
    };
    while !fits(&consensus) {
        if consensus.window > 2 * consensus.checkpoint_interval {
            consensus.window /= 2;
        } else if consensus.checkpoint_interval > 1 {
            consensus.checkpoint_interval /= 2;
            consensus.window = 2 * consensus.checkpoint_interval;
        } else {
            bail!(
                "--batch-txs {} with {} B payloads is too large for {} validators: even a \
                 window of 2 blocks makes a new view of up to {} bytes, above the {}-byte \
                 message limit; lower --batch-txs or --payload",
                options.batch_txs,
                options.payload_bytes,
                options.nodes,
                consensus.max_new_view_bytes(options.nodes),
                consensus.max_message_bytes
            );
        }
    }
    consensus
        .validate()
        .map_err(|e| anyhow::anyhow!("benchmark settings: {e}"))?;
    Ok(consensus)
}

/// Offers the load until `stop` is set (by the end of the measurement, or
/// by the caller on Ctrl-C) and reports what the nodes did.
async fn measure(
    nodes: &[devnet::Node],
    options: &ConsensusBench,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Figure>> {
    let clients: Vec<ApiClient> = nodes.iter().filter_map(|n| n.client.clone()).collect();
    let first = clients.first().context("no node")?.clone();
    let expected = options.nodes - 1;
    // Over Tor, peers find each other's onion addresses through the DHT
    // and build circuits first.
    let connect_limit = Duration::from_secs(if options.tor { 240 } else { 30 });
    let until = Instant::now() + connect_limit;
    loop {
        let connected = clients
            .iter()
            .filter_map(|c| c.get_json("/api/v1/status").ok())
            .filter(|s| s["network"]["connected_peers"].as_u64() == Some(expected as u64))
            .count();
        if connected == clients.len() {
            break;
        }
        if Instant::now() > until {
            bail!(
                "validators did not connect within {} s",
                connect_limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = first.get_json("/api/v1/status")?;
    let primary_index = status["consensus"]["primary_index"]
        .as_u64()
        .context("no consensus status")? as usize;
    let primary = clients
        .get(primary_index)
        .context("primary out of range")?
        .clone();

    let counters = Arc::new(LoadCounters::default());
    let load = {
        let (primary, stop, counters) = (primary.clone(), stop.clone(), counters.clone());
        let (rate, payload) = (options.rate, options.payload_bytes);
        std::thread::spawn(move || run_load(primary, rate, payload, stop, counters))
    };
    let probe_samples: ProbeSamples = Arc::default();
    let probe_node = clients
        .get((primary_index + 1) % clients.len())
        .context("no node for probes")?
        .clone();
    let probes = {
        let (stop, samples) = (stop.clone(), probe_samples.clone());
        let payload = options.payload_bytes;
        std::thread::spawn(move || run_probes(probe_node, payload, stop, samples))
    };
    tokio::time::sleep(options.warmup).await;

    let committed = |c: &ApiClient| -> Result<(u64, u64)> {
        let s = c.get_json("/api/v1/status")?;
        Ok((
            s["consensus"]["committed_txs"].as_u64().unwrap_or(0),
            s["ledger"]["height"].as_u64().unwrap_or(0),
        ))
    };
    let metrics_before = primary.get_text("/metrics")?;
    let (tx0, h0) = committed(&primary)?;
    let offered0 = counters.offered.load(Ordering::Relaxed);
    let t0 = crate::unix_ms();
    let started = Instant::now();
    tokio::time::sleep(options.duration).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (tx1, h1) = committed(&primary)?;
    let offered1 = counters.offered.load(Ordering::Relaxed);
    let busy = counters.busy.load(Ordering::Relaxed);
    let latency = primary.get_json(&format!("/api/v1/consensus/latency?since_ms={t0}"))?;
    let metrics_after = primary.get_text("/metrics")?;
    let measured_until = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || (load.join(), probes.join())).await;
    let (probe_latencies, probes_not_committed) = {
        let all = match probe_samples.lock() {
            Ok(all) => all.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let in_window: Vec<_> = all
            .into_iter()
            .filter(|(sent, _)| *sent >= started && *sent < measured_until)
            .collect();
        let mut ms: Vec<f64> = in_window
            .iter()
            .filter_map(|(_, l)| l.map(|d| d.as_secs_f64() * 1000.0))
            .collect();
        ms.sort_by(f64::total_cmp);
        let missed = in_window.len() - ms.len();
        (ms, missed)
    };

    let committed_tps = (tx1 - tx0) as f64 / elapsed;
    let blocks = h1 - h0;
    let fsyncs = metric(
        &metrics_after,
        "openagi_consensus_persist_duration_seconds_count",
    ) - metric(
        &metrics_before,
        "openagi_consensus_persist_duration_seconds_count",
    );
    let fsync_seconds = metric(
        &metrics_after,
        "openagi_consensus_persist_duration_seconds_sum",
    ) - metric(
        &metrics_before,
        "openagi_consensus_persist_duration_seconds_sum",
    );
    let dropped = metrics_after
        .lines()
        .filter(|l| l.starts_with("openagi_consensus_messages_dropped_total"))
        .map(|l| l.to_string())
        .collect::<Vec<_>>();

    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| offered load | {:.0} tx/s |",
        (offered1 - offered0) as f64 / elapsed
    );
    println!("| committed throughput | {committed_tps:.0} tx/s |");
    println!(
        "| blocks | {blocks} ({:.1} blocks/s, {:.0} tx/block) |",
        blocks as f64 / elapsed,
        (tx1 - tx0) as f64 / blocks.max(1) as f64
    );
    println!(
        "| latency submit→commit (primary) | p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} tx |",
        latency["p50_ms"].as_f64().unwrap_or(0.0),
        latency["p90_ms"].as_f64().unwrap_or(0.0),
        latency["p99_ms"].as_f64().unwrap_or(0.0),
        latency["max_ms"].as_f64().unwrap_or(0.0),
        latency["samples"].as_u64().unwrap_or(0)
    );
    println!(
        "| latency client→commit answer at a backup (HTTP, `wait`) | p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} probes ({} not committed in the wait) |",
        quantile(&probe_latencies, 0.5),
        quantile(&probe_latencies, 0.9),
        quantile(&probe_latencies, 0.99),
        quantile(&probe_latencies, 1.0),
        probe_latencies.len(),
        probes_not_committed
    );
    println!(
        "| disk commits (fsync) at the primary | {:.0}/s, mean {:.2} ms, {:.0}% of wall time |",
        fsyncs / elapsed,
        if fsyncs > 0.0 {
            fsync_seconds / fsyncs * 1000.0
        } else {
            0.0
        },
        fsync_seconds / elapsed * 100.0
    );
    println!("| pushed back (503 busy, whole run) | {busy} tx |");
    println!(
        "| refused by the primary | {:.0} (batch posts failed: {}) |",
        metric(
            &metrics_after,
            "openagi_consensus_submissions_refused_total"
        ),
        counters.failed_posts.load(Ordering::Relaxed)
    );
    if let Ok(first) = counters.first_failure.lock()
        && let Some(e) = first.as_ref()
    {
        println!("| first failed batch post | {e} |");
    }
    for line in dropped {
        println!("| dropped | {line} |");
    }
    Ok(vec![
        Figure::new("committed throughput", committed_tps, "tx/s"),
        Figure::new(
            "commit latency p50",
            latency["p50_ms"].as_f64().unwrap_or(0.0),
            "ms",
        ),
        Figure::new(
            "commit latency p99",
            latency["p99_ms"].as_f64().unwrap_or(0.0),
            "ms",
        ),
        Figure::new("blocks per second", blocks as f64 / elapsed, "blocks/s"),
        Figure::new(
            "client latency at a backup p50",
            quantile(&probe_latencies, 0.5),
            "ms",
        ),
        Figure::new(
            "client latency at a backup p99",
            quantile(&probe_latencies, 0.99),
            "ms",
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(batch_txs: usize, nodes: usize) -> ConsensusBench {
        ConsensusBench {
            nodes,
            rate: 10_000,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            payload_bytes: 512,
            batch_txs,
            dir: None,
            tor: false,
        }
    }

    /// The default `--batch-txs` and larger ones start: the window (and
    /// then the checkpoint interval) shrinks until a new view fits.
    #[test]
    fn large_batches_get_a_window_that_fits() {
        for (batch, nodes) in [
            (256, 4),
            (1024, 4),
            (2048, 4),
            (4096, 4),
            (4096, 16),
            (4096, 7),
        ] {
            let c = bench_replica_config(&options(batch, nodes)).expect("fits");
            assert!(
                c.max_new_view_bytes(nodes) <= c.max_message_bytes as u64,
                "batch {batch}, {nodes} nodes: {c:?}"
            );
            c.validate().expect("valid");
        }
        let default = bench_replica_config(&options(256, 4)).expect("fits");
        assert_eq!(default.window, openagi_consensus::Config::default().window);
    }

    /// A batch a node would refuse, or that no window can carry, is
    /// refused before any node starts, naming the flags to change.
    #[test]
    fn impossible_batches_are_refused_up_front() {
        // Over the node's batch byte limit; then within it, but with so
        // many validators that even a two-block window's new view is too
        // large.
        for (batch, nodes) in [(8192, 4), (1 << 20, 4), (4096, 100)] {
            let err = bench_replica_config(&options(batch, nodes)).expect_err("too large");
            let text = format!("{err:#}");
            assert!(
                text.contains("--batch-txs") && text.contains("--payload"),
                "{text}"
            );
        }
        assert!(bench_replica_config(&options(0, 4)).is_err());
        assert!(bench_replica_config(&options(256, 0)).is_err());
    }
}
