//! Leader rotation that skips failed primaries, in simulation: a crashed
//! validator stops costing view changes once the ledger shows its failure,
//! replicas agree on who leads, and a restarted replica picks the same
//! primaries.

use std::collections::BTreeMap;

use openagi_consensus_sim::{Action, Sim, SimConfig};

/// Runs `n` validators with `crashed` down from the start; every
/// `interval_ms` the primary in office is paused for `pause_ms`, forcing
/// a view change. Returns the simulation and the primary of every view the
/// correct replicas entered, as they saw it.
fn run_with_forced_view_changes(
    seed: u64,
    n: usize,
    crashed: &[usize],
    changes: u64,
    restart: Option<u64>,
) -> (Sim, BTreeMap<u64, usize>) {
    let interval_ms = 6_000;
    let pause_ms = 2_500;
    let mut sim = Sim::new(SimConfig::new(seed, n));
    for &id in crashed {
        sim.schedule(0, Action::Crash(id));
    }
    let mut leaders: BTreeMap<u64, usize> = BTreeMap::new();
    let mut installed_leaders: BTreeMap<u64, usize> = BTreeMap::new();
    let mut next_pause = 1_000;
    let mut paused = 0;
    let end = 1_000 + changes * interval_ms + 10_000;
    let mut now = 0;
    while now < end {
        now += 50;
        sim.run_until(now).expect("no violation");
        for id in sim.correct_nodes() {
            let Some(replica) = sim.replica(id) else {
                continue;
            };
            // Views being changed to count too: a view whose primary is
            // down is never installed, and is what the schedule saves.
            // Replicas still changing may follow different checkpoints;
            // those that installed a view must agree on its primary.
            let choice = replica.primary_choice();
            leaders.entry(replica.view()).or_insert(choice.index);
            if !replica.is_changing_view() {
                let installed = *installed_leaders
                    .entry(replica.view())
                    .or_insert(choice.index);
                assert_eq!(
                    installed,
                    choice.index,
                    "replicas that installed view {} disagree on its primary",
                    replica.view()
                );
            }
        }
        if now >= next_pause && paused < changes {
            // Pause whoever leads now, as a correct replica sees it.
            let leader = sim
                .correct_nodes()
                .into_iter()
                .filter_map(|id| sim.replica(id))
                .find(|r| !r.is_changing_view())
                .map(|r| r.primary_choice().index);
            if let Some(leader) = leader.filter(|l| !crashed.contains(l)) {
                sim.schedule(now, Action::Pause(leader));
                sim.schedule(now + pause_ms, Action::Resume(leader));
                if restart == Some(paused) {
                    // Also restart another validator from its disk
                    // mid-run: it must come back with the same schedule.
                    let other = (0..n)
                        .find(|i| *i != leader && !crashed.contains(i))
                        .expect("a third validator");
                    sim.schedule(now + 100, Action::Crash(other));
                    sim.schedule(now + 300, Action::Restart(other));
                }
                paused += 1;
            }
            next_pause = now + interval_ms;
        }
    }
    (sim, leaders)
}

#[test]
fn a_crashed_validator_leads_no_view_once_the_ledger_shows_its_failure() {
    for seed in 0..3 {
        let (sim, leaders) = run_with_forced_view_changes(seed, 4, &[1], 8, None);
        sim.check_agreement().expect("agreement");
        sim.check_liveness(40).expect("liveness");
        let led_by_crashed: Vec<u64> = leaders
            .iter()
            .filter(|(_, leader)| **leader == 1)
            .map(|(view, _)| *view)
            .collect();
        // Plain rotation would hand validator 1 every fourth view; with
        // the schedule it leads the first view that shows it is down and
        // is skipped from then on (the exclusion lasts ten minutes of
        // block time, longer than this run).
        assert!(
            led_by_crashed.len() <= 1,
            "seed {seed}: views led by the crashed validator: {led_by_crashed:?} of {leaders:?}"
        );
        assert!(
            leaders.len() >= 9,
            "seed {seed}: the forced view changes happened: {leaders:?}"
        );
        let plain_rotation_hits = leaders.keys().filter(|view| *view % 4 == 1).count();
        assert!(
            plain_rotation_hits >= 2,
            "seed {seed}: the run is long enough for plain rotation to reach validator 1 again"
        );
        let last = sim
            .correct_nodes()
            .into_iter()
            .filter_map(|id| sim.replica(id))
            .map(|r| r.primary_choice())
            .next()
            .expect("a correct replica");
        assert_eq!(last.skipped, vec![1], "seed {seed}");
    }
}

#[test]
fn two_crashed_of_seven_are_both_skipped_and_a_restarted_replica_agrees() {
    let (sim, leaders) = run_with_forced_view_changes(7, 7, &[2, 3], 10, Some(4));
    sim.check_agreement().expect("agreement");
    sim.check_liveness(40).expect("liveness");
    let led_by_crashed = leaders.values().filter(|l| [2, 3].contains(*l)).count();
    assert!(
        led_by_crashed <= 2,
        "each crashed validator leads at most its first view: {leaders:?}"
    );
    for id in sim.correct_nodes() {
        if let Some(replica) = sim.replica(id) {
            assert_eq!(replica.primary_choice().skipped, vec![2, 3], "replica {id}");
        }
    }
}

/// Pauses whoever leads now (as a correct replica sees it) for 2.5 s.
fn pause_the_primary(sim: &mut Sim, not: &[usize]) -> Option<usize> {
    let now = sim.now();
    let leader = sim
        .correct_nodes()
        .into_iter()
        .filter(|id| !not.contains(id))
        .filter_map(|id| sim.replica(id))
        .find(|r| !r.is_changing_view())
        .map(|r| r.primary_choice().index)?;
    sim.schedule(now, Action::Pause(leader));
    sim.schedule(now + 2_500, Action::Resume(leader));
    Some(leader)
}

#[test]
fn a_validator_that_missed_the_view_changes_rejoins_the_view_the_others_entered() {
    // Of seven, validator 1 is down from the start and is skipped once
    // its failure is on the ledger. Validator 6 goes down while that
    // schedule holds. Ten minutes of block time later the failure has
    // expired, the others enter a new view under plain rotation, and 6
    // comes back: the schedule at its own checkpoint still skips 1, so it
    // expects another primary than the others have. It must still take
    // their new view (its schedule converges as it catches up, or it
    // judges the new view by the schedule at the checkpoint that new view
    // carries), or it never votes again: with neither, it stays out.
    let mut sim = Sim::new(SimConfig::new(11, 7));
    sim.schedule(0, Action::Crash(1));
    for at in [1_000, 7_000, 13_000] {
        sim.run_until(at).expect("no violation");
        pause_the_primary(&mut sim, &[1]);
    }
    sim.run_until(20_000).expect("no violation");
    let before = sim.replica(6).expect("running").upcoming_schedule().clone();
    assert_eq!(
        before.excluded(),
        &[1],
        "validator 6 holds the schedule skipping 1"
    );
    sim.schedule(20_000, Action::Crash(6));
    sim.run_until(20_000 + openagi_consensus::rotation::REPUTATION_WINDOW_MS + 30_000)
        .expect("no violation");
    pause_the_primary(&mut sim, &[1, 6]);
    let now = sim.now();
    sim.run_until(now + 10_000).expect("no violation");
    let reference = sim.replica(0).expect("running");
    assert!(
        reference.primary_choice().skipped.is_empty() && !reference.is_changing_view(),
        "the others are in a view under plain rotation: {:?}",
        reference.primary_choice()
    );
    let now = sim.now();
    sim.schedule(now + 100, Action::Restart(6));
    sim.run_until(now + 40_000).expect("no violation");
    let rejoined = sim.replica(6).expect("running");
    let reference = sim.replica(0).expect("running");
    assert_eq!(
        (rejoined.view(), rejoined.is_changing_view()),
        (reference.view(), false),
        "the restarted validator caught up and is in the others' view"
    );
    assert_eq!(
        rejoined.primary_choice(),
        reference.primary_choice(),
        "with the others' schedule"
    );
    assert_eq!(rejoined.height(), reference.height(), "it caught up");
    // Now the network needs its votes: another validator (not the
    // primary) goes down, leaving five of seven, 6 among them.
    let primary = reference.primary_choice().index;
    let down = (0..7)
        .find(|i| ![1, 6, primary].contains(i))
        .expect("a backup");
    let height = sim.committed_height();
    let now = sim.now();
    sim.schedule(now + 100, Action::Crash(down));
    sim.run_until(now + 20_000).expect("no violation");
    sim.check_agreement().expect("agreement");
    sim.check_liveness(height + 10)
        .expect("commits go on with the rejoined validator");
}

#[test]
fn a_replica_behind_on_checkpoints_does_not_lead_by_its_older_schedule() {
    // Of ten, validator 1 is down from the start. Validator 3 is cut off
    // while the others change views past 1's turn (view 1 fails, view 2
    // commits) and certify the checkpoint whose schedule skips 1. By the
    // plain schedule 3 still holds, 3 leads view 3; by the others', someone
    // else does. The cut heals as the primary of view 2 stops, with
    // checkpoint messages held back, so 3 learns the newer checkpoint only
    // from the view changes. It must adopt it from them and not build a
    // new view by its older schedule, which the others would refuse
    // (counted as `NotPrimary`), costing the view.
    let lagging = 3;
    let mut sim = Sim::new(SimConfig::new(5, 10));
    sim.schedule(0, Action::Crash(1));
    let mut groups = vec![0u8; 10];
    groups[lagging] = 1;
    sim.schedule(500, Action::PartitionNodes(groups));
    sim.schedule(1_000, Action::Pause(0));
    sim.schedule(6_000, Action::Resume(0));
    sim.run_until(12_000).expect("no violation");
    let reference = sim.replica(2).expect("running");
    assert_eq!(
        (reference.view(), reference.is_changing_view()),
        (2, false),
        "the others are in view 2"
    );
    let upcoming = reference.upcoming_schedule().clone();
    assert_eq!(upcoming.excluded(), &[1], "their schedule skips 1");
    let behind = sim.replica(lagging).expect("running");
    assert!(
        behind.stable_seq() < reference.stable_seq()
            && behind.upcoming_schedule().excluded().is_empty(),
        "3 holds an older checkpoint and the plain schedule"
    );
    assert_eq!(behind.upcoming_schedule().primary(3), lagging);
    let primary = upcoming.primary(3);
    assert_ne!(primary, lagging, "the others expect another primary");
    let refused_before: u64 = (0..10)
        .filter_map(|i| sim.replica(i))
        .map(|r| r.stats().dropped(openagi_consensus::DropReason::NotPrimary))
        .sum();
    let now = sim.now();
    sim.schedule(now, Action::BlockKind(Some("checkpoint")));
    sim.schedule(now, Action::HealPartition);
    sim.schedule(now, Action::Pause(2));
    sim.schedule(now + 8_000, Action::Resume(2));
    // Checkpoint messages flow again once the others have moved on to
    // view 3 (their absence would stall commits at the watermark).
    let mut step = now;
    while step < now + 8_000 {
        step += 100;
        sim.run_until(step).expect("no violation");
        let moved = sim.replica(4).is_some_and(|r| r.view() >= 3);
        if moved {
            sim.schedule(step, Action::BlockKind(None));
        }
    }
    let refused_after: u64 = (0..10)
        .filter_map(|i| sim.replica(i))
        .map(|r| r.stats().dropped(openagi_consensus::DropReason::NotPrimary))
        .sum();
    assert_eq!(
        refused_after, refused_before,
        "no replica built a new view the others refused"
    );
    for id in sim.correct_nodes() {
        let Some(replica) = sim.replica(id) else {
            continue;
        };
        if id == 2 {
            continue;
        }
        assert_eq!(
            (replica.view(), replica.is_changing_view()),
            (3, false),
            "validator {id} installed view 3"
        );
        assert_eq!(replica.primary_choice().index, primary, "led by {primary}");
    }
    let height = sim.committed_height();
    let now = sim.now();
    sim.run_until(now + 10_000).expect("no violation");
    sim.check_agreement().expect("agreement");
    sim.check_liveness(height + 10).expect("commits go on");
}
