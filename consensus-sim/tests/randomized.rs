//! Randomized simulations over many seeds (see `sim::random_run`): random
//! n, faulty replicas of every kind up to f, a byzantine client, loss,
//! duplication, reordering, partitions, crashes and restarts, then a healed
//! network that must converge. Split in four so test threads share the
//! work; `pbft-sim --seeds N` runs the same function for long sweeps.

use openagi_consensus_sim::random_run;

const SEEDS_PER_PART: u64 = 50;
const DURATION_MS: u64 = 3_000;

fn run_part(part: u64) {
    let start = part * SEEDS_PER_PART;
    for seed in start..start + SEEDS_PER_PART {
        if let Err(violation) = random_run(seed, DURATION_MS) {
            panic!(
                "{violation} (reproduce: pbft-sim --seeds 1 --start {seed} --duration-ms {DURATION_MS})"
            );
        }
    }
}

#[test]
fn random_seeds_part_0() {
    run_part(0);
}

#[test]
fn random_seeds_part_1() {
    run_part(1);
}

#[test]
fn random_seeds_part_2() {
    run_part(2);
}

#[test]
fn random_seeds_part_3() {
    run_part(3);
}
