//! `openagi tor ...`: operator commands about the node's onion service.

use anyhow::{Context, Result, bail};

use crate::common::config::Config;
use crate::common::datadir::DataDir;

/// `openagi tor` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TorCommand {
    /// Forget the onion service key so the next start gets a new onion
    /// address. Peers that know the old address can no longer reach this
    /// node there. Refused while the daemon runs.
    RotateAddress,
}

/// Runs a `tor` subcommand on `data_dir`.
pub fn run(data_dir: &DataDir, command: TorCommand, config: &Config) -> Result<()> {
    match command {
        TorCommand::RotateAddress => rotate(data_dir, config),
    }
}

fn rotate(data_dir: &DataDir, config: &Config) -> Result<()> {
    if !data_dir.path().is_dir() {
        bail!(
            "{} is not a data directory (run `openagi init` first)",
            data_dir.path().display()
        );
    }
    // Holding the lock proves no daemon is using the key right now.
    let _lock = data_dir
        .lock()
        .context("the daemon must be stopped to rotate the onion address")?;
    let settings = config.tor_settings(data_dir.path());
    let removed = openagi_net::tor::rotate_address(&settings).context("removing the onion key")?;
    if removed.is_empty() {
        println!("no onion key yet: the next start creates one");
    }
    for path in &removed {
        println!("removed {}", path.display());
    }
    if config.network.transport == openagi_net::TransportMode::TorSystem {
        let address = openagi_net::tor::system_onion_address(&settings)
            .context("creating the new onion key")?;
        println!("new onion address: {address}");
    } else {
        println!("the next `openagi run` publishes a new onion address (see `openagi status`)");
    }
    Ok(())
}
