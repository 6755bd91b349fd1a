//! A full node's follower against a chain that real replicas committed in
//! the simulator (real Ed25519 signatures, checked strictly): it accepts
//! the chain in pieces and skips what it has, and refuses, changing
//! nothing, a tampered block, a certificate short of a quorum, a gap, an
//! oversized answer.

use openagi_consensus::follow::{Follower, LedgerRequest, LedgerResponse, MAX_BLOCKS_PER_REQUEST};
use openagi_consensus::membership::Membership;
use openagi_consensus::{Block, CommitCertificate, StrictCrypto};
use openagi_consensus_sim::{Sim, SimConfig, sim_replica_config};

fn committed_chain() -> (
    Vec<(Block, CommitCertificate)>,
    openagi_consensus::ValidatorSet,
) {
    let mut sim = Sim::new(SimConfig::new(7, 4));
    if let Err(v) = sim.run_until(6_000) {
        panic!("{v}");
    }
    let blocks = sim.stored_blocks(0).to_vec();
    assert!(blocks.len() >= 20, "only {} blocks committed", blocks.len());
    let validators = sim.replica(0).expect("replica 0").validators().clone();
    (blocks, validators)
}

#[test]
fn a_follower_takes_a_committed_chain_and_refuses_forgeries() {
    let (chain, validators) = committed_chain();
    let cfg = sim_replica_config();
    let membership = Membership::genesis(
        validators.clone(),
        cfg.checkpoint_interval,
        cfg.window,
        cfg.join_puzzle,
    )
    .expect("genesis membership");
    let mut follower = Follower::new(membership);
    assert_eq!(
        follower.next_request(),
        LedgerRequest::Blocks {
            from: 1,
            max: MAX_BLOCKS_PER_REQUEST
        }
    );

    // The first ten, then the first fifteen again: only five are new.
    let taken = follower
        .handle_blocks(chain[..10].to_vec(), &StrictCrypto)
        .expect("a committed chain verifies");
    assert_eq!(taken.len(), 10);
    assert_eq!(follower.head().height, 10);
    let taken = follower
        .handle_blocks(chain[..15].to_vec(), &StrictCrypto)
        .expect("overlap is fine");
    assert_eq!(taken.len(), 5);
    assert_eq!(follower.head().height, 15);
    assert_eq!(follower.head().hash, chain[14].0.hash());

    let rest = chain[15..20].to_vec();
    // A transaction changed after the fact.
    let mut tampered = rest.clone();
    if let Some(tx) = tampered[0].0.txs.first_mut() {
        let mut changed = tx.payload.to_vec();
        changed.push(b'!');
        tx.payload = changed.into();
    } else {
        tampered[0].0.timestamp += 1;
    }
    assert!(follower.handle_blocks(tampered, &StrictCrypto).is_err());
    // A certificate with one signature: no quorum.
    let mut short = rest.clone();
    short[0].1.commits.truncate(1);
    assert!(follower.handle_blocks(short, &StrictCrypto).is_err());
    // A certificate padded with one commit repeated: refused before any
    // signature is checked.
    let mut padded = rest.clone();
    let one = padded[0].1.commits[0].clone();
    padded[0].1.commits.push(one);
    assert!(follower.handle_blocks(padded, &StrictCrypto).is_err());
    // A gap.
    assert!(
        follower
            .handle_blocks(rest[1..].to_vec(), &StrictCrypto)
            .is_err()
    );
    // More than was asked for.
    let flood = vec![rest[0].clone(); MAX_BLOCKS_PER_REQUEST as usize + 1];
    assert!(follower.handle_blocks(flood, &StrictCrypto).is_err());
    assert_eq!(follower.head().height, 15, "refusals change nothing");

    // The honest continuation is still taken.
    assert_eq!(
        follower
            .handle_blocks(rest, &StrictCrypto)
            .expect("verifies")
            .len(),
        5
    );
    assert_eq!(follower.head().height, 20);
}

#[test]
fn ledger_messages_round_trip() {
    let (chain, _) = committed_chain();
    let answer = LedgerResponse::Blocks(chain[..3].to_vec());
    let bytes = answer.encode().expect("encodes");
    assert_eq!(LedgerResponse::decode(&bytes).expect("decodes"), answer);
    let request = LedgerRequest::Blocks { from: 4, max: 64 };
    assert_eq!(
        LedgerRequest::decode(&request.encode().expect("encodes")).expect("decodes"),
        request
    );
    assert!(LedgerResponse::decode(&[0xff, 0xff, 0xff]).is_err());
}
