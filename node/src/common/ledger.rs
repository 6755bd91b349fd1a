//! The stored ledger read back: re-checking it against the validator set,
//! and the JSON form of a block that the API and the offline CLI print.

use anyhow::{Result, bail};
use openagi_consensus::types::{ChainAnchor, verify_chain_from};
use openagi_consensus::{StrictCrypto, ValidatorSet};

use crate::common::store::{BlockSource, Store};

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

/// The JSON form of a block.
pub fn block_json(
    block: &openagi_consensus::Block,
    certificate: &openagi_consensus::CommitCertificate,
) -> serde_json::Value {
    serde_json::json!({
        "height": block.height,
        "hash": hex::encode(block.hash()),
        "view": block.view,
        "prev_hash": hex::encode(block.prev_hash),
        "batch_root": hex::encode(block.batch_root),
        "timestamp_ms": block.timestamp,
        "transactions": block.txs.iter().map(|tx| serde_json::json!({
            "hash": hex::encode(tx.hash()),
            "client": hex::encode(tx.client.0),
            "seq": tx.seq,
            "payload_hex": hex::encode(&tx.payload),
        })).collect::<Vec<_>>(),
        "certificate": {
            "view": certificate.view,
            "seq": certificate.seq,
            "signers": certificate.commits.iter().map(|c| c.signer().to_hex()).collect::<Vec<_>>(),
        },
    })
}
