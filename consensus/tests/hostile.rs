//! Hostile input is refused, counted, and changes nothing a correct
//! replica relies on: random bytes, bit-flipped messages, and validly
//! signed messages with extreme values. Afterwards the honest validators
//! still commit through the same replica.

use std::collections::BTreeSet;
use std::rc::Rc;

use openagi_consensus::messages::{
    BlocksReply, Checkpoint, CheckpointProof, Commit, FetchBlocks, Forward, NewView, PrePrepare,
    Prepare, Status, ViewChange,
};
use openagi_consensus::signing::{MemoSigner, Signer, VerifiedMemo};
use openagi_consensus::{
    Batch, Block, ClientId, CommitCertificate, Config, DropReason, Hash, Message, NetworkId,
    Output, Replica, Transaction, ValidatorSet,
};
use openagi_crypto::Identity;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Replica 1 under test, and signers for all four validators: replica 0 is
/// the view-0 primary and plays the attacker, 2 and 3 are honest.
fn setup() -> (Replica<MemoSigner>, Vec<MemoSigner>, ValidatorSet) {
    let memo = VerifiedMemo::default();
    let ids: Vec<Rc<Identity>> = (1..=4u8)
        .map(|i| Rc::new(Identity::from_seed(&[i; 32])))
        .collect();
    let vs = ValidatorSet::new(
        NetworkId::from_name("hostile"),
        ids.iter().map(|i| i.public()).collect(),
    )
    .expect("distinct");
    let replica = Replica::new(
        Config::default(),
        vs.clone(),
        MemoSigner::new(ids[1].clone(), memo.clone()),
        0,
    )
    .expect("member");
    let signers = ids
        .iter()
        .map(|id| MemoSigner::new(id.clone(), memo.clone()))
        .collect();
    (replica, signers, vs)
}

fn drain(replica: &mut Replica<MemoSigner>) -> Vec<Output> {
    std::iter::from_fn(|| replica.poll_output()).collect()
}

/// `(view, seq)` pairs.
type Slots = Vec<(u64, u64)>;

/// The `(view, seq)` of every prepare and commit the replica sent.
fn votes(outputs: &[Output]) -> (Slots, Slots) {
    let mut prepares = Vec::new();
    let mut commits = Vec::new();
    for o in outputs {
        match o {
            Output::Send {
                message: Message::Prepare(p),
                ..
            } => {
                let p = p.verify().expect("own prepare verifies");
                prepares.push((p.view, p.seq));
            }
            Output::Send {
                message: Message::Commit(c),
                ..
            } => {
                let c = c.verify().expect("own commit verifies");
                commits.push((c.view, c.seq));
            }
            _ => {}
        }
    }
    (prepares, commits)
}

/// Heights of the blocks the replica reported committed.
fn committed_heights(outputs: &[Output]) -> Vec<u64> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Committed { block, .. } => Some(block.height),
            _ => None,
        })
        .collect()
}

/// Honest replicas 2 and 3 prepare and commit `(view 0, seq, digest)`; the
/// replica under test must commit it as block `seq` and vote for it on the
/// way.
fn honest_quorum_commits(
    replica: &mut Replica<MemoSigner>,
    signers: &[MemoSigner],
    vs: &ValidatorSet,
    seq: u64,
    digest: Hash,
    now: u64,
) -> Vec<Output> {
    let network = vs.network();
    for honest in &signers[2..] {
        let p = honest
            .seal(&Prepare {
                network,
                view: 0,
                seq,
                digest,
            })
            .expect("sign");
        replica.handle_message(Message::Prepare(p), now);
    }
    let (_, commits) = votes(&drain(replica));
    assert_eq!(commits, [(0, seq)], "prepared: the replica commits");
    for honest in &signers[2..] {
        let c = honest
            .seal(&Commit {
                network,
                view: 0,
                seq,
                digest,
            })
            .expect("sign");
        replica.handle_message(Message::Commit(c), now);
    }
    drain(replica)
}

#[test]
fn random_bytes_and_bit_flips_are_all_refused_and_honest_progress_follows() {
    let (mut replica, signers, vs) = setup();
    let attacker = &signers[0];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let net = vs.network();
    let batch = Batch {
        proposed_view: 0,
        timestamp: 0,
        txs: vec![Transaction {
            client: ClientId([1; 32]),
            seq: 1,
            payload: vec![1, 2, 3].into(),
        }],
    };
    let digest = batch.digest();
    let pp = attacker
        .seal(&PrePrepare {
            network: net,
            view: 0,
            seq: 1,
            digest,
        })
        .expect("sign");
    let valid_message = Message::PrePrepare {
        pre_prepare: pp,
        batch,
    };
    let valid = valid_message.encode().expect("encode");

    const ROUNDS: u64 = 400;
    let mut undecodable = 0u64;
    let mut dropped = 0u64;
    let mut unchanged = 0u64;
    for round in 0..ROUNDS {
        let bytes: Vec<u8> = if round % 2 == 0 {
            let len = rng.random_range(0..200);
            (0..len).map(|_| rng.random()).collect()
        } else {
            let mut b = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            b
        };
        match Message::decode(&bytes, 1 << 20) {
            Err(_) => undecodable += 1,
            // Flips that cancel out give back the valid message: not
            // hostile, and not delivered here so it stays fresh.
            Ok(message) if message == valid_message => unchanged += 1,
            Ok(message) => {
                let before = replica.stats().total_dropped();
                replica.handle_message(message, round);
                assert_eq!(
                    replica.stats().total_dropped(),
                    before + 1,
                    "round {round}: a decodable hostile message is dropped and counted once"
                );
                dropped += 1;
            }
        }
        replica.handle_tick(round);
        let outputs = drain(&mut replica);
        assert_eq!(
            votes(&outputs),
            (vec![], vec![]),
            "round {round}: no vote for hostile input"
        );
        assert!(committed_heights(&outputs).is_empty());
    }
    assert_eq!(undecodable + dropped + unchanged, ROUNDS);
    assert!(undecodable > 0 && dropped > 0, "{undecodable} {dropped}");
    assert_eq!(replica.stats().messages_received, dropped);
    assert_eq!(replica.stats().total_dropped(), dropped);
    assert_eq!(replica.height(), 0);

    // The primary's real proposal still gets a vote, and with the honest
    // replicas it commits as block 1.
    replica.handle_message(valid_message, ROUNDS);
    let (prepares, _) = votes(&drain(&mut replica));
    assert_eq!(prepares, [(0, 1)], "the valid proposal is prepared");
    let outputs = honest_quorum_commits(&mut replica, &signers, &vs, 1, digest, ROUNDS);
    assert_eq!(committed_heights(&outputs), [1]);
    assert_eq!(replica.height(), 1);
    assert_eq!(replica.stats().blocks_committed, 1);
    assert_eq!(
        replica.stats().total_dropped(),
        dropped,
        "nothing honest dropped"
    );
}

/// What one extreme message was, for the checks after delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    PrePrepare,
    Prepare,
    Commit,
    Checkpoint,
    Status,
    FetchBlocks,
    ViewChange,
    NewView,
    Blocks,
    Forward,
}

#[test]
fn extreme_values_from_a_member_are_refused_and_honest_progress_follows() {
    let (mut replica, signers, vs) = setup();
    let attacker = &signers[0];
    let net = vs.network();
    let max = u64::MAX;
    let window = replica.config().window;
    let digest = [3u8; 32];
    let mut messages: Vec<(Kind, u64, u64, Message)> = Vec::new();
    for view in [0, 1, max - 1, max] {
        for seq in [0, 1, 64, 65, max - 15, max] {
            let batch = Batch {
                proposed_view: view,
                timestamp: max,
                txs: vec![],
            };
            if let Ok(pp) = attacker.seal(&PrePrepare {
                network: net,
                view,
                seq,
                digest: batch.digest(),
            }) {
                let m = Message::PrePrepare {
                    pre_prepare: pp,
                    batch,
                };
                messages.push((Kind::PrePrepare, view, seq, m));
            }
            if let Ok(p) = attacker.seal(&Prepare {
                network: net,
                view,
                seq,
                digest,
            }) {
                messages.push((Kind::Prepare, view, seq, Message::Prepare(p)));
            }
            if let Ok(c) = attacker.seal(&Commit {
                network: net,
                view,
                seq,
                digest,
            }) {
                messages.push((Kind::Commit, view, seq, Message::Commit(c)));
            }
            if let Ok(c) = attacker.seal(&Checkpoint {
                network: net,
                seq,
                state: digest,
            }) {
                messages.push((Kind::Checkpoint, view, seq, Message::Checkpoint(c)));
            }
            if let Ok(s) = attacker.seal(&Status {
                network: net,
                view,
                height: seq,
                stable: seq,
                recovering: seq % 2 == 0,
            }) {
                messages.push((Kind::Status, view, seq, Message::Status(s)));
            }
            if let Ok(f) = attacker.seal(&FetchBlocks {
                network: net,
                from: seq,
                to: view,
            }) {
                messages.push((Kind::FetchBlocks, view, seq, Message::FetchBlocks(f)));
            }
            let vc = ViewChange {
                network: net,
                new_view: view,
                checkpoint: CheckpointProof {
                    seq,
                    state: digest,
                    messages: vec![],
                },
                prepared: vec![],
            };
            if let Ok(s) = attacker.seal(&vc) {
                messages.push((Kind::ViewChange, view, seq, Message::ViewChange(s.clone())));
                if let Ok(nv) = attacker.seal(&NewView {
                    network: net,
                    view,
                    view_changes: vec![s.clone(), s.clone(), s],
                    pre_prepares: vec![],
                }) {
                    messages.push((Kind::NewView, view, seq, Message::NewView(nv)));
                }
            }
            let block = Block {
                height: seq,
                view,
                prev_hash: digest,
                batch_root: digest,
                timestamp: max,
                txs: vec![],
            };
            let cert = CommitCertificate {
                view,
                seq,
                header: Batch::null(view).header(),
                commits: vec![],
            };
            if let Ok(b) = attacker.seal(&BlocksReply {
                network: net,
                blocks: vec![(block, cert)],
            }) {
                messages.push((Kind::Blocks, view, seq, Message::Blocks(b)));
            }
        }
    }
    let huge = Transaction {
        client: ClientId([2; 32]),
        seq: max,
        payload: vec![0; 100_000].into(),
    };
    if let Ok(f) = attacker.seal(&Forward {
        network: net,
        txs: vec![huge.clone(); 3],
    }) {
        messages.push((Kind::Forward, 0, max, Message::Forward(f)));
    }
    assert!(
        replica.handle_request(huge, 0).is_err(),
        "oversized transaction refused"
    );
    assert_eq!(messages.len(), 4 * 6 * 9 + 1, "every message was signed");

    let mut outputs = Vec::new();
    let mut forgeries = 0;
    let delivered = messages.len() as u64;
    for (i, (kind, view, seq, m)) in messages.into_iter().enumerate() {
        let before = replica.stats().clone();
        replica.handle_message(m, i as u64);
        let after = replica.stats();
        // How many drops the message caused, all for one of `reasons`.
        let refused = |reasons: &[DropReason]| {
            let total = after.total_dropped() - before.total_dropped();
            let listed: u64 = reasons
                .iter()
                .map(|r| after.dropped(*r) - before.dropped(*r))
                .sum();
            if listed == total { total } else { 0 }
        };
        // Forged certificates (a view change without a checkpoint quorum, a
        // new view counting one view change three times, blocks without
        // commits) must each be refused, for whatever view they claim.
        let (drops, expected) = match kind {
            Kind::ViewChange | Kind::NewView => (
                refused(&[
                    DropReason::OldView,
                    DropReason::FutureViewOverflow,
                    DropReason::InvalidCertificate,
                    DropReason::NotPrimary,
                ]),
                1,
            ),
            // Height 0 is the genesis block everyone has: ignored.
            Kind::Blocks if seq > 0 => (refused(&[DropReason::InvalidBlock]), 1),
            // Each of the three oversized transactions is counted.
            Kind::Forward => (refused(&[DropReason::TooLarge]), 3),
            _ => (0, 0),
        };
        if expected > 0 {
            forgeries += 1;
            assert_eq!(
                drops, expected,
                "{kind:?} view {view} seq {seq} not refused"
            );
        }
        outputs.extend(drain(&mut replica));
        replica.handle_tick(max - 1_000 + i as u64);
        outputs.extend(drain(&mut replica));
    }
    // 4 views × 6 sequence numbers of view changes and new views, the 20
    // block replies above height 0, and the forward.
    assert_eq!(forgeries, 4 * 6 * 2 + 4 * 5 + 1);
    assert_eq!(replica.stats().messages_received, delivered);

    // All the attacker could get is what any primary gets: a prepare for
    // each of its view-0 proposals inside the window (sequence numbers 1
    // and 64; 0 is below it, the rest above). No commit, no new view, no
    // block, no state transfer.
    let (prepares, commits) = votes(&outputs);
    let voted: BTreeSet<_> = prepares.iter().copied().collect();
    assert_eq!(voted, BTreeSet::from([(0, 1), (0, window)]), "{prepares:?}");
    assert!(commits.is_empty(), "{commits:?}");
    assert!(committed_heights(&outputs).is_empty());
    assert!(
        !outputs
            .iter()
            .any(|o| matches!(o, Output::ViewInstalled { .. })),
        "no view installed"
    );
    assert_eq!(replica.view(), 0);
    assert_eq!(replica.stats().new_views_installed, 0);
    assert_eq!(replica.stats().blocks_fetched, 0);
    assert_eq!(
        replica.stable_seq(),
        0,
        "one member's checkpoints prove nothing"
    );
    assert_eq!(replica.height(), 0, "nothing forged committed");

    // The honest replicas can still finish the primary's first proposal.
    let first = Batch {
        proposed_view: 0,
        timestamp: max,
        txs: vec![],
    };
    let now = max - 1_000 + delivered;
    let outputs = honest_quorum_commits(&mut replica, &signers, &vs, 1, first.digest(), now);
    assert_eq!(committed_heights(&outputs), [1]);
    assert_eq!(replica.height(), 1);
}
