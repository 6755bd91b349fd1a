//! The command-line verbs other than `run`: each is a short-lived process
//! that reads the data directory (`keys`, offline `ledger`), asks a running
//! daemon through its token-authenticated API ([`client`]), or starts
//! daemons (`devnet`, `bench consensus`). Their standard output goes
//! through [`output`] (`outln!`), so a closed pipe ends them quietly.

pub mod audit;
pub mod bench;
pub mod bench_follow;
pub mod bench_mesh;
pub mod bench_openssl;
pub mod bench_secagg;
pub mod client;
pub mod dashboard;
pub mod debug_bundle;
pub mod devnet;
pub mod invite;
pub mod keys;
pub mod learn;
pub mod learn_jobs;
pub mod ledger;
pub mod mcp;
pub mod output;
pub mod status;
pub mod tor;
pub mod validator;
