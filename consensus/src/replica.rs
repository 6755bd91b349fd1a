//! The PBFT replica state machine (Castro and Liskov), sans IO.
//!
//! Inputs: [`Replica::handle_request`], [`Replica::handle_message`],
//! [`Replica::handle_tick`]; outputs: [`Replica::poll_output`], in order.
//! Time is the caller's milliseconds; nothing here reads a clock.
//!
//! Choices worth knowing:
//! - Quorum is `n - f` (2f+1 when n = 3f+1). A batch is prepared with the
//!   primary's pre-prepare plus `quorum - 1` matching prepares from backups,
//!   committed locally with `quorum` matching commits in the same view.
//! - Votes carry the digest of a [`Batch`] header (proposer's view,
//!   timestamp, Merkle root). Blocks are derived at execution, so every
//!   replica builds the same block whichever view it committed in.
//! - Each commit for `(view, seq)` is preceded by a persisted prepared
//!   proof, each prepare or pre-prepare by a persisted vote, each view
//!   change by the persisted view: see [`PersistRecord`].
//! - View change follows the paper: the P-set holds the highest-view
//!   prepared proof (with its batch) for every sequence number above the
//!   stable checkpoint; the new primary re-proposes the highest-view batch
//!   per number and null batches in the gaps; backups recompute that and
//!   refuse any difference. The wait for a new view starts only after a
//!   quorum asked for that view, and doubles on each further attempt, so
//!   no replica runs ahead alone; f+1 replicas in higher views pull a
//!   replica along.
//! - Lost messages are covered by periodic retransmission of this
//!   replica's own votes for unfinished sequence numbers, status messages,
//!   and state transfer of certified blocks for anything older.
//! - Exactly-once per `(client, seq)` is enforced at execution, so a
//!   transaction proposed twice (by a faulty primary, or re-proposed after
//!   a view change) takes effect once on every replica alike.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use openagi_crypto::{PublicKey, Signed, identity::SignedPayload};
use serde::{Deserialize, Serialize};

use crate::ledger::Ledger;
use crate::membership::{BlockEffects, Epoch, Membership, ProofCache};
use crate::messages::{
    BlocksReply, Checkpoint, CheckpointProof, Commit, FetchBlocks, Forward, Message, NewView,
    PrePrepare, Prepare, PreparedProof, Status, ViewChange,
};
use crate::rotation::{PrimaryChoice, Reputation, Schedule};
use crate::signing::{IdentitySigner, Signer};
use crate::types::{
    Batch, BatchHeader, Block, ClientId, CommitCertificate, NetworkId, Transaction, ValidatorSet,
    genesis_hash, verify_block,
};
use crate::{Error, Hash};
use openagi_crypto::poc::PuzzleParams;

/// Tunables and buffer caps of a replica. All replicas of a network must
/// agree on `checkpoint_interval` and `window`; the rest is local.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// K: a checkpoint is taken every K sequence numbers.
    pub checkpoint_interval: u64,
    /// L: sequence numbers accepted above the stable checkpoint (the high
    /// watermark is `stable + L`); a multiple of K, at least 2K, so the
    /// pipeline does not stall waiting for a checkpoint.
    pub window: u64,
    /// Most transactions in one batch.
    pub max_batch_txs: usize,
    /// Most transaction bytes in one batch.
    pub max_batch_bytes: usize,
    /// A primary proposes a partial batch once its oldest transaction has
    /// waited this long.
    pub max_batch_delay_ms: u64,
    /// Largest transaction accepted.
    pub max_tx_bytes: usize,
    /// First view-change timeout; doubled on each consecutive view change
    /// without progress.
    pub view_change_timeout_ms: u64,
    /// Ceiling of the doubled view-change timeout.
    pub max_view_change_timeout_ms: u64,
    /// How often unfinished work (votes, view changes, checkpoints) is
    /// resent, since the network may lose messages.
    pub retransmit_interval_ms: u64,
    /// How often a status summary is broadcast.
    pub status_interval_ms: u64,
    /// A backup forwards a transaction to the primary if it has not been
    /// proposed after this long.
    pub forward_after_ms: u64,
    /// How far a proposed timestamp may be from the backup's own clock.
    pub max_clock_skew_ms: u64,
    /// State transfer: a request unanswered this long goes to another peer.
    pub fetch_timeout_ms: u64,
    /// Most blocks in one state transfer reply.
    pub max_blocks_per_reply: usize,
    /// Most recent blocks kept in memory. Older ones are on the node's
    /// disk: a state transfer request for them becomes
    /// [`Output::ReadBlocks`].
    pub blocks_in_memory: usize,
    /// State transfer requests served per retransmit interval.
    pub max_fetch_serves_per_interval: u32,
    /// Cap on client transactions waiting to be proposed.
    pub max_pending_requests: usize,
    /// Cap on buffered messages for a view this replica has not reached.
    pub max_future_messages: usize,
    /// Cap on buffered messages above the high watermark.
    pub max_out_of_window_messages: usize,
    /// View-change messages are kept for at most this many views ahead.
    pub max_future_views: u64,
    /// Checkpoint votes remembered per replica.
    pub max_checkpoints_per_replica: usize,
    /// Largest encoded message a node should accept from the network.
    pub max_message_bytes: usize,
    /// The identity puzzle a validator join must solve (network-wide:
    /// every node of a network uses its genesis parameters).
    pub join_puzzle: PuzzleParams,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            checkpoint_interval: 16,
            window: 64,
            max_batch_txs: 256,
            max_batch_bytes: 64 * 1024,
            max_batch_delay_ms: 5,
            max_tx_bytes: 64 * 1024,
            view_change_timeout_ms: 2_000,
            max_view_change_timeout_ms: 60_000,
            retransmit_interval_ms: 500,
            status_interval_ms: 1_000,
            forward_after_ms: 200,
            max_clock_skew_ms: 30_000,
            fetch_timeout_ms: 1_000,
            max_blocks_per_reply: 64,
            blocks_in_memory: 64,
            max_fetch_serves_per_interval: 8,
            max_pending_requests: 10_000,
            max_future_messages: 4_096,
            max_out_of_window_messages: 4_096,
            max_future_views: 64,
            max_checkpoints_per_replica: 8,
            max_message_bytes: 64 * 1024 * 1024,
            join_puzzle: PuzzleParams::DEFAULT,
        }
    }
}

impl Config {
    /// Refuses settings the protocol cannot run with.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Config(what.into()));
        if self.checkpoint_interval == 0 {
            return bad("checkpoint_interval must be positive");
        }
        if self.window < 2 * self.checkpoint_interval
            || !self.window.is_multiple_of(self.checkpoint_interval)
        {
            return bad("window must be a multiple of checkpoint_interval and at least twice it");
        }
        if self.max_batch_txs == 0 || self.max_batch_bytes == 0 || self.max_tx_bytes == 0 {
            return bad("batch and transaction limits must be positive");
        }
        if self.view_change_timeout_ms == 0
            || self.max_view_change_timeout_ms < self.view_change_timeout_ms
        {
            return bad("view change timeouts must be positive and ordered");
        }
        if self.retransmit_interval_ms == 0
            || self.status_interval_ms == 0
            || self.fetch_timeout_ms == 0
        {
            return bad("intervals must be positive");
        }
        if self.max_blocks_per_reply == 0
            || self.max_checkpoints_per_replica == 0
            || self.blocks_in_memory == 0
        {
            return bad("state transfer, checkpoint and block memory caps must be positive");
        }
        Ok(())
    }

    /// Upper estimate of the largest new-view message for `n` validators:
    /// a quorum of view changes, each with a prepared proof (batch and
    /// prepares) for every sequence number in the window.
    pub fn max_new_view_bytes(&self, n: usize) -> u64 {
        let n = n as u64;
        let quorum = n - (n.saturating_sub(1)) / 3;
        let per_proof =
            self.max_batch_bytes as u64 + self.max_batch_txs as u64 * 64 + quorum * 256 + 512;
        let per_view_change = self.window * per_proof + quorum * 256 + 1024;
        quorum * per_view_change + self.window * 256 + 1024
    }
}

/// Why an input was dropped; counted in [`Stats::dropped`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DropReason {
    /// Signed by a key outside the validator set.
    NotMember,
    /// Signature failed the strict check.
    BadSignature,
    /// Payload did not decode or had an impossible shape.
    Malformed,
    /// Names another network.
    WrongNetwork,
    /// For a view this replica has left.
    OldView,
    /// For a future view, and the buffer for those is full (or the view is
    /// too far ahead).
    FutureViewOverflow,
    /// At or below the stable checkpoint.
    BelowWindow,
    /// Above the high watermark, and the buffer for those is full.
    OutOfWindowOverflow,
    /// A pre-prepare or new view from a replica that is not the primary.
    NotPrimary,
    /// Batch does not hash to the digest it travels with.
    DigestMismatch,
    /// Conflicts with a message the same sender already sent for the same
    /// view and sequence number.
    Equivocation,
    /// Would make this replica vote against a vote it already cast.
    ConflictsWithOwnVote,
    /// Proposed timestamp goes backwards or is too far from local time.
    BadTimestamp,
    /// Too many or too large transactions.
    TooLarge,
    /// A checkpoint or view change of another epoch than this replica's.
    OtherEpoch,
    /// A checkpoint, prepared, view-change or new-view certificate is
    /// forged or inconsistent.
    InvalidCertificate,
    /// A state-transfer block failed verification.
    InvalidBlock,
    /// Already seen.
    Duplicate,
    /// Pending request buffer is full.
    PendingFull,
    /// The transaction's `(client, seq)` already took effect.
    AlreadyApplied,
    /// State-transfer request over the serving budget.
    RateLimited,
}

/// Counters a node exports as metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Dropped inputs by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// Messages handed to [`Replica::handle_message`].
    pub messages_received: u64,
    /// Blocks committed by agreement.
    pub blocks_committed: u64,
    /// Blocks applied from state transfer.
    pub blocks_fetched: u64,
    /// State transfer requests for blocks no longer in memory, handed to
    /// the node's storage ([`Output::ReadBlocks`]).
    pub storage_reads: u64,
    /// View changes this replica started.
    pub view_changes_started: u64,
    /// New views installed.
    pub new_views_installed: u64,
    /// Stable checkpoints reached.
    pub stable_checkpoints: u64,
    /// Local failures (an encoding that could not be signed); should stay 0.
    pub local_errors: u64,
    /// Batches of client transactions a backup relayed to the primary.
    pub relayed_batches: u64,
    /// Epochs (validator sets) this replica moved into.
    pub epochs_entered: u64,
}

impl Stats {
    /// How many inputs were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    /// All dropped inputs.
    pub fn total_dropped(&self) -> u64 {
        self.dropped.values().sum()
    }
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipient {
    /// Every other validator.
    All,
    /// One validator.
    One(PublicKey),
}

/// Something the node must do, in the order given.
#[derive(Clone, Debug)]
pub enum Output {
    /// Write durably before acting on any later output. Consecutive
    /// records may go into one storage transaction, as long as it has
    /// committed before the next non-persist output is acted upon: that
    /// order is what keeps a restarted replica from contradicting a vote it
    /// already sent.
    Persist(PersistRecord),
    /// Send a message.
    Send {
        /// To whom.
        to: Recipient,
        /// What.
        message: Message,
    },
    /// A block committed (its [`PersistRecord::Block`] came just before).
    Committed {
        /// The block.
        block: Block,
        /// Its commit certificate.
        certificate: CommitCertificate,
        /// The transactions in it that took effect, in order.
        applied: Vec<Transaction>,
        /// [`Transaction::hash`] of every transaction of the block, in
        /// order (computed once, for the batch root).
        tx_hashes: Arc<[Hash]>,
    },
    /// A new view was installed.
    ViewInstalled {
        /// The view.
        view: u64,
        /// Its primary.
        primary: PublicKey,
    },
    /// A validator signed two conflicting votes: the proof, for the node
    /// to record and put on the ledger.
    Evidence(crate::evidence::Equivocation),
    /// A committed block changed the membership: changes it scheduled and
    /// requests it refused (with the reason), for the node to report.
    Membership {
        /// Height of the block.
        height: u64,
        /// What it did.
        effects: BlockEffects,
    },
    /// This replica entered a new epoch: a new validator set decides from
    /// `first_height` on. The node routes consensus messages to the new
    /// set from now on. When this replica is not a member of it,
    /// `member` is false and the replica has retired: it votes no more,
    /// and the node follows the chain as a full node instead.
    EpochStarted {
        /// The epoch number.
        number: u64,
        /// The first height it decides.
        first_height: u64,
        /// Its validators, in order.
        validators: Vec<PublicKey>,
        /// Whether this replica is one of them.
        member: bool,
    },
    /// A peer asked for blocks older than those kept in memory: read
    /// heights `from..=last` from storage (as many as there are, in order)
    /// and hand them to [`Replica::handle_stored_blocks`] for `peer`.
    ReadBlocks {
        /// Who asked.
        peer: PublicKey,
        /// First height.
        from: u64,
        /// Last height.
        last: u64,
    },
}

/// A durable fact. Fold records in order into a [`PersistedState`] with
/// [`PersistedState::apply`] (or store them in any equivalent form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PersistRecord {
    /// The replica moved to `view`; `changing` while waiting for its new
    /// view.
    View {
        /// The view.
        view: u64,
        /// Whether the view change is still in progress.
        changing: bool,
    },
    /// The replica is about to pre-prepare (as primary) or prepare `digest`
    /// at `(view, seq)`; it must never vote for another digest there.
    Vote {
        /// View.
        view: u64,
        /// Sequence number.
        seq: u64,
        /// Batch digest.
        digest: Hash,
    },
    /// The replica prepared this batch and is about to commit it.
    Prepared(PreparedProof),
    /// A block joined the ledger.
    Block {
        /// The block.
        block: Block,
        /// Its commit certificate.
        certificate: CommitCertificate,
    },
    /// A new stable checkpoint; everything at or below it may be forgotten.
    StableCheckpoint(CheckpointProof),
    /// The replica is recovering from lost state and casts no vote within
    /// `bound` (unknown yet when `None`); see
    /// [`Replica::recover_after_data_loss`].
    Recovering {
        /// Where it may have voted before.
        bound: Option<RecoveryBound>,
    },
    /// Recovery from lost state finished.
    Recovered,
    /// The stable checkpoint whose leader schedule (see
    /// [`crate::rotation`]) chooses the primary of the view this replica
    /// is in.
    ScheduleBasis(u64),
}

/// What a replica recovering from lost state may have voted for before:
/// nothing above sequence number `seq` and nothing in a view above `view`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryBound {
    /// Highest sequence number it may have voted for.
    pub seq: u64,
    /// Highest view it may have voted in.
    pub view: u64,
}

/// Where a replica recovering from lost state stands; see
/// [`Replica::recovery_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// Peers whose height and view this replica heard since it restarted.
    pub reports: usize,
    /// Reports needed to learn the bound (`2f + 1`).
    pub reports_needed: usize,
    /// What it may have voted for before, once learned; it votes only
    /// above it, and recovery ends when `stable` reaches `bound.seq`.
    pub bound: Option<RecoveryBound>,
    /// Its stable checkpoint now.
    pub stable: u64,
    /// Validators known to be recovering now, this one included.
    pub recovering_validators: usize,
    /// Most validators that may be recovering (or faulty) while the others
    /// still make progress: `f`.
    pub tolerated: usize,
}

impl RecoveryStatus {
    /// Whether more validators are recovering than the network tolerates:
    /// the others cannot commit without them, and they vote only once the
    /// others have committed past the bound, so nothing moves until some
    /// get their state back.
    pub fn stalls_network(&self) -> bool {
        self.recovering_validators > self.tolerated
    }
}

/// Everything a replica needs to restart without contradicting itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// Last view entered.
    pub view: u64,
    /// Whether a view change to `view` was in progress.
    pub changing: bool,
    /// Latest vote per sequence number: `(view, digest)`.
    pub votes: BTreeMap<u64, (u64, Hash)>,
    /// Highest-view prepared proof per sequence number.
    pub prepared: BTreeMap<u64, PreparedProof>,
    /// Last stable checkpoint (none means genesis).
    pub stable: Option<CheckpointProof>,
    /// The ledger.
    pub blocks: Vec<(Block, CommitCertificate)>,
    /// `Some` while recovering from lost state: the vote bound, if known.
    pub recovering: Option<Option<RecoveryBound>>,
    /// Basis of the current view's leader schedule.
    pub schedule_basis: u64,
}

impl PersistedState {
    /// Folds one record into the state.
    pub fn apply(&mut self, record: &PersistRecord) {
        match record {
            PersistRecord::View { view, changing } => {
                self.view = *view;
                self.changing = *changing;
            }
            PersistRecord::Vote { view, seq, digest } => {
                self.votes.insert(*seq, (*view, *digest));
            }
            PersistRecord::Prepared(proof) => {
                if let Ok(pp) = decode_unverified(&proof.pre_prepare) {
                    self.prepared.insert(pp.seq, proof.clone());
                }
            }
            PersistRecord::Block { block, certificate } => {
                self.blocks.push((block.clone(), certificate.clone()));
            }
            PersistRecord::StableCheckpoint(proof) => {
                let keep_above = proof.seq.saturating_add(1);
                self.votes = self.votes.split_off(&keep_above);
                self.prepared = self.prepared.split_off(&keep_above);
                self.stable = Some(proof.clone());
            }
            PersistRecord::Recovering { bound } => self.recovering = Some(*bound),
            PersistRecord::Recovered => self.recovering = None,
            PersistRecord::ScheduleBasis(basis) => self.schedule_basis = *basis,
        }
    }
}

/// Decodes a payload whose signature was already checked (or that this
/// replica produced itself).
fn decode_unverified<T: SignedPayload>(signed: &Signed<T>) -> Result<T, Error> {
    postcard::from_bytes(signed.payload_bytes()).map_err(|e| Error::Malformed(e.to_string()))
}

/// Agreement state of one sequence number.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// The view the fields below belong to.
    view: u64,
    digest: Option<Hash>,
    pre_prepare: Option<Signed<PrePrepare>>,
    batch: Option<Batch>,
    /// The batch's header (its Merkle root over every transaction hash)
    /// and those hashes, computed once when the batch arrived and reused
    /// at execution and in the commit output.
    header: Option<(BatchHeader, Arc<[Hash]>)>,
    prepares: BTreeMap<usize, (Hash, Signed<Prepare>)>,
    commits: BTreeMap<usize, (Hash, Signed<Commit>)>,
    prepared: bool,
    committed: bool,
    /// When this slot last changed, for retransmission.
    touched: u64,
    /// Highest-view prepared proof; survives view changes.
    proof: Option<PreparedProof>,
}

impl Slot {
    fn reset_for_view(&mut self, view: u64) {
        let proof = self.proof.take();
        *self = Slot {
            view,
            proof,
            ..Slot::default()
        };
    }
}

#[derive(Clone, Debug)]
struct PendingTx {
    tx: Transaction,
    arrived: u64,
    forwarded: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct PeerInfo {
    view: u64,
    height: u64,
    stable: u64,
    /// Its last status said it is recovering from lost state.
    recovering: bool,
    /// Last time this replica sent the peer its new-view message.
    helped_at: Option<u64>,
}

/// Recovery from lost state: which peers reported their height since the
/// restart, and the bound learned from them.
#[derive(Clone, Debug, Default)]
struct Recovery {
    /// Height and view reported by each peer since the restart.
    reports: BTreeMap<usize, (u64, u64)>,
    bound: Option<RecoveryBound>,
}

#[derive(Clone, Copy, Debug)]
struct Fetch {
    target: u64,
    peer: usize,
    deadline: u64,
    /// Requests in a row that brought nothing; after asking every peer
    /// once the fetch is abandoned (a lying peer cannot pin it forever).
    fruitless: usize,
}

/// A PBFT replica. `S` signs and checks messages: [`IdentitySigner`] in a
/// node, a memoising signer in the simulator.
pub struct Replica<S: Signer = IdentitySigner> {
    cfg: Config,
    validators: ValidatorSet,
    signer: S,
    me: usize,
    network: NetworkId,
    view: u64,
    /// True between sending a view change and installing the new view.
    changing: bool,
    vc_attempt: u32,
    deadline: Option<u64>,
    log: BTreeMap<u64, Slot>,
    stable: CheckpointProof,
    checkpoint_votes: BTreeMap<u64, BTreeMap<usize, (Hash, Signed<Checkpoint>)>>,
    ledger: Ledger,
    pending: VecDeque<PendingTx>,
    pending_keys: HashSet<(ClientId, u64)>,
    in_flight: HashSet<(ClientId, u64)>,
    /// Every entry of `pending` before this index is in flight, so the
    /// primary's batch building starts here instead of rescanning the
    /// in-flight prefix for each request (which made overload quadratic).
    proposable_from: usize,
    /// A backup's client transactions not yet relayed to the primary, and
    /// when the oldest arrived: relayed as one message per batch delay (or
    /// sooner when a batch is full) so a backup's clients wait one hop,
    /// not the stale-request timeout.
    relay: Vec<Transaction>,
    relay_bytes: usize,
    relay_since: Option<u64>,
    next_seq: u64,
    last_proposed_ts: u64,
    votes: BTreeMap<u64, (u64, Hash)>,
    view_changes: BTreeMap<u64, BTreeMap<usize, Signed<ViewChange>>>,
    new_view: Option<Signed<NewView>>,
    future: VecDeque<Message>,
    /// Buffered future-view messages per sender, so one faulty member
    /// cannot take the whole buffer.
    future_per_sender: Vec<usize>,
    out_of_window: VecDeque<Message>,
    out_of_window_per_sender: Vec<usize>,
    peers: Vec<PeerInfo>,
    fetch: Option<Fetch>,
    fetch_rotation: usize,
    next_retransmit: u64,
    next_status: u64,
    serve_budget: u32,
    last_progress: u64,
    now: u64,
    outputs: VecDeque<Output>,
    stats: Stats,
    recovery: Option<Recovery>,
    /// Failures as primary, from executed blocks.
    reputation: Reputation,
    /// The leader schedule of the current view, fixed when the view was
    /// entered, and the stable checkpoint it was meant to be taken at (it
    /// is older while this replica has not executed that far).
    schedule: Schedule,
    schedule_basis: u64,
    /// The validator set along the executed chain (possibly one epoch
    /// ahead of the one this replica votes in, between executing a
    /// boundary block and holding the checkpoint certificate at it).
    membership: Membership,
    proofs: ProofCache,
    /// The epoch this replica votes in; `validators` is its set.
    epoch_number: u64,
    epoch_first_height: u64,
    /// The old set's checkpoint certificate at the start of this epoch
    /// (the hand-off), resent to peers still behind it.
    epoch_handoff: Option<CheckpointProof>,
    /// Not a member of the epoch it reached: votes no more.
    retired: bool,
    /// When this primary last proposed an empty batch (see `filler_due`).
    last_filler_ms: u64,
    /// Votes of the previous set for the hand-off checkpoint, while this
    /// replica lacks it (at most one per member of that set).
    handoff_votes: Vec<Signed<Checkpoint>>,
    /// Members of the previous set answered lately, and when (at most one
    /// entry per former member).
    former_answered: Vec<(PublicKey, u64)>,
    /// See [`Replica::former_members`].
    former_members: Vec<PublicKey>,
}

/// Former validators a replica keeps answering (a few epochs' worth of
/// leavers and removals).
pub const FORMER_MEMBERS: usize = 64;

impl<S: Signer> std::fmt::Debug for Replica<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("me", &self.me)
            .field("view", &self.view)
            .field("changing", &self.changing)
            .field("height", &self.ledger.height())
            .field("stable", &self.stable.seq)
            .finish_non_exhaustive()
    }
}

impl<S: Signer> Replica<S> {
    /// A fresh replica at genesis. Fails if the configuration is unusable
    /// or the signer is not a member of `validators`.
    pub fn new(cfg: Config, validators: ValidatorSet, signer: S, now: u64) -> Result<Self, Error> {
        let replica = Self::blank(cfg, validators, signer, now)?;
        if replica
            .validators
            .index_of(&replica.signer.public())
            .is_none()
        {
            return Err(Error::Config(
                "this identity is not in the validator set".into(),
            ));
        }
        Ok(replica)
    }

    /// A replica at genesis before its identity is checked against any
    /// set (see [`Replica::restore`], which replays the chain first).
    fn blank(cfg: Config, validators: ValidatorSet, signer: S, now: u64) -> Result<Self, Error> {
        cfg.validate()?;
        if cfg.max_new_view_bytes(validators.n()) > cfg.max_message_bytes as u64 {
            // A correct new view could then be refused as too large and the
            // view change would never complete.
            return Err(Error::Config(format!(
                "a new view for {} validators may reach {} bytes, above max_message_bytes; \
                 lower window or max_batch_bytes",
                validators.n(),
                cfg.max_new_view_bytes(validators.n())
            )));
        }
        let me = validators.index_of(&signer.public()).unwrap_or(0);
        let network = validators.network();
        let n = validators.n();
        let ledger = Ledger::keeping(network, cfg.blocks_in_memory);
        let cfg_interval = cfg.checkpoint_interval;
        let membership = Membership::genesis(
            validators.clone(),
            cfg.checkpoint_interval,
            cfg.window,
            cfg.join_puzzle,
        )?;
        Ok(Replica {
            next_retransmit: now.saturating_add(cfg.retransmit_interval_ms),
            next_status: now,
            serve_budget: cfg.max_fetch_serves_per_interval,
            cfg,
            me,
            network,
            view: 0,
            changing: false,
            vc_attempt: 0,
            deadline: None,
            log: BTreeMap::new(),
            stable: CheckpointProof {
                seq: 0,
                state: genesis_hash(network),
                messages: Vec::new(),
            },
            checkpoint_votes: BTreeMap::new(),
            ledger,
            pending: VecDeque::new(),
            pending_keys: HashSet::new(),
            in_flight: HashSet::new(),
            proposable_from: 0,
            relay: Vec::new(),
            relay_bytes: 0,
            relay_since: None,
            next_seq: 1,
            last_proposed_ts: 0,
            votes: BTreeMap::new(),
            view_changes: BTreeMap::new(),
            new_view: None,
            future: VecDeque::new(),
            future_per_sender: vec![0; n],
            out_of_window: VecDeque::new(),
            out_of_window_per_sender: vec![0; n],
            peers: vec![PeerInfo::default(); n],
            fetch: None,
            fetch_rotation: me,
            last_progress: now,
            now,
            outputs: VecDeque::new(),
            stats: Stats::default(),
            recovery: None,
            reputation: Reputation::new(n, cfg_interval),
            schedule: Schedule::genesis(n),
            schedule_basis: 0,
            membership,
            proofs: ProofCache::default(),
            epoch_number: 0,
            epoch_first_height: 1,
            epoch_handoff: None,
            retired: false,
            last_filler_ms: 0,
            handoff_votes: Vec::new(),
            former_answered: Vec::new(),
            former_members: Vec::new(),
            validators,
            signer,
        })
    }

    /// Rebuilds a replica from what it persisted. The ledger's hash links
    /// are re-checked (signatures are not: these are the node's own
    /// records). A replica restored from an empty state is a fresh replica;
    /// if it had voted before, it may now contradict those votes, which the
    /// fault model counts against the `f` tolerated faults. A node that
    /// knows it lost its state should use
    /// [`Replica::recover_after_data_loss`] instead.
    pub fn restore(
        cfg: Config,
        validators: ValidatorSet,
        signer: S,
        state: PersistedState,
        now: u64,
    ) -> Result<Self, Error> {
        let mut replica = Replica::blank(cfg, validators, signer, now)?;
        replica.schedule_basis = state.schedule_basis;
        for (block, cert) in state.blocks {
            let head = replica.ledger.head();
            if block.height != head.height.saturating_add(1) || block.prev_hash != head.hash {
                return Err(Error::InvalidBlock {
                    height: block.height,
                    reason: "persisted chain does not link".into(),
                });
            }
            replica.note_executed(&block, true);
            let (height, hash) = (block.height, block.hash());
            let applied = replica.ledger.append(block, cert);
            replica.note_membership(height, hash, &applied);
        }
        // What the replayed blocks did was reported before the restart.
        replica
            .outputs
            .retain(|o| !matches!(o, Output::Membership { .. }));
        if let Some(stable) = state.stable {
            replica.stable = stable;
        }
        replica.select_restored_epoch()?;
        let low = replica.stable.seq;
        replica.view = state.view;
        replica.changing = state.changing;
        replica.votes = state
            .votes
            .into_iter()
            .filter(|(seq, _)| *seq > low)
            .collect();
        for (seq, proof) in state.prepared {
            if seq > low {
                let view = decode_unverified(&proof.pre_prepare)
                    .map(|pp| pp.view)
                    .unwrap_or(0);
                replica.log.insert(
                    seq,
                    Slot {
                        view,
                        proof: Some(proof),
                        ..Slot::default()
                    },
                );
            }
        }
        let highest_vote = replica.votes.keys().next_back().copied().unwrap_or(0);
        replica.next_seq = highest_vote
            .max(low)
            .max(replica.ledger.height())
            .saturating_add(1);
        if let Some(bound) = state.recovering {
            replica.recovery = Some(Recovery {
                reports: BTreeMap::new(),
                bound,
            });
        }
        if replica.changing && replica.recovery.is_none() {
            // Our view change may have been lost with the crash: send it
            // again so the view change can complete.
            replica.send_view_change();
        }
        replica.update_timer();
        Ok(replica)
    }

    /// Starts a replica whose durable state was lost (disk replaced, data
    /// directory wiped) but whose identity survived.
    ///
    /// Such a replica may have voted before, and a vote it no longer
    /// remembers must not be contradicted: a primary that equivocates could
    /// otherwise gather two quorums. It first learns a bound from status
    /// messages of `2f + 1` other members: the highest height they report
    /// plus the window L bounds the sequence numbers it voted for (it voted
    /// only inside its old window, whose low end `f + 1` correct replicas
    /// had executed), and the highest view they report bounds the views it
    /// voted in (it voted in a view only after a quorum of view changes
    /// for it). Any `2f + 1` reporters include a correct replica of each of
    /// those sets. Until then it casts no vote at all; afterwards it votes
    /// only above one of the bounds. It sends no view change (its prepared
    /// proofs are gone) until its stable checkpoint passes the sequence
    /// bound, when recovery ends. Meanwhile it follows the ledger (state
    /// transfer, checkpoints), so it counts as faulty for liveness only,
    /// never for safety. A lying reporter can only lengthen the recovery.
    /// The recovery is persisted, so a crash during it does not end it.
    ///
    /// `blocks` is whatever chain the node has stored since (a full node's
    /// follower may have fetched it again): replayed, it puts the replica
    /// in the epoch the chain reached, so a validator that joined after
    /// genesis recovers too.
    pub fn recover_after_data_loss(
        cfg: Config,
        validators: ValidatorSet,
        signer: S,
        blocks: Vec<(Block, CommitCertificate)>,
        now: u64,
    ) -> Result<Self, Error> {
        let state = PersistedState {
            blocks,
            ..PersistedState::default()
        };
        let mut replica = Replica::restore(cfg, validators, signer, state, now)?;
        replica.recovery = Some(Recovery::default());
        replica.persist(PersistRecord::Recovering { bound: None });
        Ok(replica)
    }

    /// Whether this replica may vote at `(view, seq)`: not before it holds
    /// the checkpoint its epoch starts from (a newcomer fetches that state
    /// first), and, when recovering from lost state, only above the
    /// recovery bound.
    fn may_vote(&self, view: u64, seq: u64) -> bool {
        if self.retired || self.stable.seq.saturating_add(1) < self.epoch_first_height {
            return false;
        }
        match &self.recovery {
            None => true,
            Some(r) => r.bound.is_some_and(|b| seq > b.seq || view > b.view),
        }
    }

    /// Learns the recovery bound from status reports and ends recovery once
    /// the stable checkpoint has passed it.
    fn progress_recovery(&mut self, reporter: Option<(usize, u64, u64)>) {
        let needed = 2 * self.validators.f() + 1;
        let window = self.cfg.window;
        let stable = self.stable.seq;
        let Some(recovery) = self.recovery.as_mut() else {
            return;
        };
        if let Some((from, height, view)) = reporter {
            recovery.reports.insert(from, (height, view));
        }
        let mut learned = None;
        if recovery.bound.is_none() && recovery.reports.len() >= needed {
            let height = recovery.reports.values().map(|r| r.0).max().unwrap_or(0);
            let view = recovery.reports.values().map(|r| r.1).max().unwrap_or(0);
            let bound = RecoveryBound {
                seq: height.saturating_add(window),
                view,
            };
            recovery.bound = Some(bound);
            learned = Some(bound);
        }
        let done = recovery.bound.is_some_and(|b| stable >= b.seq);
        if let Some(bound) = learned {
            self.persist(PersistRecord::Recovering { bound: Some(bound) });
        }
        if done {
            self.recovery = None;
            self.persist(PersistRecord::Recovered);
        }
    }

    /// Whether this replica is still recovering from lost state.
    pub fn is_recovering(&self) -> bool {
        self.recovery.is_some()
    }

    /// Where this replica's recovery from lost state stands (`None` when
    /// it is not recovering), for operators.
    pub fn recovery_status(&self) -> Option<RecoveryStatus> {
        let recovery = self.recovery.as_ref()?;
        Some(RecoveryStatus {
            reports: recovery.reports.len(),
            reports_needed: 2 * self.validators.f() + 1,
            bound: recovery.bound,
            stable: self.stable.seq,
            recovering_validators: self.recovering_validators(),
            tolerated: self.validators.f(),
        })
    }

    /// Validators known to be recovering from lost state now: this one if
    /// it is, and the peers whose last status said so. More than `f` of
    /// them (with the others intact) cannot form a quorum, and none of
    /// them will vote until the others have moved a window on: the network
    /// stops until enough of them get their state back.
    pub fn recovering_validators(&self) -> usize {
        let peers = self
            .peers
            .iter()
            .enumerate()
            .filter(|(i, p)| *i != self.me && p.recovering)
            .count();
        peers + usize::from(self.recovery.is_some())
    }

    // ----- accessors -------------------------------------------------------

    /// Current view (the target view while a view change is in progress).
    pub fn view(&self) -> u64 {
        self.view
    }

    /// Whether a view change is in progress.
    pub fn is_changing_view(&self) -> bool {
        self.changing
    }

    /// Whether this replica is the primary of its current view.
    pub fn is_primary(&self) -> bool {
        self.primary_of(self.view) == self.me
    }

    /// The leader schedule of the current view, with the checkpoint it
    /// was taken at.
    pub fn leader_schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The leader schedule a view entered now would follow: the one at
    /// this replica's stable checkpoint.
    pub fn upcoming_schedule(&self) -> &Schedule {
        self.reputation.at(self.stable.seq)
    }

    /// The primary of the current view and why it was chosen (plain
    /// rotation, or rotation that skipped recently failed primaries).
    pub fn primary_choice(&self) -> PrimaryChoice {
        self.schedule.choice(self.view)
    }

    /// This replica's index in the validator set.
    pub fn index(&self) -> usize {
        self.me
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Ledger height.
    pub fn height(&self) -> u64 {
        self.ledger.height()
    }

    /// Sequence number of the stable checkpoint (the low watermark).
    pub fn stable_seq(&self) -> u64 {
        self.stable.seq
    }

    /// The ledger height that at least `f + 1` other validators (so at
    /// least one correct one) reported in their latest status messages; 0
    /// until that many have. Above [`Replica::height`], this replica is
    /// behind: `f` faulty peers alone cannot make it look so.
    pub fn reported_height(&self) -> u64 {
        let mut heights: Vec<u64> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.me)
            .map(|(_, p)| p.height)
            .collect();
        heights.sort_unstable_by(|a, b| b.cmp(a));
        heights.get(self.validators.f()).copied().unwrap_or(0)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The validator set.
    pub fn validators(&self) -> &ValidatorSet {
        &self.validators
    }

    /// The number of the epoch this replica votes in, and the first height
    /// that epoch decides.
    pub fn epoch(&self) -> (u64, u64) {
        (self.epoch_number, self.epoch_first_height)
    }

    /// The validator set along the executed chain: the epoch in force for
    /// the next height, the transition in flight, the join puzzle.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Whether this replica left the validator set (it votes no more; the
    /// node follows the chain as a full node instead).
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// Transactions waiting to be proposed.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Number of log entries kept (bounded by the window after garbage
    /// collection).
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// The next output, in the order the node must act on them.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The earliest time at which [`Replica::handle_tick`] has something to
    /// do.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.next_retransmit.min(self.next_status);
        if let Some(d) = self.deadline {
            t = t.min(d);
        }
        if let Some(f) = &self.fetch {
            t = t.min(f.deadline);
        }
        // A primary with room in its window proposes once its oldest
        // unproposed transaction has waited the batch delay; in-flight ones
        // must not count or the node would be woken in a loop.
        if let Some(since) = self.relay_since {
            t = t.min(since.saturating_add(self.cfg.max_batch_delay_ms));
        }
        if self.is_primary() && !self.changing && self.next_seq <= self.high_watermark() {
            let oldest = self
                .pending
                .range(self.proposable_from.min(self.pending.len())..)
                .find(|p| !self.in_flight.contains(&p.tx.key()))
                .map(|p| p.arrived.saturating_add(self.cfg.max_batch_delay_ms));
            if let Some(at) = oldest {
                t = t.min(at);
            }
        }
        if let Some(at) = self.filler_due() {
            t = t.min(at);
        }
        Some(t)
    }

    /// When this primary next proposes an empty batch: while a change of
    /// the validator set waits for this epoch's last height and nothing
    /// else is left to propose, one per batch delay, so a quiet network
    /// still reaches the boundary.
    fn filler_due(&self) -> Option<u64> {
        let end = self.epoch_end()?;
        if self.changing
            || self.retired
            || !self.is_primary()
            || self.next_seq > end.min(self.high_watermark())
        {
            return None;
        }
        let idle = self
            .pending
            .range(self.proposable_from.min(self.pending.len())..)
            .all(|p| self.in_flight.contains(&p.tx.key()));
        idle.then(|| {
            self.last_filler_ms
                .saturating_add(self.cfg.max_batch_delay_ms.max(1))
        })
    }

    // ----- inputs ----------------------------------------------------------

    /// A client transaction reached this node. A backup relays it to the
    /// primary (batched over at most the batch delay) and keeps it, to
    /// detect a primary that ignores it and to forward it to every
    /// validator if it is not proposed soon.
    pub fn handle_request(&mut self, tx: Transaction, now: u64) -> Result<(), Error> {
        self.advance_clock(now);
        if self.retired {
            return Err(Error::Config(
                "this replica left the validator set; submit to a validator".into(),
            ));
        }
        if tx.size() > self.cfg.max_tx_bytes {
            self.drop_input(DropReason::TooLarge);
            return Err(Error::Malformed("transaction too large".into()));
        }
        let relayed = (!self.is_primary() && !self.changing).then(|| tx.clone());
        self.admit(tx)?;
        if let Some(tx) = relayed {
            // The count limit is enforced after the push; bytes before it,
            // so a relayed batch never exceeds either.
            if self.relay_bytes + tx.size() > self.cfg.max_batch_bytes {
                self.flush_relay();
            }
            self.relay_bytes += tx.size();
            self.relay.push(tx);
            self.relay_since.get_or_insert(self.now);
            if self.relay.len() >= self.cfg.max_batch_txs
                || self.relay_bytes >= self.cfg.max_batch_bytes
            {
                self.flush_relay();
            }
        }
        self.try_propose();
        self.update_timer();
        Ok(())
    }

    /// Sends the queued client transactions to the current primary. During
    /// a view change they are not sent: the stale-request path forwards
    /// them to every validator once a new view is installed.
    fn flush_relay(&mut self) {
        self.relay_since = None;
        self.relay_bytes = 0;
        let txs = std::mem::take(&mut self.relay);
        if txs.is_empty() || self.changing || self.is_primary() {
            return;
        }
        let Some(primary) = self.validators.member(self.primary_of(self.view)).copied() else {
            return;
        };
        if let Some(signed) = self.seal(&Forward {
            network: self.network,
            txs,
        }) {
            self.stats.relayed_batches += 1;
            self.send(Recipient::One(primary), Message::Forward(signed));
        }
    }

    /// A message from a peer. Hostile input is dropped and counted, never
    /// panics.
    pub fn handle_message(&mut self, message: Message, now: u64) {
        self.advance_clock(now);
        self.stats.messages_received += 1;
        if self.retired {
            return;
        }
        self.dispatch(message);
        self.maybe_enter_epoch();
        self.update_timer();
    }

    /// Time passed: fires timers, batches, retransmissions and status.
    pub fn handle_tick(&mut self, now: u64) {
        self.advance_clock(now);
        if self.retired {
            return;
        }
        self.maybe_enter_epoch();
        let now = self.now;
        if let Some(deadline) = self.deadline
            && now >= deadline
        {
            if self.ledger.height() < self.stable.seq {
                // Behind a certified checkpoint, still fetching blocks: its
                // requests (or its wait for a new view it cannot judge yet)
                // wait for its own catch-up, not for the primary, so it
                // does not move on alone and leave the others' view. The
                // others change view without it if the primary has failed,
                // and pull it along.
                self.deadline = Some(now.saturating_add(self.timeout()));
            } else {
                self.deadline = None;
                let target = self.view.saturating_add(1);
                self.start_view_change(target);
            }
        }
        if self
            .relay_since
            .is_some_and(|since| since.saturating_add(self.cfg.max_batch_delay_ms) <= now)
        {
            self.flush_relay();
        }
        self.try_propose();
        if now >= self.next_retransmit {
            self.next_retransmit = now.saturating_add(self.cfg.retransmit_interval_ms);
            self.serve_budget = self.cfg.max_fetch_serves_per_interval;
            self.retransmit();
            self.forward_stale_requests();
            self.check_lagging();
        }
        if now >= self.next_status {
            self.next_status = now.saturating_add(self.cfg.status_interval_ms);
            let status = Status {
                network: self.network,
                view: self.view,
                height: self.ledger.height(),
                stable: self.stable.seq,
                recovering: self.recovery.is_some(),
            };
            if let Some(signed) = self.seal(&status) {
                self.send(Recipient::All, Message::Status(signed));
            }
        }
        if let Some(fetch) = self.fetch {
            if self.ledger.height() >= fetch.target {
                self.fetch = None;
            } else if now >= fetch.deadline {
                if fetch.fruitless >= self.validators.n() {
                    self.fetch = None;
                } else {
                    let peer = self.next_fetch_peer(None);
                    self.request_blocks(fetch.target, peer, fetch.fruitless + 1);
                }
            }
        }
        self.update_timer();
    }

    // ----- small helpers ---------------------------------------------------

    fn advance_clock(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    fn drop_input(&mut self, reason: DropReason) {
        *self.stats.dropped.entry(reason).or_insert(0) += 1;
    }

    fn quorum(&self) -> usize {
        self.validators.quorum()
    }

    /// The primary of `view` as this replica sees it: the current view's
    /// schedule for it (and older views); for a later view, the schedule
    /// it would take on entering it, the one at its stable checkpoint.
    fn primary_of(&self, view: u64) -> usize {
        if view <= self.view {
            self.schedule.primary(view)
        } else {
            self.reputation.at(self.stable.seq).primary(view)
        }
    }

    /// Folds an executed block into the reputation. While a restored
    /// replica replays its chain, it also takes up its current view's
    /// schedule when the replay passes the checkpoint it was based on; a
    /// running replica never changes a view's schedule mid-view.
    fn note_executed(&mut self, block: &Block, replaying: bool) {
        let Some(taken) = self.reputation.record(block) else {
            return;
        };
        if replaying && taken.height <= self.schedule_basis && taken.height > self.schedule.height {
            self.schedule = taken.clone();
        } else if !replaying {
            self.refresh_changing_schedule();
        }
    }

    /// While a view change is in progress (no new view installed yet),
    /// the target view follows the schedule at the current stable
    /// checkpoint, so a replica that catches up (blocks executed, stable
    /// checkpoint adopted) converges on the others' choice. Once the view
    /// is installed its schedule stays fixed.
    fn refresh_changing_schedule(&mut self) {
        if !self.changing || self.recovery.is_some() {
            return;
        }
        if self.reputation.at(self.stable.seq).height != self.schedule.height {
            self.enter_schedule();
            // It may now lead the view, with the view changes already in
            // hand (retransmissions of those are dropped as duplicates).
            self.try_build_new_view();
        }
    }

    /// Fixes the schedule of a view being entered: the one at this
    /// replica's stable checkpoint (or the newest it has executed, when
    /// its blocks are behind). Correct replicas entering a view change
    /// have stopped committing and exchange checkpoints, so they mostly
    /// hold the same stable checkpoint and pick the same primary. One that
    /// lags takes the new view the others install once it has executed
    /// up to the checkpoint that new view carries (see `on_new_view`).
    /// Persisted with the view, so a restarted replica picks the same
    /// primary.
    fn enter_schedule(&mut self) {
        self.schedule = self.reputation.at(self.stable.seq).clone();
        // The height of the schedule actually taken (older than the stable
        // checkpoint while blocks are still being fetched), so a restart
        // replays to exactly this one.
        self.schedule_basis = self.schedule.height;
        self.persist(PersistRecord::ScheduleBasis(self.schedule_basis));
    }

    /// The last height the epoch this replica votes in decides, once a
    /// transition is known: the boundary of the membership's transition
    /// in flight, or, when the executed chain has already passed it, the
    /// height before the chain's newest epoch.
    fn epoch_end(&self) -> Option<u64> {
        let latest = self.membership.epoch();
        if latest.number > self.epoch_number {
            Some(latest.first_height.saturating_sub(1))
        } else {
            self.membership.last_height_of_epoch()
        }
    }

    /// The set that signs the checkpoint at `seq`: this epoch's for its own
    /// heights (and the chain's newer one above them), the previous one for
    /// the hand-off at this epoch's start; none for older checkpoints.
    fn set_for_checkpoint(&self, seq: u64) -> Option<&ValidatorSet> {
        let latest = self.membership.epoch();
        if seq >= latest.first_height || latest.number == 0 {
            return Some(&latest.validators);
        }
        self.membership
            .previous_epoch()
            .filter(|previous| seq >= previous.first_height || previous.number == 0)
            .map(|previous| &previous.validators)
    }

    /// Folds an executed block into the membership; a block at a boundary
    /// also starts the new set's leader rotation (part of the chain's
    /// state, so every replica does it at the same height). What the
    /// block did is reported as [`Output::Membership`].
    fn note_membership(&mut self, height: u64, hash: Hash, applied: &[Transaction]) {
        let effects =
            match self
                .membership
                .apply_block(height, hash, applied, &self.signer, &mut self.proofs)
            {
                Ok(effects) => effects,
                Err(_) => {
                    // Blocks come in order from the ledger; a gap is a bug.
                    self.stats.local_errors += 1;
                    return;
                }
            };
        if let Some(epoch) = &effects.new_epoch {
            let newcomers: Vec<usize> = epoch
                .newcomers
                .iter()
                .filter_map(|k| epoch.validators.index_of(k))
                .collect();
            self.reputation
                .enter_epoch(height, epoch.validators.n(), &newcomers);
            if self.schedule.height == height {
                // Replaying at restart, the schedule just taken at this
                // height was the old set's; the view follows the new one.
                self.schedule = self.reputation.current().clone();
            }
        }
        if !effects.is_empty() {
            self.outputs
                .push_back(Output::Membership { height, effects });
        }
    }

    /// After a restart: the epoch this replica votes in, from the replayed
    /// chain and its stable checkpoint. The newest epoch once its hand-off
    /// checkpoint is held (or when the replica was not in the one before:
    /// a newcomer, which votes once it holds that checkpoint), else the
    /// one before.
    fn select_restored_epoch(&mut self) -> Result<(), Error> {
        let me = self.signer.public();
        let latest = self.membership.epoch().clone();
        let handoff = latest.first_height.saturating_sub(1);
        let previous = self.membership.previous_epoch().cloned();
        let in_previous = previous
            .as_ref()
            .is_some_and(|p| p.validators.index_of(&me).is_some());
        let epoch = match previous {
            Some(previous) if self.stable.seq < handoff && in_previous => previous,
            _ => latest,
        };
        let Some(index) = epoch.validators.index_of(&me) else {
            return Err(Error::NotInValidatorSet(epoch.number));
        };
        if self.stable.seq == epoch.first_height.saturating_sub(1) && epoch.number > 0 {
            self.epoch_handoff = Some(self.stable.clone());
        }
        self.adopt_epoch_set(&epoch, index);
        let handoff = epoch.first_height.saturating_sub(1);
        if epoch.number > 0 && self.schedule.height < handoff {
            // A newcomer (or a replica whose view predates the epoch)
            // starts from the epoch's first schedule.
            self.enter_epoch_schedule(handoff);
        }
        Ok(())
    }

    /// Takes the schedule every replica takes on moving into the epoch
    /// whose hand-off checkpoint is at `handoff`: the one taken at that
    /// height, whatever newer checkpoint a replica may already hold, so
    /// all agree on who leads the view they carry over.
    fn enter_epoch_schedule(&mut self, handoff: u64) {
        self.schedule = self.reputation.at(handoff).clone();
        self.schedule_basis = self.schedule.height;
        self.persist(PersistRecord::ScheduleBasis(self.schedule_basis));
    }

    /// Takes `epoch`'s set as the voting set, with this replica at
    /// `index`; peer facts follow their keys.
    fn adopt_epoch_set(&mut self, epoch: &Epoch, index: usize) {
        let old_keys = self.validators.members().to_vec();
        let old_peers = std::mem::take(&mut self.peers);
        let n = epoch.validators.n();
        self.peers = epoch
            .validators
            .members()
            .iter()
            .map(|key| {
                old_keys
                    .iter()
                    .position(|old| old == key)
                    .and_then(|i| old_peers.get(i).copied())
                    .unwrap_or_default()
            })
            .collect();
        self.validators = epoch.validators.clone();
        self.me = index;
        self.epoch_number = epoch.number;
        self.epoch_first_height = epoch.first_height;
        self.future_per_sender = vec![0; n];
        self.out_of_window_per_sender = vec![0; n];
        self.fetch = None;
        self.fetch_rotation = index;
    }

    /// Moves into the chain's newest epoch once this replica has executed
    /// up to its boundary and holds the old set's checkpoint certificate
    /// there: every number up to the boundary is then decided, and the
    /// new set starts from that certified state. A replica not in the new
    /// set retires (also when, without that certificate, it has executed a
    /// window past the boundary: the others have long moved on).
    /// Everything kept by validator index starts over; buffered messages
    /// are read again under the new set.
    fn maybe_enter_epoch(&mut self) {
        if self.retired {
            return;
        }
        let latest = self.membership.epoch();
        if latest.number <= self.epoch_number {
            return;
        }
        let handoff = latest.first_height.saturating_sub(1);
        let member = latest.validators.index_of(&self.signer.public());
        let executed = self.ledger.height();
        let certified = self.stable.seq >= handoff;
        // A leaver that missed the certificate may go once it has executed
        // the boundary and f + 1 others (one of them correct) report a
        // stable checkpoint at or past it: its votes are not needed there.
        let others_certified = self
            .peers
            .iter()
            .enumerate()
            .filter(|(i, p)| *i != self.me && p.stable >= handoff)
            .count()
            > self.validators.f();
        let long_past = executed >= handoff.saturating_add(self.cfg.window);
        if executed < handoff
            || !(certified || (member.is_none() && (long_past || others_certified)))
        {
            return;
        }
        let epoch = latest.clone();
        self.stats.epochs_entered += 1;
        self.outputs.push_back(Output::EpochStarted {
            number: epoch.number,
            first_height: epoch.first_height,
            validators: epoch.validators.members().to_vec(),
            member: member.is_some(),
        });
        let Some(index) = member else {
            self.retired = true;
            self.deadline = None;
            self.fetch = None;
            return;
        };
        if self.stable.seq == handoff {
            self.epoch_handoff = Some(self.stable.clone());
        }
        let buffered: Vec<Message> = self
            .future
            .drain(..)
            .chain(self.out_of_window.drain(..))
            .collect();
        // Who left stays known for a while (see `former_members`).
        for key in self.validators.members().to_vec() {
            if epoch.validators.index_of(&key).is_none() && !self.former_members.contains(&key) {
                self.former_members.push(key);
            }
        }
        let excess = self.former_members.len().saturating_sub(FORMER_MEMBERS);
        self.former_members.drain(..excess);
        self.former_answered
            .retain(|(key, _)| self.former_members.contains(key));
        self.adopt_epoch_set(&epoch, index);
        self.view_changes.clear();
        self.new_view = None;
        self.checkpoint_votes.clear();
        let keep = self.stable.seq.saturating_add(1);
        let _ = self.log.split_off(&keep);
        if let Some(recovery) = self.recovery.as_mut() {
            recovery.reports.clear();
        }
        if self.changing {
            // The view being changed to follows the stable checkpoint, as
            // in any view change.
            self.enter_schedule();
        } else {
            self.enter_epoch_schedule(handoff);
        }
        if self.changing {
            self.send_view_change();
        }
        self.rebuild_in_flight();
        for p in self.pending.iter_mut() {
            p.forwarded = false;
        }
        self.deadline = None;
        for message in buffered {
            self.dispatch(message);
        }
        self.update_timer();
        self.try_propose();
    }

    fn high_watermark(&self) -> u64 {
        // Above `executed + L` the epoch of a number is not known yet (a
        // change committed there could end the epoch below it), and no
        // number past the epoch's last is decided by this set.
        let high = self
            .stable
            .seq
            .min(self.ledger.height())
            .saturating_add(self.cfg.window);
        match self.epoch_end() {
            Some(end) => high.min(end),
            None => high,
        }
    }

    fn timeout(&self) -> u64 {
        let shift = self.vc_attempt.min(20);
        self.cfg
            .view_change_timeout_ms
            .saturating_mul(1u64 << shift)
            .min(self.cfg.max_view_change_timeout_ms)
    }

    fn send(&mut self, to: Recipient, message: Message) {
        self.outputs.push_back(Output::Send { to, message });
    }

    fn send_to(&mut self, index: usize, message: Message) {
        if let Some(key) = self.validators.member(index).copied() {
            self.send(Recipient::One(key), message);
        }
    }

    fn persist(&mut self, record: PersistRecord) {
        self.outputs.push_back(Output::Persist(record));
    }

    fn seal<T: SignedPayload>(&mut self, value: &T) -> Option<Signed<T>> {
        match self.signer.seal(value) {
            Ok(signed) => Some(signed),
            Err(_) => {
                self.stats.local_errors += 1;
                None
            }
        }
    }

    /// Membership and strict signature check; returns the sender's index and
    /// the payload.
    fn open<T: SignedPayload + Clone + 'static>(
        &mut self,
        signed: &Signed<T>,
    ) -> Option<(usize, T)> {
        let Some(index) = self.validators.index_of(signed.signer()) else {
            self.drop_input(DropReason::NotMember);
            return None;
        };
        self.open_signed(signed).map(|value| (index, value))
    }

    /// The strict signature check alone (the caller has decided whom it
    /// takes the message from), counting what it drops.
    fn open_signed<T: SignedPayload + Clone + 'static>(&mut self, signed: &Signed<T>) -> Option<T> {
        match self.signer.open(signed) {
            Ok(value) => Some(value),
            Err(Error::BadSignature) => {
                self.drop_input(DropReason::BadSignature);
                None
            }
            Err(_) => {
                self.drop_input(DropReason::Malformed);
                None
            }
        }
    }

    fn check_network(&mut self, network: NetworkId) -> bool {
        if network != self.network {
            self.drop_input(DropReason::WrongNetwork);
            return false;
        }
        true
    }

    fn has_work(&self) -> bool {
        let height = self.ledger.height();
        !self.pending.is_empty()
            || self
                .log
                .range(height.saturating_add(1)..)
                .any(|(_, s)| s.digest.is_some())
    }

    /// Keeps the view-change timer armed exactly while work is outstanding.
    fn update_timer(&mut self) {
        if self.changing {
            // A replica whose latest view change is for this view or a
            // later one has given up on every earlier view.
            let joined: BTreeSet<usize> = self
                .view_changes
                .range(self.view..)
                .flat_map(|(_, m)| m.keys().copied())
                .collect();
            let quorum_joined = joined.len() >= self.quorum();
            if !quorum_joined {
                self.deadline = None;
            } else if self.deadline.is_none() {
                self.deadline = Some(self.now.saturating_add(self.timeout()));
            }
            return;
        }
        if self.has_work() {
            if self.deadline.is_none() {
                self.deadline = Some(self.now.saturating_add(self.timeout()));
            }
        } else {
            self.deadline = None;
        }
    }

    // ----- client requests -------------------------------------------------

    fn admit(&mut self, tx: Transaction) -> Result<(), Error> {
        let key = tx.key();
        if self.ledger.is_applied(&tx.client, tx.seq) {
            self.drop_input(DropReason::AlreadyApplied);
            return Err(Error::Duplicate);
        }
        if self.pending_keys.contains(&key) {
            self.drop_input(DropReason::Duplicate);
            return Err(Error::Duplicate);
        }
        if self.pending.len() >= self.cfg.max_pending_requests {
            self.drop_input(DropReason::PendingFull);
            return Err(Error::Full("pending request buffer"));
        }
        self.pending_keys.insert(key);
        self.pending.push_back(PendingTx {
            tx,
            arrived: self.now,
            forwarded: false,
        });
        Ok(())
    }

    fn forget_pending(&mut self, keys: &HashSet<(ClientId, u64)>) {
        if keys.is_empty() {
            return;
        }
        let (mut index, mut removed_before) = (0, 0);
        let from = self.proposable_from;
        self.pending.retain(|p| {
            let keep = !keys.contains(&p.tx.key());
            if !keep && index < from {
                removed_before += 1;
            }
            index += 1;
            keep
        });
        self.proposable_from = from - removed_before;
        for key in keys {
            self.pending_keys.remove(key);
            self.in_flight.remove(key);
        }
    }

    fn forward_stale_requests(&mut self) {
        if self.changing || self.is_primary() {
            return;
        }
        let cutoff = self.now.saturating_sub(self.cfg.forward_after_ms);
        let mut txs = Vec::new();
        let mut bytes = 0;
        for p in self.pending.iter_mut() {
            if p.forwarded || p.arrived > cutoff || self.in_flight.contains(&p.tx.key()) {
                continue;
            }
            if txs.len() >= self.cfg.max_batch_txs || bytes + p.tx.size() > self.cfg.max_batch_bytes
            {
                break;
            }
            p.forwarded = true;
            bytes += p.tx.size();
            txs.push(p.tx.clone());
        }
        if txs.is_empty() {
            return;
        }
        // To every validator, not only the primary: as PBFT's client
        // broadcasts a request the primary ignores, so that every backup
        // holds it, arms its view-change timer, and a faulty primary is
        // replaced even when the request reached a single backup.
        if let Some(signed) = self.seal(&Forward {
            network: self.network,
            txs,
        }) {
            self.send(Recipient::All, Message::Forward(signed));
        }
    }

    fn on_forward(&mut self, signed: Signed<Forward>) {
        let Some((_, fwd)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(fwd.network) {
            return;
        }
        if fwd.txs.len() > self.cfg.max_batch_txs {
            self.drop_input(DropReason::TooLarge);
            return;
        }
        for tx in fwd.txs {
            if tx.size() > self.cfg.max_tx_bytes {
                self.drop_input(DropReason::TooLarge);
                continue;
            }
            // Refusals are already counted by `admit`.
            let _ = self.admit(tx);
        }
        self.try_propose();
    }

    // ----- normal case -----------------------------------------------------

    fn try_propose(&mut self) {
        if self.changing || !self.is_primary() {
            return;
        }
        loop {
            if self.next_seq > self.high_watermark() {
                return;
            }
            let mut ready = false;
            let mut count = 0;
            let mut bytes = 0;
            let from = self.proposable_from.min(self.pending.len());
            for p in self.pending.range(from..) {
                if self.in_flight.contains(&p.tx.key()) {
                    continue;
                }
                count += 1;
                bytes += p.tx.size();
                if p.arrived.saturating_add(self.cfg.max_batch_delay_ms) <= self.now {
                    ready = true;
                }
                if count >= self.cfg.max_batch_txs || bytes >= self.cfg.max_batch_bytes {
                    ready = true;
                    break;
                }
            }
            if count == 0 && self.filler_due().is_some_and(|at| at <= self.now) {
                // Nothing to order, but a validator-set change waits for
                // the epoch's last height: carry the chain there.
                self.last_filler_ms = self.now;
            } else if count == 0 || !ready {
                return;
            }
            let mut txs = Vec::new();
            let mut size = 0;
            // Where the scan stopped: everything before it is in flight
            // once this batch is proposed.
            let mut scanned = from;
            for p in self.pending.range(from..) {
                if self.in_flight.contains(&p.tx.key()) {
                    scanned += 1;
                    continue;
                }
                if txs.len() >= self.cfg.max_batch_txs
                    || (size + p.tx.size() > self.cfg.max_batch_bytes && !txs.is_empty())
                {
                    break;
                }
                size += p.tx.size();
                scanned += 1;
                txs.push(p.tx.clone());
            }
            let seq = self.next_seq;
            if !self.may_vote(self.view, seq) {
                return;
            }
            if self.votes.get(&seq).is_some_and(|(v, _)| *v == self.view) {
                // Already proposed here before a restart: never propose
                // something else at the same (view, seq).
                self.next_seq = seq.saturating_add(1);
                continue;
            }
            // Never below a batch already in the log (re-proposed after a
            // view change, perhaps by a primary whose clock ran ahead), or
            // backups would refuse the proposal as going backwards.
            let logged = self
                .log
                .range(..seq)
                .filter_map(|(_, slot)| slot.batch.as_ref().map(|b| b.timestamp))
                .max()
                .unwrap_or(0);
            let timestamp = self
                .now
                .max(self.last_proposed_ts)
                .max(self.ledger.head().timestamp)
                .max(logged);
            self.last_proposed_ts = timestamp;
            let batch = Batch {
                proposed_view: self.view,
                timestamp,
                txs,
            };
            let header = batch.header_and_tx_hashes();
            let digest = header.0.digest();
            let pp = PrePrepare {
                network: self.network,
                view: self.view,
                seq,
                digest,
            };
            let Some(signed) = self.seal(&pp) else { return };
            self.next_seq = seq.saturating_add(1);
            self.persist(PersistRecord::Vote {
                view: self.view,
                seq,
                digest,
            });
            self.votes.insert(seq, (self.view, digest));
            self.send(
                Recipient::All,
                Message::PrePrepare {
                    pre_prepare: signed.clone(),
                    batch: batch.clone(),
                },
            );
            // Before accepting: accepting may commit the batch at once (a
            // single validator, or votes that arrived first), and the
            // commit's bookkeeping adjusts this index.
            self.proposable_from = scanned;
            self.accept_pre_prepare(seq, signed, batch, header);
        }
    }

    /// Stores an accepted pre-prepare in the slot; sends this backup's
    /// prepare after persisting the vote.
    fn accept_pre_prepare(
        &mut self,
        seq: u64,
        signed: Signed<PrePrepare>,
        batch: Batch,
        (header, tx_hashes): (BatchHeader, Vec<Hash>),
    ) {
        let view = self.view;
        let digest = header.digest();
        for tx in &batch.txs {
            self.in_flight.insert(tx.key());
        }
        let now = self.now;
        let slot = self.log.entry(seq).or_default();
        if slot.view != view {
            slot.reset_for_view(view);
        }
        slot.digest = Some(digest);
        slot.pre_prepare = Some(signed);
        slot.batch = Some(batch);
        slot.header = Some((header, tx_hashes.into()));
        slot.touched = now;
        if self.primary_of(view) != self.me && self.may_vote(view, seq) {
            if self.votes.get(&seq) != Some(&(view, digest)) {
                self.persist(PersistRecord::Vote { view, seq, digest });
                self.votes.insert(seq, (view, digest));
            }
            let prepare = Prepare {
                network: self.network,
                view,
                seq,
                digest,
            };
            if let Some(signed) = self.seal(&prepare) {
                if let Some(slot) = self.log.get_mut(&seq) {
                    slot.prepares.insert(self.me, (digest, signed.clone()));
                }
                self.send(Recipient::All, Message::Prepare(signed));
            }
        }
        self.check_prepared(seq);
        self.check_committed(seq);
    }

    /// Routes a normal-case message by view and watermark: returns true if
    /// it is for the current view and inside the window.
    fn admit_normal(&mut self, from: usize, view: u64, seq: u64, message: &Message) -> bool {
        if view < self.view {
            self.drop_input(DropReason::OldView);
            return false;
        }
        if view > self.view || self.changing {
            self.buffer_future(from, message.clone(), view);
            return false;
        }
        if seq <= self.stable.seq {
            self.drop_input(DropReason::BelowWindow);
            return false;
        }
        if seq > self.high_watermark() {
            let share = self.buffer_share(self.cfg.max_out_of_window_messages);
            let used = self
                .out_of_window_per_sender
                .get(from)
                .copied()
                .unwrap_or(usize::MAX);
            if self.out_of_window.len() >= self.cfg.max_out_of_window_messages || used >= share {
                self.drop_input(DropReason::OutOfWindowOverflow);
            } else {
                if let Some(c) = self.out_of_window_per_sender.get_mut(from) {
                    *c += 1;
                }
                self.out_of_window.push_back(message.clone());
            }
            return false;
        }
        true
    }

    /// Each sender's share of a buffer of `cap` messages.
    fn buffer_share(&self, cap: usize) -> usize {
        (cap / self.validators.n()).max(1)
    }

    fn buffer_future(&mut self, from: usize, message: Message, view: u64) {
        let share = self.buffer_share(self.cfg.max_future_messages);
        let used = self
            .future_per_sender
            .get(from)
            .copied()
            .unwrap_or(usize::MAX);
        if self.future.len() >= self.cfg.max_future_messages
            || used >= share
            || view > self.view.saturating_add(self.cfg.max_future_views)
        {
            self.drop_input(DropReason::FutureViewOverflow);
        } else {
            if let Some(c) = self.future_per_sender.get_mut(from) {
                *c += 1;
            }
            self.future.push_back(message);
        }
    }

    fn on_pre_prepare(&mut self, signed: Signed<PrePrepare>, batch: Batch) {
        let Some((from, pp)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(pp.network) {
            return;
        }
        let message = Message::PrePrepare {
            pre_prepare: signed.clone(),
            batch: batch.clone(),
        };
        if !self.admit_normal(from, pp.view, pp.seq, &message) {
            return;
        }
        if from != self.primary_of(pp.view) {
            self.drop_input(DropReason::NotPrimary);
            return;
        }
        if let Some(slot) = self.log.get(&pp.seq)
            && slot.view == pp.view
            && let Some(existing) = slot.digest
        {
            let reason = if existing == pp.digest {
                DropReason::Duplicate
            } else {
                DropReason::Equivocation
            };
            self.drop_input(reason);
            return;
        }
        let header = batch.header_and_tx_hashes();
        if header.0.digest() != pp.digest {
            self.drop_input(DropReason::DigestMismatch);
            return;
        }
        if batch.proposed_view > pp.view {
            self.drop_input(DropReason::Malformed);
            return;
        }
        if batch.txs.len() > self.cfg.max_batch_txs
            || batch.size() > self.cfg.max_batch_bytes
            || batch.txs.iter().any(|t| t.size() > self.cfg.max_tx_bytes)
        {
            self.drop_input(DropReason::TooLarge);
            return;
        }
        if let Some((view, digest)) = self.votes.get(&pp.seq)
            && *view == pp.view
            && *digest != pp.digest
        {
            self.drop_input(DropReason::ConflictsWithOwnVote);
            return;
        }
        // The previous block's timestamp bounds this one from below, local
        // time (with the allowed skew) from both sides.
        let floor = self
            .log
            .range(..pp.seq)
            .filter(|(_, s)| s.view == pp.view)
            .filter_map(|(_, s)| s.batch.as_ref().map(|b| b.timestamp))
            .max()
            .unwrap_or(0)
            .max(if self.ledger.height() < pp.seq {
                self.ledger.head().timestamp
            } else {
                0
            });
        let skew = self.cfg.max_clock_skew_ms;
        if batch.timestamp < floor
            || batch.timestamp > self.now.saturating_add(skew)
            || batch.timestamp.saturating_add(skew) < self.now
        {
            self.drop_input(DropReason::BadTimestamp);
            return;
        }
        self.accept_pre_prepare(pp.seq, signed, batch, header);
    }

    fn on_prepare(&mut self, signed: Signed<Prepare>) {
        let Some((from, p)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(p.network) {
            return;
        }
        if !self.admit_normal(from, p.view, p.seq, &Message::Prepare(signed.clone())) {
            return;
        }
        if from == self.primary_of(p.view) {
            self.drop_input(DropReason::Malformed);
            return;
        }
        if self.record_vote(
            p.seq,
            from,
            p.digest,
            signed,
            |slot| &mut slot.prepares,
            crate::evidence::Equivocation::Prepares,
        ) {
            self.check_prepared(p.seq);
        }
    }

    /// Stores `from`'s vote for `digest` at `seq` in this view's slot (the
    /// map `votes` picks: prepares or commits). A repeated vote is a
    /// duplicate, a different one an equivocation; both are dropped and
    /// counted, and an equivocation is reported with both signed votes as
    /// [`Output::Evidence`] (built by `evidence`). Returns whether the vote
    /// was new.
    fn record_vote<T: Clone>(
        &mut self,
        seq: u64,
        from: usize,
        digest: Hash,
        signed: Signed<T>,
        votes: impl FnOnce(&mut Slot) -> &mut BTreeMap<usize, (Hash, Signed<T>)>,
        evidence: impl FnOnce(Signed<T>, Signed<T>) -> crate::evidence::Equivocation,
    ) -> bool {
        let (view, now) = (self.view, self.now);
        let slot = self.log.entry(seq).or_default();
        if slot.view != view {
            slot.reset_for_view(view);
        }
        let reason = match votes(slot).entry(from) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert((digest, signed));
                slot.touched = now;
                return true;
            }
            std::collections::btree_map::Entry::Occupied(e) if e.get().0 == digest => {
                DropReason::Duplicate
            }
            std::collections::btree_map::Entry::Occupied(e) => {
                let first = e.get().1.clone();
                self.outputs
                    .push_back(Output::Evidence(evidence(first, signed)));
                DropReason::Equivocation
            }
        };
        self.drop_input(reason);
        false
    }

    fn on_commit(&mut self, signed: Signed<Commit>) {
        let Some((from, c)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(c.network) {
            return;
        }
        if !self.admit_normal(from, c.view, c.seq, &Message::Commit(signed.clone())) {
            return;
        }
        if self.record_vote(
            c.seq,
            from,
            c.digest,
            signed,
            |slot| &mut slot.commits,
            crate::evidence::Equivocation::Commits,
        ) {
            self.check_committed(c.seq);
        }
    }

    fn check_prepared(&mut self, seq: u64) {
        let view = self.view;
        let quorum = self.quorum();
        let Some(slot) = self.log.get_mut(&seq) else {
            return;
        };
        if slot.prepared || slot.view != view {
            return;
        }
        let (Some(digest), Some(pp), Some(batch)) =
            (slot.digest, slot.pre_prepare.clone(), slot.batch.clone())
        else {
            return;
        };
        // The pre-prepare's signer counts once, through its pre-prepare:
        // `2f + 1` distinct signers, as `validate_prepared` checks.
        let proposer = self.validators.index_of(pp.signer());
        let prepares: Vec<Signed<Prepare>> = slot
            .prepares
            .iter()
            .filter(|(i, (d, _))| Some(**i) != proposer && *d == digest)
            .map(|(_, (_, s))| s.clone())
            .collect();
        if prepares.len() + 1 < quorum {
            return;
        }
        slot.prepared = true;
        let proof = PreparedProof {
            pre_prepare: pp,
            batch,
            prepares,
        };
        slot.proof = Some(proof.clone());
        self.persist(PersistRecord::Prepared(proof));
        if !self.may_vote(view, seq) {
            self.check_committed(seq);
            return;
        }
        let commit = Commit {
            network: self.network,
            view,
            seq,
            digest,
        };
        if let Some(signed) = self.seal(&commit) {
            if let Some(slot) = self.log.get_mut(&seq) {
                slot.commits.insert(self.me, (digest, signed.clone()));
            }
            self.send(Recipient::All, Message::Commit(signed));
        }
        self.check_committed(seq);
    }

    fn check_committed(&mut self, seq: u64) {
        let view = self.view;
        let quorum = self.quorum();
        let Some(slot) = self.log.get_mut(&seq) else {
            return;
        };
        if slot.committed || slot.view != view {
            return;
        }
        if slot.prepared {
            let Some(digest) = slot.digest else { return };
            let count = slot.commits.values().filter(|(d, _)| *d == digest).count();
            if count >= quorum {
                slot.committed = true;
                self.try_execute();
            }
            return;
        }
        // A quorum committed something this replica never prepared (it
        // missed the pre-prepare or prepares): fetch the block instead.
        let mut counts: BTreeMap<Hash, usize> = BTreeMap::new();
        for (d, _) in slot.commits.values() {
            *counts.entry(*d).or_insert(0) += 1;
        }
        if counts.values().any(|c| *c >= quorum) && seq > self.ledger.height() {
            let hint = slot.commits.keys().copied().find(|i| *i != self.me);
            self.start_fetch(seq, hint);
        }
    }

    fn try_execute(&mut self) {
        loop {
            let next = self.ledger.height().saturating_add(1);
            let Some(slot) = self.log.get(&next) else {
                return;
            };
            if !slot.committed {
                return;
            }
            let (Some(batch), Some(digest), Some((header, tx_hashes))) =
                (slot.batch.clone(), slot.digest, slot.header.clone())
            else {
                return;
            };
            let commits: Vec<Signed<Commit>> = slot
                .commits
                .values()
                .filter(|(d, _)| *d == digest)
                .map(|(_, s)| s.clone())
                .collect();
            let batch_root = header.batch_root;
            let cert = CommitCertificate {
                view: slot.view,
                seq: next,
                header,
                commits,
            };
            let block = self.ledger.block_from(batch, batch_root);
            self.commit_block(block, cert, Some(tx_hashes));
        }
    }

    /// Appends a verified block, persists it first, then reports it and
    /// takes a checkpoint when due.
    /// `tx_hashes` are the block's transaction hashes when this replica
    /// executed the batch itself; a fetched block's are computed here.
    fn commit_block(
        &mut self,
        block: Block,
        cert: CommitCertificate,
        tx_hashes: Option<Arc<[Hash]>>,
    ) {
        let fetched = tx_hashes.is_none();
        let tx_hashes =
            tx_hashes.unwrap_or_else(|| block.txs.iter().map(Transaction::hash).collect());
        self.persist(PersistRecord::Block {
            block: block.clone(),
            certificate: cert.clone(),
        });
        let keys: HashSet<(ClientId, u64)> = block.txs.iter().map(Transaction::key).collect();
        self.note_executed(&block, false);
        let applied = self.ledger.append(block.clone(), cert.clone());
        self.note_membership(block.height, block.hash(), &applied);
        self.forget_pending(&keys);
        if fetched {
            self.stats.blocks_fetched += 1;
        } else {
            self.stats.blocks_committed += 1;
        }
        let height = block.height;
        let state = block.hash();
        self.outputs.push_back(Output::Committed {
            block,
            certificate: cert,
            applied,
            tx_hashes,
        });
        self.vc_attempt = 0;
        self.last_progress = self.now;
        self.deadline = None;
        self.next_seq = self.next_seq.max(height.saturating_add(1));
        // Checkpoints past this epoch's end are the next set's to sign
        // (this replica joins them once it has moved into that epoch).
        let in_epoch = self.epoch_end().is_none_or(|end| height <= end);
        if height.is_multiple_of(self.cfg.checkpoint_interval) && in_epoch && !self.retired {
            let checkpoint = Checkpoint {
                network: self.network,
                seq: height,
                state,
            };
            if let Some(signed) = self.seal(&checkpoint) {
                self.send(Recipient::All, Message::Checkpoint(signed.clone()));
                self.record_checkpoint_vote(self.me, height, state, signed);
            }
        }
    }

    // ----- checkpoints -----------------------------------------------------

    fn on_checkpoint(&mut self, signed: Signed<Checkpoint>) {
        // The old set's checkpoint at this epoch's start, which a replica
        // that moved in without it (a newcomer) needs before it votes:
        // signed by the previous set, counted against it.
        let handoff = self.epoch_first_height.saturating_sub(1);
        if self.epoch_number > 0
            && self.stable.seq < handoff
            && decode_unverified(&signed).is_ok_and(|c| c.seq == handoff)
        {
            self.on_handoff_checkpoint(signed);
            return;
        }
        let Some((from, c)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(c.network) {
            return;
        }
        if c.seq <= self.stable.seq {
            self.drop_input(DropReason::BelowWindow);
            return;
        }
        if c.seq % self.cfg.checkpoint_interval != 0 {
            self.drop_input(DropReason::Malformed);
            return;
        }
        if self.epoch_end().is_some_and(|end| c.seq > end) {
            // The next set's checkpoint; counted once this replica is in
            // that epoch (its signer's index there may differ).
            self.drop_input(DropReason::OtherEpoch);
            return;
        }
        self.record_checkpoint_vote(from, c.seq, c.state, signed);
    }

    /// A vote of the previous set for the hand-off checkpoint: kept (one
    /// per signer, bounded by that set's size) until a quorum of that set
    /// agrees, then adopted as the stable checkpoint.
    fn on_handoff_checkpoint(&mut self, signed: Signed<Checkpoint>) {
        let Some(previous) = self
            .set_for_checkpoint(self.epoch_first_height.saturating_sub(1))
            .cloned()
        else {
            self.drop_input(DropReason::OtherEpoch);
            return;
        };
        if previous.index_of(signed.signer()).is_none() {
            self.drop_input(DropReason::NotMember);
            return;
        }
        let Some(c) = self.open_signed(&signed) else {
            return;
        };
        if !self.check_network(c.network) {
            return;
        }
        self.handoff_votes.retain(|s| s.signer() != signed.signer());
        self.handoff_votes.push(signed);
        let mut by_state: BTreeMap<Hash, Vec<Signed<Checkpoint>>> = BTreeMap::new();
        for vote in &self.handoff_votes {
            if let Ok(v) = decode_unverified(vote) {
                by_state.entry(v.state).or_default().push(vote.clone());
            }
        }
        let Some((state, messages)) = by_state
            .into_iter()
            .find(|(_, m)| m.len() >= previous.quorum())
        else {
            return;
        };
        let proof = CheckpointProof {
            seq: c.seq,
            state,
            messages,
        };
        if self.validate_checkpoint_proof(&proof).is_ok() {
            self.handoff_votes.clear();
            self.adopt_stable(proof);
        }
    }

    fn record_checkpoint_vote(
        &mut self,
        from: usize,
        seq: u64,
        state: Hash,
        signed: Signed<Checkpoint>,
    ) {
        let votes = self.checkpoint_votes.entry(seq).or_default();
        if votes.contains_key(&from) {
            self.drop_input(DropReason::Duplicate);
            return;
        }
        votes.insert(from, (state, signed));
        // Bound memory per sender: keep only its highest few checkpoints.
        let mine: Vec<u64> = self
            .checkpoint_votes
            .iter()
            .filter(|(_, v)| v.contains_key(&from))
            .map(|(s, _)| *s)
            .collect();
        if mine.len() > self.cfg.max_checkpoints_per_replica
            && let Some(lowest) = mine.first()
            && let Some(v) = self.checkpoint_votes.get_mut(lowest)
        {
            v.remove(&from);
        }
        self.checkpoint_votes.retain(|_, v| !v.is_empty());
        self.check_stable(seq);
    }

    fn check_stable(&mut self, seq: u64) {
        let quorum = self.quorum();
        let Some(votes) = self.checkpoint_votes.get(&seq) else {
            return;
        };
        let mut by_state: BTreeMap<Hash, Vec<Signed<Checkpoint>>> = BTreeMap::new();
        for (state, signed) in votes.values() {
            by_state.entry(*state).or_default().push(signed.clone());
        }
        let Some((state, messages)) = by_state.into_iter().find(|(_, m)| m.len() >= quorum) else {
            return;
        };
        self.adopt_stable(CheckpointProof {
            seq,
            state,
            messages,
        });
    }

    /// Moves the low watermark to a verified stable checkpoint and forgets
    /// everything at or below it.
    fn adopt_stable(&mut self, proof: CheckpointProof) {
        if proof.seq <= self.stable.seq {
            return;
        }
        let seq = proof.seq;
        self.persist(PersistRecord::StableCheckpoint(proof.clone()));
        self.stable = proof;
        self.stats.stable_checkpoints += 1;
        let keep = seq.saturating_add(1);
        self.log = self.log.split_off(&keep);
        self.checkpoint_votes = self.checkpoint_votes.split_off(&keep);
        self.votes = self.votes.split_off(&keep);
        self.next_seq = self.next_seq.max(keep);
        self.rebuild_in_flight();
        if self.ledger.height() < seq {
            self.start_fetch(seq, None);
        }
        // Mid-change, this replica's view change now understates what it
        // knows: send it again with the new checkpoint, so a new view
        // built from it carries the checkpoint whose schedule chose the
        // primary (see `try_build_new_view`).
        if self.changing
            && self
                .view_changes
                .get(&self.view)
                .is_some_and(|m| m.contains_key(&self.me))
        {
            self.send_view_change();
        }
        self.refresh_changing_schedule();
        self.progress_recovery(None);
        let buffered: Vec<Message> = self.out_of_window.drain(..).collect();
        self.out_of_window_per_sender
            .iter_mut()
            .for_each(|c| *c = 0);
        for message in buffered {
            self.dispatch(message);
        }
        self.try_propose();
    }

    fn rebuild_in_flight(&mut self) {
        // Transactions may have left flight: scan from the start again.
        self.proposable_from = 0;
        let height = self.ledger.height();
        self.in_flight = self
            .log
            .range(height.saturating_add(1)..)
            .filter_map(|(_, s)| s.batch.as_ref())
            .flat_map(|b| b.txs.iter().map(Transaction::key))
            .collect();
    }

    // ----- view change -----------------------------------------------------

    fn start_view_change(&mut self, target: u64) {
        // A recovering replica's view change would omit prepared proofs it
        // forgot; it waits for the others' new view instead.
        if target <= self.view || self.recovery.is_some() {
            return;
        }
        self.view = target;
        self.changing = true;
        self.new_view = None;
        self.stats.view_changes_started += 1;
        self.enter_schedule();
        self.persist(PersistRecord::View {
            view: target,
            changing: true,
        });
        self.send_view_change();
        // The wait for the new view starts only once a quorum has joined
        // this view (see `update_timer`): a replica alone cannot run ahead
        // of the others through ever higher views.
        self.deadline = None;
        self.vc_attempt = self.vc_attempt.saturating_add(1);
        self.view_changes.retain(|v, _| *v >= target);
        self.try_build_new_view();
        self.replay_future();
    }

    /// Signs and broadcasts this replica's view change for the current
    /// (target) view: its stable checkpoint and every prepared proof above.
    fn send_view_change(&mut self) {
        let target = self.view;
        let low = self.stable.seq;
        let prepared: Vec<PreparedProof> = self
            .log
            .range(low.saturating_add(1)..)
            .filter_map(|(_, s)| s.proof.clone())
            .collect();
        let vc = ViewChange {
            network: self.network,
            new_view: target,
            checkpoint: self.stable.clone(),
            prepared,
        };
        if let Some(signed) = self.seal(&vc) {
            self.view_changes
                .entry(target)
                .or_default()
                .insert(self.me, signed.clone());
            self.send(Recipient::All, Message::ViewChange(signed));
        }
    }

    fn validate_checkpoint_proof(&self, proof: &CheckpointProof) -> Result<(), Error> {
        if proof.seq == 0 {
            if proof.state == genesis_hash(self.network) && proof.messages.is_empty() {
                return Ok(());
            }
            return Err(Error::InvalidCertificate("bad genesis checkpoint".into()));
        }
        if !proof.seq.is_multiple_of(self.cfg.checkpoint_interval) {
            return Err(Error::InvalidCertificate(
                "checkpoint off the interval".into(),
            ));
        }
        let set = self.set_for_checkpoint(proof.seq).ok_or_else(|| {
            Error::InvalidCertificate("checkpoint from an epoch no longer known".into())
        })?;
        let mut signers = BTreeSet::new();
        for signed in &proof.messages {
            let index = set
                .index_of(signed.signer())
                .ok_or_else(|| Error::InvalidCertificate("checkpoint from a non-member".into()))?;
            let c = self.signer.open(signed)?;
            if c.network != self.network || c.seq != proof.seq || c.state != proof.state {
                return Err(Error::InvalidCertificate(
                    "checkpoint does not match".into(),
                ));
            }
            signers.insert(index);
        }
        if signers.len() < set.quorum() {
            return Err(Error::InvalidCertificate(
                "too few checkpoint signers".into(),
            ));
        }
        Ok(())
    }

    /// Checks a prepared proof and returns its pre-prepare.
    fn validate_prepared(
        &self,
        proof: &PreparedProof,
        low: u64,
        new_view: u64,
    ) -> Result<PrePrepare, Error> {
        let bad = |why: &str| Err(Error::InvalidCertificate(why.into()));
        let Some(from) = self.validators.index_of(proof.pre_prepare.signer()) else {
            return bad("pre-prepare from a non-member");
        };
        let pp = self.signer.open(&proof.pre_prepare)?;
        // Any member's pre-prepare is taken: which validator led an older
        // view depends on the schedule each replica used then, which may
        // not be this replica's now. Safety rests on the count: the
        // pre-prepare and the prepares come from `2f + 1` distinct members,
        // and an honest member signs one digest per view and number.
        if pp.network != self.network {
            return bad("pre-prepare for another network");
        }
        if pp.view >= new_view {
            return bad("prepared in a view not below the new view");
        }
        if pp.seq <= low || pp.seq > low.saturating_add(self.cfg.window) {
            return bad("prepared sequence number outside the window");
        }
        if proof.batch.digest() != pp.digest {
            return bad("batch does not match the digest");
        }
        if proof.batch.txs.len() > self.cfg.max_batch_txs
            || proof.batch.size() > self.cfg.max_batch_bytes
        {
            return bad("batch too large");
        }
        let mut signers = BTreeSet::new();
        for signed in &proof.prepares {
            let Some(index) = self.validators.index_of(signed.signer()) else {
                return bad("prepare from a non-member");
            };
            if index == from {
                return bad("prepare from the pre-prepare's signer");
            }
            let p = self.signer.open(signed)?;
            if p.network != self.network
                || p.view != pp.view
                || p.seq != pp.seq
                || p.digest != pp.digest
            {
                return bad("prepare does not match the pre-prepare");
            }
            signers.insert(index);
        }
        if signers.len() + 1 < self.quorum() {
            return bad("too few prepares");
        }
        Ok(pp)
    }

    fn validate_view_change(&self, vc: &ViewChange) -> Result<(), Error> {
        if vc.network != self.network {
            return Err(Error::InvalidCertificate("wrong network".into()));
        }
        // A view change belongs to the epoch its checkpoint starts: one
        // from an earlier epoch (below this one's hand-off) or a later one
        // (at or past this epoch's end) is never mixed into this epoch's
        // new view.
        if vc.checkpoint.seq.saturating_add(1) < self.epoch_first_height {
            return Err(Error::InvalidCertificate(
                "view change from an earlier epoch".into(),
            ));
        }
        if self.epoch_end().is_some_and(|end| vc.checkpoint.seq >= end) {
            return Err(Error::InvalidCertificate(
                "view change from the next epoch".into(),
            ));
        }
        self.validate_checkpoint_proof(&vc.checkpoint)?;
        let mut last_seq = vc.checkpoint.seq;
        for proof in &vc.prepared {
            let pp = self.validate_prepared(proof, vc.checkpoint.seq, vc.new_view)?;
            if pp.seq <= last_seq {
                return Err(Error::InvalidCertificate(
                    "prepared proofs out of order".into(),
                ));
            }
            last_seq = pp.seq;
        }
        Ok(())
    }

    /// The deterministic new-view computation every replica repeats: the
    /// highest stable checkpoint, and for each sequence number above it up
    /// to the highest prepared one, the batch prepared in the highest view
    /// (or the null batch).
    fn compute_new_view(
        &self,
        view: u64,
        vcs: &[ViewChange],
    ) -> (CheckpointProof, Vec<(u64, Batch)>) {
        let mut checkpoint = self.stable.clone();
        checkpoint.seq = 0;
        checkpoint.state = genesis_hash(self.network);
        checkpoint.messages.clear();
        for vc in vcs {
            if vc.checkpoint.seq > checkpoint.seq {
                checkpoint = vc.checkpoint.clone();
            }
        }
        let min_s = checkpoint.seq;
        let mut chosen: BTreeMap<u64, (u64, &Batch)> = BTreeMap::new();
        for vc in vcs {
            for proof in &vc.prepared {
                let Ok(pp) = decode_unverified(&proof.pre_prepare) else {
                    continue;
                };
                if pp.seq <= min_s {
                    continue;
                }
                match chosen.get(&pp.seq) {
                    Some((v, _)) if *v >= pp.view => {}
                    _ => {
                        chosen.insert(pp.seq, (pp.view, &proof.batch));
                    }
                }
            }
        }
        let max_s = chosen.keys().next_back().copied().unwrap_or(min_s);
        let out = (min_s.saturating_add(1)..=max_s)
            .map(|seq| {
                let batch = chosen
                    .get(&seq)
                    .map(|(_, b)| (*b).clone())
                    .unwrap_or_else(|| Batch::null(view));
                (seq, batch)
            })
            .collect();
        (checkpoint, out)
    }

    fn on_view_change(&mut self, signed: Signed<ViewChange>) {
        let Some((from, vc)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(vc.network) {
            return;
        }
        // A certified checkpoint above this replica's, from whatever
        // sender and view, moves its low watermark, and with it the leader
        // schedule of a view being changed to: replicas that started a view
        // change at different checkpoints converge on the newest, so the
        // one they agree leads also carries it in its new view. Only a
        // higher checkpoint is checked, so repeats cost nothing.
        if vc.checkpoint.seq > self.stable.seq
            && self.validate_checkpoint_proof(&vc.checkpoint).is_ok()
        {
            self.adopt_stable(vc.checkpoint.clone());
        }
        if vc.new_view < self.view || (vc.new_view == self.view && !self.changing) {
            // The sender is behind: hand it the new view that started ours.
            self.help_lagging(from);
            self.drop_input(DropReason::OldView);
            return;
        }
        if vc.new_view > self.view.saturating_add(self.cfg.max_future_views) {
            self.drop_input(DropReason::FutureViewOverflow);
            return;
        }
        // One view change per sender and view; a later one replaces it
        // only when it carries a higher checkpoint (its sender adopted one
        // mid-change), which bounds replacements by the checkpoints made.
        if let Some(stored) = self
            .view_changes
            .get(&vc.new_view)
            .and_then(|m| m.get(&from))
        {
            let newer = decode_unverified(stored)
                .map(|old| vc.checkpoint.seq > old.checkpoint.seq)
                .unwrap_or(false);
            if !newer {
                self.drop_input(DropReason::Duplicate);
                return;
            }
        }
        if self.validate_view_change(&vc).is_err() {
            self.drop_input(DropReason::InvalidCertificate);
            return;
        }
        // Each replica counts once across views: keep only its highest.
        for (v, m) in self.view_changes.iter_mut() {
            if *v < vc.new_view {
                m.remove(&from);
            }
        }
        self.view_changes
            .entry(vc.new_view)
            .or_default()
            .insert(from, signed);
        self.view_changes.retain(|_, m| !m.is_empty());
        self.join_if_f_plus_one();
        self.try_build_new_view();
    }

    /// If f+1 replicas (so at least one correct) want views above ours, go
    /// to the highest view that f+1 of them want.
    fn join_if_f_plus_one(&mut self) {
        let f = self.validators.f();
        let mut wanted: Vec<u64> = Vec::new();
        for index in 0..self.validators.n() {
            if index == self.me {
                continue;
            }
            let vc_view = self
                .view_changes
                .iter()
                .rev()
                .find(|(_, m)| m.contains_key(&index))
                .map(|(v, _)| *v)
                .unwrap_or(0);
            let status_view = self.peers.get(index).map(|p| p.view).unwrap_or(0);
            let view = vc_view.max(status_view);
            if view > self.view {
                wanted.push(view);
            }
        }
        if wanted.len() < f + 1 {
            return;
        }
        wanted.sort_unstable_by(|a, b| b.cmp(a));
        let Some(target) = wanted.get(f).copied() else {
            return;
        };
        if target > self.view {
            self.start_view_change(target);
        }
    }

    fn help_lagging(&mut self, peer: usize) {
        if self.changing {
            return;
        }
        let Some(nv) = self.new_view.clone() else {
            return;
        };
        let now = self.now;
        let interval = self.cfg.retransmit_interval_ms;
        let Some(info) = self.peers.get_mut(peer) else {
            return;
        };
        if info
            .helped_at
            .is_some_and(|t| t.saturating_add(interval) > now)
        {
            return;
        }
        info.helped_at = Some(now);
        self.send_to(peer, Message::NewView(nv));
    }

    fn try_build_new_view(&mut self) {
        if !self.changing || !self.is_primary() || self.recovery.is_some() {
            return;
        }
        // Only the schedule at the stable checkpoint says who leads; a
        // replica still fetching the blocks up to it cannot tell yet (the
        // schedule it holds is older), and a new view it built now would
        // carry a checkpoint whose schedule names someone else.
        if self.schedule.height < self.stable.seq {
            return;
        }
        let view = self.view;
        let quorum = self.quorum();
        let Some(received) = self.view_changes.get(&view) else {
            return;
        };
        if received.len() < quorum || !received.contains_key(&self.me) {
            return;
        }
        // Our own first, then the lowest indices: any quorum is correct.
        let mut chosen: Vec<Signed<ViewChange>> = Vec::new();
        if let Some(mine) = received.get(&self.me) {
            chosen.push(mine.clone());
        }
        for (i, s) in received {
            if *i != self.me && chosen.len() < quorum {
                chosen.push(s.clone());
            }
        }
        let decoded: Vec<ViewChange> = chosen
            .iter()
            .filter_map(|s| decode_unverified(s).ok())
            .collect();
        if decoded.len() != chosen.len() {
            return;
        }
        let (checkpoint, entries) = self.compute_new_view(view, &decoded);
        let mut pre_prepares = Vec::new();
        let mut accepted = Vec::new();
        for (seq, batch) in entries {
            let digest = batch.digest();
            let Some(pp) = self.seal(&PrePrepare {
                network: self.network,
                view,
                seq,
                digest,
            }) else {
                return;
            };
            pre_prepares.push(pp.clone());
            accepted.push((seq, pp, batch));
        }
        let nv = NewView {
            network: self.network,
            view,
            view_changes: chosen,
            pre_prepares,
        };
        let Some(signed) = self.seal(&nv) else { return };
        self.persist(PersistRecord::View {
            view,
            changing: false,
        });
        for (seq, pp, _) in &accepted {
            if let Ok(p) = decode_unverified(pp) {
                self.persist(PersistRecord::Vote {
                    view,
                    seq: *seq,
                    digest: p.digest,
                });
                self.votes.insert(*seq, (view, p.digest));
            }
        }
        self.send(Recipient::All, Message::NewView(signed.clone()));
        self.install_new_view(signed, checkpoint, accepted);
    }

    fn on_new_view(&mut self, signed: Signed<NewView>) {
        let Some((from, nv)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(nv.network) {
            return;
        }
        if nv.view < self.view || (nv.view == self.view && !self.changing) {
            self.drop_input(DropReason::OldView);
            return;
        }
        // The sender must lead this view by this replica's schedule, or,
        // when this replica's schedule is older than the highest
        // checkpoint the new view's view changes carry, by the schedule at
        // that checkpoint (which it must have executed). The second lets a
        // replica that missed the view change (restarted, cut off) take
        // the view the others entered; until it can judge, it fetches
        // blocks and does not vote in this view. A replica whose schedule
        // is as new accepts only its own, so a faulty member cannot pick
        // view changes whose checkpoint names it to lead replicas that
        // are not behind. Safety does not depend on who leads; this is
        // about liveness.
        let own = from == self.primary_of(nv.view);
        let carried_schedule = if own {
            None
        } else {
            // Read unverified for this check only; the whole new view is
            // verified below before anything is taken from it.
            let carried = nv
                .view_changes
                .iter()
                .filter_map(|vc| decode_unverified(vc).ok())
                .map(|vc| vc.checkpoint.seq)
                .max()
                .unwrap_or(0);
            Some(self.reputation.at(carried).clone()).filter(|schedule| {
                self.schedule.height < carried
                    && schedule.height == carried
                    && schedule.primary(nv.view) == from
            })
        };
        if !own && carried_schedule.is_none() {
            self.drop_input(DropReason::NotPrimary);
            return;
        }
        match self.validate_new_view(&nv, from) {
            Ok((checkpoint, entries)) => {
                if nv.view > self.view {
                    // Pulled straight into this view.
                    self.enter_schedule();
                }
                if let Some(schedule) = carried_schedule {
                    self.schedule_basis = schedule.height;
                    self.schedule = schedule;
                    self.persist(PersistRecord::ScheduleBasis(self.schedule_basis));
                }
                self.view = nv.view;
                self.persist(PersistRecord::View {
                    view: nv.view,
                    changing: false,
                });
                self.install_new_view(signed, checkpoint, entries);
            }
            Err(_) => self.drop_input(DropReason::InvalidCertificate),
        }
    }

    /// Re-verifies a new view: a quorum of valid view changes from distinct
    /// members for this view, and pre-prepares that match the recomputed
    /// ones exactly.
    #[allow(clippy::type_complexity)]
    fn validate_new_view(
        &self,
        nv: &NewView,
        primary: usize,
    ) -> Result<(CheckpointProof, Vec<(u64, Signed<PrePrepare>, Batch)>), Error> {
        let bad = |why: &str| Err(Error::InvalidCertificate(why.into()));
        let mut signers = BTreeSet::new();
        let mut decoded = Vec::new();
        for s in &nv.view_changes {
            let Some(index) = self.validators.index_of(s.signer()) else {
                return bad("view change from a non-member");
            };
            if !signers.insert(index) {
                return bad("view change counted twice");
            }
            let vc = self.signer.open(s)?;
            if vc.new_view != nv.view {
                return bad("view change for another view");
            }
            self.validate_view_change(&vc)?;
            decoded.push(vc);
        }
        if signers.len() < self.quorum() {
            return bad("too few view changes");
        }
        let (checkpoint, expected) = self.compute_new_view(nv.view, &decoded);
        if expected.len() != nv.pre_prepares.len() {
            return bad("pre-prepares do not match the view changes");
        }
        let mut entries = Vec::new();
        for ((seq, batch), signed) in expected.into_iter().zip(&nv.pre_prepares) {
            if self.validators.index_of(signed.signer()) != Some(primary) {
                return bad("pre-prepare not from the new primary");
            }
            let pp = self.signer.open(signed)?;
            if pp.network != self.network
                || pp.view != nv.view
                || pp.seq != seq
                || pp.digest != batch.digest()
            {
                return bad("pre-prepare does not match the recomputed batch");
            }
            entries.push((seq, signed.clone(), batch));
        }
        Ok((checkpoint, entries))
    }

    fn install_new_view(
        &mut self,
        signed: Signed<NewView>,
        checkpoint: CheckpointProof,
        entries: Vec<(u64, Signed<PrePrepare>, Batch)>,
    ) {
        let view = self.view;
        self.changing = false;
        self.new_view = Some(signed);
        self.stats.new_views_installed += 1;
        if let Some(primary) = self.validators.member(self.primary_of(view)).copied() {
            self.outputs
                .push_back(Output::ViewInstalled { view, primary });
        }
        let max_s = entries.last().map(|(s, _, _)| *s).unwrap_or(checkpoint.seq);
        // Fresh proposals go above everything the new view re-proposes; set
        // before adopting the checkpoint, which may try to propose.
        self.next_seq = max_s
            .max(self.stable.seq)
            .max(self.ledger.height())
            .saturating_add(1);
        self.adopt_stable(checkpoint);
        // Slots the new view does not re-propose start over in this view.
        let height = self.ledger.height();
        for (seq, slot) in self.log.iter_mut() {
            if *seq > height && slot.view < view {
                slot.reset_for_view(view);
            }
        }
        for (seq, pp, batch) in entries {
            if seq <= self.stable.seq {
                continue;
            }
            let header = batch.header_and_tx_hashes();
            let digest = header.0.digest();
            if let Some((v, d)) = self.votes.get(&seq)
                && *v == view
                && *d != digest
            {
                self.drop_input(DropReason::ConflictsWithOwnVote);
                continue;
            }
            self.accept_pre_prepare(seq, pp, batch, header);
        }
        self.next_seq = self
            .next_seq
            .max(max_s.max(self.stable.seq).saturating_add(1));
        self.view_changes.retain(|v, _| *v > view);
        self.rebuild_in_flight();
        // A new primary has not seen what backups forwarded to the old one.
        for p in self.pending.iter_mut() {
            p.forwarded = false;
        }
        self.deadline = None;
        self.update_timer();
        self.replay_future();
        self.try_propose();
    }

    fn replay_future(&mut self) {
        let buffered: Vec<Message> = self.future.drain(..).collect();
        self.future_per_sender.iter_mut().for_each(|c| *c = 0);
        for message in buffered {
            self.dispatch(message);
        }
    }

    // ----- status, retransmission, state transfer --------------------------

    fn on_status(&mut self, signed: Signed<Status>) {
        let Some((from, status)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(status.network) || from == self.me {
            return;
        }
        if let Some(info) = self.peers.get_mut(from) {
            info.view = status.view;
            info.height = status.height;
            info.stable = status.stable;
            info.recovering = status.recovering;
        }
        self.progress_recovery(Some((from, status.height, status.view)));
        if status.view < self.view && !self.changing {
            self.help_lagging(from);
        }
        self.join_if_f_plus_one();
    }

    /// A status from a member of the set before this epoch's (one that
    /// left, still moving towards the boundary): answered, at most once a
    /// retransmit interval per sender, with this replica's status (so it
    /// learns how far the chain went and fetches, which it may) and, while
    /// it lacks it, the old set's certificate at the boundary, so it can
    /// retire even when it missed the checkpoint exchange.
    fn on_former_member_status(&mut self, signed: Signed<Status>) {
        let from = *signed.signer();
        if !self.is_former_member(&from) {
            self.drop_input(DropReason::NotMember);
            return;
        }
        let Some(status) = self.open_signed(&signed) else {
            return;
        };
        if !self.check_network(status.network) {
            return;
        }
        let interval = self.cfg.retransmit_interval_ms;
        let now = self.now;
        if self
            .former_answered
            .iter()
            .any(|(key, at)| *key == from && at.saturating_add(interval) > now)
        {
            return;
        }
        self.former_answered.retain(|(key, _)| *key != from);
        // At most one entry per member of the previous set.
        self.former_answered.push((from, now));
        let mine = Status {
            network: self.network,
            view: self.view,
            height: self.ledger.height(),
            stable: self.stable.seq,
            recovering: self.recovery.is_some(),
        };
        if let Some(reply) = self.seal(&mine) {
            self.send(Recipient::One(from), Message::Status(reply));
        }
        if let Some(handoff) = self.epoch_handoff.clone()
            && status.stable < handoff.seq
        {
            for m in handoff.messages {
                self.send(Recipient::One(from), Message::Checkpoint(m));
            }
        }
    }

    /// If f+1 peers (so at least one correct) report a longer ledger and
    /// this replica made no progress for a retransmit interval, fetch the
    /// missing blocks, starting with the peer that reports the most.
    fn check_lagging(&mut self) {
        if self.fetch.is_some() {
            return;
        }
        let height = self.ledger.height();
        let f = self.validators.f();
        let mut reported: Vec<(u64, usize)> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(i, p)| *i != self.me && p.height > height)
            .map(|(i, p)| (p.height, i))
            .collect();
        reported.sort_unstable_by(|a, b| b.cmp(a));
        let Some((target, _)) = reported.get(f).copied() else {
            return;
        };
        let Some((_, peer)) = reported.first().copied() else {
            return;
        };
        if self
            .last_progress
            .saturating_add(self.cfg.retransmit_interval_ms)
            > self.now
        {
            return;
        }
        self.start_fetch(target, Some(peer));
    }

    fn next_fetch_peer(&mut self, hint: Option<usize>) -> usize {
        if let Some(h) = hint
            && h != self.me
            && h < self.validators.n()
        {
            return h;
        }
        let n = self.validators.n();
        for _ in 0..n {
            self.fetch_rotation = (self.fetch_rotation + 1) % n;
            if self.fetch_rotation != self.me {
                break;
            }
        }
        self.fetch_rotation
    }

    fn start_fetch(&mut self, target: u64, hint: Option<usize>) {
        if target <= self.ledger.height() {
            return;
        }
        if let Some(fetch) = &mut self.fetch {
            fetch.target = fetch.target.max(target);
            return;
        }
        let peer = self.next_fetch_peer(hint);
        self.request_blocks(target, peer, 0);
    }

    fn request_blocks(&mut self, target: u64, peer: usize, fruitless: usize) {
        let from = self.ledger.height().saturating_add(1);
        let to = target.min(from.saturating_add(self.cfg.max_blocks_per_reply as u64 - 1));
        let deadline = self.now.saturating_add(self.cfg.fetch_timeout_ms);
        self.fetch = Some(Fetch {
            target,
            peer,
            deadline,
            fruitless,
        });
        if let Some(signed) = self.seal(&FetchBlocks {
            network: self.network,
            from,
            to,
        }) {
            self.send_to(peer, Message::FetchBlocks(signed));
        }
    }

    /// A member of this epoch's set, or of the one before: a validator
    /// that just left may still be fetching the blocks up to the boundary
    /// it leaves at (it retires once it has them).
    fn may_fetch(&self, key: &PublicKey) -> bool {
        self.validators.index_of(key).is_some() || self.is_former_member(key)
    }

    /// Whether `key` was a validator in one of the last epochs this
    /// replica went through (or the chain's previous one).
    fn is_former_member(&self, key: &PublicKey) -> bool {
        self.former_members.contains(key)
            || self
                .membership
                .previous_epoch()
                .is_some_and(|p| p.validators.index_of(key).is_some())
    }

    /// Validators of the last epochs this replica left behind, newest last
    /// (at most [`FORMER_MEMBERS`]): one that left may still be on its way
    /// to its boundary when two boundaries come close together.
    pub fn former_members(&self) -> &[PublicKey] {
        &self.former_members
    }

    fn on_fetch_blocks(&mut self, signed: Signed<FetchBlocks>) {
        let from = *signed.signer();
        if !self.may_fetch(&from) {
            self.drop_input(DropReason::NotMember);
            return;
        }
        let Some(req) = self.open_signed(&signed) else {
            return;
        };
        if !self.check_network(req.network) || from == self.signer.public() {
            return;
        }
        if req.from == 0 || req.to < req.from {
            self.drop_input(DropReason::Malformed);
            return;
        }
        if self.serve_budget == 0 {
            self.drop_input(DropReason::RateLimited);
            return;
        }
        self.serve_budget -= 1;
        let last = req.to.min(self.ledger.height()).min(
            req.from
                .saturating_add(self.cfg.max_blocks_per_reply as u64 - 1),
        );
        if req.from > last {
            return;
        }
        if req.from < self.ledger.first_in_memory() {
            self.stats.storage_reads += 1;
            self.outputs.push_back(Output::ReadBlocks {
                peer: from,
                from: req.from,
                last,
            });
            return;
        }
        let blocks: Vec<_> = (req.from..=last)
            .filter_map(|h| self.ledger.get(h).cloned())
            .collect();
        self.reply_blocks(from, blocks);
    }

    /// Blocks read from storage after [`Output::ReadBlocks`]: sent to
    /// `peer` if they are a run of this replica's own committed blocks no
    /// longer than a reply may be.
    pub fn handle_stored_blocks(
        &mut self,
        peer: &PublicKey,
        blocks: Vec<(Block, CommitCertificate)>,
        now: u64,
    ) {
        self.now = self.now.max(now);
        if !self.may_fetch(peer) {
            return;
        }
        let to = *peer;
        let runs = blocks
            .windows(2)
            .all(|pair| pair[1].0.height == pair[0].0.height.saturating_add(1));
        let within = blocks
            .last()
            .is_some_and(|(b, _)| b.height <= self.ledger.height());
        if to == self.signer.public()
            || !runs
            || !within
            || blocks.len() > self.cfg.max_blocks_per_reply
        {
            return;
        }
        self.reply_blocks(to, blocks);
    }

    fn reply_blocks(&mut self, to: PublicKey, blocks: Vec<(Block, CommitCertificate)>) {
        if blocks.is_empty() {
            return;
        }
        if let Some(reply) = self.seal(&BlocksReply {
            network: self.network,
            blocks,
        }) {
            self.send(Recipient::One(to), Message::Blocks(reply));
        }
    }

    fn on_blocks(&mut self, signed: Signed<BlocksReply>) {
        let Some((from, reply)) = self.open(&signed) else {
            return;
        };
        if !self.check_network(reply.network) || from == self.me {
            return;
        }
        if reply.blocks.len() > self.cfg.max_blocks_per_reply {
            self.drop_input(DropReason::TooLarge);
            return;
        }
        let mut applied_any = false;
        for (block, cert) in reply.blocks {
            if block.height <= self.ledger.height() {
                continue;
            }
            let head = self.ledger.head();
            // Each block is checked against the set of its own epoch, which
            // the membership (fed every block before it) holds.
            let set = &self.membership.epoch().validators;
            if verify_block(&head, &block, &cert, set, &self.signer).is_err() {
                self.drop_input(DropReason::InvalidBlock);
                break;
            }
            self.commit_block(block, cert, None);
            applied_any = true;
        }
        if let Some(fetch) = self.fetch {
            if self.ledger.height() >= fetch.target {
                self.fetch = None;
            } else if applied_any {
                self.request_blocks(fetch.target, fetch.peer, 0);
            }
        }
        if applied_any {
            self.rebuild_in_flight();
            self.try_execute();
            self.try_propose();
        }
    }

    /// Resends what others may have lost: this replica's votes for
    /// unfinished sequence numbers (and the pre-prepare, as primary), its
    /// view change while one is in progress, its latest checkpoint vote.
    fn retransmit(&mut self) {
        let now = self.now;
        let interval = self.cfg.retransmit_interval_ms;
        if self.changing {
            if let Some(mine) = self
                .view_changes
                .get(&self.view)
                .and_then(|m| m.get(&self.me))
                .cloned()
            {
                self.send(Recipient::All, Message::ViewChange(mine));
            }
        } else {
            let height = self.ledger.height();
            let me = self.me;
            let is_primary = self.is_primary();
            let view = self.view;
            let lagging: Vec<(usize, u64)> = self
                .peers
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != me)
                .map(|(i, p)| (i, p.height))
                .collect();
            let mut to_send: Vec<(Option<usize>, Message)> = Vec::new();
            for (seq, slot) in self.log.range(self.stable.seq.saturating_add(1)..) {
                if slot.view != view || slot.touched.saturating_add(interval) > now {
                    continue;
                }
                let mut messages = Vec::new();
                if is_primary && let (Some(pp), Some(batch)) = (&slot.pre_prepare, &slot.batch) {
                    messages.push(Message::PrePrepare {
                        pre_prepare: pp.clone(),
                        batch: batch.clone(),
                    });
                }
                if let Some((_, p)) = slot.prepares.get(&me) {
                    messages.push(Message::Prepare(p.clone()));
                }
                if let Some((_, c)) = slot.commits.get(&me) {
                    messages.push(Message::Commit(c.clone()));
                }
                if *seq > height {
                    to_send.extend(messages.into_iter().map(|m| (None, m)));
                } else {
                    for (peer, peer_height) in &lagging {
                        if *peer_height < *seq {
                            to_send.extend(messages.iter().cloned().map(|m| (Some(*peer), m)));
                        }
                    }
                }
            }
            for (to, message) in to_send {
                match to {
                    None => self.send(Recipient::All, message),
                    Some(peer) => self.send_to(peer, message),
                }
            }
        }
        // Peers whose stable checkpoint is behind ours get our proof of it
        // (the quorum of checkpoint messages), so their window moves and
        // they fetch what they miss.
        if self.stable.seq > 0 {
            let behind: Vec<usize> = self
                .peers
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != self.me && p.stable < self.stable.seq)
                .map(|(i, _)| i)
                .collect();
            let proof = self.stable.messages.clone();
            for peer in behind {
                for m in &proof {
                    self.send_to(peer, Message::Checkpoint(m.clone()));
                }
            }
        }
        // Members still in the old epoch need the old set's certificate at
        // this epoch's start to move in (later checkpoints are the new
        // set's, which they do not count yet).
        if let Some(handoff) = self.epoch_handoff.clone() {
            let behind: Vec<usize> = self
                .peers
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != self.me && p.stable < handoff.seq)
                .map(|(i, _)| i)
                .collect();
            for peer in behind {
                for m in &handoff.messages {
                    self.send_to(peer, Message::Checkpoint(m.clone()));
                }
            }
        }
        let own_checkpoint = self
            .checkpoint_votes
            .iter()
            .rev()
            .find_map(|(_, votes)| votes.get(&self.me).map(|(_, s)| s.clone()));
        if let Some(signed) = own_checkpoint {
            self.send(Recipient::All, Message::Checkpoint(signed));
        }
    }

    fn dispatch(&mut self, message: Message) {
        match message {
            Message::PrePrepare { pre_prepare, batch } => self.on_pre_prepare(pre_prepare, batch),
            Message::Prepare(s) => self.on_prepare(s),
            Message::Commit(s) => self.on_commit(s),
            Message::Checkpoint(s) => self.on_checkpoint(s),
            Message::ViewChange(s) => self.on_view_change(s),
            Message::NewView(s) => self.on_new_view(s),
            Message::Forward(s) => self.on_forward(s),
            Message::Status(s) if self.validators.index_of(s.signer()).is_none() => {
                self.on_former_member_status(s)
            }
            Message::Status(s) => self.on_status(s),
            Message::FetchBlocks(s) => self.on_fetch_blocks(s),
            Message::Blocks(s) => self.on_blocks(s),
        }
    }
}
