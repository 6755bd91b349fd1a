//! Federated training with N simulated clients in one process.
//!
//! A [`Simulation`] runs the same round as the network does, with the same
//! code for each step:
//!
//! 1. refuse the round if it would exceed the privacy budget
//!    ([`dp::Accountant`]);
//! 2. select participants: all clients, a fixed number
//!    ([`dp::fixed_size_sample`]) or Poisson sampling
//!    ([`dp::poisson_sample`]);
//! 3. each participant trains locally from the current global model
//!    ([`Trainer::train`]) on its partition ([`crate::split`]);
//! 4. each update is compressed (optionally top-k with per-client
//!    [`compress::ErrorFeedback`], or 8-bit quantization), encoded with the
//!    wire format and decoded again, counting the bytes;
//! 5. the server aggregates the deltas with the job's [`Aggregator`], or,
//!    with DP, clips, sums and noises them ([`dp::dp_fedavg`]) and records
//!    the round with the accountant;
//! 6. the new global model is evaluated on the test set and gets its
//!    [`ModelId`] and lineage ([`ModelVersion`]).
//!
//! Everything is a deterministic function of the configuration's seed: the
//! partition, the initial model, participant selection, local shuffles and
//! the DP noise each draw from their own seeded stream, so two runs produce
//! the same model ids round by round. (A real deployment draws the DP noise
//! from the OS; a simulation's noise is reproducible by design and protects
//! nothing.)
//!
//! The crate reads no clock: to report CPU time per round, pass a clock
//! with [`Simulation::with_clock`].
//!
//! ```
//! use std::ops::ControlFlow;
//! use openagi_learning::{data, models::Architecture, train::{Compute, TrainConfig}};
//! use openagi_learning::simulate::{Simulation, SimulationConfig};
//!
//! # fn main() -> Result<(), openagi_learning::Error> {
//! let (train, test) = data::digits()?.split(0.25, 1)?;
//! let config = SimulationConfig::fedavg(
//!     Architecture::logistic_regression(64, 10),
//!     4,                             // clients
//!     2,                             // rounds
//!     TrainConfig::sgd(0.5, 1, 16),  // lr, epochs, batch size
//!     42,                            // seed
//! );
//! let mut sim = Simulation::new(config, Compute::Cpu, &train, &test)?;
//! let summary = sim.run(|r| {
//!     let e = r.evaluation.expect("evaluated every round");
//!     println!("round {} accuracy {:.3} upload {} B", r.outcome.round, e.accuracy, r.upload_bytes);
//!     ControlFlow::Continue(())
//! })?;
//! assert_eq!(summary.rounds, 2);
//! # Ok(())
//! # }
//! ```

use std::ops::ControlFlow;
use std::time::Duration;

use openagi_crypto::Identity;
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregator, ClientId, ClientUpdate, FedAvgSum};
use crate::compress::{self, ErrorFeedback};
use crate::data::Dataset;
use crate::dp::Accountant;
use crate::model::{ModelId, ModelVersion};
use crate::models::Architecture;
use crate::round::{
    Compression, Participation, Privacy, RoundOutcome, aggregate_round, apply_delta,
    check_compression, check_participation, check_privacy, encode_update,
};
use crate::secagg::{
    DistributedNoise, FromParticipant, RoundObserver, SecAggSpec, Session, run_in_process,
};
use crate::train::{Compute, Evaluation, LocalUpdate, TrainConfig, Trainer};
use crate::{Error, Result, SeededRng, rng_from_seed};

/// Most simulated clients.
pub const MAX_CLIENTS: usize = 1_000_000;

/// How the training set is divided among clients.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Partition {
    /// [`crate::split::iid`].
    Iid,
    /// [`crate::split::dirichlet`] with concentration `alpha`.
    Dirichlet {
        /// Dirichlet α; small is skewed.
        alpha: f64,
    },
    /// [`crate::split::labels_per_client`].
    LabelsPerClient {
        /// Distinct labels per client.
        labels: usize,
    },
}

/// Everything a simulation run depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationConfig {
    /// The model.
    pub architecture: Architecture,
    /// Number of simulated clients.
    pub clients: usize,
    /// Rounds to run (at most; a privacy budget may stop it earlier).
    pub rounds: u64,
    /// Who takes part in each round.
    pub participation: Participation,
    /// How the training set is divided.
    pub partition: Partition,
    /// Local SGD.
    pub train: TrainConfig,
    /// Server aggregation of the deltas (must be FedAvg with DP, whose
    /// noisy average replaces it).
    pub aggregator: Aggregator,
    /// Client-level DP, if any.
    #[serde(default)]
    pub privacy: Option<Privacy>,
    /// Update compression.
    #[serde(default)]
    pub compression: Compression,
    /// Evaluate every this many rounds (and always after the last); at
    /// least 1.
    pub eval_every: u64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Poisoning clients, to measure what the aggregation rule withstands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<Attack>,
    /// Secure aggregation: each round's sum goes through the SecAgg+
    /// protocol, every participant and the coordinator run in this process
    /// (quantisation, masks, shares; with `privacy`, distributed noise),
    /// so accuracy and ε are what a secure job gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecAggSpec>,
}

/// Hostile clients in a simulation: clients `0..clients` send a poisoned
/// version of their honest update whenever they are selected.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attack {
    /// How many clients are hostile (the first ones; with an IID split
    /// they hold ordinary data).
    pub clients: usize,
    /// What they send.
    pub kind: AttackKind,
}

/// A poisoned update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AttackKind {
    /// The honest delta times `factor` (model boosting).
    Scale {
        /// The factor.
        factor: f32,
    },
    /// The honest delta times `−factor`: pushes the model away from where
    /// the data leads.
    SignFlip {
        /// The factor.
        factor: f32,
    },
}

impl Attack {
    fn poison(&self, client: usize, delta: &mut [f32]) {
        if client < self.clients {
            self.kind.apply(delta);
        }
    }
}

impl AttackKind {
    /// Turns an honest delta into this attack's.
    pub fn apply(&self, delta: &mut [f32]) {
        let factor = match *self {
            AttackKind::Scale { factor } => factor,
            AttackKind::SignFlip { factor } => -factor,
        };
        delta.iter_mut().for_each(|x| *x *= factor);
    }
}

impl SimulationConfig {
    /// A plain FedAvg run: all clients every round, IID partition, no DP,
    /// no compression, evaluation every round.
    pub fn fedavg(
        architecture: Architecture,
        clients: usize,
        rounds: u64,
        train: TrainConfig,
        seed: u64,
    ) -> Self {
        SimulationConfig {
            architecture,
            clients,
            rounds,
            participation: Participation::All,
            partition: Partition::Iid,
            train,
            aggregator: Aggregator::FedAvg,
            privacy: None,
            compression: Compression::None,
            eval_every: 1,
            seed,
            attack: None,
            secure_aggregation: None,
        }
    }

    /// Checks every setting that does not depend on the data.
    pub fn validate(&self) -> Result<()> {
        self.architecture.validate()?;
        self.train.validate()?;
        self.aggregator.validate()?;
        if !(1..=MAX_CLIENTS).contains(&self.clients) {
            return Err(Error::invalid(
                "client count",
                format!("{} is not in 1..={MAX_CLIENTS}", self.clients),
            ));
        }
        if self.rounds == 0 {
            return Err(Error::invalid("rounds", "must be at least 1"));
        }
        if self.eval_every == 0 {
            return Err(Error::invalid("eval_every", "must be at least 1"));
        }
        check_participation(self.participation, 1, self.clients)?;
        check_compression(self.compression)?;
        if let Some(attack) = &self.attack {
            let factor = match attack.kind {
                AttackKind::Scale { factor } | AttackKind::SignFlip { factor } => factor,
            };
            if attack.clients > self.clients || !factor.is_finite() {
                return Err(Error::invalid(
                    "attack",
                    format!(
                        "{} hostile clients of {} with factor {factor}: at most every client, \
                         and a finite factor",
                        attack.clients, self.clients
                    ),
                ));
            }
        }
        if let Some(secure) = &self.secure_aggregation {
            if self.aggregator != Aggregator::FedAvg || self.compression != Compression::None {
                return Err(Error::invalid(
                    "secure aggregation",
                    "works with fedavg and uncompressed updates: the coordinator only sees their sum",
                ));
            }
            secure.validate(self.distributed_noise())?;
        }
        check_privacy(self.privacy.as_ref(), self.aggregator)
    }

    /// The noise participants add under secure aggregation with DP.
    fn distributed_noise(&self) -> Option<DistributedNoise> {
        match (&self.secure_aggregation, &self.privacy) {
            (Some(_), Some(p)) => Some(DistributedNoise {
                clip_norm: p.dp.clip_norm,
                noise_multiplier: p.dp.noise_multiplier,
            }),
            _ => None,
        }
    }

    /// The accountant's sample rate `q` for one round.
    fn sample_rate(&self) -> f64 {
        self.participation.sample_rate(self.clients)
    }

    /// DP-FedAvg's fixed denominator: the expected number of participants.
    fn expected_participants(&self) -> f64 {
        self.participation.expected(self.clients)
    }
}

/// CPU time a round took, as measured by the caller's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundCpu {
    /// The whole round: selection, training, compression, aggregation,
    /// evaluation.
    pub total: Duration,
    /// Local training alone (all participants); `total − training` is the
    /// federated machinery's overhead plus evaluation.
    pub training: Duration,
    /// Evaluation alone.
    pub evaluation: Duration,
}

/// What happened in one round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundRecord {
    /// What the round did to the global model (the model is unchanged
    /// when no client sent an update, or too few for the aggregator).
    pub outcome: RoundOutcome,
    /// Mean local training loss over the participants that trained.
    pub train_loss: Option<f64>,
    /// Test-set accuracy and loss, on evaluation rounds.
    pub evaluation: Option<Evaluation>,
    /// Bytes uploaded by all participants, in the wire encoding.
    pub upload_bytes: u64,
    /// What the same uploads would have cost as dense `f32` payloads.
    pub dense_upload_bytes: u64,
    /// Bytes of the global model sent to the participants (dense).
    pub download_bytes: u64,
    /// CPU time, when a clock was given.
    pub cpu: Option<RoundCpu>,
}

/// Why [`Simulation::run`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// All configured rounds ran.
    Completed,
    /// The next round would have exceeded the ε budget.
    BudgetExhausted,
    /// The callback asked to stop.
    Stopped,
}

/// The outcome of [`Simulation::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Rounds run.
    pub rounds: u64,
    /// Why it stopped.
    pub stop: StopReason,
    /// The last evaluation, if any round was evaluated.
    pub last_evaluation: Option<Evaluation>,
    /// The final global model's id.
    pub model_id: ModelId,
}

/// Counts what participants send in a secure round, as postcard encodes it.
struct SentBytes(u64);

impl RoundObserver for SentBytes {
    fn sent(&mut self, _index: usize, message: &FromParticipant) {
        self.0 += postcard::to_allocvec(message).map_or(0, |b| b.len() as u64);
    }
}

/// A caller-provided CPU clock: any monotonically increasing CPU time.
pub type CpuClock<'a> = Box<dyn FnMut() -> Duration + Send + 'a>;

/// A seeded federated training run over in-memory data.
pub struct Simulation<'a> {
    config: SimulationConfig,
    trainer: Trainer,
    train: &'a Dataset,
    test: &'a Dataset,
    partitions: Vec<Vec<usize>>,
    params: Vec<f32>,
    version: ModelVersion,
    select_rng: SeededRng,
    noise_rng: SeededRng,
    accountant: Option<Accountant>,
    feedback: Vec<Option<ErrorFeedback>>,
    clock: Option<CpuClock<'a>>,
    threads: usize,
}

impl std::fmt::Debug for Simulation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("config", &self.config)
            .field("round", &self.version.round)
            .field("model", &self.version.id)
            .finish_non_exhaustive()
    }
}

/// A 32-byte seed for one purpose, derived from the run's seed: BLAKE3 of
/// a domain tag, the purpose and the seed, so streams never overlap.
fn derive_seed(seed: u64, purpose: &str, a: u64, b: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"openagi/simulate/v1\0");
    h.update(purpose.as_bytes());
    h.update(&[0]);
    h.update(&seed.to_le_bytes());
    h.update(&a.to_le_bytes());
    h.update(&b.to_le_bytes());
    *h.finalize().as_bytes()
}

fn derive_u64(seed: u64, purpose: &str, a: u64, b: u64) -> u64 {
    let bytes = derive_seed(seed, purpose, a, b);
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(first)
}

/// The simulated identity of client `c`.
fn client_id(c: usize) -> ClientId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&(c as u64).to_le_bytes());
    ClientId(id)
}

fn elapsed(clock: &mut Option<CpuClock<'_>>, since: Option<Duration>) -> Option<Duration> {
    match (clock, since) {
        (Some(c), Some(s)) => Some(c().saturating_sub(s)),
        _ => None,
    }
}

fn now(clock: &mut Option<CpuClock<'_>>) -> Option<Duration> {
    clock.as_mut().map(|c| c())
}

impl<'a> Simulation<'a> {
    /// Prepares a run: validates the configuration against the data,
    /// partitions `train` across the clients and builds the initial model
    /// from the seed. `test` must not be empty.
    pub fn new(
        config: SimulationConfig,
        compute: Compute,
        train: &'a Dataset,
        test: &'a Dataset,
    ) -> Result<Self> {
        config.validate()?;
        let trainer = Trainer::new(config.architecture.clone(), compute)?;
        trainer.check_data(train, &[])?;
        trainer.check_data(test, &[])?;
        if test.is_empty() {
            return Err(Error::Empty {
                what: "test samples",
            });
        }
        let split_seed = derive_u64(config.seed, "partition", 0, 0);
        let partitions = match config.partition {
            Partition::Iid => crate::split::iid(train.len(), config.clients, split_seed)?,
            Partition::Dirichlet { alpha } => {
                crate::split::dirichlet(train.labels(), config.clients, alpha, split_seed)?
            }
            Partition::LabelsPerClient { labels } => {
                crate::split::labels_per_client(train.labels(), config.clients, labels, split_seed)?
            }
        };
        let params = config
            .architecture
            .init_params(derive_u64(config.seed, "init", 0, 0))?;
        let id = ModelId::compute(trainer.descriptor(), &params)?;
        let accountant = match &config.privacy {
            Some(p) => Some(Accountant::new(p.delta)?),
            None => None,
        };
        Ok(Simulation {
            version: ModelVersion::genesis(format!("simulation-{}", config.seed), id),
            select_rng: rng_from_seed(derive_seed(config.seed, "select", 0, 0)),
            noise_rng: rng_from_seed(derive_seed(config.seed, "noise", 0, 0)),
            feedback: vec![None; config.clients],
            config,
            trainer,
            train,
            test,
            partitions,
            params,
            accountant,
            clock: None,
            threads: 1,
        })
    }

    /// Measures CPU time per round with `clock` (e.g. the process's CPU
    /// time, read by the caller).
    pub fn with_clock(mut self, clock: impl FnMut() -> Duration + Send + 'a) -> Self {
        self.clock = Some(Box::new(clock));
        self
    }

    /// Trains up to `threads` clients of a round at once, each on its own
    /// thread (1, the default, starts no threads). Results are identical
    /// for every thread count: each client's training is seeded by its
    /// round and index and single-threaded, and updates are aggregated in
    /// selection order.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SimulationConfig {
        &self.config
    }

    /// The current global parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The current global model's version (id, round, parent).
    pub fn version(&self) -> &ModelVersion {
        &self.version
    }

    /// Each client's training sample indices.
    pub fn partitions(&self) -> &[Vec<usize>] {
        &self.partitions
    }

    /// The trainer (architecture, descriptor, device).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// ε spent so far, with DP.
    pub fn epsilon(&self) -> Result<Option<f64>> {
        match &self.accountant {
            Some(a) => Ok(Some(a.spent()?.epsilon)),
            None => Ok(None),
        }
    }

    /// Evaluates the current global model on the test set.
    pub fn evaluate(&self) -> Result<Evaluation> {
        self.trainer.evaluate(&self.params, self.test)
    }

    /// Runs one round. Returns [`Error::BudgetExceeded`], changing
    /// nothing, if the round would push ε past the budget.
    pub fn step(&mut self) -> Result<RoundRecord> {
        let round = self.version.round + 1;
        let start = now(&mut self.clock);
        let q = self.config.sample_rate();
        if let (Some(p), Some(acc)) = (&self.config.privacy, &self.accountant)
            && let Some(budget) = p.budget_epsilon
        {
            // Under secure aggregation the sum carries the participants'
            // noise, charged over the quantised sensitivity: at least this.
            let z = self
                .config
                .secure_aggregation
                .and_then(|secure| {
                    let n = (self.config.expected_participants().floor() as usize).max(3);
                    secure
                        .round_config(n, n, 1_000, self.config.distributed_noise())
                        .minimum_charged_noise_multiplier(self.params.len())
                })
                .unwrap_or(p.dp.noise_multiplier);
            let after = acc.spent_after(q, z, 1)?;
            if after.epsilon > budget {
                return Err(Error::BudgetExceeded {
                    budget,
                    would_be: after.epsilon,
                });
            }
        }

        let selected = self
            .config
            .participation
            .select(self.config.clients, &mut self.select_rng)?;

        let dim = self.params.len();
        let dense_len = compress::dense_encoded_len(dim) as u64;
        // Plain FedAvg folds each update into one running sum as it is
        // decoded; DP and the robust rules need the whole round's set.
        let mut streamed = (self.config.privacy.is_none()
            && self.config.aggregator == Aggregator::FedAvg
            && self.config.secure_aggregation.is_none())
        .then(|| FedAvgSum::new(dim));
        let mut responders = Vec::new();
        let mut updates = Vec::new();
        let mut responded = 0usize;
        let mut samples = 0u64;
        let mut upload_bytes = 0u64;
        let mut training = Duration::ZERO;
        let mut loss_sum = 0.0;
        let mut trained = 0usize;
        // Clients train `threads` at a time, each on its own thread with
        // its own seed; their results are then used one by one in
        // selection order, so the thread count changes the speed and
        // never the model. At most `threads` local updates are held.
        for chunk in selected.chunks(self.threads) {
            let t0 = now(&mut self.clock);
            let locals = self.train_clients(round, chunk);
            training += elapsed(&mut self.clock, t0).unwrap_or_default();
            for (&c, local) in chunk.iter().zip(locals) {
                let local = local?;
                if local.samples == 0 && self.config.privacy.is_none() {
                    // Nothing to contribute; under DP a zero delta still
                    // takes part (the noise is calibrated to the selected
                    // set).
                    continue;
                }
                if local.steps > 0 {
                    loss_sum += local.mean_loss;
                    trained += 1;
                }
                let mut delta = local.delta;
                if let Some(attack) = &self.config.attack {
                    attack.poison(c, &mut delta);
                }
                let bytes = encode_update(self.config.compression, delta, &mut self.feedback[c])?;
                upload_bytes += bytes.len() as u64;
                // What the server works with is what it decodes from the
                // wire.
                let received = compress::decode(&bytes, dim)?.to_dense();
                let update = ClientUpdate::new(client_id(c), received, local.samples);
                responders.push(c);
                responded += 1;
                samples += update.samples;
                match &mut streamed {
                    Some(sum) => sum.add(&update)?,
                    None => updates.push(update),
                }
            }
        }

        let secure = self.config.secure_aggregation;
        let (aggregate, epsilon) = match streamed {
            _ if secure.is_some() => {
                let (aggregate, epsilon, bytes) =
                    self.secure_aggregate(round, &responders, &updates)?;
                upload_bytes = bytes;
                (aggregate, epsilon)
            }
            Some(sum) if sum.count() == 0 => (None, None),
            Some(sum) => (Some(sum.finish()?), None),
            None => {
                let dp_state = match (&self.config.privacy, &mut self.accountant) {
                    (Some(p), Some(acc)) => Some((p, acc)),
                    _ => None,
                };
                aggregate_round(
                    &updates,
                    dim,
                    &self.config.aggregator,
                    dp_state,
                    self.config.expected_participants(),
                    q,
                    &mut self.noise_rng,
                )?
            }
        };
        let parent = self.version.id;
        let aggregated = aggregate.is_some();
        let id = match aggregate {
            Some(delta) => {
                let (next, id) = apply_delta(self.trainer.descriptor(), &self.params, &delta)?;
                self.params = next;
                id
            }
            None => ModelId::compute(self.trainer.descriptor(), &self.params)?,
        };
        self.version = self.version.child(id);

        let last = round >= self.config.rounds;
        let eval_start = now(&mut self.clock);
        let evaluation = if last || round.is_multiple_of(self.config.eval_every) {
            Some(self.evaluate()?)
        } else {
            None
        };
        let evaluation_time = elapsed(&mut self.clock, eval_start);
        let cpu = match (elapsed(&mut self.clock, start), evaluation_time) {
            (Some(total), Some(evaluation)) => Some(RoundCpu {
                total,
                training,
                evaluation,
            }),
            _ => None,
        };
        Ok(RoundRecord {
            outcome: RoundOutcome {
                round,
                parent,
                model: id,
                aggregated,
                selected: u32::try_from(selected.len()).unwrap_or(u32::MAX),
                responded: u32::try_from(responded).unwrap_or(u32::MAX),
                samples,
                epsilon,
            },
            train_loss: (trained > 0).then(|| loss_sum / trained as f64),
            evaluation,
            upload_bytes,
            dense_upload_bytes: dense_len * responded as u64,
            download_bytes: dense_len * selected.len() as u64,
            cpu,
        })
    }

    /// A secure round's aggregate: the participants' updates summed by
    /// SecAgg+ run in this process, then averaged as the coordinator of a
    /// secure job does (over the expected participants under DP, charged
    /// the noise the sum carried; otherwise over those who took part).
    /// Also the bytes the participants sent. Fewer than three
    /// participants cannot run the protocol: the model stays.
    fn secure_aggregate(
        &mut self,
        round: u64,
        clients: &[usize],
        updates: &[ClientUpdate],
    ) -> Result<(Option<Vec<f32>>, Option<f64>, u64)> {
        let spent =
            |a: &Option<Accountant>| a.as_ref().and_then(|a| a.spent().ok()).map(|s| s.epsilon);
        let Some(secure) = self.config.secure_aggregation else {
            return Ok((None, None, 0));
        };
        let n = updates.len();
        if n < 3 {
            return Ok((None, spent(&self.accountant), 0));
        }
        // Nobody drops out here, so every round closes with all n: the
        // noise is split n ways.
        let config = secure.round_config(n, n, 1_000, self.config.distributed_noise());
        let identities: Vec<Identity> = clients
            .iter()
            .map(|&c| {
                Identity::from_seed(&derive_seed(self.config.seed, "secagg key", c as u64, 0))
            })
            .collect();
        let session = Session::new(
            config,
            derive_seed(self.config.seed, "secagg session", round, 0),
            identities.iter().map(Identity::public).collect(),
            self.params.len(),
        )?;
        let inputs: Vec<Vec<f32>> = updates.iter().map(|u| u.params.clone()).collect();
        let mut bytes = SentBytes(0);
        let result = run_in_process(
            &session,
            &identities,
            &inputs,
            &vec![false; n],
            &mut self.noise_rng,
            &mut bytes,
        )?;
        let q = self.config.sample_rate();
        match (&mut self.accountant, result.charged_noise_multiplier) {
            (Some(accountant), Some(z)) => {
                let epsilon = accountant.record_round(q, z)?.epsilon;
                let expected = self.config.expected_participants();
                let average = result
                    .sum
                    .iter()
                    .map(|&v| (f64::from(v) / expected) as f32)
                    .collect();
                Ok((Some(average), Some(epsilon), bytes.0))
            }
            _ => Ok((Some(result.mean()), None, bytes.0)),
        }
    }

    /// Local training of `clients` in round `round`, one scoped thread
    /// per client (the calling thread alone when there is one), results in
    /// the order of `clients`.
    fn train_clients(&self, round: u64, clients: &[usize]) -> Vec<Result<LocalUpdate>> {
        // Only the fields training reads are shared with the threads.
        let (trainer, params, data) = (&self.trainer, &self.params, self.train);
        let (partitions, config) = (&self.partitions, &self.config);
        let train_one = move |c: usize| {
            trainer.train(
                params,
                data,
                &partitions[c],
                &config.train,
                derive_u64(config.seed, "client", round, c as u64),
            )
        };
        if clients.len() <= 1 {
            return clients.iter().map(|&c| train_one(c)).collect();
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = clients
                .iter()
                .map(|&c| scope.spawn(move || train_one(c)))
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(Error::invalid(
                            "local training",
                            "a training thread panicked",
                        ))
                    })
                })
                .collect()
        })
    }

    /// Runs the remaining rounds, handing each record to `on_round`
    /// (return [`ControlFlow::Break`] to stop early). Stops cleanly before a
    /// round that would exceed the privacy budget.
    pub fn run(
        &mut self,
        mut on_round: impl FnMut(&RoundRecord) -> ControlFlow<()>,
    ) -> Result<Summary> {
        let mut last_evaluation = None;
        let mut stop = StopReason::Completed;
        while self.version.round < self.config.rounds {
            let record = match self.step() {
                Ok(r) => r,
                Err(Error::BudgetExceeded { .. }) => {
                    stop = StopReason::BudgetExhausted;
                    break;
                }
                Err(e) => return Err(e),
            };
            if record.evaluation.is_some() {
                last_evaluation = record.evaluation;
            }
            if on_round(&record).is_break() {
                stop = StopReason::Stopped;
                break;
            }
        }
        Ok(Summary {
            rounds: self.version.round,
            stop,
            last_evaluation,
            model_id: self.version.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::data::digits;
    use crate::dp::DpConfig;

    fn digits_split() -> (Dataset, Dataset) {
        digits().expect("digits").split(0.25, 7).expect("split")
    }

    fn lr_config(seed: u64) -> SimulationConfig {
        SimulationConfig::fedavg(
            Architecture::logistic_regression(64, 10),
            5,
            3,
            TrainConfig::sgd(0.5, 1, 16),
            seed,
        )
    }

    /// 5 clients, 3 rounds of FedAvg with logistic regression on the
    /// digits: the test accuracy clears 85% (seeds 0–9 all land between
    /// 0.919 and 0.931).
    /// Runs `config` to its end: the summary and every round's record.
    fn run_all(
        config: SimulationConfig,
        train: &Dataset,
        test: &Dataset,
    ) -> (Summary, Vec<RoundRecord>) {
        let mut sim = Simulation::new(config, Compute::Cpu, train, test).expect("sim");
        let mut records = Vec::new();
        let summary = sim
            .run(|r| {
                records.push(r.clone());
                ControlFlow::Continue(())
            })
            .expect("run");
        (summary, records)
    }

    #[test]
    fn short_fedavg_run_learns_digits() {
        let (train, test) = digits_split();
        let mut sim = Simulation::new(lr_config(1), Compute::Cpu, &train, &test).expect("sim");
        let mut records = Vec::new();
        let summary = sim
            .run(|r| {
                records.push(r.clone());
                ControlFlow::Continue(())
            })
            .expect("run");
        assert_eq!(summary.stop, StopReason::Completed);
        assert_eq!(summary.rounds, 3);
        assert_eq!(records.len(), 3);
        let acc = summary.last_evaluation.expect("evaluated").accuracy;
        assert!(acc >= 0.85, "accuracy {acc}");
        let dim = 650u64;
        for r in &records {
            assert_eq!(r.outcome.selected, 5);
            assert_eq!(r.outcome.samples, train.len() as u64);
            assert_eq!(r.upload_bytes, 5 * (8 + 4 * dim));
            assert_eq!(r.upload_bytes, r.dense_upload_bytes);
            assert!(r.cpu.is_none() && r.outcome.epsilon.is_none());
        }
        assert!(records[2].evaluation.expect("e").loss < records[0].evaluation.expect("e").loss);
        assert_eq!(sim.version().round, 3);
        assert_eq!(sim.version().id, summary.model_id);
    }

    /// Final accuracy of a 10-client digits run with `aggregator` and
    /// `attack`.
    fn poisoned_accuracy(aggregator: Aggregator, attack: Option<Attack>, seed: u64) -> f64 {
        let (train, test) = digits_split();
        let mut config = SimulationConfig::fedavg(
            Architecture::logistic_regression(64, 10),
            10,
            6,
            TrainConfig::sgd(0.5, 1, 16),
            seed,
        );
        config.aggregator = aggregator;
        config.attack = attack;
        let mut sim = Simulation::new(config, Compute::Cpu, &train, &test).expect("sim");
        let summary = sim.run(|_| ControlFlow::Continue(())).expect("run");
        summary.last_evaluation.expect("evaluated").accuracy
    }

    /// Two of ten clients send sign-flipped (×4) or boosted (×20) updates
    /// every round of a 6-round digits run, seeds 0–2.
    #[test]
    fn robust_rules_withstand_poisoning_clients() {
        for seed in 0..3 {
            let honest = poisoned_accuracy(Aggregator::FedAvg, None, seed);
            for kind in [
                AttackKind::SignFlip { factor: 4.0 },
                AttackKind::Scale { factor: 20.0 },
            ] {
                let attack = Some(Attack { clients: 2, kind });
                let fedavg = poisoned_accuracy(Aggregator::FedAvg, attack, seed);
                let median = poisoned_accuracy(Aggregator::Median, attack, seed);
                let trimmed =
                    poisoned_accuracy(Aggregator::TrimmedMean { beta: 0.2 }, attack, seed);
                let krum = poisoned_accuracy(Aggregator::Krum { f: 2 }, attack, seed);
                let multi = poisoned_accuracy(Aggregator::MultiKrum { f: 2, m: 6 }, attack, seed);
                let line = format!(
                    "seed {seed} {kind:?}: honest {honest:.3} fedavg {fedavg:.3} median \
                     {median:.3} trimmed {trimmed:.3} krum {krum:.3} multikrum {multi:.3}"
                );
                eprintln!("{line}");
                // Two of ten clients wreck plain FedAvg...
                assert!(fedavg < honest - 0.3, "{line}");
                // ...Multi-Krum loses at most 2 points against the honest
                // run; median, trimmed mean and Krum (one update, no
                // averaging) at most 6 (seed 2's sign flip: 3.1, 4.2, 4.9).
                assert!(multi >= honest - 0.02, "{line}");
                for robust in [median, trimmed, krum] {
                    assert!(robust >= honest - 0.06, "{line}");
                }
            }
        }
    }

    #[test]
    fn same_seed_same_models() {
        let (train, test) = digits_split();
        let ids = |seed| {
            let mut config = lr_config(seed);
            config.rounds = 2;
            config.participation = Participation::Fixed { per_round: 3 };
            config.compression = Compression::TopK {
                fraction: 0.1,
                quantize: true,
            };
            let mut sim = Simulation::new(config, Compute::Cpu, &train, &test).expect("sim");
            let mut ids = Vec::new();
            sim.run(|r| {
                ids.push(r.outcome.model);
                ControlFlow::Continue(())
            })
            .expect("run");
            ids
        };
        let a = ids(5);
        assert_eq!(a.len(), 2);
        assert_eq!(a, ids(5));
        assert_ne!(a, ids(6));
    }

    /// Training clients on several threads changes nothing: the same
    /// model ids round by round for 1, 2, 3 and 8 threads, with streamed
    /// FedAvg, with compression's error feedback, with DP and with a
    /// robust rule.
    #[test]
    fn thread_count_never_changes_the_model() {
        let (train, test) = digits_split();
        let mut plain = lr_config(11);
        plain.rounds = 2;
        let mut compressed = plain.clone();
        compressed.participation = Participation::Fixed { per_round: 4 };
        compressed.compression = Compression::TopK {
            fraction: 0.1,
            quantize: true,
        };
        let mut private = plain.clone();
        private.participation = Participation::Poisson { rate: 0.8 };
        private.privacy = Some(Privacy {
            dp: crate::dp::DpConfig {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            },
            delta: 1e-5,
            budget_epsilon: None,
        });
        let mut robust = plain.clone();
        robust.aggregator = Aggregator::Median;
        for config in [plain, compressed, private, robust] {
            let run = |threads| {
                let mut sim = Simulation::new(config.clone(), Compute::Cpu, &train, &test)
                    .expect("sim")
                    .with_threads(threads);
                let mut seen = Vec::new();
                sim.run(|r| {
                    seen.push((r.outcome.model, r.outcome.responded, r.upload_bytes));
                    ControlFlow::Continue(())
                })
                .expect("run");
                seen
            };
            let single = run(1);
            assert_eq!(single.len(), 2);
            for threads in [2, 3, 8] {
                assert_eq!(run(threads), single, "{threads} threads, {config:?}");
            }
        }
    }

    #[test]
    fn dp_and_compression_report_epsilon_and_bytes() {
        let (train, test) = digits_split();
        let mut config = lr_config(3);
        config.rounds = 4;
        config.participation = Participation::Poisson { rate: 0.6 };
        config.compression = Compression::TopK {
            fraction: 0.05,
            quantize: false,
        };
        config.privacy = Some(Privacy {
            dp: DpConfig {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            },
            delta: 1e-5,
            budget_epsilon: Some(8.0),
        });
        let mut ticks = 0u64;
        let mut sim = Simulation::new(config, Compute::Cpu, &train, &test)
            .expect("sim")
            .with_clock(move || {
                ticks += 1;
                Duration::from_millis(ticks)
            });
        let mut records = Vec::new();
        let summary = sim
            .run(|r| {
                records.push(r.clone());
                ControlFlow::Continue(())
            })
            .expect("run");
        // ε grows every round and the budget stops the run before 8.
        let eps: Vec<f64> = records
            .iter()
            .map(|r| r.outcome.epsilon.expect("eps"))
            .collect();
        assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
        assert!(eps.iter().all(|&e| e <= 8.0));
        assert_eq!(summary.rounds as usize, records.len());
        for r in &records {
            assert!(r.cpu.is_some());
            if r.outcome.selected > 0 {
                assert!(r.upload_bytes * 5 < r.dense_upload_bytes, "{r:?}");
            }
        }
        // Far fewer rounds fit a small budget.
        let mut tight = lr_config(3);
        tight.privacy = Some(Privacy {
            dp: DpConfig {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            },
            delta: 1e-5,
            budget_epsilon: Some(4.0),
        });
        let mut sim = Simulation::new(tight, Compute::Cpu, &train, &test).expect("sim");
        let s = sim.run(|_| ControlFlow::Continue(())).expect("run");
        assert_eq!(s.stop, StopReason::BudgetExhausted);
        assert!(s.rounds < 3);
    }

    /// The same run with and without secure aggregation: the masks cancel,
    /// so the models differ only by quantisation (20 bits on [−4, 4]) and
    /// the final accuracies agree to a point; with DP the participants'
    /// noise is charged, and the model is the same for the same seed.
    #[test]
    fn secure_aggregation_sums_what_fedavg_sums() {
        let (train, test) = digits_split();
        let run = |config: SimulationConfig| run_all(config, &train, &test);
        let secure = SecAggSpec {
            neighbours: 4,
            threshold: None,
            clip_range: 4.0,
            quant_bits: crate::secagg::DEFAULT_QUANT_BITS,
        };
        let mut plain = lr_config(2);
        plain.rounds = 4;
        let mut masked = plain.clone();
        masked.secure_aggregation = Some(secure);
        let (p, _) = run(plain.clone());
        let (m, records) = run(masked.clone());
        let (pa, ma) = (
            p.last_evaluation.expect("e").accuracy,
            m.last_evaluation.expect("e").accuracy,
        );
        assert!((pa - ma).abs() <= 0.01, "plain {pa}, secure {ma}");
        assert_ne!(p.model_id, m.model_id, "quantised, not bit-equal");
        for r in &records {
            assert_eq!(r.outcome.responded, 5);
            // Keys, shares and a masked u32 per coordinate.
            assert!(r.upload_bytes > r.dense_upload_bytes, "{r:?}");
        }
        assert_eq!(run(masked.clone()).0.model_id, m.model_id, "seeded");

        masked.privacy = Some(Privacy {
            dp: DpConfig {
                clip_norm: 1.0,
                noise_multiplier: 0.5,
            },
            delta: 1e-5,
            budget_epsilon: None,
        });
        let (_, records) = run(masked.clone());
        let eps: Vec<f64> = records
            .iter()
            .map(|r| r.outcome.epsilon.expect("eps"))
            .collect();
        assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");

        let mut wrong = masked;
        wrong.compression = Compression::TopK {
            fraction: 0.1,
            quantize: false,
        };
        assert!(Simulation::new(wrong, Compute::Cpu, &train, &test).is_err());
    }

    #[test]
    fn simulation_can_move_to_a_worker_thread() {
        fn is_send<T: Send>() {}
        is_send::<Simulation<'static>>();
        is_send::<Trainer>();
    }

    #[test]
    fn bad_configs_are_refused() {
        let (train, test) = digits_split();
        let mut c = lr_config(0);
        c.participation = Participation::Fixed { per_round: 6 };
        assert!(Simulation::new(c, Compute::Cpu, &train, &test).is_err());
        let mut c = lr_config(0);
        c.aggregator = Aggregator::Median;
        c.privacy = Some(Privacy {
            dp: DpConfig {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            },
            delta: 1e-5,
            budget_epsilon: None,
        });
        assert!(Simulation::new(c, Compute::Cpu, &train, &test).is_err());
        let mut c = lr_config(0);
        c.architecture = Architecture::logistic_regression(784, 10);
        let e = Simulation::new(c, Compute::Cpu, &train, &test).expect_err("features");
        assert_eq!(e.kind(), ErrorKind::InvalidData);
        let mut c = lr_config(0);
        c.compression = Compression::TopK {
            fraction: 0.0,
            quantize: false,
        };
        assert!(Simulation::new(c, Compute::Cpu, &train, &test).is_err());
        let json = serde_json::to_string(&lr_config(0)).expect("ser");
        let back: SimulationConfig = serde_json::from_str(&json).expect("de");
        assert_eq!(back, lr_config(0));
    }
}
