//! `openagi`: the Open-AGI node daemon and its command-line interface.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use openagi_node::config::{CliOverrides, LogFormat};
use openagi_node::daemon::{self, RunOptions};
use openagi_node::datadir::DataDir;
use openagi_node::{devnet, status};

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
    },
    /// Federated learning: privacy planning, simulation, benchmark.
    Learn(openagi_node::learn::LearnArgs),
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
        Command::Init { network_id } => {
            let report = DataDir::new(&data_dir).init(&network_id)?;
            for line in report.lines {
                println!("{line}");
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
        Command::Devnet {
            nodes,
            dir,
            duration,
        } => runtime()?.block_on(devnet::run(devnet::DevnetOptions {
            nodes,
            dir,
            duration,
        })),
        Command::Learn(args) => openagi_node::learn::run(args),
    }
}
