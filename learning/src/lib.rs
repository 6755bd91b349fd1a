//! Federated-learning core of an Open-AGI node.
//!
//! This crate is the pure numeric heart of federated learning: it does no
//! I/O, reads no clock, starts no threads (unless built with the `parallel`
//! feature) and never asks the operating system for randomness. Every
//! random choice (initial weights, shuffling, DP noise, participant
//! sampling, stochastic rounding, data splits) takes a caller-supplied RNG
//! or seed, so a round can be replayed bit for bit in a seeded simulation.
//! The node seeds the privacy-relevant RNGs from the OS; tests and
//! simulators seed them from constants.
//!
//! Models are handled as flat parameter vectors (`Vec<f32>`) plus an
//! [`model::ArchitectureDescriptor`]; the `burn` modules in [`models`]
//! convert to and from that form, so aggregation, compression and model ids
//! never see a tensor.
//!
//! Tensors run on `burn`'s pure-Rust CPU backend (`flex`) by default; the
//! `cuda` and `wgpu` cargo features add GPU backends ([`train::Compute`]).
//!
//! What lives here:
//! - [`models`]: logistic regression, MLPs (including the FedAvg paper's
//!   2NN) and a small CNN as `burn` modules, their descriptors, seeded
//!   initial parameters and the flat parameter order.
//! - [`train`]: local mini-batch SGD returning the update and its sample
//!   count, and evaluation (accuracy, loss).
//! - [`data`]: in-memory labelled data sets, the embedded 8×8 digits set,
//!   and validated CSV and MNIST IDX parsers.
//! - [`round`]: one federated round as both the network and the simulator
//!   run it: participation, update encoding, the server's aggregation step
//!   and the round's outcome.
//! - [`simulate`]: federated rounds with N simulated clients in one process,
//!   built on [`round`].
//! - [`dp`]: client-level differential privacy as in DP-FedAvg (clipping,
//!   Gaussian noise, participant sampling) and a Rényi-DP accountant that
//!   reports (ε, δ) per round and enforces a budget.
//! - [`aggregate`]: FedAvg, coordinate-wise median, trimmed mean, Krum and
//!   Multi-Krum, selectable from a job spec.
//! - [`compress`]: top-k sparsification with error feedback, 8-bit
//!   quantization and a compact, validated wire encoding.
//! - [`model`]: architecture descriptors, content-addressed model ids and
//!   version lineage.
//! - [`federation`]: training across nodes coordinated through the ledger:
//!   job specs, signed ledger records, participant selection, a client's
//!   update, and the round coordinator as a sans-IO state machine, built
//!   on [`round`]; its participant side is [`participant`].
//! - [`secagg`]: secure aggregation (SecAgg+): the coordinator learns only
//!   the sum of a round's updates, with dropouts tolerated up to a stated
//!   threshold and the DP noise optionally split across participants; its
//!   participant and coordinator are sans-IO state machines.
//! - [`catalog`]: the network's models as the ledger describes them (a
//!   card per model: job, round, parent, architecture, accuracy, ε) and
//!   the retention policy that never deletes a job's final model.
//! - [`split`]: deterministic IID and non-IID partitions of a labelled data
//!   set across simulated clients.
//!
//! # A round, end to end
//!
//! ```
//! use openagi_learning::{compress, dp, rng_from_seed, Aggregator, ClientId, ClientUpdate};
//!
//! # fn main() -> Result<(), openagi_learning::Error> {
//! // The job spec names the aggregation rule.
//! let aggregator: Aggregator = serde_json::from_str(r#"{"trimmed_mean":{"beta":0.2}}"#)
//!     .expect("valid spec");
//!
//! // Clients compress their deltas; the aggregator decodes what arrives.
//! let dim = 1000;
//! let mut updates = Vec::new();
//! for c in 0..5u8 {
//!     let delta: Vec<f32> = (0..dim).map(|i| ((i + c as usize) % 7) as f32 * 0.01).collect();
//!     let mut feedback = compress::ErrorFeedback::new(dim)?;
//!     let sent = feedback.compress_quantized(&delta, dim / 10, compress::DEFAULT_QUANT_CHUNK)?;
//!     let bytes = compress::encode(&compress::Payload::SparseQuantized(sent))?;
//!     let received = compress::decode(&bytes, dim)?;
//!     updates.push(ClientUpdate::new(ClientId([c; 32]), received.to_dense(), 100));
//! }
//! let robust = aggregator.aggregate(&updates)?;
//! assert_eq!(robust.len(), dim);
//!
//! // With client-level DP instead: clip, sum, noise, and account.
//! let config = dp::DpConfig { clip_norm: 1.0, noise_multiplier: 1.0 };
//! let noisy = dp::dp_fedavg(&updates, &config, 5.0, &mut rng_from_seed([42; 32]))?;
//! assert_eq!(noisy.len(), dim);
//! let mut accountant = dp::Accountant::new(1e-5)?;
//! assert!(accountant.can_run_round(50.0, 1.0, 1.0));
//! let spent = accountant.record_round(1.0, 1.0)?;
//! assert!(spent.epsilon > 0.0 && spent.epsilon < 50.0);
//! # Ok(())
//! # }
//! ```

pub mod aggregate;
pub mod catalog;
pub mod compress;
pub mod data;
pub mod dp;
mod error;
pub mod federation;
pub mod model;
pub mod models;
pub mod participant;
pub mod round;
pub mod secagg;
pub mod simulate;
pub mod split;
pub mod train;

pub use aggregate::{Aggregator, ClientId, ClientUpdate};
pub use error::{Error, ErrorKind};

/// The deterministic RNG this crate's seeded helpers use: ChaCha20, whose
/// output stream for a given seed is stable across releases, so every node
/// derives the same values from the same seed.
pub type SeededRng = rand_chacha::ChaCha20Rng;

/// Builds a [`SeededRng`] from a 32-byte seed.
///
/// For DP noise the seed must be secret and unpredictable (the node draws it
/// from the OS); for participant sampling or data splits it may be public,
/// e.g. derived from a ledger block hash.
pub fn rng_from_seed(seed: [u8; 32]) -> SeededRng {
    <SeededRng as rand::SeedableRng>::from_seed(seed)
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
