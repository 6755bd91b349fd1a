//! The structure-aware PBFT target: arbitrary sequences of events fed to
//! one replica, with messages validly signed by any validator.
//!
//! A byte decoder alone rarely gets past the signature check, so this
//! target builds its messages: each event reads an opcode and a few small
//! numbers (sender, view, sequence number, which batch) and the harness
//! signs the message with that validator's key. The other three of four
//! validators are all under the fuzzer's control, so it may legitimately
//! form quorums; what must hold whatever it sends is:
//! - the replica never panics;
//! - every block it reports committed verifies: it extends the previous
//!   one, and its certificate holds `2f + 1` distinct validators' commits
//!   for that block, checked with strict Ed25519 ([`verify_chain`]), so it
//!   never commits without a quorum;
//! - heights are reported once each, in order;
//! - the replica never signs two digests for one view and sequence number
//!   (its pre-prepares, prepares and commits all agree);
//! - what it persisted restores ([`Replica::restore`]) to the same height,
//!   so its records never contradict each other.

use openagi_consensus::messages::{
    Checkpoint, CheckpointProof, NewView, PrePrepare, Prepare, ViewChange,
};
use openagi_consensus::types::{Commit, genesis_hash};
use openagi_consensus::{
    Batch, Block, ClientId, CommitCertificate, Config, IdentitySigner, Message, NetworkId, Output,
    PersistedState, Replica, Transaction, ValidatorSet, verify_chain,
};
use openagi_crypto::{Identity, Signed, identity::SignedPayload};
use serde::Serialize;

/// Validators in the harness: n = 4, f = 1. The replica under test is
/// validator 0, the primary of view 0.
const N: usize = 4;
/// Views and sequence numbers the fuzzer picks from: small, so that its
/// messages meet the replica's window and each other.
const VIEWS: u64 = 4;
const SEQS: u64 = 12;
/// Most messages the replica sent that the harness keeps for re-signing.
const KEPT_SENT: usize = 64;
/// Most batches in the pool votes pick from.
const KEPT_BATCHES: usize = 32;
/// Most events one input runs.
const MAX_EVENTS: usize = 512;

/// What one run reached, for the seed test to check that the harness gets
/// deep (a target that never commits would test little).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reached {
    /// Blocks the replica committed.
    pub committed: u64,
    /// The view it ended in.
    pub view: u64,
    /// Its stable checkpoint at the end.
    pub stable: u64,
}

fn config() -> Config {
    Config {
        checkpoint_interval: 2,
        window: 4,
        max_batch_txs: 4,
        max_batch_bytes: 4 * 1024,
        max_batch_delay_ms: 5,
        max_tx_bytes: 512,
        view_change_timeout_ms: 200,
        max_view_change_timeout_ms: 1_600,
        retransmit_interval_ms: 100,
        status_interval_ms: 100,
        forward_after_ms: 100,
        fetch_timeout_ms: 100,
        max_blocks_per_reply: 4,
        blocks_in_memory: 2,
        ..Config::default()
    }
}

struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*first)
    }

    /// A number below `bound`, from one byte (0 past the end).
    fn below(&mut self, bound: u64) -> u64 {
        self.byte().map_or(0, |b| u64::from(b) % bound.max(1))
    }

    /// A length-prefixed run of raw bytes.
    fn chunk(&mut self) -> &[u8] {
        let len = usize::from(self.byte().unwrap_or(0)).min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }
}

struct Harness {
    network: NetworkId,
    identities: Vec<Identity>,
    validators: ValidatorSet,
    replica: Replica,
    persisted: PersistedState,
    now: u64,
    batches: Vec<Batch>,
    sent: Vec<Message>,
    view_changes: Vec<(u64, usize, Signed<ViewChange>)>,
    /// Every digest the replica signed, by (view, sequence number).
    votes: std::collections::HashMap<(u64, u64), openagi_consensus::Hash>,
    blocks: Vec<Block>,
    certificates: Vec<CommitCertificate>,
}

impl Harness {
    fn new() -> Self {
        let network = NetworkId::from_name("fuzz");
        let identities: Vec<Identity> = (1..=N as u8)
            .map(|i| Identity::from_seed(&[i; 32]))
            .collect();
        let validators =
            ValidatorSet::new(network, identities.iter().map(|i| i.public()).collect())
                .unwrap_or_else(|e| panic!("the harness's validator set: {e}"));
        let replica = Replica::new(
            config(),
            validators.clone(),
            IdentitySigner::new(Identity::from_seed(&[1; 32])),
            0,
        )
        .unwrap_or_else(|e| panic!("the harness's replica: {e}"));
        let tx = Transaction {
            client: ClientId([1; 32]),
            seq: 1,
            payload: b"fuzz".to_vec().into(),
        };
        Harness {
            network,
            identities,
            validators,
            replica,
            persisted: PersistedState::default(),
            now: 0,
            batches: vec![
                Batch::null(0),
                Batch {
                    proposed_view: 0,
                    timestamp: 1,
                    txs: vec![tx],
                },
            ],
            sent: Vec::new(),
            view_changes: Vec::new(),
            votes: std::collections::HashMap::new(),
            blocks: Vec::new(),
            certificates: Vec::new(),
        }
    }

    fn sign<T: SignedPayload + Serialize>(&self, sender: usize, payload: &T) -> Option<Signed<T>> {
        Signed::sign(self.identities.get(sender)?, payload).ok()
    }

    fn batch(&self, pick: u64) -> Batch {
        // The newest batches (what the replica proposed) are the likeliest
        // picks: index from the end.
        let index = self.batches.len().saturating_sub(1 + pick as usize);
        self.batches
            .get(index)
            .cloned()
            .unwrap_or_else(|| Batch::null(0))
    }

    fn event(&mut self, input: &mut Input<'_>) -> Option<()> {
        let op = input.byte()?;
        // Validators 1 to 3: the replica's own key stays its own.
        let sender = 1 + input.below(N as u64 - 1) as usize;
        let view = input.below(VIEWS);
        let seq = 1 + input.below(SEQS);
        let pick = input.below(8);
        let message = match op % 11 {
            0 => {
                self.now += 1 + u64::from(input.byte().unwrap_or(0)) * 8;
                self.replica.handle_tick(self.now);
                None
            }
            1 => {
                let tx = Transaction {
                    client: ClientId([sender as u8; 32]),
                    seq,
                    payload: vec![pick as u8; pick as usize].into(),
                };
                let _ = self.replica.handle_request(tx, self.now);
                None
            }
            2 => {
                let batch = self.batch(pick);
                let pp = PrePrepare {
                    network: self.network,
                    view,
                    seq,
                    digest: batch.digest(),
                };
                Some(Message::PrePrepare {
                    pre_prepare: self.sign(sender, &pp)?,
                    batch,
                })
            }
            3 => {
                let p = Prepare {
                    network: self.network,
                    view,
                    seq,
                    digest: self.batch(pick).digest(),
                };
                Some(Message::Prepare(self.sign(sender, &p)?))
            }
            4 => {
                let c = Commit {
                    network: self.network,
                    view,
                    seq,
                    digest: self.batch(pick).digest(),
                };
                Some(Message::Commit(self.sign(sender, &c)?))
            }
            5 => {
                // A checkpoint: of the real chain when the harness has that
                // block, otherwise of a made-up state.
                let at = seq - seq % 2;
                let state = match at {
                    0 => genesis_hash(self.network),
                    h => self
                        .blocks
                        .get(h as usize - 1)
                        .map_or([pick as u8; 32], |b| b.hash()),
                };
                let c = Checkpoint {
                    network: self.network,
                    seq: at,
                    state,
                };
                Some(Message::Checkpoint(self.sign(sender, &c)?))
            }
            6 => {
                let vc = ViewChange {
                    network: self.network,
                    new_view: view + 1,
                    checkpoint: CheckpointProof {
                        seq: 0,
                        state: genesis_hash(self.network),
                        messages: Vec::new(),
                    },
                    prepared: Vec::new(),
                };
                let signed = self.sign(sender, &vc)?;
                self.keep_view_change(view + 1, sender, signed.clone());
                Some(Message::ViewChange(signed))
            }
            7 => {
                // A new view from `sender` for the view the harness has
                // gathered the most view changes for: with empty prepared
                // sets and the genesis checkpoint it re-proposes nothing,
                // which is what a correct one looks like then.
                let target = view + 1;
                let mut from = Vec::new();
                for (v, s, signed) in &self.view_changes {
                    if *v == target && !from.iter().any(|(o, _)| o == s) {
                        from.push((*s, signed.clone()));
                    }
                }
                let nv = NewView {
                    network: self.network,
                    view: target,
                    view_changes: from.into_iter().map(|(_, s)| s).collect(),
                    pre_prepares: Vec::new(),
                };
                Some(Message::NewView(self.sign(sender, &nv)?))
            }
            8 => {
                // One of the replica's own messages (the newest first), its
                // payload re-signed by `sender`: votes and view changes as
                // another validator would send them, with real digests,
                // checkpoints and prepared proofs.
                let back = input.below(256) as usize % self.sent.len().max(1);
                let index = self.sent.len().checked_sub(1 + back)?;
                let original = self.sent.get(index)?.clone();
                let resigned = self.resign(original, sender)?;
                if let Message::ViewChange(vc) = &resigned
                    && let Ok(payload) = postcard::from_bytes::<ViewChange>(vc.payload_bytes())
                {
                    self.keep_view_change(payload.new_view, sender, vc.clone());
                }
                Some(resigned)
            }
            9 => {
                // One of the replica's own messages sent back unchanged.
                let back = input.below(256) as usize % self.sent.len().max(1);
                let index = self.sent.len().checked_sub(1 + back)?;
                self.sent.get(index).cloned()
            }
            _ => Message::decode(input.chunk(), 1 << 16).ok(),
        };
        if let Some(message) = message {
            self.replica.handle_message(message, self.now);
        }
        self.drain();
        Some(())
    }

    /// Keeps a view change for new views (op 7), newest kept.
    fn keep_view_change(&mut self, view: u64, sender: usize, signed: Signed<ViewChange>) {
        if self.view_changes.len() >= KEPT_SENT {
            self.view_changes.remove(0);
        }
        self.view_changes.push((view, sender, signed));
    }

    /// Checks that the replica's votes never conflict, then keeps the
    /// message (newest kept) for ops 8 and 9.
    fn note_sent(&mut self, message: Message) {
        let vote = match &message {
            Message::PrePrepare { pre_prepare, .. } => {
                postcard::from_bytes::<PrePrepare>(pre_prepare.payload_bytes())
                    .ok()
                    .map(|p| (p.view, p.seq, p.digest))
            }
            Message::Prepare(p) => postcard::from_bytes::<Prepare>(p.payload_bytes())
                .ok()
                .map(|p| (p.view, p.seq, p.digest)),
            Message::Commit(c) => postcard::from_bytes::<Commit>(c.payload_bytes())
                .ok()
                .map(|c| (c.view, c.seq, c.digest)),
            _ => None,
        };
        if let Some((view, seq, digest)) = vote {
            let earlier = self.votes.entry((view, seq)).or_insert(digest);
            assert_eq!(
                *earlier, digest,
                "the replica signed two digests for view {view}, sequence number {seq}"
            );
        }
        if self.sent.len() >= KEPT_SENT {
            self.sent.remove(0);
        }
        self.sent.push(message);
    }

    fn resign(&self, message: Message, sender: usize) -> Option<Message> {
        fn open<T: SignedPayload + serde::de::DeserializeOwned>(s: &Signed<T>) -> Option<T> {
            postcard::from_bytes(s.payload_bytes()).ok()
        }
        Some(match message {
            Message::PrePrepare { pre_prepare, batch } => Message::PrePrepare {
                pre_prepare: self.sign(sender, &open(&pre_prepare)?)?,
                batch,
            },
            Message::Prepare(p) => Message::Prepare(self.sign(sender, &open(&p)?)?),
            Message::Commit(c) => Message::Commit(self.sign(sender, &open(&c)?)?),
            Message::Checkpoint(c) => Message::Checkpoint(self.sign(sender, &open(&c)?)?),
            Message::ViewChange(v) => Message::ViewChange(self.sign(sender, &open(&v)?)?),
            other => other,
        })
    }

    fn drain(&mut self) {
        while let Some(output) = self.replica.poll_output() {
            match output {
                Output::Persist(record) => self.persisted.apply(&record),
                Output::Send { message, .. } => {
                    if let Message::PrePrepare { batch, .. } = &message {
                        if self.batches.len() >= KEPT_BATCHES {
                            // The two fixed batches stay; the oldest
                            // proposal goes.
                            self.batches.remove(2);
                        }
                        self.batches.push(batch.clone());
                    }
                    self.note_sent(message);
                }
                Output::Committed {
                    block, certificate, ..
                } => {
                    assert_eq!(
                        block.height,
                        self.blocks.len() as u64 + 1,
                        "a height reported out of order or twice"
                    );
                    self.blocks.push(block);
                    self.certificates.push(certificate);
                }
                Output::ReadBlocks { peer, from, last } => {
                    let stored: Vec<_> = self
                        .persisted
                        .blocks
                        .iter()
                        .filter(|(b, _)| b.height >= from && b.height <= last)
                        .cloned()
                        .collect();
                    self.replica.handle_stored_blocks(&peer, stored, self.now);
                }
                Output::ViewInstalled { .. }
                | Output::Evidence(_)
                | Output::Membership { .. }
                | Output::EpochStarted { .. } => {}
            }
        }
    }

    fn finish(self) -> Reached {
        // Every committed block verifies against the validator set, with
        // strict signatures: no commit without a quorum.
        if let Err(e) = verify_chain(&self.blocks, &self.certificates, &self.validators) {
            panic!("the replica committed a block that does not verify: {e}");
        }
        let reached = Reached {
            committed: self.blocks.len() as u64,
            view: self.replica.view(),
            stable: self.replica.stable_seq(),
        };
        let restored = Replica::restore(
            config(),
            self.validators.clone(),
            IdentitySigner::new(Identity::from_seed(&[1; 32])),
            self.persisted,
            self.now,
        )
        .unwrap_or_else(|e| panic!("what the replica persisted does not restore: {e}"));
        assert_eq!(
            restored.height(),
            self.replica.height(),
            "a restart would lose committed blocks"
        );
        reached
    }
}

/// Runs the events `data` encodes against one replica and checks the
/// properties in the module documentation; returns how far it got.
pub fn run_replica_events(data: &[u8]) -> Reached {
    let mut harness = Harness::new();
    let mut input = Input { data };
    for _ in 0..MAX_EVENTS {
        if harness.event(&mut input).is_none() {
            break;
        }
    }
    harness.finish()
}

/// An input that commits blocks: a client request, the replica's own
/// proposal, and prepares and commits from validators 1 and 2 for it,
/// then checkpoints. The seed corpus starts from it.
pub fn committing_seed() -> Vec<u8> {
    let mut data = Vec::new();
    for seq in 1..=4u8 {
        // request from client 1 with sequence number `seq`
        data.extend_from_slice(&[1, 1, 0, seq - 1, 1]);
        // tick past the batch delay: the replica proposes
        data.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
        for sender in 1..=2u8 {
            // validator `sender` re-signs the replica's newest message
            // (its pre-prepare or prepare ...) as a prepare and a commit
            data.extend_from_slice(&[3, sender, 0, seq - 1, 0]);
        }
        for sender in 1..=2u8 {
            data.extend_from_slice(&[4, sender, 0, seq - 1, 0]);
        }
    }
    for sender in 1..=2u8 {
        data.extend_from_slice(&[5, sender, 0, 3, 0]);
    }
    data
}
