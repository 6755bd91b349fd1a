//! The genesis file: which network this is and who its validators are.
//!
//! `genesis.toml` in the data directory fixes the consensus membership at
//! height 0. Every validator of a network must hold an identical file; the
//! network id it names must match `network.network_id`. A node without a
//! genesis file runs without consensus (it still gossips and serves its
//! API).

use std::path::Path;

use anyhow::{Context, Result, bail};
use openagi_consensus::{NetworkId, ValidatorSet};
use openagi_crypto::PublicKey;
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
}

impl Genesis {
    /// Parses and checks genesis text.
    pub fn parse(text: &str) -> Result<Self> {
        let genesis: Genesis = toml::from_str(text).context("genesis is not valid")?;
        genesis.validator_set()?;
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
            "# Open-AGI genesis: the network id and its validators (Ed25519 public keys,\n\
             # hex, in replica order). Every validator must hold an identical copy.\n{}",
            toml::to_string(self)?
        ))
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
        };
        assert!(Genesis::parse(&dup.to_toml().expect("encodes")).is_err());
        let e = Genesis::parse("network_id = \"n\"\nvalidators = [\"zz\"]\n").expect_err("bad key");
        assert!(format!("{e:#}").contains("validators[0]"), "{e:#}");
        assert!(Genesis::parse("network_id = \"n\"\nvalidators = []\n").is_err());
        assert!(Genesis::parse("network_id = \"n\"\nvalidators = []\nextra = 1\n").is_err());
    }
}
