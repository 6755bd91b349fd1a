//! Which part this node plays in the ledger right now: a validator (its
//! replica votes), a full node (its follower verifies and stores), or
//! neither (no genesis). The part changes while the daemon runs, when the
//! chain adds this node to the validator set or takes it out; services
//! read the current part through [`LedgerRole`] at each use, never keep a
//! handle of their own, so they follow the change. Commit notices go
//! through one channel that both parts publish into, so subscribers keep
//! theirs across a change.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use openagi_consensus::Hash;
use openagi_consensus::membership::{Accepted, BlockEffects, Membership, Refusal};
use openagi_crypto::Identity;
use openagi_net::NetHandle;
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::common::genesis::Genesis;
use crate::common::store::Store;
use crate::daemon::consensus::{
    COMMIT_NOTICES, CommitNotice, ConsensusError, ConsensusExit, ConsensusHandle, ConsensusMetrics,
    ConsensusWiring, ReplicaSetup,
};
use crate::daemon::follower::{FollowerExit, FollowerHandle};

/// The part this node plays.
#[derive(Clone, Default)]
pub enum Role {
    /// No ledger (no genesis file).
    #[default]
    None,
    /// It votes.
    Validator(ConsensusHandle),
    /// It follows and forwards.
    Full(FollowerHandle),
}

/// Outcomes of membership transactions remembered for `validator join`
/// and `leave` to ask about.
pub const KEPT_OUTCOMES: usize = 256;

/// What a membership transaction did once committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The height that carried it.
    pub height: u64,
    /// The change it scheduled or the vote it counted, or why it was
    /// refused.
    pub result: Result<Accepted, Refusal>,
}

/// What this node knows of the validator set along its chain, kept by
/// whichever part runs.
#[derive(Clone, Debug, Default)]
pub struct MembershipView {
    /// The membership at the node's head (refreshed at most every
    /// [`VIEW_REFRESH`] while nothing changes, at once when something
    /// does).
    pub membership: Option<Arc<Membership>>,
    /// Recent membership transactions' outcomes by transaction hash.
    pub outcomes: VecDeque<(Hash, Outcome)>,
    refreshed: Option<Instant>,
}

/// How stale the membership view may get while no change happens (an
/// anchor a second old is as good as a fresh one: anchors may be
/// [`openagi_consensus::membership::ANCHOR_CHECKPOINTS`] checkpoints old).
pub const VIEW_REFRESH: Duration = Duration::from_secs(1);

/// A shared [`MembershipView`].
#[derive(Clone, Debug, Default)]
pub struct SharedMembership(Arc<RwLock<MembershipView>>);

impl SharedMembership {
    /// Records what one block did.
    pub fn record(&self, height: u64, effects: &BlockEffects) {
        let mut view = self.0.write().unwrap_or_else(|p| p.into_inner());
        let outcomes = effects
            .scheduled
            .iter()
            .map(|(tx, change)| (*tx, Ok(Accepted::Change(*change))))
            .chain(
                effects
                    .votes
                    .iter()
                    .map(|(tx, params)| (*tx, Ok(Accepted::PuzzleVote(*params)))),
            )
            .chain(effects.refused.iter().map(|(tx, r)| (*tx, Err(r.clone()))));
        for (tx, result) in outcomes {
            if view.outcomes.len() >= KEPT_OUTCOMES {
                view.outcomes.pop_front();
            }
            view.outcomes.push_back((tx, Outcome { height, result }));
        }
        // Something changed: the next refresh is taken at once.
        view.refreshed = None;
    }

    /// Replaces the membership when it is stale (or `force`), calling
    /// `current` only then, since it clones.
    pub fn refresh(&self, force: bool, current: impl FnOnce() -> Membership) {
        let mut view = self.0.write().unwrap_or_else(|p| p.into_inner());
        if force || view.refreshed.is_none_or(|at| at.elapsed() >= VIEW_REFRESH) {
            view.membership = Some(Arc::new(current()));
            view.refreshed = Some(Instant::now());
        }
    }

    /// The membership at (about) the node's head (shared, not copied).
    pub fn membership(&self) -> Option<Arc<Membership>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .membership
            .clone()
    }

    /// What the transaction `tx` did, if it committed recently.
    pub fn outcome(&self, tx: &Hash) -> Option<Outcome> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .outcomes
            .iter()
            .rev()
            .find(|(hash, _)| hash == tx)
            .map(|(_, outcome)| outcome.clone())
    }
}

/// The current [`Role`], shared by the daemon's services.
#[derive(Clone)]
pub struct LedgerRole {
    current: Arc<RwLock<Role>>,
    commits: broadcast::Sender<CommitNotice>,
    membership: SharedMembership,
    proof_checks: Arc<tokio::sync::Semaphore>,
}

impl Default for LedgerRole {
    fn default() -> Self {
        let (commits, _) = broadcast::channel(COMMIT_NOTICES);
        Self {
            current: Arc::default(),
            commits,
            membership: SharedMembership::default(),
            proof_checks: Arc::new(tokio::sync::Semaphore::new(
                crate::daemon::consensus::ADMISSION_PROOF_CHECKS,
            )),
        }
    }
}

impl LedgerRole {
    /// The part played now.
    pub fn get(&self) -> Role {
        match self.current.read() {
            Ok(role) => role.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Changes the part.
    pub fn set(&self, role: Role) {
        match self.current.write() {
            Ok(mut current) => *current = role,
            Err(poisoned) => *poisoned.into_inner() = role,
        }
    }

    /// The replica's handle while this node is a validator.
    pub fn consensus(&self) -> Option<ConsensusHandle> {
        match self.get() {
            Role::Validator(c) => Some(c),
            _ => None,
        }
    }

    /// The follower's handle while this node is a full node.
    pub fn follower(&self) -> Option<FollowerHandle> {
        match self.get() {
            Role::Full(f) => Some(f),
            _ => None,
        }
    }

    /// Whether this node holds a ledger at all.
    pub fn has_ledger(&self) -> bool {
        !matches!(self.get(), Role::None)
    }

    /// The validator set along this node's chain, as the running part
    /// last published it.
    pub fn membership(&self) -> &SharedMembership {
        &self.membership
    }

    /// Join proofs this node checks at once outside consensus (before
    /// submitting or admitting a join): each is one Argon2id run of the
    /// puzzle's memory.
    pub fn proof_checks(&self) -> Arc<tokio::sync::Semaphore> {
        self.proof_checks.clone()
    }

    /// The channel both parts announce blocks on.
    pub fn commits(&self) -> broadcast::Sender<CommitNotice> {
        self.commits.clone()
    }

    /// Blocks as they commit (validator) or are stored (full node),
    /// across changes of part.
    pub fn subscribe(&self) -> broadcast::Receiver<CommitNotice> {
        self.commits.subscribe()
    }
}

/// How a part's task ended.
pub enum PartExit {
    /// Shutdown was asked for.
    Stopped,
    /// The replica retired: this node left the validator set (what the
    /// replica held of the wiring comes back).
    Retired(ConsensusWiring),
    /// The follower saw this node enter the validator set.
    Joined,
}

/// The running part's task.
pub type PartTask = tokio::task::JoinHandle<Result<PartExit, ConsensusError>>;

/// Starts and switches the node's part in the ledger: everything either
/// part needs, kept while the daemon runs.
pub struct Ledger {
    /// The current part, shared with the services.
    pub role: LedgerRole,
    genesis: Genesis,
    identity_seed: zeroize::Zeroizing<[u8; 32]>,
    replica_config: openagi_consensus::Config,
    marker: PathBuf,
    store: Arc<Store>,
    net: NetHandle,
    shutdown: watch::Receiver<bool>,
    /// What the replica takes while it runs (metrics, the inbox).
    wiring: Option<ConsensusWiring>,
}

impl Ledger {
    /// Everything needed to run either part of `genesis`'s network.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        genesis: Genesis,
        identity: &Identity,
        replica_config: openagi_consensus::Config,
        marker: PathBuf,
        store: Arc<Store>,
        net: NetHandle,
        metrics: ConsensusMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let role = LedgerRole::default();
        let inbox = net
            .take_direct_inbox()
            .context("the inbox of validators' messages was taken before")?;
        Ok(Self {
            wiring: Some(ConsensusWiring {
                metrics,
                inbox,
                commits: role.commits(),
                membership: role.membership().clone(),
                proof_checks: role.proof_checks(),
            }),
            role,
            genesis,
            identity_seed: identity.seed(),
            replica_config,
            marker,
            store,
            net,
            shutdown,
        })
    }

    /// Starts the part this node plays now: its replica when the chain it
    /// holds has it in the validator set (the genesis set, or a later one
    /// it joined), else the follower.
    pub fn start(&mut self) -> anyhow::Result<PartTask> {
        let me = Identity::from_seed(&self.identity_seed).public();
        if self.genesis.validator_set()?.index_of(&me).is_some() {
            // A genesis validator (unless the chain has since removed it:
            // then it falls back to following).
            self.start_validator(false)
        } else {
            // The follower reads the chain once and hands over at once if
            // this node joined the set on it.
            info!(
                "this node's key is not among the genesis validators: it follows the ledger as a full node"
            );
            self.start_full(true)
        }
    }

    /// Starts the replica, or the follower when this node is not a
    /// validator of the epoch its chain reached (watching for a join,
    /// unless the follower has just reported one the replica does not
    /// see: then it follows without watching rather than loop).
    fn start_validator(&mut self, after_join: bool) -> anyhow::Result<PartTask> {
        let Some(wiring) = self.wiring.take() else {
            anyhow::bail!("the replica is already running");
        };
        let setup = ReplicaSetup {
            identity: Identity::from_seed(&self.identity_seed),
            validators: self.genesis.validator_set()?,
            config: self.replica_config.clone(),
            marker: self.marker.clone(),
        };
        match crate::daemon::consensus::start(
            setup,
            self.store.clone(),
            self.net.clone(),
            wiring,
            self.shutdown.clone(),
        ) {
            Ok((handle, task)) => {
                self.role.set(Role::Validator(handle));
                Ok(tokio::spawn(async move {
                    match task.await {
                        Ok(Ok(ConsensusExit::Stopped)) => Ok(PartExit::Stopped),
                        Ok(Ok(ConsensusExit::Retired(wiring))) => Ok(PartExit::Retired(wiring)),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(ConsensusError::Rejected(format!(
                            "the consensus task panicked: {e}"
                        ))),
                    }
                }))
            }
            Err((ConsensusError::NotValidator(epoch), wiring)) => {
                self.wiring = Some(wiring);
                info!(
                    epoch,
                    "this node's key is not among the validators of the epoch its ledger reached: it follows the ledger as a full node"
                );
                if after_join {
                    warn!(
                        epoch,
                        "the followed ledger lists this node as a validator but its replica does not; following without taking part"
                    );
                }
                self.start_full(!after_join)
            }
            Err((e, _)) => Err(e.into()),
        }
    }

    /// Starts the follower; with `watch_join`, its task ends when the
    /// chain makes this node a validator.
    fn start_full(&mut self, watch_join: bool) -> anyhow::Result<PartTask> {
        let me = Identity::from_seed(&self.identity_seed).public();
        let (handle, task) = crate::daemon::follower::start(
            self.genesis.membership()?,
            self.store.clone(),
            self.net.clone(),
            watch_join.then_some(me),
            self.role.commits(),
            self.role.membership().clone(),
            self.shutdown.clone(),
        )?;
        self.role.set(Role::Full(handle));
        Ok(tokio::spawn(async move {
            match task.await {
                Ok(FollowerExit::Stopped) => Ok(PartExit::Stopped),
                Ok(FollowerExit::Joined { .. }) => Ok(PartExit::Joined),
                Err(e) => Err(ConsensusError::Rejected(format!(
                    "the follower task panicked: {e}"
                ))),
            }
        }))
    }

    /// Switches part after `exit`: a retired replica's node follows the
    /// ledger, a follower whose node joined starts its replica. Returns
    /// the new part's task, or `None` when the part stopped for shutdown.
    pub fn switch(&mut self, exit: PartExit) -> anyhow::Result<Option<PartTask>> {
        match exit {
            PartExit::Stopped => Ok(None),
            PartExit::Retired(wiring) => {
                self.wiring = Some(wiring);
                warn!("this node left the validator set: it now follows the ledger as a full node");
                self.start_full(true).map(Some)
            }
            PartExit::Joined => {
                info!("this node joined the validator set: starting its replica");
                self.start_validator(true).map(Some)
            }
        }
    }
}
