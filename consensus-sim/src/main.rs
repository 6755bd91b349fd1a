//! Runs many seeded PBFT simulations and prints the first failing seed.
//!
//! `pbft-sim --seeds N [--start S] [--duration-ms D]`; exit status 1 when a
//! seed violates safety or liveness. Re-run one seed with
//! `--seeds 1 --start SEED`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut seeds: u64 = 100;
    let mut start: u64 = 0;
    let mut duration: u64 = 8_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--seeds", Some(v)) => seeds = v,
            ("--start", Some(v)) => start = v,
            ("--duration-ms", Some(v)) => duration = v,
            _ => {
                eprintln!("usage: pbft-sim --seeds N [--start S] [--duration-ms D]");
                return ExitCode::from(2);
            }
        }
    }
    let began = std::time::Instant::now();
    for seed in start..start.saturating_add(seeds) {
        if let Err(violation) = openagi_consensus_sim::random_run(seed, duration) {
            println!("FAILED {violation}");
            let mut sim = openagi_consensus_sim::random_sim(seed, duration);
            println!("{}", sim.describe());
            let _ = sim.run_until(duration);
            println!("after the faulty phase:\n{}", sim.summary());
            let _ = sim.heal_and_settle(30_000);
            println!("at the end:\n{}", sim.summary());
            println!("reproduce: pbft-sim --seeds 1 --start {seed} --duration-ms {duration}");
            return ExitCode::from(1);
        }
        let done = seed - start + 1;
        if done.is_multiple_of(1000) {
            println!("{done} seeds passed ({:.1?})", began.elapsed());
        }
    }
    println!(
        "all {seeds} seeds passed from {start} in {:.1?}",
        began.elapsed()
    );
    ExitCode::SUCCESS
}
