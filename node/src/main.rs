//! `openagi`: the Open-AGI node daemon and its command-line interface.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use openagi_node::config::{CliOverrides, LogFormat};
use openagi_node::daemon::{self, RunOptions};
use openagi_node::datadir::DataDir;
use openagi_node::{bench, cli_ledger, devnet, status};

#[derive(Parser)]
#[command(name = "openagi", version, about = "Open-AGI peer-to-peer node")]
struct Cli {
    /// Data directory (keys, config, database).
    #[arg(long, global = true, env = "OPENAGI_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: identity key, API token, commented config.
    Init {
        /// Network id written into the new config.
        #[arg(long, default_value = "openagi-main")]
        network_id: String,
        /// Install this genesis file (validator set) into the data directory.
        #[arg(long)]
        genesis: Option<PathBuf>,
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
    /// Read or verify the ledger of the running daemon.
    Ledger {
        #[command(subcommand)]
        command: LedgerArgs,
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
    /// Show this node's keys.
    Keys {
        #[command(subcommand)]
        command: KeysArgs,
    },
    /// Run the daemon.
    Run(RunArgs),
    /// Show what the daemon running on the data directory reports.
    Status {
        /// Print the machine-readable JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Run a local multi-node network on loopback.
    Devnet {
        /// Number of nodes.
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// Directory for the nodes' data directories.
        #[arg(long, default_value = "devnet-data")]
        dir: PathBuf,
        /// Stop after this long (e.g. `90s`, `5m`); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Transactions per second submitted to the validators.
        #[arg(long, default_value_t = 20)]
        tx_rate: u32,
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
    },
}

#[derive(Subcommand)]
enum BenchArgs {
    /// Validators on loopback under an open-loop transaction load.
    Consensus {
        /// Validators.
        #[arg(long, default_value_t = 4)]
        nodes: usize,
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
}

fn main() -> std::process::ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    match dispatch(cli, started) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn dispatch(cli: Cli, started: Instant) -> Result<()> {
    let data_dir = cli.data_dir.unwrap_or_else(DataDir::default_path);
    match cli.command {
        Command::Init {
            network_id,
            genesis,
        } => {
            let dir = DataDir::new(&data_dir);
            let report = dir.init(&network_id)?;
            for line in report.lines {
                println!("{line}");
            }
            if let Some(genesis) = genesis {
                println!("{}", cli_ledger::install_genesis(&dir, &genesis)?);
            }
            println!("peer id: {}", report.peer_id);
            Ok(())
        }
        Command::Run(args) => {
            let options = RunOptions {
                data_dir,
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
            };
            let config = daemon::load_config(&options)?;
            daemon::init_logging(&config.log)?;
            let result = runtime()?.block_on(daemon::run(options, config, started));
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "daemon failed");
            }
            result
        }
        Command::Status { json } => status::print_status(&DataDir::new(&data_dir), json),
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
        Command::Genesis {
            command:
                GenesisArgs::Create {
                    network_id,
                    validators,
                    out,
                },
        } => cli_ledger::genesis_create(&network_id, validators, &out),
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
                },
        } => runtime()?.block_on(bench::consensus(bench::ConsensusBench {
            nodes,
            rate,
            duration,
            warmup,
            payload_bytes: payload,
            batch_txs,
            dir,
        })),
        Command::Keys {
            command: KeysArgs::Show { json },
        } => cli_ledger::keys_show(&DataDir::new(&data_dir), json),
        Command::Devnet {
            nodes,
            dir,
            duration,
            tx_rate,
        } => runtime()?.block_on(devnet::run(devnet::DevnetOptions {
            nodes,
            dir,
            duration,
            tx_rate,
        })),
    }
}
