//! The Open-AGI node: the daemon, the command-line interface, and what
//! both stand on.
//!
//! This crate is the edge where I/O happens: it feeds the pure cores
//! (consensus, learning, crypto) with network messages, time and disk, and
//! exposes them to operators. The tree says where a line runs:
//! - [`daemon`]: the services inside `openagi run` (start-up and shutdown,
//!   the consensus driver, the learning service, the messenger, the
//!   transaction index, the HTTP API);
//! - [`cli`]: the other verbs, each a short-lived process that reads the
//!   data directory or talks to a running daemon through its API (and
//!   `devnet`, which starts daemons);
//! - [`common`]: configuration, the data directory, the genesis, the
//!   passphrase source, the on-disk store, the log file and the local data
//!   format, shared by both.
//!
//! The `openagi` binary (`main.rs`) parses the command line and calls
//! into [`daemon::run`] or a [`cli`] module.

pub mod cli;
pub mod common;
pub mod daemon;

/// Milliseconds since the Unix epoch (0 if the clock is before it): the
/// wall-clock time the node hands to its pure cores and records.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
