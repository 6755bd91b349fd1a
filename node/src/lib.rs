//! The Open-AGI node: configuration, data directory, storage, local API,
//! the daemon's life cycle, and the `devnet` orchestrator.
//!
//! This crate is the edge where I/O happens: it feeds the pure cores
//! (consensus, learning, crypto) with network messages, time and disk, and
//! exposes them to operators. The `openagi` binary is a thin CLI over it.

pub mod api;
pub mod bench;
pub mod bench_openssl;
pub mod cli_learn;
pub mod cli_ledger;
pub mod client;
pub mod config;
pub mod consensus;
pub mod daemon;
pub mod datadir;
pub mod debug_bundle;
pub mod devnet;
pub mod federation;
pub mod genesis;
pub mod http;
pub mod keys;
pub mod learn;
pub mod ledger;
pub mod logfile;
pub mod msg;
pub mod output;
pub mod passphrase;
pub mod status;
pub mod store;
pub mod tor;
pub mod txindex;

/// Milliseconds since the Unix epoch (0 if the clock is before it): the
/// wall-clock time the node hands to its pure cores and records.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
