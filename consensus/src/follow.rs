//! Following the ledger without voting: what a full node does.
//!
//! A [`Follower`] knows the validator set and the head it has verified. It
//! says which blocks to ask for next ([`Follower::next_request`]); the node
//! sends that to a peer over `/openagi/ledger/1` and hands the answer to
//! [`Follower::handle_blocks`], which verifies every block against the
//! chain and the validator set (hash links, batch roots, timestamps and a
//! commit certificate of a quorum of validators, strict Ed25519) before it
//! accepts any, and returns the accepted blocks for the node to store. A
//! peer that sends a forged block or certificate gets an error the node
//! turns into a penalty. Sans-IO like the replica: no clock, no network.
//!
//! The messages of `/openagi/ledger/1` are [`LedgerRequest`] and
//! [`LedgerResponse`] (postcard), answered by any node that holds the
//! ledger.

use serde::{Deserialize, Serialize};

use crate::signing::Crypto;
use crate::types::{Block, ChainAnchor, CommitCertificate, Transaction, ValidatorSet};
use crate::{Error, Hash};

/// Most blocks asked for in one request.
pub const MAX_BLOCKS_PER_REQUEST: u32 = 64;

/// A request on `/openagi/ledger/1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LedgerRequest {
    /// Committed blocks from height `from` on, at most `max` of them (and
    /// no more than fit the protocol's answer limit).
    Blocks {
        /// First height wanted.
        from: u64,
        /// Most blocks wanted.
        max: u32,
    },
    /// A transaction a full node forwards to a validator.
    Submit(Transaction),
    /// A new node redeems an invite code for the network's genesis.
    Redeem {
        /// The code as the inviter printed it.
        code: String,
    },
}

/// An answer on `/openagi/ledger/1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LedgerResponse {
    /// Blocks with their commit certificates, ascending from the requested
    /// height (empty when the peer has nothing newer).
    Blocks(Vec<(Block, CommitCertificate)>),
    /// The transaction was taken (its hash); it is not committed yet.
    Submitted(Hash),
    /// The transaction was taken before (a resubmission).
    Duplicate,
    /// Refused, and why.
    Refused(String),
    /// A redeemed invitation: what a new node needs to join.
    Invitation {
        /// The network id.
        network_id: String,
        /// The network's `genesis.toml`.
        genesis_toml: String,
    },
}

impl LedgerRequest {
    /// Wire encoding.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        postcard::to_stdvec(self).map_err(|e| Error::Malformed(e.to_string()))
    }

    /// Decodes a request (size is bounded by the protocol).
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        postcard::from_bytes(bytes).map_err(|e| Error::Malformed(e.to_string()))
    }
}

impl LedgerResponse {
    /// Wire encoding.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        postcard::to_stdvec(self).map_err(|e| Error::Malformed(e.to_string()))
    }

    /// Decodes an answer (size is bounded by the protocol).
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        postcard::from_bytes(bytes).map_err(|e| Error::Malformed(e.to_string()))
    }
}

/// A node following the ledger (see the module documentation).
#[derive(Clone, Debug)]
pub struct Follower {
    validators: ValidatorSet,
    anchor: ChainAnchor,
}

impl Follower {
    /// A follower whose verified ledger ends at `anchor` (the genesis
    /// anchor, or the head of the blocks it has stored).
    pub fn new(validators: ValidatorSet, anchor: ChainAnchor) -> Self {
        Self { validators, anchor }
    }

    /// The verified head.
    pub fn head(&self) -> ChainAnchor {
        self.anchor
    }

    /// The validator set blocks are checked against.
    pub fn validators(&self) -> &ValidatorSet {
        &self.validators
    }

    /// What to ask a peer for next.
    pub fn next_request(&self) -> LedgerRequest {
        LedgerRequest::Blocks {
            from: self.anchor.height + 1,
            max: MAX_BLOCKS_PER_REQUEST,
        }
    }

    /// Verifies `blocks` (as a peer sent them) as the continuation of the
    /// verified head and, if every one verifies, moves the head to the
    /// last and returns them for storing. Blocks at or below the head are
    /// skipped (a peer may answer with what we have). Nothing is accepted
    /// when any block fails: a forged block or certificate, a gap, or too
    /// many blocks.
    pub fn handle_blocks<C: Crypto>(
        &mut self,
        blocks: Vec<(Block, CommitCertificate)>,
        crypto: &C,
    ) -> Result<Vec<(Block, CommitCertificate)>, Error> {
        if blocks.len() > MAX_BLOCKS_PER_REQUEST as usize {
            return Err(Error::Malformed(format!(
                "{} blocks in one answer, at most {MAX_BLOCKS_PER_REQUEST} were asked for",
                blocks.len()
            )));
        }
        let fresh: Vec<(Block, CommitCertificate)> = blocks
            .into_iter()
            .filter(|(b, _)| b.height > self.anchor.height)
            .collect();
        if fresh.is_empty() {
            return Ok(Vec::new());
        }
        let (chain, certs): (Vec<Block>, Vec<CommitCertificate>) = fresh.iter().cloned().unzip();
        crate::types::verify_chain_from(self.anchor, &chain, &certs, &self.validators, crypto)?;
        if let Some(last) = chain.last() {
            self.anchor = ChainAnchor {
                height: last.height,
                hash: last.hash(),
                timestamp: last.timestamp,
            };
        }
        Ok(fresh)
    }
}
