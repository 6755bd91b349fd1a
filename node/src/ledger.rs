//! Re-checking the stored ledger against the validator set.

use anyhow::{Result, bail};
use openagi_consensus::types::{ChainAnchor, verify_chain_from};
use openagi_consensus::{StrictCrypto, ValidatorSet};

use crate::store::{BlockSource, Store};

/// Blocks checked per read, so verifying a long chain needs bounded memory.
const VERIFY_CHUNK: usize = 1024;

/// Verifies every stored block from genesis: hash links, batch roots,
/// timestamps and commit certificates (strict Ed25519). Returns the
/// verified height.
pub fn verify_stored(store: &Store, validators: &ValidatorSet) -> Result<u64> {
    verify_blocks(store, validators)
}

/// [`verify_stored`] over any block source, such as the database of a
/// stopped node.
pub fn verify_blocks(store: &impl BlockSource, validators: &ValidatorSet) -> Result<u64> {
    let mut anchor = ChainAnchor::genesis(validators.network());
    loop {
        let chunk = store.blocks_from(anchor.height + 1, VERIFY_CHUNK)?;
        if chunk.is_empty() {
            return Ok(anchor.height);
        }
        if chunk[0].0.height != anchor.height + 1 {
            bail!("block {} is missing from the store", anchor.height + 1);
        }
        let (blocks, certs): (Vec<_>, Vec<_>) = chunk.into_iter().unzip();
        verify_chain_from(anchor, &blocks, &certs, validators, &StrictCrypto)
            .map_err(|e| anyhow::anyhow!("ledger does not verify: {e}"))?;
        if let Some(last) = blocks.last() {
            anchor = ChainAnchor {
                height: last.height,
                hash: last.hash(),
                timestamp: last.timestamp,
            };
        }
    }
}
