//! `openagi bench follow`: how fast a full node catches up with a chain.
//!
//! Four validator daemons and one full node start on loopback; the full
//! node is stopped at once, the validators commit a chain of `--blocks`
//! blocks under an open-loop load, and the full node is started again
//! from height 0. It fetches every block from the validators' disks over
//! `/openagi/ledger/1`, verifies it (hash links, batch root, a certificate
//! of 2f + 1 strict Ed25519 signatures) and stores it durably, exactly as
//! it follows a real network. Reported: blocks and transactions verified
//! and stored per second, the time to the validators' head, and the full
//! node's resident memory while it catches up.
//!
//! With `--followers N` it measures the scale of following instead: four
//! validators under a steady load and N full nodes following them, each
//! its own process. Reported: how far behind the slowest follower is,
//! the followers' memory, and the validators' CPU and outbound bytes per
//! second (compare with `--followers 0` for what the followers add).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cli::bench::{LoadCounters, bench_dir, run_load};
use crate::cli::client::ApiClient;
use crate::cli::devnet;
use crate::common::bench_log::Figure;

/// Validators that build the chain.
const VALIDATORS: usize = 4;
/// The chain must grow at least once in this long, or the run stops.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Options of `openagi bench follow`.
#[derive(Debug, Clone)]
pub struct FollowBench {
    /// Blocks in the chain the full node catches up with.
    pub blocks: u64,
    /// Transactions per second offered while the chain is built.
    pub rate: u64,
    /// Bytes of each transaction's payload.
    pub payload_bytes: usize,
    /// Most transactions per block.
    pub batch_txs: usize,
    /// Where the nodes' data directories go (default: a temporary one).
    pub dir: Option<PathBuf>,
    /// Full nodes following a live chain (the scale measurement; 0 is the
    /// validators' baseline); `None` for the catch-up measurement.
    pub followers: Option<usize>,
    /// How long the scale measurement runs.
    pub duration: Duration,
}

/// Runs the benchmark, prints a table and returns its figures.
pub async fn follow(options: FollowBench) -> Result<Vec<Figure>> {
    if options.rate == 0 || options.batch_txs == 0 || options.blocks == 0 {
        bail!("--blocks, --rate and --batch-txs must be positive");
    }
    if let Some(dir) = &options.dir
        && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        // Existing ledgers would be kept: the full node would not start
        // from height 0 and the chain would not be this run's.
        bail!(
            "--dir {} is not empty; give an empty or new directory",
            dir.display()
        );
    }
    let (dir, temp) = bench_dir(options.dir.as_deref(), "follow")?;
    if let Some(followers) = options.followers {
        let result = scale(&dir, followers, options).await;
        drop(temp);
        return result;
    }
    let extra = format!("[consensus]\nmax_batch_txs = {}\n", options.batch_txs);
    println!(
        "bench follow: {VALIDATORS} validators build a chain of {} blocks ({} B transactions, \
         offered {} tx/s, blocks of up to {}); then a full node catches up from height 0",
        options.blocks, options.payload_bytes, options.rate, options.batch_txs
    );
    let (mut nodes, _no_tor) = devnet::start_local_network(
        &dir,
        VALIDATORS,
        1,
        &extra,
        false,
        devnet::devnet_consensus(),
    )
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let result = tokio::select! {
        result = measure(&mut nodes, &options, stop.clone()) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    stop.store(true, Ordering::Relaxed);
    devnet::stop_all(&mut nodes).await;
    drop(temp);
    result
}

fn status_of(client: &ApiClient) -> Result<serde_json::Value> {
    client.get_json("/api/v1/status")
}

fn height_of(client: &ApiClient) -> u64 {
    status_of(client)
        .ok()
        .and_then(|s| s["ledger"]["height"].as_u64())
        .unwrap_or(0)
}

/// Finds the primary (as `first` sees it) and offers it the open-loop load
/// of `options` until `stop` is set.
fn load_the_primary(
    first: &ApiClient,
    clients: &[ApiClient],
    options: &FollowBench,
    stop: &Arc<AtomicBool>,
) -> Result<(ApiClient, std::thread::JoinHandle<()>)> {
    let primary_index = status_of(first)?["consensus"]["primary_index"]
        .as_u64()
        .context("no consensus status")? as usize;
    let primary = clients
        .get(primary_index)
        .context("primary out of range")?
        .clone();
    let counters = Arc::new(LoadCounters::default());
    let load = {
        let (primary, stop, counters) = (primary.clone(), stop.clone(), counters);
        let (rate, payload) = (options.rate, options.payload_bytes);
        std::thread::spawn(move || run_load(primary, rate, payload, stop, counters))
    };
    Ok((primary, load))
}

/// Resident memory of a process, from `/proc` (0 where unreadable).
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

async fn measure(
    nodes: &mut [devnet::Node],
    options: &FollowBench,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Figure>> {
    let (validators, full) = nodes.split_at_mut(VALIDATORS);
    let full = full.first_mut().context("no full node")?;
    full.stop().await;
    let clients: Vec<ApiClient> = validators.iter().filter_map(|n| n.client.clone()).collect();
    let first = clients.first().context("no validator")?.clone();
    let until = Instant::now() + Duration::from_secs(30);
    while clients.iter().any(|c| {
        status_of(c)
            .ok()
            .and_then(|s| s["network"]["connected_peers"].as_u64())
            .unwrap_or(0)
            < (VALIDATORS - 1) as u64
    }) {
        if Instant::now() > until {
            bail!("validators did not connect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Build the chain.
    let (primary, load) = load_the_primary(&first, &clients, options, &stop)?;
    let building = Instant::now();
    let mut last_height = 0;
    let mut last_growth = Instant::now();
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let height = height_of(&primary);
        if height > last_height {
            last_height = height;
            last_growth = Instant::now();
        }
        if height >= options.blocks {
            break;
        }
        if last_growth.elapsed() > STALL_LIMIT {
            bail!("the chain stopped growing at height {height}");
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!(
                "  building: height {height} of {} after {:.0} s",
                options.blocks,
                building.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || load.join()).await;
    // Let the last proposals commit, then take the head.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let head = status_of(&primary)?;
    let target = head["ledger"]["height"].as_u64().unwrap_or(0);
    let target_hash = head["ledger"]["head_hash"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let txs = head["consensus"]["committed_txs"].as_u64().unwrap_or(0);
    let built_in = building.elapsed().as_secs_f64();
    println!(
        "  chain built: {target} blocks, {txs} transactions in {built_in:.0} s; starting the full node"
    );

    // Catch up from height 0.
    let started = Instant::now();
    full.restart().await?;
    let api_after = started.elapsed();
    let pid = full.pid().context("the full node is not running")?;
    let client = full.client.clone().context("no API on the full node")?;
    let mut peak_rss = 0u64;
    let mut samples = 0u64;
    let mut rss_sum = 0u64;
    let mut last_height = 0;
    let mut last_growth = Instant::now();
    let mut last_print = Instant::now();
    let caught_up = loop {
        let rss = rss_bytes(pid);
        peak_rss = peak_rss.max(rss);
        rss_sum += rss;
        samples += 1;
        let height = height_of(&client);
        if height >= target {
            break started.elapsed();
        }
        if height > last_height {
            last_height = height;
            last_growth = Instant::now();
        }
        if last_growth.elapsed() > STALL_LIMIT {
            bail!("the full node stopped at height {height} of {target}");
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!(
                "  catching up: height {height} of {target}, RSS {:.0} MiB",
                rss as f64 / (1 << 20) as f64
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let end_rss = rss_bytes(pid);
    let full_head = status_of(&client)?;
    let same_head = full_head["ledger"]["head_hash"].as_str() == Some(target_hash.as_str())
        || height_of(&client) > target;
    if !same_head {
        bail!("the full node's head at {target} differs from the validators'");
    }
    // Over the whole time from the process start: the node starts
    // fetching before its API answers, so a shorter interval would
    // overstate the rate.
    let secs = caught_up.as_secs_f64().max(f64::EPSILON);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let figures = vec![
        Figure::new("chain blocks", target as f64, "blocks"),
        Figure::new("chain transactions", txs as f64, "tx"),
        Figure::new("full node start to API", api_after.as_secs_f64(), "s"),
        Figure::new("full node start to the validators' head", secs, "s"),
        Figure::new(
            "blocks verified and stored per second",
            target as f64 / secs,
            "blocks/s",
        ),
        Figure::new(
            "transactions verified and stored per second",
            txs as f64 / secs,
            "tx/s",
        ),
        Figure::new("full node peak RSS while catching up", mib(peak_rss), "MiB"),
        Figure::new(
            "full node mean RSS while catching up",
            mib(rss_sum / samples.max(1)),
            "MiB",
        ),
        Figure::new("full node RSS at the head", mib(end_rss), "MiB"),
    ];
    print_figures(&figures);
    Ok(figures)
}

/// Prints figures as a two-column Markdown table.
fn print_figures(figures: &[Figure]) {
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    for f in figures {
        println!("| {} | {:.1} {} |", f.name, f.value, f.unit);
    }
}

/// CPU seconds a process has used (user and system), from `/proc`.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may hold spaces: utime and
    // stime are the 14th and 15th fields, the 12th and 13th after it.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // Linux reports in clock ticks of 1/100 s on every platform it runs on
    // here (USER_HZ).
    ticks as f64 / 100.0
}

/// Peer payload bytes a node has sent, from its metrics.
fn bytes_out(client: &ApiClient) -> f64 {
    client
        .get_text("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("openagi_p2p_payload_bytes_total{")
                && l.contains("direction=\"outbound\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The scale measurement: `options.followers` full nodes following four
/// validators under load for `options.duration`.
async fn scale(
    dir: &std::path::Path,
    followers: usize,
    options: FollowBench,
) -> Result<Vec<Figure>> {
    if followers > devnet::MAX_FULL_NODES {
        bail!(
            "--followers must be at most {} (got {followers})",
            devnet::MAX_FULL_NODES
        );
    }
    let extra = format!("[consensus]\nmax_batch_txs = {}\n", options.batch_txs);
    println!(
        "bench follow: {VALIDATORS} validators under {} tx/s and {} full nodes following them, \
         each its own process, for {} s",
        options.rate,
        followers,
        options.duration.as_secs()
    );
    let started = Instant::now();
    let (mut nodes, _no_tor) = devnet::start_local_network(
        dir,
        VALIDATORS,
        followers,
        &extra,
        false,
        devnet::devnet_consensus(),
    )
    .await?;
    println!(
        "  {} daemons started in {:.1} s",
        nodes.len(),
        started.elapsed().as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let result = tokio::select! {
        result = measure_scale(&nodes, &options, stop.clone()) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    stop.store(true, Ordering::Relaxed);
    devnet::stop_all(&mut nodes).await;
    result
}

async fn measure_scale(
    nodes: &[devnet::Node],
    options: &FollowBench,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Figure>> {
    let (validators, followers) = nodes.split_at(VALIDATORS);
    let clients: Vec<ApiClient> = validators.iter().filter_map(|n| n.client.clone()).collect();
    let first = clients.first().context("no validator")?.clone();
    // Commits need the validators connected to each other; followers
    // find them through the DHT meanwhile.
    let until = Instant::now() + Duration::from_secs(60);
    while height_of(&first) == 0
        && first
            .post_json(
                "/api/v1/tx",
                &serde_json::json!({ "payload": "warm up", "wait": true }),
            )
            .is_err()
    {
        if Instant::now() > until {
            bail!("the validators did not commit within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (primary, load) = load_the_primary(&first, &clients, options, &stop)?;
    // Let the followers catch up with the warm-up before measuring.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pids: Vec<u32> = validators.iter().filter_map(|n| n.pid()).collect();
    let cpu0: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let out0: f64 = clients.iter().map(bytes_out).sum();
    let h0 = height_of(&primary);
    let t0 = Instant::now();
    let mut worst_lag = 0u64;
    let mut lags = Vec::new();
    let mut follower_rss = Vec::new();
    while t0.elapsed() < options.duration {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let head = height_of(&primary);
        for follower in followers {
            let height = follower.client.as_ref().map_or(0, height_of);
            let lag = head.saturating_sub(height);
            worst_lag = worst_lag.max(lag);
            lags.push(lag as f64);
            if let Some(pid) = follower.pid() {
                follower_rss.push(rss_bytes(pid) as f64);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let out1: f64 = clients.iter().map(bytes_out).sum();
    let blocks = height_of(&primary).saturating_sub(h0);
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || load.join()).await;
    lags.sort_by(f64::total_cmp);
    let median_lag = lags.get(lags.len() / 2).copied().unwrap_or(0.0);
    let mib = |b: f64| b / (1 << 20) as f64;
    // `+ 0.0`: the sum of no values is -0.0.
    let mean = |v: &[f64]| (v.iter().sum::<f64>() + 0.0) / v.len().max(1) as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let figures = vec![
        Figure::new("followers", followers.len() as f64, "full nodes"),
        Figure::new("blocks per second", blocks as f64 / secs, "blocks/s"),
        Figure::new(
            "validators' CPU (all four)",
            (cpu1 - cpu0) / secs * 100.0,
            "% of one core",
        ),
        Figure::new(
            "validators' peer payload out (all four)",
            (out1 - out0) / secs / 1024.0,
            "KiB/s",
        ),
        Figure::new("follower lag, median of samples", median_lag, "blocks"),
        Figure::new("follower lag, worst sample", worst_lag as f64, "blocks"),
        Figure::new("follower RSS, mean", mib(mean(&follower_rss)), "MiB"),
        Figure::new("follower RSS, largest", mib(max(&follower_rss)), "MiB"),
    ];
    print_figures(&figures);
    Ok(figures)
}
