//! Restarts at every point of a network's life: before any vote, after
//! some, several replicas at once, at height 0 and later; and replicas
//! that truly lost their state. Each is a deterministic simulation that
//! checks safety after every step (no two correct replicas commit
//! different blocks at one height, no transaction takes effect twice) and,
//! where the faults stay within `f`, that commits resume and every correct
//! client's transaction reaches every correct replica.

use openagi_consensus_sim::{Action, Sim, SimConfig};

fn ok<T>(r: Result<T, openagi_consensus_sim::Violation>) -> T {
    match r {
        Ok(v) => v,
        Err(v) => panic!("{v}"),
    }
}

/// Stops `ids` at `stop_ms` and starts them again from what they persisted
/// at `start_ms`; every replica must end at the same height.
fn restart_and_settle(n: usize, seed: u64, ids: &[usize], stop_ms: u64, start_ms: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::new(seed, n));
    for &id in ids {
        sim.schedule(stop_ms, Action::Crash(id));
        sim.schedule(start_ms, Action::Restart(id));
    }
    ok(sim.run_until(start_ms + 3_000));
    ok(sim.heal_and_settle(8_000));
    for id in 0..n {
        assert_eq!(sim.height(id), sim.height(0), "replica {id} caught up");
        assert!(
            !sim.replica(id).expect("running").is_recovering(),
            "a restart from persisted state is no data loss"
        );
    }
    sim
}

/// The reported halt: a validator of two starts, stops before any block,
/// and the pair starts again. Nothing was voted, nothing is lost.
#[test]
fn restart_before_any_vote_two_validators() {
    let sim = restart_and_settle(2, 101, &[0], 0, 1_500);
    assert!(sim.committed_height() > 0);
}

/// The same with four validators, two of them stopped before any vote
/// (the others cannot commit meanwhile) and started again together.
#[test]
fn two_of_four_restart_before_any_vote() {
    let sim = restart_and_settle(4, 102, &[0, 1], 0, 2_000);
    assert!(sim.committed_height() > 0);
}

/// One replica, the primary, restarts after it has voted: it keeps its
/// votes and the network goes on.
#[test]
fn primary_restarts_after_some_votes() {
    let sim = restart_and_settle(4, 103, &[0], 2_000, 3_500);
    assert!(sim.committed_height() > 0);
}

/// Two of four stop at once mid-load (the network halts: only two are
/// left) and come back together with their persisted votes.
#[test]
fn two_of_four_restart_at_once_after_votes() {
    restart_and_settle(4, 104, &[1, 2], 2_000, 4_000);
}

/// Every replica stops at once and all start again: the network resumes
/// from what is on disk.
#[test]
fn whole_network_restarts_at_once() {
    restart_and_settle(4, 105, &[0, 1, 2, 3], 2_500, 3_000);
}

/// A replica that truly lost its state at height 0 (here the view-0
/// primary) abstains from what it may have voted for, the others replace
/// it as primary and commit, and it rejoins voting once the ledger has
/// moved a window past its bound.
#[test]
fn lost_state_of_the_primary_at_height_zero_does_not_stall_the_others() {
    let mut sim = Sim::new(SimConfig::new(106, 4));
    sim.schedule(0, Action::RecoverEmpty(0));
    ok(sim.run_until(15_000));
    assert!(sim.committed_height() > 0, "the others commit");
    assert!(
        !sim.replica(0).expect("running").is_recovering(),
        "recovery ended: {:?}",
        sim.replica(0).and_then(|r| r.recovery_status())
    );
    ok(sim.heal_and_settle(8_000));
    assert_eq!(sim.height(0), sim.height(1));
}

/// A backup that lost its state later in the chain.
#[test]
fn lost_state_of_a_backup_later_on() {
    let mut sim = Sim::new(SimConfig::new(107, 4));
    sim.schedule(3_000, Action::RecoverEmpty(2));
    ok(sim.run_until(18_000));
    assert!(!sim.replica(2).expect("running").is_recovering());
    ok(sim.heal_and_settle(8_000));
    assert_eq!(sim.height(2), sim.height(0));
}

/// Seven validators tolerate two that lose their state at once.
#[test]
fn two_of_seven_lose_their_state_at_once() {
    let mut sim = Sim::new(SimConfig::new(108, 7));
    sim.schedule(2_000, Action::RecoverEmpty(0));
    sim.schedule(2_000, Action::RecoverEmpty(4));
    ok(sim.run_until(20_000));
    for id in [0, 4] {
        assert!(
            !sim.replica(id).expect("running").is_recovering(),
            "replica {id} recovered"
        );
    }
    ok(sim.heal_and_settle(8_000));
    assert_eq!(sim.height(0), sim.height(1));
}

/// Two of four lose their state at height 0: more than `f`, so the two
/// intact replicas cannot form a quorum and the two recovering ones must
/// not vote. The network stops without violating safety, and every
/// replica can say why: the recovering ones report that they stall the
/// network, the intact ones count two recovering validators.
#[test]
fn more_than_f_lost_at_once_stops_safely_and_says_so() {
    let mut sim = Sim::new(SimConfig::new(109, 4));
    sim.schedule(0, Action::RecoverEmpty(0));
    sim.schedule(0, Action::RecoverEmpty(1));
    ok(sim.run_until(6_000));
    assert_eq!(sim.committed_height(), 0, "no quorum without them");
    for id in [0, 1] {
        let status = sim
            .replica(id)
            .and_then(|r| r.recovery_status())
            .expect("recovering");
        assert_eq!(status.recovering_validators, 2);
        assert!(status.stalls_network(), "replica {id}: {status:?}");
    }
    for id in [2, 3] {
        assert_eq!(sim.replica(id).expect("running").recovering_validators(), 2);
    }
}
