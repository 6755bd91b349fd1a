//! The genesis file: which network this is, who its first validators are,
//! and the parameters every node of the network must share.
//!
//! `genesis.toml` in the data directory fixes the consensus membership at
//! height 0; later changes are ledger transactions
//! (`openagi_consensus::membership`). Every node of a network must hold an
//! identical file; the network id it names must match
//! `network.network_id`. Its `[consensus]` section (checkpoint interval,
//! window, the join puzzle) decides where membership changes take effect
//! and what a join costs, so it lives here rather than in each node's
//! config; files written before it existed read as the defaults. A node
//! without a genesis file runs without consensus (it still gossips and
//! serves its API).

use std::path::Path;

use anyhow::{Context, Result, bail};
use openagi_consensus::membership::Membership;
use openagi_consensus::{NetworkId, ValidatorSet};
use openagi_crypto::PublicKey;
use openagi_crypto::poc::PuzzleParams;
use serde::{Deserialize, Serialize};

/// The file name inside the data directory.
pub const GENESIS_FILE: &str = "genesis.toml";

/// Most validators a genesis may list; PBFT's message count grows with the
/// square of it.
pub const MAX_VALIDATORS: usize = 64;

/// The parsed genesis file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// Network id; must equal the node's `network.network_id`.
    pub network_id: String,
    /// Validator Ed25519 public keys (hex), in replica order.
    pub validators: Vec<String>,
    /// Parameters every node of the network must share.
    #[serde(default)]
    pub consensus: GenesisConsensus,
}

/// `[consensus]` of a genesis file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenesisConsensus {
    /// A checkpoint every this many blocks; validators' `consensus.
    /// checkpoint_interval` must equal it.
    pub checkpoint_interval: u64,
    /// Blocks in flight above the stable checkpoint; validators'
    /// `consensus.window` must equal it. A membership change committed at
    /// height h takes effect after the first checkpoint at or above h plus
    /// this.
    pub window: u64,
    /// Leading zero bits a join's proof of computation needs: each bit
    /// doubles the expected work (12 is minutes of one core).
    pub join_difficulty_bits: u32,
    /// Memory of one puzzle attempt, KiB (Argon2id).
    pub join_memory_kib: u32,
    /// Argon2id passes per attempt.
    pub join_passes: u32,
}

impl Default for GenesisConsensus {
    fn default() -> Self {
        let replica = openagi_consensus::Config::default();
        let puzzle = PuzzleParams::DEFAULT;
        Self {
            checkpoint_interval: replica.checkpoint_interval,
            window: replica.window,
            join_difficulty_bits: puzzle.difficulty_bits,
            join_memory_kib: puzzle.memory_kib,
            join_passes: puzzle.passes,
        }
    }
}

impl GenesisConsensus {
    /// The join puzzle's parameters.
    pub fn join_puzzle(&self) -> PuzzleParams {
        PuzzleParams {
            difficulty_bits: self.join_difficulty_bits,
            memory_kib: self.join_memory_kib,
            passes: self.join_passes,
        }
    }
}

impl Genesis {
    /// Parses and checks genesis text.
    pub fn parse(text: &str) -> Result<Self> {
        let genesis: Genesis = toml::from_str(text).context("genesis is not valid")?;
        genesis.membership()?;
        Ok(genesis)
    }

    /// Reads the genesis file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The file's text, with a comment saying what it is.
    pub fn to_toml(&self) -> Result<String> {
        Ok(format!(
            "# Open-AGI genesis: the network id, its first validators (Ed25519 public\n\
             # keys, hex, in replica order) and the parameters every node shares\n\
             # ([consensus]: where validator-set changes take effect, what a join's\n\
             # proof of computation costs). Every node must hold an identical copy.\n{}",
            toml::to_string(self)?
        ))
    }

    /// The membership at genesis: its validators, and where and at what
    /// cost they change.
    pub fn membership(&self) -> Result<Membership> {
        let c = &self.consensus;
        Membership::genesis(
            self.validator_set()?,
            c.checkpoint_interval,
            c.window,
            c.join_puzzle(),
        )
        .map_err(|e| anyhow::anyhow!("genesis [consensus]: {e}"))
    }

    /// Checks that a validator's replica configuration agrees with the
    /// network's (the error names the key to fix), and sets the join
    /// puzzle from the genesis.
    pub fn apply_to(&self, replica: &mut openagi_consensus::Config) -> Result<()> {
        let c = &self.consensus;
        if replica.checkpoint_interval != c.checkpoint_interval {
            bail!(
                "consensus.checkpoint_interval is {} but this network's genesis says {}; remove it from the config (or set it to {})",
                replica.checkpoint_interval,
                c.checkpoint_interval,
                c.checkpoint_interval
            );
        }
        if replica.window != c.window {
            bail!(
                "consensus.window is {} but this network's genesis says {}; remove it from the config (or set it to {})",
                replica.window,
                c.window,
                c.window
            );
        }
        replica.join_puzzle = c.join_puzzle();
        Ok(())
    }

    /// The validator set this genesis defines.
    pub fn validator_set(&self) -> Result<ValidatorSet> {
        if self.validators.is_empty() || self.validators.len() > MAX_VALIDATORS {
            bail!(
                "genesis must list between 1 and {MAX_VALIDATORS} validators (has {})",
                self.validators.len()
            );
        }
        let members = self
            .validators
            .iter()
            .enumerate()
            .map(|(i, hex)| {
                PublicKey::from_hex(hex).with_context(|| {
                    format!("validators[{i}] = {hex:?} is not an Ed25519 public key")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        ValidatorSet::new(NetworkId::from_name(&self.network_id), members)
            .map_err(|e| anyhow::anyhow!("genesis validators: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openagi_crypto::Identity;

    fn key(b: u8) -> String {
        Identity::from_seed(&[b; 32]).public().to_hex()
    }

    #[test]
    fn round_trips_and_builds_the_set() {
        let g = Genesis {
            network_id: "net".into(),
            validators: vec![key(1), key(2), key(3), key(4)],
            consensus: GenesisConsensus {
                join_difficulty_bits: 3,
                ..GenesisConsensus::default()
            },
        };
        let parsed = Genesis::parse(&g.to_toml().expect("encodes")).expect("parses");
        assert_eq!(parsed, g);
        let set = parsed.validator_set().expect("valid");
        assert_eq!(set.n(), 4);
        assert_eq!(set.f(), 1);
    }

    #[test]
    fn bad_genesis_files_are_refused_with_the_reason() {
        let dup = Genesis {
            network_id: "net".into(),
            validators: vec![key(1), key(1)],
            consensus: GenesisConsensus::default(),
        };
        assert!(Genesis::parse(&dup.to_toml().expect("encodes")).is_err());
        let e = Genesis::parse("network_id = \"n\"\nvalidators = [\"zz\"]\n").expect_err("bad key");
        assert!(format!("{e:#}").contains("validators[0]"), "{e:#}");
        assert!(Genesis::parse("network_id = \"n\"\nvalidators = []\n").is_err());
        assert!(Genesis::parse("network_id = \"n\"\nvalidators = []\nextra = 1\n").is_err());
        // Parameters the membership cannot run with are refused.
        let bad_window = format!(
            "network_id = \"n\"\nvalidators = [\"{}\"]\n[consensus]\nwindow = 0\n",
            key(1)
        );
        let e = Genesis::parse(&bad_window).expect_err("window 0");
        assert!(format!("{e:#}").contains("[consensus]"), "{e:#}");
    }

    #[test]
    fn a_genesis_without_consensus_parameters_reads_as_the_defaults() {
        let old = format!("network_id = \"n\"\nvalidators = [\"{}\"]\n", key(1));
        let parsed = Genesis::parse(&old).expect("parses");
        assert_eq!(parsed.consensus, GenesisConsensus::default());
        assert_eq!(parsed.consensus.join_puzzle(), PuzzleParams::DEFAULT);
        let mut replica = openagi_consensus::Config {
            window: 128,
            ..openagi_consensus::Config::default()
        };
        let e = parsed.apply_to(&mut replica).expect_err("window differs");
        assert!(e.to_string().contains("consensus.window"), "{e}");
    }
}
