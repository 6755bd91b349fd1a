//! Generated Twins scenarios (see `openagi_consensus_sim::twins`): f
//! validators run twice under one identity, every phase a sampled
//! partition of all nodes, with crashes, pauses, loss, duplication,
//! reordering and clock skew mixed in. No scenario may break safety, and
//! after the heal commits must resume. The negative control twins f + 1
//! identities and must find forks, so the checker is known to see one.
//! `pbft-sim --twins` runs the same scenarios for long sweeps.

use openagi_consensus_sim::ViolationKind;
use openagi_consensus_sim::twins::{Generator, TwinsOptions};

/// Scenarios per test; the parts run on the test threads side by side.
const PER_PART: u64 = 400;

fn sweep(n: usize, part: u64) {
    let generator = Generator::new(TwinsOptions::new(n));
    let start = part * PER_PART;
    for seed in start..start + PER_PART {
        let scenario = generator.scenario(seed);
        if let Err(violation) = scenario.run() {
            panic!(
                "{violation}\nscenario: {}\nminimised: {}\nreproduce: pbft-sim --twins --n {n} --seeds 1 --start {seed}",
                scenario.describe(),
                scenario.minimise().describe()
            );
        }
    }
}

#[test]
fn twins_n4_part_0() {
    sweep(4, 0);
}

#[test]
fn twins_n4_part_1() {
    sweep(4, 1);
}

#[test]
fn twins_n4_part_2() {
    sweep(4, 2);
}

#[test]
fn twins_n7_part_0() {
    sweep(7, 0);
}

#[test]
fn twins_n7_part_1() {
    sweep(7, 1);
}

/// f + 1 twinned identities can hold two quorums at once: among 200
/// sampled scenarios the simulator must report forks (it found 69 in the
/// first 500 when this was written), each a safety violation, and
/// minimising one keeps it failing.
#[test]
fn the_negative_control_finds_forks() {
    let generator = Generator::new(TwinsOptions::negative_control(4));
    let forks: Vec<u64> = (0..200)
        .filter(|seed| {
            generator
                .scenario(*seed)
                .run()
                .is_err_and(|v| v.kind == ViolationKind::Safety)
        })
        .collect();
    assert!(forks.len() >= 5, "only {} forks: {forks:?}", forks.len());
    let original = generator.scenario(forks[0]);
    let minimal = original.minimise();
    let violation = minimal
        .run()
        .expect_err("the minimised scenario still fails");
    assert_eq!(violation.kind, ViolationKind::Safety, "{violation}");
    // Something was taken out: a phase, or a partition made whole.
    let whole = |s: &openagi_consensus_sim::twins::Scenario| {
        s.phases
            .iter()
            .filter(|p| p.iter().all(|g| *g == 0))
            .count()
    };
    assert!(
        minimal.phases.len() < original.phases.len() || whole(&minimal) > whole(&original),
        "nothing simplified: {}",
        minimal.describe()
    );
}
