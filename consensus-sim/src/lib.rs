//! Deterministic simulation of a PBFT network.
//!
//! One seeded generator drives everything: message loss, duplication,
//! delay (and so reordering), partitions, crashes and restarts, byzantine
//! replicas and clients. The same seed always produces the same run, so a
//! failing seed from `pbft-sim` reproduces exactly.
//!
//! Invariants are checked after every delivered message and every tick:
//! no two correct replicas commit different blocks at one height, no
//! transaction takes effect twice on a correct replica, and a correct
//! client's transaction takes effect only with the payload the client sent.
//! [`Sim::check_liveness`] checks that commits resume once the network is
//! healthy.

pub mod twins;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::rc::Rc;

use openagi_crypto::{Identity, PublicKey, Signature, Signed, identity::SignedPayload};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use openagi_consensus::messages::{
    Checkpoint, Commit, Message, NewView, PrePrepare, Prepare, Status, ViewChange,
};
use openagi_consensus::replica::{Config, Output, PersistedState, Recipient, Replica};
use openagi_consensus::signing::{MemoSigner, Signer, VerifiedMemo};
use openagi_consensus::types::{Batch, ClientId, NetworkId, Transaction, ValidatorSet};
use openagi_consensus::{Hash, ledger::Ledger};

/// How a simulated replica misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Follows the protocol.
    Correct,
    /// As primary, sends one batch to half the replicas and a different
    /// one to the other half.
    EquivocatingPrimary,
    /// Sends every prepare and commit for a random digest to half the
    /// replicas, alongside its real vote to the others.
    DoubleVoter,
    /// Replaces its new-view messages with forged ones (dropped prepared
    /// batches, a view change counted twice, tampered signatures) and adds
    /// view changes with fabricated prepared proofs.
    ForgedViewChange,
    /// Replays messages it received earlier (old views included) and sends
    /// checkpoints with false state digests or tampered signatures.
    Replayer,
    /// Sends nothing.
    Silent,
    /// Claims a much longer ledger in its status messages and answers
    /// state-transfer requests with tampered blocks.
    LyingServer,
    /// As primary, shifts some proposals to the next sequence number,
    /// leaving gaps and reusing numbers.
    GapPrimary,
    /// Sends validly signed view changes for views far ahead, to drag
    /// correct replicas along or fill their buffers.
    ViewInflater,
    /// Follows the protocol but is restarted with an empty state by the
    /// scenario (see [`Action::RestartEmpty`]): it forgets votes it cast,
    /// so it counts against the tolerated faults.
    Amnesiac,
}

/// Link behaviour.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetConfig {
    /// Probability a message is lost.
    pub drop: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Shortest delay in milliseconds.
    pub min_delay_ms: u64,
    /// Longest delay; a wide range reorders messages.
    pub max_delay_ms: u64,
}

impl NetConfig {
    /// A healthy network: no loss, 1–10 ms delay.
    pub fn clean() -> Self {
        NetConfig {
            drop: 0.0,
            duplicate: 0.0,
            min_delay_ms: 1,
            max_delay_ms: 10,
        }
    }

    /// A lossy, duplicating, reordering network.
    pub fn lossy(drop: f64, duplicate: f64) -> Self {
        NetConfig {
            drop,
            duplicate,
            min_delay_ms: 1,
            max_delay_ms: 80,
        }
    }
}

/// A scheduled change to the simulated world.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Stop a node (by node id); messages to it are lost.
    Crash(usize),
    /// Restart a node from what it persisted.
    Restart(usize),
    /// Restart a node with an empty state: it forgot its log.
    RestartEmpty(usize),
    /// Restart a node with an empty state that knows it lost its state and
    /// recovers with [`Replica::recover_after_data_loss`].
    RecoverEmpty(usize),
    /// Split validators into groups (group number per validator index, so
    /// a validator's twin is in its group); links between different groups
    /// lose everything.
    Partition(Vec<u8>),
    /// Split nodes into groups (group number per node id, twins included,
    /// so a twin can be apart from its original); links between different
    /// groups lose everything. Replaces any earlier partition.
    PartitionNodes(Vec<u8>),
    /// Remove any partition.
    HealPartition,
    /// Stop a node without losing anything (a stopped process): it gets
    /// no ticks, and messages to it wait (up to [`PAUSED_BACKLOG`], like a
    /// socket buffer) until it resumes.
    Pause(usize),
    /// Resume a paused node: it reads what waited, then runs on.
    Resume(usize),
    /// Change link behaviour.
    SetNet(NetConfig),
    /// Drop every message of this kind (see [`Message::kind`]), or stop
    /// doing so with `None`.
    BlockKind(Option<&'static str>),
    /// Start a spare node's replica once it joined the validator set: it
    /// takes the chain from a correct node's disk (what its full node
    /// would have followed) and restores from it. Before its join took
    /// effect the node stays down (try again later).
    StartJoined(usize),
    /// Node `id` asks to join the validator set: a join anchored at a
    /// correct replica's newest block, its proof solved, submitted.
    RequestJoin(usize),
    /// Node `id` asks to leave the validator set in the current epoch.
    RequestLeave(usize),
}

/// Messages that wait for a paused node; later ones are lost.
pub const PAUSED_BACKLOG: usize = 10_000;

/// Parameters of a simulation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of the generator.
    pub seed: u64,
    /// Number of validators.
    pub n: usize,
    /// Fault of each validator (missing entries are correct).
    pub faults: Vec<Fault>,
    /// Validators run twice under one identity: `(index, reach)`, where
    /// `reach[node id]` says which nodes the original talks to; its twin
    /// (an extra node, ids from `n` on) talks to exactly the others. An
    /// empty `reach` lets both talk to everyone, leaving the separation to
    /// [`Action::PartitionNodes`].
    pub twins: Vec<(usize, Vec<bool>)>,
    /// Replica configuration.
    pub replica: Config,
    /// Initial link behaviour.
    pub net: NetConfig,
    /// Correct clients.
    pub clients: usize,
    /// Each correct client submits a transaction this often.
    pub client_interval_ms: u64,
    /// Most unapplied transactions per correct client.
    pub client_window: usize,
    /// A byzantine client reusing sequence numbers with new payloads.
    pub byzantine_client: bool,
    /// Tick granularity.
    pub tick_ms: u64,
    /// Stop submitting new transactions after this time (retries go on).
    pub load_until_ms: u64,
    /// Each node's clock runs ahead of simulated time by a random amount
    /// up to this, exercising the timestamp rules.
    pub clock_skew_ms: u64,
    /// Nodes outside the genesis set (ids after the validators and
    /// twins) that may join it: they run no replica until
    /// [`Action::StartJoined`].
    pub spares: usize,
    /// Correct nodes put equivocation evidence they see on the ledger, as
    /// a node does, so the equivocator is removed at the next boundary.
    pub report_evidence: bool,
}

impl SimConfig {
    /// A small healthy network of `n` correct replicas with light load.
    pub fn new(seed: u64, n: usize) -> Self {
        SimConfig {
            seed,
            n,
            faults: Vec::new(),
            twins: Vec::new(),
            replica: sim_replica_config(),
            net: NetConfig::clean(),
            clients: 2,
            client_interval_ms: 100,
            client_window: 4,
            byzantine_client: false,
            tick_ms: 10,
            load_until_ms: u64::MAX,
            clock_skew_ms: 0,
            spares: 0,
            report_evidence: false,
        }
    }
}

/// Replica settings sized for simulation: small checkpoint interval and
/// window so garbage collection and window stalls happen often, batch delay
/// long enough to batch, short timeouts.
pub fn sim_replica_config() -> Config {
    Config {
        checkpoint_interval: 8,
        window: 32,
        max_batch_txs: 32,
        max_batch_bytes: 64 * 1024,
        max_batch_delay_ms: 40,
        view_change_timeout_ms: 800,
        max_view_change_timeout_ms: 6_400,
        retransmit_interval_ms: 300,
        status_interval_ms: 500,
        forward_after_ms: 300,
        fetch_timeout_ms: 400,
        max_blocks_per_reply: 16,
        // Few, so state transfer is also served from the node's disk.
        blocks_in_memory: 8,
        // A join's proof costs microseconds here, not minutes.
        join_puzzle: openagi_crypto::poc::PuzzleParams {
            difficulty_bits: 4,
            memory_kib: 8,
            passes: 1,
        },
        ..Config::default()
    }
}

/// Which property a run broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// Correct replicas disagree, or a transaction took effect twice or
    /// forged: what f faults must never cause.
    Safety,
    /// Commits did not resume after the network healed.
    Liveness,
}

/// A safety or liveness violation, with the seed that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Seed of the run.
    pub seed: u64,
    /// Simulated time in milliseconds.
    pub at_ms: u64,
    /// Safety or liveness.
    pub kind: ViolationKind,
    /// What went wrong.
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ViolationKind::Safety => "safety",
            ViolationKind::Liveness => "liveness",
        };
        write!(
            f,
            "seed {} at {} ms: {kind}: {}",
            self.seed, self.at_ms, self.what
        )
    }
}

struct Node {
    index: usize,
    identity: Rc<Identity>,
    replica: Option<Replica<MemoSigner>>,
    persisted: PersistedState,
    fault: Fault,
    /// Node ids this node can exchange messages with (twins only).
    reach: Option<Vec<bool>>,
    /// Stopped without losing anything: messages wait in `held`.
    paused: bool,
    held: Vec<Message>,
    /// Messages seen, for replaying (bounded).
    recorded: Vec<Message>,
    /// How far this node's clock runs ahead of simulated time.
    clock_offset: u64,
    applied: HashSet<(ClientId, u64)>,
    /// Left the validator set (its replica retired).
    retired: bool,
    /// What committed blocks did to the membership, as this node saw it.
    membership: Vec<(u64, openagi_consensus::membership::BlockEffects)>,
}

struct Client {
    id: ClientId,
    next_seq: u64,
    /// Unapplied transactions and when they were last sent.
    outstanding: BTreeMap<u64, (Transaction, u64)>,
}

#[derive(Clone, Debug)]
enum Event {
    Deliver { to: usize, message: Box<Message> },
    Request { to: usize, tx: Transaction },
}

/// The simulated network and its replicas.
pub struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    validators: ValidatorSet,
    memo: VerifiedMemo,
    nodes: Vec<Node>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    net: NetConfig,
    partition: Option<Vec<u8>>,
    /// Group per node id ([`Action::PartitionNodes`]).
    node_partition: Option<Vec<u8>>,
    blocked_kind: Option<&'static str>,
    schedule: Vec<(u64, Action)>,
    clients: Vec<Client>,
    client_payloads: HashMap<(ClientId, u64), Vec<u8>>,
    byzantine_client: Option<ClientId>,
    next_client_round: u64,
    committed: BTreeMap<u64, Hash>,
    violation: Option<Violation>,
    next_submitted: u64,
    /// Evidence correct nodes saw, not yet submitted.
    evidence_seen: Vec<openagi_consensus::evidence::Equivocation>,
    /// Offenders whose evidence was submitted.
    evidence_reported: HashSet<PublicKey>,
}

/// Mirror of the envelope's encoding, to build tampered envelopes the way
/// an attacker on the wire could.
#[derive(Serialize, Deserialize)]
struct RawSigned {
    signer: PublicKey,
    payload: Vec<u8>,
    signature: Signature,
}

fn tamper<T: SignedPayload>(
    signed: &Signed<T>,
    edit: impl FnOnce(&mut RawSigned),
) -> Option<Signed<T>> {
    let bytes = postcard::to_stdvec(signed).ok()?;
    let mut raw: RawSigned = postcard::from_bytes(&bytes).ok()?;
    edit(&mut raw);
    postcard::from_bytes(&postcard::to_stdvec(&raw).ok()?).ok()
}

fn flip_signature_bit(raw: &mut RawSigned) {
    raw.signature.0[7] ^= 0x10;
}

fn decode<T: SignedPayload>(signed: &Signed<T>) -> Option<T> {
    postcard::from_bytes(signed.payload_bytes()).ok()
}

impl Sim {
    /// Builds the network; validators get deterministic identities derived
    /// from the seed.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let identities: Vec<Rc<Identity>> = (0..cfg.n)
            .map(|_| {
                let mut seed = [0u8; 32];
                rng.fill(&mut seed);
                Rc::new(Identity::from_seed(&seed))
            })
            .collect();
        let network = NetworkId::from_name("sim");
        let keys = identities.iter().map(|i| i.public()).collect();
        // Distinct seeds give distinct keys with overwhelming probability;
        // the simulator is a test harness, so failing loudly is right here.
        #[allow(clippy::expect_used)]
        let validators = ValidatorSet::new(network, keys).expect("distinct simulated keys");
        let memo = VerifiedMemo::default();
        let total_nodes = cfg.n + cfg.twins.len();
        let mut nodes = Vec::new();
        for (index, identity) in identities.iter().enumerate() {
            let reach = cfg
                .twins
                .iter()
                .find(|(i, groups)| *i == index && !groups.is_empty())
                .map(|(_, groups)| groups.clone());
            nodes.push(Node {
                index,
                identity: identity.clone(),
                replica: None,
                persisted: PersistedState::default(),
                fault: cfg.faults.get(index).copied().unwrap_or(Fault::Correct),
                reach,
                paused: false,
                held: Vec::new(),
                recorded: Vec::new(),
                clock_offset: 0,
                applied: HashSet::new(),
                retired: false,
                membership: Vec::new(),
            });
        }
        for (index, groups) in &cfg.twins {
            let Some(identity) = identities.get(*index) else {
                continue;
            };
            let reach: Option<Vec<bool>> = (!groups.is_empty()).then(|| {
                (0..total_nodes)
                    .map(|i| !groups.get(i).copied().unwrap_or(false))
                    .collect()
            });
            nodes.push(Node {
                index: *index,
                identity: identity.clone(),
                replica: None,
                persisted: PersistedState::default(),
                fault: cfg.faults.get(*index).copied().unwrap_or(Fault::Correct),
                reach,
                paused: false,
                held: Vec::new(),
                recorded: Vec::new(),
                clock_offset: 0,
                applied: HashSet::new(),
                retired: false,
                membership: Vec::new(),
            });
        }
        // Seeded apart from the run's generator, so adding spares changes
        // nothing else in a run.
        let mut spare_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5350_4152_4553_0001);
        for spare in 0..cfg.spares {
            let mut seed = [0u8; 32];
            spare_rng.fill(&mut seed);
            nodes.push(Node {
                index: cfg.n + cfg.twins.len() + spare,
                identity: Rc::new(Identity::from_seed(&seed)),
                replica: None,
                persisted: PersistedState::default(),
                fault: Fault::Correct,
                reach: None,
                paused: false,
                held: Vec::new(),
                recorded: Vec::new(),
                clock_offset: 0,
                applied: HashSet::new(),
                retired: false,
                membership: Vec::new(),
            });
        }
        let clients = (0..cfg.clients)
            .map(|c| Client {
                id: ClientId([c as u8 + 1; 32]),
                next_seq: 1,
                outstanding: BTreeMap::new(),
            })
            .collect();
        let mut sim = Sim {
            net: cfg.net,
            rng,
            now: 0,
            validators,
            memo,
            nodes,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            partition: None,
            node_partition: None,
            blocked_kind: None,
            schedule: Vec::new(),
            clients,
            client_payloads: HashMap::new(),
            byzantine_client: cfg.byzantine_client.then_some(ClientId([0xbb; 32])),
            next_client_round: 0,
            committed: BTreeMap::new(),
            violation: None,
            next_submitted: 1,
            evidence_seen: Vec::new(),
            evidence_reported: HashSet::new(),
            cfg,
        };
        let skew = sim.cfg.clock_skew_ms;
        for node in sim.nodes.iter_mut() {
            node.clock_offset = sim.rng.random_range(0..=skew);
        }
        for id in 0..total_nodes {
            sim.start_node(id, false);
        }
        sim
    }

    /// The identity of node `id`.
    pub fn identity(&self, id: usize) -> Option<&Identity> {
        self.nodes.get(id).map(|n| n.identity.as_ref())
    }

    /// What committed blocks did to the membership, as node `id` saw it.
    pub fn membership_effects(
        &self,
        id: usize,
    ) -> &[(u64, openagi_consensus::membership::BlockEffects)] {
        self.nodes.get(id).map_or(&[], |n| n.membership.as_slice())
    }

    /// Sends a transaction with `payload` from a client of its own to
    /// every node, as a node forwarding an operator's request would.
    pub fn submit(&mut self, payload: Vec<u8>) {
        let seq = self.next_submitted;
        self.next_submitted += 1;
        let tx = Transaction {
            client: ClientId([0xee; 32]),
            seq,
            payload: payload.into(),
        };
        for to in 0..self.nodes.len() {
            self.enqueue(Event::Request { to, tx: tx.clone() }, self.net.min_delay_ms);
        }
    }

    /// Schedules `action` at simulated time `at_ms`.
    pub fn schedule(&mut self, at_ms: u64, action: Action) {
        self.schedule.push((at_ms, action));
        self.schedule.sort_by_key(|(t, _)| *t);
    }

    /// Current simulated time.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The first violation seen, if any.
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// Whether the validator at `index` is simulated as correct (twins and
    /// any fault make it faulty).
    pub fn is_correct(&self, index: usize) -> bool {
        self.cfg
            .faults
            .get(index)
            .copied()
            .unwrap_or(Fault::Correct)
            == Fault::Correct
            && !self.cfg.twins.iter().any(|(i, _)| *i == index)
    }

    /// Node ids of correct validators: those of genesis that have not
    /// left, and spares that joined.
    pub fn correct_nodes(&self) -> Vec<usize> {
        let spares = self.cfg.n + self.cfg.twins.len()..self.nodes.len();
        (0..self.cfg.n)
            .filter(|i| self.is_correct(*i))
            .chain(spares.filter(|i| self.replica(*i).is_some()))
            .filter(|i| self.nodes.get(*i).is_some_and(|n| !n.retired))
            .collect()
    }

    /// The replica of node `id`, if it is running.
    pub fn replica(&self, id: usize) -> Option<&Replica<MemoSigner>> {
        self.nodes.get(id).and_then(|n| n.replica.as_ref())
    }

    /// The blocks node `id` persisted, from height 1: its whole chain
    /// (the replica keeps only recent blocks in memory).
    pub fn stored_blocks(
        &self,
        id: usize,
    ) -> &[(
        openagi_consensus::Block,
        openagi_consensus::CommitCertificate,
    )] {
        self.nodes
            .get(id)
            .map_or(&[], |n| n.persisted.blocks.as_slice())
    }

    /// Ledger height of node `id` (0 if down).
    pub fn height(&self, id: usize) -> u64 {
        self.replica(id).map(|r| r.height()).unwrap_or(0)
    }

    /// Highest height any correct replica committed.
    pub fn committed_height(&self) -> u64 {
        self.committed.keys().next_back().copied().unwrap_or(0)
    }

    fn start_node(&mut self, id: usize, empty: bool) {
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        let signer = MemoSigner::new(node.identity.clone(), self.memo.clone());
        let state = if empty {
            PersistedState::default()
        } else {
            node.persisted.clone()
        };
        if empty {
            node.persisted = PersistedState::default();
            node.applied.clear();
        }
        let clock = self.now.saturating_add(node.clock_offset);
        let replica = Replica::restore(
            self.cfg.replica.clone(),
            self.validators.clone(),
            signer,
            state,
            clock,
        );
        match replica {
            Ok(r) => {
                node.applied = applied_keys(&node.persisted.blocks);
                node.replica = Some(r);
            }
            // A validator that left has no replica to restore; a spare
            // whose join has not taken effect yet has none either.
            Err(_) if node.retired => node.replica = None,
            Err(openagi_consensus::Error::NotInValidatorSet(_))
                if id >= self.cfg.n + self.cfg.twins.len() =>
            {
                node.replica = None;
            }
            Err(e) => {
                self.violation.get_or_insert(Violation {
                    seed: self.cfg.seed,
                    at_ms: self.now,
                    kind: ViolationKind::Safety,
                    what: format!("node {id} failed to restore: {e}"),
                });
            }
        }
    }

    fn recover_node(&mut self, id: usize) {
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        let signer = MemoSigner::new(node.identity.clone(), self.memo.clone());
        node.persisted = PersistedState::default();
        node.applied.clear();
        let clock = self.now.saturating_add(node.clock_offset);
        match Replica::recover_after_data_loss(
            self.cfg.replica.clone(),
            self.validators.clone(),
            signer,
            Vec::new(),
            clock,
        ) {
            Ok(r) => node.replica = Some(r),
            Err(e) => {
                self.violation.get_or_insert(Violation {
                    seed: self.cfg.seed,
                    at_ms: self.now,
                    kind: ViolationKind::Safety,
                    what: format!("node {id} failed to start recovery: {e}"),
                });
            }
        }
        self.drain(id);
    }

    fn reachable(&self, from: usize, to: usize) -> bool {
        if from == to {
            return false;
        }
        let (Some(a), Some(b)) = (self.nodes.get(from), self.nodes.get(to)) else {
            return false;
        };
        if let Some(reach) = &a.reach
            && !reach.get(to).copied().unwrap_or(false)
        {
            return false;
        }
        if let Some(reach) = &b.reach
            && !reach.get(from).copied().unwrap_or(false)
        {
            return false;
        }
        if let Some(groups) = &self.partition {
            let ga = groups.get(a.index).copied().unwrap_or(0);
            let gb = groups.get(b.index).copied().unwrap_or(0);
            if ga != gb {
                return false;
            }
        }
        if let Some(groups) = &self.node_partition
            && groups.get(from).copied().unwrap_or(0) != groups.get(to).copied().unwrap_or(0)
        {
            return false;
        }
        true
    }

    fn enqueue(&mut self, event: Event, delay_lo: u64) {
        let delay = self
            .rng
            .random_range(delay_lo..=self.net.max_delay_ms.max(delay_lo));
        let id = self.next_event;
        self.next_event += 1;
        self.queue
            .push(Reverse((self.now.saturating_add(delay), id)));
        self.events.insert(id, event);
    }

    /// Puts a message on the wire from node `from` to node `to`, subject
    /// to partitions, loss, duplication and delay.
    fn transmit(&mut self, from: usize, to: usize, message: Message) {
        if !self.reachable(from, to) {
            return;
        }
        if self.blocked_kind == Some(message.kind()) {
            return;
        }
        if self.rng.random_bool(self.net.drop.clamp(0.0, 1.0)) {
            return;
        }
        let copies = if self.rng.random_bool(self.net.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.enqueue(
                Event::Deliver {
                    to,
                    message: Box::new(message.clone()),
                },
                self.net.min_delay_ms,
            );
        }
    }

    fn targets(&self, from: usize, to: &Recipient) -> Vec<usize> {
        match to {
            // As a node does: every other member of the sender's set (the
            // genesis set while it runs no replica).
            Recipient::All => {
                let members = self
                    .nodes
                    .get(from)
                    .and_then(|n| n.replica.as_ref())
                    .map_or_else(
                        || self.validators.members().to_vec(),
                        |r| r.validators().members().to_vec(),
                    );
                (0..self.nodes.len())
                    .filter(|i| {
                        *i != from
                            && self
                                .nodes
                                .get(*i)
                                .is_some_and(|n| members.contains(&n.identity.public()))
                    })
                    .collect()
            }
            Recipient::One(key) => (0..self.nodes.len())
                .filter(|i| {
                    *i != from
                        && self
                            .nodes
                            .get(*i)
                            .is_some_and(|n| n.identity.public() == *key)
                })
                .collect(),
        }
    }

    /// Drains a node's outputs in order: persist records are folded into
    /// its durable state before any later message leaves, as the contract
    /// requires.
    fn drain(&mut self, id: usize) {
        self.drain_outputs(id);
        if !self.evidence_seen.is_empty() {
            self.report_evidence();
        }
    }

    /// Builds and submits node `id`'s join (`true`) or leave, against the
    /// membership of the correct replica with the longest chain.
    fn request_membership(&mut self, id: usize, join: bool) {
        use openagi_consensus::membership::{JoinRequest, LeaveRequest, MembershipRequest};
        let Some(reference) = self
            .correct_nodes()
            .into_iter()
            .filter_map(|i| self.replica(i))
            .max_by_key(|r| r.height())
            .map(|r| r.membership().clone())
        else {
            return;
        };
        let Some(identity) = self.nodes.get(id).map(|n| n.identity.clone()) else {
            return;
        };
        let network = reference.epoch().validators.network();
        let request = if join {
            let Some((anchor_height, anchor_hash)) = reference.anchor() else {
                return;
            };
            let public = identity.public();
            let input = openagi_crypto::poc::PuzzleInput {
                public_key: &public,
                network_id: &network.0,
                anchor_height,
                anchor_hash: &anchor_hash,
            };
            let cancel = std::sync::atomic::AtomicBool::new(false);
            let Ok(Some(nonce)) =
                openagi_crypto::poc::solve(&input, *reference.params(), 1, 0, &|_| {}, &cancel)
            else {
                return;
            };
            Signed::sign(
                &identity,
                &JoinRequest {
                    network,
                    anchor_height,
                    anchor_hash,
                    nonce,
                },
            )
            .map(MembershipRequest::Join)
        } else {
            Signed::sign(
                &identity,
                &LeaveRequest {
                    network,
                    epoch: reference.epoch().number,
                },
            )
            .map(MembershipRequest::Leave)
        };
        if let Some(payload) = request.ok().and_then(|r| r.to_payload().ok()) {
            self.submit(payload);
        }
    }

    /// Submits evidence correct nodes saw, once per offender.
    fn report_evidence(&mut self) {
        use openagi_consensus::evidence::Equivocation;
        for evidence in std::mem::take(&mut self.evidence_seen) {
            let offender = match &evidence {
                Equivocation::Prepares(a, _) => *a.signer(),
                Equivocation::Commits(a, _) => *a.signer(),
            };
            if !self.evidence_reported.insert(offender) {
                continue;
            }
            if let Ok(payload) = evidence.to_removal_payload() {
                self.submit(payload);
            }
        }
    }

    fn drain_outputs(&mut self, id: usize) {
        loop {
            let Some(node) = self.nodes.get_mut(id) else {
                return;
            };
            let Some(replica) = node.replica.as_mut() else {
                return;
            };
            let Some(output) = replica.poll_output() else {
                return;
            };
            match output {
                Output::Persist(record) => node.persisted.apply(&record),
                Output::Send { to, message } => {
                    let targets = self.targets(id, &to);
                    self.send_from(id, targets, message);
                }
                Output::Committed {
                    block,
                    applied,
                    tx_hashes,
                    ..
                } => {
                    // The hashes reported with a block are what the node's
                    // transaction index and API rely on.
                    let reported_right = tx_hashes.len() == block.txs.len()
                        && block
                            .txs
                            .iter()
                            .zip(tx_hashes.iter())
                            .all(|(t, h)| t.hash() == *h);
                    if !reported_right {
                        let what = format!(
                            "replica {} reported wrong transaction hashes at height {}",
                            node.index, block.height
                        );
                        self.violation.get_or_insert(Violation {
                            seed: self.cfg.seed,
                            at_ms: self.now,
                            kind: ViolationKind::Safety,
                            what,
                        });
                    }
                    self.on_committed(id, block.height, block.hash(), applied)
                }
                Output::ViewInstalled { .. } => {}
                Output::Membership { height, effects } => node.membership.push((height, effects)),
                Output::EpochStarted { member, .. } => node.retired |= !member,
                // A correct node puts evidence on the ledger (once per
                // offender), when the run asks for it.
                Output::Evidence(evidence) => {
                    if self.cfg.report_evidence
                        && self
                            .cfg
                            .faults
                            .get(node.index)
                            .is_none_or(|f| *f == Fault::Correct)
                    {
                        self.evidence_seen.push(evidence);
                    }
                }
                Output::ReadBlocks { peer, from, last } => {
                    // The node's disk: what this replica persisted.
                    let first = usize::try_from(from.saturating_sub(1)).unwrap_or(usize::MAX);
                    let count = usize::try_from(last.saturating_sub(from) + 1).unwrap_or(0);
                    let blocks: Vec<_> = node
                        .persisted
                        .blocks
                        .iter()
                        .skip(first)
                        .take(count)
                        .cloned()
                        .collect();
                    let clock = self.now.saturating_add(node.clock_offset);
                    replica.handle_stored_blocks(&peer, blocks, clock);
                }
            }
        }
    }

    fn on_committed(&mut self, id: usize, height: u64, hash: Hash, applied: Vec<Transaction>) {
        let Some(node) = self.nodes.get(id) else {
            return;
        };
        let index = node.index;
        if !self.is_correct(index) {
            return;
        }
        match self.committed.get(&height) {
            Some(h) if *h != hash => {
                self.violation.get_or_insert(Violation {
                    seed: self.cfg.seed,
                    at_ms: self.now,
                    kind: ViolationKind::Safety,
                    what: format!("replica {index} committed a different block at height {height}"),
                });
            }
            Some(_) => {}
            None => {
                self.committed.insert(height, hash);
            }
        }
        for tx in applied {
            let key = tx.key();
            if let Some(expected) = self.client_payloads.get(&key)
                && *expected != tx.payload
            {
                self.violation.get_or_insert(Violation {
                    seed: self.cfg.seed,
                    at_ms: self.now,
                    kind: ViolationKind::Safety,
                    what: format!("replica {index} applied a forged transaction {:?}", tx.seq),
                });
            }
            if let Some(node) = self.nodes.get_mut(id)
                && !node.applied.insert(key)
            {
                self.violation.get_or_insert(Violation {
                    seed: self.cfg.seed,
                    at_ms: self.now,
                    kind: ViolationKind::Safety,
                    what: format!("replica {index} applied transaction {:?} twice", tx.seq),
                });
            }
            for client in &mut self.clients {
                if client.id == key.0 {
                    client.outstanding.remove(&key.1);
                }
            }
        }
    }

    /// Sends `honest` to the even-numbered targets and `alt` to the odd
    /// ones: the two halves see conflicting messages from one signer.
    fn equivocate(&mut self, id: usize, targets: Vec<usize>, honest: &Message, alt: &Message) {
        for to in targets {
            let m = if to % 2 == 0 { honest } else { alt };
            self.transmit(id, to, m.clone());
        }
    }

    /// Sends `message` from node `id` to `targets`, letting a faulty node
    /// rewrite it first.
    fn send_from(&mut self, id: usize, targets: Vec<usize>, message: Message) {
        let Some(node) = self.nodes.get(id) else {
            return;
        };
        let fault = node.fault;
        let identity = node.identity.clone();
        let network = self.validators.network();
        let signer = MemoSigner::new(identity, self.memo.clone());
        match (fault, &message) {
            (Fault::Silent, _) => {}
            (Fault::EquivocatingPrimary, Message::PrePrepare { pre_prepare, batch }) => {
                let Some(pp) = decode(pre_prepare) else {
                    return;
                };
                let mut other = batch.clone();
                other.txs.reverse();
                other.txs.push(Transaction {
                    client: ClientId([0xee; 32]),
                    seq: pp.seq,
                    payload: self.rng.random::<[u8; 8]>().to_vec().into(),
                });
                let alt = PrePrepare {
                    digest: other.digest(),
                    ..pp
                };
                let Ok(alt_signed) = signer.seal(&alt) else {
                    return;
                };
                let alt = Message::PrePrepare {
                    pre_prepare: alt_signed,
                    batch: other,
                };
                self.equivocate(id, targets, &message, &alt);
            }
            (Fault::DoubleVoter, Message::Prepare(s)) => {
                let Some(p) = decode(s) else { return };
                let forged = Prepare {
                    digest: self.rng.random(),
                    ..p
                };
                let Ok(alt) = signer.seal(&forged) else {
                    return;
                };
                self.equivocate(id, targets, &message, &Message::Prepare(alt));
            }
            (Fault::DoubleVoter, Message::Commit(s)) => {
                let Some(c) = decode(s) else { return };
                let forged = Commit {
                    digest: self.rng.random(),
                    ..c
                };
                let Ok(alt) = signer.seal(&forged) else {
                    return;
                };
                self.equivocate(id, targets, &message, &Message::Commit(alt));
            }
            (Fault::ForgedViewChange, Message::NewView(s)) => {
                let Some(nv) = decode(s) else { return };
                let forged = self.forge_new_view(nv, &signer);
                for to in targets {
                    if let Some(m) = &forged {
                        self.transmit(id, to, Message::NewView(m.clone()));
                    }
                }
            }
            (Fault::ForgedViewChange, Message::ViewChange(s)) => {
                let Some(vc) = decode(s) else { return };
                let forged = self.forge_view_change(vc, &signer);
                for to in targets {
                    self.transmit(id, to, message.clone());
                    if let Some(m) = &forged {
                        self.transmit(id, to, Message::ViewChange(m.clone()));
                    }
                }
            }
            (Fault::GapPrimary, Message::PrePrepare { pre_prepare, batch }) => {
                let Some(pp) = decode(pre_prepare) else {
                    return;
                };
                let message = if self.rng.random_bool(0.5) {
                    let shifted = PrePrepare {
                        seq: pp.seq.saturating_add(1),
                        ..pp
                    };
                    let Ok(signed) = signer.seal(&shifted) else {
                        return;
                    };
                    Message::PrePrepare {
                        pre_prepare: signed,
                        batch: batch.clone(),
                    }
                } else {
                    message.clone()
                };
                for to in targets {
                    self.transmit(id, to, message.clone());
                }
            }
            (Fault::ViewInflater, Message::Status(s)) => {
                let Some(status) = decode(s) else { return };
                let ahead = status.view.saturating_add(self.rng.random_range(1..40));
                let vc = ViewChange {
                    network,
                    new_view: ahead,
                    checkpoint: openagi_consensus::messages::CheckpointProof {
                        seq: 0,
                        state: openagi_consensus::types::genesis_hash(network),
                        messages: Vec::new(),
                    },
                    prepared: Vec::new(),
                };
                let vc = signer.seal(&vc).ok();
                for to in targets {
                    self.transmit(id, to, message.clone());
                    if let Some(vc) = &vc {
                        self.transmit(id, to, Message::ViewChange(vc.clone()));
                    }
                }
            }
            (Fault::LyingServer, Message::Status(s)) => {
                let Some(status) = decode(s) else { return };
                let lie = Status {
                    height: status.height.saturating_add(1_000),
                    ..status
                };
                let Ok(lie) = signer.seal(&lie) else { return };
                for to in targets {
                    self.transmit(id, to, Message::Status(lie.clone()));
                }
            }
            (Fault::LyingServer, Message::Blocks(s)) => {
                let Some(mut reply) = decode(s) else { return };
                for (block, _) in reply.blocks.iter_mut() {
                    block.txs.push(Transaction {
                        client: ClientId([0xfb; 32]),
                        seq: block.height,
                        payload: b"forged".to_vec().into(),
                    });
                    block.batch_root = openagi_consensus::types::batch_root(&block.txs);
                }
                let Ok(lie) = signer.seal(&reply) else { return };
                for to in targets {
                    self.transmit(id, to, Message::Blocks(lie.clone()));
                }
            }
            (Fault::Replayer, Message::Status(_)) => {
                // Alongside each status: replay a few recorded messages and
                // forge a checkpoint.
                let replays: Vec<Message> = {
                    let node = &self.nodes[id];
                    let len = node.recorded.len();
                    (0..4)
                        .filter_map(|_| {
                            if len == 0 {
                                None
                            } else {
                                node.recorded.get(self.rng.random_range(0..len)).cloned()
                            }
                        })
                        .collect()
                };
                let height = self.committed_height();
                let k = self.cfg.replica.checkpoint_interval;
                let seq = (height / k + 1) * k;
                let lie = Checkpoint {
                    network,
                    seq,
                    state: self.rng.random(),
                };
                let lie = signer.seal(&lie).ok();
                let tampered = lie.as_ref().and_then(|l| tamper(l, flip_signature_bit));
                for to in targets {
                    self.transmit(id, to, message.clone());
                    for r in &replays {
                        self.transmit(id, to, r.clone());
                    }
                    if let Some(l) = &lie {
                        self.transmit(id, to, Message::Checkpoint(l.clone()));
                    }
                    if let Some(t) = &tampered {
                        self.transmit(id, to, Message::Checkpoint(t.clone()));
                    }
                }
            }
            _ => {
                for to in targets {
                    self.transmit(id, to, message.clone());
                }
            }
        }
    }

    /// A new view that drops every prepared batch (replacing them with
    /// nulls), or counts one view change twice, or carries a tampered view
    /// change: each must be refused by correct backups.
    fn forge_new_view(&mut self, mut nv: NewView, signer: &MemoSigner) -> Option<Signed<NewView>> {
        match self.rng.random_range(0..3u8) {
            0 => {
                let mut forged = Vec::new();
                for pp in &nv.pre_prepares {
                    let p = decode(pp)?;
                    let null = Batch::null(nv.view);
                    forged.push(
                        signer
                            .seal(&PrePrepare {
                                digest: null.digest(),
                                ..p
                            })
                            .ok()?,
                    );
                }
                if forged.is_empty() {
                    // Nothing to drop: claim a batch nobody prepared.
                    let null = Batch::null(nv.view.saturating_add(7));
                    let seq = 1;
                    forged.push(
                        signer
                            .seal(&PrePrepare {
                                network: nv.network,
                                view: nv.view,
                                seq,
                                digest: null.digest(),
                            })
                            .ok()?,
                    );
                }
                nv.pre_prepares = forged;
            }
            1 => {
                if let Some(first) = nv.view_changes.first().cloned() {
                    nv.view_changes.pop();
                    nv.view_changes.push(first);
                }
            }
            _ => {
                if let Some(last) = nv.view_changes.pop() {
                    let raw_edit = |raw: &mut RawSigned| {
                        if let Some(b) = raw.payload.last_mut() {
                            *b ^= 1;
                        }
                    };
                    if let Some(t) = tamper(&last, raw_edit) {
                        nv.view_changes.push(t);
                    }
                }
            }
        }
        signer.seal(&nv).ok()
    }

    /// A view change claiming a batch prepared that nobody prepared: the
    /// prepares are the faulty node's own votes under other signers' names,
    /// so their signatures fail.
    fn forge_view_change(
        &mut self,
        mut vc: ViewChange,
        signer: &MemoSigner,
    ) -> Option<Signed<ViewChange>> {
        let seq = vc.checkpoint.seq.saturating_add(1);
        let view = vc.new_view.saturating_sub(1);
        let batch = Batch {
            proposed_view: view,
            timestamp: self.now,
            txs: vec![Transaction {
                client: ClientId([0xfa; 32]),
                seq: 1,
                payload: b"forged".to_vec().into(),
            }],
        };
        let digest = batch.digest();
        let pp = signer
            .seal(&PrePrepare {
                network: vc.network,
                view,
                seq,
                digest,
            })
            .ok()?;
        let own = signer
            .seal(&Prepare {
                network: vc.network,
                view,
                seq,
                digest,
            })
            .ok()?;
        let members: Vec<PublicKey> = self.validators.members().to_vec();
        let prepares: Vec<Signed<Prepare>> = members
            .into_iter()
            .filter_map(|key| tamper(&own, |raw| raw.signer = key))
            .collect();
        vc.prepared
            .retain(|p| decode(&p.pre_prepare).is_some_and(|x| x.seq != seq));
        vc.prepared.insert(
            0,
            openagi_consensus::messages::PreparedProof {
                pre_prepare: pp,
                batch,
                prepares,
            },
        );
        signer.seal(&vc).ok()
    }

    fn deliver(&mut self, to: usize, message: Message) {
        let Some(node) = self.nodes.get_mut(to) else {
            return;
        };
        if node.fault == Fault::Replayer && node.recorded.len() < 2_000 {
            node.recorded.push(message.clone());
        }
        if node.paused {
            if node.replica.is_some() && node.held.len() < PAUSED_BACKLOG {
                node.held.push(message);
            }
            return;
        }
        let Some(replica) = node.replica.as_mut() else {
            return;
        };
        replica.handle_message(message, self.now.saturating_add(node.clock_offset));
        self.drain(to);
    }

    fn apply_action(&mut self, action: Action) {
        match action {
            Action::Crash(id) => {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.replica = None;
                }
            }
            Action::Restart(id) => self.start_node(id, false),
            Action::RequestJoin(id) => self.request_membership(id, true),
            Action::RequestLeave(id) => self.request_membership(id, false),
            Action::StartJoined(id) => {
                let source = self
                    .correct_nodes()
                    .into_iter()
                    .filter(|i| *i != id)
                    .max_by_key(|i| self.nodes.get(*i).map_or(0, |n| n.persisted.blocks.len()));
                let blocks = source
                    .and_then(|i| self.nodes.get(i))
                    .map(|n| n.persisted.blocks.clone())
                    .unwrap_or_default();
                if let Some(node) = self.nodes.get_mut(id) {
                    node.persisted = PersistedState {
                        blocks,
                        ..PersistedState::default()
                    };
                }
                self.start_node(id, false);
            }
            Action::RestartEmpty(id) => self.start_node(id, true),
            Action::RecoverEmpty(id) => self.recover_node(id),
            Action::Partition(groups) => self.partition = Some(groups),
            Action::PartitionNodes(groups) => self.node_partition = Some(groups),
            Action::HealPartition => {
                self.partition = None;
                self.node_partition = None;
            }
            Action::Pause(id) => {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.paused = true;
                }
            }
            Action::Resume(id) => self.resume_node(id),
            Action::SetNet(net) => self.net = net,
            Action::BlockKind(kind) => self.blocked_kind = kind,
        }
    }

    fn resume_node(&mut self, id: usize) {
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        node.paused = false;
        let held = std::mem::take(&mut node.held);
        for message in held {
            self.deliver(id, message);
        }
    }

    fn client_round(&mut self) {
        let now = self.now;
        let live: Vec<usize> = (0..self.nodes.len()).collect();
        let mut submissions: Vec<Transaction> = Vec::new();
        let load = now < self.cfg.load_until_ms;
        let resend_after = 1_000;
        for c in 0..self.clients.len() {
            let Some(client) = self.clients.get_mut(c) else {
                continue;
            };
            if load && client.outstanding.len() < self.cfg.client_window {
                let seq = client.next_seq;
                client.next_seq += 1;
                let payload = format!("c{c}-{seq}").into_bytes();
                let tx = Transaction {
                    client: client.id,
                    seq,
                    payload: payload.into(),
                };
                self.client_payloads.insert(tx.key(), tx.payload.to_vec());
                client.outstanding.insert(seq, (tx.clone(), now));
                submissions.push(tx);
            }
            for (tx, last) in client.outstanding.values_mut() {
                if now.saturating_sub(*last) >= resend_after {
                    *last = now;
                    submissions.push(tx.clone());
                }
            }
        }
        if load && let Some(id) = self.byzantine_client {
            // Reuses a handful of sequence numbers with fresh payloads,
            // different ones to different replicas.
            let seq = self.rng.random_range(1..=4u64);
            for to in &live {
                let payload = self.rng.random::<[u8; 6]>().to_vec();
                let tx = Transaction {
                    client: id,
                    seq,
                    payload: payload.into(),
                };
                self.enqueue(Event::Request { to: *to, tx }, self.net.min_delay_ms);
            }
        }
        for tx in submissions {
            for to in &live {
                if self.rng.random_bool(self.net.drop.clamp(0.0, 1.0)) {
                    continue;
                }
                self.enqueue(
                    Event::Request {
                        to: *to,
                        tx: tx.clone(),
                    },
                    self.net.min_delay_ms,
                );
            }
        }
    }

    /// Runs the simulation until `until_ms`, checking invariants after
    /// every step; stops early on a violation.
    pub fn run_until(&mut self, until_ms: u64) -> Result<(), Violation> {
        while self.now < until_ms {
            if let Some(v) = &self.violation {
                return Err(v.clone());
            }
            let next_tick = self.now.saturating_add(self.cfg.tick_ms);
            while let Some(Reverse((at, id))) = self.queue.peek().copied() {
                if at > next_tick {
                    break;
                }
                self.queue.pop();
                self.now = self.now.max(at);
                let Some(event) = self.events.remove(&id) else {
                    continue;
                };
                match event {
                    Event::Deliver { to, message } => self.deliver(to, *message),
                    Event::Request { to, tx } => {
                        // A paused node's clients time out and resend.
                        if let Some(node) = self.nodes.get_mut(to)
                            && !node.paused
                            && let Some(replica) = node.replica.as_mut()
                        {
                            // Refusals (duplicates, full buffers) are the
                            // replica's business and counted there.
                            let clock = self.now.saturating_add(node.clock_offset);
                            let _ = replica.handle_request(tx, clock);
                            self.drain(to);
                        }
                    }
                }
                if self.violation.is_some() {
                    break;
                }
            }
            self.now = next_tick;
            while let Some((at, _)) = self.schedule.first() {
                if *at > self.now {
                    break;
                }
                let (_, action) = self.schedule.remove(0);
                self.apply_action(action);
            }
            if self.now >= self.next_client_round {
                self.next_client_round = self.now.saturating_add(self.cfg.client_interval_ms);
                self.client_round();
            }
            for id in 0..self.nodes.len() {
                if let Some(node) = self.nodes.get_mut(id)
                    && !node.paused
                    && let Some(replica) = node.replica.as_mut()
                {
                    replica.handle_tick(self.now.saturating_add(node.clock_offset));
                    self.drain(id);
                }
            }
        }
        match &self.violation {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }

    /// Liveness: every correct client's transaction has taken effect on
    /// every running correct replica, and they all reached at least
    /// `min_height`.
    pub fn check_liveness(&self, min_height: u64) -> Result<(), Violation> {
        let fail = |what: String| {
            Err(Violation {
                seed: self.cfg.seed,
                at_ms: self.now,
                kind: ViolationKind::Liveness,
                what,
            })
        };
        for client in &self.clients {
            if let Some((seq, _)) = client.outstanding.iter().next() {
                return fail(format!("client transaction {seq} never took effect"));
            }
        }
        for id in self.correct_nodes() {
            let Some(replica) = self.replica(id) else {
                continue;
            };
            if replica.height() < min_height {
                return fail(format!(
                    "replica {id} stuck at height {} (view {}, changing {}), wanted {min_height}",
                    replica.height(),
                    replica.view(),
                    replica.is_changing_view()
                ));
            }
        }
        let all_payloads: Vec<&(ClientId, u64)> = self.client_payloads.keys().collect();
        for id in self.correct_nodes() {
            let Some(node) = self.nodes.get(id) else {
                continue;
            };
            if node.replica.is_none() {
                continue;
            }
            for key in &all_payloads {
                if !node.applied.contains(key) {
                    return fail(format!(
                        "replica {id} is missing client transaction {}",
                        key.1
                    ));
                }
            }
        }
        Ok(())
    }

    /// Heals the network, stops new load apart from one probe transaction
    /// per correct client (so commits must resume), and runs until every
    /// correct replica holds the same ledger with every correct client's
    /// transaction in it, or `max_ms` pass; the latter is a liveness
    /// violation.
    pub fn heal_and_settle(&mut self, max_ms: u64) -> Result<(), Violation> {
        let start = self.now;
        self.partition = None;
        self.node_partition = None;
        self.blocked_kind = None;
        let paused: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes.get(*i).is_some_and(|n| n.paused))
            .collect();
        for id in paused {
            self.resume_node(id);
        }
        self.net = NetConfig::clean();
        self.cfg.load_until_ms = start;
        let target = self.committed_height().saturating_add(1);
        self.submit_probes();
        let deadline = start.saturating_add(max_ms);
        loop {
            let step = self.now.saturating_add(250).min(deadline);
            self.run_until(step)?;
            if self.check_liveness(target).is_ok() && self.correct_heights_equal() {
                return self.check_agreement();
            }
            if self.now >= deadline {
                self.check_liveness(target)?;
                return self.check_agreement();
            }
        }
    }

    fn correct_heights_equal(&self) -> bool {
        let heights: HashSet<u64> = self
            .correct_nodes()
            .iter()
            .filter_map(|i| self.replica(*i))
            .map(|r| r.height())
            .collect();
        heights.len() <= 1
    }

    fn submit_probes(&mut self) {
        let now = self.now;
        let mut probes = Vec::new();
        for (c, client) in self.clients.iter_mut().enumerate() {
            let seq = client.next_seq;
            client.next_seq += 1;
            let tx = Transaction {
                client: client.id,
                seq,
                payload: format!("probe{c}-{seq}").into_bytes().into(),
            };
            client.outstanding.insert(seq, (tx.clone(), now));
            probes.push(tx);
        }
        for tx in probes {
            self.client_payloads.insert(tx.key(), tx.payload.to_vec());
            for to in 0..self.nodes.len() {
                self.enqueue(Event::Request { to, tx: tx.clone() }, self.net.min_delay_ms);
            }
        }
    }

    /// All running correct replicas hold identical chains up to the shortest.
    pub fn check_agreement(&self) -> Result<(), Violation> {
        let ids = self.correct_nodes();
        let heights: Vec<u64> = ids
            .iter()
            .filter_map(|i| self.replica(*i))
            .map(|r| r.height())
            .collect();
        let Some(min) = heights.iter().min().copied() else {
            return Ok(());
        };
        let mut reference: Option<Hash> = None;
        for id in ids {
            let Some(replica) = self.replica(id) else {
                continue;
            };
            // The whole chain is on the node's disk; the replica keeps
            // only recent blocks in memory.
            let hash = match min {
                0 => replica.ledger().hash_at(0),
                _ => self.nodes.get(id).and_then(|n| {
                    n.persisted
                        .blocks
                        .get(usize::try_from(min - 1).ok()?)
                        .map(|(b, _)| b.hash())
                }),
            };
            match (reference, hash) {
                (None, Some(h)) => reference = Some(h),
                (Some(r), Some(h)) if r != h => {
                    return Err(Violation {
                        seed: self.cfg.seed,
                        at_ms: self.now,
                        kind: ViolationKind::Safety,
                        what: format!("replica {id} disagrees at height {min}"),
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The parameters of this run: faults, twins, network, schedule.
    pub fn describe(&self) -> String {
        format!(
            "seed {} n {} faults {:?} twins {:?} byzantine client {} net {:?} schedule {:?}",
            self.cfg.seed,
            self.cfg.n,
            self.cfg.faults,
            self.cfg.twins,
            self.cfg.byzantine_client,
            self.cfg.net,
            self.schedule
        )
    }

    /// One line per node: height, view, stable checkpoint and counters;
    /// for diagnosing a failing seed.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (id, node) in self.nodes.iter().enumerate() {
            let line = match &node.replica {
                Some(r) => format!(
                    "node {id} (validator {}, {:?}): height {} view {}{} stable {} pending {} {:?}\n",
                    node.index,
                    node.fault,
                    r.height(),
                    r.view(),
                    if r.is_changing_view() {
                        " (changing)"
                    } else {
                        ""
                    },
                    r.stable_seq(),
                    r.pending_len(),
                    r.stats()
                ),
                None => format!("node {id} (validator {}): down\n", node.index),
            };
            out.push_str(&line);
        }
        out
    }

    /// The view each validator's first node is in.
    pub fn views(&self) -> Vec<u64> {
        (0..self.cfg.n)
            .map(|i| self.replica(i).map(|r| r.view()).unwrap_or(0))
            .collect()
    }
}

fn applied_keys(
    blocks: &[(
        openagi_consensus::Block,
        openagi_consensus::CommitCertificate,
    )],
) -> HashSet<(ClientId, u64)> {
    let mut scratch = Ledger::keeping(NetworkId([0; 32]), 1);
    let mut keys = HashSet::new();
    for (block, cert) in blocks {
        for tx in scratch.append(block.clone(), cert.clone()) {
            keys.insert(tx.key());
        }
    }
    keys
}

/// A randomized run for `seed`: n = 4 or 7, up to f faulty replicas of
/// random kinds, random loss/duplication, a random partition and crash,
/// then a healed network; returns the first violation.
pub fn random_run(seed: u64, duration_ms: u64) -> Result<(), Violation> {
    let mut sim = random_sim(seed, duration_ms);
    sim.run_until(duration_ms)?;
    sim.heal_and_settle(30_000)
}

/// The simulation [`random_run`] drives for `seed`, before it runs; for
/// re-running a failing seed and inspecting it ([`Sim::summary`]).
pub fn random_sim(seed: u64, duration_ms: u64) -> Sim {
    let mut pick = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_cafe);
    let n = if pick.random_bool(0.75) { 4 } else { 7 };
    let f = (n - 1) / 3;
    let mut cfg = SimConfig::new(seed, n);
    cfg.client_interval_ms = 200;
    let kinds = [
        Fault::EquivocatingPrimary,
        Fault::DoubleVoter,
        Fault::ForgedViewChange,
        Fault::Replayer,
        Fault::Silent,
        Fault::LyingServer,
        Fault::GapPrimary,
        Fault::ViewInflater,
    ];
    let faulty = pick.random_range(0..=f);
    let mut faults = vec![Fault::Correct; n];
    let mut crash_budget = f - faulty;
    for slot in faults.iter_mut().take(faulty) {
        *slot = kinds[pick.random_range(0..kinds.len())];
    }
    // Rotate so the faulty replicas are not always the first primaries.
    let shift = pick.random_range(0..n);
    faults.rotate_right(shift);
    // Sometimes one faulty replica is instead an identity run twice, each
    // copy talking to a random part of the network.
    if pick.random_bool(0.2)
        && let Some(twin) = (0..n).find(|i| faults[*i] != Fault::Correct)
    {
        faults[twin] = Fault::Correct;
        let reach: Vec<bool> = (0..=n)
            .map(|i| i == twin || (i < n && pick.random_bool(0.5)))
            .collect();
        cfg.twins = vec![(twin, reach)];
    }
    cfg.faults = faults.clone();
    cfg.byzantine_client = pick.random_bool(0.3);
    cfg.clock_skew_ms = if pick.random_bool(0.5) {
        pick.random_range(0..5_000)
    } else {
        0
    };
    cfg.net = if pick.random_bool(0.5) {
        NetConfig::lossy(pick.random_range(0.0..0.2), pick.random_range(0.0..0.1))
    } else {
        NetConfig::clean()
    };
    // Validator-set changes, from a generator of their own so that runs
    // without them are the runs they always were: evidence put on the
    // ledger (an equivocator removed), a node joining, a validator leaving
    // (only where one fewer still tolerates the faults).
    let mut churn = ChaCha8Rng::seed_from_u64(seed ^ 0xc4a5_9e00_0000_0001);
    cfg.report_evidence = churn.random_bool(0.5);
    let join_at = churn
        .random_bool(0.3)
        .then(|| churn.random_range(500..duration_ms.max(1_000) / 2));
    if join_at.is_some() {
        cfg.spares = 1;
    }
    let mut sim = Sim::new(cfg);
    if let Some(at) = join_at {
        let spare = sim.nodes.len() - 1;
        sim.schedule(at, Action::RequestJoin(spare));
        let mut start = at + 2_000;
        while start < duration_ms + 20_000 {
            sim.schedule(start, Action::StartJoined(spare));
            start += 2_000;
        }
    }
    if pick.random_bool(0.4) {
        let at = pick.random_range(0..duration_ms / 2);
        let groups: Vec<u8> = (0..n).map(|_| pick.random_range(0..2u8)).collect();
        sim.schedule(at, Action::Partition(groups));
        sim.schedule(
            at + pick.random_range(200..duration_ms / 2),
            Action::HealPartition,
        );
    }
    if crash_budget > 0
        && pick.random_bool(0.5)
        && let Some(victim) = (0..n).find(|i| sim.is_correct(*i))
    {
        let at = pick.random_range(0..duration_ms / 2);
        if pick.random_bool(0.3) {
            // Lose its state entirely and recover knowing so.
            sim.schedule(at, Action::RecoverEmpty(victim));
        } else {
            sim.schedule(at, Action::Crash(victim));
            sim.schedule(
                at + pick.random_range(100..duration_ms / 2),
                Action::Restart(victim),
            );
        }
        crash_budget -= 1;
    }
    let faults_left = faulty + (f - faulty - crash_budget);
    if churn.random_bool(0.3) && faults_left <= (n - 2) / 3 {
        let at = churn.random_range(duration_ms / 4..duration_ms.max(4) / 2);
        let correct: Vec<usize> = (0..n)
            .filter(|i| {
                sim.is_correct(*i)
                    && !sim.schedule.iter().any(
                        |(_, a)| matches!(a, Action::Crash(v) | Action::RecoverEmpty(v) if v == i),
                    )
            })
            .collect();
        if let Some(leaver) = correct.get(churn.random_range(0..correct.len().max(1))) {
            sim.schedule(at, Action::RequestLeave(*leaver));
        }
    }
    sim
}
