//! Drives the PBFT replica: the edge between the pure state machine in
//! `openagi-consensus` and the node's network, disk and clock.
//!
//! One task owns the replica. It feeds it client transactions, messages
//! from validators (direct protocol) and ticks, and acts on its outputs
//! strictly in order: consecutive `Persist` records are committed to redb
//! in one fsynced transaction before any later output (a vote on the wire,
//! a commit reported to a client) is acted on. If the store fails, the
//! task stops rather than vote from state it could not save.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openagi_consensus::membership::Membership;
use openagi_consensus::{
    Block, Config, DropReason, Hash, IdentitySigner, Message, Output, Recipient, Replica,
    Transaction, ValidatorSet,
};
use openagi_crypto::{Identity, PublicKey};
use openagi_net::{NetHandle, PeerId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::common::store::Store;

/// Client submissions (one transaction, or one batch) queued for the
/// replica task; a full queue makes submitters wait.
const CLIENT_QUEUE: usize = 256;
/// Commit notices buffered for API waiters.
pub const COMMIT_NOTICES: usize = 1024;
/// Join proofs checked at once before admission: each is one Argon2id run
/// of the genesis's memory (64 MiB by default), on a blocking thread.
pub const ADMISSION_PROOF_CHECKS: usize = 1;
/// Times admission waits half a view refresh for the membership view to
/// reach a join's anchor.
const ADMISSION_VIEW_WAITS: usize = 4;
/// Submissions not committed after this long stop being tracked.
const STALE_SUBMISSION: Duration = Duration::from_secs(120);
/// Locally submitted transactions whose latency is tracked.
const MAX_TRACKED_LATENCIES: usize = 200_000;

/// Errors of the consensus driver.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// This node's key is not in the validator set the chain has reached.
    #[error("this node is not a validator of epoch {0}")]
    NotValidator(u64),
    /// The replica refused the input.
    #[error("{0}")]
    Rejected(String),
    /// The consensus task has stopped.
    #[error("consensus has stopped")]
    Stopped,
    /// This validator already holds as many client transactions as it
    /// may; the client should retry later (HTTP 503 with `Retry-After`).
    #[error(
        "busy: {held} client transactions are waiting to be ordered here (at most {capacity}); \
         retry later or submit at a lower rate"
    )]
    Busy {
        /// Transactions held (waiting in the replica or queued for it).
        held: usize,
        /// `[consensus] max_pending`.
        capacity: usize,
    },
    /// A batch larger than this validator ever holds; retrying cannot
    /// help (HTTP 413).
    #[error(
        "a batch of {count} transactions is more than this validator holds at once \
         ({capacity}, consensus.max_pending); split it"
    )]
    BatchTooLarge {
        /// Transactions in the batch.
        count: usize,
        /// `[consensus] max_pending`.
        capacity: usize,
    },
    /// The store failed.
    #[error("storage: {0}")]
    Store(#[from] crate::common::store::StoreError),
    /// The replica could not start.
    #[error("consensus: {0}")]
    Replica(#[from] openagi_consensus::Error),
}

/// What the status document shows about consensus.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsensusStatus {
    /// `validator`: this node votes (a full node's section says `full`).
    pub role: &'static str,
    /// The validator-set epoch this node votes in (0 for the genesis set;
    /// one more per committed change of the set).
    pub epoch: u64,
    /// The validators' public keys, in order.
    pub validators_keys: Vec<String>,
    /// Current view.
    pub view: u64,
    /// Whether a view change is in progress.
    pub changing_view: bool,
    /// Replica index of the primary of the current view.
    pub primary_index: usize,
    /// Peer id of that primary.
    pub primary: String,
    /// Why that validator leads: `rotation` (view mod n) or `skipped`
    /// (the rotation skips validators that recently failed as primary,
    /// as the ledger shows; see `openagi_consensus::rotation`).
    pub primary_reason: &'static str,
    /// Replica indices the current view's rotation skips.
    pub skipped_validators: Vec<usize>,
    /// The checkpoint height of the leader schedule the current view
    /// follows (the newest this node had executed at or below its stable
    /// checkpoint when it entered the view).
    pub schedule_checkpoint: u64,
    /// Replica indices the next view's rotation would skip (the schedule
    /// at the stable checkpoint), so a failure shows before the next view
    /// change.
    pub next_skipped_validators: Vec<usize>,
    /// This node's replica index.
    pub validator_index: usize,
    /// Number of validators.
    pub validators: usize,
    /// Faults tolerated.
    pub f: usize,
    /// Committed ledger height.
    pub height: u64,
    /// Hash of the ledger head (hex).
    pub head_hash: String,
    /// Unix milliseconds of the last commit.
    pub last_commit_unix_ms: Option<u64>,
    /// Transactions committed since start.
    pub committed_txs: u64,
    /// Transactions waiting to be proposed.
    pub pending: usize,
    /// Stable checkpoint sequence number.
    pub stable_checkpoint: u64,
    /// The height at least `f + 1` other validators reported in their
    /// latest status; above `height`, this validator is behind.
    pub peers_height: u64,
    /// Validators known to be recovering from lost state (this one
    /// included); more than `f` stop the network.
    pub recovering_validators: usize,
    /// Set while this validator recovers from lost consensus state.
    pub recovery: Option<RecoveryReport>,
    /// What this node last heard from each validator, by index.
    pub activity: Vec<ValidatorActivity>,
    /// Equivocation evidence seen here, newest last (the last
    /// [`EVIDENCE_KEPT`]).
    pub evidence: Vec<EvidenceSeen>,
}

/// A validator's recovery from lost consensus state, for the status
/// document and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Peers heard since the restart, of `reports_needed`.
    pub reports: usize,
    /// Reports needed to learn what it may have voted for (`2f + 1`).
    pub reports_needed: usize,
    /// It votes again only above this sequence number (or in a later
    /// view), and recovery ends when the stable checkpoint reaches it.
    pub vote_bound_seq: Option<u64>,
    /// Highest view it may have voted in.
    pub vote_bound_view: Option<u64>,
    /// Whether too many validators are recovering for the network to
    /// make progress.
    pub stalls_network: bool,
    /// What is happening and what the operator can do, in words.
    pub advice: String,
}

impl RecoveryReport {
    fn from_status(status: &openagi_consensus::RecoveryStatus, n: usize) -> Self {
        let advice = if status.stalls_network() {
            format!(
                "{} of {n} validators are recovering from lost consensus state and {n} validators tolerate {}: \
                 the others cannot commit without them and they vote only after the others commit, so the network is stopped. \
                 Restore the lost data directory (node.redb with consensus.started) of at least {} of them from a backup \
                 and restart those; deleting files does not help. If no backup exists, the validators must agree on a new genesis.",
                status.recovering_validators,
                status.tolerated,
                status.recovering_validators - status.tolerated,
            )
        } else if let Some(bound) = status.bound {
            format!(
                "following the ledger without voting until the stable checkpoint (now {}) reaches sequence {} \
                 or a view above {}; the other validators commit meanwhile",
                status.stable, bound.seq, bound.view
            )
        } else {
            format!(
                "waiting for status from {} more validators to learn what this node may have voted for; it does not vote until then",
                status.reports_needed.saturating_sub(status.reports)
            )
        };
        RecoveryReport {
            reports: status.reports,
            reports_needed: status.reports_needed,
            vote_bound_seq: status.bound.map(|b| b.seq),
            vote_bound_view: status.bound.map(|b| b.view),
            stalls_network: status.stalls_network(),
            advice,
        }
    }
}

/// Consensus messages of one processing round, per peer, in order.
#[derive(Default)]
struct Outgoing {
    per_peer: Vec<(PeerId, Vec<Arc<Vec<u8>>>)>,
}

impl Outgoing {
    fn push(&mut self, peer: PeerId, message: Arc<Vec<u8>>) {
        match self.per_peer.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, parts)) => parts.push(message),
            None => self.per_peer.push((peer, vec![message])),
        }
    }
}

/// A validator this node has heard nothing from for this long counts as
/// silent (validators exchange status messages every few seconds even
/// when idle).
const SILENT_AFTER_MS: u64 = 30_000;

/// What this node last heard from one validator (the dashboard's
/// validator table). Read from the message as it arrived from that
/// validator's authenticated connection, before the replica checks it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ValidatorActivity {
    /// The validator's index in the set.
    pub index: usize,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Whether it is this node.
    pub this_node: bool,
    /// When its last message arrived (ms since the Unix epoch).
    pub last_message_unix_ms: Option<u64>,
    /// The kind of that message (`prepare`, `commit`, `checkpoint`, ...).
    pub last_message: Option<&'static str>,
    /// Its last vote (pre-prepare, prepare or commit): kind, view, sequence
    /// number and when it arrived.
    pub last_vote: Option<VoteSeen>,
}

/// Equivocation evidence kept in the status.
pub const EVIDENCE_KEPT: usize = 16;

/// Equivocation evidence as the status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EvidenceSeen {
    /// The validator that signed conflicting votes (public key, hex).
    pub validator: String,
    /// `prepare` or `commit`.
    pub kind: &'static str,
    /// The view.
    pub view: u64,
    /// The sequence number.
    pub seq: u64,
    /// When it was seen (ms since the Unix epoch).
    pub unix_ms: u64,
    /// Whether this node put it on the ledger.
    pub submitted: bool,
}

/// A vote as seen arriving.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VoteSeen {
    /// `pre-prepare`, `prepare` or `commit`.
    pub kind: &'static str,
    /// Its view.
    pub view: u64,
    /// Its sequence number.
    pub seq: u64,
    /// When it arrived (ms since the Unix epoch).
    pub unix_ms: u64,
}

/// A block that committed, for API waiters.
#[derive(Debug, Clone)]
pub struct CommitNotice {
    /// Its height.
    pub height: u64,
    /// Its hash.
    pub block_hash: Hash,
    /// Hashes of its transactions, in order.
    pub tx_hashes: Arc<[Hash]>,
    /// The block itself, shared by every receiver: services that follow
    /// the ledger (learning) look at its transactions without a disk read.
    pub block: Arc<Block>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// The consensus metrics, registered once at start-up (before the registry
/// is shared) whether or not this node votes yet: a full node that joins
/// the validator set later starts its replica with them.
#[derive(Clone)]
pub struct ConsensusMetrics {
    committed_txs: Counter,
    committed_blocks: Counter,
    blocks_served_from_disk: Counter,
    height: Gauge,
    view: Gauge,
    view_changes: Counter,
    commit_latency: Histogram,
    dropped: Family<ReasonLabel, Counter>,
    pending: Gauge,
    persist_latency: Histogram,
    refused: Counter,
    silent: Gauge,
    equivocations: Counter,
}

impl ConsensusMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            committed_txs: Counter::default(),
            committed_blocks: Counter::default(),
            blocks_served_from_disk: Counter::default(),
            height: Gauge::default(),
            view: Gauge::default(),
            view_changes: Counter::default(),
            commit_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            dropped: Family::default(),
            pending: Gauge::default(),
            silent: Gauge::default(),
            equivocations: Counter::default(),
            persist_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            refused: Counter::default(),
        };
        registry.register(
            "consensus_submissions_refused",
            "Queued transactions the replica refused (duplicate, already applied, pending full)",
            m.refused.clone(),
        );
        let r = registry.sub_registry_with_prefix("consensus");
        r.register(
            "committed_transactions",
            "Transactions committed to the ledger",
            m.committed_txs.clone(),
        );
        r.register(
            "committed_blocks",
            "Blocks committed to the ledger",
            m.committed_blocks.clone(),
        );
        r.register(
            "blocks_served_from_disk",
            "Blocks read from disk for validators catching up (older than those kept in memory)",
            m.blocks_served_from_disk.clone(),
        );
        r.register("height", "Committed ledger height", m.height.clone());
        r.register("view", "Current PBFT view", m.view.clone());
        r.register(
            "view_changes",
            "New views installed",
            m.view_changes.clone(),
        );
        r.register_with_unit(
            "commit_latency",
            "Time from a transaction's submission to this node until it committed",
            Unit::Seconds,
            m.commit_latency.clone(),
        );
        r.register(
            "messages_dropped",
            "Consensus inputs dropped, by reason",
            m.dropped.clone(),
        );
        r.register(
            "pending_transactions",
            "Transactions waiting to be proposed",
            m.pending.clone(),
        );
        r.register(
            "equivocations",
            "Conflicting votes a validator signed for one view and sequence number, seen here",
            m.equivocations.clone(),
        );
        r.register(
            "validators_silent",
            "Other validators this node has heard nothing from for 30 seconds",
            m.silent.clone(),
        );
        r.register_with_unit(
            "persist_duration",
            "Time to commit consensus records to disk (fsync included)",
            Unit::Seconds,
            m.persist_latency.clone(),
        );
        m
    }
}

enum Input {
    Submit {
        tx: Transaction,
        reply: oneshot::Sender<Result<Hash, ConsensusError>>,
    },
    SubmitBatch {
        txs: Vec<Transaction>,
        received: Instant,
    },
    Message {
        from: PeerId,
        data: Vec<u8>,
    },
}

/// Client transactions a validator holds: waiting in the replica's pending
/// buffer, plus handed to the consensus task and not yet read by it.
/// Submissions that would take the total past `capacity` are refused at
/// once, before they are queued, so a node offered more than it can order
/// keeps committing at its ceiling with bounded memory and its clients
/// learn to slow down (the refusal happens at the door, not seconds later
/// inside the replica).
#[derive(Debug)]
struct Backlog {
    /// The replica's pending count, published by the consensus task after
    /// every processing round.
    replica_pending: AtomicUsize,
    /// Transactions sent to the consensus task and not yet handled.
    in_queue: AtomicUsize,
    /// `[consensus] max_pending`.
    capacity: usize,
}

impl Backlog {
    /// Reserves room for `n` transactions, or says how full it is.
    fn reserve(&self, n: usize) -> Result<(), ConsensusError> {
        let pending = self.replica_pending.load(Ordering::Relaxed);
        self.in_queue
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (pending.saturating_add(queued).saturating_add(n) <= self.capacity)
                    .then_some(queued + n)
            })
            .map(|_| ())
            .map_err(|queued| ConsensusError::Busy {
                held: pending.saturating_add(queued),
                capacity: self.capacity,
            })
    }

    /// Transactions held now.
    fn held(&self) -> usize {
        self.replica_pending
            .load(Ordering::Relaxed)
            .saturating_add(self.in_queue.load(Ordering::Relaxed))
    }

    /// Gives back `n` reserved transactions (handled, or never sent).
    fn release(&self, n: usize) {
        let _ = self
            .in_queue
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                Some(queued.saturating_sub(n))
            });
    }
}

/// Percentiles of submission-to-commit latency at this node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    /// Samples the figures are computed from.
    pub samples: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Largest, milliseconds.
    pub max_ms: f64,
}

/// Recent commit latencies: `(commit unix ms, latency ms)`, newest last.
type LatencyRing = Arc<std::sync::Mutex<std::collections::VecDeque<(u64, f32)>>>;
/// Latency samples kept for percentile queries.
const LATENCY_SAMPLES: usize = 1 << 18;

/// The client id this node submits its own transactions under (API
/// submissions without a client, learning records): one id, so the
/// sequence numbers of [`crate::common::store::Store::next_client_seq`] stay unique.
/// Use [`ConsensusHandle::own_transaction`], the one door for them.
pub fn node_client_id(peer: &PeerId) -> openagi_consensus::ClientId {
    openagi_consensus::ClientId(*blake3::hash(peer.to_bytes().as_slice()).as_bytes())
}

/// A handle to the consensus task.
#[derive(Clone)]
pub struct ConsensusHandle {
    inputs: mpsc::Sender<Input>,
    status: Arc<RwLock<ConsensusStatus>>,
    commits: broadcast::Sender<CommitNotice>,
    genesis: Arc<Membership>,
    /// The validator set along the replica's chain (for admitting joins).
    membership: crate::daemon::role::SharedMembership,
    /// Join proofs being checked for admission.
    proof_checks: Arc<tokio::sync::Semaphore>,
    latencies: LatencyRing,
    /// This node's own client id and where its sequence numbers come from.
    own_client: openagi_consensus::ClientId,
    store: Arc<Store>,
    backlog: Arc<Backlog>,
}

impl ConsensusHandle {
    /// The node's own next transaction carrying `payload`: its client id
    /// and a fresh sequence number, durable before it is handed out, so no
    /// two of the node's transactions (API submissions, learning records)
    /// ever share one. Submit it (and resubmit the same transaction on a
    /// retry, so the ledger's exactly-once rule keeps a retry from
    /// committing twice).
    pub async fn own_transaction(&self, payload: Vec<u8>) -> Result<Transaction, ConsensusError> {
        let store = self.store.clone();
        let seq = tokio::task::spawn_blocking(move || store.next_client_seq())
            .await
            .map_err(|e| ConsensusError::Rejected(format!("sequence number: {e}")))??;
        Ok(Transaction {
            client: self.own_client,
            seq,
            payload: payload.into(),
        })
    }

    /// Queues many transactions at once (one queue slot for all). Answers
    /// at once, never waiting on the consensus task (a disk stall there
    /// must not stall clients): the batch is refused as a whole with
    /// [`ConsensusError::Busy`] when this validator cannot hold it (see
    /// `Backlog`) or its input queue is full. Duplicates are counted among
    /// the replica's drop reasons, other refusals in
    /// `openagi_consensus_submissions_refused_total`.
    pub fn submit_batch(&self, txs: Vec<Transaction>) -> Result<(), ConsensusError> {
        let count = txs.len();
        if count > self.backlog.capacity {
            return Err(ConsensusError::BatchTooLarge {
                count,
                capacity: self.backlog.capacity,
            });
        }
        self.backlog.reserve(count)?;
        let sent = self.inputs.try_send(Input::SubmitBatch {
            txs,
            received: Instant::now(),
        });
        match sent {
            Ok(()) => Ok(()),
            Err(e) => {
                self.backlog.release(count);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(ConsensusError::Busy {
                        held: self.backlog.held(),
                        capacity: self.backlog.capacity,
                    }),
                    mpsc::error::TrySendError::Closed(_) => Err(ConsensusError::Stopped),
                }
            }
        }
    }

    /// Latency percentiles of transactions submitted here that committed
    /// at or after `since_unix_ms`.
    pub fn latency(&self, since_unix_ms: u64) -> LatencySummary {
        let mut values: Vec<f32> = match self.latencies.lock() {
            Ok(ring) => ring
                .iter()
                .filter(|(at, _)| *at >= since_unix_ms)
                .map(|(_, l)| *l)
                .collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .filter(|(at, _)| *at >= since_unix_ms)
                .map(|(_, l)| *l)
                .collect(),
        };
        if values.is_empty() {
            return LatencySummary::default();
        }
        values.sort_by(f32::total_cmp);
        let at = |q: f64| f64::from(values[((values.len() - 1) as f64 * q).round() as usize]);
        LatencySummary {
            samples: values.len(),
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
    /// Submits a client transaction; returns its hash once the replica
    /// accepted it (not yet committed).
    pub async fn submit(&self, tx: Transaction) -> Result<Hash, ConsensusError> {
        self.admit_membership(&tx).await?;
        let (reply, answer) = oneshot::channel();
        self.inputs
            .send(Input::Submit { tx, reply })
            .await
            .map_err(|_| ConsensusError::Stopped)?;
        answer.await.map_err(|_| ConsensusError::Stopped)?
    }

    /// A join or leave is checked against this validator's chain before
    /// it is admitted: cheap checks first, a join's proof last, one proof
    /// at a time ([`ADMISSION_PROOF_CHECKS`]) and off the async workers.
    /// A worthless one is refused here with the reason, instead of being
    /// ordered and costing every node a proof check for nothing.
    async fn admit_membership(&self, tx: &Transaction) -> Result<(), ConsensusError> {
        use openagi_consensus::membership::{MembershipRequest, ProofCache};
        let request = match MembershipRequest::from_payload(&tx.payload) {
            Ok(None) => return Ok(()),
            Ok(Some(request)) => request,
            Err(refusal) => return Err(ConsensusError::Rejected(refusal.to_string())),
        };
        let anchor = match &request {
            MembershipRequest::Join(signed) => signed.verify().ok().map(|j| j.anchor_height),
            MembershipRequest::Leave(_) | MembershipRequest::Puzzle(_) => None,
        };
        // The view is refreshed about once a second: a join anchored on a
        // block newer than it waits for it (a little), not a refusal.
        let mut membership = None;
        for _ in 0..ADMISSION_VIEW_WAITS {
            membership = self.membership.membership();
            let behind = match (&membership, anchor) {
                (Some(m), Some(anchor)) => m.height() < anchor,
                _ => false,
            };
            if !behind {
                break;
            }
            tokio::time::sleep(crate::daemon::role::VIEW_REFRESH / 2).await;
        }
        let Some(membership) = membership else {
            // No view yet (just started): consensus checks it when ordered.
            return Ok(());
        };
        // Only a join's proof costs an Argon2 run; the permit goes with the
        // run (a caller that gives up does not free it early).
        let permit = match &request {
            MembershipRequest::Join(_) => Some(
                self.proof_checks
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ConsensusError::Stopped)?,
            ),
            _ => None,
        };
        let next = membership.height().saturating_add(1);
        let checked = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            membership.check_request(
                &request,
                next,
                &openagi_consensus::StrictCrypto,
                &mut ProofCache::default(),
            )
        })
        .await
        .map_err(|e| ConsensusError::Rejected(format!("checking the request: {e}")))?;
        checked
            .map(|_| ())
            .map_err(|refusal| ConsensusError::Rejected(refusal.to_string()))
    }

    /// The current status.
    pub fn status(&self) -> ConsensusStatus {
        match self.status.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Notices of blocks committing from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CommitNotice> {
        self.commits.subscribe()
    }

    /// The membership at genesis, from which the whole ledger verifies.
    pub fn genesis(&self) -> &Membership {
        &self.genesis
    }
}

/// The libp2p peer id of a validator key (both are the same Ed25519 key).
pub fn peer_id_of(key: &PublicKey) -> Option<PeerId> {
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.to_bytes()).ok()?;
    Some(libp2p::identity::PublicKey::from(public).to_peer_id())
}

fn reason_name(reason: DropReason) -> String {
    let debug = format!("{reason:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Who this replica is and what it runs with.
pub struct ReplicaSetup {
    /// The node's signing identity.
    pub identity: Identity,
    /// The genesis validator set.
    pub validators: ValidatorSet,
    /// Replica tunables.
    pub config: Config,
    /// File (beside the key, outside the database) marking that this node
    /// has taken part in consensus.
    pub marker: std::path::PathBuf,
}

/// First line of the consensus marker file; the second names the instance.
const MARKER_HEADER: &str = "this node has taken part in consensus";

/// What the marker file beside the key says.
#[derive(Debug, PartialEq, Eq)]
enum Marker {
    /// No marker: this validator never ran consensus from this data
    /// directory (or the marker was removed; the database then decides).
    Absent,
    /// A marker of versions before instance ids: consensus ran, but with
    /// which database is unknown.
    Legacy,
    /// Consensus ran with the database holding this instance id.
    Instance([u8; 16]),
}

fn read_marker(path: &std::path::Path) -> Result<Marker, ConsensusError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Marker::Absent),
        Err(e) => {
            return Err(ConsensusError::Rejected(format!(
                "reading {}: {e}",
                path.display()
            )));
        }
    };
    let Some(id) = text.lines().find_map(|l| l.strip_prefix("instance ")) else {
        return Ok(Marker::Legacy);
    };
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(id.trim(), &mut bytes).map_err(|e| {
        ConsensusError::Rejected(format!(
            "{} names instance {id:?}, not 32 hex digits ({e}); it must not be edited by hand",
            path.display()
        ))
    })?;
    Ok(Marker::Instance(bytes))
}

/// Whether this validator's consensus state was lost: it ran consensus
/// before (the marker) but the database is not the one it ran with. A
/// database that simply holds no vote yet (a stop before the first block)
/// is not a loss: the instance id in it matches the marker.
fn state_lost(marker: &std::path::Path, store: &Store) -> Result<bool, ConsensusError> {
    let in_database = store.consensus_instance()?;
    Ok(match (read_marker(marker)?, in_database) {
        (Marker::Absent, _) => false,
        (Marker::Instance(ran_with), Some(this_one)) => ran_with != this_one,
        (Marker::Instance(_), None) => true,
        (Marker::Legacy, Some(_)) => false,
        // Older versions kept no instance id: a database that survived is
        // trusted (votes were always stored before they were sent), one
        // created just now replaced a lost one.
        (Marker::Legacy, None) => store.created_now(),
    })
}

/// Ties the database and the marker to one instance id: the database
/// first (fsynced), then the marker (written atomically), so a crash
/// between the two leaves a marker-less database that the next start
/// adopts. A database that was lost gets a fresh id.
fn mark_started(marker: &std::path::Path, store: &Store, lost: bool) -> Result<(), ConsensusError> {
    let id = match store.consensus_instance()? {
        Some(id) if !lost => id,
        _ => {
            let id: [u8; 16] = rand::random();
            store.set_consensus_instance(id)?;
            id
        }
    };
    if read_marker(marker)? == Marker::Instance(id) {
        return Ok(());
    }
    let text = format!("{MARKER_HEADER}\ninstance {}\n", hex::encode(id));
    // Atomic (temp file, fsync, rename): a crash leaves the old marker or
    // the new one, and the database already names the new id.
    openagi_keyfiles::keyfile::write_atomic(marker, text.as_bytes(), 0o600)
        .map_err(|e| ConsensusError::Rejected(format!("writing {}: {e}", marker.display())))
}

/// Starts the replica task, restoring what `store` holds.
/// How the consensus task ended.
pub enum ConsensusExit {
    /// Shutdown was asked for.
    Stopped,
    /// This node left the validator set (its replica retired): the wiring
    /// goes back, for a replica started if it joins again.
    Retired(ConsensusWiring),
}

/// What the consensus task shares with the rest of the daemon and keeps
/// across role changes: its metrics, the inbox of validators' messages
/// (the network hands it out once) and the channel of commit notices.
pub struct ConsensusWiring {
    /// Registered at start-up.
    pub metrics: ConsensusMetrics,
    /// Messages from validators' direct streams.
    pub inbox: mpsc::Receiver<openagi_net::DirectMessage>,
    /// Where committed blocks are announced (shared with the follower).
    pub commits: broadcast::Sender<CommitNotice>,
    /// Where the validator set along the chain is published.
    pub membership: crate::daemon::role::SharedMembership,
    /// Join proofs checked at once outside consensus (shared with the
    /// API).
    pub proof_checks: Arc<tokio::sync::Semaphore>,
}

/// Starts the replica from what `store` holds. When this node is not a
/// validator of the epoch its chain has reached, the wiring comes back
/// with [`ConsensusError::NotValidator`]'s epoch, for the node to follow
/// the ledger instead.
#[allow(clippy::type_complexity, clippy::result_large_err)]
pub fn start(
    setup: ReplicaSetup,
    store: Arc<Store>,
    net: NetHandle,
    wiring: ConsensusWiring,
    mut shutdown: watch::Receiver<bool>,
) -> Result<
    (
        ConsensusHandle,
        JoinHandle<Result<ConsensusExit, ConsensusError>>,
    ),
    (ConsensusError, ConsensusWiring),
> {
    let ReplicaSetup {
        identity,
        validators,
        config,
        marker,
    } = setup;
    let marker = marker.as_path();
    let me_key = identity.public();
    let (replica, restored_height) =
        match open_replica(&store, marker, identity, validators.clone(), config) {
            Ok(opened) => opened,
            Err(e) => return Err((e, wiring)),
        };
    let genesis = match Membership::genesis(
        validators.clone(),
        replica.config().checkpoint_interval,
        replica.config().window,
        replica.config().join_puzzle,
    ) {
        Ok(genesis) => genesis,
        Err(e) => return Err((e.into(), wiring)),
    };
    let ConsensusWiring {
        metrics,
        inbox: mut message_rx,
        commits,
        membership,
        proof_checks,
    } = wiring;
    let me = replica.index();
    debug_assert_eq!(replica.validators().member(me), Some(&me_key));
    info!(
        validator_index = me,
        height = replica.height(),
        restored_height,
        view = replica.view(),
        epoch = replica.epoch().0,
        "consensus replica ready"
    );
    let peers: Vec<Option<PeerId>> = replica
        .validators()
        .members()
        .iter()
        .map(peer_id_of)
        .collect();
    // Only validators' direct streams are read at all (see
    // `Driver::allow_streams`, called before the task starts): anyone
    // else's is refused when it opens, before it can make this node hold
    // memory.
    let me_peer = net.local_peer_id();
    let status = Arc::new(RwLock::new(ConsensusStatus::default()));
    let (input_tx, mut input_rx) = mpsc::channel(CLIENT_QUEUE);
    let latencies: LatencyRing = Arc::default();
    let backlog = Arc::new(Backlog {
        replica_pending: AtomicUsize::new(replica.pending_len()),
        in_queue: AtomicUsize::new(0),
        capacity: replica.config().max_pending_requests,
    });
    let handle = ConsensusHandle {
        inputs: input_tx,
        status: status.clone(),
        commits: commits.clone(),
        genesis: Arc::new(genesis),
        membership: membership.clone(),
        proof_checks: proof_checks.clone(),
        latencies: latencies.clone(),
        own_client: node_client_id(&me_peer),
        store: store.clone(),
        backlog: backlog.clone(),
    };
    let mut driver = Driver {
        replica,
        me,
        peers,
        store,
        net,
        metrics,
        status,
        commits,
        submitted: HashMap::new(),
        last_commit: None,
        committed_txs: 0,
        dropped_seen: BTreeMap::new(),
        latencies,
        recovery_seen: (None, false),
        activity: Vec::new(),
        evidence: std::collections::VecDeque::new(),
        reported: HashSet::new(),
        own_client: node_client_id(&me_peer),
        backlog,
        membership,
    };
    driver.reset_activity();
    driver.allow_streams();
    driver.publish_status();
    let task = tokio::spawn(async move {
        loop {
            // The replica's next timer, at most a second away so status
            // refreshes even when idle.
            let deadline = driver
                .replica
                .poll_timeout()
                .unwrap_or(u64::MAX)
                .min(crate::unix_ms() + 1000);
            let wait = Duration::from_millis(deadline.saturating_sub(crate::unix_ms()));
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                message = message_rx.recv() => match message {
                    Some(message) => driver.handle_peer(message),
                    None => break,
                },
                input = input_rx.recv() => match input {
                    Some(input) => driver.handle(input),
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {}
            }
            // Take whatever else is already queued before draining
            // outputs, so one fsync covers many inputs: peer messages
            // first, then a bounded share of submissions.
            for _ in 0..256 {
                match message_rx.try_recv() {
                    Ok(more) => driver.handle_peer(more),
                    Err(_) => break,
                }
            }
            for _ in 0..16 {
                match input_rx.try_recv() {
                    Ok(more) => driver.handle(more),
                    Err(_) => break,
                }
            }
            // Timers must fire even when inputs arrive faster than they
            // fall due, so the tick is not tied to the sleep winning.
            let now = crate::unix_ms();
            if now >= deadline {
                driver.replica.handle_tick(now);
            }
            driver.drain().await?;
            driver
                .backlog
                .replica_pending
                .store(driver.replica.pending_len(), Ordering::Relaxed);
            if driver.replica.is_retired() {
                info!("consensus stopped: this node left the validator set");
                return Ok(ConsensusExit::Retired(ConsensusWiring {
                    metrics: driver.metrics.clone(),
                    inbox: message_rx,
                    commits: driver.commits.clone(),
                    membership: driver.membership.clone(),
                    proof_checks: proof_checks.clone(),
                }));
            }
        }
        info!("consensus stopped");
        Ok(ConsensusExit::Stopped)
    });
    Ok((handle, task))
}

/// Opens the replica from the store: restored, or recovering when the
/// marker says this node voted from another database. Returns it with
/// the height restored.
fn open_replica(
    store: &Store,
    marker: &std::path::Path,
    identity: Identity,
    validators: ValidatorSet,
    config: Config,
) -> Result<(Replica<IdentitySigner>, usize), ConsensusError> {
    let persisted = store.load_consensus()?;
    let restored_height = persisted.blocks.len();
    let signer = IdentitySigner::new(identity);
    let lost = state_lost(marker, store)?;
    let replica = if lost {
        // This validator took part in consensus before (the marker says
        // so) but the database it voted from is gone or another one: it
        // must not vote where it may have voted, or it could contradict
        // itself.
        warn!(
            marker = %marker.display(),
            "consensus state lost; recovering before voting again (the database is not the one this validator voted from)"
        );
        // The blocks on disk now came from elsewhere (a follower fetched
        // them, or a backup): they are replayed, so they are checked first.
        let genesis = Membership::genesis(
            validators.clone(),
            config.checkpoint_interval,
            config.window,
            config.join_puzzle,
        )?;
        crate::common::ledger::verify_blocks(store, &genesis).map_err(|e| {
            ConsensusError::Rejected(format!(
                "the stored chain does not verify, so this validator cannot recover from it: {e:#}"
            ))
        })?;
        match Replica::recover_after_data_loss(
            config,
            validators,
            signer,
            persisted.blocks,
            crate::unix_ms(),
        ) {
            Ok(replica) => replica,
            Err(openagi_consensus::Error::NotInValidatorSet(epoch)) => {
                return Err(ConsensusError::NotValidator(epoch));
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        match Replica::restore(config, validators, signer, persisted, crate::unix_ms()) {
            Ok(replica) => replica,
            Err(openagi_consensus::Error::NotInValidatorSet(epoch)) => {
                return Err(ConsensusError::NotValidator(epoch));
            }
            Err(e) => return Err(e.into()),
        }
    };
    // Durable before the replica can cast its first vote: a restart, even
    // one before any vote, then finds the database it belongs to.
    mark_started(marker, store, lost)?;
    Ok((replica, restored_height))
}

struct Driver {
    replica: Replica<IdentitySigner>,
    me: usize,
    peers: Vec<Option<PeerId>>,
    store: Arc<Store>,
    net: NetHandle,
    metrics: ConsensusMetrics,
    status: Arc<RwLock<ConsensusStatus>>,
    commits: broadcast::Sender<CommitNotice>,
    /// Submission times by exactly-once key (no hash needed to find them
    /// again at commit).
    submitted: HashMap<(openagi_consensus::ClientId, u64), Instant>,
    last_commit: Option<u64>,
    committed_txs: u64,
    dropped_seen: BTreeMap<DropReason, u64>,
    latencies: LatencyRing,
    /// Recovery state last logged: `(Some(bound) while recovering,
    /// network stalled)`.
    recovery_seen: (Option<Option<u64>>, bool),
    /// What was last heard from each validator, by index.
    activity: Vec<ValidatorActivity>,
    /// Evidence seen, newest last.
    evidence: std::collections::VecDeque<EvidenceSeen>,
    /// Validators whose evidence this node already put on the ledger (one
    /// record per offender is proof enough).
    reported: HashSet<PublicKey>,
    /// This node's client id, for its own transactions.
    own_client: openagi_consensus::ClientId,
    /// Admission control's view of what this validator holds.
    backlog: Arc<Backlog>,
    /// Where the replica's view of the validator set is published.
    membership: crate::daemon::role::SharedMembership,
}

impl Driver {
    /// Remembers when a transaction was submitted, to measure its commit
    /// latency. Transactions that never commit (a primary that drops them,
    /// a later refusal) would otherwise fill the table and silently end
    /// all measurement, so entries older than any sane latency are
    /// forgotten when it is full.
    fn track_submission(&mut self, key: (openagi_consensus::ClientId, u64), at: Instant) {
        if self.submitted.len() >= MAX_TRACKED_LATENCIES {
            self.submitted
                .retain(|_, submitted| submitted.elapsed() < STALE_SUBMISSION);
        }
        if self.submitted.len() < MAX_TRACKED_LATENCIES {
            self.submitted.insert(key, at);
        }
    }

    /// A message from the network: only validators' are taken in (the
    /// network reads no one else's; this keeps the rule if that changes).
    fn handle_peer(&mut self, message: openagi_net::DirectMessage) {
        if !self.peers.contains(&Some(message.from)) {
            return;
        }
        self.handle(Input::Message {
            from: message.from,
            data: message.data,
        });
    }

    fn handle(&mut self, input: Input) {
        let now = crate::unix_ms();
        match input {
            Input::Submit { tx, reply } => {
                let hash = tx.hash();
                let key = tx.key();
                let result =
                    self.replica
                        .handle_request(tx, now)
                        .map(|()| hash)
                        .map_err(|e| match e {
                            // Kept typed: a resubmission learns it was taken.
                            openagi_consensus::Error::Duplicate => ConsensusError::Replica(e),
                            openagi_consensus::Error::Full(_) => ConsensusError::Busy {
                                held: self.replica.pending_len(),
                                capacity: self.replica.config().max_pending_requests,
                            },
                            other => ConsensusError::Rejected(other.to_string()),
                        });
                if result.is_ok() {
                    self.track_submission(key, Instant::now());
                }
                let _ = reply.send(result);
            }
            Input::SubmitBatch { txs, received } => {
                let count = txs.len();
                for tx in txs {
                    let key = tx.key();
                    match self.replica.handle_request(tx, now) {
                        Ok(()) => self.track_submission(key, received),
                        // Counted by the replica's drop reasons.
                        Err(openagi_consensus::Error::Duplicate) => {}
                        Err(e) => {
                            self.metrics.refused.inc();
                            debug!(error = %e, "queued transaction refused");
                        }
                    }
                }
                // Pending first, then the queue: in between a submission
                // sees the batch twice (refused too early), never zero times
                // (admitted past the cap).
                self.backlog
                    .replica_pending
                    .store(self.replica.pending_len(), Ordering::Relaxed);
                self.backlog.release(count);
            }
            Input::Message { from, data } => {
                let parts = match openagi_consensus::bundle::decode(&data) {
                    Ok(parts) => parts,
                    Err(e) => {
                        debug!(%from, error = %e, "undecodable consensus bundle");
                        self.count_undecodable();
                        self.net.penalise(from, "direct", "malformed");
                        return;
                    }
                };
                let limit = self.replica.config().max_message_bytes;
                for part in parts {
                    match Message::decode(part, limit) {
                        Ok(message) => {
                            tracing::trace!(%from, kind = message.kind(), "consensus message in");
                            self.note_activity(&from, &message, now);
                            self.replica.handle_message(message, now)
                        }
                        Err(e) => {
                            debug!(%from, error = %e, "undecodable consensus message");
                            self.count_undecodable();
                            self.net.penalise(from, "direct", "malformed");
                        }
                    }
                }
            }
        }
    }

    async fn flush(
        &mut self,
        records: &mut Vec<openagi_consensus::PersistRecord>,
    ) -> Result<(), ConsensusError> {
        if records.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(records);
        let store = self.store.clone();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || store.persist_consensus(&batch))
            .await
            .map_err(|e| ConsensusError::Rejected(format!("persist task failed: {e}")))??;
        self.metrics
            .persist_latency
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn count_undecodable(&self) {
        self.metrics
            .dropped
            .get_or_create(&ReasonLabel {
                reason: "undecodable".into(),
            })
            .inc();
    }

    async fn drain(&mut self) -> Result<(), ConsensusError> {
        // Reading stored blocks for a peer produces outputs again (the
        // reply); a peer's requests are bounded by the replica's serve
        // budget, so this ends.
        loop {
            let reads = self.drain_once().await?;
            if reads.is_empty() {
                return Ok(());
            }
            for (peer, from, last) in reads {
                let store = self.store.clone();
                let count = usize::try_from(last.saturating_sub(from).saturating_add(1))
                    .unwrap_or(usize::MAX);
                // Serving a peer is best effort: a failed read is logged,
                // never a reason to stop consensus.
                let blocks = tokio::task::spawn_blocking(move || store.blocks_from(from, count))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|read| read.map_err(|e| e.to_string()));
                match blocks {
                    Ok(blocks) => {
                        self.metrics
                            .blocks_served_from_disk
                            .inc_by(blocks.len() as u64);
                        self.replica
                            .handle_stored_blocks(&peer, blocks, crate::unix_ms())
                    }
                    Err(e) => warn!(error = %e, "could not read blocks a peer asked for"),
                }
            }
        }
    }

    /// Acts on the replica's outputs; returns the block reads it asked for.
    async fn drain_once(&mut self) -> Result<Vec<(PublicKey, u64, u64)>, ConsensusError> {
        // Collect every output first and write all their records in one
        // fsynced transaction before acting on any of them. The contract is
        // "durable before acting on later outputs"; writing later records
        // early only persists votes a little before they are sent, which a
        // restart handles (it never contradicts what is on disk).
        let mut records = Vec::new();
        let mut actions = Vec::new();
        while let Some(output) = self.replica.poll_output() {
            match output {
                Output::Persist(record) => records.push(record),
                other => actions.push(other),
            }
        }
        self.flush(&mut records).await?;
        let mut outgoing = Outgoing::default();
        let mut reads = Vec::new();
        for action in actions {
            match action {
                Output::Send { to, message } => self.queue(&mut outgoing, to, &message),
                Output::Committed {
                    block,
                    certificate: _,
                    applied,
                    tx_hashes,
                } => self.committed(block, tx_hashes, applied.len()),
                Output::ViewInstalled { view, primary } => {
                    self.metrics.view_changes.inc();
                    info!(view, primary = %primary.fingerprint(), "new view installed");
                }
                Output::Persist(_) => {}
                Output::Evidence(evidence) => self.evidence(evidence),
                Output::ReadBlocks { peer, from, last } => reads.push((peer, from, last)),
                Output::Membership { height, effects } => {
                    self.membership.record(height, &effects);
                    self.allow_streams();
                    for (tx, change) in &effects.scheduled {
                        info!(height, tx = %hex::encode(tx), ?change, "validator-set change scheduled");
                    }
                    for (tx, refusal) in &effects.refused {
                        warn!(height, tx = %hex::encode(tx), %refusal, "validator-set change refused");
                    }
                }
                Output::EpochStarted {
                    number,
                    first_height,
                    validators,
                    member,
                } => self.enter_epoch(number, first_height, &validators, member),
            }
        }
        for (peer, parts) in outgoing.per_peer {
            for bundle in openagi_consensus::bundle::pack(&parts, openagi_net::MAX_DIRECT_BYTES) {
                if self.net.send_direct(peer, bundle).await.is_err() {
                    break;
                }
            }
        }
        self.sync_drop_counters();
        self.publish_status();
        let replica = &self.replica;
        self.membership
            .refresh(false, || replica.membership().clone());
        Ok(reads)
    }

    /// Encodes `message` once and queues it for its recipients; the drain
    /// sends each peer's queue as bundles.
    fn queue(&self, outgoing: &mut Outgoing, to: Recipient, message: &Message) {
        tracing::trace!(kind = message.kind(), to = ?to, "consensus message out");
        let bytes = match message.encode() {
            Ok(b) => Arc::new(b),
            Err(e) => {
                warn!(error = %e, "could not encode consensus message");
                return;
            }
        };
        match to {
            Recipient::All => {
                for (index, peer) in self.peers.iter().enumerate() {
                    if index != self.me
                        && let Some(peer) = peer
                    {
                        outgoing.push(*peer, bytes.clone());
                    }
                }
            }
            Recipient::One(key) => {
                if let Some(peer) = peer_id_of(&key) {
                    outgoing.push(peer, bytes);
                }
            }
        }
    }

    /// Whose direct streams are read: this epoch's validators, those of the
    /// epoch before (one that just left may still ask for blocks and the
    /// hand-off on its way to the boundary), and the keys joining in the
    /// transition in flight (they start sending when they move in, maybe
    /// before this replica does; refused streams would cost them their
    /// score).
    fn allow_streams(&self) {
        let membership = self.replica.membership();
        let keys = self
            .replica
            .validators()
            .members()
            .iter()
            .chain(
                membership
                    .previous_epoch()
                    .map(|p| p.validators.members())
                    .unwrap_or_default(),
            )
            .chain(self.replica.former_members())
            .chain(membership.epoch().validators.members())
            .chain(
                membership
                    .transition()
                    .map(|t| t.changes.iter().map(|c| c.key()).collect::<Vec<_>>())
                    .unwrap_or_default(),
            );
        let me_peer = self.net.local_peer_id();
        let allowed: HashSet<PeerId> = keys
            .filter_map(peer_id_of)
            .filter(|p| *p != me_peer)
            .collect();
        self.net.allow_direct_from(allowed);
    }

    /// What was heard from each validator starts over, one entry per
    /// member of the current set.
    fn reset_activity(&mut self) {
        self.activity = self
            .peers
            .iter()
            .enumerate()
            .map(|(index, peer)| ValidatorActivity {
                index,
                peer_id: peer.map(|p| p.to_string()).unwrap_or_default(),
                this_node: index == self.me,
                ..ValidatorActivity::default()
            })
            .collect();
    }

    /// A new validator set took over: messages go to its members (see
    /// [`Driver::allow_streams`] for whose are read).
    fn enter_epoch(
        &mut self,
        number: u64,
        first_height: u64,
        validators: &[PublicKey],
        member: bool,
    ) {
        self.peers = validators.iter().map(peer_id_of).collect();
        let me_peer = self.net.local_peer_id();
        self.me = self
            .peers
            .iter()
            .position(|p| *p == Some(me_peer))
            .unwrap_or(usize::MAX);
        self.allow_streams();
        self.reset_activity();
        if member {
            info!(
                epoch = number,
                first_height,
                validators = validators.len(),
                "a new validator set took over"
            );
        } else {
            warn!(
                epoch = number,
                first_height,
                "this node left the validator set: it votes no more and follows the ledger as a full node"
            );
        }
    }

    fn committed(&mut self, block: Block, tx_hashes: Arc<[Hash]>, applied: usize) {
        let now = Instant::now();
        let commit_ms = crate::unix_ms();
        let mut ring = match self.latencies.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        for tx in &block.txs {
            if let Some(at) = self.submitted.remove(&tx.key()) {
                let latency = now.duration_since(at);
                self.metrics.commit_latency.observe(latency.as_secs_f64());
                if ring.len() >= LATENCY_SAMPLES {
                    ring.pop_front();
                }
                ring.push_back((commit_ms, latency.as_secs_f32() * 1000.0));
            }
        }
        drop(ring);
        self.metrics.committed_blocks.inc();
        self.metrics.committed_txs.inc_by(applied as u64);
        self.metrics.height.set(block.height as i64);
        self.committed_txs += applied as u64;
        self.last_commit = Some(crate::unix_ms());
        let _ = self.commits.send(CommitNotice {
            height: block.height,
            block_hash: block.hash(),
            tx_hashes,
            block: Arc::new(block),
        });
    }

    fn sync_drop_counters(&mut self) {
        for (reason, count) in &self.replica.stats().dropped {
            let seen = self.dropped_seen.entry(*reason).or_insert(0);
            if *count > *seen {
                self.metrics
                    .dropped
                    .get_or_create(&ReasonLabel {
                        reason: reason_name(*reason),
                    })
                    .inc_by(*count - *seen);
                *seen = *count;
            }
        }
    }

    /// Says in the log when recovery starts to stall the network, learns
    /// its bound or ends, and when too many peers are recovering: once per
    /// change, not once per drain.
    fn log_recovery_change(&mut self, status: &ConsensusStatus) {
        let stalled = status.recovering_validators > status.f;
        let seen = (status.recovery.as_ref().map(|r| r.vote_bound_seq), stalled);
        if seen == self.recovery_seen {
            return;
        }
        let was_recovering = self.recovery_seen.0.is_some();
        self.recovery_seen = seen;
        match &status.recovery {
            Some(report) if report.stalls_network => {
                error!(
                    recovering = status.recovering_validators,
                    validators = status.validators,
                    "{}",
                    report.advice
                )
            }
            Some(report) => warn!("consensus recovery: {}", report.advice),
            None if was_recovering => {
                info!("recovery from lost consensus state finished; voting again")
            }
            None if stalled => error!(
                recovering = status.recovering_validators,
                validators = status.validators,
                "more validators are recovering from lost consensus state than the network tolerates ({}); \
                 it cannot commit until at least {} of them get their data directory back from a backup",
                status.f,
                status.recovering_validators - status.f
            ),
            None => {}
        }
    }

    /// A validator signed conflicting votes: count, log, keep for the
    /// status, and put the proof on the ledger once per offender (as a
    /// transaction of this node's own), so every node learns of it.
    fn evidence(&mut self, evidence: openagi_consensus::evidence::Equivocation) {
        let proven =
            match evidence.verify(self.replica.validators(), &openagi_consensus::StrictCrypto) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "the replica reported evidence that does not verify");
                    return;
                }
            };
        self.metrics.equivocations.inc();
        // Loud once per offender; a validator that keeps equivocating
        // must not flood the log.
        if self.reported.contains(&proven.validator) {
            debug!(
                validator = %proven.validator.fingerprint(),
                kind = proven.kind,
                view = proven.view,
                seq = proven.seq,
                "more conflicting votes from an equivocating validator"
            );
        } else {
            warn!(
                validator = %proven.validator.fingerprint(),
                kind = proven.kind,
                view = proven.view,
                seq = proven.seq,
                "a validator signed conflicting votes (equivocation)"
            );
            tracing::info!(
                target: "audit",
                event = "equivocation_seen",
                validator = %proven.validator,
                kind = proven.kind,
                view = proven.view,
                seq = proven.seq,
                "equivocation evidence"
            );
        }
        let mut submitted = false;
        if !self.reported.contains(&proven.validator) {
            let now = crate::unix_ms();
            let tx = evidence.to_removal_payload().and_then(|payload| {
                let seq = self
                    .store
                    .next_client_seq()
                    .map_err(|e| openagi_consensus::Error::Malformed(e.to_string()))?;
                Ok(Transaction {
                    client: self.own_client,
                    seq,
                    payload: payload.into(),
                })
            });
            match tx.and_then(|tx| self.replica.handle_request(tx, now)) {
                Ok(()) => {
                    submitted = true;
                    self.reported.insert(proven.validator);
                }
                Err(e) => {
                    warn!(error = %e, "could not put the equivocation evidence on the ledger")
                }
            }
        }
        if self.evidence.len() >= EVIDENCE_KEPT {
            self.evidence.pop_front();
        }
        self.evidence.push_back(EvidenceSeen {
            validator: proven.validator.to_hex(),
            kind: proven.kind,
            view: proven.view,
            seq: proven.seq,
            unix_ms: crate::unix_ms(),
            submitted,
        });
    }

    /// Records what arrived from the validator behind `from`.
    fn note_activity(&mut self, from: &PeerId, message: &Message, now: u64) {
        let Some(index) = self.peers.iter().position(|p| p.as_ref() == Some(from)) else {
            return;
        };
        let Some(entry) = self.activity.get_mut(index) else {
            return;
        };
        entry.last_message_unix_ms = Some(now);
        entry.last_message = Some(message.kind());
        // View and sequence number as claimed; the replica checks the
        // signature next.
        let vote = match message {
            Message::PrePrepare { pre_prepare, .. } => postcard::from_bytes::<
                openagi_consensus::messages::PrePrepare,
            >(pre_prepare.payload_bytes())
            .ok()
            .map(|p| (p.view, p.seq)),
            Message::Prepare(p) => {
                postcard::from_bytes::<openagi_consensus::messages::Prepare>(p.payload_bytes())
                    .ok()
                    .map(|p| (p.view, p.seq))
            }
            Message::Commit(c) => {
                postcard::from_bytes::<openagi_consensus::types::Commit>(c.payload_bytes())
                    .ok()
                    .map(|c| (c.view, c.seq))
            }
            _ => None,
        };
        if let Some((view, seq)) = vote {
            entry.last_vote = Some(VoteSeen {
                kind: message.kind(),
                view,
                seq,
                unix_ms: now,
            });
        }
    }

    fn publish_status(&mut self) {
        let now = crate::unix_ms();
        let silent = self
            .activity
            .iter()
            .filter(|a| !a.this_node)
            .filter(|a| {
                a.last_message_unix_ms
                    .is_none_or(|at| now.saturating_sub(at) > SILENT_AFTER_MS)
            })
            .count();
        self.metrics.silent.set(silent as i64);
        let validators = self.replica.validators();
        let view = self.replica.view();
        let choice = self.replica.primary_choice();
        let primary_index = choice.index;
        let head = self.replica.ledger().head();
        self.metrics.view.set(view as i64);
        self.metrics.pending.set(self.replica.pending_len() as i64);
        let status = ConsensusStatus {
            role: if self.replica.is_retired() {
                "full"
            } else {
                "validator"
            },
            epoch: self.replica.epoch().0,
            validators_keys: validators.members().iter().map(|k| k.to_hex()).collect(),
            view,
            changing_view: self.replica.is_changing_view(),
            primary_index,
            primary: self
                .peers
                .get(primary_index)
                .copied()
                .flatten()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            primary_reason: choice.reason(),
            skipped_validators: choice.skipped.clone(),
            schedule_checkpoint: self.replica.leader_schedule().height,
            next_skipped_validators: self.replica.upcoming_schedule().excluded().to_vec(),
            validator_index: self.me,
            validators: validators.n(),
            f: validators.f(),
            height: head.height,
            head_hash: hex::encode(head.hash),
            last_commit_unix_ms: self.last_commit,
            committed_txs: self.committed_txs,
            pending: self.replica.pending_len(),
            stable_checkpoint: self.replica.stable_seq(),
            peers_height: self.replica.reported_height(),
            recovering_validators: self.replica.recovering_validators(),
            recovery: self
                .replica
                .recovery_status()
                .map(|r| RecoveryReport::from_status(&r, validators.n())),
            activity: self.activity.clone(),
            evidence: self.evidence.iter().cloned().collect(),
        };
        self.log_recovery_change(&status);
        match self.status.write() {
            Ok(mut s) => *s = status,
            Err(p) => *p.into_inner() = status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_become_snake_case_labels() {
        assert_eq!(reason_name(DropReason::BadSignature), "bad_signature");
        assert_eq!(reason_name(DropReason::NotMember), "not_member");
    }

    #[test]
    fn validator_keys_map_to_their_libp2p_peer_ids() {
        let identity = Identity::from_seed(&[9; 32]);
        let keypair = openagi_net::keypair_from_identity(&identity).expect("keypair");
        assert_eq!(
            peer_id_of(&identity.public()),
            Some(keypair.public().to_peer_id())
        );
    }
}
