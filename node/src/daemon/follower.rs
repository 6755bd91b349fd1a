//! The full node's ledger: a node whose genesis does not list it as a
//! validator follows the chain instead of voting.
//!
//! The driver feeds [`openagi_consensus::follow::Follower`] (which verifies
//! every block against the chain and the validator set) with answers from
//! peers over `/openagi/ledger/1`: every [`FOLLOW_INTERVAL`] it asks one
//! connected peer, validators first, for the blocks after its head. What
//! verifies is stored durably (one fsynced transaction per answer) before
//! its commit notices go out, so the transaction index and the API see a
//! full node's ledger exactly as a validator's. A peer whose answer does
//! not verify is penalised and not asked again for a while.
//!
//! Every node with a store answers ledger requests from its disk
//! ([`answer`]); a validator also takes forwarded transactions.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openagi_consensus::follow::{Follower, LedgerRequest, LedgerResponse};
use openagi_consensus::membership::Membership;
use openagi_consensus::replica::PersistRecord;
use openagi_consensus::{StrictCrypto, Transaction};
use openagi_crypto::PublicKey;
use openagi_net::{NetHandle, PeerId};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use crate::common::store::Store;
use crate::daemon::consensus::{CommitNotice, peer_id_of};
use crate::daemon::role::{LedgerRole, Role, SharedMembership};

/// How often a full node asks for newer blocks.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);
/// How long a peer whose answer did not verify is not asked.
pub const DISTRUST_FOR: Duration = Duration::from_secs(60);

/// What a full node's status shows of its ledger.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowerStatus {
    /// `full`: follows the chain, never votes.
    pub role: &'static str,
    /// The validator-set epoch of the next block (0 for the genesis set;
    /// one more per committed change of the set).
    pub epoch: u64,
    /// How many validators there are.
    pub validators: usize,
    /// The validators' public keys, in order.
    pub validators_keys: Vec<String>,
    /// Verified and stored height.
    pub height: u64,
    /// Its block hash (hex).
    pub head_hash: String,
    /// When the last block arrived (ms since the Unix epoch).
    pub last_block_unix_ms: Option<u64>,
    /// The peer the last blocks came from.
    pub last_source: Option<String>,
    /// Answers that failed verification (each one penalised).
    pub refused_answers: u64,
}

/// Why a forwarded transaction was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A validator had taken it before.
    #[error("the transaction was submitted before")]
    Duplicate,
    /// Refused, or no validator reachable: why.
    #[error("{0}")]
    Refused(String),
}

/// The running follower: its status and commit notices.
#[derive(Clone)]
pub struct FollowerHandle {
    status: Arc<RwLock<FollowerStatus>>,
    commits: broadcast::Sender<CommitNotice>,
    genesis: Arc<Membership>,
    /// The current set's peers, as the followed chain changes it.
    validator_peers: Arc<RwLock<Vec<PeerId>>>,
    store: Arc<Store>,
    own_client: openagi_consensus::ClientId,
}

impl FollowerHandle {
    /// A transaction of this node's own (its client id, its next sequence
    /// number), to forward with [`FollowerHandle::forward`].
    pub async fn own_transaction(&self, payload: Vec<u8>) -> Result<Transaction> {
        let store = self.store.clone();
        let seq = tokio::task::spawn_blocking(move || store.next_client_seq()).await??;
        Ok(Transaction {
            client: self.own_client,
            seq,
            payload: payload.into(),
        })
    }

    /// Forwards `tx` to a connected validator (each in turn until one
    /// takes it); returns its hash. A validator's refusal is final (it
    /// says why); an unreachable one is skipped.
    pub async fn forward(
        &self,
        net: &NetHandle,
        tx: Transaction,
    ) -> Result<openagi_consensus::Hash, ForwardError> {
        let expected = tx.hash();
        let request = LedgerRequest::Submit(tx)
            .encode()
            .map_err(|e| ForwardError::Refused(e.to_string()))?;
        let mut duplicates = 0usize;
        let connected: Vec<PeerId> = net
            .snapshot()
            .peers
            .keys()
            .filter_map(|p| p.parse().ok())
            .collect();
        let mut unreachable = Vec::new();
        let validators: Vec<PeerId> = match self.validator_peers.read() {
            Ok(peers) => peers.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for peer in validators.iter().filter(|p| connected.contains(p)) {
            match net.ledger_request(*peer, request.clone()).await {
                // One validator's word is not final (it may be faulty):
                // a refusal or "duplicate" moves on to the next.
                Ok(bytes) => match LedgerResponse::decode(&bytes) {
                    Ok(LedgerResponse::Submitted(hash)) if hash == expected => return Ok(hash),
                    Ok(LedgerResponse::Submitted(_)) => {
                        unreachable.push(format!("{peer}: answered with another hash"));
                    }
                    Ok(LedgerResponse::Duplicate) => duplicates += 1,
                    Ok(LedgerResponse::Refused(why)) => {
                        unreachable.push(format!("{peer} refused it: {why}"));
                    }
                    Ok(LedgerResponse::Blocks(_) | LedgerResponse::Invitation { .. }) | Err(_) => {
                        unreachable.push(format!("{peer}: answered out of turn"));
                    }
                },
                Err(e) => unreachable.push(format!("{peer}: {e}")),
            }
        }
        if duplicates > 0 && unreachable.is_empty() {
            return Err(ForwardError::Duplicate);
        }
        Err(ForwardError::Refused(if unreachable.is_empty() {
            "no validator is connected to this full node to forward the transaction to".into()
        } else {
            format!(
                "no validator took the transaction ({})",
                unreachable.join("; ")
            )
        }))
    }

    /// The membership at genesis, from which the whole ledger verifies.
    pub fn genesis(&self) -> &Membership {
        &self.genesis
    }

    /// The current status.
    pub fn status(&self) -> FollowerStatus {
        match self.status.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Blocks as they are stored.
    pub fn subscribe(&self) -> broadcast::Receiver<CommitNotice> {
        self.commits.subscribe()
    }
}

/// Blocks read from the store at a time when replaying it at start.
const REPLAY_CHUNK: usize = 256;

/// The follower with every block `store` holds folded in (their hash
/// links checked; their certificates were checked when they came): the
/// membership and exactly-once table at the stored head.
fn replay_stored(genesis: &Membership, store: &Store) -> Result<Follower> {
    let mut follower = Follower::new(genesis.clone());
    loop {
        let from = follower.head().height + 1;
        let chunk = store.blocks_from(from, REPLAY_CHUNK)?;
        if chunk.is_empty() {
            return Ok(follower);
        }
        for (block, cert) in chunk {
            let height = block.height;
            follower
                .replay(block, cert, &StrictCrypto)
                .with_context(|| format!("replaying stored block {height}"))?;
        }
    }
}

/// Shows the current validator set (epoch, keys) in the status and
/// points forwarding at its members.
fn publish_membership(
    follower: &Follower,
    status: &RwLock<FollowerStatus>,
    validator_peers: &RwLock<Vec<PeerId>>,
) {
    let epoch = follower.membership().epoch();
    let keys: Vec<String> = epoch
        .validators
        .members()
        .iter()
        .map(|k| k.to_hex())
        .collect();
    if let Ok(mut s) = status.write()
        && (s.epoch != epoch.number || s.validators_keys != keys)
    {
        s.epoch = epoch.number;
        s.validators = epoch.validators.n();
        s.validators_keys = keys;
        if let Ok(mut peers) = validator_peers.write() {
            *peers = epoch
                .validators
                .members()
                .iter()
                .filter_map(peer_id_of)
                .collect();
        }
    }
}

/// How the follower task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerExit {
    /// Shutdown was asked for.
    Stopped,
    /// The followed chain made this node a validator (its key is in the
    /// set of the epoch the stored chain has reached): start its replica.
    Joined {
        /// That epoch.
        epoch: u64,
    },
}

/// While a transition that makes this node a validator is in flight, the
/// validators' direct streams are accepted (they wait in the inbox for the
/// replica): the others start sending once they move into the new set,
/// perhaps before this node has, and refused streams would cost them
/// their standing here.
fn allow_when_joining(net: &NetHandle, follower: &Follower, me: Option<&PublicKey>) {
    let Some(me) = me else {
        return;
    };
    let membership = follower.membership();
    let Some(transition) = membership.transition() else {
        return;
    };
    if !transition
        .changes
        .iter()
        .any(|c| matches!(c, openagi_consensus::membership::Change::Join(k) if k == me))
    {
        return;
    }
    let me_peer = net.local_peer_id();
    net.allow_direct_from(
        membership
            .epoch()
            .validators
            .members()
            .iter()
            .chain(transition.changes.iter().map(|c| c.key()))
            .filter_map(peer_id_of)
            .filter(|p| *p != me_peer),
    );
}

/// Starts following the ledger from what `store` holds; `genesis` is the
/// network's membership at height 0, `me` this node's key when the task
/// should end once the chain makes it a validator, `commits` where stored
/// blocks are announced.
pub fn start(
    genesis: Membership,
    store: Arc<Store>,
    net: NetHandle,
    me: Option<PublicKey>,
    commits: broadcast::Sender<CommitNotice>,
    view: SharedMembership,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(FollowerHandle, tokio::task::JoinHandle<FollowerExit>)> {
    let own_client = crate::daemon::consensus::node_client_id(&net.local_peer_id());
    let mut follower = replay_stored(&genesis, &store)?;
    let anchor = follower.head();
    let status = Arc::new(RwLock::new(FollowerStatus {
        role: "full",
        epoch: u64::MAX,
        height: anchor.height,
        head_hash: hex::encode(anchor.hash),
        ..FollowerStatus::default()
    }));
    let validator_peers = Arc::new(RwLock::new(Vec::new()));
    publish_membership(&follower, &status, &validator_peers);
    view.refresh(true, || follower.membership().clone());
    let handle = FollowerHandle {
        status: status.clone(),
        commits: commits.clone(),
        genesis: Arc::new(genesis),
        validator_peers: validator_peers.clone(),
        store: store.clone(),
        own_client,
    };
    info!(
        height = anchor.height,
        epoch = follower.membership().epoch().number,
        validators = follower.validators().n(),
        "following the ledger as a full node"
    );
    let task = tokio::spawn(async move {
        let joined = |follower: &Follower| {
            let epoch = follower.membership().epoch();
            me.and_then(|me| epoch.validators.index_of(&me))
                .map(|_| FollowerExit::Joined {
                    epoch: epoch.number,
                })
        };
        if let Some(exit) = joined(&follower) {
            return exit;
        }
        let mut distrusted: HashMap<PeerId, Instant> = HashMap::new();
        let mut turn = 0usize;
        let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            distrusted.retain(|_, since| since.elapsed() < DISTRUST_FOR);
            let validators: Vec<PeerId> = match validator_peers.read() {
                Ok(peers) => peers.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            let Some(peer) = pick_peer(&net, &validators, &distrusted, &mut turn) else {
                continue;
            };
            // Keep asking while a peer has more (catching up), one answer
            // stored at a time.
            loop {
                if *shutdown.borrow() {
                    break;
                }
                let followed =
                    follow_once(&mut follower, &store, &net, peer, &commits, &status).await;
                publish_membership(&follower, &status, &validator_peers);
                for (height, effects) in follower.take_effects() {
                    view.record(height, &effects);
                }
                // Blocks were stored: the view moves with them (the
                // follower takes at most an answer at a time, so this
                // copies at most once per answer).
                let stored = matches!(followed, Ok(n) if n > 0);
                view.refresh(stored, || follower.membership().clone());
                if stored {
                    allow_when_joining(&net, &follower, me.as_ref());
                }
                if let Some(exit) = joined(&follower) {
                    info!(
                        height = follower.head().height,
                        "the ledger made this node a validator"
                    );
                    return exit;
                }
                match followed {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(Refusal::Forged(why)) => {
                        warn!(%peer, reason = %why, "a peer's blocks did not verify; not asking it for a while");
                        net.penalise(peer, "ledger", "forged");
                        distrusted.insert(peer, Instant::now());
                        if let Ok(mut s) = status.write() {
                            s.refused_answers += 1;
                        }
                        break;
                    }
                    Err(Refusal::Unavailable(why)) => {
                        debug!(%peer, reason = %why, "no blocks from this peer");
                        break;
                    }
                    Err(Refusal::Local(e)) => {
                        warn!(error = format!("{e:#}"), "could not store followed blocks");
                        break;
                    }
                }
            }
        }
        info!("ledger follower stopped");
        FollowerExit::Stopped
    });
    Ok((handle, task))
}

/// The next peer to ask: a connected validator if any, round robin, else
/// any connected peer (full nodes serve blocks too); never a distrusted one.
fn pick_peer(
    net: &NetHandle,
    validators: &[PeerId],
    distrusted: &HashMap<PeerId, Instant>,
    turn: &mut usize,
) -> Option<PeerId> {
    let connected: Vec<PeerId> = net
        .snapshot()
        .peers
        .keys()
        .filter_map(|p| p.parse().ok())
        .filter(|p| !distrusted.contains_key(p))
        .collect();
    let preferred: Vec<PeerId> = connected
        .iter()
        .filter(|p| validators.contains(p))
        .copied()
        .collect();
    let pool = if preferred.is_empty() {
        connected
    } else {
        preferred
    };
    if pool.is_empty() {
        return None;
    }
    *turn = turn.wrapping_add(1);
    Some(pool[*turn % pool.len()])
}

enum Refusal {
    /// The answer did not verify: the peer is at fault.
    Forged(String),
    /// The peer could not answer (unreachable, refused, malformed reply).
    Unavailable(String),
    /// Storing failed here.
    Local(anyhow::Error),
}

/// Asks `peer` for the blocks after the head, verifies and stores them;
/// returns how many were new.
async fn follow_once(
    follower: &mut Follower,
    store: &Arc<Store>,
    net: &NetHandle,
    peer: PeerId,
    commits: &broadcast::Sender<CommitNotice>,
    status: &Arc<RwLock<FollowerStatus>>,
) -> Result<usize, Refusal> {
    let request = follower
        .next_request()
        .encode()
        .map_err(|e| Refusal::Local(e.into()))?;
    let answer = net
        .ledger_request(peer, request)
        .await
        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
    let blocks = match LedgerResponse::decode(&answer) {
        Ok(LedgerResponse::Blocks(blocks)) => blocks,
        Ok(LedgerResponse::Refused(why)) => return Err(Refusal::Unavailable(why)),
        Ok(
            LedgerResponse::Submitted(_)
            | LedgerResponse::Duplicate
            | LedgerResponse::Invitation { .. },
        ) => {
            return Err(Refusal::Forged(
                "answered a block request with a submission".into(),
            ));
        }
        Err(e) => return Err(Refusal::Forged(format!("undecodable answer: {e}"))),
    };
    // Checking up to 64 certificates is CPU work: off the async workers.
    let mut checker = follower.clone();
    let (checker, verified) = tokio::task::spawn_blocking(move || {
        let verified = checker.handle_blocks(blocks, &StrictCrypto);
        (checker, verified)
    })
    .await
    .map_err(|e| Refusal::Local(anyhow::anyhow!("verification task failed: {e}")))?;
    let fresh = verified.map_err(|e| Refusal::Forged(e.to_string()))?;
    *follower = checker;
    if fresh.is_empty() {
        return Ok(0);
    }
    let records: Vec<PersistRecord> = fresh
        .iter()
        .map(|(block, certificate)| PersistRecord::Block {
            block: block.clone(),
            certificate: certificate.clone(),
        })
        .collect();
    let writer = store.clone();
    tokio::task::spawn_blocking(move || writer.persist_consensus(&records))
        .await
        .map_err(|e| Refusal::Local(anyhow::anyhow!("store task failed: {e}")))?
        .map_err(|e| Refusal::Local(e.into()))?;
    let now = crate::unix_ms();
    for (block, _) in &fresh {
        let _ = commits.send(CommitNotice {
            height: block.height,
            block_hash: block.hash(),
            tx_hashes: block.txs.iter().map(Transaction::hash).collect(),
            block: Arc::new(block.clone()),
        });
    }
    let head = follower.head();
    if let Ok(mut s) = status.write() {
        s.height = head.height;
        s.head_hash = hex::encode(head.hash);
        s.last_block_unix_ms = Some(now);
        s.last_source = Some(peer.to_string());
    }
    debug!(%peer, blocks = fresh.len(), height = head.height, "followed blocks stored");
    Ok(fresh.len())
}

/// What answers `/openagi/ledger/1` on this node: blocks from its store,
/// forwarded transactions (a validator), invite redemptions (a node with
/// a genesis).
#[derive(Clone)]
pub struct LedgerServer {
    /// The node's database.
    pub store: Arc<Store>,
    /// Its part in the ledger (forwarded transactions are taken while it
    /// is a validator).
    pub ledger: LedgerRole,
    /// Its network id and `genesis.toml`, handed to redeemed invites.
    pub genesis: Option<(String, String)>,
    /// When the last redemptions were tried (all peers together).
    redemptions: Arc<std::sync::Mutex<std::collections::VecDeque<Instant>>>,
}

impl LedgerServer {
    /// A server for this node.
    pub fn new(store: Arc<Store>, ledger: LedgerRole, genesis: Option<(String, String)>) -> Self {
        Self {
            store,
            ledger,
            genesis,
            redemptions: Arc::default(),
        }
    }

    /// Whether another redemption may be tried now (at most
    /// [`crate::common::invite::REDEEM_ATTEMPTS_PER_MINUTE`] a minute).
    fn redemption_allowed(&self) -> bool {
        let mut recent = self.redemptions.lock().unwrap_or_else(|p| p.into_inner());
        while recent
            .front()
            .is_some_and(|at| at.elapsed() > Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() >= crate::common::invite::REDEEM_ATTEMPTS_PER_MINUTE {
            return false;
        }
        recent.push_back(Instant::now());
        true
    }

    /// Answers one request from `from`.
    pub async fn answer(&self, from: PeerId, data: &[u8]) -> LedgerResponse {
        answer(self, from, data).await
    }
}

/// Answers a `/openagi/ledger/1` request from this node's store (blocks,
/// up to the protocol's answer size), its consensus (a forwarded
/// transaction, taken only by a validator) or its invites.
async fn answer(server: &LedgerServer, from: PeerId, data: &[u8]) -> LedgerResponse {
    let store = &server.store;
    let consensus = server.ledger.consensus();
    let request = match LedgerRequest::decode(data) {
        Ok(r) => r,
        Err(e) => return LedgerResponse::Refused(format!("malformed request: {e}")),
    };
    match request {
        LedgerRequest::Blocks { from: first, max } => {
            let store = store.clone();
            let max = max.min(openagi_consensus::follow::MAX_BLOCKS_PER_REQUEST) as usize;
            // Read a few blocks at a time and stop before the answer limit,
            // so one request never holds more than about one answer.
            let read = tokio::task::spawn_blocking(move || {
                let limit = openagi_net::MAX_LEDGER_RESPONSE_BYTES - 1024;
                let mut answer = Vec::new();
                let mut size = 0usize;
                let mut next = first.max(1);
                while answer.len() < max {
                    let chunk = store.blocks_from(next, 8.min(max - answer.len()))?;
                    if chunk.is_empty() {
                        break;
                    }
                    for block in chunk {
                        size += postcard::to_stdvec(&block).map_or(usize::MAX / 2, |v| v.len());
                        if size > limit {
                            return Ok(answer);
                        }
                        next = block.0.height + 1;
                        answer.push(block);
                    }
                }
                Ok::<_, crate::common::store::StoreError>(answer)
            })
            .await;
            match read {
                Ok(Ok(blocks)) => LedgerResponse::Blocks(blocks),
                Ok(Err(e)) => LedgerResponse::Refused(format!("reading blocks: {e}")),
                Err(e) => LedgerResponse::Refused(format!("reading blocks: {e}")),
            }
        }
        // A peer may forward only its own transactions (its client id is
        // its peer id's hash): nobody can spend another node's sequence
        // numbers through this door.
        LedgerRequest::Submit(tx)
            if tx.client != crate::daemon::consensus::node_client_id(&from) =>
        {
            LedgerResponse::Refused(
                "a forwarded transaction must be under the sending node's own client id".into(),
            )
        }
        LedgerRequest::Redeem { code } => {
            let Some((network_id, genesis_toml)) = server.genesis.clone() else {
                return LedgerResponse::Refused("this node has no genesis to invite into".into());
            };
            if !server.redemption_allowed() {
                return LedgerResponse::Refused(
                    "too many invite redemptions here this minute; try again in a minute".into(),
                );
            }
            let canonical = match crate::common::invite::normalize(&code) {
                Ok(c) => c,
                Err(e) => return LedgerResponse::Refused(e.to_string()),
            };
            let hash = crate::common::invite::code_hash(&canonical);
            let store = store.clone();
            let now = crate::unix_ms();
            match tokio::task::spawn_blocking(move || store.redeem_invite(&hash, now)).await {
                Ok(Ok(Ok(()))) => {
                    info!(peer = %from, "an invite was redeemed");
                    LedgerResponse::Invitation {
                        network_id,
                        genesis_toml,
                    }
                }
                Ok(Ok(Err(refusal))) => LedgerResponse::Refused(refusal.to_string()),
                Ok(Err(e)) => LedgerResponse::Refused(format!("reading invites: {e}")),
                Err(e) => LedgerResponse::Refused(format!("reading invites: {e}")),
            }
        }
        LedgerRequest::Submit(tx) => match consensus {
            Some(c) => match c.submit(tx).await {
                Ok(hash) => LedgerResponse::Submitted(hash),
                Err(crate::daemon::consensus::ConsensusError::Replica(
                    openagi_consensus::Error::Duplicate,
                )) => LedgerResponse::Duplicate,
                Err(e) => LedgerResponse::Refused(e.to_string()),
            },
            None => LedgerResponse::Refused("this node is not a validator".into()),
        },
    }
}

/// How a service reaches the ledger: through this node's replica while it
/// is a validator, through a validator while it is a full node (the part
/// may change while the daemon runs). Both publish the same commit notices
/// and take the node's own transactions.
#[derive(Clone)]
pub struct LedgerAccess {
    /// The node's current part.
    pub role: LedgerRole,
    /// The network, to reach validators from a full node.
    pub net: NetHandle,
}

fn no_ledger() -> SubmitError {
    SubmitError::Refused("this node holds no ledger".into())
}

/// Why a transaction was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// It was taken before (a resubmission).
    #[error("the transaction was submitted before")]
    Duplicate,
    /// Refused, and why.
    #[error("{0}")]
    Refused(String),
}

impl LedgerAccess {
    /// Blocks as they commit (validator) or are stored (full node).
    pub fn subscribe(&self) -> broadcast::Receiver<CommitNotice> {
        self.role.subscribe()
    }

    /// The ledger height this node holds.
    pub fn height(&self) -> u64 {
        match self.role.get() {
            Role::Validator(c) => c.status().height,
            Role::Full(f) => f.status().height,
            Role::None => 0,
        }
    }

    /// A transaction of this node's own (its client id and next number).
    pub async fn own_transaction(&self, payload: Vec<u8>) -> Result<Transaction> {
        match self.role.get() {
            Role::Validator(c) => Ok(c.own_transaction(payload).await?),
            Role::Full(f) => f.own_transaction(payload).await,
            Role::None => Err(anyhow::anyhow!("this node holds no ledger")),
        }
    }

    /// Submits `tx` to this node's replica or forwards it to a validator.
    pub async fn submit(&self, tx: Transaction) -> Result<openagi_consensus::Hash, SubmitError> {
        match self.role.get() {
            Role::Validator(c) => c.submit(tx).await.map_err(|e| match e {
                crate::daemon::consensus::ConsensusError::Replica(
                    openagi_consensus::Error::Duplicate,
                ) => SubmitError::Duplicate,
                other => SubmitError::Refused(other.to_string()),
            }),
            Role::Full(f) => f.forward(&self.net, tx).await.map_err(|e| match e {
                ForwardError::Duplicate => SubmitError::Duplicate,
                ForwardError::Refused(why) => SubmitError::Refused(why),
            }),
            Role::None => Err(no_ledger()),
        }
    }
}

/// Ledger requests one peer may have answered at once (the network task
/// allows 64 in all).
pub const LEDGER_ANSWERS_PER_PEER: usize = 4;

/// Counts each peer's ledger requests being answered.
#[derive(Clone, Default)]
pub struct LedgerSlots {
    busy: Arc<std::sync::Mutex<HashMap<PeerId, usize>>>,
}

/// One request's slot, given back when dropped.
pub struct LedgerSlot {
    slots: LedgerSlots,
    peer: PeerId,
}

impl LedgerSlots {
    /// A slot for `peer`, unless it has [`LEDGER_ANSWERS_PER_PEER`] already.
    pub fn take(&self, peer: PeerId) -> Option<LedgerSlot> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let count = busy.entry(peer).or_default();
        if *count >= LEDGER_ANSWERS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(LedgerSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for LedgerSlot {
    fn drop(&mut self) {
        let mut busy = self.slots.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = busy.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                busy.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx_of(peer: &PeerId) -> Transaction {
        Transaction {
            client: crate::daemon::consensus::node_client_id(peer),
            seq: 1,
            payload: b"x".to_vec().into(),
        }
    }

    #[tokio::test]
    async fn a_peer_forwards_only_its_own_transactions_and_slots_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let server = LedgerServer::new(store, crate::daemon::role::LedgerRole::default(), None);
        let (me, other) = (PeerId::random(), PeerId::random());
        let request = |tx: Transaction| LedgerRequest::Submit(tx).encode().expect("encodes");
        match server.answer(me, &request(tx_of(&other))).await {
            LedgerResponse::Refused(why) => assert!(why.contains("own client id"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Its own transaction reaches the (absent) replica.
        match server.answer(me, &request(tx_of(&me))).await {
            LedgerResponse::Refused(why) => assert!(why.contains("not a validator"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Blocks from an empty store: an empty answer, not an error.
        let blocks = LedgerRequest::Blocks { from: 1, max: 64 }
            .encode()
            .expect("encodes");
        assert_eq!(
            server.answer(me, &blocks).await,
            LedgerResponse::Blocks(Vec::new())
        );

        let slots = LedgerSlots::default();
        let held: Vec<_> = (0..LEDGER_ANSWERS_PER_PEER)
            .map(|_| slots.take(me).expect("a slot"))
            .collect();
        assert!(slots.take(me).is_none(), "a peer's slots are bounded");
        assert!(slots.take(other).is_some(), "other peers are not affected");
        drop(held);
        assert!(slots.take(me).is_some(), "slots come back");
    }
}
