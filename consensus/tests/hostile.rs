//! Hostile input never panics a replica: random bytes, bit-flipped
//! messages, and validly signed messages with extreme values.

use std::rc::Rc;

use openagi_consensus::messages::{
    BlocksReply, Checkpoint, CheckpointProof, Commit, FetchBlocks, Forward, NewView, PrePrepare,
    Prepare, Status, ViewChange,
};
use openagi_consensus::signing::{MemoSigner, Signer, VerifiedMemo};
use openagi_consensus::{
    Batch, Block, ClientId, CommitCertificate, Config, Message, NetworkId, Replica, Transaction,
    ValidatorSet,
};
use openagi_crypto::Identity;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn setup() -> (Replica<MemoSigner>, MemoSigner, ValidatorSet) {
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
    // Replica 0 is the view-0 primary and plays the attacker.
    let attacker = MemoSigner::new(ids[0].clone(), memo);
    (replica, attacker, vs)
}

#[test]
fn random_bytes_and_bit_flips_never_panic() {
    let (mut replica, attacker, vs) = setup();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let net = vs.network();
    let batch = Batch {
        proposed_view: 0,
        timestamp: 0,
        txs: vec![Transaction {
            client: ClientId([1; 32]),
            seq: 1,
            payload: vec![1, 2, 3],
        }],
    };
    let pp = attacker
        .seal(&PrePrepare {
            network: net,
            view: 0,
            seq: 1,
            digest: batch.digest(),
        })
        .expect("sign");
    let valid = Message::PrePrepare {
        pre_prepare: pp,
        batch,
    }
    .encode()
    .expect("encode");
    for round in 0..400u64 {
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
        if let Ok(message) = Message::decode(&bytes, 1 << 20) {
            replica.handle_message(message, round);
        }
        replica.handle_tick(round);
        while replica.poll_output().is_some() {}
    }
}

#[test]
fn extreme_values_from_a_member_never_panic() {
    let (mut replica, attacker, vs) = setup();
    let net = vs.network();
    let max = u64::MAX;
    let digest = [3u8; 32];
    let mut messages = Vec::new();
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
                messages.push(Message::PrePrepare {
                    pre_prepare: pp,
                    batch,
                });
            }
            if let Ok(p) = attacker.seal(&Prepare {
                network: net,
                view,
                seq,
                digest,
            }) {
                messages.push(Message::Prepare(p));
            }
            if let Ok(c) = attacker.seal(&Commit {
                network: net,
                view,
                seq,
                digest,
            }) {
                messages.push(Message::Commit(c));
            }
            if let Ok(c) = attacker.seal(&Checkpoint {
                network: net,
                seq,
                state: digest,
            }) {
                messages.push(Message::Checkpoint(c));
            }
            if let Ok(s) = attacker.seal(&Status {
                network: net,
                view,
                height: seq,
                stable: seq,
                recovering: seq % 2 == 0,
            }) {
                messages.push(Message::Status(s));
            }
            if let Ok(f) = attacker.seal(&FetchBlocks {
                network: net,
                from: seq,
                to: view,
            }) {
                messages.push(Message::FetchBlocks(f));
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
                messages.push(Message::ViewChange(s.clone()));
                if let Ok(nv) = attacker.seal(&NewView {
                    network: net,
                    view,
                    view_changes: vec![s.clone(), s.clone(), s],
                    pre_prepares: vec![],
                }) {
                    messages.push(Message::NewView(nv));
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
                messages.push(Message::Blocks(b));
            }
        }
    }
    let huge = Transaction {
        client: ClientId([2; 32]),
        seq: max,
        payload: vec![0; 100_000],
    };
    if let Ok(f) = attacker.seal(&Forward {
        network: net,
        txs: vec![huge.clone(); 3],
    }) {
        messages.push(Message::Forward(f));
    }
    assert!(
        replica.handle_request(huge, 0).is_err(),
        "oversized transaction refused"
    );
    for (i, m) in messages.into_iter().enumerate() {
        replica.handle_message(m, i as u64);
        replica.handle_tick(max - 1_000 + i as u64);
        while replica.poll_output().is_some() {}
    }
    assert!(replica.stats().total_dropped() > 0);
    assert_eq!(replica.height(), 0, "nothing forged committed");
}
