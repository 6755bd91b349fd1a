//! `openagi run`: the daemon's life cycle.
//!
//! Start-up order matters: configuration and logging first (so every later
//! failure is reported properly), then the data-directory lock (so two
//! daemons never share a database), the store, the network, and last the
//! API, whose address file tells `openagi status` the daemon is ready.
//! Shutdown runs the other way round within a bounded time.
//!
//! The services it starts are its submodules: the consensus driver, the
//! learning service, the messenger, the transaction index and the HTTP
//! API with the server under it.

pub mod api;
pub mod consensus;
pub mod dashboard;
pub mod federation;
pub mod follower;
pub mod http;
pub mod mesh;
pub mod msg;
pub mod role;
pub mod txindex;
pub mod validator_api;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openagi_dashboard::MetricsRegistry;
use openagi_keyfiles::keyfile;
use openagi_net::{AppProtocol, NetEvent, NetworkService};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::common::config::{CliOverrides, Config, LogFormat, LogSection};
use crate::common::datadir::{API_ADDR_FILE, DataDir};
use crate::common::genesis::{GENESIS_FILE, Genesis};
use crate::common::passphrase::PassphraseSource;
use crate::common::store::Store;
use crate::common::version::{VERSION, build_info};
use api::ApiState;

/// Kept in the data directory (beside the key, outside the database) once
/// this node has run consensus, so that a lost or replaced database is
/// recognised and the replica recovers before it votes again.
const CONSENSUS_MARKER: &str = "consensus.started";

/// How many stored peers are redialled at start.
const REDIAL_KNOWN_PEERS: usize = 16;

/// Options of `openagi run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where the passphrase of an encrypted identity comes from.
    pub passphrase: PassphraseSource,
    /// An explicit configuration file.
    pub config_file: Option<PathBuf>,
    /// Settings given as flags.
    pub overrides: CliOverrides,
    /// Stop when this process is no longer our parent (used by `devnet`
    /// so that no node outlives it, even if it is killed).
    pub exit_with_parent: Option<u32>,
    /// Upgrade an older database schema before starting (refused without).
    pub migrate: bool,
}

/// Loads the configuration for `options` from all layers.
pub fn load_config(options: &RunOptions) -> Result<Config> {
    Ok(Config::load(
        &options.data_dir,
        options.config_file.as_deref(),
        std::env::vars(),
        &options.overrides,
    )?)
}

/// Installs the global `tracing` subscriber: stderr, and when `log.file`
/// is set a second copy of each event for the log file, which
/// [`crate::common::logfile::attach`] opens once the data directory is locked.
pub fn init_logging(log: &LogSection) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Audit events are always kept, whatever the level asked for: they
    // also go to the audit log (`common::audit`).
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .with_context(|| format!("log.level = {:?}", log.level))?
        .add_directive(
            "audit=info"
                .parse()
                .context("the audit log's filter directive")?,
        );
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let to_file = !log.file.trim().is_empty();
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(crate::common::audit::AuditLayer);
    // Each format builds its own layers: their types depend on the format.
    // No colour codes in the file, whatever stderr is.
    let installed = match log.format {
        LogFormat::Json => {
            let stderr = tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .json()
                .flatten_event(true);
            let file = to_file.then(|| {
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(crate::common::logfile::AttachedFile)
                    .json()
                    .flatten_event(true)
            });
            registry.with(stderr).with(file).try_init()
        }
        LogFormat::Pretty => {
            let stderr = tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr);
            let file = to_file.then(|| {
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(crate::common::logfile::AttachedFile)
            });
            registry.with(stderr).with(file).try_init()
        }
    };
    installed.map_err(|e| anyhow::anyhow!("installing logger: {e}"))
}

/// BLAKE3 of the effective configuration, so the audit log shows when it
/// changed between two starts.
fn config_fingerprint(config: &Config) -> String {
    match toml::to_string(config) {
        Ok(text) => blake3::hash(text.as_bytes()).to_hex().to_string(),
        Err(e) => format!("unavailable: {e}"),
    }
}

fn unix_now() -> u64 {
    crate::unix_ms() / 1000
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: RunOptions, config: Config, started: Instant) -> Result<()> {
    let data_dir = DataDir::new(&options.data_dir);
    // A write past a file-size limit (`ulimit -f`) raises SIGXFSZ, which
    // kills the process by default; caught, the write fails with EFBIG
    // like a full disk's ENOSPC, and the node handles it as one. The
    // handler stays installed for the life of the process.
    let _file_too_large = signal(SignalKind::from_raw(
        nix::sys::signal::Signal::SIGXFSZ as i32,
    ))
    .context("installing the SIGXFSZ handler")?;
    // Before anything is created in it (the lock file included).
    data_dir.check_private()?;
    let _lock = data_dir.lock()?;
    if let Some(path) = config.log.file_path(data_dir.path()) {
        crate::common::logfile::attach(&path, config.log.max_file_bytes, config.log.max_files)
            .with_context(|| {
                format!(
                    "log.file = {:?}: give a file the daemon can create and write (relative paths are inside {}), or \"\" for stderr only",
                    config.log.file,
                    data_dir.path().display()
                )
            })?;
    }
    let identity = data_dir.identity(&options.passphrase)?;
    crate::common::audit::attach(data_dir.path(), &identity)?;
    if !data_dir.key_format()?.encrypted() {
        warn!(
            key = %data_dir.file(crate::common::datadir::KEY_FILE).display(),
            "the identity key is unencrypted (protected by file mode 0600 only); encrypt it with `openagi keys passphrase`"
        );
    }
    let token = data_dir.token()?;
    let store = if options.migrate {
        let (store, steps) =
            Store::open_migrating(data_dir.path()).context("migrating the database")?;
        for step in &steps {
            info!(step = %step, "database migrated");
        }
        if steps.is_empty() {
            info!("--migrate: the database already has the current schema");
        }
        store
    } else {
        Store::open(data_dir.path()).context("opening the database")?
    };
    let store = Arc::new(store);
    let starts = store.record_start().context("recording start")?;
    info!(
        target: "audit",
        event = "daemon_started",
        version = crate::common::version::VERSION,
        start = starts,
        network_id = %config.network.network_id,
        transport = ?config.network.transport,
        api_listen = %config.api.listen,
        config_blake3 = %config_fingerprint(&config),
        "daemon started; its configuration is in the audit log"
    );

    let mut metrics = MetricsRegistry::new(&build_info());
    // A setting the transport does not use would otherwise be dropped
    // without a word (e.g. network.listen in Tor mode).
    for ignored in config.ignored_settings() {
        warn!(key = ignored.key, "{}", ignored.why);
    }
    let mut net_config = config.net_config_for(VERSION, data_dir.path())?;
    // A restart pardons no one: the bans still running carry on.
    let now_ms = crate::unix_ms();
    net_config.bans.restored = store
        .bans(now_ms)
        .context("reading the peers banned before this start")?
        .into_iter()
        .filter_map(|(peer, until_ms)| {
            let peer = peer.parse().ok()?;
            Some((peer, Duration::from_millis(until_ms.saturating_sub(now_ms))))
        })
        .collect();
    if !net_config.bans.restored.is_empty() {
        info!(
            peers = net_config.bans.restored.len(),
            "bans from before this start still apply"
        );
    }
    let keypair = openagi_net::keypair_from_identity(&identity)?;
    let (net, mut events, net_task) =
        NetworkService::start(keypair, net_config, metrics.registry_mut())?;
    info!(peer_id = %net.local_peer_id(), network_id = %config.network.network_id, starts, "node identity loaded");
    if let Some(rate) = flood_rate() {
        warn!(
            messages_per_sec = rate,
            "fault injection ({}): this node floods its peers with garbage",
            crate::common::config::FAULT_FLOOD_ENV
        );
        tokio::spawn(flood(net.clone(), rate));
    }
    let messenger = msg::Messenger::start(
        &identity,
        store.clone(),
        net.clone(),
        metrics.registry_mut(),
    )
    .context("starting messaging")?;
    let mesh_clock = mesh::spawn_mesh_clock(messenger.clone());

    let (stop_consensus, consensus_stopping) = tokio::sync::watch::channel(false);
    let genesis_path = data_dir.file(GENESIS_FILE);
    // The node's part in the ledger: validator or full node by the chain it
    // holds, switched while it runs when the chain adds or removes it.
    let mut ledger: Option<role::Ledger> = None;
    let mut ledger_task: Option<role::PartTask> = None;
    // A change of part replays the stored chain; it runs off this loop.
    let mut switching: Option<
        tokio::task::JoinHandle<(role::Ledger, anyhow::Result<Option<role::PartTask>>)>,
    > = None;
    let ledger_role = if genesis_path.exists() {
        let genesis = Genesis::load(&genesis_path)?;
        if genesis.network_id != config.network.network_id {
            anyhow::bail!(
                "{} is for network {:?} but network.network_id is {:?}; use the genesis of your network",
                genesis_path.display(),
                genesis.network_id,
                config.network.network_id
            );
        }
        let mut replica_config = config.consensus.replica_config(config.network.transport);
        genesis
            .apply_to(&mut replica_config)
            .with_context(|| format!("{} and the config disagree", genesis_path.display()))?;
        let consensus_metrics = consensus::ConsensusMetrics::register(metrics.registry_mut());
        let mut parts = role::Ledger::new(
            genesis,
            &identity,
            replica_config,
            data_dir.file(CONSENSUS_MARKER),
            store.clone(),
            net.clone(),
            consensus_metrics,
            consensus_stopping,
        )?;
        ledger_task = Some(parts.start()?);
        let shared = parts.role.clone();
        ledger = Some(parts);
        shared
    } else {
        info!("no {GENESIS_FILE} in the data directory; running without consensus");
        role::LedgerRole::default()
    };

    let tx_lookup = Arc::new(
        txindex::TxLookup::open(data_dir.path(), store.clone())
            .context("opening the transaction index")?,
    );
    let (stop_indexer, indexer_stopping) = tokio::sync::watch::channel(false);
    let indexer_task = txindex::start(
        tx_lookup.clone(),
        ledger_role.has_ledger().then(|| ledger_role.subscribe()),
        indexer_stopping,
    );

    let ledger_access = ledger_role.has_ledger().then(|| follower::LedgerAccess {
        role: ledger_role.clone(),
        net: net.clone(),
    });
    let (learner, learner_task) = federation::Learner::start(
        &identity,
        store.clone(),
        net.clone(),
        ledger_access,
        &config.learn,
        data_dir.path(),
        metrics.registry_mut(),
    )
    .context("starting federated learning")?;

    for (peer_id, known) in store.known_peers(REDIAL_KNOWN_PEERS)? {
        if let Some(addr) = known.addresses.first().and_then(|a| a.parse().ok()) {
            tracing::debug!(%peer_id, %addr, "redialling known peer");
            net.dial(addr).await?;
        }
    }

    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| {
            format!(
                "binding the API to {} (set api.listen to a free address)",
                config.api.listen
            )
        })?;
    let api_addr = listener.local_addr()?;
    let dashboard = dashboard::Dashboard::new(metrics.registry_mut(), &api_addr.to_string());
    let auth_failures = prometheus_client::metrics::counter::Counter::default();
    metrics.registry_mut().register(
        "api_auth_failures",
        "API requests refused for a missing or wrong token",
        auth_failures.clone(),
    );
    let state = Arc::new(ApiState {
        auth_failures,
        net: net.clone(),
        ledger: ledger_role.clone(),
        identity: Arc::new(openagi_crypto::Identity::from_seed(&identity.seed())),
        store: store.clone(),
        tx_lookup,
        metrics,
        token,
        draining: AtomicBool::new(false),
        started,
        network_id: config.network.network_id.clone(),
        transport: crate::common::config::transport_name(config.network.transport).into(),
        api_addr: api_addr.to_string(),
        messenger: messenger.clone(),
        learner: learner.clone(),
        listen_configured: !config.network.listen.is_empty(),
        dashboard,
        data_dir: data_dir.clone(),
    });
    let sampler = dashboard::spawn_sampler(state.clone());
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        listener,
        api::router(state.clone()),
        async move {
            let _ = api_stopped.await;
        },
    ));
    keyfile::write_atomic(
        &data_dir.file(API_ADDR_FILE),
        format!("{api_addr}\n").as_bytes(),
        0o600,
    )?;
    info!(
        api = %api_addr,
        listen = ?net.snapshot().listen_addrs,
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    // The account age is checked often so a node that restarts more often
    // than the rotation period still rotates on time.
    let otk_rotation = Duration::from_secs(config.node.one_time_key_rotation_secs);
    let mut otk_check = tokio::time::interval(otk_rotation.min(Duration::from_secs(60)));
    let mut failure: Option<anyhow::Error> = None;
    let ledger_slots = follower::LedgerSlots::default();
    let ledger_server = follower::LedgerServer::new(
        store.clone(),
        ledger_role.clone(),
        std::fs::read_to_string(data_dir.file(GENESIS_FILE))
            .ok()
            .map(|toml| (config.network.network_id.clone(), toml)),
    );
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = watchdog.tick() => {
                if let Some(parent) = options.exit_with_parent
                    && nix::unistd::getppid().as_raw() as u32 != parent
                {
                    break "parent process exited";
                }
            }
            _ = otk_check.tick() => {
                let messenger = messenger.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = messenger.rotate_if_due(unix_now(), otk_rotation) {
                        tracing::warn!(error = format!("{e:#}"), "one-time key rotation failed; retrying later");
                    }
                });
            }
            event = events.recv() => match event {
                Some(NetEvent::MsgRequest { protocol: AppProtocol::Msg, from, data, reply }) => {
                    // One task per request; the network task caps how many
                    // wait for an answer, so these are bounded too.
                    let messenger = messenger.clone();
                    tokio::spawn(async move { messenger.handle(from, data, reply).await });
                }
                Some(NetEvent::MsgRequest { protocol: AppProtocol::Learn, from, data, reply }) => {
                    let learner = learner.clone();
                    tokio::spawn(async move { learner.handle(from, data, reply).await });
                }
                Some(NetEvent::MsgRequest { protocol: AppProtocol::Ledger, from, data, reply }) => {
                    // A few answers per peer at a time: one peer cannot
                    // take every slot the network task allows.
                    let Some(slot) = ledger_slots.take(from) else {
                        let busy = openagi_consensus::follow::LedgerResponse::Refused(
                            "too many requests from this peer at once".into(),
                        );
                        if let Ok(bytes) = busy.encode() {
                            let _ = net.respond_msg(reply, bytes).await;
                        }
                        continue;
                    };
                    let (server, net) = (ledger_server.clone(), net.clone());
                    tokio::spawn(async move {
                        // Framed right, garbage inside: counted against
                        // the sender (the answer says what was wrong).
                        if openagi_consensus::follow::LedgerRequest::decode(&data).is_err() {
                            net.penalise(from, "ledger", "malformed");
                        }
                        let answer = server.answer(from, &data).await;
                        if let Ok(bytes) = answer.encode() {
                            let _ = net.respond_msg(reply, bytes).await;
                        }
                        drop(slot);
                    });
                }
                Some(NetEvent::PeerConnected(peer)) => messenger.mesh_peer_up(peer),
                Some(NetEvent::PeerDisconnected(peer)) => messenger.mesh_peer_down(peer),
                Some(event) => handle_event(&store, event).await,
                None => break "network task stopped",
            },
            finished = async {
                match ledger_task.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => {
                ledger_task = None;
                match finished {
                    Ok(Ok(role::PartExit::Stopped)) => break "consensus stopped",
                    Ok(Ok(exit)) => match ledger.take() {
                        Some(mut parts) => {
                            switching = Some(tokio::task::spawn_blocking(move || {
                                let started = parts.switch(exit);
                                (parts, started)
                            }));
                        }
                        None => break "consensus stopped",
                    },
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "consensus failed; shutting down rather than voting from unsaved state");
                        failure = Some(anyhow::anyhow!("consensus failed: {e}"));
                        break "consensus failed";
                    }
                    Err(e) => {
                        failure = Some(anyhow::anyhow!("consensus task panicked: {e}"));
                        break "consensus panicked";
                    }
                }
            }
            switched = async {
                match switching.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => {
                switching = None;
                match switched {
                    Ok((parts, Ok(Some(task)))) => {
                        ledger = Some(parts);
                        ledger_task = Some(task);
                    }
                    Ok((_, Ok(None))) => break "consensus stopped",
                    Ok((_, Err(e))) => {
                        tracing::error!(error = format!("{e:#}"), "could not change this node's part in the ledger");
                        failure = Some(e.context("changing this node's part in the ledger"));
                        break "ledger part failed";
                    }
                    Err(e) => {
                        failure = Some(anyhow::anyhow!("changing this node's part in the ledger panicked: {e}"));
                        break "ledger part panicked";
                    }
                }
            }
        }
    };

    info!(%reason, "shutting down");
    state.draining.store(true, Ordering::Relaxed);
    let grace = Duration::from_secs(config.node.shutdown_timeout_secs);
    let drained = tokio::time::timeout(grace, async {
        let _ = stop_api.send(());
        let _ = stop_consensus.send(true);
        learner_task.abort();
        sampler.abort();
        mesh_clock.abort();
        if let Some(task) = switching
            && let Ok((_, Ok(Some(task)))) = task.await
        {
            let _ = task.await;
        }
        if let Some(task) = ledger_task {
            let _ = task.await;
        }
        // After consensus: the last commits get indexed and fsynced.
        let _ = stop_indexer.send(true);
        if let Err(e) = indexer_task.await {
            warn!(error = %e, "transaction indexer panicked");
        }
        net.shutdown().await;
        let _ = net_task.await;
        let _ = server.await;
    })
    .await;
    if drained.is_err() {
        warn!(
            grace_secs = grace.as_secs(),
            "shutdown did not finish in time; exiting anyway"
        );
    }
    let _ = std::fs::remove_file(data_dir.file(API_ADDR_FILE));
    info!(target: "audit", event = "daemon_stopped", reason = %reason, "daemon stopped");
    crate::common::audit::flush(Duration::from_secs(5));
    info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The flood [`crate::common::config::FAULT_FLOOD_ENV`] asks for, in a
/// debug build.
fn flood_rate() -> Option<u32> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var(crate::common::config::FAULT_FLOOD_ENV)
        .ok()?
        .parse()
        .ok()
        .filter(|rate| *rate > 0)
}

/// A hostile peer, for the daemon tests: `per_sec` well-framed garbage
/// messages a second over the connected peers and the direct, msg, learn
/// and ledger protocols. Requests are not awaited in turn, so a slow
/// answer does not slow the flood; each runs in its own short task.
async fn flood(net: openagi_net::NetHandle, per_sec: u32) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let per_tick = (per_sec / 100).max(1);
    let mut sent: u64 = 0;
    loop {
        tick.tick().await;
        let peers: Vec<openagi_net::PeerId> = net
            .snapshot()
            .peers
            .keys()
            .filter_map(|p| p.parse().ok())
            .collect();
        if peers.is_empty() {
            continue;
        }
        for _ in 0..per_tick {
            sent += 1;
            let Some(peer) = peers.get((sent as usize) % peers.len()).copied() else {
                continue;
            };
            let garbage = sent.to_le_bytes().repeat(8);
            let net = net.clone();
            match sent % 4 {
                0 => {
                    let _ = net.send_direct(peer, garbage).await;
                }
                1 => {
                    tokio::spawn(async move { net.msg_request(peer, garbage).await });
                }
                2 => {
                    tokio::spawn(async move { net.learn_request(peer, garbage).await });
                }
                _ => {
                    tokio::spawn(async move { net.ledger_request(peer, garbage).await });
                }
            }
        }
        if sent.is_multiple_of(u64::from(per_sec).max(1)) {
            info!(sent, "flood: garbage messages sent");
        }
    }
}

async fn handle_event(store: &Arc<Store>, event: NetEvent) {
    match event {
        NetEvent::PeerIdentified {
            peer_id,
            listen_addrs,
        } => {
            let Some(addr) = listen_addrs.first().map(|a| a.to_string()) else {
                return;
            };
            let store = store.clone();
            let peer = peer_id.to_string();
            let written =
                tokio::task::spawn_blocking(move || store.remember_peer(&peer, &addr, unix_now()))
                    .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "could not record peer address"),
                Err(e) => warn!(error = %e, "address-book writer failed"),
            }
        }
        NetEvent::PeerBanned { peer, duration } => {
            let store = store.clone();
            let now_ms = crate::unix_ms();
            let until_ms =
                now_ms.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
            let peer = peer.to_string();
            let written =
                tokio::task::spawn_blocking(move || store.ban_peer(&peer, until_ms, now_ms)).await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "could not record the ban; it ends at a restart"),
                Err(e) => warn!(error = %e, "ban writer failed"),
            }
        }
        NetEvent::Gossip(message) => {
            tracing::debug!(topic = message.topic, author = %message.author, bytes = message.data.len(), "gossip received");
        }
        NetEvent::PeerConnected(_)
        | NetEvent::PeerDisconnected(_)
        | NetEvent::MsgRequest { .. } => {}
    }
}
