//! Validator-set changes through consensus, in simulation: a node outside
//! the genesis set proves its computation and joins, a validator leaves,
//! an equivocator is removed; every change takes effect at the boundary
//! every replica computes from the chain, and the network goes on with
//! the new set (and needs it: a crash after the change must be survived
//! with the newcomer's votes).

use std::sync::atomic::AtomicBool;

use openagi_consensus::membership::{
    Change, JoinRequest, LeaveRequest, MembershipRequest, Refusal,
};
use openagi_consensus_sim::{Action, Sim, SimConfig, sim_replica_config};
use openagi_crypto::Signed;
use openagi_crypto::poc::{PuzzleInput, solve};

/// A join for node `id`, anchored at node `reference`'s newest block.
fn join_request(sim: &Sim, id: usize, reference: usize) -> Vec<u8> {
    let identity = sim.identity(id).expect("node");
    let replica = sim.replica(reference).expect("running");
    let network = replica.validators().network();
    let (anchor_height, anchor_hash) = replica.membership().anchor().expect("a block");
    let public = identity.public();
    let input = PuzzleInput {
        public_key: &public,
        network_id: &network.0,
        anchor_height,
        anchor_hash: &anchor_hash,
    };
    let params = sim_replica_config().join_puzzle;
    let nonce = solve(&input, params, 1, 0, &|_| {}, &AtomicBool::new(false))
        .expect("runs")
        .expect("found");
    let join = JoinRequest {
        network,
        anchor_height,
        anchor_hash,
        nonce,
    };
    MembershipRequest::Join(Signed::sign(identity, &join).expect("sign"))
        .to_payload()
        .expect("encode")
}

fn leave_request(sim: &Sim, id: usize, epoch: u64) -> Vec<u8> {
    let identity = sim.identity(id).expect("node");
    let network = sim.replica(id).expect("running").validators().network();
    MembershipRequest::Leave(
        Signed::sign(identity, &LeaveRequest { network, epoch }).expect("sign"),
    )
    .to_payload()
    .expect("encode")
}

/// Runs until every correct replica is in `epoch`, or panics after
/// `within_ms`.
fn run_until_epoch(sim: &mut Sim, epoch: u64, within_ms: u64) {
    let deadline = sim.now() + within_ms;
    while sim.now() < deadline {
        let step = sim.now() + 100;
        sim.run_until(step).expect("no violation");
        let all_in = sim
            .correct_nodes()
            .iter()
            .filter_map(|id| sim.replica(*id))
            .all(|r| r.epoch().0 >= epoch);
        if all_in {
            return;
        }
    }
    let epochs: Vec<_> = sim
        .correct_nodes()
        .into_iter()
        .filter_map(|id| sim.replica(id).map(|r| (id, r.epoch(), r.height())))
        .collect();
    panic!("not all in epoch {epoch}: {epochs:?}");
}

#[test]
fn a_node_that_proves_its_computation_joins_and_its_votes_count() {
    let mut cfg = SimConfig::new(3, 4);
    cfg.spares = 1;
    let spare = 4;
    let mut sim = Sim::new(cfg);
    sim.run_until(1_500).expect("no violation");
    assert!(
        sim.replica(spare).is_none(),
        "the spare is no validator yet"
    );
    let join = join_request(&sim, spare, 0);
    sim.submit(join);
    run_until_epoch(&mut sim, 1, 20_000);

    let reference = sim.replica(0).expect("running");
    let (number, first_height) = reference.epoch();
    assert_eq!(number, 1);
    let spare_key = sim.identity(spare).expect("spare").public();
    assert_eq!(reference.validators().n(), 5);
    assert_eq!(reference.validators().member(4), Some(&spare_key));
    // Where it took effect: the first checkpoint at or above the join's
    // height, plus the window; all replicas agree on what the block did.
    let (joined_at, effects) = sim
        .membership_effects(0)
        .iter()
        .find(|(_, e)| !e.scheduled.is_empty())
        .cloned()
        .expect("the join was scheduled");
    assert_eq!(
        effects.scheduled.first().map(|(_, c)| *c),
        Some(Change::Join(spare_key))
    );
    let cfg = sim_replica_config();
    let boundary =
        joined_at.div_ceil(cfg.checkpoint_interval) * cfg.checkpoint_interval + cfg.window;
    assert_eq!(first_height, boundary + 1);
    for id in sim.correct_nodes() {
        assert_eq!(
            sim.membership_effects(id)
                .iter()
                .find(|(h, _)| *h == joined_at)
                .map(|(_, e)| e),
            Some(&effects),
            "node {id} saw the same effects"
        );
    }
    // Blocks up to the boundary carry the old set's certificates only.
    let blocks = sim.stored_blocks(0);
    let last_old = blocks
        .iter()
        .find(|(b, _)| b.height == boundary)
        .expect("boundary block");
    assert!(
        last_old.1.commits.iter().all(|c| *c.signer() != spare_key),
        "the newcomer voted before its epoch"
    );

    // The newcomer starts from the chain its full node followed.
    let now = sim.now();
    sim.schedule(now, Action::StartJoined(spare));
    sim.run_until(now + 15_000).expect("no violation");
    let newcomer = sim.replica(spare).expect("started");
    assert_eq!(newcomer.epoch().0, 1);
    assert!(
        newcomer.primary_choice().skipped.contains(&4),
        "a newcomer does not lead in its first epoch"
    );
    let voted = sim
        .stored_blocks(0)
        .iter()
        .filter(|(b, _)| b.height > boundary)
        .any(|(_, cert)| cert.commits.iter().any(|c| *c.signer() == spare_key));
    assert!(voted, "the newcomer's commits are in certificates");

    // With five validators one may fail; after a crash the quorum of four
    // needs the newcomer.
    let height = sim.committed_height();
    let now = sim.now();
    let primary = sim.replica(0).expect("running").primary_choice().index;
    let down = (0..4).find(|i| *i != primary).expect("a backup");
    sim.schedule(now, Action::Crash(down));
    sim.run_until(now + 15_000).expect("no violation");
    sim.check_agreement().expect("agreement");
    sim.check_liveness(height + 10)
        .expect("commits go on with the newcomer's votes");
    // And a restart across the boundary restores into epoch 1.
    let now = sim.now();
    sim.schedule(now, Action::Restart(down));
    sim.run_until(now + 10_000).expect("no violation");
    let restarted = sim.replica(down).expect("restarted");
    assert_eq!(restarted.epoch().0, 1);
    assert_eq!(restarted.validators().n(), 5);
}

#[test]
fn a_validator_leaves_and_the_rest_go_on_without_it() {
    let mut sim = Sim::new(SimConfig::new(8, 5));
    sim.run_until(1_500).expect("no violation");
    let leaving = 4;
    let leave = leave_request(&sim, leaving, 0);
    sim.submit(leave);
    run_until_epoch(&mut sim, 1, 20_000);
    let leaver_key = sim.identity(leaving).expect("node").public();
    let reference = sim.replica(0).expect("running");
    assert_eq!(reference.validators().n(), 4);
    assert!(reference.validators().index_of(&leaver_key).is_none());
    assert!(
        sim.replica(leaving).expect("running").is_retired(),
        "the leaver retired"
    );
    assert!(!sim.correct_nodes().contains(&leaving));
    // A second leave would take the set below four: refused, with the
    // reason, and the set stays.
    let again = leave_request(&sim, 3, 1);
    sim.submit(again);
    let now = sim.now();
    sim.run_until(now + 5_000).expect("no violation");
    let refused = sim
        .membership_effects(0)
        .iter()
        .flat_map(|(_, e)| e.refused.iter().map(|(_, r)| r.clone()))
        .collect::<Vec<_>>();
    assert_eq!(refused, vec![Refusal::TooFewValidators { min: 4 }]);
    // Four validators tolerate one crash.
    let height = sim.committed_height();
    let now = sim.now();
    let primary = sim.replica(0).expect("running").primary_choice().index;
    let down = (0..4).find(|i| *i != primary).expect("a backup");
    sim.schedule(now, Action::Crash(down));
    sim.run_until(now + 15_000).expect("no violation");
    sim.check_agreement().expect("agreement");
    sim.check_liveness(height + 10).expect("commits go on");
}

#[test]
fn a_quiet_network_still_reaches_the_boundary() {
    // No client load after the leave: the primary carries the chain to the
    // epoch's last height with empty batches.
    let mut cfg = SimConfig::new(12, 5);
    cfg.load_until_ms = 1_000;
    let mut sim = Sim::new(cfg);
    sim.run_until(3_000).expect("no violation");
    let quiet_height = sim.committed_height();
    sim.run_until(4_000).expect("no violation");
    assert_eq!(sim.committed_height(), quiet_height, "no load, no blocks");
    let leave = leave_request(&sim, 4, 0);
    sim.submit(leave);
    run_until_epoch(&mut sim, 1, 10_000);
    assert_eq!(sim.replica(0).expect("running").validators().n(), 4);
    let now = sim.now();
    let height = sim.committed_height();
    sim.run_until(now + 3_000).expect("no violation");
    assert_eq!(
        sim.committed_height(),
        height,
        "empty batches stop once no change waits"
    );
}

#[test]
fn a_newcomer_on_a_quiet_network_votes_from_the_old_sets_hand_off() {
    // One of four validators is down when the join takes effect, so the
    // old set's certificate at the boundary carries three signatures: a
    // quorum of the old set, short of one of the new set of five. No load
    // follows, so no checkpoint of the new set comes either: the newcomer
    // must count that certificate against the old set before it votes,
    // and with one of the five down its vote is needed to commit.
    let mut cfg = SimConfig::new(21, 4);
    cfg.spares = 1;
    cfg.load_until_ms = 1_000;
    let spare = 4;
    let mut sim = Sim::new(cfg);
    sim.run_until(2_000).expect("no violation");
    let primary = sim.replica(0).expect("running").primary_choice().index;
    let down = (0..4).find(|i| *i != primary).expect("a backup");
    let now = sim.now();
    sim.schedule(now, Action::Crash(down));
    sim.run_until(now + 100).expect("no violation");
    let reference = (0..4).find(|i| *i != down).expect("a running validator");
    let join = join_request(&sim, spare, reference);
    sim.submit(join);
    run_until_epoch(&mut sim, 1, 15_000);
    let (_, first_height) = sim.replica(reference).expect("running").epoch();
    let now = sim.now();
    sim.schedule(now, Action::StartJoined(spare));
    sim.run_until(now + 5_000).expect("no violation");
    let newcomer = sim.replica(spare).expect("started");
    assert!(
        newcomer.stable_seq() + 1 >= first_height,
        "the newcomer holds the hand-off checkpoint (stable {}, epoch from {first_height})",
        newcomer.stable_seq()
    );
    let height = sim.committed_height();
    sim.submit(b"needs the newcomer".to_vec());
    let now = sim.now();
    sim.run_until(now + 10_000).expect("no violation");
    assert!(
        sim.committed_height() > height,
        "committed with the newcomer's vote"
    );
    sim.check_agreement().expect("agreement");
}

#[test]
fn an_equivocator_is_removed_at_the_next_boundary_and_may_not_return() {
    // Validator 2 of five signs conflicting prepares and commits. Correct
    // replicas see both votes, put the evidence on the ledger, and the
    // set of the next epoch is the other four.
    let mut cfg = SimConfig::new(31, 5);
    cfg.faults = vec![
        openagi_consensus_sim::Fault::Correct,
        openagi_consensus_sim::Fault::Correct,
        openagi_consensus_sim::Fault::DoubleVoter,
    ];
    cfg.report_evidence = true;
    let mut sim = Sim::new(cfg);
    run_until_epoch(&mut sim, 1, 30_000);
    let offender = sim.identity(2).expect("node").public();
    let reference = sim.replica(0).expect("running");
    assert_eq!(reference.validators().n(), 4);
    assert!(reference.validators().index_of(&offender).is_none());
    let removal = sim
        .membership_effects(0)
        .iter()
        .flat_map(|(_, e)| e.scheduled.iter().map(|(_, c)| *c))
        .find(|c| matches!(c, Change::Remove(_)));
    assert_eq!(removal, Some(Change::Remove(offender)));
    // The four go on; the removed key cannot join again.
    let height = sim.committed_height();
    let now = sim.now();
    sim.run_until(now + 5_000).expect("no violation");
    sim.check_agreement().expect("agreement");
    sim.check_liveness(height + 10).expect("commits go on");
    let membership = sim.replica(0).expect("running").membership().clone();
    let (anchor_height, anchor_hash) = membership.anchor().expect("anchor");
    let rejoin = {
        let identity = sim.identity(2).expect("node");
        let network = membership.epoch().validators.network();
        let public = identity.public();
        let input = PuzzleInput {
            public_key: &public,
            network_id: &network.0,
            anchor_height,
            anchor_hash: &anchor_hash,
        };
        let nonce = solve(
            &input,
            sim_replica_config().join_puzzle,
            1,
            0,
            &|_| {},
            &AtomicBool::new(false),
        )
        .expect("runs")
        .expect("found");
        MembershipRequest::Join(
            Signed::sign(
                identity,
                &JoinRequest {
                    network,
                    anchor_height,
                    anchor_hash,
                    nonce,
                },
            )
            .expect("sign"),
        )
    };
    assert_eq!(
        membership.check_request(
            &rejoin,
            membership.height() + 1,
            &openagi_consensus::StrictCrypto,
            &mut openagi_consensus::membership::ProofCache::default()
        ),
        Err(Refusal::Banned)
    );
}

#[test]
fn a_leaver_cut_off_at_the_boundary_still_retires() {
    // Validator 4 of five asks to leave and is cut off before the others
    // certify the boundary; they move into the new set and on. Messages to
    // "all" go to the new set only, as in a node, so the leaver hears of
    // the boundary only by asking: its status is answered with the others'
    // status and the old set's certificate, it fetches up to the boundary
    // and retires.
    let mut sim = Sim::new(SimConfig::new(41, 5));
    sim.run_until(1_000).expect("no violation");
    let leave = leave_request(&sim, 4, 0);
    sim.submit(leave);
    // Cut it off once the leave is scheduled.
    let deadline = sim.now() + 10_000;
    while sim
        .replica(0)
        .is_some_and(|r| r.membership().transition().is_none())
    {
        assert!(sim.now() < deadline, "the leave was not scheduled");
        let step = sim.now() + 20;
        sim.run_until(step).expect("no violation");
    }
    let now = sim.now();
    sim.schedule(now, Action::PartitionNodes(vec![0, 0, 0, 0, 1]));
    let deadline = now + 20_000;
    while sim.replica(0).is_some_and(|r| r.epoch().0 < 1) {
        assert!(sim.now() < deadline, "the others did not move on");
        let step = sim.now() + 100;
        sim.run_until(step).expect("no violation");
    }
    let now = sim.now();
    sim.run_until(now + 3_000).expect("no violation");
    let leaver = sim.replica(4).expect("running");
    assert!(!leaver.is_retired(), "cut off, it could not retire yet");
    let now = sim.now();
    sim.schedule(now, Action::HealPartition);
    sim.run_until(now + 15_000).expect("no violation");
    assert!(
        sim.replica(4).expect("running").is_retired(),
        "the leaver retired once it could ask: {:?}",
        sim.replica(4)
    );
    sim.check_agreement().expect("agreement");
}
