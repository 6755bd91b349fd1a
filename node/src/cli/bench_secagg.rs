//! `openagi bench secagg`: what secure aggregation costs a round.
//!
//! Runs whole SecAgg+ rounds in one process, the coordinator and every
//! participant as the `learning` crate's state machines, with messages
//! encoded as they would travel (postcard) so their sizes are real. For
//! each participant count it times the coordinator's work (one thread,
//! CPU-bound: every call into its state machine), a participant's work
//! (key agreement, share dealing, masking), and counts the bytes each
//! participant sends and receives, against the plain update it would send
//! without masking. A second row per count has `--dropout` of the
//! participants vanish after sharing their keys, which makes the
//! coordinator reconstruct their mask keys and strip their pairwise masks:
//! the expensive path. Every round's sum is checked against the plain sum.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use openagi_crypto::Identity;
use openagi_learning::rng_from_seed;
use openagi_learning::secagg::{
    DEFAULT_QUANT_BITS, FromParticipant, RoundObserver, SecAggConfig, Session, ToParticipant,
    run_in_process,
};
use rand::Rng;

use crate::common::bench_log::Figure;

/// Most update values the benchmark holds at once (4 GiB of `f32`).
const MAX_HELD_VALUES: usize = 1 << 30;

/// What `openagi bench secagg` runs.
#[derive(Debug, Clone)]
pub struct SecAggBench {
    /// Participant counts, one row pair each.
    pub participants: Vec<usize>,
    /// Coordinates per update (199,210: the FedAvg paper's MNIST 2NN).
    pub dimension: usize,
    /// `k`: neighbours per participant.
    pub neighbours: u16,
    /// Fraction of participants that drop after sharing, in the second row.
    pub dropout: f64,
    /// Rounds per row; medians are reported.
    pub rounds: usize,
}

/// One row's measurements.
#[derive(Debug, Clone)]
struct Row {
    participants: usize,
    degree: usize,
    threshold: u16,
    dropped: usize,
    coordinator: Duration,
    participant: Duration,
    sent: usize,
    received: usize,
    max_error: f64,
}

fn encoded<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(value).context("encoding a secure-aggregation message")
}

/// Times each party's work on this process's clock and counts each
/// message's bytes as postcard would send them.
struct Watch {
    coordinator: Duration,
    participant: Duration,
    sent: Vec<usize>,
    received: Vec<usize>,
}

impl RoundObserver for Watch {
    fn coordinator<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = work();
        self.coordinator += started.elapsed();
        out
    }

    fn participant<T>(&mut self, _index: usize, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = work();
        self.participant += started.elapsed();
        out
    }

    fn sent(&mut self, index: usize, message: &FromParticipant) {
        if let Some(count) = self.sent.get_mut(index) {
            *count += encoded(message).map_or(0, |b| b.len());
        }
    }

    fn received(&mut self, index: usize, message: &ToParticipant) {
        if let Some(count) = self.received.get_mut(index) {
            *count += encoded(message).map_or(0, |b| b.len());
        }
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

/// Runs one round and returns its row (times are this round's).
fn round(bench: &SecAggBench, n: usize, dropped: usize, seed: u8) -> Result<Row> {
    let degree = (usize::from(bench.neighbours)).min(n - 1);
    // Two thirds of the neighbours reconstruct: a third may drop.
    let threshold = (degree * 2).div_ceil(3).max(degree / 2 + 1) as u16;
    let config = SecAggConfig {
        neighbours: bench.neighbours,
        threshold,
        min_survivors: (n - dropped).min(n) as u16,
        clip_range: 4.0,
        quant_bits: DEFAULT_QUANT_BITS,
        stage_timeout_ms: 60_000,
        noise: None,
    };
    let ids: Vec<Identity> = (0..n)
        .map(|i| {
            let mut seed_bytes = [seed; 32];
            seed_bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Identity::from_seed(&seed_bytes)
        })
        .collect();
    let session = Session::new(
        config,
        [seed; 32],
        ids.iter().map(Identity::public).collect(),
        bench.dimension,
    )?;
    let mut rng = rng_from_seed([seed; 32]);
    let updates: Vec<Vec<f32>> = (0..n)
        .map(|_| {
            (0..bench.dimension)
                .map(|_| rng.random_range(-0.5f32..0.5))
                .collect()
        })
        .collect();
    // Spread the dropouts around the ring so no neighbourhood loses more
    // than the threshold allows.
    let drops = spread(n, dropped);

    let mut watch = Watch {
        coordinator: Duration::ZERO,
        participant: Duration::ZERO,
        sent: vec![0; n],
        received: vec![0; n],
    };
    let outcome = run_in_process(&session, &ids, &updates, &drops, &mut rng, &mut watch)
        .with_context(|| format!("a round of {n}"))?;
    let Watch {
        coordinator: coordinator_time,
        participant: participant_time,
        sent,
        received,
    } = watch;
    let mut max_error = 0.0f64;
    for (j, got) in outcome.sum.iter().enumerate() {
        let want: f64 = outcome
            .survivors
            .iter()
            .map(|&i| f64::from(updates[usize::from(i)][j]))
            .sum();
        max_error = max_error.max((f64::from(*got) - want).abs());
    }
    if max_error > n as f64 / config.scale() + 1e-4 {
        bail!("the unmasked sum is off by {max_error}");
    }
    let survivors = n - dropped;
    let mean = |v: &[usize]| {
        let total: usize = (0..n).filter(|&i| !drops[i]).map(|i| v[i]).sum();
        total / survivors.max(1)
    };
    Ok(Row {
        participants: n,
        degree,
        threshold,
        dropped,
        coordinator: coordinator_time,
        participant: participant_time / n as u32,
        sent: mean(&sent),
        received: mean(&received),
        max_error,
    })
}

/// `dropped` indices spread evenly around the ring.
fn spread(n: usize, dropped: usize) -> Vec<bool> {
    let mut out = vec![false; n];
    for j in 0..dropped {
        out[j * n / dropped] = true;
    }
    out
}

/// Runs the benchmark, prints its table and returns its figures.
pub fn run(bench: &SecAggBench) -> Result<Vec<Figure>> {
    if bench.participants.iter().any(|&n| n < 3) || bench.rounds == 0 {
        bail!("--participants takes counts of 3 or more and --rounds at least 1");
    }
    // Every participant's update is held at once: bound what that costs.
    let most = bench.participants.iter().copied().max().unwrap_or(0);
    if most.saturating_mul(bench.dimension) > MAX_HELD_VALUES {
        bail!(
            "{most} participants × {} coordinates would hold more than {MAX_HELD_VALUES} \
             values ({} GiB); lower --participants or --dimension",
            bench.dimension,
            (MAX_HELD_VALUES * 4) >> 30
        );
    }
    if !(0.0..0.34).contains(&bench.dropout) {
        bail!("--dropout must be in [0, 0.34): a third of the neighbours may drop");
    }
    // The plain update this compares with: the dense f32 vector.
    let plain = encoded(&vec![0f32; bench.dimension])?.len();
    println!(
        "secure aggregation (SecAgg+), {} coordinates, k = {}; median of {} round(s); \
         one thread",
        bench.dimension, bench.neighbours, bench.rounds
    );
    println!(
        "{:>6} {:>4} {:>4} {:>8} {:>14} {:>14} {:>12} {:>12} {:>10} {:>10}",
        "n",
        "k",
        "t",
        "dropped",
        "coordinator",
        "participant",
        "sent/part",
        "recv/part",
        "vs plain",
        "max err"
    );
    let mut figures = Vec::new();
    for &n in &bench.participants {
        let dropped_counts = [0, (n as f64 * bench.dropout).floor() as usize];
        for (row_index, &dropped) in dropped_counts.iter().enumerate() {
            if row_index == 1 && dropped == 0 {
                continue;
            }
            let mut rows = Vec::new();
            for r in 0..bench.rounds {
                rows.push(round(bench, n, dropped, r as u8 + 1)?);
            }
            let coordinator = median(rows.iter().map(|r| r.coordinator).collect());
            let participant = median(rows.iter().map(|r| r.participant).collect());
            let row = &rows[0];
            println!(
                "{:>6} {:>4} {:>4} {:>8} {:>11.1} ms {:>11.1} ms {:>9.1} KiB {:>9.1} KiB {:>9.3}x {:>10.2e}",
                row.participants,
                row.degree,
                row.threshold,
                row.dropped,
                coordinator.as_secs_f64() * 1e3,
                participant.as_secs_f64() * 1e3,
                row.sent as f64 / 1024.0,
                row.received as f64 / 1024.0,
                row.sent as f64 / plain as f64,
                row.max_error,
            );
            let label = format!("n={n} dropped={dropped}");
            figures.push(Figure::new(
                format!("coordinator per round, {label}"),
                coordinator.as_secs_f64() * 1e3,
                "ms",
            ));
            figures.push(Figure::new(
                format!("participant per round, {label}"),
                participant.as_secs_f64() * 1e3,
                "ms",
            ));
            figures.push(Figure::new(
                format!("bytes sent per participant, {label}"),
                row.sent as f64,
                "B",
            ));
            figures.push(Figure::new(
                format!("bytes received per participant, {label}"),
                row.received as f64,
                "B",
            ));
        }
    }
    println!(
        "plain update: {:.1} KiB per participant (dense f32, no masking)",
        plain as f64 / 1024.0
    );
    figures.push(Figure::new("plain update bytes", plain as f64, "B"));
    Ok(figures)
}
