//! What the daemon and the command-line verbs share: reading the
//! configuration, holding the data directory, the audit log, the genesis, where the key
//! store's passphrase comes from, the on-disk store (which offline verbs
//! read too), the log file, the local training data and the build's
//! identity. Nothing here starts a task or opens a socket.

pub mod audit;
pub mod bench_log;
pub mod config;
pub mod datadir;
pub mod genesis;
pub mod invite;
pub mod learn_data;
pub mod ledger;
pub mod logfile;
pub mod passphrase;
pub mod store;
pub mod version;
