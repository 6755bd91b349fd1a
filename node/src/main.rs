//! `openagi`: the Open-AGI node daemon and its command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use openagi_crypto::bench as bench_crypto;
use openagi_node::cli::output::OutputError;
use openagi_node::cli::{
    bench, dashboard, debug_bundle, devnet, keys, ledger as cli_ledger, status, validator,
};
use openagi_node::common::bench_log::{self, Figure};
use openagi_node::common::config::{CliOverrides, InitTransport, LogFormat};
use openagi_node::common::datadir::{DataDir, InitSettings};
use openagi_node::common::passphrase::PassphraseSource;
use openagi_node::daemon::{self, RunOptions};
use openagi_node::{out, outln};

#[derive(Parser)]
#[command(name = "openagi", version, about = "Open-AGI peer-to-peer node")]
struct Cli {
    /// Data directory (keys, config, database).
    #[arg(long, global = true, env = "OPENAGI_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// File whose first line is the passphrase of an encrypted `node.key`
    /// (otherwise `OPENAGI_PASSPHRASE`, or a prompt on a terminal).
    #[arg(long, global = true, env = "OPENAGI_PASSPHRASE_FILE")]
    passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: identity key, API token, commented config.
    Init {
        /// Network id written into the config [default for a new config:
        /// openagi-main].
        #[arg(long)]
        network_id: Option<String>,
        /// How peers reach this node, written into the config: `tor`
        /// (embedded Tor, onion service only), `tor-system` (your tor's
        /// SOCKS and ControlPort), `direct` (TCP/QUIC on network.listen;
        /// reveals your IP) or `hybrid` (Tor plus direct) [default for a
        /// new config: tor].
        #[arg(long, value_enum)]
        transport: Option<InitTransport>,
        /// Install this genesis file (validator set) into the data directory.
        #[arg(long)]
        genesis: Option<PathBuf>,
        /// Encrypt the new identity under a passphrase (Argon2id +
        /// XChaCha20-Poly1305); see --passphrase-file.
        #[arg(long)]
        encrypt: bool,
        /// Join a network with an invite (`openagi invite` on a node of it
        /// prints one): a short code with --bootstrap, or the long form
        /// (OAGI1:...) alone. Fetches and installs the network's genesis.
        #[arg(long)]
        join: Option<String>,
        /// The inviting node's address, ending in /p2p/<peer id>.
        #[arg(long, requires = "join")]
        bootstrap: Option<String>,
    },
    /// Invite codes into this node's network (through the running daemon).
    Invite {
        #[command(subcommand)]
        command: Option<InviteArgs>,
        /// How long a new code works (e.g. 7d, 12h).
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// How many nodes may join with a new code.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Submit a transaction to the ledger through the running daemon.
    Submit {
        /// The payload (text, or hex with --hex).
        payload: String,
        /// The payload is hexadecimal.
        #[arg(long)]
        hex: bool,
        /// Return at once instead of waiting for the commit.
        #[arg(long)]
        no_wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read or verify the ledger: through the running daemon, or, when
    /// none runs, from the data directory's database (left unchanged).
    Ledger {
        #[command(subcommand)]
        command: LedgerArgs,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Join or leave the validator set of the network this node follows.
    Validator {
        #[command(subcommand)]
        command: ValidatorArgs,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Create a genesis file.
    Genesis {
        #[command(subcommand)]
        command: GenesisArgs,
    },
    /// Measure performance; prints a table.
    Bench {
        #[command(subcommand)]
        command: BenchArgs,
    },
    /// The node's keys: show, sign, verify, passphrase, rotate.
    Keys {
        #[command(subcommand)]
        command: KeysArgs,
    },
    /// End-to-end encrypted messages to other nodes' operators.
    Msg {
        #[command(subcommand)]
        command: MsgArgs,
    },
    /// Run the daemon.
    Run(RunArgs),
    /// Print a one-time link that logs a browser in to the web dashboard
    /// of the daemon running on the data directory.
    Dashboard,
    /// The tamper-evident audit log: verify it, or show its newest entries.
    Audit {
        #[command(subcommand)]
        command: AuditArgs,
    },
    /// Serve the Model Context Protocol on stdio for AI agents, over the
    /// daemon running on the data directory.
    Mcp {
        /// Let the tools that change something (submit a transaction or a
        /// job, send a message) run; without it they refuse.
        #[arg(long)]
        allow_writes: bool,
    },
    /// Show what the daemon running on the data directory reports.
    Status {
        /// Print the machine-readable JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Run a local multi-node network on loopback.
    ///
    /// Every run starts a fresh network: an earlier devnet in --dir is
    /// removed first, after saying so (--resume keeps its keys and ledgers
    /// instead). A --dir holding anything else is refused. When the devnet
    /// stops (--duration elapsed or Ctrl-C) it prints a summary: blocks,
    /// transactions committed, and the training job's outcome (rounds,
    /// accuracy, ε, or why it did not finish).
    Devnet {
        /// Number of validators.
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// Full nodes beside the validators: they follow and verify the
        /// ledger without voting.
        #[arg(long, default_value_t = 0)]
        full_nodes: usize,
        /// Nodes that start as full nodes and then join the validator set
        /// the way an operator does (`openagi validator join`: proof of
        /// computation, a join ordered by consensus, voting from the next
        /// epoch), once consensus runs.
        #[arg(long, default_value_t = 0)]
        join: usize,
        /// Directory for the nodes' data directories.
        #[arg(long, default_value = "devnet-data")]
        dir: PathBuf,
        /// Stop after this long (e.g. `90s`, `5m`); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Start a private Tor network (needs Debian's `tor`) and connect
        /// the nodes through onion services only.
        #[arg(long)]
        tor: bool,
        /// Transactions per second submitted to the validators.
        #[arg(long, default_value_t = 20)]
        tx_rate: u32,
        /// Do not submit the federated training job on the digits set
        /// (`configs/digits-job.toml`) once consensus runs.
        #[arg(long)]
        no_learning: bool,
        /// Continue the devnet left in --dir (same keys and ledgers) instead
        /// of starting a fresh one; a training job already on its ledger is
        /// not submitted again.
        #[arg(long)]
        resume: bool,
    },
    /// Tor onion service commands.
    #[command(subcommand)]
    Tor(openagi_node::cli::tor::TorCommand),
    /// Federated learning: jobs on the network (submit, status, export),
    /// privacy planning, simulation, benchmark.
    Learn(openagi_node::cli::learn::LearnArgs),
    /// Material for bug reports.
    Debug {
        #[command(subcommand)]
        command: DebugArgs,
    },
}

#[derive(Subcommand)]
enum DebugArgs {
    /// Write one tar.gz to attach to a bug report: versions, the config
    /// (secrets redacted), the running daemon's status and metrics, recent
    /// logs, the database schema version and the data directory's file
    /// names and sizes. Never a key, token, passphrase or database
    /// contents.
    Bundle {
        /// The archive to write [default: openagi-debug-<unix time>.tar.gz].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum MsgArgs {
    /// Send a text message to a peer through the running daemon.
    Send {
        /// The recipient's peer id.
        #[arg(long)]
        to: String,
        /// The text.
        text: String,
    },
    /// Show the newest received messages, oldest first.
    Inbox {
        /// Most messages shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the newest sent messages and where each is: queued, relayed,
    /// delivered (signed receipt from the recipient) or expired.
    Outbox {
        /// Most messages shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LedgerArgs {
    /// The head: height and hash.
    Head,
    /// One block.
    Get {
        /// Height.
        height: u64,
    },
    /// Re-check every hash link and commit certificate from genesis.
    Verify,
}

#[derive(Subcommand)]
enum ValidatorArgs {
    /// Solve the network's proof of computation on this machine, have the
    /// running daemon submit its join, and wait until it votes.
    Join {
        /// Threads solving the puzzle (default: every core); each holds
        /// the puzzle's memory.
        #[arg(long)]
        threads: Option<usize>,
        /// How long to wait for the join to be ordered, and then for the
        /// node to vote, in seconds.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
    /// Have the running daemon leave the validator set, and wait until it
    /// follows the ledger as a full node.
    Leave {
        /// How long to wait, in seconds (as for `join`).
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
    /// The validator set, a change in flight, and what a join costs.
    Status,
    /// Vote (as a validator) for new join puzzle parameters; they apply,
    /// at the next boundary, once a quorum of the set votes the same.
    VotePuzzle {
        /// Leading zero bits a join must find (each doubles the work).
        #[arg(long)]
        difficulty: u32,
        /// Memory of one attempt, KiB.
        #[arg(long)]
        memory_kib: u32,
        /// Argon2id passes per attempt.
        #[arg(long, default_value_t = 1)]
        passes: u32,
        /// How long to wait for the vote to be ordered, in seconds.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
}

#[derive(Subcommand)]
enum GenesisArgs {
    /// Write a genesis file listing the validators' public keys.
    Create {
        /// Network id (must equal network.network_id of every node).
        #[arg(long)]
        network_id: String,
        /// A validator's Ed25519 public key in hex (`openagi keys show`), repeatable, in order.
        #[arg(long = "validator", required = true)]
        validators: Vec<String>,
        /// Output file.
        #[arg(long, default_value = "genesis.toml")]
        out: PathBuf,
        /// Leading zero bits a validator join's proof of computation needs
        /// (each bit doubles the work; the default, 12, costs minutes of
        /// one core at 64 MiB per attempt). Test networks use fewer.
        #[arg(long, default_value_t = openagi_crypto::poc::PuzzleParams::DEFAULT.difficulty_bits)]
        join_difficulty: u32,
        /// Memory of one join puzzle attempt, KiB.
        #[arg(long, default_value_t = openagi_crypto::poc::PuzzleParams::DEFAULT.memory_kib)]
        join_memory_kib: u32,
        /// A checkpoint every this many blocks, on every node of the
        /// network (validators' `consensus.checkpoint_interval` must match).
        #[arg(long, default_value_t = openagi_consensus::Config::default().checkpoint_interval)]
        checkpoint_interval: u64,
        /// Blocks in flight above the stable checkpoint, on every node
        /// (validators' `consensus.window` must match).
        #[arg(long, default_value_t = openagi_consensus::Config::default().window)]
        window: u64,
    },
}

#[derive(Subcommand)]
enum InviteArgs {
    /// The codes this node made (never the codes themselves: their
    /// first group, state and uses left).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a code from working.
    Revoke {
        /// The code.
        code: String,
    },
}

#[derive(Subcommand)]
enum AuditArgs {
    /// Check every entry's hash, signature, sequence number and link to
    /// the one before; names the first that fails.
    Verify {
        /// The key the entries must be signed by (hex); by default the
        /// node's own when its key file is not encrypted.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// The newest entries, oldest first.
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchArgs {
    /// Federated learning on MNIST in the FedAvg anchor setting (time and CPU to a target accuracy).
    Learning(openagi_node::cli::learn::BenchLearningArgs),
    /// The cryptographic primitives: AEAD, signatures, DH, sealed
    /// envelopes, puzzle verification, ratchet round trips.
    Crypto {
        /// How long each run of each row lasts.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        time: Duration,
        /// Runs per row; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also run `openssl speed` on this machine and compare with it
        /// instead of the reference machine's figures.
        #[arg(long)]
        openssl: bool,
    },
    /// Validators on loopback (or over Tor) under an open-loop transaction
    /// load.
    Consensus {
        /// Validators; several, comma-separated (e.g. 4,7,10), run one
        /// after the other and are printed side by side.
        #[arg(long, default_value = "4", value_delimiter = ',')]
        nodes: Vec<usize>,
        /// Offered transactions per second.
        #[arg(long, default_value_t = 30_000)]
        rate: u64,
        /// Measured period.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Load before measuring.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Payload bytes per transaction.
        #[arg(long, default_value_t = 512)]
        payload: usize,
        /// Most transactions per block.
        #[arg(long, default_value_t = 4096)]
        batch_txs: usize,
        /// Keep the nodes' data here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Run the validators over onion services of a private Tor network
        /// (needs Debian's `tor`), as the network is meant to run.
        #[arg(long)]
        tor: bool,
    },
    /// A full node catching up from height 0: four validators build a
    /// chain of `--blocks` blocks, then a full node fetches, verifies and
    /// stores it; prints blocks and transactions per second and its memory.
    Follow {
        /// Blocks in the chain.
        #[arg(long, default_value_t = 10_000)]
        blocks: u64,
        /// Transactions per second offered while the chain is built.
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        /// Payload bytes per transaction.
        #[arg(long, default_value_t = 512)]
        payload: usize,
        /// Most transactions per block.
        #[arg(long, default_value_t = 1024)]
        batch_txs: usize,
        /// Keep the nodes' data here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Measure the scale of following instead: this many full nodes
        /// (each its own process) follow the validators under `--rate`
        /// for `--duration` (0 gives the validators' own baseline).
        #[arg(long)]
        followers: Option<usize>,
        /// How long the scale measurement runs.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Secure aggregation in one process: the coordinator's and a
    /// participant's time per round and the bytes each participant moves.
    Secagg {
        /// Participants per round; several, comma-separated.
        #[arg(long, default_value = "10,50,100", value_delimiter = ',')]
        participants: Vec<usize>,
        /// Coordinates per update (199,210: MNIST 2NN).
        #[arg(long, default_value_t = 199_210)]
        dimension: usize,
        /// Neighbours each participant masks with and shares among (even).
        #[arg(long, default_value_t = 16)]
        neighbours: u16,
        /// Fraction of participants that drop after sharing their keys, in
        /// a second row per count.
        #[arg(long, default_value_t = 0.1)]
        dropout: f64,
        /// Rounds per row; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Messages relayed along a line of daemons: latency one way and to
    /// the signed receipt, bytes per hop, a full relay queue's memory.
    Mesh {
        /// Relays between sender and recipient.
        #[arg(long, default_value_t = 1)]
        relays: usize,
        /// Messages timed after the first (which opens the session).
        #[arg(long, default_value_t = 50)]
        messages: usize,
        /// Bytes of text per message.
        #[arg(long, default_value_t = 100)]
        text_bytes: usize,
        /// Run the line over onion services of a private Tor network
        /// (needs Debian's `tor`).
        #[arg(long)]
        tor: bool,
        /// Keep the nodes' data here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysArgs {
    /// Peer id, public key and fingerprint.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sign a file with the node identity; prints the signature in hex.
    Sign {
        /// The file to sign.
        #[arg(long)]
        file: PathBuf,
    },
    /// Check a file signature: exit 0 valid, 1 invalid, 2 malformed input.
    Verify {
        /// The signer's Ed25519 public key in hex.
        #[arg(long)]
        public_key: String,
        /// The signature in hex, as printed by `keys sign`.
        #[arg(long)]
        signature: String,
        /// The signed file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Set, change or remove the passphrase of node.key (atomic).
    Passphrase {
        /// File whose first line is the new passphrase (otherwise
        /// `OPENAGI_NEW_PASSPHRASE`, or a prompt asked twice).
        #[arg(long, env = "OPENAGI_NEW_PASSPHRASE_FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Store the key unencrypted instead (not recommended).
        #[arg(long, conflicts_with = "new_passphrase_file")]
        remove: bool,
    },
    /// Replace the identity with a new one and a rotation statement
    /// signed by both keys; the old key is kept as node.key.old-<time>.
    Rotate,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file (default: DATA_DIR/openagi.toml).
    #[arg(long, env = "OPENAGI_CONFIG")]
    config: Option<PathBuf>,
    /// Network id.
    #[arg(long)]
    network_id: Option<String>,
    /// Multiaddr to listen on (repeatable).
    #[arg(long)]
    listen: Vec<String>,
    /// Bootstrap peer multiaddr ending in /p2p/<peer id> (repeatable).
    #[arg(long)]
    bootstrap: Vec<String>,
    /// Address of the local HTTP API.
    #[arg(long)]
    api_listen: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info,openagi_net=debug`.
    #[arg(long)]
    log_level: Option<String>,
    /// Enable or disable mDNS discovery.
    #[arg(long)]
    mdns: Option<bool>,
    /// Exit when the process with this id is no longer the parent.
    #[arg(long, hide = true)]
    exit_with_parent: Option<u32>,
    /// Upgrade the database from an older schema first (back up the data
    /// directory before; see UPGRADING.md). Without it an older database
    /// is refused and left untouched.
    #[arg(long)]
    migrate: bool,
}

/// Appends a bench run to the data directory's benchmark log (the
/// dashboard plots it), when `data_dir` is an initialised data directory.
fn record_bench(
    data_dir: &std::path::Path,
    benchmark: &str,
    settings: serde_json::Value,
    figures: &[Figure],
) -> Result<()> {
    if let Some(path) = bench_log::record(&DataDir::new(data_dir), benchmark, settings, figures)? {
        eprintln!(
            "recorded in {} (the dashboard's Benchmarks page)",
            path.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    // `keys verify` has three outcomes, not two, so it sets its own status.
    if let Command::Keys {
        command:
            KeysArgs::Verify {
                public_key,
                signature,
                file,
            },
    } = &cli.command
    {
        return keys_verify(public_key, signature, file);
    }
    match dispatch(cli, started) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of a pipe stopped early (`openagi status | head`): it
        // has what it wanted, so this is no failure worth a message.
        Err(e) if OutputError::is_closed(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status 0: valid; 1: well-formed but invalid; 2: malformed input.
fn keys_verify(public_key: &str, signature: &str, file: &std::path::Path) -> ExitCode {
    match keys::verify_file(public_key, signature, file) {
        Ok(true) => {
            println!(
                "valid signature of {} by {}",
                file.display(),
                public_key.trim()
            );
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!(
                "INVALID: not a signature of {} by {} (context {})",
                file.display(),
                public_key.trim(),
                keys::SIGN_FILE_CONTEXT
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: malformed input: {e}");
            ExitCode::from(2)
        }
    }
}

/// Logging for the key commands, so their audit lines reach stderr.
fn init_cli_logging() -> Result<()> {
    daemon::init_logging(&openagi_node::common::config::LogSection::default())
}

/// Says so at `init` when the installed genesis is for another network
/// than the config's, which `run` would refuse.
fn warn_on_genesis_mismatch(dir: &DataDir) {
    let genesis = openagi_node::common::genesis::Genesis::load(
        &dir.file(openagi_node::common::genesis::GENESIS_FILE),
    );
    // The config file alone: the environment of `init` is not the daemon's.
    let config = openagi_node::common::config::Config::load(
        dir.path(),
        None,
        std::iter::empty(),
        &CliOverrides::default(),
    );
    if let (Ok(genesis), Ok(config)) = (genesis, config)
        && genesis.network_id != config.network.network_id
    {
        eprintln!(
            "warning: genesis.toml is for network {:?} but network.network_id is {:?}, which `run` refuses; add --network-id {} to this command",
            genesis.network_id, config.network.network_id, genesis.network_id
        );
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn dispatch(cli: Cli, started: Instant) -> Result<()> {
    let data_dir = cli.data_dir.unwrap_or_else(DataDir::default_path);
    let passphrase = PassphraseSource::current(cli.passphrase_file);
    match cli.command {
        Command::Init {
            network_id,
            transport,
            genesis,
            encrypt,
            join,
            bootstrap,
        } => {
            let dir = DataDir::new(&data_dir);
            let settings = InitSettings {
                network_id,
                transport,
            };
            let report = dir.init(&settings, &passphrase, encrypt)?;
            for line in report.lines {
                println!("{line}");
            }
            if let Some(genesis) = genesis {
                println!("{}", cli_ledger::install_genesis(&dir, &genesis)?);
                warn_on_genesis_mismatch(&dir);
            }
            if let Some(code) = join {
                for line in
                    openagi_node::cli::invite::join(&dir, &passphrase, &code, bootstrap.as_deref())?
                {
                    println!("{line}");
                }
            }
            println!("peer id: {}", report.peer_id);
            Ok(())
        }
        Command::Invite {
            command,
            expires,
            uses,
        } => {
            let dir = DataDir::new(&data_dir);
            match command {
                None => openagi_node::cli::invite::create(&dir, expires, uses),
                Some(InviteArgs::List { json }) => openagi_node::cli::invite::list(&dir, json),
                Some(InviteArgs::Revoke { code }) => openagi_node::cli::invite::revoke(&dir, &code),
            }
        }
        Command::Run(args) => {
            let options = RunOptions {
                data_dir,
                passphrase,
                config_file: args.config,
                overrides: CliOverrides {
                    network_id: args.network_id,
                    listen: args.listen,
                    bootstrap: args.bootstrap,
                    api_listen: args.api_listen,
                    log_format: args.log_format,
                    log_level: args.log_level,
                    mdns: args.mdns,
                },
                exit_with_parent: args.exit_with_parent,
                migrate: args.migrate,
            };
            let config = daemon::load_config(&options)?;
            daemon::init_logging(&config.log)?;
            let result = runtime()?.block_on(daemon::run(options, config, started));
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "daemon failed");
            }
            result
        }
        Command::Msg { command } => {
            let dir = DataDir::new(&data_dir);
            match command {
                MsgArgs::Send { to, text } => cli_ledger::msg_send(&dir, &to, &text),
                MsgArgs::Inbox { limit, json } => cli_ledger::msg_inbox(&dir, limit, json),
                MsgArgs::Outbox { limit, json } => cli_ledger::msg_outbox(&dir, limit, json),
            }
        }
        Command::Status { json } => status::print_status(&DataDir::new(&data_dir), json),
        Command::Dashboard => dashboard::print_login(&DataDir::new(&data_dir)),
        Command::Mcp { allow_writes } => {
            openagi_node::cli::mcp::run(&DataDir::new(&data_dir), allow_writes)
        }
        Command::Submit {
            payload,
            hex,
            no_wait,
            json,
        } => cli_ledger::submit(&DataDir::new(&data_dir), &payload, hex, !no_wait, json),
        Command::Ledger { command, json } => {
            let command = match command {
                LedgerArgs::Head => cli_ledger::LedgerCommand::Head,
                LedgerArgs::Get { height } => cli_ledger::LedgerCommand::Get(height),
                LedgerArgs::Verify => cli_ledger::LedgerCommand::Verify,
            };
            cli_ledger::ledger(&DataDir::new(&data_dir), command, json)
        }
        Command::Validator { command, json } => {
            let dir = DataDir::new(&data_dir);
            match command {
                ValidatorArgs::Join { threads, wait_secs } => {
                    validator::join(&dir, threads, Duration::from_secs(wait_secs), json)
                }
                ValidatorArgs::Leave { wait_secs } => {
                    validator::leave(&dir, Duration::from_secs(wait_secs), json)
                }
                ValidatorArgs::Status => validator::status(&dir, json),
                ValidatorArgs::VotePuzzle {
                    difficulty,
                    memory_kib,
                    passes,
                    wait_secs,
                } => validator::vote_puzzle(
                    &dir,
                    openagi_crypto::poc::PuzzleParams {
                        difficulty_bits: difficulty,
                        memory_kib,
                        passes,
                    },
                    Duration::from_secs(wait_secs),
                    json,
                ),
            }
        }
        Command::Genesis {
            command:
                GenesisArgs::Create {
                    network_id,
                    validators,
                    out,
                    join_difficulty,
                    join_memory_kib,
                    checkpoint_interval,
                    window,
                },
        } => cli_ledger::genesis_create(
            &network_id,
            validators,
            &out,
            openagi_node::common::genesis::GenesisConsensus {
                join_difficulty_bits: join_difficulty,
                join_memory_kib,
                checkpoint_interval,
                window,
                ..Default::default()
            },
        ),
        Command::Bench {
            command: BenchArgs::Learning(args),
        } => {
            let figures = openagi_node::cli::learn::bench_learning(&args)?;
            let settings = serde_json::json!({
                "rounds": args.rounds,
                "clients": args.clients,
                "participation": format!("{:?}", args.participation),
                "compression": format!("{:?}", args.compress),
                "dp": args.dp,
                "seed": args.seed,
            });
            record_bench(&data_dir, "learning", settings, &figures)
        }
        Command::Bench {
            command:
                BenchArgs::Crypto {
                    time,
                    runs,
                    openssl,
                },
        } => {
            let options = bench_crypto::CryptoBench { time, runs };
            let reference = if openssl {
                openagi_node::cli::bench_openssl::measure(time.as_secs().max(1))?
            } else {
                bench_crypto::Reference::default()
            };
            let rows = bench_crypto::run(&options, &reference)?;
            out!("{}", bench_crypto::render(&rows, &options, &reference))?;
            let figures: Vec<Figure> = rows
                .iter()
                .map(|row| match row.bytes_per_op {
                    Some(bytes) => {
                        Figure::new(&row.name, row.ops_per_sec * bytes as f64 / 1e6, "MB/s")
                    }
                    None => Figure::new(&row.name, row.ops_per_sec, "ops/s"),
                })
                .collect();
            let settings = serde_json::json!({ "time_s": time.as_secs_f64(), "runs": runs });
            record_bench(&data_dir, "crypto", settings, &figures)
        }
        Command::Bench {
            command:
                BenchArgs::Consensus {
                    nodes,
                    rate,
                    duration,
                    warmup,
                    payload,
                    batch_txs,
                    dir,
                    tor,
                },
        } => {
            let figures = runtime()?.block_on(bench::consensus_sweep(
                &nodes,
                bench::ConsensusBench {
                    nodes: nodes.first().copied().unwrap_or(4),
                    rate,
                    duration,
                    warmup,
                    payload_bytes: payload,
                    batch_txs,
                    dir,
                    tor,
                },
            ))?;
            let settings = serde_json::json!({
                "nodes": nodes,
                "tor": tor,
                "rate": rate,
                "duration_s": duration.as_secs_f64(),
                "payload_bytes": payload,
                "batch_txs": batch_txs,
            });
            record_bench(&data_dir, "consensus", settings, &figures)
        }
        Command::Bench {
            command:
                BenchArgs::Follow {
                    blocks,
                    rate,
                    payload,
                    batch_txs,
                    dir,
                    followers,
                    duration,
                },
        } => {
            let figures = runtime()?.block_on(openagi_node::cli::bench_follow::follow(
                openagi_node::cli::bench_follow::FollowBench {
                    blocks,
                    rate,
                    payload_bytes: payload,
                    batch_txs,
                    dir,
                    followers,
                    duration,
                },
            ))?;
            let settings = serde_json::json!({
                "followers": followers,
                "duration_s": duration.as_secs_f64(),
                "blocks": blocks,
                "rate": rate,
                "payload_bytes": payload,
                "batch_txs": batch_txs,
            });
            record_bench(&data_dir, "follow", settings, &figures)
        }
        Command::Bench {
            command:
                BenchArgs::Mesh {
                    relays,
                    messages,
                    text_bytes,
                    tor,
                    dir,
                },
        } => {
            let figures = runtime()?.block_on(openagi_node::cli::bench_mesh::mesh(
                openagi_node::cli::bench_mesh::MeshBench {
                    relays,
                    messages,
                    text_bytes,
                    tor,
                    dir,
                },
            ))?;
            let settings = serde_json::json!({
                "relays": relays,
                "messages": messages,
                "text_bytes": text_bytes,
                "tor": tor,
            });
            record_bench(&data_dir, "mesh", settings, &figures)
        }
        Command::Bench {
            command:
                BenchArgs::Secagg {
                    participants,
                    dimension,
                    neighbours,
                    dropout,
                    rounds,
                },
        } => {
            let bench = openagi_node::cli::bench_secagg::SecAggBench {
                participants: participants.clone(),
                dimension,
                neighbours,
                dropout,
                rounds,
            };
            let figures = openagi_node::cli::bench_secagg::run(&bench)?;
            let settings = serde_json::json!({
                "participants": participants,
                "dimension": dimension,
                "neighbours": neighbours,
                "dropout": dropout,
                "rounds": rounds,
            });
            record_bench(&data_dir, "secagg", settings, &figures)
        }
        Command::Audit { command } => {
            let dir = DataDir::new(&data_dir);
            match command {
                AuditArgs::Verify { public_key } => {
                    openagi_node::cli::audit::verify(&dir, &passphrase, public_key.as_deref())
                }
                AuditArgs::Tail { lines, json } => {
                    openagi_node::cli::audit::tail(&dir, lines, json)
                }
            }
        }
        Command::Keys { command } => {
            let dir = DataDir::new(&data_dir);
            match command {
                KeysArgs::Show { json } => cli_ledger::keys_show(&dir, &passphrase, json),
                KeysArgs::Sign { file } => {
                    outln!("{}", keys::sign_file(&dir, &passphrase, &file)?)?;
                    Ok(())
                }
                KeysArgs::Verify {
                    public_key,
                    signature,
                    file,
                } => {
                    // Handled in main() for its exit status; kept here so the
                    // match stays exhaustive.
                    if keys_verify(&public_key, &signature, &file) == ExitCode::SUCCESS {
                        Ok(())
                    } else {
                        anyhow::bail!("signature not valid")
                    }
                }
                KeysArgs::Passphrase {
                    new_passphrase_file,
                    remove,
                } => {
                    init_cli_logging()?;
                    let new = (!remove).then(|| PassphraseSource::replacement(new_passphrase_file));
                    outln!(
                        "{}",
                        keys::change_passphrase(&dir, &passphrase, new.as_ref())?
                    )?;
                    Ok(())
                }
                KeysArgs::Rotate => {
                    init_cli_logging()?;
                    let report = keys::rotate(&dir, &passphrase)?;
                    outln!("old key     {}", report.statement.old_key)?;
                    outln!("new key     {}", report.statement.new_key)?;
                    outln!("statement   {}", report.record_path.display())?;
                    outln!("old key in  {}", report.old_key_path.display())?;
                    outln!(
                        "peers accept the new key only with this statement; a validator's genesis entry must be updated by the network"
                    )?;
                    Ok(())
                }
            }
        }
        Command::Devnet {
            nodes,
            full_nodes,
            join,
            dir,
            duration,
            tor,
            tx_rate,
            no_learning,
            resume,
        } => runtime()?.block_on(devnet::run(devnet::DevnetOptions {
            nodes,
            full_nodes,
            join,
            dir,
            duration,
            tor,
            tx_rate,
            learning: !no_learning,
            resume,
        })),
        Command::Tor(command) => {
            let options = RunOptions {
                data_dir: data_dir.clone(),
                passphrase: passphrase.clone(),
                config_file: None,
                overrides: CliOverrides::default(),
                exit_with_parent: None,
                migrate: false,
            };
            let config = daemon::load_config(&options)?;
            openagi_node::cli::tor::run(&DataDir::new(&data_dir), command, &config)
        }
        Command::Learn(args) => openagi_node::cli::learn::run(args, &DataDir::new(&data_dir)),
        Command::Debug {
            command: DebugArgs::Bundle { out },
        } => {
            let report = debug_bundle::write(&DataDir::new(&data_dir), out.as_deref())?;
            for entry in &report.entries {
                outln!("  {entry}")?;
            }
            if !report.daemon_running {
                outln!("daemon not running: no status or metrics in the bundle")?;
            }
            outln!("wrote {}", report.path.display())?;
            Ok(())
        }
    }
}
