//! One federated round, shared by the network and the simulator: who
//! takes part ([`Participation`]), how a participant's delta travels
//! ([`Compression`], [`encode_update`]), the server's step
//! ([`aggregate_round`], [`apply_delta`]) and what a round did
//! ([`RoundOutcome`]). The networked [`crate::federation::Coordinator`]
//! and the in-process [`crate::simulate::Simulation`] both build on these,
//! so a simulation runs the network's round, not a copy of it.

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregator, ClientUpdate};
use crate::compress::{self, ErrorFeedback, Payload};
use crate::dp::{self, Accountant, DpConfig};
use crate::model::{ArchitectureDescriptor, ModelId};
use crate::{Error, ErrorKind, Result, SeededRng};

/// Which clients take part in a round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Participation {
    /// Every client, every round.
    All,
    /// Exactly `per_round` clients, uniformly without replacement.
    Fixed {
        /// Clients per round.
        per_round: usize,
    },
    /// Each client independently with probability `rate` (what the DP
    /// accountant's amplification bound assumes).
    Poisson {
        /// Sampling probability `q` in `(0, 1]`.
        rate: f64,
    },
}

impl Participation {
    /// Picks the participants among `n` candidates (indices, ascending for
    /// `Fixed` and `Poisson`); a fixed count larger than `n` takes all.
    pub fn select(self, n: usize, rng: &mut SeededRng) -> Result<Vec<usize>> {
        match self {
            Participation::All => Ok((0..n).collect()),
            Participation::Fixed { per_round } => dp::fixed_size_sample(n, per_round.min(n), rng),
            Participation::Poisson { rate } => dp::poisson_sample(n, rate, rng),
        }
    }

    /// How many of `n` candidates a round expects: DP-FedAvg's fixed
    /// denominator.
    pub fn expected(self, n: usize) -> f64 {
        match self {
            Participation::All => n as f64,
            Participation::Fixed { per_round } => per_round.min(n) as f64,
            Participation::Poisson { rate } => rate * n as f64,
        }
    }

    /// The accountant's sample rate `q` for one round among `n` candidates
    /// (a fixed count is accounted as Poisson with the same rate: the
    /// approximation documented at `dp::fixed_size_sample`).
    pub fn sample_rate(self, n: usize) -> f64 {
        match self {
            Participation::All => 1.0,
            Participation::Fixed { per_round } => per_round as f64 / n.max(1) as f64,
            Participation::Poisson { rate } => rate,
        }
    }
}

/// Update compression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Compression {
    /// Dense `f32` updates.
    #[default]
    None,
    /// Top-k sparsification with per-client error feedback, sending
    /// `ceil(fraction · dim)` coordinates, optionally 8-bit quantized.
    TopK {
        /// Share of coordinates sent, in `(0, 1]`.
        fraction: f64,
        /// Quantize the sent values to 8 bits (the quantization error is
        /// fed back too).
        quantize: bool,
    },
    /// Every coordinate, 8-bit quantized (round to nearest, no feedback).
    Quantize,
}

impl Compression {
    /// A client's wire payload for `delta` (top-k keeps its error feedback
    /// in `feedback`, created or reset to the delta's size as needed).
    pub fn compress(
        self,
        delta: Vec<f32>,
        feedback: &mut Option<ErrorFeedback>,
    ) -> Result<Payload> {
        let dim = delta.len();
        Ok(match self {
            Compression::None => Payload::Dense(delta),
            Compression::Quantize => {
                Payload::Quantized(compress::quantize(&delta, compress::DEFAULT_QUANT_CHUNK)?)
            }
            Compression::TopK { fraction, quantize } => {
                let k = ((fraction * dim as f64).ceil() as usize).clamp(1, dim.max(1));
                let state = match feedback {
                    Some(f) if f.residual().len() == dim => f,
                    slot => slot.insert(ErrorFeedback::new(dim)?),
                };
                if quantize {
                    Payload::SparseQuantized(state.compress_quantized(
                        &delta,
                        k,
                        compress::DEFAULT_QUANT_CHUNK,
                    )?)
                } else {
                    Payload::Sparse(state.compress(&delta, k)?)
                }
            }
        })
    }
}

/// Client-level differential privacy for a job or a simulation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    /// Clipping bound and noise multiplier.
    pub dp: DpConfig,
    /// The δ that ε is reported for.
    pub delta: f64,
    /// Stop before a round that would push ε past this.
    #[serde(default)]
    pub budget_epsilon: Option<f64>,
}

/// A participant's wire payload for `delta`: compressed as `compression`
/// says (top-k carries its error feedback in `feedback`) and encoded.
pub fn encode_update(
    compression: Compression,
    delta: Vec<f32>,
    feedback: &mut Option<ErrorFeedback>,
) -> Result<Vec<u8>> {
    compress::encode(&compression.compress(delta, feedback)?)
}

/// A round's server step: the aggregate delta (`None`: the model stays)
/// and, with DP, ε spent so far. Under DP the mechanism runs and is
/// accounted every round whoever answered (noise over `expected`
/// participants; an empty round still releases noise, skipping it would
/// reveal the empty round); without, too few updates for the aggregator
/// leave the model unchanged.
pub fn aggregate_round(
    updates: &[ClientUpdate],
    dim: usize,
    aggregator: &Aggregator,
    dp_state: Option<(&Privacy, &mut Accountant)>,
    expected: f64,
    sample_rate: f64,
    noise: &mut SeededRng,
) -> Result<(Option<Vec<f32>>, Option<f64>)> {
    match dp_state {
        Some((p, accountant)) => {
            let avg = if updates.is_empty() {
                let mut zero_sum = vec![0.0f32; dim];
                dp::add_gaussian_noise(&mut zero_sum, p.dp.noise_std(), noise)?;
                zero_sum
                    .iter()
                    .map(|&v| (f64::from(v) / expected) as f32)
                    .collect()
            } else {
                dp::dp_fedavg(updates, &p.dp, expected, noise)?
            };
            let spent = accountant.record_round(sample_rate, p.dp.noise_multiplier)?;
            Ok((Some(avg), Some(spent.epsilon)))
        }
        None if updates.is_empty() => Ok((None, None)),
        None => match aggregator.aggregate(updates) {
            Ok(avg) => Ok((Some(avg), None)),
            Err(e) if e.kind() == ErrorKind::NotEnoughClients => Ok((None, None)),
            Err(e) => Err(e),
        },
    }
}

/// The model after a round's aggregate `delta`: the new parameters and
/// their id, checked against the architecture.
pub fn apply_delta(
    descriptor: &ArchitectureDescriptor,
    params: &[f32],
    delta: &[f32],
) -> Result<(Vec<f32>, ModelId)> {
    let next: Vec<f32> = params.iter().zip(delta).map(|(p, d)| p + d).collect();
    descriptor.check_params(&next)?;
    let id = ModelId::compute(descriptor, &next)?;
    Ok((next, id))
}

/// What a round did to the global model: the one description the
/// network's ledger record ([`crate::federation::RoundSummary`]) and the
/// simulator's report ([`crate::simulate::RoundRecord`]) both carry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundOutcome {
    /// Round number, from 1.
    pub round: u64,
    /// The model the round started from.
    pub parent: ModelId,
    /// The model after the round (the parent when nothing was aggregated).
    pub model: ModelId,
    /// Whether enough updates arrived to change the model.
    pub aggregated: bool,
    /// Participants selected.
    pub selected: u32,
    /// Updates that arrived and were used.
    pub responded: u32,
    /// Training samples behind the aggregated updates.
    pub samples: u64,
    /// ε spent so far (at the job's δ), with DP.
    pub epsilon: Option<f64>,
}

/// Checks a participation rule: a fixed count must lie in `min..=max`, a
/// Poisson rate in `(0, 1]`.
pub fn check_participation(p: Participation, min: usize, max: usize) -> Result<()> {
    match p {
        Participation::All => Ok(()),
        Participation::Fixed { per_round } if !(min..=max).contains(&per_round) => {
            Err(Error::invalid(
                "clients per round",
                format!("{per_round} is not in {min}..={max}"),
            ))
        }
        Participation::Poisson { rate } if !(rate > 0.0 && rate <= 1.0) => Err(Error::invalid(
            "sample rate",
            format!("{rate} is not in (0, 1]"),
        )),
        _ => Ok(()),
    }
}

/// Checks a compression setting: a top-k fraction lies in `(0, 1]`.
pub fn check_compression(c: Compression) -> Result<()> {
    match c {
        Compression::TopK { fraction, .. } if !(fraction > 0.0 && fraction <= 1.0) => Err(
            Error::invalid("top-k fraction", format!("{fraction} is not in (0, 1]")),
        ),
        _ => Ok(()),
    }
}

/// Checks DP settings and that they are combined with FedAvg, whose
/// clipped, noised average is DP-FedAvg's aggregation.
pub fn check_privacy(privacy: Option<&Privacy>, aggregator: Aggregator) -> Result<()> {
    let Some(p) = privacy else {
        return Ok(());
    };
    p.dp.validate()?;
    Accountant::new(p.delta)?;
    if aggregator != Aggregator::FedAvg {
        return Err(Error::invalid(
            "aggregator",
            format!(
                "{} cannot be combined with DP: DP-FedAvg's clipped, noised \
                 average is the aggregation; use fedavg",
                aggregator.name()
            ),
        ));
    }
    if let Some(b) = p.budget_epsilon
        && !(b.is_finite() && b > 0.0)
    {
        return Err(Error::invalid(
            "epsilon budget",
            format!("{b} is not a finite positive number"),
        ));
    }
    Ok(())
}
