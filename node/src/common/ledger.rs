//! The stored ledger read back: re-checking it from genesis against the
//! validator set of each block's epoch, and the JSON form of a block that
//! the API and the offline CLI print.

use anyhow::{Result, bail};
use openagi_consensus::StrictCrypto;
use openagi_consensus::follow::{Follower, MAX_BLOCKS_PER_REQUEST};
use openagi_consensus::membership::Membership;

use crate::common::store::{BlockSource, Store};

/// Blocks checked per read, so verifying a long chain needs bounded memory.
const VERIFY_CHUNK: usize = 1024;

/// Verifies every stored block from genesis: hash links, batch roots,
/// timestamps and commit certificates (strict Ed25519), each against the
/// validator set of its epoch as the chain's own membership changes make
/// it (so a chain whose set changed verifies through the hand-offs).
/// Returns the verified height.
pub fn verify_stored(store: &Store, genesis: &Membership) -> Result<u64> {
    verify_blocks(store, genesis)
}

/// [`verify_stored`] over any block source, such as the database of a
/// stopped node.
pub fn verify_blocks(store: &impl BlockSource, genesis: &Membership) -> Result<u64> {
    let mut follower = Follower::new(genesis.clone());
    loop {
        let from = follower.head().height + 1;
        let chunk = store.blocks_from(from, VERIFY_CHUNK)?;
        if chunk.is_empty() {
            return Ok(follower.head().height);
        }
        if chunk[0].0.height != from {
            bail!("block {from} is missing from the store");
        }
        for piece in chunk.chunks(MAX_BLOCKS_PER_REQUEST as usize) {
            follower
                .handle_blocks(piece.to_vec(), &StrictCrypto)
                .map_err(|e| anyhow::anyhow!("ledger does not verify: {e}"))?;
        }
    }
}

/// What a validator-set transaction asks, for people reading a block:
/// a join (the candidate and its anchor), a leave (the validator and its
/// epoch) or a removal (the equivocator, the kind of vote, view and
/// sequence number, as the evidence shows when checked against the set).
/// Whether it took effect is the chain's business (`GET
/// /api/v1/validator/changes/{tx}`); this only reads the request.
fn membership_json(payload: &[u8]) -> Option<serde_json::Value> {
    use openagi_consensus::evidence::Equivocation;
    use openagi_consensus::membership::MembershipRequest;
    if let Ok(Some(request)) = MembershipRequest::from_payload(payload) {
        return Some(match request {
            MembershipRequest::Join(signed) => serde_json::json!({
                "kind": "join",
                "key": signed.signer().to_hex(),
                "anchor_height": signed.verify().ok().map(|j| j.anchor_height),
            }),
            MembershipRequest::Leave(signed) => serde_json::json!({
                "kind": "leave",
                "key": signed.signer().to_hex(),
                "epoch": signed.verify().ok().map(|l| l.epoch),
            }),
            MembershipRequest::Puzzle(signed) => {
                let vote = signed.verify().ok();
                serde_json::json!({
                    "kind": "puzzle_vote",
                    "key": signed.signer().to_hex(),
                    "epoch": vote.as_ref().map(|v| v.epoch),
                    "difficulty_bits": vote.as_ref().map(|v| v.params.difficulty_bits),
                    "memory_kib": vote.as_ref().map(|v| v.params.memory_kib),
                })
            }
        });
    }
    let (kind, evidence) = match Equivocation::from_removal_payload(payload) {
        Ok(Some(e)) => ("removal", e),
        _ => match Equivocation::from_payload(payload) {
            Ok(Some(e)) => ("evidence", e),
            _ => return None,
        },
    };
    let (signer, vote) = match &evidence {
        Equivocation::Prepares(a, _) => (a.signer().to_hex(), "prepare"),
        Equivocation::Commits(a, _) => (a.signer().to_hex(), "commit"),
    };
    Some(serde_json::json!({ "kind": kind, "key": signer, "votes": vote }))
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
        "transactions": block.txs.iter().map(|tx| {
            let mut json = serde_json::json!({
                "hash": hex::encode(tx.hash()),
                "client": hex::encode(tx.client.0),
                "seq": tx.seq,
                "payload_hex": hex::encode(&tx.payload),
            });
            if let Some(membership) = membership_json(&tx.payload) {
                json["membership"] = membership;
            }
            json
        }).collect::<Vec<_>>(),
        "certificate": {
            "view": certificate.view,
            "seq": certificate.seq,
            "signers": certificate.commits.iter().map(|c| c.signer().to_hex()).collect::<Vec<_>>(),
        },
    })
}
