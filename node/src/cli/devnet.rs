//! `openagi devnet`: a local network of real daemons on loopback.
//!
//! Each node is a separate `openagi run` process with its own data
//! directory, so the devnet exercises exactly what operators run. Node 0
//! listens on a fixed free port and every other node bootstraps from it;
//! Kademlia finds the rest. The children are started with
//! `--exit-with-parent`, so none outlives the devnet even if it is killed.
//!
//! Each node trains on its own shard of the embedded digits set; once
//! consensus commits, node 0 submits the job of `configs/digits-job.toml`
//! and the summary shows its round, accuracy and ε as they commit.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::cli::client::ApiClient;
use crate::common::datadir::DataDir;
use crate::common::genesis::{GENESIS_FILE, Genesis};
use crate::common::passphrase::PassphraseSource;

/// Network id of every devnet.
pub const DEVNET_NETWORK_ID: &str = "openagi-devnet";
/// The devnet's join puzzle: 8 bits at 1 MiB, about 256 attempts of a
/// few milliseconds.
pub const DEVNET_JOIN_DIFFICULTY_BITS: u32 = 8;
/// Memory of one devnet join attempt, KiB.
pub const DEVNET_JOIN_MEMORY_KIB: u32 = 1024;

/// The devnet genesis's shared parameters: the default checkpoint interval
/// and window, and a join that costs a fraction of a second (minutes on a
/// real network).
pub(crate) fn devnet_consensus() -> crate::common::genesis::GenesisConsensus {
    crate::common::genesis::GenesisConsensus {
        join_difficulty_bits: DEVNET_JOIN_DIFFICULTY_BITS,
        join_memory_kib: DEVNET_JOIN_MEMORY_KIB,
        ..Default::default()
    }
}
/// How long stopping may take before stragglers are killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Options of `openagi devnet`.
#[derive(Debug, Clone)]
pub struct DevnetOptions {
    /// Number of validators.
    pub nodes: usize,
    /// Full nodes beside them: they follow the ledger without voting.
    pub full_nodes: usize,
    /// Further nodes that start as full nodes and join the validator set
    /// (`openagi validator join`) once consensus runs.
    pub join: usize,
    /// Directory holding one data directory per node.
    pub dir: PathBuf,
    /// Stop by itself after this long.
    pub duration: Option<Duration>,
    /// Run a private Tor network and connect the nodes through onion
    /// services only.
    pub tor: bool,
    /// Transactions per second submitted to the nodes (0: none).
    pub tx_rate: u32,
    /// Submit the digits training job once consensus runs.
    pub learning: bool,
    /// Keep what an earlier devnet left in `dir` (keys, ledgers) instead
    /// of starting a fresh network.
    pub resume: bool,
}

/// Prepares `dir` for a devnet: a fresh network unless `resume`, in which
/// case an earlier devnet's nodes keep their keys and ledgers. Only a
/// directory that holds nothing but an earlier devnet's nodes is removed;
/// anything else there is refused, so a mistyped `--dir` never costs data.
/// Returns whether an earlier devnet is resumed.
fn prepare_dir(dir: &Path, resume: bool) -> Result<bool> {
    let entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    if entries.is_empty() {
        return Ok(false);
    }
    let mut nodes = 0;
    for entry in &entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_node = name
            .strip_prefix("node-")
            .is_some_and(|n| n.parse::<usize>().is_ok())
            && entry.path().join(crate::common::datadir::KEY_FILE).exists();
        if is_node {
            nodes += 1;
        } else if name != "tornet" {
            bail!(
                "--dir {} is not empty and is not a devnet directory (it holds {name:?}); give another --dir, or empty it",
                dir.display()
            );
        }
    }
    if resume {
        println!(
            "resuming the devnet in {} ({nodes} nodes from an earlier run): they keep their keys and ledgers; a training job already on the ledger is not submitted again",
            dir.display()
        );
        return Ok(nodes > 0);
    }
    println!(
        "{} holds an earlier devnet ({nodes} nodes); removing it to start a fresh network (--resume keeps it)",
        dir.display()
    );
    for entry in entries {
        std::fs::remove_dir_all(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
    }
    Ok(false)
}

/// What became of the devnet's training job.
#[derive(Debug, Clone, PartialEq)]
enum Learning {
    /// `--no-learning`.
    Off,
    /// Not submitted yet: consensus has not committed a block.
    Waiting,
    /// Submitted in this run, or found on a resumed ledger.
    Job(String),
    /// The submission failed.
    Failed(String),
}

/// The job a devnet trains.
pub const DEVNET_JOB: &str = include_str!("../../../configs/digits-job.toml");

/// One child daemon of a local network.
pub(crate) struct Node {
    pub(crate) index: usize,
    pub(crate) data_dir: DataDir,
    child: Child,
    exited: Option<String>,
    pub(crate) client: Option<ApiClient>,
    last_status: Option<Value>,
    last_jobs: Option<Value>,
}

impl Node {
    /// The node's process id while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops this node as `stop_all` does (SIGTERM, then SIGKILL after the
    /// grace period); returns whether it exited cleanly.
    pub(crate) async fn stop(&mut self) -> bool {
        let clean = stop_all(std::slice::from_mut(self)).await;
        self.exited = Some("stopped".into());
        self.client = None;
        clean
    }

    /// Starts this node again with the configuration it first ran with
    /// and waits until its API answers.
    pub(crate) async fn restart(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("locating the openagi binary")?;
        let _ = std::fs::remove_file(self.data_dir.file(crate::common::datadir::API_ADDR_FILE));
        let config = self.data_dir.file("devnet.toml");
        self.child = spawn_daemon(&exe, &self.data_dir, &config, &[])
            .with_context(|| format!("restarting node {}", self.index))?;
        self.exited = None;
        self.client = None;
        wait_for_apis(std::slice::from_mut(self), Duration::from_secs(30)).await
    }
}

/// Most full nodes one machine's devnet or benchmark starts: 128 daemons
/// of about 30 MiB each fit a workstation; more are better measured in
/// another way.
pub(crate) const MAX_FULL_NODES: usize = 128;

pub(crate) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

pub(crate) fn write_node_config(
    path: &Path,
    p2p_port: u16,
    bootstrap: Option<&str>,
    arti_config: Option<&Path>,
    shard: Option<(usize, usize)>,
    extra: &str,
) -> Result<()> {
    // Validators train on their shard of the digits; full nodes hold no
    // training data (they take part in no job yet).
    let learn = match shard {
        Some((index, count)) => format!(
            "[learn]\ndata = \"digits\"\nshard = \"{}/{count}\"\njoin = \"fitting\"\n",
            index + 1
        ),
        None => String::new(),
    };
    let bootstrap = bootstrap.map(|b| format!("{b:?}")).unwrap_or_default();
    let (transport, tor) = match arti_config {
        Some(arti) => (
            "tor",
            format!(
                "[tor]\narti_config = {:?}\nconnect_timeout_secs = 30\n",
                arti.display().to_string()
            ),
        ),
        None => ("direct", String::new()),
    };
    let text = format!(
        "# Written by `openagi devnet`; rewritten on every devnet start.\n\
         [network]\n\
         network_id = \"{DEVNET_NETWORK_ID}\"\n\
         transport = \"{transport}\"\n\
         listen = [\"/ip4/127.0.0.1/tcp/{p2p_port}\"]\n\
         bootstrap = [{bootstrap}]\n\
         announce_interval_secs = 2\n\
         redial_max_secs = 5\n\
         [api]\n\
         listen = \"127.0.0.1:0\"\n\
         [log]\n\
         level = \"info\"\n\
         {learn}\
         {tor}\
         {extra}"
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Starts `openagi run` on `data_dir` with `config` and extra environment
/// variables, its output in the data directory's `daemon.log`; the child
/// exits with this process and is killed when dropped.
pub(crate) fn spawn_daemon(
    exe: &Path,
    data_dir: &DataDir,
    config: &Path,
    env: &[(&str, String)],
) -> Result<Child> {
    let log = std::fs::File::create(data_dir.file("daemon.log"))?;
    let mut command = Command::new(exe);
    command
        .arg("run")
        .arg("--data-dir")
        .arg(data_dir.path())
        .arg("--config")
        .arg(config)
        .arg("--exit-with-parent")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    Ok(command.spawn()?)
}

/// Initialises `count` validator data directories under `dir` sharing one
/// genesis, starts each as an `openagi run` child process with `extra`
/// appended to its config, and waits until every API answers. With `tor`,
/// a private Tor network is started first and the nodes reach each other
/// through onion services only; it must be kept alive as long as they run.
pub(crate) async fn start_local_network(
    dir: &Path,
    count: usize,
    full_nodes: usize,
    extra: &str,
    tor: bool,
    consensus: crate::common::genesis::GenesisConsensus,
) -> Result<(Vec<Node>, Option<openagi_tornet::TorNet>)> {
    if count == 0 || count > 64 {
        bail!("--nodes must be between 1 and 64 (got {count})");
    }
    if full_nodes > MAX_FULL_NODES {
        bail!("--full-nodes must be at most {MAX_FULL_NODES} (got {full_nodes})");
    }
    let validator_count = count;
    let count = count + full_nodes;
    let exe = std::env::current_exe().context("locating the openagi binary")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    // Every node is a validator: one genesis listing all their keys.
    let dirs: Vec<DataDir> = (0..count)
        .map(|i| DataDir::new(dir.join(format!("node-{i}"))))
        .collect();
    let mut reports = Vec::with_capacity(dirs.len());
    let mut validators = Vec::with_capacity(dirs.len());
    for d in &dirs {
        // Devnet keys are unencrypted: the nodes start unattended.
        let no_passphrase = PassphraseSource::current(None);
        let settings = crate::common::datadir::InitSettings {
            network_id: Some(DEVNET_NETWORK_ID.into()),
            transport: Some(if tor {
                crate::common::config::InitTransport::Tor
            } else {
                crate::common::config::InitTransport::Direct
            }),
        };
        reports.push(d.init(&settings, &no_passphrase, false)?);
        if validators.len() < validator_count {
            validators.push(d.identity(&no_passphrase)?.public().to_hex());
        }
    }
    let genesis = Genesis {
        network_id: DEVNET_NETWORK_ID.into(),
        validators,
        consensus,
    };
    for (index, d) in dirs.iter().enumerate() {
        let path = d.file(GENESIS_FILE);
        if path.exists() && Genesis::load(&path).ok().as_ref() != Some(&genesis) {
            // The validator set changed (another --nodes): the old ledger
            // belongs to another chain.
            println!("node-{index}: validator set changed; starting a fresh ledger");
            std::fs::remove_file(d.file(crate::common::store::STORE_FILE)).ok();
            std::fs::remove_file(d.file(crate::common::store::TX_INDEX_FILE)).ok();
        }
        std::fs::write(&path, genesis.to_toml()?)?;
    }

    let tornet = if tor {
        let net_dir = dir.join("tornet");
        if net_dir.exists() {
            std::fs::remove_dir_all(&net_dir)
                .with_context(|| format!("removing the old {}", net_dir.display()))?;
        }
        println!(
            "starting a private Tor network in {} (30-60 s)...",
            net_dir.display()
        );
        let net = tokio::task::spawn_blocking(move || {
            openagi_tornet::TorNet::start(&net_dir, &openagi_tornet::TorNetOptions::default())
        })
        .await
        .context("starting the private Tor network")??;
        println!(
            "private Tor network ready after {:.1} s",
            net.ready_after.as_secs_f64()
        );
        Some(net)
    } else {
        None
    };

    let mut bootstrap = None;
    let mut nodes = Vec::with_capacity(count);
    for (index, (data_dir, report)) in dirs.into_iter().zip(reports).enumerate() {
        let _ = std::fs::remove_file(data_dir.file(crate::common::datadir::API_ADDR_FILE));
        let port = if index == 0 { free_port()? } else { 0 };
        let config = data_dir.file("devnet.toml");
        write_node_config(
            &config,
            port,
            bootstrap.as_deref(),
            tornet.as_ref().map(|t| t.arti_toml.as_path()),
            (index < validator_count).then_some((index, validator_count)),
            extra,
        )?;
        if index == 0 && tornet.is_none() {
            bootstrap = Some(format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", report.peer_id));
        }
        let child = spawn_daemon(&exe, &data_dir, &config, &[])
            .with_context(|| format!("starting node {index}"))?;
        nodes.push(Node {
            index,
            data_dir,
            child,
            exited: None,
            client: None,
            last_status: None,
            last_jobs: None,
        });
        if index == 0 && tornet.is_some() {
            // Peers bootstrap from node 0's onion address, which exists
            // once its onion service is launched.
            wait_for_apis(&mut nodes[..1], Duration::from_secs(30)).await?;
            bootstrap = Some(onion_bootstrap(&nodes[0]).await?);
        }
    }
    wait_for_apis(&mut nodes, Duration::from_secs(30)).await?;
    Ok((nodes, tornet))
}

/// Runs the devnet until Ctrl-C (or `duration`), then stops every node.
pub async fn run(options: DevnetOptions) -> Result<()> {
    let started = Instant::now();
    let resumed = prepare_dir(&options.dir, options.resume)?;
    if options.join > MAX_FULL_NODES {
        bail!(
            "--join must be at most {MAX_FULL_NODES} (got {})",
            options.join
        );
    }
    let (mut nodes, _tornet) = start_local_network(
        &options.dir,
        options.nodes,
        options.full_nodes + options.join,
        "",
        options.tor,
        devnet_consensus(),
    )
    .await?;
    // The joiners are the last nodes; each runs `openagi validator join`
    // once consensus runs.
    let joiners: Vec<usize> = (options.nodes + options.full_nodes..nodes.len()).collect();
    let mut joins: Vec<Join> = Vec::new();
    println!(
        "Open-AGI devnet: {} nodes in {}",
        options.nodes,
        options.dir.display()
    );
    for node in &nodes {
        if let Some(client) = &node.client {
            println!(
                "  node-{}  api {}/api/v1/status  metrics {}/metrics  log {}",
                node.index,
                client.base_url(),
                client.base_url(),
                node.data_dir.file("daemon.log").display()
            );
        }
    }
    println!("  token for each node's API: <node dir>/api.token. Ctrl-C stops the devnet.");
    match crate::cli::dashboard::login_link(&nodes[0].data_dir) {
        Ok(link) => println!(
            "  dashboard of node-0 (opens once, within {} minutes; `openagi dashboard --data-dir {}` makes another):\n    {}",
            link.expires_in_secs / 60,
            nodes[0].data_dir.path().display(),
            link.url
        ),
        Err(e) => println!("  dashboard of node-0: no login link ({e:#})"),
    }
    let load = (options.tx_rate > 0).then(|| {
        let clients: Vec<ApiClient> = nodes.iter().filter_map(|n| n.client.clone()).collect();
        spawn_load(clients, options.tx_rate)
    });

    let mut learning = if options.learning {
        Learning::Waiting
    } else {
        Learning::Off
    };
    // A resumed ledger may already hold the job; the learning service
    // reads it from the ledger after start, so give it a few ticks.
    let mut ticks_with_consensus = 0u32;
    let mut start_height = None;
    let interactive = std::io::stdout().is_terminal();
    let mut all_connected_after: Option<Duration> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_plain_print = Instant::now() - Duration::from_secs(60);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep_until_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until_deadline);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = &mut sleep_until_deadline => break,
            _ = tick.tick() => {
                refresh(&mut nodes).await;
                if start_height.is_none() {
                    start_height = nodes.first().and_then(|n| n.last_status.as_ref()).map(|s| s["ledger"]["height"].as_u64().unwrap_or(0));
                }
                if joins.is_empty() && !joiners.is_empty() && consensus_running(&nodes) {
                    joins = start_joins(&nodes, &joiners);
                }
                for join in &mut joins {
                    if let Some(line) = join.poll() {
                        println!("{line}");
                    }
                }
                if learning == Learning::Waiting && consensus_running(&nodes) {
                    ticks_with_consensus += 1;
                    let existing = resumed.then(|| devnet_job_on_ledger(&nodes)).flatten();
                    if let Some(id) = existing {
                        println!("the ledger already holds the digits training job {id}; not submitting it again");
                        learning = Learning::Job(id);
                    } else if !resumed || ticks_with_consensus >= 3 {
                        learning = submit_job(&nodes).await;
                    }
                }
                let expected = options.nodes.saturating_sub(1);
                if all_connected_after.is_none()
                    && nodes.iter().all(|n| peer_count(n) >= expected && n.exited.is_none())
                {
                    let after = started.elapsed();
                    all_connected_after = Some(after);
                    if !interactive {
                        println!("all {} nodes connected to each other after {:.1} s", options.nodes, after.as_secs_f64());
                    }
                }
                if interactive {
                    print!("\x1b[2J\x1b[H{}", render(&nodes, started.elapsed(), all_connected_after));
                    let _ = std::io::stdout().flush();
                } else if last_plain_print.elapsed() >= Duration::from_secs(5) {
                    last_plain_print = Instant::now();
                    print!("{}", render(&nodes, started.elapsed(), all_connected_after));
                }
            }
        }
    }

    if let Some((stop, handle)) = load {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = handle.join();
    }
    for join in &mut joins {
        join.stop();
    }
    // The last figures, read while the nodes still answer.
    refresh(&mut nodes).await;
    let summary = final_summary(&nodes, &learning, started.elapsed(), start_height);
    println!("stopping {} nodes...", nodes.len());
    let clean = stop_all(&mut nodes).await;
    if let Some(after) = all_connected_after {
        println!(
            "all {} nodes had connected to each other after {:.1} s",
            options.nodes + options.full_nodes,
            after.as_secs_f64()
        );
    }
    print!("{summary}");
    if !clean {
        bail!("some nodes did not stop cleanly; see their daemon.log files");
    }
    println!(
        "devnet stopped; its data stays in {} (`openagi devnet --resume` continues it, a plain `openagi devnet` starts afresh)",
        options.dir.display()
    );
    Ok(())
}

/// A node joining the validator set: its `openagi validator join` run.
struct Join {
    index: usize,
    child: Option<std::process::Child>,
}

/// Starts `openagi validator join` for each of `joiners`.
fn start_joins(nodes: &[Node], joiners: &[usize]) -> Vec<Join> {
    let exe = std::env::current_exe().ok();
    joiners
        .iter()
        .filter_map(|index| nodes.get(*index))
        .map(|node| {
            let child = exe.as_ref().and_then(|exe| {
                let log = std::fs::File::create(node.data_dir.file("join.log")).ok()?;
                let err = log.try_clone().ok()?;
                std::process::Command::new(exe)
                    .args([
                        "validator",
                        "join",
                        "--json",
                        "--threads",
                        "1",
                        "--data-dir",
                    ])
                    .arg(node.data_dir.path())
                    .stdin(std::process::Stdio::null())
                    .stdout(log)
                    .stderr(err)
                    .spawn()
                    .ok()
            });
            println!(
                "node-{}: joining the validator set (solving the proof of computation; log in {})",
                node.index,
                node.data_dir.file("join.log").display()
            );
            Join {
                index: node.index,
                child,
            }
        })
        .collect()
}

impl Join {
    /// A line to print once the join has finished.
    fn poll(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(if status.success() {
            format!("node-{}: joined the validator set and votes", self.index)
        } else {
            format!(
                "node-{}: the join failed ({status}); see its join.log",
                self.index
            )
        })
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The devnet job's id (shortened) when node 0's ledger holds it.
fn devnet_job_on_ledger(nodes: &[Node]) -> Option<String> {
    let name = toml::from_str::<openagi_learning::federation::JobSpec>(DEVNET_JOB)
        .ok()?
        .name;
    nodes
        .first()?
        .last_jobs
        .as_ref()?
        .get("jobs")?
        .as_array()?
        .iter()
        .map(|job| crate::cli::learn_jobs::JobSummary::of(job, 8))
        .find(|job| job.name == name)
        .map(|job| job.id)
}

/// What the devnet did, printed when it stops: blocks, transactions and
/// the training job's outcome, from node 0's last status (another node's
/// when node 0 is down).
fn final_summary(
    nodes: &[Node],
    learning: &Learning,
    elapsed: Duration,
    start_height: Option<u64>,
) -> String {
    let status = nodes.iter().find_map(|n| n.last_status.as_ref());
    let jobs = nodes
        .first()
        .and_then(|n| n.last_jobs.as_ref())
        .and_then(|j| j["jobs"].as_array().cloned())
        .unwrap_or_default();
    summary_text(status, &jobs, learning, elapsed, start_height)
}

fn summary_text(
    status: Option<&Value>,
    jobs: &[Value],
    learning: &Learning,
    elapsed: Duration,
    start_height: Option<u64>,
) -> String {
    let mut out = format!(
        "devnet summary after {} s:
",
        elapsed.as_secs()
    );
    match status {
        Some(s) => {
            let height = s["ledger"]["height"].as_u64().unwrap_or(0);
            let earlier = start_height
                .filter(|h| *h > 0)
                .map(|h| format!(" ({} in this run)", height.saturating_sub(h)))
                .unwrap_or_default();
            out.push_str(&format!("  blocks        {height}{earlier}\n"));
            out.push_str(&format!(
                "  transactions  {} committed in this run\n",
                s["consensus"]["committed_txs"].as_u64().unwrap_or(0)
            ));
        }
        None => out.push_str("  blocks        unknown: no node answered at the end\n"),
    }
    let outcome = match learning {
        Learning::Off => "off (--no-learning)".to_string(),
        Learning::Waiting => {
            "not submitted: consensus committed no block before the devnet stopped".to_string()
        }
        Learning::Failed(why) => format!("not submitted: {why}"),
        Learning::Job(id) => {
            match jobs
                .iter()
                .map(|job| (job, crate::cli::learn_jobs::JobSummary::of(job, 8)))
                .find(|(_, j)| j.id == *id)
            {
                None => format!("job {id}: not on node-0's ledger yet"),
                Some((job, j)) => {
                    let results = format!(
                        "accuracy {}, ε {}",
                        j.accuracy,
                        j.epsilon.as_deref().unwrap_or("- (no DP)")
                    );
                    match j.state.as_str() {
                        "finished" if j.round < j.rounds => format!(
                            "{} ({id}) finished after {} of {} rounds (its privacy budget was spent): {results}",
                            j.name, j.round, j.rounds
                        ),
                        "finished" => format!(
                            "{} ({id}) finished all {} rounds: {results}",
                            j.name, j.rounds
                        ),
                        "running" => format!(
                            "{} ({id}) did not finish: the devnet stopped after round {} of {}: {results}",
                            j.name, j.round, j.rounds
                        ),
                        "gathering" => format!(
                            "{} ({id}) did not start: {}",
                            j.name,
                            job["waiting_for"]
                                .as_str()
                                .unwrap_or("it was waiting for joins")
                        ),
                        "interrupted" => format!(
                            "{} ({id}) did not finish: its coordinator, node-0, was restarted (a resumed devnet does not continue a job; start without --resume for a new one); after round {}: {results}",
                            j.name, j.round
                        ),
                        other => format!(
                            "{} ({id}) {other} at round {} of {}: {results}",
                            j.name, j.round, j.rounds
                        ),
                    }
                }
            }
        }
    };
    out.push_str(&format!("  learning      {outcome}\n"));
    out
}

/// Submits `rate` transactions a second, round-robin over `clients`, from
/// a thread of its own until told to stop.
fn spawn_load(
    clients: Vec<ApiClient>,
    rate: u32,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let started = Instant::now();
        let mut sent: u64 = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && !clients.is_empty() {
            let client = &clients[(sent % clients.len() as u64) as usize];
            let body = serde_json::json!({ "payload": format!("devnet transfer #{sent}") });
            // A node that is down or refusing is shown in the summary; the
            // load just moves on.
            let _ = client.post_json("/api/v1/tx", &body);
            sent += 1;
            let due = started + interval.mul_f64(sent as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    });
    (stop, handle)
}

/// Whether node 0 has committed a block (so a job record can commit).
fn consensus_running(nodes: &[Node]) -> bool {
    nodes
        .first()
        .and_then(|n| n.last_status.as_ref())
        .is_some_and(|s| s["ledger"]["height"].as_u64().unwrap_or(0) > 0)
}

/// Submits the devnet's training job through node 0.
async fn submit_job(nodes: &[Node]) -> Learning {
    let Some(client) = nodes.first().and_then(|n| n.client.clone()) else {
        return Learning::Failed("node-0 has no API".into());
    };
    let answer = tokio::task::spawn_blocking(move || -> Result<Value> {
        let spec: openagi_learning::federation::JobSpec =
            toml::from_str(DEVNET_JOB).context("the devnet job spec")?;
        client.post_json("/api/v1/learn/jobs", &serde_json::to_value(&spec)?)
    })
    .await;
    let why = match answer {
        Ok(Ok(a)) => {
            let id = a["job_id"].as_str().unwrap_or("?");
            println!("submitted the digits training job {id} through node-0");
            return Learning::Job(id.get(..8).unwrap_or(id).to_string());
        }
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => e.to_string(),
    };
    println!("the training job was not submitted: {why}");
    Learning::Failed(why)
}

fn peer_count(node: &Node) -> usize {
    node.last_status
        .as_ref()
        .and_then(|s| s["network"]["connected_peers"].as_u64())
        .unwrap_or(0) as usize
}

/// Node 0's onion multiaddr with its peer id, from its status document.
async fn onion_bootstrap(node: &Node) -> Result<String> {
    let client = node.client.clone().context("node-0 API")?;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let c = client.clone();
        let status = tokio::task::spawn_blocking(move || c.get_json("/api/v1/status").ok())
            .await
            .ok()
            .flatten();
        if let Some(status) = status
            && let (Some(onion), Some(peer)) = (
                status["tor"]["onion_multiaddr"].as_str(),
                status["node"]["peer_id"].as_str(),
            )
        {
            return Ok(format!("{onion}/p2p/{peer}"));
        }
        if Instant::now() > until {
            bail!("node-0 reported no onion address within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_apis(nodes: &mut [Node], limit: Duration) -> Result<()> {
    let until = Instant::now() + limit;
    loop {
        let mut missing = 0;
        for node in nodes.iter_mut() {
            if node.client.is_some() {
                continue;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                bail!(
                    "node-{} exited during start-up ({status}); see {}",
                    node.index,
                    node.data_dir.file("daemon.log").display()
                );
            }
            match ApiClient::from_data_dir(&node.data_dir) {
                Ok(client) => node.client = Some(client),
                Err(_) => missing += 1,
            }
        }
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "{missing} nodes did not start their API within {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn refresh(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        if node.exited.is_none()
            && let Ok(Some(status)) = node.child.try_wait()
        {
            node.exited = Some(status.to_string());
            node.last_status = None;
        }
    }
    let queries: Vec<_> = nodes
        .iter()
        .map(|n| {
            let client = n.client.clone().filter(|_| n.exited.is_none());
            tokio::task::spawn_blocking(move || {
                client.and_then(|c| c.get_json("/api/v1/status").ok())
            })
        })
        .collect();
    for (node, query) in nodes.iter_mut().zip(queries) {
        node.last_status = query.await.ok().flatten();
    }
    if let Some(node) = nodes.first_mut() {
        let client = node.client.clone().filter(|_| node.exited.is_none());
        node.last_jobs = tokio::task::spawn_blocking(move || {
            client.and_then(|c| c.get_json("/api/v1/learn/jobs").ok())
        })
        .await
        .ok()
        .flatten();
    }
}

fn short(peer_id: &str) -> String {
    let n = peer_id.len();
    if n <= 16 {
        peer_id.to_string()
    } else {
        format!("{}…{}", &peer_id[..8], &peer_id[n - 6..])
    }
}

fn render(nodes: &[Node], elapsed: Duration, connected_after: Option<Duration>) -> String {
    // The validator-set epoch the first node answering is in (the join
    // and leave of validators move it).
    let epoch = nodes
        .iter()
        .filter_map(|n| n.last_status.as_ref())
        .find_map(|s| s["consensus"]["epoch"].as_u64())
        .unwrap_or(0);
    let mut out = format!(
        "Open-AGI devnet · {} nodes · network {DEVNET_NETWORK_ID} · epoch {epoch} · up {}s · Ctrl-C stops\n\n",
        nodes.len(),
        elapsed.as_secs()
    );
    out.push_str(&format!(
        "{:<7} {:<18} {:>6} {:>8} {:>5} {:>9} {:>10} {:>8}  {}\n",
        "node", "peer id", "peers", "height", "view", "txs", "gossip rx", "uptime", "api"
    ));
    for node in nodes {
        let api = node
            .client
            .as_ref()
            .map(|c| c.base_url().to_string())
            .unwrap_or_default();
        match (&node.exited, &node.last_status) {
            (Some(status), _) => out.push_str(&format!(
                "node-{:<2} EXITED ({status}); log: {}\n",
                node.index,
                node.data_dir.file("daemon.log").display()
            )),
            (None, Some(s)) => {
                // A full node votes in no view and commits nothing itself.
                let (view, txs) = if s["consensus"]["role"] == "full" {
                    ("full".to_string(), "-".to_string())
                } else {
                    (
                        s["consensus"]["view"].as_u64().unwrap_or(0).to_string(),
                        s["consensus"]["committed_txs"]
                            .as_u64()
                            .unwrap_or(0)
                            .to_string(),
                    )
                };
                out.push_str(&format!(
                    "node-{:<2} {:<18} {:>6} {:>8} {:>5} {:>9} {:>10} {:>7}s  {api}\n",
                    node.index,
                    short(s["node"]["peer_id"].as_str().unwrap_or("?")),
                    s["network"]["connected_peers"].as_u64().unwrap_or(0),
                    s["ledger"]["height"].as_u64().unwrap_or(0),
                    view,
                    txs,
                    s["network"]["gossip_received"].as_u64().unwrap_or(0),
                    s["node"]["uptime_secs"].as_u64().unwrap_or(0),
                ))
            }
            (None, None) => {
                out.push_str(&format!("node-{:<2} (not answering)  {api}\n", node.index))
            }
        }
    }
    let jobs = nodes
        .first()
        .and_then(|n| n.last_jobs.as_ref())
        .and_then(|j| j["jobs"].as_array().cloned())
        .unwrap_or_default();
    for job in jobs {
        let j = crate::cli::learn_jobs::JobSummary::of(&job, 8);
        out.push_str(&format!(
            "\nlearning: {} ({}) {} · round {}/{} · accuracy {} · ε {} · {} joined · stragglers {}",
            j.name,
            j.id,
            j.state,
            j.round,
            j.rounds,
            j.accuracy,
            j.epsilon.as_deref().unwrap_or("- (no DP)"),
            j.joined,
            j.stragglers,
        ));
    }
    out.push('\n');
    match connected_after {
        Some(d) => out.push_str(&format!(
            "\nall nodes connected after {:.1} s\n",
            d.as_secs_f64()
        )),
        None => out.push_str("\nwaiting for all nodes to connect...\n"),
    }
    out
}

/// Sends SIGTERM to every node and waits for each to exit; kills
/// stragglers. Returns whether all exited cleanly.
pub(crate) async fn stop_all(nodes: &mut [Node]) -> bool {
    for node in nodes.iter() {
        if node.exited.is_none()
            && let Some(pid) = node.child.id()
        {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let until = tokio::time::Instant::now() + STOP_GRACE;
    let mut clean = true;
    for node in nodes.iter_mut() {
        if let Some(status) = &node.exited {
            println!("  node-{} had already exited ({status})", node.index);
            clean = false;
            continue;
        }
        match tokio::time::timeout_at(until, node.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                println!("  node-{} exited with {status}", node.index);
                clean = false;
            }
            Ok(Err(e)) => {
                println!("  node-{}: {e}", node.index);
                clean = false;
            }
            Err(_) => {
                println!(
                    "  node-{} did not stop in {} s; killing it",
                    node.index,
                    STOP_GRACE.as_secs()
                );
                let _ = node.child.kill().await;
                clean = false;
            }
        }
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, round: u64, rounds: u64) -> Value {
        serde_json::json!({
            "job_id": "0123456789abcdef",
            "name": "digits-logreg",
            "state": state,
            "rounds": rounds,
            "joined": 4,
            "history": [{ "round": round, "accuracy": 0.9, "epsilon": 1.5 }],
        })
    }

    #[test]
    fn the_summary_says_what_the_devnet_did() {
        let status = serde_json::json!({
            "ledger": { "height": 40 },
            "consensus": { "committed_txs": 300 },
        });
        let elapsed = Duration::from_secs(61);
        let id = Learning::Job("01234567".into());
        let text = summary_text(
            Some(&status),
            &[job("finished", 20, 20)],
            &id,
            elapsed,
            Some(0),
        );
        assert!(text.contains("after 61 s"), "{text}");
        assert!(text.contains("blocks        40\n"), "{text}");
        assert!(text.contains("transactions  300 committed"), "{text}");
        assert!(
            text.contains("finished all 20 rounds: accuracy 90.0%, ε 1.5"),
            "{text}"
        );
        let text = summary_text(
            Some(&status),
            &[job("running", 5, 20)],
            &id,
            elapsed,
            Some(30),
        );
        assert!(text.contains("40 (10 in this run)"), "{text}");
        assert!(
            text.contains("did not finish: the devnet stopped after round 5 of 20"),
            "{text}"
        );
        let text = summary_text(Some(&status), &[job("finished", 7, 20)], &id, elapsed, None);
        assert!(text.contains("privacy budget"), "{text}");
        let text = summary_text(Some(&status), &[], &Learning::Waiting, elapsed, None);
        assert!(text.contains("consensus committed no block"), "{text}");
        let text = summary_text(None, &[], &Learning::Off, elapsed, None);
        assert!(
            text.contains("no node answered") && text.contains("--no-learning"),
            "{text}"
        );
    }

    #[test]
    fn only_an_earlier_devnet_is_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("devnet");
        assert!(!prepare_dir(&dir, false).expect("missing is fine"));
        let node = dir.join("node-0");
        std::fs::create_dir_all(&node).expect("mkdir");
        std::fs::write(node.join(crate::common::datadir::KEY_FILE), "x").expect("write");
        assert!(prepare_dir(&dir, true).expect("resume"));
        assert!(node.exists(), "--resume keeps the nodes");
        assert!(!prepare_dir(&dir, false).expect("fresh"));
        assert!(!node.exists(), "a fresh devnet removes the old nodes");
        std::fs::write(dir.join("notes.txt"), "mine").expect("write");
        let e = prepare_dir(&dir, false).expect_err("not a devnet");
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert!(dir.join("notes.txt").exists());
    }
}
