//! The validator set as ledger state: who votes in which epoch, changed
//! only by committed transactions.
//!
//! Three kinds of change exist:
//! - a **join**, signed by the candidate, carrying a proof of computation
//!   (the memory-hard identity puzzle of `openagi_crypto::poc`) bound to
//!   the candidate's key, the network and a recent block (the anchor), so
//!   it cannot be computed before that block existed nor kept for later;
//! - a **leave**, signed by the leaving validator for the epoch it leaves;
//! - a **removal**, brought about by committed equivocation evidence
//!   ([`crate::evidence::REMOVAL_TAG`]); the equivocator may never join
//!   again. Removals are not counted against the churn bound: one that
//!   cannot join the transition in flight waits for the next.
//!
//! A join is used once: the same candidate cannot join again with the
//! same anchor (so a committed join cannot be replayed after a leave).
//!
//! [`Membership`] is a pure function of the committed chain: every node
//! (validator or full node) feeds it each executed block in order with
//! [`Membership::apply_block`] and so computes the same epochs. A change
//! committed at height `h` takes effect at a **boundary**: the first
//! checkpoint height at or above `h`, plus the watermark window. Every
//! sequence number up to the boundary is decided by the old set: a replica
//! proposes or votes for number `s` only once its stable checkpoint is at
//! least `s - window`, and for `s` past the boundary that checkpoint lies
//! above `h`, so every replica voting there has executed the change. The
//! old set's checkpoint certificate at the boundary is the hand-off: the
//! new set starts from that certified state.
//!
//! Churn is bounded: one transition is in flight at a time, carrying at
//! most `max(1, f)` changes of the set in force (its `f`), and a set never
//! grows past [`MAX_VALIDATORS`] nor, by leaves, shrinks below
//! [`MIN_VALIDATORS`] (or the genesis size, if smaller). Proofs are checked
//! after every cheap check, at most [`PROOF_CHECKS_PER_INTERVAL`] per
//! checkpoint interval of blocks.

use std::collections::{BTreeSet, HashMap, VecDeque};

use openagi_crypto::identity::SignedPayload;
use openagi_crypto::poc::{PuzzleInput, PuzzleParams, Verifier};
use openagi_crypto::{PublicKey, Signed};
use serde::{Deserialize, Serialize};

use crate::evidence::Equivocation;
use crate::signing::Crypto;
use crate::types::{NetworkId, Transaction, ValidatorSet};
use crate::{Error, Hash};

/// The first bytes of a ledger transaction that carries a join or leave.
pub const MEMBERSHIP_TAG: &[u8] = b"openagi/membership/v1\n";

/// How many checkpoints back a join's anchor may be when the join commits.
/// Anchors are checkpoint blocks (or genesis), so the window is this many
/// checkpoint intervals of blocks (65,536 with the default 16): minutes
/// even at a hundred blocks a second, for a puzzle that takes minutes to
/// solve, and a proof is worthless after it. Each kept anchor is a height
/// and a hash, so the window costs 160 KiB.
pub const ANCHOR_CHECKPOINTS: u64 = 4_096;

/// The largest validator set joins may make: a new view's worst-case size
/// grows with the square of the set, and with the default window and
/// batch limits 16 keeps it well under the message limit every node
/// applies (a genesis may list more where its configuration allows).
pub const MAX_VALIDATORS: usize = 16;

/// Leaves may not shrink a set below this (or below the genesis size,
/// when the network started smaller): four is the smallest set that
/// survives one faulty validator. Removals of proven equivocators may.
pub const MIN_VALIDATORS: usize = 4;

/// Proof verdicts remembered (see [`ProofCache`]).
pub const PROOF_CACHE_ENTRIES: usize = 1_024;

/// Keys removed for equivocation that are remembered, so that they cannot
/// join again; the oldest are forgotten past this.
pub const MAX_BANNED: usize = 4_096;

/// Most memory times passes a vote may set for one puzzle attempt (128 MiB
/// for one pass): every node spends it on each join proof it checks, some
/// of them on the consensus task.
pub const MAX_VOTED_MEMORY_KIB: u32 = 128 * 1024;

/// Most difficulty a vote may set (20 bits: about a million attempts, many
/// hours of one core at 64 MiB), so joining stays possible.
pub const MAX_VOTED_DIFFICULTY_BITS: u32 = 20;

/// Join proofs checked per checkpoint interval of blocks: every node runs
/// one Argon2id per proof that passes the cheap checks when the block
/// executes, so a faulty primary ordering joins with worthless proofs
/// under fresh keys could otherwise make every block cost seconds. Joins
/// past the budget are refused (to be submitted again); honest validators
/// check proofs before admitting a join, so only a faulty one spends it.
pub const PROOF_CHECKS_PER_INTERVAL: u32 = 4;

/// A candidate's request to become a validator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The network joined.
    pub network: NetworkId,
    /// Height of the block the proof is anchored to.
    pub anchor_height: u64,
    /// Hash of that block.
    pub anchor_hash: Hash,
    /// The identity puzzle's solution for the signer's key and the anchor.
    pub nonce: u64,
}

impl SignedPayload for JoinRequest {
    const CONTEXT: &'static str = "openagi/membership/join/v1";
}

/// A validator's request to stop being one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveRequest {
    /// The network left.
    pub network: NetworkId,
    /// The epoch the validator leaves (its request means nothing in any
    /// other, so it cannot be replayed after a later join).
    pub epoch: u64,
}

impl SignedPayload for LeaveRequest {
    const CONTEXT: &'static str = "openagi/membership/leave/v1";
}

/// A validator's vote for new join puzzle parameters. Once a quorum of
/// the set in force has voted for the same parameters in one epoch, they
/// take effect at the boundary of the last vote's height (like any change)
/// and every later join must solve them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PuzzleVote {
    /// The network.
    pub network: NetworkId,
    /// The epoch the vote counts in (votes do not carry over).
    pub epoch: u64,
    /// The parameters voted for.
    pub params: PuzzleParams,
}

impl SignedPayload for PuzzleVote {
    const CONTEXT: &'static str = "openagi/membership/puzzle-vote/v1";
}

/// The payload of a membership transaction (after [`MEMBERSHIP_TAG`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MembershipRequest {
    /// Become a validator.
    Join(Signed<JoinRequest>),
    /// Stop being one.
    Leave(Signed<LeaveRequest>),
    /// Change what a join costs.
    Puzzle(Signed<PuzzleVote>),
}

/// What a membership transaction that passed every check does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A change of the set (scheduled).
    Change(Change),
    /// A vote for join puzzle parameters (counted).
    PuzzleVote(PuzzleParams),
}

impl MembershipRequest {
    /// The ledger transaction payload carrying this request.
    pub fn to_payload(&self) -> Result<Vec<u8>, Error> {
        let mut out = MEMBERSHIP_TAG.to_vec();
        out.extend(
            postcard::to_stdvec(self)
                .map_err(|e| Error::Malformed(format!("membership request: {e}")))?,
        );
        Ok(out)
    }

    /// The request in a ledger payload: `Ok(None)` for payloads that are
    /// not membership requests, an error for tagged payloads that do not
    /// decode.
    pub fn from_payload(payload: &[u8]) -> Result<Option<Self>, Refusal> {
        match payload.strip_prefix(MEMBERSHIP_TAG) {
            None => Ok(None),
            Some(rest) => postcard::from_bytes(rest)
                .map(Some)
                .map_err(|e| Refusal::Malformed(e.to_string())),
        }
    }
}

/// One change of the validator set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The key becomes a validator.
    Join(PublicKey),
    /// The validator leaves of its own accord.
    Leave(PublicKey),
    /// The validator is removed for proven equivocation.
    Remove(PublicKey),
}

impl Change {
    /// The key the change is about.
    pub fn key(&self) -> &PublicKey {
        match self {
            Change::Join(k) | Change::Leave(k) | Change::Remove(k) => k,
        }
    }
}

/// Why a membership transaction took no effect. The message names what
/// is wrong and, where there is one, what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The payload does not decode.
    #[error("malformed membership request: {0}")]
    Malformed(String),
    /// The request's signature does not verify.
    #[error("the request's signature does not verify")]
    BadSignature,
    /// The request names another network.
    #[error("the request is for another network")]
    WrongNetwork,
    /// The anchor is too old (or from the future) at the height the join
    /// was committed.
    #[error(
        "stale proof: anchored at height {anchor}, committed at {height}; anchors may be at most {max_age} blocks old, so solve again against a recent checkpoint"
    )]
    StaleAnchor {
        /// The anchor height.
        anchor: u64,
        /// Height of the block carrying the join.
        height: u64,
        /// [`Membership::anchor_max_age`].
        max_age: u64,
    },
    /// The anchor hash is not the ledger's block at that height.
    #[error(
        "wrong proof: height {anchor} is not a checkpoint of this chain with that hash (anchors are checkpoint blocks)"
    )]
    WrongAnchor {
        /// The anchor height.
        anchor: u64,
    },
    /// The nonce does not solve the puzzle at the required difficulty.
    #[error(
        "wrong or too cheap proof: the nonce does not give {difficulty_bits} leading zero bits for this key and anchor"
    )]
    BadProof {
        /// The difficulty in force.
        difficulty_bits: u32,
    },
    /// The puzzle parameters in force cannot be run.
    #[error("the network's puzzle parameters are unusable: {0}")]
    Params(String),
    /// The candidate is already a validator (or joining).
    #[error("the key is already a validator or has a change pending")]
    AlreadyMember,
    /// The key is not a validator.
    #[error("the key is not a validator of the current epoch")]
    NotMember,
    /// The key was removed for equivocation.
    #[error("the key was removed for equivocation and may not join again")]
    Banned,
    /// The join was used before.
    #[error("this join was used before; solve again against a recent block")]
    Replayed,
    /// A leave names another epoch.
    #[error("the leave is for epoch {got}, the current one is {current}")]
    WrongEpoch {
        /// The current epoch.
        current: u64,
        /// The request's epoch.
        got: u64,
    },
    /// The interval's proof checks are spent.
    #[error("too many joins to check in blocks {first}..={last}; submit again after height {last}")]
    ProofBudget {
        /// The interval's first height.
        first: u64,
        /// Its last.
        last: u64,
    },
    /// Parameters outside the bounds every node can run, or the ones in
    /// force already.
    #[error("puzzle parameters refused: {0}")]
    BadPuzzle(String),
    /// A transition to a later boundary is already in flight.
    #[error(
        "a validator-set change already takes effect at height {boundary}; submit again after it"
    )]
    TransitionPending {
        /// Its boundary.
        boundary: u64,
    },
    /// The transition already carries as many changes as allowed.
    #[error(
        "at most {limit} validator-set changes per epoch; submit again after height {boundary}"
    )]
    ChurnLimit {
        /// The cap.
        limit: usize,
        /// The boundary of the full transition.
        boundary: u64,
    },
    /// The set would grow past [`MAX_VALIDATORS`].
    #[error("the validator set is full ({max} validators)")]
    TooManyValidators {
        /// The cap.
        max: usize,
    },
    /// A leave would shrink the set below the minimum.
    #[error("leaving would leave fewer than {min} validators")]
    TooFewValidators {
        /// The floor.
        min: usize,
    },
    /// Equivocation evidence that does not prove anything.
    #[error("evidence does not verify: {0}")]
    BadEvidence(String),
}

/// What the cheap checks leave.
enum Checked {
    /// Decided: the change.
    Done(Change),
    /// A puzzle vote to count.
    Vote(PublicKey, PuzzleParams),
    /// A join whose proof is still to check.
    Proof(PublicKey, JoinRequest),
}

/// A validator set and the heights it decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epoch {
    /// 0 for the genesis set, then one more per transition.
    pub number: u64,
    /// The first height this set decides.
    pub first_height: u64,
    /// The set.
    pub validators: ValidatorSet,
    /// Members that joined at the start of this epoch; they do not lead a
    /// view before the next epoch.
    pub newcomers: Vec<PublicKey>,
}

/// The changes in flight and where they take effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The last height the current set decides.
    pub boundary: u64,
    /// The changes, in commit order.
    pub changes: Vec<Change>,
}

/// What one block did to the membership.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockEffects {
    /// Changes scheduled, with the transaction that carried each.
    pub scheduled: Vec<(Hash, Change)>,
    /// Membership transactions refused, with the reason.
    pub refused: Vec<(Hash, Refusal)>,
    /// The epoch that starts after this block, when it is a boundary.
    pub new_epoch: Option<Epoch>,
    /// Puzzle votes counted, with the transaction that carried each.
    pub votes: Vec<(Hash, PuzzleParams)>,
    /// New puzzle parameters a quorum voted for in this block, and the
    /// last height before they apply.
    pub puzzle_scheduled: Option<(u64, PuzzleParams)>,
}

impl BlockEffects {
    /// Whether the block did anything to the membership at all.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
            && self.refused.is_empty()
            && self.new_epoch.is_none()
            && self.votes.is_empty()
            && self.puzzle_scheduled.is_none()
    }
}

/// Remembers proof verdicts, keyed by everything the verdict depends on,
/// so one holder checks a proof once however often it is asked (a replica
/// keeps one for the blocks it executes). Bounded: emptied when full.
#[derive(Clone, Debug, Default)]
pub struct ProofCache {
    verdicts: HashMap<Hash, bool>,
}

impl ProofCache {
    fn key(
        network: NetworkId,
        candidate: &PublicKey,
        join: &JoinRequest,
        params: &PuzzleParams,
    ) -> Hash {
        let mut h = blake3::Hasher::new_derive_key("openagi membership proof verdict v1");
        h.update(&network.0);
        h.update(&candidate.to_bytes());
        h.update(&join.anchor_height.to_be_bytes());
        h.update(&join.anchor_hash);
        h.update(&join.nonce.to_be_bytes());
        h.update(&params.difficulty_bits.to_be_bytes());
        h.update(&params.memory_kib.to_be_bytes());
        h.update(&params.passes.to_be_bytes());
        *h.finalize().as_bytes()
    }

    /// Checks the identity puzzle, from the cache when possible.
    pub fn check(
        &mut self,
        network: NetworkId,
        candidate: &PublicKey,
        join: &JoinRequest,
        params: &PuzzleParams,
    ) -> Result<(), Refusal> {
        let key = Self::key(network, candidate, join, params);
        let valid = match self.verdicts.get(&key) {
            Some(valid) => *valid,
            None => {
                let mut verifier =
                    Verifier::new(*params).map_err(|e| Refusal::Params(e.to_string()))?;
                let input = PuzzleInput {
                    public_key: candidate,
                    network_id: &network.0,
                    anchor_height: join.anchor_height,
                    anchor_hash: &join.anchor_hash,
                };
                let valid = verifier.verify(&input, join.nonce).is_ok();
                if self.verdicts.len() >= PROOF_CACHE_ENTRIES {
                    self.verdicts.clear();
                }
                self.verdicts.insert(key, valid);
                valid
            }
        };
        if valid {
            Ok(())
        } else {
            Err(Refusal::BadProof {
                difficulty_bits: params.difficulty_bits,
            })
        }
    }
}

/// The validator set as it evolves along the committed chain.
#[derive(Clone, Debug)]
pub struct Membership {
    network: NetworkId,
    checkpoint_interval: u64,
    window: u64,
    params: PuzzleParams,
    min_validators: usize,
    epoch: Epoch,
    previous: Option<Epoch>,
    transition: Option<Transition>,
    /// Hashes of genesis and the checkpoint blocks a join may anchor to
    /// (the last [`ANCHOR_CHECKPOINTS`] + 1), oldest first.
    recent: VecDeque<(u64, Hash)>,
    banned: VecDeque<PublicKey>,
    height: u64,
    /// Proof checks spent in the current checkpoint interval: (interval
    /// index, count).
    proof_checks: (u64, u32),
    /// Joins taken, as (candidate, anchor height), until their anchors
    /// are too old to be used anyway.
    used_joins: VecDeque<(PublicKey, u64)>,
    /// Removals committed while a transition to an earlier boundary was
    /// in flight: they start the next one.
    deferred: Vec<(u64, Change)>,
    /// Puzzle votes of this epoch, one per validator (its latest).
    puzzle_votes: Vec<(PublicKey, PuzzleParams)>,
    /// Puzzle parameters voted in, and the last height before they apply.
    pending_puzzle: Option<(u64, PuzzleParams)>,
}

impl Membership {
    /// The membership at genesis: `validators` decide from height 1.
    /// `checkpoint_interval` and `window` are the consensus configuration's
    /// (every node of the network uses the same), `params` the join
    /// puzzle's.
    pub fn genesis(
        validators: ValidatorSet,
        checkpoint_interval: u64,
        window: u64,
        params: PuzzleParams,
    ) -> Result<Self, Error> {
        if checkpoint_interval == 0
            || window < 2 * checkpoint_interval
            || !window.is_multiple_of(checkpoint_interval)
        {
            return Err(Error::Config(
                "window must be a multiple of checkpoint_interval and at least twice it".into(),
            ));
        }
        params
            .validate()
            .map_err(|e| Error::Config(format!("join puzzle parameters: {e}")))?;
        let min_validators = MIN_VALIDATORS.min(validators.n());
        let genesis_anchor = crate::types::genesis_hash(validators.network());
        Ok(Self {
            network: validators.network(),
            checkpoint_interval,
            window,
            params,
            min_validators,
            epoch: Epoch {
                number: 0,
                first_height: 1,
                validators,
                newcomers: Vec::new(),
            },
            previous: None,
            transition: None,
            recent: VecDeque::from([(0, genesis_anchor)]),
            banned: VecDeque::new(),
            height: 0,
            proof_checks: (0, 0),
            used_joins: VecDeque::new(),
            deferred: Vec::new(),
            puzzle_votes: Vec::new(),
            pending_puzzle: None,
        })
    }

    /// The epoch in force for the next height.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The epoch before it, whose checkpoint certificate at the boundary
    /// handed over to the current one.
    pub fn previous_epoch(&self) -> Option<&Epoch> {
        self.previous.as_ref()
    }

    /// The changes in flight, if any.
    pub fn transition(&self) -> Option<&Transition> {
        self.transition.as_ref()
    }

    /// The join puzzle's parameters in force.
    pub fn params(&self) -> &PuzzleParams {
        &self.params
    }

    /// Puzzle parameters voted in and the last height before they apply.
    pub fn pending_puzzle(&self) -> Option<(u64, PuzzleParams)> {
        self.pending_puzzle
    }

    /// This epoch's puzzle votes: the parameters and how many validators
    /// voted for them.
    pub fn puzzle_votes(&self) -> Vec<(PuzzleParams, usize)> {
        let mut tally: Vec<(PuzzleParams, usize)> = Vec::new();
        for (_, params) in &self.puzzle_votes {
            match tally.iter_mut().find(|(p, _)| p == params) {
                Some((_, n)) => *n += 1,
                None => tally.push((*params, 1)),
            }
        }
        tally
    }

    /// Height of the last block applied.
    pub fn height(&self) -> u64 {
        self.height
    }

    /// The highest sequence number the current set may decide: the
    /// boundary of the transition in flight. A replica caps its high
    /// watermark there.
    pub fn last_height_of_epoch(&self) -> Option<u64> {
        self.transition.as_ref().map(|t| t.boundary)
    }

    /// Where a change committed at `height` takes effect.
    pub fn boundary_for(&self, height: u64) -> u64 {
        let interval = self.checkpoint_interval;
        height
            .div_ceil(interval)
            .saturating_mul(interval)
            .saturating_add(self.window)
    }

    /// How many blocks old an anchor may be when its join commits.
    pub fn anchor_max_age(&self) -> u64 {
        ANCHOR_CHECKPOINTS.saturating_mul(self.checkpoint_interval)
    }

    /// The newest anchor a join's proof may use: the last checkpoint block
    /// (or genesis) and its hash.
    pub fn anchor(&self) -> Option<(u64, Hash)> {
        self.recent.back().copied()
    }

    fn is_banned(&self, key: &PublicKey) -> bool {
        self.banned.contains(key)
    }

    fn pending_for(&self, key: &PublicKey) -> bool {
        self.transition
            .as_ref()
            .is_some_and(|t| t.changes.iter().any(|c| c.key() == key))
    }

    /// The size the set would have after the transition in flight.
    fn size_after_transition(&self) -> usize {
        let n = self.epoch.validators.n();
        let Some(t) = &self.transition else {
            return n;
        };
        t.changes.iter().fold(n, |n, c| match c {
            Change::Join(_) => n + 1,
            Change::Leave(_) | Change::Remove(_) => n.saturating_sub(1),
        })
    }

    /// Checks that a change committed at `height` can join the transition
    /// in flight (or start one); returns the boundary it would take effect
    /// at.
    fn check_slot(&self, height: u64) -> Result<u64, Refusal> {
        let boundary = self.boundary_for(height);
        let Some(t) = &self.transition else {
            return Ok(boundary);
        };
        if t.boundary != boundary {
            return Err(Refusal::TransitionPending {
                boundary: t.boundary,
            });
        }
        let limit = self.epoch.validators.f().max(1);
        if t.changes.len() >= limit {
            return Err(Refusal::ChurnLimit {
                limit,
                boundary: t.boundary,
            });
        }
        Ok(boundary)
    }

    /// Checks a join or leave as if it were committed at `height` (the
    /// next block, for admission), proof last. Returns the change it
    /// would make.
    pub fn check_request<C: Crypto>(
        &self,
        request: &MembershipRequest,
        height: u64,
        crypto: &C,
        proofs: &mut ProofCache,
    ) -> Result<Accepted, Refusal> {
        match self.check_cheap(request, height, crypto)? {
            Checked::Done(change) => Ok(Accepted::Change(change)),
            Checked::Vote(_, params) => Ok(Accepted::PuzzleVote(params)),
            Checked::Proof(candidate, join) => {
                proofs.check(self.network, &candidate, &join, &self.params)?;
                Ok(Accepted::Change(Change::Join(candidate)))
            }
        }
    }

    /// Everything but the proof: a leave is decided, a join is left with
    /// its proof to check.
    fn check_cheap<C: Crypto>(
        &self,
        request: &MembershipRequest,
        height: u64,
        crypto: &C,
    ) -> Result<Checked, Refusal> {
        match request {
            MembershipRequest::Join(signed) => {
                let candidate = *signed.signer();
                let join = crypto.open(signed).map_err(|_| Refusal::BadSignature)?;
                if join.network != self.network {
                    return Err(Refusal::WrongNetwork);
                }
                if join.anchor_height >= height {
                    // Not a block of this chain yet: no stale proof, a wrong one.
                    return Err(Refusal::WrongAnchor {
                        anchor: join.anchor_height,
                    });
                }
                if height - join.anchor_height > self.anchor_max_age() {
                    return Err(Refusal::StaleAnchor {
                        anchor: join.anchor_height,
                        height,
                        max_age: self.anchor_max_age(),
                    });
                }
                let known = self
                    .recent
                    .iter()
                    .find(|(h, _)| *h == join.anchor_height)
                    .map(|(_, hash)| *hash);
                match known {
                    Some(hash) if hash == join.anchor_hash => {}
                    _ => {
                        return Err(Refusal::WrongAnchor {
                            anchor: join.anchor_height,
                        });
                    }
                }
                if self.is_banned(&candidate) {
                    return Err(Refusal::Banned);
                }
                if self
                    .used_joins
                    .iter()
                    .any(|(key, anchor)| *key == candidate && *anchor == join.anchor_height)
                {
                    return Err(Refusal::Replayed);
                }
                if self.epoch.validators.index_of(&candidate).is_some()
                    || self.pending_for(&candidate)
                {
                    return Err(Refusal::AlreadyMember);
                }
                if self.size_after_transition() >= MAX_VALIDATORS {
                    return Err(Refusal::TooManyValidators {
                        max: MAX_VALIDATORS,
                    });
                }
                self.check_slot(height)?;
                // The one expensive check comes after all the cheap ones.
                Ok(Checked::Proof(candidate, join))
            }
            MembershipRequest::Leave(signed) => {
                let leaving = *signed.signer();
                let leave = crypto.open(signed).map_err(|_| Refusal::BadSignature)?;
                self.check_validator_request(leave.network, leave.epoch, &leaving)?;
                if self.pending_for(&leaving) {
                    return Err(Refusal::AlreadyMember);
                }
                if self.size_after_transition() <= self.min_validators {
                    return Err(Refusal::TooFewValidators {
                        min: self.min_validators,
                    });
                }
                self.check_slot(height)?;
                Ok(Checked::Done(Change::Leave(leaving)))
            }
            MembershipRequest::Puzzle(signed) => {
                let voter = *signed.signer();
                let vote = crypto.open(signed).map_err(|_| Refusal::BadSignature)?;
                self.check_validator_request(vote.network, vote.epoch, &voter)?;
                vote.params
                    .validate()
                    .map_err(|e| Refusal::BadPuzzle(e.to_string()))?;
                let work = u64::from(vote.params.memory_kib) * u64::from(vote.params.passes);
                if work > u64::from(MAX_VOTED_MEMORY_KIB)
                    || vote.params.difficulty_bits > MAX_VOTED_DIFFICULTY_BITS
                {
                    return Err(Refusal::BadPuzzle(format!(
                        "at most {MAX_VOTED_DIFFICULTY_BITS} bits and {MAX_VOTED_MEMORY_KIB} KiB times passes"
                    )));
                }
                if vote.params == self.params {
                    return Err(Refusal::BadPuzzle(
                        "these are the parameters in force".into(),
                    ));
                }
                Ok(Checked::Vote(voter, vote.params))
            }
        }
    }

    /// A request only a validator of the current epoch may make: for this
    /// network, naming this epoch, signed by a member.
    fn check_validator_request(
        &self,
        network: NetworkId,
        epoch: u64,
        signer: &PublicKey,
    ) -> Result<(), Refusal> {
        if network != self.network {
            return Err(Refusal::WrongNetwork);
        }
        if epoch != self.epoch.number {
            return Err(Refusal::WrongEpoch {
                current: self.epoch.number,
                got: epoch,
            });
        }
        if self.epoch.validators.index_of(signer).is_none() {
            return Err(Refusal::NotMember);
        }
        Ok(())
    }

    /// Counts `voter`'s vote (replacing an earlier one of this epoch);
    /// returns the parameters and their boundary once a quorum of the set
    /// in force agrees.
    fn count_vote(
        &mut self,
        height: u64,
        voter: PublicKey,
        params: PuzzleParams,
    ) -> Option<(u64, PuzzleParams)> {
        self.puzzle_votes.retain(|(k, _)| *k != voter);
        self.puzzle_votes.push((voter, params));
        let agreeing = self
            .puzzle_votes
            .iter()
            .filter(|(_, p)| *p == params)
            .count();
        if agreeing < self.epoch.validators.quorum() {
            return None;
        }
        self.puzzle_votes.clear();
        let scheduled = (self.boundary_for(height), params);
        self.pending_puzzle = Some(scheduled);
        Some(scheduled)
    }

    /// Remembers a join taken at `height`, so it cannot be taken again;
    /// forgets those whose anchors are too old to be used anyway.
    fn use_join(&mut self, height: u64, candidate: PublicKey, anchor: u64) {
        let horizon = height.saturating_sub(self.anchor_max_age());
        while self.used_joins.front().is_some_and(|(_, a)| *a < horizon) {
            self.used_joins.pop_front();
        }
        self.used_joins.push_back((candidate, anchor));
    }

    /// Spends one of the interval's proof checks for a join committed at
    /// `height`.
    fn spend_proof_check(&mut self, height: u64) -> Result<(), Refusal> {
        let interval = self.checkpoint_interval;
        let index = height.saturating_sub(1) / interval;
        if self.proof_checks.0 != index {
            self.proof_checks = (index, 0);
        }
        if self.proof_checks.1 >= PROOF_CHECKS_PER_INTERVAL {
            let first = index.saturating_mul(interval).saturating_add(1);
            return Err(Refusal::ProofBudget {
                first,
                last: first.saturating_add(interval - 1),
            });
        }
        self.proof_checks.1 += 1;
        Ok(())
    }

    /// Checks committed equivocation evidence as a removal.
    fn check_evidence<C: Crypto>(
        &self,
        evidence: &Equivocation,
        crypto: &C,
    ) -> Result<Change, Refusal> {
        let proven = evidence
            .verify(&self.epoch.validators, crypto)
            .map_err(|e| Refusal::BadEvidence(e.to_string()))?;
        let key = proven.validator;
        if self.deferred.iter().any(|(_, c)| *c.key() == key) {
            return Err(Refusal::AlreadyMember);
        }
        if self.pending_for(&key) {
            // Already leaving or being removed; a leave becomes a removal
            // below so the key is banned all the same.
            return Ok(Change::Remove(key));
        }
        if self
            .size_after_transition()
            .saturating_sub(self.deferred.len())
            <= 1
        {
            return Err(Refusal::TooFewValidators { min: 1 });
        }
        // Not limited by the churn bound; a removal that cannot join the
        // transition in flight is deferred (see `schedule`).
        Ok(Change::Remove(key))
    }

    fn schedule(&mut self, height: u64, change: Change) {
        let boundary = self.boundary_for(height);
        if matches!(change, Change::Remove(_))
            && self
                .transition
                .as_ref()
                .is_some_and(|t| t.boundary != boundary)
            && !self.pending_for(change.key())
        {
            self.deferred.push((height, change));
            return;
        }
        let transition = self.transition.get_or_insert_with(|| Transition {
            boundary,
            changes: Vec::new(),
        });
        if let Change::Remove(key) = change
            && let Some(existing) = transition.changes.iter_mut().find(|c| *c.key() == key)
        {
            *existing = change;
            return;
        }
        transition.changes.push(change);
    }

    /// Folds in the next executed block: `txs` are the transactions that
    /// took effect in it (not duplicates), `block_hash` its hash. Blocks
    /// must come in height order; a block that does not extend the last
    /// one is an error and changes nothing.
    pub fn apply_block<C: Crypto>(
        &mut self,
        height: u64,
        block_hash: Hash,
        txs: &[Transaction],
        crypto: &C,
        proofs: &mut ProofCache,
    ) -> Result<BlockEffects, Error> {
        if height != self.height.saturating_add(1) {
            return Err(Error::InvalidBlock {
                height,
                reason: format!("membership expects height {}", self.height + 1),
            });
        }
        let mut effects = BlockEffects::default();
        for tx in txs {
            let outcome =
                if let Some(request) = MembershipRequest::from_payload(&tx.payload).transpose() {
                    request
                        .and_then(|r| self.check_cheap(&r, height, crypto))
                        .and_then(|checked| match checked {
                            Checked::Done(change) => Ok(Accepted::Change(change)),
                            Checked::Vote(voter, params) => {
                                if let Some(scheduled) = self.count_vote(height, voter, params) {
                                    effects.puzzle_scheduled = Some(scheduled);
                                }
                                Ok(Accepted::PuzzleVote(params))
                            }
                            Checked::Proof(candidate, join) => {
                                self.spend_proof_check(height)?;
                                proofs.check(self.network, &candidate, &join, &self.params)?;
                                self.use_join(height, candidate, join.anchor_height);
                                Ok(Accepted::Change(Change::Join(candidate)))
                            }
                        })
                } else if let Some(evidence) =
                    Equivocation::from_removal_payload(&tx.payload).transpose()
                {
                    evidence
                        .map_err(|e| Refusal::BadEvidence(e.to_string()))
                        .and_then(|e| self.check_evidence(&e, crypto))
                        .map(Accepted::Change)
                } else {
                    continue;
                };
            match outcome {
                Ok(Accepted::Change(change)) => {
                    self.schedule(height, change);
                    effects.scheduled.push((tx.hash(), change));
                }
                Ok(Accepted::PuzzleVote(params)) => effects.votes.push((tx.hash(), params)),
                Err(refusal) => effects.refused.push((tx.hash(), refusal)),
            }
        }
        if let Some((boundary, params)) = self.pending_puzzle
            && boundary == height
        {
            self.params = params;
            self.pending_puzzle = None;
        }
        self.height = height;
        if height.is_multiple_of(self.checkpoint_interval) {
            self.recent.push_back((height, block_hash));
            while self.recent.len() as u64 > ANCHOR_CHECKPOINTS.saturating_add(1) {
                self.recent.pop_front();
            }
        }
        if self
            .transition
            .as_ref()
            .is_some_and(|t| t.boundary == height)
        {
            effects.new_epoch = self.enter_next_epoch()?;
        }
        Ok(effects)
    }

    fn enter_next_epoch(&mut self) -> Result<Option<Epoch>, Error> {
        let Some(transition) = self.transition.take() else {
            return Ok(None);
        };
        let mut members: Vec<PublicKey> = self.epoch.validators.members().to_vec();
        let mut newcomers = Vec::new();
        let mut gone = BTreeSet::new();
        for change in &transition.changes {
            match change {
                Change::Join(key) => {
                    members.push(*key);
                    newcomers.push(*key);
                }
                Change::Leave(key) => {
                    gone.insert(key.to_bytes());
                }
                Change::Remove(key) => {
                    gone.insert(key.to_bytes());
                    self.banned.push_back(*key);
                    if self.banned.len() > MAX_BANNED {
                        self.banned.pop_front();
                    }
                }
            }
        }
        members.retain(|k| !gone.contains(&k.to_bytes()));
        // Removals that waited for this transition start the next.
        let deferred: Vec<(u64, Change)> = std::mem::take(&mut self.deferred)
            .into_iter()
            .filter(|(_, c)| members.contains(c.key()))
            .collect();
        if let Some(boundary) = deferred.iter().map(|(h, _)| self.boundary_for(*h)).max() {
            self.transition = Some(Transition {
                boundary,
                changes: deferred.into_iter().map(|(_, c)| c).collect(),
            });
        }
        let validators = ValidatorSet::new(self.network, members)?;
        let next = Epoch {
            number: self.epoch.number.saturating_add(1),
            first_height: transition.boundary.saturating_add(1),
            validators,
            newcomers,
        };
        // Votes count in the epoch they name.
        self.puzzle_votes.clear();
        self.previous = Some(std::mem::replace(&mut self.epoch, next.clone()));
        Ok(Some(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Prepare;
    use crate::signing::StrictCrypto;
    use crate::types::ClientId;
    use openagi_crypto::Identity;
    use std::sync::atomic::AtomicBool;

    const CHEAP: PuzzleParams = PuzzleParams {
        difficulty_bits: 4,
        memory_kib: 8,
        passes: 1,
    };

    fn ids(n: u8) -> Vec<Identity> {
        (1..=n).map(|i| Identity::from_seed(&[i; 32])).collect()
    }

    fn network() -> NetworkId {
        NetworkId::from_name("membership-test")
    }

    fn genesis(members: &[Identity]) -> Membership {
        let set = ValidatorSet::new(network(), members.iter().map(|i| i.public()).collect())
            .expect("set");
        Membership::genesis(set, 16, 64, CHEAP).expect("genesis")
    }

    fn tx(payload: Vec<u8>, seq: u64) -> Transaction {
        Transaction {
            client: ClientId([9; 32]),
            seq,
            payload: payload.into(),
        }
    }

    fn leave_by(who: &Identity, epoch: u64) -> MembershipRequest {
        let leave = LeaveRequest {
            network: network(),
            epoch,
        };
        MembershipRequest::Leave(Signed::sign(who, &leave).expect("sign"))
    }

    fn hash_of(height: u64) -> Hash {
        *blake3::hash(&height.to_be_bytes()).as_bytes()
    }

    /// Applies empty blocks up to `to`.
    fn advance(m: &mut Membership, to: u64) -> Vec<Epoch> {
        let mut epochs = Vec::new();
        while m.height() < to {
            let h = m.height() + 1;
            let effects = m
                .apply_block(
                    h,
                    hash_of(h),
                    &[],
                    &StrictCrypto,
                    &mut ProofCache::default(),
                )
                .expect("in order");
            epochs.extend(effects.new_epoch);
        }
        epochs
    }

    fn solved_join(m: &Membership, who: &Identity, params: PuzzleParams) -> MembershipRequest {
        let (anchor_height, anchor_hash) = m.anchor().expect("a block to anchor to");
        let input = PuzzleInput {
            public_key: &who.public(),
            network_id: &network().0,
            anchor_height,
            anchor_hash: &anchor_hash,
        };
        let nonce =
            openagi_crypto::poc::solve(&input, params, 1, 0, &|_| {}, &AtomicBool::new(false))
                .expect("runs")
                .expect("found");
        let join = JoinRequest {
            network: network(),
            anchor_height,
            anchor_hash,
            nonce,
        };
        MembershipRequest::Join(Signed::sign(who, &join).expect("sign"))
    }

    fn apply_one(m: &mut Membership, request: &MembershipRequest, seq: u64) -> BlockEffects {
        let h = m.height() + 1;
        m.apply_block(
            h,
            hash_of(h),
            &[tx(request.to_payload().expect("encode"), seq)],
            &StrictCrypto,
            &mut ProofCache::default(),
        )
        .expect("in order")
    }

    #[test]
    fn a_join_takes_effect_at_the_boundary_and_the_newcomer_is_marked() {
        let members = ids(4);
        let mut m = genesis(&members);
        advance(&mut m, 20);
        let candidate = Identity::from_seed(&[50; 32]);
        let join = solved_join(&m, &candidate, CHEAP);
        let effects = apply_one(&mut m, &join, 1);
        assert_eq!(
            effects.scheduled.first().map(|(_, c)| *c),
            Some(Change::Join(candidate.public()))
        );
        // Committed at 21: the next checkpoint is 32, plus the window 64.
        assert_eq!(m.last_height_of_epoch(), Some(96));
        assert!(advance(&mut m, 95).is_empty(), "nothing changes before");
        assert_eq!(m.epoch().validators.n(), 4);
        let epochs = advance(&mut m, 96);
        let next = epochs.first().expect("a new epoch at the boundary");
        assert_eq!((next.number, next.first_height), (1, 97));
        assert_eq!(next.validators.n(), 5);
        assert_eq!(next.validators.member(4), Some(&candidate.public()));
        assert_eq!(next.newcomers, vec![candidate.public()]);
        assert_eq!(
            m.previous_epoch().map(|e| e.validators.n()),
            Some(4),
            "the old set is kept for the hand-off"
        );
        assert!(m.transition().is_none());
    }

    #[test]
    fn joins_with_wrong_stale_or_cheap_proofs_are_refused_with_the_reason() {
        let members = ids(4);
        let mut m = genesis(&members);
        advance(&mut m, 10);
        let candidate = Identity::from_seed(&[60; 32]);
        let crypto = StrictCrypto;
        let mut cache = ProofCache::default();

        // A proof solved at a lower difficulty than the network's: find a
        // nonce that passes 1 bit but not 4.
        let (anchor_height, anchor_hash) = m.anchor().expect("anchor");
        let mut verifier = Verifier::new(CHEAP).expect("params");
        let input = PuzzleInput {
            public_key: &candidate.public(),
            network_id: &network().0,
            anchor_height,
            anchor_hash: &anchor_hash,
        };
        let cheap_nonce = (0..10_000u64)
            .find(|n| {
                let h = verifier.hash(&input, *n).expect("hash");
                openagi_crypto::poc::leading_zero_bits(&h) == 1
            })
            .expect("a one-bit nonce");
        let cheap = MembershipRequest::Join(
            Signed::sign(
                &candidate,
                &JoinRequest {
                    network: network(),
                    anchor_height,
                    anchor_hash,
                    nonce: cheap_nonce,
                },
            )
            .expect("sign"),
        );
        assert_eq!(
            m.check_request(&cheap, 11, &crypto, &mut cache),
            Err(Refusal::BadProof { difficulty_bits: 4 })
        );

        // The right nonce against another block's hash.
        let good = solved_join(&m, &candidate, CHEAP);
        let MembershipRequest::Join(signed) = &good else {
            unreachable!("a join")
        };
        let mut wrong = crypto.open(signed).expect("own");
        wrong.anchor_hash = [0; 32];
        let wrong = MembershipRequest::Join(Signed::sign(&candidate, &wrong).expect("sign"));
        assert_eq!(
            m.check_request(&wrong, 11, &crypto, &mut cache),
            Err(Refusal::WrongAnchor { anchor: 0 })
        );

        // The right proof, committed too late.
        assert!(matches!(
            m.check_request(&good, m.anchor_max_age() + 1, &crypto, &mut cache),
            Err(Refusal::StaleAnchor { .. })
        ));
        // A forged signature.
        let mut bytes = postcard::to_stdvec(signed).expect("encode");
        if let Some(last) = bytes.last_mut() {
            *last ^= 1; // a bit of the signature
        }
        let forged = MembershipRequest::Join(postcard::from_bytes(&bytes).expect("decode"));
        assert_eq!(
            m.check_request(&forged, 11, &crypto, &mut cache),
            Err(Refusal::BadSignature)
        );
        // And the good one passes.
        assert_eq!(
            m.check_request(&good, 11, &crypto, &mut cache),
            Ok(Accepted::Change(Change::Join(candidate.public())))
        );
        // A member cannot join again.
        let member_join = solved_join(&m, &members[1], CHEAP);
        assert_eq!(
            m.check_request(&member_join, 11, &crypto, &mut cache),
            Err(Refusal::AlreadyMember)
        );
    }

    #[test]
    fn churn_is_bounded_and_a_second_transition_waits_for_the_first() {
        // Seven validators: f = 2 changes per epoch.
        let members = ids(7);
        let mut m = genesis(&members);
        advance(&mut m, 3);
        let epoch = m.epoch().number;
        let leave = |who: &Identity| leave_by(who, epoch);
        assert!(apply_one(&mut m, &leave(&members[0]), 1).refused.is_empty());
        assert!(apply_one(&mut m, &leave(&members[1]), 2).refused.is_empty());
        let third = apply_one(&mut m, &leave(&members[2]), 3);
        assert_eq!(
            third.refused.first().map(|(_, r)| r.clone()),
            Some(Refusal::ChurnLimit {
                limit: 2,
                boundary: 80
            })
        );
        // In the next checkpoint interval, a change waits for the first.
        advance(&mut m, 20);
        let later = apply_one(&mut m, &leave(&members[3]), 4);
        assert_eq!(
            later.refused.first().map(|(_, r)| r.clone()),
            Some(Refusal::TransitionPending { boundary: 80 })
        );
        let epochs = advance(&mut m, 80);
        let next = epochs.first().expect("epoch 1");
        assert_eq!(next.validators.n(), 5);
        assert!(next.validators.index_of(&members[0].public()).is_none());
        // A leave signed for epoch 0 means nothing in epoch 1.
        let stale = apply_one(&mut m, &leave(&members[3]), 5);
        assert_eq!(
            stale.refused.first().map(|(_, r)| r.clone()),
            Some(Refusal::WrongEpoch { current: 1, got: 0 })
        );
    }

    #[test]
    fn leaves_keep_four_validators_and_an_equivocator_is_removed_and_banned() {
        let members = ids(5);
        let mut m = genesis(&members);
        advance(&mut m, 1);
        let leave = leave_by(&members[4], 0);
        assert!(apply_one(&mut m, &leave, 1).refused.is_empty());
        advance(&mut m, 80);
        assert_eq!(m.epoch().validators.n(), 4);
        let again = leave_by(&members[3], 1);
        assert_eq!(
            apply_one(&mut m, &again, 2)
                .refused
                .first()
                .map(|(_, r)| r.clone()),
            Some(Refusal::TooFewValidators { min: 4 })
        );

        // Validator 2 signs two prepares for one slot.
        let vote = |digest: u8| {
            Signed::sign(
                &members[2],
                &Prepare {
                    network: network(),
                    view: 3,
                    seq: 40,
                    digest: [digest; 32],
                },
            )
            .expect("sign")
        };
        let evidence = Equivocation::Prepares(vote(1), vote(2));
        let h = m.height() + 1;
        let effects = m
            .apply_block(
                h,
                hash_of(h),
                &[tx(evidence.to_removal_payload().expect("encode"), 3)],
                &StrictCrypto,
                &mut ProofCache::default(),
            )
            .expect("in order");
        assert_eq!(
            effects.scheduled.first().map(|(_, c)| *c),
            Some(Change::Remove(members[2].public()))
        );
        let boundary = m.last_height_of_epoch().expect("pending");
        advance(&mut m, boundary);
        assert_eq!(m.epoch().validators.n(), 3, "removed even below four");
        assert!(
            m.epoch()
                .validators
                .index_of(&members[2].public())
                .is_none()
        );
        let rejoin = solved_join(&m, &members[2], CHEAP);
        assert_eq!(
            m.check_request(
                &rejoin,
                m.height() + 1,
                &StrictCrypto,
                &mut ProofCache::default()
            ),
            Err(Refusal::Banned)
        );
    }

    #[test]
    fn worthless_proofs_cost_at_most_the_intervals_budget() {
        let members = ids(4);
        let mut m = genesis(&members);
        advance(&mut m, 2);
        let (anchor_height, anchor_hash) = m.anchor().expect("anchor");
        // Six joins under fresh keys whose nonces solve nothing (checked
        // against the puzzle so the test does not depend on luck).
        let mut txs = Vec::new();
        let mut verifier = Verifier::new(CHEAP).expect("params");
        for k in 0..6u8 {
            let who = Identity::from_seed(&[100 + k; 32]);
            let input = PuzzleInput {
                public_key: &who.public(),
                network_id: &network().0,
                anchor_height,
                anchor_hash: &anchor_hash,
            };
            let nonce = (0..1_000u64)
                .find(|n| verifier.verify(&input, *n).is_err())
                .expect("a nonce that fails");
            let join = JoinRequest {
                network: network(),
                anchor_height,
                anchor_hash,
                nonce,
            };
            let request = MembershipRequest::Join(Signed::sign(&who, &join).expect("sign"));
            txs.push(tx(request.to_payload().expect("encode"), u64::from(k) + 1));
        }
        let effects = m
            .apply_block(
                3,
                hash_of(3),
                &txs,
                &StrictCrypto,
                &mut ProofCache::default(),
            )
            .expect("in order");
        let reasons: Vec<Refusal> = effects.refused.into_iter().map(|(_, r)| r).collect();
        let bad = Refusal::BadProof { difficulty_bits: 4 };
        let spent = Refusal::ProofBudget { first: 1, last: 16 };
        assert_eq!(
            reasons,
            vec![
                bad.clone(),
                bad.clone(),
                bad.clone(),
                bad,
                spent.clone(),
                spent
            ]
        );
    }

    #[test]
    fn a_removal_behind_another_transition_starts_the_next_and_a_join_is_used_once() {
        let members = ids(7);
        let mut m = genesis(&members);
        advance(&mut m, 3);
        // A leave at 4 makes the transition to 80.
        let leave = leave_by(&members[6], 0);
        assert!(apply_one(&mut m, &leave, 1).refused.is_empty());
        assert_eq!(m.last_height_of_epoch(), Some(80));
        // Evidence against validator 5 at 20 would take effect at 96: it
        // waits for the transition to 80, then starts the next.
        advance(&mut m, 19);
        let evidence = Equivocation::Commits(
            Signed::sign(
                &members[5],
                &crate::types::Commit {
                    network: network(),
                    view: 1,
                    seq: 9,
                    digest: [1; 32],
                },
            )
            .expect("sign"),
            Signed::sign(
                &members[5],
                &crate::types::Commit {
                    network: network(),
                    view: 1,
                    seq: 9,
                    digest: [2; 32],
                },
            )
            .expect("sign"),
        );
        let h = m.height() + 1;
        let effects = m
            .apply_block(
                h,
                hash_of(h),
                &[tx(evidence.to_removal_payload().expect("encode"), 2)],
                &StrictCrypto,
                &mut ProofCache::default(),
            )
            .expect("in order");
        assert!(effects.refused.is_empty(), "{:?}", effects.refused);
        assert_eq!(m.last_height_of_epoch(), Some(80));
        advance(&mut m, 80);
        assert_eq!(m.epoch().validators.n(), 6, "the leave took effect");
        assert_eq!(
            m.last_height_of_epoch(),
            Some(96),
            "the removal starts the next transition"
        );
        advance(&mut m, 96);
        assert_eq!(m.epoch().validators.n(), 5);
        assert!(
            m.epoch()
                .validators
                .index_of(&members[5].public())
                .is_none()
        );

        // A join taken once cannot be taken again (here after its
        // validator left, as a replay would try).
        let candidate = Identity::from_seed(&[90; 32]);
        let join = solved_join(&m, &candidate, CHEAP);
        assert!(apply_one(&mut m, &join, 3).refused.is_empty());
        let boundary = m.last_height_of_epoch().expect("pending");
        advance(&mut m, boundary);
        let leave = leave_by(&candidate, m.epoch().number);
        assert!(apply_one(&mut m, &leave, 4).refused.is_empty());
        let boundary = m.last_height_of_epoch().expect("pending");
        advance(&mut m, boundary);
        assert!(m.epoch().validators.index_of(&candidate.public()).is_none());
        assert_eq!(
            apply_one(&mut m, &join, 5)
                .refused
                .first()
                .map(|(_, r)| r.clone()),
            Some(Refusal::Replayed)
        );
    }

    #[test]
    fn a_quorum_of_votes_changes_the_join_puzzle_at_the_boundary() {
        let members = ids(4);
        let mut m = genesis(&members);
        advance(&mut m, 2);
        let harder = PuzzleParams {
            difficulty_bits: 9,
            ..CHEAP
        };
        let vote = |who: &Identity, params: PuzzleParams, epoch: u64| {
            let vote = PuzzleVote {
                network: network(),
                epoch,
                params,
            };
            MembershipRequest::Puzzle(Signed::sign(who, &vote).expect("sign"))
        };
        // The parameters in force, a stranger's vote and bounds refused.
        let outsider = Identity::from_seed(&[77; 32]);
        for (request, refusal) in [
            (vote(&members[0], CHEAP, 0), "in force"),
            (vote(&outsider, harder, 0), "not a validator"),
            (
                vote(
                    &members[0],
                    PuzzleParams {
                        memory_kib: 1,
                        ..CHEAP
                    },
                    0,
                ),
                "memory",
            ),
        ] {
            let e = apply_one(&mut m, &request, 1);
            let reason = e
                .refused
                .first()
                .map(|(_, r)| r.to_string())
                .unwrap_or_default();
            assert!(reason.contains(refusal), "{reason}");
        }
        // Three of four (a quorum) agree at height 7: in force after 16 + 64.
        assert!(
            apply_one(&mut m, &vote(&members[0], harder, 0), 2)
                .refused
                .is_empty()
        );
        assert!(
            apply_one(&mut m, &vote(&members[1], harder, 0), 3)
                .refused
                .is_empty()
        );
        assert_eq!(m.pending_puzzle(), None);
        let third = apply_one(&mut m, &vote(&members[2], harder, 0), 4);
        assert_eq!(third.puzzle_scheduled, Some((80, harder)));
        assert_eq!(m.params(), &CHEAP, "not before the boundary");
        advance(&mut m, 80);
        assert_eq!(m.params(), &harder);
        // A proof at the old difficulty no longer passes (the nonce that
        // solves 4 bits is very unlikely to solve 9).
        let candidate = Identity::from_seed(&[91; 32]);
        let cheap_join = solved_join(&m, &candidate, CHEAP);
        let answer = m.check_request(
            &cheap_join,
            m.height() + 1,
            &StrictCrypto,
            &mut ProofCache::default(),
        );
        let good_join = solved_join(&m, &candidate, harder);
        assert!(
            answer == Err(Refusal::BadProof { difficulty_bits: 9 }) || cheap_join == good_join,
            "{answer:?}"
        );
        assert_eq!(
            m.check_request(
                &good_join,
                m.height() + 1,
                &StrictCrypto,
                &mut ProofCache::default()
            ),
            Ok(Accepted::Change(Change::Join(candidate.public())))
        );
    }

    #[test]
    fn the_same_chain_gives_the_same_epochs() {
        // Two followers fed the same blocks agree on every epoch.
        let members = ids(4);
        let mut a = genesis(&members);
        let mut b = genesis(&members);
        advance(&mut a, 5);
        advance(&mut b, 5);
        let candidate = Identity::from_seed(&[70; 32]);
        let join = solved_join(&a, &candidate, CHEAP);
        let ea = apply_one(&mut a, &join, 1);
        let eb = apply_one(&mut b, &join, 1);
        assert_eq!(ea, eb);
        assert_eq!(advance(&mut a, 200), advance(&mut b, 200));
        assert_eq!(a.epoch(), b.epoch());
    }
}
