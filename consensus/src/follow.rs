//! Following the ledger without voting: what a full node does.
//!
//! A [`Follower`] knows the validator set (as it changes along the chain:
//! [`crate::membership`]) and the head it has verified. It
//! says which blocks to ask for next ([`Follower::next_request`]); the node
//! sends that to a peer over `/openagi/ledger/1` and hands the answer to
//! [`Follower::handle_blocks`], which verifies every block against the
//! chain and the validator set of that block's epoch (hash links, batch
//! roots, timestamps and a commit certificate of a quorum of that set,
//! strict Ed25519) before it accepts any, and returns the accepted blocks
//! for the node to store. The old set's certificate over the block that
//! ends an epoch is the hand-off: the blocks after it are checked against
//! the set that block's changes made. A
//! peer that sends a forged block or certificate gets an error the node
//! turns into a penalty. Sans-IO like the replica: no clock, no network.
//!
//! The messages of `/openagi/ledger/1` are [`LedgerRequest`] and
//! [`LedgerResponse`] (postcard), answered by any node that holds the
//! ledger.

use serde::{Deserialize, Serialize};

use crate::ledger::Ledger;
use crate::membership::{BlockEffects, Membership, ProofCache};
use crate::signing::Crypto;
use crate::types::{
    Block, ChainAnchor, CommitCertificate, Transaction, ValidatorSet, verify_block,
};
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
    /// The verified chain's head and exactly-once table (which
    /// transactions took effect, so membership changes are read as the
    /// validators read them).
    ledger: Ledger,
    membership: Membership,
    proofs: ProofCache,
    /// What recent blocks did to the membership, not yet taken.
    effects: Vec<(u64, BlockEffects)>,
}

/// Membership effects kept until taken (older ones are dropped).
pub const MAX_KEPT_EFFECTS: usize = 64;

impl Follower {
    /// A follower at genesis, with the network's genesis membership.
    pub fn new(membership: Membership) -> Self {
        let network = membership.epoch().validators.network();
        Self {
            ledger: Ledger::keeping(network, 1),
            membership,
            proofs: ProofCache::default(),
            effects: Vec::new(),
        }
    }

    /// Folds in a block this node stored earlier (verified when it came):
    /// only the hash link is checked, as a restarted replica does. Blocks
    /// must come in height order from 1.
    pub fn replay<C: Crypto>(
        &mut self,
        block: Block,
        cert: CommitCertificate,
        crypto: &C,
    ) -> Result<(), Error> {
        let head = self.ledger.head();
        if block.height != head.height.saturating_add(1) || block.prev_hash != head.hash {
            return Err(Error::InvalidBlock {
                height: block.height,
                reason: "stored chain does not link".into(),
            });
        }
        self.apply(block, cert, crypto).map(|_| ())
    }

    fn apply<C: Crypto>(
        &mut self,
        block: Block,
        cert: CommitCertificate,
        crypto: &C,
    ) -> Result<BlockEffects, Error> {
        let (height, hash) = (block.height, block.hash());
        let applied = self.ledger.append(block, cert);
        let effects =
            self.membership
                .apply_block(height, hash, &applied, crypto, &mut self.proofs)?;
        if !effects.is_empty() {
            if self.effects.len() >= MAX_KEPT_EFFECTS {
                self.effects.remove(0);
            }
            self.effects.push((height, effects.clone()));
        }
        Ok(effects)
    }

    /// What blocks taken since the last call did to the membership
    /// (changes scheduled, requests refused), by height.
    pub fn take_effects(&mut self) -> Vec<(u64, BlockEffects)> {
        std::mem::take(&mut self.effects)
    }

    /// The verified head.
    pub fn head(&self) -> ChainAnchor {
        self.ledger.head()
    }

    /// The validator set of the next block's epoch.
    pub fn validators(&self) -> &ValidatorSet {
        &self.membership.epoch().validators
    }

    /// The membership along the verified chain.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// What to ask a peer for next.
    pub fn next_request(&self) -> LedgerRequest {
        LedgerRequest::Blocks {
            from: self.head().height + 1,
            max: MAX_BLOCKS_PER_REQUEST,
        }
    }

    /// Verifies `blocks` (as a peer sent them) as the continuation of the
    /// verified head, each against its own epoch's set, and returns them
    /// for storing. Blocks at or below the head are skipped (a peer may
    /// answer with what we have). Nothing is accepted when any block
    /// fails: a forged block or certificate, a gap, or too many blocks.
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
        let head = self.head().height;
        let fresh: Vec<(Block, CommitCertificate)> = blocks
            .into_iter()
            .filter(|(b, _)| b.height > head)
            .collect();
        // Checked on a copy, kept only when every block verified.
        let mut next = self.clone();
        for (block, cert) in &fresh {
            let anchor = next.head();
            verify_block(&anchor, block, cert, next.validators(), crypto)?;
            next.apply(block.clone(), cert.clone(), crypto)?;
        }
        *self = next;
        Ok(fresh)
    }
}
