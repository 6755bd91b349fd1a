//! Runs many seeded PBFT simulations and prints the first failing seed.
//!
//! `pbft-sim --seeds N [--start S] [--duration-ms D]` runs randomized
//! simulations (`random_run`). `pbft-sim --twins [--n 4|7] [--negative]
//! --seeds N [--start S] [--jobs J]` runs generated Twins scenarios
//! (`twins`): f twinned identities must never break safety or liveness;
//! with `--negative` (f + 1 twinned) it counts the forks found instead.
//! Exit status 1 when a seed violates safety or liveness (or, with
//! `--negative`, when no fork was found). Re-run one seed with
//! `--seeds 1 --start SEED`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use openagi_consensus_sim::ViolationKind;
use openagi_consensus_sim::twins::{Generator, TwinsOptions};

struct Args {
    seeds: u64,
    start: u64,
    duration: u64,
    twins: bool,
    negative: bool,
    n: usize,
    jobs: u64,
}

const USAGE: &str = "usage: pbft-sim --seeds N [--start S] [--duration-ms D]\n       pbft-sim --twins [--n 4|7] [--negative] --seeds N [--start S] [--jobs J]";

fn parse() -> Option<Args> {
    let mut a = Args {
        seeds: 100,
        start: 0,
        duration: 8_000,
        twins: false,
        negative: false,
        n: 4,
        jobs: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--twins" => a.twins = true,
            "--negative" => a.negative = true,
            flag => {
                let value = args.next().and_then(|v| v.parse::<u64>().ok())?;
                match flag {
                    "--seeds" => a.seeds = value,
                    "--start" => a.start = value,
                    "--duration-ms" => a.duration = value,
                    "--n" => a.n = usize::try_from(value).ok()?,
                    "--jobs" => a.jobs = value.max(1),
                    _ => return None,
                }
            }
        }
    }
    Some(a)
}

fn main() -> ExitCode {
    let Some(args) = parse() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if args.twins {
        // Every set partition is enumerated up front: the sizes the
        // generator is made for.
        if ![4, 7].contains(&args.n) {
            eprintln!("--n takes 4 or 7\n{USAGE}");
            return ExitCode::from(2);
        }
        return twins(&args);
    }
    let (seeds, start, duration) = (args.seeds, args.start, args.duration);
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

/// Twins scenarios `start..start + seeds`, split over `jobs` threads.
fn twins(args: &Args) -> ExitCode {
    let options = if args.negative {
        TwinsOptions::negative_control(args.n)
    } else {
        TwinsOptions::new(args.n)
    };
    let generator = Generator::new(options);
    println!(
        "twins: n = {}, {} twinned, {} phases of {} ms, {} partitions per phase, {:.3e} scenarios before other faults",
        options.n,
        options.twinned,
        options.phases,
        options.phase_ms,
        generator.partition_count(),
        generator.space()
    );
    let began = std::time::Instant::now();
    let done = AtomicU64::new(0);
    let forks = AtomicU64::new(0);
    let stalls = AtomicU64::new(0);
    let first_failure = std::sync::Mutex::new(None::<u64>);
    let end = args.start.saturating_add(args.seeds);
    std::thread::scope(|scope| {
        for job in 0..args.jobs {
            let (generator, done, forks, stalls, first_failure) =
                (&generator, &done, &forks, &stalls, &first_failure);
            scope.spawn(move || {
                let mut seed = args.start + job;
                while seed < end {
                    // Stop early once a real failure is known.
                    if !args.negative && first_failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    match generator.scenario(seed).run() {
                        Ok(()) => {}
                        Err(v) if v.kind == ViolationKind::Safety => {
                            forks.fetch_add(1, Ordering::Relaxed);
                            note_failure(first_failure, seed);
                        }
                        Err(_) => {
                            stalls.fetch_add(1, Ordering::Relaxed);
                            note_failure(first_failure, seed);
                        }
                    }
                    let count = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if count.is_multiple_of(10_000) {
                        println!("{count} scenarios ({:.1?})", began.elapsed());
                    }
                    seed += args.jobs;
                }
            });
        }
    });
    let (ran, forks, stalls) = (
        done.load(Ordering::Relaxed),
        forks.load(Ordering::Relaxed),
        stalls.load(Ordering::Relaxed),
    );
    println!(
        "{ran} scenarios from seed {} in {:.1?}: {forks} safety violations, {stalls} liveness violations",
        args.start,
        began.elapsed()
    );
    let first = first_failure.lock().ok().and_then(|f| *f);
    if args.negative {
        if forks == 0 {
            println!("FAILED: f + 1 twinned identities produced no fork; the checker is blind");
            return ExitCode::from(1);
        }
        if let Some(seed) = first {
            report(&generator, seed, args);
        }
        return ExitCode::SUCCESS;
    }
    match first {
        None => ExitCode::SUCCESS,
        Some(seed) => {
            report(&generator, seed, args);
            ExitCode::from(1)
        }
    }
}

fn note_failure(first: &std::sync::Mutex<Option<u64>>, seed: u64) {
    if let Ok(mut f) = first.lock() {
        *f = Some(f.map_or(seed, |s| s.min(seed)));
    }
}

/// The failing scenario, its violation and its minimised form.
fn report(generator: &Generator, seed: u64, args: &Args) {
    let scenario = generator.scenario(seed);
    if let Err(v) = scenario.run() {
        println!(
            "{}FAILED {v}",
            if args.negative { "expected: " } else { "" }
        );
    }
    println!("scenario: {}", scenario.describe());
    let minimal = scenario.minimise();
    println!("minimised: {}", minimal.describe());
    if let Err(v) = minimal.run() {
        println!("  which fails with: {v}");
    }
    println!(
        "reproduce: pbft-sim --twins --n {}{} --seeds 1 --start {seed}",
        args.n,
        if args.negative { " --negative" } else { "" }
    );
}
