//! The correctness scenarios a PBFT replica must survive, each a named deterministic
//! simulation. Every run checks safety after each step (no two correct
//! replicas commit different blocks at one height, no transaction takes
//! effect twice, no forged client transaction takes effect) and ends by
//! healing the network and checking that commits resume and every correct
//! client's transaction reaches every correct replica.

use openagi_consensus::DropReason;
use openagi_consensus_sim::{Action, Fault, NetConfig, Sim, SimConfig};

fn faults(n: usize, faulty: &[(usize, Fault)]) -> Vec<Fault> {
    let mut v = vec![Fault::Correct; n];
    for (i, f) in faulty {
        v[*i] = *f;
    }
    v
}

fn dropped(sim: &Sim, reason: DropReason) -> u64 {
    sim.correct_nodes()
        .iter()
        .filter_map(|i| sim.replica(*i))
        .map(|r| r.stats().dropped(reason))
        .sum()
}

fn ok<T>(r: Result<T, openagi_consensus_sim::Violation>) -> T {
    match r {
        Ok(v) => v,
        Err(v) => panic!("{v}"),
    }
}

/// The view-0 primary sends one batch to half the backups and another to
/// the rest. No correct replicas commit different batches; a view change
/// replaces the primary and commits resume.
#[test]
fn equivocating_primary() {
    let mut cfg = SimConfig::new(11, 4);
    cfg.faults = faults(4, &[(0, Fault::EquivocatingPrimary)]);
    let mut sim = Sim::new(cfg);
    ok(sim.run_until(6_000));
    ok(sim.heal_and_settle(10_000));
    eprintln!("{}", sim.summary());
    assert!(
        sim.views().iter().skip(1).all(|v| *v >= 1),
        "primary replaced: {:?}",
        sim.views()
    );
    assert!(sim.committed_height() > 5);
}

/// Two copies of the view-0 primary's identity each talk to a different
/// half of the network. The half with a quorum commits; the other correct
/// replica catches up and never commits a conflicting block.
#[test]
fn twins_of_one_identity_in_different_halves() {
    let mut cfg = SimConfig::new(12, 4);
    // Original of replica 0 reaches node 1; its twin (node 4) reaches 2, 3.
    cfg.twins = vec![(0, vec![true, true, false, false, false])];
    let mut sim = Sim::new(cfg);
    ok(sim.run_until(6_000));
    ok(sim.heal_and_settle(12_000));
    eprintln!("{}", sim.summary());
    assert!(sim.committed_height() > 5);
}

/// Commits are lost, so batches prepare but do not commit; then the primary
/// crashes. The new view must carry the prepared batches (every submitted
/// transaction commits exactly once) and the old primary catches up after
/// restarting.
#[test]
fn prepared_not_committed_then_primary_crash() {
    let mut sim = Sim::new(SimConfig::new(13, 4));
    sim.schedule(0, Action::BlockKind(Some("commit")));
    sim.schedule(1_500, Action::Crash(0));
    sim.schedule(1_500, Action::BlockKind(None));
    sim.schedule(6_000, Action::Restart(0));
    ok(sim.run_until(1_490));
    assert_eq!(
        sim.committed_height(),
        0,
        "nothing commits without commit messages"
    );
    let prepared = sim.replica(1).map(|r| r.log_len()).unwrap_or(0);
    assert!(prepared > 0, "batches prepared before the crash");
    ok(sim.run_until(8_000));
    ok(sim.heal_and_settle(10_000));
    assert!(sim.views()[1] >= 1);
    assert_eq!(sim.height(0), sim.height(1), "restarted primary caught up");
}

/// n = 7 with two replicas sending conflicting prepares and commits to
/// different peers, on a network losing 10% of messages.
#[test]
fn byzantine_double_votes_with_ten_percent_loss() {
    let mut cfg = SimConfig::new(14, 7);
    cfg.faults = faults(7, &[(2, Fault::DoubleVoter), (5, Fault::DoubleVoter)]);
    cfg.net = NetConfig::lossy(0.10, 0.0);
    let mut sim = Sim::new(cfg);
    ok(sim.run_until(8_000));
    ok(sim.heal_and_settle(10_000));
    assert!(sim.committed_height() > 5);
}

/// The primaries of views 0 and 1 are both faulty: the first is silent, the
/// second sends forged new-view messages (dropped prepared batches, a view
/// change counted twice, tampered signatures) and view changes with
/// fabricated prepared proofs. Backups reject them and the view-2 primary
/// takes over.
#[test]
fn two_faulty_primaries_in_a_row_with_forged_view_change_certificates() {
    let mut cfg = SimConfig::new(15, 7);
    cfg.faults = faults(7, &[(0, Fault::Silent), (1, Fault::ForgedViewChange)]);
    let mut sim = Sim::new(cfg);
    ok(sim.run_until(10_000));
    ok(sim.heal_and_settle(12_000));
    assert!(sim.views()[2] >= 2, "views {:?}", sim.views());
    assert!(
        dropped(&sim, DropReason::InvalidCertificate) > 0,
        "forgeries were seen and refused"
    );
    assert!(sim.committed_height() > 5);
}

/// Partition 3|4, then 2|5 (the five commit once they agree on a primary
/// among them), then heal: the two-replica minority catches up by state
/// transfer.
#[test]
fn partitions_three_four_then_two_five_then_heal() {
    let mut sim = Sim::new(SimConfig::new(16, 7));
    sim.schedule(1_000, Action::Partition(vec![0, 0, 0, 1, 1, 1, 1]));
    sim.schedule(4_000, Action::Partition(vec![0, 0, 1, 1, 1, 1, 1]));
    ok(sim.run_until(4_000));
    let before = sim.committed_height();
    ok(sim.run_until(16_000));
    let during = sim.committed_height();
    assert!(
        during > before,
        "the five made progress: {before} -> {during}"
    );
    let minority_before = sim.height(0);
    ok(sim.heal_and_settle(15_000));
    assert!(sim.height(0) > minority_before);
    let fetched: u64 = [0, 1]
        .iter()
        .filter_map(|i| sim.replica(*i))
        .map(|r| r.stats().blocks_fetched)
        .sum();
    assert!(fetched > 0, "minority used state transfer");
    // The simulated replicas keep 8 blocks in memory: the majority served
    // the older ones from storage.
    let from_storage: u64 = (2..7)
        .filter_map(|i| sim.replica(i))
        .map(|r| r.stats().storage_reads)
        .sum();
    assert!(from_storage > 0, "older blocks were read from storage");
}

/// 60 simulated seconds of 20% loss, 10% duplication and reordering under
/// load, then a clean network: safety throughout, and every transaction
/// commits once the network is clean.
#[test]
fn sixty_seconds_of_loss_duplication_and_reordering_then_clean() {
    let mut cfg = SimConfig::new(17, 4);
    cfg.net = NetConfig::lossy(0.20, 0.10);
    cfg.clients = 4;
    cfg.client_interval_ms = 50;
    // Clocks disagree by up to 3 s, so the primaries' timestamps do too.
    cfg.clock_skew_ms = 3_000;
    let mut sim = Sim::new(cfg);
    ok(sim.run_until(60_000));
    assert!(
        sim.committed_height() > 20,
        "progress even under loss: {}",
        sim.committed_height()
    );
    ok(sim.heal_and_settle(15_000));
    eprintln!("{}", sim.summary());
}

/// A replica replays old messages (old views included) and sends
/// checkpoints with false digests and tampered signatures, while a crashed
/// primary forces view changes. All of it is dropped and counted; the
/// stable checkpoint is never moved by the forgeries.
#[test]
fn replayed_old_view_messages_and_forged_checkpoints() {
    let mut cfg = SimConfig::new(18, 4);
    cfg.faults = faults(4, &[(3, Fault::Replayer)]);
    let mut sim = Sim::new(cfg);
    sim.schedule(2_000, Action::Crash(0));
    sim.schedule(5_000, Action::Restart(0));
    ok(sim.run_until(12_000));
    ok(sim.heal_and_settle(10_000));
    assert!(
        dropped(&sim, DropReason::OldView) > 0,
        "old-view replays dropped"
    );
    assert!(
        dropped(&sim, DropReason::BadSignature) > 0,
        "tampered checkpoints dropped"
    );
    for i in sim.correct_nodes() {
        let r = sim.replica(i).expect("running");
        let stable = r.stable_seq();
        assert!(
            stable <= r.height(),
            "stable checkpoint {stable} beyond ledger {}",
            r.height()
        );
    }
}

/// n = 7: the primary equivocates while another replica repeatedly
/// restarts with an empty state, forgetting the votes it cast. Two faults,
/// f = 2: safety holds for the five correct replicas.
#[test]
fn forgetful_replica_restarts_while_primary_equivocates() {
    let mut cfg = SimConfig::new(19, 7);
    cfg.faults = faults(7, &[(0, Fault::EquivocatingPrimary), (3, Fault::Amnesiac)]);
    let mut sim = Sim::new(cfg);
    for at in [300, 900, 1_700, 3_000, 4_500] {
        sim.schedule(at, Action::RestartEmpty(3));
    }
    ok(sim.run_until(8_000));
    ok(sim.heal_and_settle(12_000));
    assert!(sim.committed_height() > 5);
    assert!(
        sim.height(3) >= sim.height(1).saturating_sub(8),
        "forgetful replica recovered by state transfer"
    );
}

/// A byzantine client reuses sequence numbers with different payloads sent
/// to different replicas: each `(client, seq)` takes effect at most once
/// (checked after every step), and correct clients are unaffected.
#[test]
fn byzantine_client_reusing_timestamps() {
    let mut cfg = SimConfig::new(20, 4);
    cfg.byzantine_client = true;
    let mut sim = Sim::new(cfg);
    ok(sim.run_until(5_000));
    ok(sim.heal_and_settle(8_000));
    let refused = dropped(&sim, DropReason::AlreadyApplied) + dropped(&sim, DropReason::Duplicate);
    assert!(refused > 0, "reused sequence numbers were refused");
}

/// A correct replica crashes and restarts from its persisted state, with
/// no contradiction and a full catch-up.
#[test]
fn crash_and_restart_from_persisted_state() {
    let mut sim = Sim::new(SimConfig::new(21, 4));
    sim.schedule(1_000, Action::Crash(2));
    sim.schedule(3_000, Action::Restart(2));
    ok(sim.run_until(1_000));
    assert!(sim.replica(2).is_none(), "crashed");
    let persisted = sim.stored_blocks(2).last().map_or(0, |(b, _)| b.height);
    assert!(persisted > 0, "blocks committed before the crash");
    ok(sim.run_until(3_000));
    let others = sim.committed_height();
    assert!(
        others > persisted,
        "the others kept committing: {persisted} -> {others}"
    );
    // Restarted with exactly the blocks it persisted, not from scratch.
    assert_eq!(sim.height(2), persisted);
    ok(sim.run_until(5_000));
    ok(sim.heal_and_settle(6_000));
    assert!(sim.height(2) > others, "caught up and kept committing");
    assert_eq!(sim.height(2), sim.height(0));
}

/// The checker has teeth: with two identities twinned (f + 1 faulty
/// replicas in n = 4) both halves hold a quorum and commit different
/// blocks, and the simulator reports it.
#[test]
fn beyond_f_faults_safety_violation_is_detected() {
    let mut cfg = SimConfig::new(22, 4);
    // Nodes 0..4 are the originals, 4 and 5 the twins of 0 and 1.
    cfg.twins = vec![
        (0, vec![true, true, true, false, false, false]),
        (1, vec![true, true, true, false, false, false]),
    ];
    let mut sim = Sim::new(cfg);
    let result = sim.run_until(5_000);
    assert!(result.is_err(), "two twinned identities must break safety");
}

/// n = 4 with an equivocating primary: a replica that knows it lost its
/// state recovers with `recover_after_data_loss` and is counted as correct
/// throughout (its commits are checked like everyone's). It abstains from
/// votes it might have cast before, so the single real fault stays within f.
#[test]
fn replica_recovering_from_lost_state_stays_correct_while_primary_equivocates() {
    let mut cfg = SimConfig::new(23, 4);
    cfg.faults = faults(4, &[(0, Fault::EquivocatingPrimary)]);
    let mut sim = Sim::new(cfg);
    sim.schedule(300, Action::RecoverEmpty(3));
    ok(sim.run_until(6_000));
    assert!(
        !sim.replica(3).expect("running").is_recovering(),
        "first recovery finished"
    );
    // Lose it again, this time mid-flight with the network lossy.
    sim.schedule(6_500, Action::SetNet(NetConfig::lossy(0.05, 0.05)));
    sim.schedule(6_700, Action::RecoverEmpty(3));
    // Recovery ends once the ledger has moved a window past the bound it
    // learned, which takes continued load.
    ok(sim.run_until(20_000));
    assert!(
        !sim.replica(3).expect("running").is_recovering(),
        "second recovery finished"
    );
    ok(sim.heal_and_settle(15_000));
    assert_eq!(sim.height(3), sim.height(1));
}

/// A replica cut off from the others catches up by state transfer while a
/// faulty peer claims a much longer ledger and serves tampered blocks: the
/// forgeries are refused and the honest peers' blocks applied.
#[test]
fn lagging_replica_refuses_forged_blocks_from_a_lying_peer() {
    let mut cfg = SimConfig::new(24, 4);
    cfg.faults = faults(4, &[(0, Fault::LyingServer)]);
    let mut sim = Sim::new(cfg);
    sim.schedule(300, Action::Partition(vec![0, 0, 0, 1]));
    sim.schedule(4_000, Action::HealPartition);
    ok(sim.run_until(4_000));
    let behind = sim.height(3);
    ok(sim.run_until(8_000));
    ok(sim.heal_and_settle(10_000));
    let r = sim.replica(3).expect("running");
    assert!(
        r.height() > behind,
        "caught up from {behind} to {}",
        r.height()
    );
    assert!(r.stats().blocks_fetched > 0);
    assert!(
        r.stats().dropped(DropReason::InvalidBlock) > 0,
        "forged blocks refused"
    );
}

fn replica_zero(sim: &Sim) -> &openagi_consensus::Replica<openagi_consensus::signing::MemoSigner> {
    sim.replica(0).expect("replica 0 is correct")
}

/// A replica cut off while the others commit sees, once it hears from them
/// again, a reported height above its own until it has caught up; the
/// node's readiness check reads exactly this.
#[test]
fn an_isolated_replica_knows_it_is_behind_until_it_catches_up() {
    let mut sim = Sim::new(SimConfig::new(23, 4));
    sim.schedule(500, Action::Partition(vec![0, 1, 1, 1]));
    sim.schedule(4_000, Action::HealPartition);
    ok(sim.run_until(4_000));
    assert!(
        sim.committed_height() > sim.height(0),
        "the other three committed without it"
    );
    let mut seen_behind = false;
    for step in 1..=200 {
        ok(sim.run_until(4_000 + step * 50));
        let r = replica_zero(&sim);
        if r.reported_height() > r.height() {
            seen_behind = true;
            break;
        }
    }
    assert!(seen_behind, "statuses from the others show it is behind");
    ok(sim.heal_and_settle(10_000));
    let r = replica_zero(&sim);
    assert!(
        r.reported_height() <= r.height(),
        "caught up: reported {} at height {}",
        r.reported_height(),
        r.height()
    );
}
