//! Federated training across nodes, coordinated through the ledger.
//!
//! A job is a ledger record; so is every node's offer to train for it and
//! every round's start and end. Everything a node needs to follow a job is
//! therefore in its ledger, in the same order on every node:
//!
//! 1. A researcher's node commits [`Record::Job`] with the [`JobSpec`]; that
//!    node is the job's coordinator (the aggregator of every round).
//! 2. Nodes whose local data fits the job's schema commit [`Record::Join`].
//! 3. The [`Coordinator`] waits for at least `min_clients` joins (and the
//!    join window), selects the round's participants deterministically from
//!    the joins and a seed derived from the job and round
//!    ([`select_participants`]) and commits [`Record::RoundStart`] naming
//!    them and the current model.
//! 4. Each participant fetches that model (the node serves it in chunks;
//!    its [`ModelId`] is checked), trains on its own data, clips (with DP)
//!    and compresses its delta ([`client_update`]) and sends it to the
//!    coordinator.
//! 5. The coordinator closes the round when every participant answered or
//!    its deadline passed: it aggregates if at least `min_clients` updates
//!    arrived (else the model stays), adds DP noise and accounts ε, and
//!    commits [`Record::RoundEnd`] with the new model's id, ε and who
//!    straggled. The next round starts from that commit.
//!
//! Rounds never hang: the deadline closes a round whoever is missing, and
//! a privacy budget ends the job before a round that would exceed it.
//!
//! A job with `secure_aggregation` replaces steps 4 and 5's plain updates
//! with a SecAgg+ round ([`crate::secagg`]): participants exchange keys and
//! encrypted shares through the coordinator ([`LearnRequest::SecAgg`],
//! polled), send masked, quantised updates, and the coordinator learns only
//! their sum. With `[privacy]` too, each participant adds its share of the
//! Gaussian noise (distributed DP) and the coordinator adds none.
//!
//! Records travel signed by the node that made them ([`SignedRecord`]), so
//! a join names its node and only the coordinator can start or end rounds.
//! This module is pure: time comes in as milliseconds, randomness as seeds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use openagi_crypto::identity::SignedPayload;
use openagi_crypto::{PublicKey, Signed};
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregator, ClientId, ClientUpdate};
use crate::compress::{self, ErrorFeedback};
use crate::data::{DataProfile, Dataset};
use crate::dp::{self, Accountant};
use crate::model::ModelId;
use crate::models::Architecture;
use crate::round::{
    Compression, Participation, Privacy, RoundOutcome, aggregate_round, apply_delta,
    check_compression, check_participation, check_privacy, encode_update,
};
use crate::secagg::{
    self, DistributedNoise, FromParticipant, Index, SecAggCoordinator, SecAggResult, SecAggSpec,
    Session, ToParticipant,
};
use crate::train::{TrainConfig, Trainer};
use crate::{Error, Result, rng_from_seed};

/// Prefix of every learning record in a ledger transaction's payload.
pub const RECORD_TAG: &[u8] = b"openagi/learn/v1\n";
/// Largest encoded record.
pub const MAX_RECORD_BYTES: usize = 32 * 1024;
/// Most participants in one round (and most joins a job keeps).
pub const MAX_PARTICIPANTS: usize = 1024;
/// Most rounds a job may ask for.
pub const MAX_ROUNDS: u64 = 100_000;
/// Most parameters a job's model may have: a dense update of it (4 bytes a
/// parameter) must fit one learning request on the wire (16 MiB).
pub const MAX_JOB_PARAMS: usize = 4 * 1024 * 1024 - 1024;
/// Longest round deadline, in seconds.
pub const MAX_DEADLINE_SECS: u64 = 24 * 60 * 60;
/// Most standby coordinators a job may name.
pub const MAX_STANDBYS: usize = 8;

/// A job's identity: BLAKE3 of its signed record's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub [u8; 32]);

impl JobId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self> {
        let text = text.trim();
        let invalid = || Error::invalid("job id", format!("{text:?} is not 64 hex digits"));
        let mut id = [0u8; 32];
        hex::decode_to_slice(text, &mut id).map_err(|_| invalid())?;
        Ok(JobId(id))
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn default_join_window() -> u64 {
    3
}

/// A training job as a researcher writes it (`openagi learn submit
/// JOB.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for people; not an identifier.
    pub name: String,
    /// The model. Its input width and class count are the data schema a
    /// node's local data must fit to join.
    pub architecture: Architecture,
    /// Rounds to run (a privacy budget may end the job sooner).
    pub rounds: u64,
    /// Fewest updates a round aggregates; with fewer by the deadline the
    /// round ends without changing the model.
    pub min_clients: usize,
    /// Seconds a round waits for updates after its start is committed.
    pub round_deadline_secs: u64,
    /// Seconds the coordinator waits for joins before the first round.
    #[serde(default = "default_join_window")]
    pub join_window_secs: u64,
    /// Who of the joined nodes takes part in each round.
    pub participation: Participation,
    /// Local SGD.
    pub train: TrainConfig,
    /// Aggregation rule (FedAvg under DP).
    pub aggregator: Aggregator,
    /// Client-level differential privacy.
    #[serde(default)]
    pub privacy: Option<Privacy>,
    /// Update compression.
    #[serde(default)]
    pub compression: Compression,
    /// Secure aggregation: the coordinator learns only each round's sum.
    /// Absent from the encoding when off, so older jobs keep their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecAggSpec>,
    /// Nodes (Ed25519 public keys in hex) that take the job over, in this
    /// order, when its coordinator makes no progress for
    /// `coordinator_timeout_secs` (see [`Record::Takeover`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standby_coordinators: Vec<String>,
    /// Seconds without a record from the coordinator before the first
    /// standby takes over (the k-th waits k times as long). Default: three
    /// round deadlines and 30 s (six with secure aggregation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_timeout_secs: Option<u64>,
    /// Seed of the initial model, participant selection and local shuffles
    /// (public; DP noise is drawn from the coordinator's OS instead).
    pub seed: u64,
}

impl JobSpec {
    /// Checks every setting; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.len() > 128 {
            return Err(Error::invalid("name", "must be 1 to 128 bytes"));
        }
        self.architecture.validate()?;
        let params = self.architecture.param_count()?;
        if params > MAX_JOB_PARAMS {
            return Err(Error::invalid(
                "architecture",
                format!("{params} parameters; a networked job allows at most {MAX_JOB_PARAMS}"),
            ));
        }
        self.train.validate()?;
        self.aggregator.validate()?;
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return Err(Error::invalid(
                "rounds",
                format!("{} is not in 1..={MAX_ROUNDS}", self.rounds),
            ));
        }
        if !(1..=MAX_PARTICIPANTS).contains(&self.min_clients) {
            return Err(Error::invalid(
                "min_clients",
                format!("{} is not in 1..={MAX_PARTICIPANTS}", self.min_clients),
            ));
        }
        if self.min_clients < self.aggregator.min_clients() {
            return Err(Error::invalid(
                "min_clients",
                format!(
                    "{} needs at least {} updates a round",
                    self.aggregator.name(),
                    self.aggregator.min_clients()
                ),
            ));
        }
        if !(1..=MAX_DEADLINE_SECS).contains(&self.round_deadline_secs) {
            return Err(Error::invalid(
                "round_deadline_secs",
                format!(
                    "{} is not in 1..={MAX_DEADLINE_SECS}",
                    self.round_deadline_secs
                ),
            ));
        }
        if self.join_window_secs > MAX_DEADLINE_SECS {
            return Err(Error::invalid(
                "join_window_secs",
                format!("at most {MAX_DEADLINE_SECS}"),
            ));
        }
        check_participation(self.participation, self.min_clients, MAX_PARTICIPANTS)?;
        check_compression(self.compression)?;
        check_privacy(self.privacy.as_ref(), self.aggregator)?;
        if let Some(secure) = &self.secure_aggregation {
            if self.aggregator != Aggregator::FedAvg {
                return Err(Error::invalid(
                    "aggregator",
                    format!(
                        "{} cannot be combined with secure aggregation: the coordinator \
                         sees only the sum, so the rule must be fedavg",
                        self.aggregator.name()
                    ),
                ));
            }
            if self.compression != Compression::None {
                return Err(Error::invalid(
                    "compression",
                    "secure aggregation masks every coordinate; set compression = \"none\"",
                ));
            }
            secure.validate(self.distributed_noise())?;
        }
        self.standbys()?;
        // A healthy coordinator may stay silent for a join window and a
        // round deadline: a shorter timeout would hand its job over.
        let least = self
            .round_deadline_secs
            .saturating_add(self.join_window_secs)
            .max(1);
        if let Some(t) = self.coordinator_timeout_secs
            && !(least..=MAX_DEADLINE_SECS).contains(&t)
        {
            return Err(Error::invalid(
                "coordinator_timeout_secs",
                format!(
                    "{t} is not in {least}..={MAX_DEADLINE_SECS} (at least round_deadline_secs \
                     + join_window_secs)"
                ),
            ));
        }
        Ok(())
    }

    /// The standby coordinators' keys, in order.
    pub fn standbys(&self) -> Result<Vec<PublicKey>> {
        if self.standby_coordinators.len() > MAX_STANDBYS {
            return Err(Error::invalid(
                "standby_coordinators",
                format!(
                    "{} given, at most {MAX_STANDBYS}",
                    self.standby_coordinators.len()
                ),
            ));
        }
        let mut keys: Vec<PublicKey> = Vec::with_capacity(self.standby_coordinators.len());
        for text in &self.standby_coordinators {
            let key = PublicKey::from_hex(text.trim()).map_err(|e| {
                Error::invalid(
                    "standby_coordinators",
                    format!("{text:?} is not a public key in hex: {e}"),
                )
            })?;
            if keys.contains(&key) {
                return Err(Error::invalid(
                    "standby_coordinators",
                    format!("{text} is listed twice"),
                ));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// How long a coordinator may go without a record before the first
    /// standby takes over, in milliseconds.
    pub fn takeover_after_ms(&self) -> u64 {
        // A plain round waits one deadline, a secure one up to five.
        let rounds = if self.secure_aggregation.is_some() {
            6
        } else {
            3
        };
        self.coordinator_timeout_secs
            .unwrap_or_else(|| {
                self.round_deadline_secs
                    .saturating_mul(rounds)
                    .saturating_add(30)
            })
            .saturating_mul(1000)
    }

    /// Position of `key` in the job's chain of coordinators: 0 for the
    /// submitter, k for the k-th standby; `None` for anyone else.
    pub fn chain_position(&self, submitter: &PublicKey, key: &PublicKey) -> Option<usize> {
        if key == submitter {
            return Some(0);
        }
        self.standbys()
            .ok()?
            .iter()
            .position(|k| k == key)
            .map(|i| i + 1)
    }

    /// The noise each participant adds under secure aggregation with DP.
    pub fn distributed_noise(&self) -> Option<DistributedNoise> {
        match (&self.secure_aggregation, &self.privacy) {
            (Some(_), Some(p)) => Some(DistributedNoise {
                clip_norm: p.dp.clip_norm,
                noise_multiplier: p.dp.noise_multiplier,
            }),
            _ => None,
        }
    }

    /// How the job protects updates: `"none"`, `"central"` (the
    /// coordinator clips, sums and adds noise) or `"distributed"` (secure
    /// aggregation, participants add the noise), with `"+secagg"` when the
    /// coordinator sees only sums.
    pub fn privacy_mode(&self) -> &'static str {
        match (&self.secure_aggregation, &self.privacy) {
            (None, None) => "none",
            (None, Some(_)) => "central",
            (Some(_), None) => "none+secagg",
            (Some(_), Some(_)) => "distributed+secagg",
        }
    }

    /// Whether a data set fits the job's schema (feature count, labels
    /// below the class count).
    pub fn accepts(&self, data: &Dataset) -> bool {
        self.misfit(data).is_none()
    }

    /// Why a data set does not fit the job's schema, in words an operator
    /// can act on; `None` when it fits.
    pub fn misfit(&self, data: &Dataset) -> Option<String> {
        self.misfit_profile(&data.profile())
    }

    /// [`JobSpec::misfit`] for a data set known by its shape.
    pub fn misfit_profile(&self, data: &DataProfile) -> Option<String> {
        if data.samples == 0 {
            return Some("the local data set is empty".into());
        }
        if data.features != self.architecture.inputs() {
            return Some(format!(
                "the local data has {} features per sample and the job's model takes {}",
                data.features,
                self.architecture.inputs()
            ));
        }
        if data.classes > self.architecture.classes() {
            return Some(format!(
                "the local data has {} classes and the job's model outputs {}",
                data.classes,
                self.architecture.classes()
            ));
        }
        None
    }

    /// The round-0 model: the architecture initialised from the job seed,
    /// so every node can compute and check it.
    pub fn initial_params(&self) -> Result<Vec<f32>> {
        self.architecture.init_params(self.seed)
    }
}

/// A learning record as committed on the ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// A new job, as the JSON of its [`JobSpec`] (the spec's tagged enums
    /// need a self-describing format); its signer coordinates it. Build it
    /// with [`Record::job`], read it with [`Record::job_spec`].
    Job(String),
    /// The signer offers to train for `job` with `samples` local samples.
    Join {
        /// The job.
        job: JobId,
        /// Local training samples (informational).
        samples: u64,
    },
    /// The coordinator opens a round.
    RoundStart {
        /// The job.
        job: JobId,
        /// Round number, from 1.
        round: u64,
        /// The model participants train from.
        model: ModelId,
        /// Who takes part (node public keys), as selected by
        /// [`select_participants`].
        participants: Vec<PublicKey>,
    },
    /// The coordinator closes a round.
    RoundEnd(RoundSummary),
    /// The signer, a standby coordinator of the job, coordinates it from
    /// here on. It counts when the signer comes later in the job's chain
    /// (submitter, then the standbys in order) than the coordinator it
    /// replaces: every node applies the same rule in ledger order. A
    /// standby submits it when the coordinator has made no progress for
    /// the job's timeout (k timeouts for the k-th standby).
    Takeover {
        /// The job.
        job: JobId,
    },
}

/// How a round ended, as committed by the coordinator: a
/// [`RoundOutcome`] with the job, the refused updates, the accuracy and
/// whether the job is over. Its field order is the ledger encoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u64,
    /// The model after the round (the parent when nothing was aggregated).
    pub model: ModelId,
    /// The model the round started from.
    pub parent: ModelId,
    /// Whether enough updates arrived to change the model.
    pub aggregated: bool,
    /// Participants selected.
    pub selected: u32,
    /// Updates received in time.
    pub responded: u32,
    /// Updates received in time from the selected, refused as malformed.
    pub rejected: u32,
    /// Samples behind the aggregated updates.
    pub samples: u64,
    /// Accumulated ε after this round, with DP.
    pub epsilon: Option<f64>,
    /// Test accuracy of the new model on the coordinator's evaluation set.
    pub accuracy: Option<f64>,
    /// Whether this was the job's last round.
    pub finished: bool,
}

impl RoundSummary {
    /// The ledger record of a round's `outcome`.
    pub fn new(
        job: JobId,
        outcome: &RoundOutcome,
        rejected: u32,
        accuracy: Option<f64>,
        finished: bool,
    ) -> Self {
        Self {
            job,
            round: outcome.round,
            model: outcome.model,
            parent: outcome.parent,
            aggregated: outcome.aggregated,
            selected: outcome.selected,
            responded: outcome.responded,
            rejected,
            samples: outcome.samples,
            epsilon: outcome.epsilon,
            accuracy,
            finished,
        }
    }

    /// What the round did to the model.
    pub fn outcome(&self) -> RoundOutcome {
        RoundOutcome {
            round: self.round,
            parent: self.parent,
            model: self.model,
            aggregated: self.aggregated,
            selected: self.selected,
            responded: self.responded,
            samples: self.samples,
            epsilon: self.epsilon,
        }
    }
}

impl Record {
    /// The record of a new job.
    pub fn job(spec: &JobSpec) -> Result<Record> {
        spec.validate()?;
        serde_json::to_string(spec)
            .map(Record::Job)
            .map_err(|e| Error::invalid("job spec", e.to_string()))
    }

    /// The validated spec of a job record (`None` for other records).
    pub fn job_spec(&self) -> Result<Option<JobSpec>> {
        let Record::Job(json) = self else {
            return Ok(None);
        };
        let spec: JobSpec =
            serde_json::from_str(json).map_err(|e| Error::invalid("job spec", e.to_string()))?;
        spec.validate()?;
        Ok(Some(spec))
    }
}

impl SignedPayload for Record {
    const CONTEXT: &'static str = "openagi/learn/record/v1";
}

/// A record with its signer's signature, as stored in a transaction.
pub type SignedRecord = Signed<Record>;

/// Encodes a signed record as a transaction payload.
pub fn encode_record(record: &SignedRecord) -> Result<Vec<u8>> {
    let body = postcard::to_stdvec(record).map_err(|e| Error::Malformed {
        detail: format!("learning record: {e}"),
    })?;
    let mut out = Vec::with_capacity(RECORD_TAG.len() + body.len());
    out.extend_from_slice(RECORD_TAG);
    out.extend_from_slice(&body);
    if out.len() > MAX_RECORD_BYTES {
        return Err(Error::TooLarge {
            what: "learning record",
            limit: MAX_RECORD_BYTES,
            found: out.len(),
        });
    }
    Ok(out)
}

/// Decodes a transaction payload: `Ok(None)` when it is not a learning
/// record at all, an error when it claims to be one but is malformed or
/// its signature does not verify.
pub fn decode_record(payload: &[u8]) -> Result<Option<(PublicKey, Record)>> {
    let Some(body) = payload.strip_prefix(RECORD_TAG) else {
        return Ok(None);
    };
    if payload.len() > MAX_RECORD_BYTES {
        return Err(Error::TooLarge {
            what: "learning record",
            limit: MAX_RECORD_BYTES,
            found: payload.len(),
        });
    }
    let signed: SignedRecord = postcard::from_bytes(body).map_err(|e| Error::Malformed {
        detail: format!("learning record: {e}"),
    })?;
    let signer = *signed.signer();
    let record = signed.verify().map_err(|e| Error::Malformed {
        detail: format!("learning record signature: {e}"),
    })?;
    record.job_spec()?;
    Ok(Some((signer, record)))
}

/// The id of a job committed as `payload` (see [`encode_record`]).
pub fn job_id(payload: &[u8]) -> JobId {
    JobId(*blake3::hash(payload).as_bytes())
}

fn round_seed(job: &JobId, seed: u64, round: u64, purpose: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"openagi/learn/round/v1\0");
    h.update(purpose.as_bytes());
    h.update(&[0]);
    h.update(&job.0);
    h.update(&seed.to_le_bytes());
    h.update(&round.to_le_bytes());
    *h.finalize().as_bytes()
}

/// The participants of `round`: a deterministic function of the joined
/// nodes (in ledger order), the job and the round, so any node can check
/// the coordinator's choice.
pub fn select_participants(
    job: &JobId,
    spec: &JobSpec,
    round: u64,
    joined: &[PublicKey],
) -> Result<Vec<PublicKey>> {
    let mut rng = rng_from_seed(round_seed(job, spec.seed, round, "select"));
    let picked = spec.participation.select(joined.len(), &mut rng)?;
    Ok(picked.into_iter().map(|i| joined[i]).collect())
}

/// The seed a participant's local shuffles use in `round`.
pub fn training_seed(job: &JobId, spec: &JobSpec, round: u64, node: &PublicKey) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&round_seed(job, spec.seed, round, "train"));
    h.update(&node.to_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The secure-aggregation session of `round` of `job`, for its
/// `participants` in their committed order; `None` when the job does not
/// use secure aggregation. Coordinator and participants build the same one.
pub fn secure_session(
    job: &JobId,
    spec: &JobSpec,
    round: u64,
    participants: &[PublicKey],
    dimension: usize,
) -> Result<Option<Session>> {
    let Some(secure) = &spec.secure_aggregation else {
        return Ok(None);
    };
    let config = secure.round_config(
        participants.len(),
        spec.min_clients,
        spec.round_deadline_secs.saturating_mul(1000),
        spec.distributed_noise(),
    );
    let mut h = blake3::Hasher::new_derive_key("openagi secagg 2026 round context v1");
    h.update(&job.0);
    h.update(&round.to_le_bytes());
    Session::new(
        config,
        *h.finalize().as_bytes(),
        participants.to_vec(),
        dimension,
    )
    .map(Some)
}

/// A participant's training for a round: the local delta from `params` on
/// `data` and the samples behind it, unclipped and uncompressed (secure
/// aggregation quantises it; [`client_update`] encodes it).
pub fn client_delta(
    spec: &JobSpec,
    trainer: &Trainer,
    params: &[f32],
    data: &Dataset,
    seed: u64,
    progress: impl FnMut(crate::train::Progress),
) -> Result<(Vec<f32>, u64)> {
    trainer.descriptor().check_params(params)?;
    let indices = data.all_indices();
    let local = trainer.train_with_progress(params, data, &indices, &spec.train, seed, progress)?;
    Ok((local.delta, local.samples))
}

/// A participant's side of a round: trains from `params` on `data`,
/// clips the delta to the job's DP bound (if any), compresses it as the
/// job says (carrying the error-feedback state in `feedback`) and returns
/// the wire payload and the sample count.
pub fn client_update(
    spec: &JobSpec,
    trainer: &Trainer,
    params: &[f32],
    data: &Dataset,
    seed: u64,
    feedback: &mut Option<ErrorFeedback>,
    progress: impl FnMut(crate::train::Progress),
) -> Result<(Vec<u8>, u64)> {
    let (mut delta, samples) = client_delta(spec, trainer, params, data, seed, progress)?;
    if let Some(p) = &spec.privacy {
        dp::clip_update(&mut delta, p.dp.clip_norm)?;
    }
    Ok((encode_update(spec.compression, delta, feedback)?, samples))
}

/// The sampling rate the accountant is given: 1. Privacy amplification
/// by subsampling needs the sample to be secret, and a networked round
/// publishes its participants on the ledger (chosen from a public
/// seed), so every round is accounted as if everyone took part.
const ACCOUNTED_SAMPLE_RATE: f64 = 1.0;

/// How far over the DP clip bound a received dense update's norm may be
/// before the coordinator refuses it: clipping is exact up to `f32`
/// rounding, so 5% is far more than an honest participant needs.
const UPDATE_NORM_SLACK: f64 = 1.05;

/// What the coordinator asks its node to do.
#[derive(Clone, Debug, PartialEq)]
pub enum CoordinatorOutput {
    /// Sign this record and submit it to the ledger.
    Submit(Record),
    /// Keep this model available to participants (and for export) before
    /// the record naming it commits.
    Model {
        /// Its id.
        id: ModelId,
        /// Its parameters.
        params: Vec<f32>,
        /// The round that produced it (0: the initial model).
        round: u64,
    },
    /// A round closed (for metrics and logs; its record is submitted too).
    RoundClosed(RoundSummary),
    /// Something failed locally that the round survived (aggregation or
    /// evaluation): for the node's log.
    Problem(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    /// Waiting for joins before round `next`.
    Gathering { next: u64, since_ms: u64 },
    /// A `RoundStart` was submitted; waiting for it to commit.
    Starting { round: u64, since_ms: u64 },
    /// Collecting updates until `deadline_ms`.
    Collecting {
        round: u64,
        participants: BTreeSet<[u8; 32]>,
        deadline_ms: u64,
    },
    /// A `RoundEnd` was submitted; waiting for it to commit.
    Ending {
        round: u64,
        finished: bool,
        since_ms: u64,
    },
    /// The job is over.
    Finished,
}

/// The coordinator of one job: a deterministic state machine fed with
/// committed ledger records, participants' updates and the time.
pub struct Coordinator {
    job: JobId,
    spec: JobSpec,
    me: PublicKey,
    trainer: Trainer,
    evaluation: Option<Dataset>,
    params: Vec<f32>,
    model: ModelId,
    /// Joined nodes in ledger order, with the samples each declared.
    joined: Vec<(PublicKey, u64)>,
    accountant: Option<Accountant>,
    noise: crate::SeededRng,
    phase: Phase,
    updates: BTreeMap<[u8; 32], ClientUpdate>,
    rejected: u32,
    outputs: VecDeque<CoordinatorOutput>,
    /// The latest time seen.
    now_ms: u64,
    /// The record the coordinator waits to see committed, resubmitted if
    /// it has not committed after [`Coordinator::resubmit_after_ms`] (a
    /// transaction can be lost with a primary that fails).
    awaiting: Option<Record>,
    /// The open round's secure aggregation, for jobs that use it.
    secure: Option<SecureRound>,
    /// Rebuilt from replayed records and waiting for
    /// [`Coordinator::resume`]: it acts on nothing until then.
    paused: bool,
    /// A round whose start was replayed without its end: the node
    /// restarted while it ran.
    replayed_start: Option<(u64, Vec<PublicKey>)>,
    /// The last round whose end was replayed (a second copy of a record on
    /// the ledger is ignored).
    replayed_end: u64,
    /// The model moved during the replay: its parameters must be handed
    /// to [`Coordinator::resume`].
    params_stale: bool,
    /// Who submitted the job (first in its chain of coordinators).
    submitter: PublicKey,
    /// Who coordinates it now, as the ledger says: the submitter or the
    /// standby that took it over last. Round records count only from it.
    current: PublicKey,
    /// When a record of the job last committed: a standby takes over
    /// after the job's timeout without one.
    last_progress_ms: u64,
    /// When this node (a standby) last submitted its takeover.
    takeover_sent_ms: Option<u64>,
    /// The round being closed was interrupted (restart or takeover).
    closing_interrupted: bool,
}

/// A secure-aggregation round in progress at the coordinator.
struct SecureRound {
    round: u64,
    secagg: SecAggCoordinator,
    /// What the coordinator sent each participant, in order: at most one
    /// message per stage, four in all. Kept for the round so that a
    /// participant whose answer was lost can ask again (by how many it has).
    mailbox: BTreeMap<Index, Vec<ToParticipant>>,
    /// A digest of each participant's last accepted message, so that the
    /// same message sent again (its answer was lost) is not an error.
    last_accepted: BTreeMap<Index, [u8; 32]>,
    /// How it ended, once it has (possibly before its start committed
    /// here, in which case the round closes when it does).
    ended: Option<SecureEnd>,
}

struct SecureEnd {
    /// The unmasked sum; `None` when the round failed.
    result: Option<SecAggResult>,
    /// Samples the survivors declared when joining.
    samples: u64,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("job", &self.job)
            .field("phase", &self.phase)
            .field("joined", &self.joined.len())
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// The coordinator of job `job` (whose record committed at `now_ms`),
    /// run by node `me`. `noise_seed` must be secret (from the OS):
    /// it seeds the DP noise. `evaluation`, if given, scores each round's
    /// model.
    pub fn new(
        job: JobId,
        spec: JobSpec,
        me: PublicKey,
        trainer: Trainer,
        evaluation: Option<Dataset>,
        noise_seed: [u8; 32],
        now_ms: u64,
    ) -> Result<Self> {
        spec.validate()?;
        trainer
            .descriptor()
            .ensure_matches(&spec.architecture.descriptor()?)?;
        let params = spec.initial_params()?;
        let model = ModelId::compute(trainer.descriptor(), &params)?;
        let accountant = match &spec.privacy {
            Some(p) => Some(Accountant::new(p.delta)?),
            None => None,
        };
        let mut outputs = VecDeque::new();
        outputs.push_back(CoordinatorOutput::Model {
            id: model,
            params: params.clone(),
            round: 0,
        });
        Ok(Self {
            job,
            spec,
            me,
            trainer,
            evaluation,
            params,
            model,
            joined: Vec::new(),
            accountant,
            noise: rng_from_seed(noise_seed),
            phase: Phase::Gathering {
                next: 1,
                since_ms: now_ms,
            },
            updates: BTreeMap::new(),
            rejected: 0,
            outputs,
            now_ms,
            awaiting: None,
            secure: None,
            paused: false,
            replayed_start: None,
            replayed_end: 0,
            params_stale: false,
            submitter: me,
            current: me,
            last_progress_ms: now_ms,
            takeover_sent_ms: None,
            closing_interrupted: false,
        })
    }

    /// The coordinator of a job `submitter` submitted: when that is not
    /// this node, this node is one of the job's standbys, and its
    /// coordinator follows the job passively until it takes over.
    pub fn following(mut self, submitter: PublicKey) -> Self {
        self.submitter = submitter;
        self.current = submitter;
        if submitter != self.me {
            self.paused = true;
        }
        self
    }

    /// Who coordinates the job now, as the ledger says.
    pub fn current_coordinator(&self) -> PublicKey {
        self.current
    }

    /// Whether this node must take over now: it coordinates the job as
    /// the ledger says, but its coordinator waits for
    /// [`Coordinator::resume`] (after a restart or a takeover).
    pub fn wants_resume(&self) -> bool {
        self.paused && self.current == self.me && self.phase != Phase::Finished
    }

    fn position(&self, key: &PublicKey) -> Option<usize> {
        self.spec.chain_position(&self.submitter, key)
    }

    /// The job's spec.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// A committed record replayed when the node starts: rebuilds the
    /// joins, the current model, the rounds done and the privacy spent,
    /// and pauses the coordinator until [`Coordinator::resume`].
    pub fn replay_record(&mut self, signer: &PublicKey, record: &Record) {
        self.paused = true;
        self.follow_record(signer, record);
    }

    /// Follows a committed record without acting on it: what a replay at
    /// start and a passive standby do.
    fn follow_record(&mut self, signer: &PublicKey, record: &Record) {
        let job = match record {
            Record::Job(_) => return,
            Record::Join { job, .. }
            | Record::RoundStart { job, .. }
            | Record::Takeover { job } => *job,
            Record::RoundEnd(summary) => summary.job,
        };
        if job != self.job {
            return;
        }
        // The standby's clock restarts at what only the coordinator can
        // do: its round records (and a takeover that counts, below). While
        // the job waits for joins its coordinator has nothing to do: the
        // clock starts once enough nodes joined and the join window passed.
        if *signer == self.current
            && matches!(record, Record::RoundStart { .. } | Record::RoundEnd(_))
        {
            self.last_progress_ms = self.now_ms;
        }
        match record {
            Record::Join { job, samples } => {
                let before = self.eligible().len();
                self.add_join(signer, job, *samples);
                if before < self.spec.min_clients && self.eligible().len() >= self.spec.min_clients
                {
                    self.last_progress_ms = self
                        .now_ms
                        .saturating_add(self.spec.join_window_secs.saturating_mul(1000));
                }
            }
            Record::Takeover { .. } => {
                let later = match (self.position(signer), self.position(&self.current)) {
                    (Some(new), Some(old)) => new > old,
                    _ => false,
                };
                if later && self.phase != Phase::Finished {
                    self.current = *signer;
                    self.last_progress_ms = self.now_ms;
                    self.takeover_sent_ms = None;
                    // The round this node may have been collecting is no
                    // longer its own.
                    self.updates.clear();
                    self.rejected = 0;
                    // Whoever coordinated before stops acting; if it is
                    // this node's turn, it waits for its resume.
                    self.paused = true;
                    self.awaiting = None;
                    self.secure = None;
                }
            }
            Record::RoundStart {
                round,
                participants,
                ..
            } if *signer == self.current && *round > self.replayed_end => {
                self.replayed_start = Some((*round, participants.clone()));
            }
            Record::RoundEnd(summary)
                if *signer == self.current && summary.round > self.replayed_end =>
            {
                self.replayed_start = None;
                self.replayed_end = summary.round;
                if summary.model != self.model {
                    self.model = summary.model;
                    self.params_stale = true;
                }
                self.replay_charge(summary);
                self.phase = if summary.finished {
                    Phase::Finished
                } else {
                    Phase::Gathering {
                        next: summary.round + 1,
                        since_ms: self.now_ms,
                    }
                };
            }
            _ => {}
        }
    }

    /// Charges the accountant for a replayed round as it was charged when
    /// it ran: every round under central DP, under distributed DP a round
    /// whose sum was unmasked (its survivors' noise), and checks the ε the
    /// ledger recorded.
    fn replay_charge(&mut self, summary: &RoundSummary) {
        let Some(privacy) = self.spec.privacy else {
            return;
        };
        let spent_before = self
            .accountant
            .as_ref()
            .and_then(|a| a.spent().ok())
            .map_or(0.0, |s| s.epsilon);
        let z = match (&self.spec.secure_aggregation, self.spec.distributed_noise()) {
            (Some(secure), Some(noise)) if summary.responded > 0 => secure
                .round_config(
                    summary.selected as usize,
                    self.spec.min_clients,
                    1,
                    Some(noise),
                )
                .charged_noise_multiplier_for(summary.responded as usize, self.params.len()),
            // A secure round interrupted by a restart or a takeover was
            // charged at the least noise it could have carried: its ε rose.
            (Some(_), Some(_))
                if summary
                    .epsilon
                    .is_some_and(|e| e > spent_before + 1e-9 * spent_before.max(1.0)) =>
            {
                Some(self.charged_noise_at_least(&privacy))
            }
            (Some(_), Some(_)) => None,
            // Central DP charges every closed round whose aggregation ran.
            _ if summary.epsilon.is_some() => Some(privacy.dp.noise_multiplier),
            _ => None,
        };
        let Some(accountant) = &mut self.accountant else {
            return;
        };
        let spent = match z {
            Some(z) => accountant.record_round(ACCOUNTED_SAMPLE_RATE, z),
            None => accountant.spent(),
        };
        match (spent, summary.epsilon) {
            (Ok(spent), Some(recorded))
                if (spent.epsilon - recorded).abs() > 1e-6 * recorded.abs().max(1.0) =>
            {
                self.problem(format!(
                    "round {}: the ledger records ε {recorded}, the replay gives {}",
                    summary.round, spent.epsilon
                ));
            }
            (Err(e), _) => self.problem(format!("round {}: accounting: {e}", summary.round)),
            _ => {}
        }
    }

    /// Whether the coordinator waits for [`Coordinator::resume`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The model whose parameters [`Coordinator::resume`] needs: the one
    /// the last replayed round ended with, when that is not the initial
    /// model.
    pub fn model_to_restore(&self) -> Option<ModelId> {
        self.params_stale.then_some(self.model)
    }

    /// Takes over after the replay at `now_ms`, with the parameters of
    /// [`Coordinator::model_to_restore`] if it names a model. A round that
    /// was running at the restart lost its updates: it ends now without
    /// changing the model, and the next round follows as usual.
    pub fn resume(&mut self, params: Option<Vec<f32>>, now_ms: u64) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        if self.current != self.me {
            return Err(Error::invalid(
                "resume",
                "another node coordinates the job now (a standby took it over)",
            ));
        }
        if self.params_stale {
            let params = params.ok_or_else(|| {
                Error::invalid(
                    "resume",
                    format!("the parameters of model {} are needed", self.model.to_hex()),
                )
            })?;
            let id = ModelId::compute(self.trainer.descriptor(), &params)?;
            if id != self.model {
                return Err(Error::invalid(
                    "resume",
                    format!(
                        "the parameters given are model {}, not {}",
                        id.to_hex(),
                        self.model.to_hex()
                    ),
                ));
            }
            self.params = params;
            self.params_stale = false;
        }
        self.paused = false;
        self.now_ms = self.now_ms.max(now_ms);
        if let Some((round, participants)) = self.replayed_start.take() {
            self.updates.clear();
            self.secure = None;
            self.rejected = 0;
            self.phase = Phase::Collecting {
                round,
                participants: participants.iter().map(PublicKey::to_bytes).collect(),
                deadline_ms: self.now_ms,
            };
            self.closing_interrupted = true;
            self.close_round();
        } else if let Phase::Gathering { next, .. } = self.phase {
            self.phase = Phase::Gathering {
                next,
                since_ms: self.now_ms,
            };
        }
        Ok(())
    }

    /// The job.
    pub fn job(&self) -> JobId {
        self.job
    }

    /// The current model's id.
    pub fn model(&self) -> ModelId {
        self.model
    }

    /// Whether the job is over.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    fn add_join(&mut self, signer: &PublicKey, job: &JobId, samples: u64) {
        if *job == self.job
            && !self.joined.iter().any(|(k, _)| k == signer)
            && self.joined.len() < MAX_PARTICIPANTS
        {
            self.joined.push((*signer, samples));
        }
    }

    /// A committed record of this job, signed by `signer`, seen at `now_ms`.
    pub fn handle_record(&mut self, signer: &PublicKey, record: &Record, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if self.awaiting.as_ref() == Some(record) && *signer == self.me {
            self.awaiting = None;
        }
        if self.paused || self.current != self.me || matches!(record, Record::Takeover { .. }) {
            self.follow_record(signer, record);
            return;
        }
        match record {
            Record::Join { job, samples } => self.add_join(signer, job, *samples),
            Record::RoundStart {
                job,
                round,
                participants,
                ..
            } if *job == self.job
                && *signer == self.me
                && matches!(self.phase, Phase::Starting { round: r, .. } if r == *round) =>
            {
                // Updates that arrived before this commit are kept.
                let participants: BTreeSet<[u8; 32]> =
                    participants.iter().map(PublicKey::to_bytes).collect();
                if let Some(secure) = &mut self.secure {
                    secure.secagg.restart_first_stage(now_ms);
                }
                let everyone = self.updates.len() == participants.len()
                    || self.secure.as_ref().is_some_and(|s| s.ended.is_some());
                self.phase = Phase::Collecting {
                    round: *round,
                    participants,
                    deadline_ms: now_ms
                        .saturating_add(self.spec.round_deadline_secs.saturating_mul(1000)),
                };
                if everyone {
                    self.close_round();
                }
            }
            Record::RoundEnd(summary) if summary.job == self.job && *signer == self.me => {
                if let Phase::Ending {
                    round, finished, ..
                } = self.phase
                    && round == summary.round
                {
                    self.phase = if finished {
                        Phase::Finished
                    } else {
                        Phase::Gathering {
                            next: round + 1,
                            since_ms: now_ms,
                        }
                    };
                    self.handle_tick(now_ms);
                }
            }
            _ => {}
        }
    }

    /// An update from `from` for `round`. Errors say why it was refused
    /// (not selected, wrong round, duplicate, malformed); a refused update
    /// changes nothing but the rejection count.
    pub fn handle_update(
        &mut self,
        from: &PublicKey,
        round: u64,
        payload: &[u8],
        samples: u64,
        now_ms: u64,
    ) -> Result<()> {
        if self.paused || self.current != self.me {
            return Err(Error::invalid(
                "update",
                "this node does not coordinate the job now",
            ));
        }
        if self.spec.secure_aggregation.is_some() {
            return Err(Error::invalid(
                "update",
                "this job uses secure aggregation: updates arrive masked, through the \
                 secure-aggregation exchange",
            ));
        }
        // An update that arrives after the deadline closes the round
        // instead of joining it, even if no tick came in between.
        self.handle_tick(now_ms);
        // A participant may see the round start commit before this node
        // does: its update is kept until the start commits here too.
        let (open, participants): (u64, BTreeSet<[u8; 32]>) = match &self.phase {
            Phase::Collecting {
                round,
                participants,
                ..
            } => (*round, participants.clone()),
            Phase::Starting { round, .. } => match &self.awaiting {
                Some(Record::RoundStart { participants, .. }) => (
                    *round,
                    participants.iter().map(PublicKey::to_bytes).collect(),
                ),
                _ => return Err(Error::invalid("update", "no round is collecting updates")),
            },
            _ => return Err(Error::invalid("update", "no round is collecting updates")),
        };
        let collecting = matches!(self.phase, Phase::Collecting { .. });
        if round != open {
            return Err(Error::invalid(
                "update",
                format!("round {round} is not the open round {open}"),
            ));
        }
        let sender = from.to_bytes();
        if !participants.contains(&sender) {
            return Err(Error::invalid(
                "update",
                "sender is not a participant of this round",
            ));
        }
        if self.updates.contains_key(&sender) {
            return Err(Error::DuplicateClient {
                client: ClientId(sender),
            });
        }
        // FedAvg weighs by the sample count a client reports; it may not
        // claim more than it declared when joining.
        let declared = self
            .joined
            .iter()
            .find(|(k, _)| k.to_bytes() == sender)
            .map_or(0, |(_, n)| *n);
        let samples = samples.min(declared);
        let dim = self.params.len();
        // Checked for dense updates only: top-k's error feedback and 8-bit
        // quantisation can legitimately carry an update past the bound
        // (the DP sum clips again either way).
        let clip = self
            .spec
            .privacy
            .filter(|_| self.spec.compression == Compression::None)
            .map(|p| p.dp.clip_norm);
        let update = compress::decode(payload, dim)
            .map(|p| ClientUpdate::new(ClientId(sender), p.to_dense(), samples))
            .and_then(|u| crate::aggregate::check_update(&u, dim).map(|()| u))
            .and_then(|u| match clip {
                // Under DP every participant clips to the job's bound: a
                // dense update far outside it was not made by the rules.
                // The sender's fault: a bad update, not a bad argument.
                Some(clip) if dp::l2_norm(&u.params) > clip * UPDATE_NORM_SLACK => {
                    Err(Error::malformed(format!(
                        "update L2 norm {:.4} exceeds the job's clip bound {clip}",
                        dp::l2_norm(&u.params)
                    )))
                }
                _ => Ok(u),
            });
        match update {
            Ok(u) => {
                self.updates.insert(sender, u);
                if collecting && self.updates.len() == participants.len() {
                    self.close_round();
                }
                Ok(())
            }
            Err(e) => {
                self.rejected += 1;
                Err(e)
            }
        }
    }

    /// A participant's secure-aggregation exchange for `round`: takes its
    /// `message` (if any; the same message again is accepted once more
    /// without effect) and returns the coordinator's message number
    /// `received` to it (`None`: not yet).
    /// Errors say why the message was refused; the node may penalise the
    /// sender.
    pub fn handle_secagg(
        &mut self,
        from: &PublicKey,
        round: u64,
        received: u32,
        message: Option<FromParticipant>,
        now_ms: u64,
    ) -> Result<Option<ToParticipant>> {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(secure) = self.secure.as_mut().filter(|s| s.round == round) else {
            return Err(Error::invalid(
                "secure aggregation",
                format!("round {round} has no secure aggregation open"),
            ));
        };
        let index = secure.secagg.session().index_of(from).ok_or_else(|| {
            Error::invalid(
                "secure aggregation",
                "sender is not a participant of this round",
            )
        })?;
        if let Some(message) = message {
            let encoded = postcard::to_allocvec(&message)
                .map_err(|e| Error::malformed(format!("secure aggregation message: {e}")))?;
            let digest = *blake3::hash(&encoded).as_bytes();
            if secure.last_accepted.get(&index) != Some(&digest) {
                secure.secagg.handle_message(index, message, now_ms)?;
                secure.last_accepted.insert(index, digest);
            }
        }
        self.pump_secure();
        let reply = self
            .secure
            .as_ref()
            .and_then(|s| s.mailbox.get(&index))
            .and_then(|sent| sent.get(received as usize))
            .cloned();
        Ok(reply)
    }

    /// Moves what the secure round produced into the mailboxes, and closes
    /// the round once it has ended (and its start has committed).
    fn pump_secure(&mut self) {
        let mut problems = Vec::new();
        let mut ended = false;
        if let Some(secure) = &mut self.secure {
            while let Some(output) = secure.secagg.poll_output() {
                let end = match output {
                    secagg::CoordinatorOutput::Send { to, message } => {
                        secure.mailbox.entry(to).or_default().push(message);
                        continue;
                    }
                    secagg::CoordinatorOutput::Finished(result) => {
                        let participants = secure.secagg.session().participants();
                        let samples = result
                            .survivors
                            .iter()
                            .filter_map(|&i| participants.get(usize::from(i)))
                            .filter_map(|k| self.joined.iter().find(|(j, _)| j == k))
                            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
                        SecureEnd {
                            result: Some(result),
                            samples,
                        }
                    }
                    secagg::CoordinatorOutput::Failed { stage, reason } => {
                        problems.push(format!(
                            "round {}: secure aggregation failed at {}: {reason}",
                            secure.round,
                            stage.as_str()
                        ));
                        SecureEnd {
                            result: None,
                            samples: 0,
                        }
                    }
                };
                secure.mailbox.clear();
                secure.ended = Some(end);
                ended = true;
            }
        }
        for problem in problems {
            self.problem(problem);
        }
        if ended && matches!(self.phase, Phase::Collecting { .. }) {
            self.close_round();
        }
    }

    /// Time passed: opens a round once enough nodes joined, closes one at
    /// its deadline (a secure round at the deadline of its last stage).
    pub fn handle_tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if self.paused {
            if let Some(due) = self.takeover_due() {
                let resend = self
                    .takeover_sent_ms
                    .is_none_or(|t| now_ms >= t.saturating_add(self.resubmit_after_ms()));
                if now_ms >= due && resend {
                    self.takeover_sent_ms = Some(now_ms);
                    self.outputs
                        .push_back(CoordinatorOutput::Submit(Record::Takeover {
                            job: self.job,
                        }));
                }
            }
            return;
        }
        if let Some(secure) = &mut self.secure {
            secure.secagg.handle_tick(now_ms);
        }
        self.pump_secure();
        match self.phase.clone() {
            Phase::Gathering { next, since_ms } => {
                let window = self.spec.join_window_secs.saturating_mul(1000);
                if self.eligible().len() >= self.spec.min_clients
                    && now_ms >= since_ms.saturating_add(window)
                {
                    self.open_round(next);
                }
            }
            Phase::Collecting { deadline_ms, .. }
                if now_ms >= deadline_ms && self.secure.is_none() =>
            {
                self.close_round()
            }
            Phase::Starting { since_ms, .. } | Phase::Ending { since_ms, .. }
                if now_ms >= since_ms.saturating_add(self.resubmit_after_ms()) =>
            {
                // Not committed yet: submit the same record again (the
                // ledger may end up holding it twice; the second is
                // ignored by everyone, as it names a finished step).
                if let Some(record) = self.awaiting.clone() {
                    self.outputs.push_back(CoordinatorOutput::Submit(record));
                }
                match &mut self.phase {
                    Phase::Starting { since_ms, .. } | Phase::Ending { since_ms, .. } => {
                        *since_ms = now_ms;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// How long a submitted round start or end may take to commit before
    /// it is submitted again: the round deadline, at least 10 s.
    pub fn resubmit_after_ms(&self) -> u64 {
        self.spec.round_deadline_secs.max(10).saturating_mul(1000)
    }

    fn submit(&mut self, record: Record) {
        self.awaiting = Some(record.clone());
        self.outputs.push_back(CoordinatorOutput::Submit(record));
    }

    /// When this passive standby takes the job over if nothing commits
    /// before: `k` timeouts after the last record when it is `k` places
    /// after the current coordinator in the chain.
    fn takeover_due(&self) -> Option<u64> {
        if self.current == self.me || self.phase == Phase::Finished {
            return None;
        }
        // A job short of joins is waiting, not stalled.
        if self.eligible().len() < self.spec.min_clients {
            return None;
        }
        let (mine, theirs) = (self.position(&self.me)?, self.position(&self.current)?);
        let steps = mine.checked_sub(theirs).filter(|&d| d > 0)? as u64;
        Some(
            self.last_progress_ms
                .saturating_add(self.spec.takeover_after_ms().saturating_mul(steps)),
        )
    }

    /// When [`Coordinator::handle_tick`] next has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.paused {
            return self.takeover_due();
        }
        let secure = self
            .secure
            .as_ref()
            .filter(|s| s.ended.is_none())
            .and_then(|s| s.secagg.poll_timeout());
        let phase = match &self.phase {
            Phase::Gathering { since_ms, .. } => {
                Some(since_ms.saturating_add(self.spec.join_window_secs.saturating_mul(1000)))
            }
            Phase::Collecting { .. } if secure.is_some() => secure,
            Phase::Collecting { deadline_ms, .. } => Some(*deadline_ms),
            Phase::Starting { since_ms, .. } | Phase::Ending { since_ms, .. } => {
                Some(since_ms.saturating_add(self.resubmit_after_ms()))
            }
            Phase::Finished => None,
        };
        match (phase, secure) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<CoordinatorOutput> {
        self.outputs.pop_front()
    }

    fn open_round(&mut self, round: u64) {
        let joined = self.eligible();
        match select_participants(&self.job, &self.spec, round, &joined) {
            Ok(participants) => {
                self.updates.clear();
                self.rejected = 0;
                self.secure = None;
                match secure_session(
                    &self.job,
                    &self.spec,
                    round,
                    &participants,
                    self.params.len(),
                ) {
                    Ok(Some(session)) => {
                        self.secure = Some(SecureRound {
                            round,
                            secagg: SecAggCoordinator::new(session, self.now_ms),
                            mailbox: BTreeMap::new(),
                            last_accepted: BTreeMap::new(),
                            ended: None,
                        });
                    }
                    Ok(None) => {}
                    // The round closes at its deadline without a change.
                    Err(e) => self.problem(format!(
                        "round {round}: secure aggregation cannot run with {} participants: {e}",
                        participants.len()
                    )),
                }
                self.phase = Phase::Starting {
                    round,
                    since_ms: self.now_ms,
                };
                self.submit(Record::RoundStart {
                    job: self.job,
                    round,
                    model: self.model,
                    participants,
                });
            }
            Err(_) => self.phase = Phase::Finished,
        }
    }

    fn problem(&mut self, what: String) {
        self.outputs.push_back(CoordinatorOutput::Problem(what));
    }

    /// Closes the collecting round. Never fails: a local failure while
    /// aggregating or evaluating (which checked updates should not cause)
    /// ends the round without changing the model, so rounds never hang.
    fn close_round(&mut self) {
        let Phase::Collecting {
            round,
            participants,
            ..
        } = self.phase.clone()
        else {
            return;
        };
        let updates: Vec<ClientUpdate> = std::mem::take(&mut self.updates).into_values().collect();
        let parent = self.model;
        let (delta, epsilon, responded, samples) = if self.spec.secure_aggregation.is_some() {
            let ended = self.secure.take().and_then(|s| s.ended);
            self.secure_delta(round, ended)
        } else {
            let (delta, epsilon) = self.aggregate(&updates).unwrap_or_else(|e| {
                self.problem(format!("round {round}: aggregation failed: {e}"));
                (None, None)
            });
            let samples = updates
                .iter()
                .fold(0u64, |sum, u| sum.saturating_add(u.samples));
            (delta, epsilon, updates.len() as u32, samples)
        };
        let mut aggregated = false;
        if let Some(delta) = delta {
            match apply_delta(self.trainer.descriptor(), &self.params, &delta) {
                Ok((next, id)) => {
                    self.params = next;
                    self.model = id;
                    aggregated = true;
                    self.outputs.push_back(CoordinatorOutput::Model {
                        id,
                        params: self.params.clone(),
                        round,
                    });
                }
                Err(e) => self.problem(format!("round {round}: the new model is invalid: {e}")),
            }
        }
        let accuracy = match self
            .evaluation
            .as_ref()
            .map(|data| self.trainer.evaluate(&self.params, data))
        {
            Some(Ok(evaluation)) => Some(evaluation.accuracy),
            Some(Err(e)) => {
                self.problem(format!("round {round}: evaluation failed: {e}"));
                None
            }
            None => None,
        };
        let q = ACCOUNTED_SAMPLE_RATE;
        let budget_left = match (&self.spec.privacy, &self.accountant) {
            (Some(p), Some(acc)) => match p.budget_epsilon {
                Some(budget) => acc.can_run_round(budget, q, self.charged_noise_at_least(p)),
                None => true,
            },
            _ => true,
        };
        let finished = round >= self.spec.rounds || !budget_left;
        let outcome = RoundOutcome {
            round,
            parent,
            model: self.model,
            aggregated,
            selected: participants.len() as u32,
            responded,
            samples,
            epsilon,
        };
        let summary = RoundSummary::new(self.job, &outcome, self.rejected, accuracy, finished);
        self.phase = Phase::Ending {
            round,
            finished,
            since_ms: self.now_ms,
        };
        self.outputs
            .push_back(CoordinatorOutput::RoundClosed(summary.clone()));
        self.submit(Record::RoundEnd(summary));
    }

    /// The round's change to the model (if enough updates arrived) and,
    /// with DP, the ε spent so far.
    fn aggregate(&mut self, updates: &[ClientUpdate]) -> Result<(Option<Vec<f32>>, Option<f64>)> {
        let enough = updates.len() >= self.spec.min_clients;
        let q = ACCOUNTED_SAMPLE_RATE;
        let denominator = self.expected_participants();
        let dim = self.params.len();
        let dp_state = match (&self.spec.privacy, &mut self.accountant) {
            (Some(p), Some(acc)) => Some((p, acc)),
            _ => None,
        };
        let dp = dp_state.is_some();
        if !dp && !enough {
            return Ok((None, None));
        }
        let (avg, epsilon) = aggregate_round(
            updates,
            dim,
            &self.spec.aggregator,
            dp_state,
            denominator,
            q,
            &mut self.noise,
        )?;
        // Under DP the round is accounted whoever answered, but fewer
        // than min_clients leave the model unchanged.
        Ok((avg.filter(|_| enough), epsilon))
    }

    /// A secure round's change to the model, ε so far, survivors and their
    /// samples. Under DP a round is charged only if its sum was unmasked:
    /// a failed round released nothing.
    fn secure_delta(
        &mut self,
        round: u64,
        ended: Option<SecureEnd>,
    ) -> (Option<Vec<f32>>, Option<f64>, u32, u64) {
        let spent_so_far =
            |acc: &Option<Accountant>| acc.as_ref().and_then(|a| a.spent().ok()).map(|s| s.epsilon);
        let interrupted = std::mem::take(&mut self.closing_interrupted);
        let Some(SecureEnd {
            result: Some(result),
            samples,
        }) = ended
        else {
            // A round interrupted by a restart or a takeover may have been
            // unmasked by the coordinator that ran it: under distributed DP
            // it is charged at the least noise it could have carried.
            let charged = match (self.spec.privacy, &mut self.accountant) {
                (Some(privacy), Some(_)) if interrupted => {
                    let z = self.charged_noise_at_least(&privacy);
                    self.accountant
                        .as_mut()
                        .and_then(|a| a.record_round(ACCOUNTED_SAMPLE_RATE, z).ok())
                        .map(|s| s.epsilon)
                }
                _ => None,
            };
            return (None, charged.or(spent_so_far(&self.accountant)), 0, 0);
        };
        let responded = result.survivors.len() as u32;
        let enough = result.survivors.len() >= self.spec.min_clients;
        match (&mut self.accountant, result.charged_noise_multiplier) {
            (Some(accountant), Some(z)) => {
                let epsilon = match accountant.record_round(ACCOUNTED_SAMPLE_RATE, z) {
                    Ok(spent) => Some(spent.epsilon),
                    Err(e) => {
                        self.problem(format!("round {round}: accounting failed: {e}"));
                        spent_so_far(&self.accountant)
                    }
                };
                // DP-FedAvg's fixed denominator, as under central DP.
                let expected = self.expected_participants();
                let avg: Vec<f32> = result
                    .sum
                    .iter()
                    .map(|&v| (f64::from(v) / expected) as f32)
                    .collect();
                (enough.then_some(avg), epsilon, responded, samples)
            }
            _ => (enough.then(|| result.mean()), None, responded, samples),
        }
    }

    /// The noise multiplier a round will at least be charged: the job's
    /// under central DP; under distributed DP what the fewest survivors'
    /// noise gives over the quantised sensitivity.
    fn charged_noise_at_least(&self, privacy: &Privacy) -> f64 {
        self.spec
            .secure_aggregation
            .and_then(|s| {
                s.round_config(
                    self.spec.min_clients.max(2),
                    self.spec.min_clients,
                    1,
                    self.spec.distributed_noise(),
                )
                .minimum_charged_noise_multiplier(self.params.len())
            })
            .unwrap_or(privacy.dp.noise_multiplier)
    }

    /// The joined nodes a round may select: all of them, except that the
    /// coordinator never takes part in its own secure rounds (holding
    /// shares of its neighbours' secrets, it would be a participant
    /// colluding with the coordinator, which SecAgg+ does not cover).
    fn eligible(&self) -> Vec<PublicKey> {
        let secure = self.spec.secure_aggregation.is_some();
        self.joined
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !secure || *k != self.me)
            .collect()
    }

    /// DP-FedAvg's fixed denominator: the expected number of participants.
    fn expected_participants(&self) -> f64 {
        self.spec.participation.expected(self.joined.len()).max(1.0)
    }
}

// ---------------------------------------------------------------------------
// The learn protocol's messages (`/openagi/learn/1`, postcard)
// ---------------------------------------------------------------------------

/// A request on `/openagi/learn/1` (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LearnRequest {
    /// Part of a model's parameters (little-endian `f32`) from `offset`.
    Model {
        /// The model.
        model: ModelId,
        /// Byte offset.
        offset: u64,
    },
    /// A participant's update for a round.
    Update {
        /// The job.
        job: JobId,
        /// The round.
        round: u64,
        /// Samples trained on.
        samples: u64,
        /// The encoded (compressed) delta.
        payload: Vec<u8>,
    },
    /// A secure-aggregation exchange: the participant's message for the
    /// current stage, if it has one, and a request for what the
    /// coordinator has for it next (answered with
    /// [`LearnResponse::SecAgg`]).
    SecAgg {
        /// The job.
        job: JobId,
        /// The round.
        round: u64,
        /// How many of the coordinator's messages the participant has: the
        /// answer is the next one, so a lost answer is asked for again.
        received: u32,
        /// The participant's message, or `None` to only ask.
        message: Option<FromParticipant>,
    },
    /// From a job's coordinator to its standbys, before it commits the
    /// round that made `model`: fetch it from me and keep it (answered
    /// with [`LearnResponse::Accepted`] once held), so that the model
    /// outlives the coordinator.
    KeepModel {
        /// The job.
        job: JobId,
        /// The model to keep.
        model: ModelId,
    },
}

/// A response on `/openagi/learn/1` (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LearnResponse {
    /// A model chunk.
    Chunk {
        /// Length of the whole encoding.
        total: u64,
        /// The bytes from the requested offset.
        bytes: Vec<u8>,
    },
    /// The update was accepted.
    Accepted,
    /// Refused, with the reason.
    Refused(String),
    /// The coordinator's next secure-aggregation message for the asking
    /// participant (`None`: nothing yet; ask again).
    SecAgg(Option<ToParticipant>),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compress::Payload;
    use crate::data;
    use crate::dp::DpConfig;
    use crate::train::Compute;
    use openagi_crypto::Identity;

    /// A small digits job, for this crate's tests.
    pub(crate) fn spec() -> JobSpec {
        JobSpec {
            name: "digits".into(),
            architecture: Architecture::logistic_regression(64, 10),
            rounds: 3,
            min_clients: 2,
            round_deadline_secs: 10,
            join_window_secs: 1,
            participation: Participation::All,
            train: TrainConfig::sgd(0.5, 1, 16),
            aggregator: Aggregator::FedAvg,
            privacy: None,
            compression: Compression::None,
            secure_aggregation: None,
            standby_coordinators: Vec::new(),
            coordinator_timeout_secs: None,
            seed: 7,
        }
    }

    #[test]
    fn a_misfit_says_what_does_not_fit() {
        let spec = spec();
        let digits = data::digits().expect("digits");
        assert_eq!(spec.misfit(&digits), None);
        assert!(spec.accepts(&digits));
        let narrow = Dataset::new(vec![0.0; 8], vec![0, 1], 4).expect("data");
        let why = spec.misfit(&narrow).expect("misfit");
        assert!(
            why.contains("4 features") && why.contains("takes 64"),
            "{why}"
        );
        assert!(!spec.accepts(&narrow));
        let mut few_classes = spec.clone();
        few_classes.architecture = Architecture::logistic_regression(64, 2);
        let why = few_classes.misfit(&digits).expect("misfit");
        assert!(why.contains("10 classes"), "{why}");
    }

    struct Net {
        coordinator: Coordinator,
        coordinator_id: Identity,
        nodes: Vec<Identity>,
        shards: Vec<Dataset>,
        trainer: Trainer,
        feedback: Vec<Option<ErrorFeedback>>,
        params: BTreeMap<ModelId, Vec<f32>>,
        now: u64,
        /// Every record committed, as a restarted node would replay it.
        log: Vec<(PublicKey, Record)>,
    }

    fn net(spec: JobSpec, nodes: usize) -> Net {
        let (train, test) = data::digits()
            .expect("digits")
            .split(0.25, 1)
            .expect("split");
        let parts = crate::split::iid(train.len(), nodes, 3).expect("split");
        let shards = parts
            .iter()
            .map(|p| train.subset(p).expect("subset"))
            .collect();
        let trainer = Trainer::new(spec.architecture.clone(), Compute::Cpu).expect("trainer");
        let coordinator_id = Identity::from_seed(&[100; 32]);
        let job = JobId([5; 32]);
        let coordinator = Coordinator::new(
            job,
            spec,
            coordinator_id.public(),
            trainer.clone(),
            Some(test),
            [9; 32],
            0,
        )
        .expect("coordinator");
        Net {
            coordinator,
            coordinator_id,
            nodes: (0..nodes)
                .map(|i| Identity::from_seed(&[i as u8 + 1; 32]))
                .collect(),
            shards,
            trainer,
            feedback: vec![None; nodes],
            params: BTreeMap::new(),
            now: 0,
            log: Vec::new(),
        }
    }

    impl Net {
        /// Commits whatever the coordinator submitted; returns the records.
        fn drain(&mut self) -> Vec<Record> {
            let mut submitted = Vec::new();
            while let Some(out) = self.coordinator.poll_output() {
                match out {
                    CoordinatorOutput::Submit(r) => submitted.push(r),
                    CoordinatorOutput::Model { id, params, .. } => {
                        assert_eq!(
                            ModelId::compute(self.trainer.descriptor(), &params).expect("id"),
                            id
                        );
                        self.params.insert(id, params);
                    }
                    CoordinatorOutput::RoundClosed(_) => {}
                    // A secure round short of participants fails by design.
                    CoordinatorOutput::Problem(p) if p.contains("secure aggregation failed") => {}
                    CoordinatorOutput::Problem(p) => panic!("coordinator problem: {p}"),
                }
            }
            let me = self.coordinator_id.public();
            for r in &submitted {
                self.coordinator.handle_record(&me, r, self.now);
                self.log.push((me, r.clone()));
            }
            submitted
        }

        fn join_all(&mut self) {
            let job = self.coordinator.job();
            for n in &self.nodes {
                let join = Record::Join { job, samples: 1 };
                self.coordinator.handle_record(&n.public(), &join, self.now);
                self.log.push((n.public(), join));
            }
        }

        /// Commits what the coordinator submitted; the round end among it.
        fn drain_round_end(&mut self) -> Option<RoundSummary> {
            self.drain().into_iter().find_map(|r| match r {
                Record::RoundEnd(s) => Some(s),
                _ => None,
            })
        }

        /// A second later: the next round starts and commits.
        fn start_round(&mut self) -> (u64, ModelId, Vec<PublicKey>) {
            self.now += 1_000;
            self.coordinator.handle_tick(self.now);
            let start = self.drain();
            match start
                .into_iter()
                .find(|r| matches!(r, Record::RoundStart { .. }))
            {
                Some(Record::RoundStart {
                    round,
                    model,
                    participants,
                    ..
                }) => (round, model, participants),
                _ => panic!("no round started"),
            }
        }

        /// Runs one round in which the nodes in `answering` send updates.
        fn round(&mut self, answering: &[usize]) -> RoundSummary {
            let (round, model, participants) = self.start_round();
            let params = self.params[&model].clone();
            let spec = self.coordinator.spec.clone();
            for &i in answering {
                let node = self.nodes[i].public();
                assert!(participants.contains(&node));
                let seed = training_seed(&self.coordinator.job(), &spec, round, &node);
                let (payload, samples) = client_update(
                    &spec,
                    &self.trainer,
                    &params,
                    &self.shards[i],
                    seed,
                    &mut self.feedback[i],
                    |_| {},
                )
                .expect("trains");
                self.coordinator
                    .handle_update(&node, round, &payload, samples, self.now)
                    .expect("accepted");
            }
            if answering.len() < participants.len() {
                self.now += spec.round_deadline_secs * 1000;
                self.coordinator.handle_tick(self.now);
            }
            match self.drain().pop() {
                Some(Record::RoundEnd(summary)) => summary,
                other => panic!("round did not end: {other:?}"),
            }
        }
    }

    impl Net {
        /// Runs one secure round in which the nodes in `answering` take
        /// part; the others never answer.
        fn secure_round(&mut self, answering: &[usize]) -> RoundSummary {
            let (round, model, participants) = self.start_round();
            let params = self.params[&model].clone();
            let spec = self.coordinator.spec.clone();
            let job = self.coordinator.job();
            let session = secure_session(&job, &spec, round, &participants, params.len())
                .expect("session")
                .expect("a secure job");
            let mut rng = rng_from_seed([round as u8; 32]);
            let mut parts = Vec::new();
            for &i in answering {
                let (part, advert) =
                    secagg::SecAggParticipant::new(session.clone(), &self.nodes[i], &mut rng)
                        .expect("participant");
                parts.push((i, part, Some(advert)));
            }
            let mut counts: BTreeMap<usize, u32> = BTreeMap::new();
            for _ in 0..100 {
                let mut progressed = false;
                for (i, part, outgoing) in parts.iter_mut() {
                    let node = self.nodes[*i].public();
                    let sent = outgoing.take();
                    progressed |= sent.is_some();
                    let received = *counts.entry(*i).or_insert(0u32);
                    let Ok(Some(message)) = self
                        .coordinator
                        .handle_secagg(&node, round, received, sent, self.now)
                    else {
                        continue;
                    };
                    progressed = true;
                    *counts.entry(*i).or_insert(0) += 1;
                    *outgoing = match message {
                        ToParticipant::Shares(shares) => {
                            part.handle_shares(&shares).expect("shares");
                            let seed = training_seed(&job, &spec, round, &node);
                            let (delta, _) = client_delta(
                                &spec,
                                &self.trainer,
                                &params,
                                &self.shards[*i],
                                seed,
                                |_| {},
                            )
                            .expect("trains");
                            Some(part.masked_input(&delta, &mut rng).expect("masked"))
                        }
                        other => part
                            .handle_message(other, &self.nodes[*i], &mut rng)
                            .expect("answers"),
                    };
                }
                if let Some(summary) = self.drain_round_end() {
                    return summary;
                }
                if !progressed {
                    self.now += spec.round_deadline_secs * 1000;
                    self.coordinator.handle_tick(self.now);
                }
            }
            panic!("the secure round never ended");
        }
    }

    /// Client-level DP with C = 1, z = 1, δ = 1e-5.
    fn unit_dp(budget_epsilon: Option<f64>) -> Privacy {
        Privacy {
            dp: DpConfig {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            },
            delta: 1e-5,
            budget_epsilon,
        }
    }

    fn secure_spec() -> JobSpec {
        JobSpec {
            min_clients: 3,
            secure_aggregation: Some(SecAggSpec {
                neighbours: 4,
                threshold: None,
                clip_range: 4.0,
                quant_bits: secagg::DEFAULT_QUANT_BITS,
            }),
            ..spec()
        }
    }

    #[test]
    fn secure_rounds_train_a_model_and_tolerate_a_silent_participant() {
        let mut net = net(secure_spec(), 4);
        net.drain();
        net.join_all();
        let s = net.secure_round(&[0, 1, 2, 3]);
        assert!(s.aggregated, "{s:?}");
        assert_eq!((s.selected, s.responded), (4, 4));
        // One participant never answers: the round closes at the first
        // stage's deadline without it.
        let s = net.secure_round(&[0, 1, 3]);
        assert!(s.aggregated, "{s:?}");
        assert_eq!((s.selected, s.responded), (4, 3));
        let s = net.secure_round(&[0, 1, 2, 3]);
        assert!(s.finished);
        let accuracy = s.accuracy.expect("evaluated");
        assert!(accuracy > 0.8, "accuracy after 3 secure rounds: {accuracy}");
        // Too few for min_clients: the round fails cleanly, the model stays.
        let mut net = net_with(secure_spec(), 4);
        let s = net.secure_round(&[0, 1]);
        assert!(!s.aggregated);
        assert_eq!(s.model, s.parent);
        assert_eq!(s.responded, 0);
    }

    fn net_with(spec: JobSpec, nodes: usize) -> Net {
        let mut net = net(spec, nodes);
        net.drain();
        net.join_all();
        net
    }

    #[test]
    fn a_secure_job_refuses_plain_updates_and_secure_settings_are_checked() {
        let mut net = net_with(secure_spec(), 4);
        net.now = 2_000;
        net.coordinator.handle_tick(net.now);
        let participants = net
            .drain()
            .into_iter()
            .find_map(|r| match r {
                Record::RoundStart { participants, .. } => Some(participants),
                _ => None,
            })
            .expect("a round started");
        let dim = net.params.values().next().expect("model").len();
        let good = compress::encode(&Payload::Dense(vec![0.01; dim])).expect("encodes");
        let member = net.nodes[0].public();
        let err = net
            .coordinator
            .handle_update(&member, 1, &good, 10, 2_000)
            .expect_err("plain update");
        assert!(err.to_string().contains("secure aggregation"), "{err}");
        let stranger = Identity::from_seed(&[77; 32]).public();
        assert!(
            net.coordinator
                .handle_secagg(&stranger, 1, 0, None, 2_000)
                .is_err()
        );
        assert!(
            net.coordinator
                .handle_secagg(&member, 2, 0, None, 2_000)
                .is_err()
        );
        assert_eq!(
            net.coordinator
                .handle_secagg(&member, 1, 0, None, 2_000)
                .expect("asks"),
            None
        );
        // Every participant advertises; the last one's answer is lost and
        // it sends the same advert again: accepted, and it gets its keys by
        // asking for message 0 as often as it needs.
        let job = net.coordinator.job();
        let session = secure_session(&job, &secure_spec(), 1, &participants, dim)
            .expect("session")
            .expect("secure");
        let mut rng = rng_from_seed([3; 32]);
        let mut last = None;
        for node in &net.nodes {
            let (_, advert) =
                secagg::SecAggParticipant::new(session.clone(), node, &mut rng).expect("advert");
            net.coordinator
                .handle_secagg(&node.public(), 1, 0, Some(advert.clone()), 2_000)
                .expect("accepted");
            last = Some((node.public(), advert));
        }
        let (key, advert) = last.expect("adverts");
        let first = net
            .coordinator
            .handle_secagg(&key, 1, 0, Some(advert), 2_000)
            .expect("the same advert again");
        assert!(matches!(first, Some(ToParticipant::Keys(_))), "{first:?}");
        let again = net
            .coordinator
            .handle_secagg(&key, 1, 0, None, 2_000)
            .expect("asks again");
        assert_eq!(again, first);
        assert_eq!(
            net.coordinator
                .handle_secagg(&key, 1, 1, None, 2_000)
                .expect("next"),
            None
        );
        // The coordinator is never a participant of its own secure rounds.
        assert!(!participants.contains(&net.coordinator_id.public()));

        let mut median = secure_spec();
        median.aggregator = Aggregator::Median;
        median.min_clients = 5;
        assert!(
            median
                .validate()
                .expect_err("median")
                .to_string()
                .contains("fedavg")
        );
        let mut compressed = secure_spec();
        compressed.compression = Compression::Quantize;
        assert!(compressed.validate().is_err());
        let mut odd = secure_spec();
        if let Some(s) = &mut odd.secure_aggregation {
            s.neighbours = 5;
        }
        assert!(
            odd.validate()
                .expect_err("odd k")
                .to_string()
                .contains("neighbours")
        );
        // Off, the field leaves the job's encoding (and id) as it was.
        let json = serde_json::to_string(&spec()).expect("json");
        assert!(!json.contains("secure_aggregation"), "{json}");
        assert_eq!(spec().privacy_mode(), "none");
        assert_eq!(secure_spec().privacy_mode(), "none+secagg");
    }

    #[test]
    fn distributed_dp_under_secure_aggregation_is_accounted() {
        let mut spec = secure_spec();
        spec.rounds = 3;
        spec.privacy = Some(unit_dp(None));
        assert_eq!(spec.privacy_mode(), "distributed+secagg");
        let mut net = net_with(spec.clone(), 4);
        let mut epsilons = Vec::new();
        for _ in 0..3 {
            let s = net.secure_round(&[0, 1, 2, 3]);
            assert!(s.aggregated);
            epsilons.push(s.epsilon.expect("epsilon"));
        }
        assert!(epsilons.windows(2).all(|w| w[1] > w[0]), "{epsilons:?}");
        // Four survivors, noise split across min_clients = 3: the sum
        // carries more than z, so ε grows slower than central DP's at z.
        let mut central = Accountant::new(1e-5).expect("accountant");
        let central_eps = central.record_rounds(1.0, 1.0, 3).expect("spent").epsilon;
        assert!(epsilons[2] < central_eps, "{epsilons:?} vs {central_eps}");
    }

    impl Net {
        /// The node restarts: a new coordinator replays the ledger and
        /// resumes with the current model's parameters from "disk".
        fn restart(&mut self) {
            let (_, test) = data::digits()
                .expect("digits")
                .split(0.25, 1)
                .expect("split");
            let mut fresh = Coordinator::new(
                self.coordinator.job(),
                self.coordinator.spec.clone(),
                self.coordinator_id.public(),
                self.trainer.clone(),
                Some(test),
                [8; 32],
                self.now,
            )
            .expect("coordinator");
            for (signer, record) in &self.log {
                fresh.replay_record(signer, record);
            }
            assert!(fresh.is_paused());
            assert_eq!(fresh.model(), self.coordinator.model());
            // Paused: time passing starts nothing.
            self.now += 3_600_000;
            fresh.handle_tick(self.now);
            assert!(
                std::iter::from_fn(|| fresh.poll_output())
                    .all(|o| matches!(o, CoordinatorOutput::Model { round: 0, .. }))
            );
            if let Some(model) = fresh.model_to_restore() {
                assert!(fresh.resume(None, self.now).is_err(), "parameters needed");
                let wrong = self.coordinator.spec.initial_params().expect("params");
                assert!(fresh.resume(Some(wrong), self.now).is_err());
                fresh
                    .resume(Some(self.params[&model].clone()), self.now)
                    .expect("resumes");
            } else {
                fresh.resume(None, self.now).expect("resumes");
            }
            self.coordinator = fresh;
        }
    }

    #[test]
    fn a_restarted_coordinator_resumes_where_the_ledger_ends() {
        let mut spec = spec();
        spec.rounds = 4;
        spec.privacy = Some(unit_dp(None));
        let mut net = net_with(spec, 3);
        net.round(&[0, 1, 2]);
        let second = net.round(&[0, 1, 2]);
        // Round 3 starts, and the node restarts before it ends.
        net.now += 1_000;
        net.coordinator.handle_tick(net.now);
        assert!(
            net.drain()
                .iter()
                .any(|r| matches!(r, Record::RoundStart { round: 3, .. }))
        );
        net.restart();
        // The interrupted round ends unchanged (its updates were in memory)
        // and is accounted as central DP accounts every closed round.
        let third = net.drain_round_end().expect("round 3 ended");
        assert_eq!(third.round, 3);
        assert!(!third.aggregated);
        assert_eq!(third.model, second.model);
        assert!(third.epsilon > second.epsilon);
        // The job goes on from the model round 2 ended with.
        let fourth = net.round(&[0, 1, 2]);
        assert_eq!(fourth.round, 4);
        assert!(fourth.aggregated && fourth.finished);
        assert_eq!(fourth.parent, second.model);
        // A restart after the end replays a finished job.
        net.restart();
        assert!(net.coordinator.is_finished());
    }

    fn second_dim(net: &Net) -> usize {
        net.params.values().next().expect("model").len()
    }

    #[test]
    fn a_standby_timeout_must_outlast_a_healthy_silence() {
        let mut spec = spec();
        spec.standby_coordinators = vec![Identity::from_seed(&[101; 32]).public().to_hex()];
        spec.coordinator_timeout_secs = Some(5);
        let err = spec.validate().expect_err("shorter than deadline + window");
        assert!(
            err.to_string().contains("at least round_deadline_secs"),
            "{err}"
        );
        spec.coordinator_timeout_secs = Some(11);
        spec.validate().expect("deadline 10 + window 1");
        spec.standby_coordinators.push("not hex".into());
        assert!(spec.validate().is_err());
    }

    #[test]
    fn a_standby_takes_over_a_job_whose_coordinator_is_gone() {
        let standby_id = Identity::from_seed(&[101; 32]);
        let mut spec = spec();
        spec.rounds = 4;
        spec.standby_coordinators = vec![standby_id.public().to_hex()];
        spec.coordinator_timeout_secs = Some(60);
        spec.validate().expect("valid");
        let mut net = net_with(spec.clone(), 3);
        net.round(&[0, 1, 2]);
        let second = net.round(&[0, 1, 2]);
        let submitter = net.coordinator_id.public();

        // The standby follows every committed record without acting.
        let (_, test) = data::digits()
            .expect("digits")
            .split(0.25, 1)
            .expect("split");
        let mut standby = Coordinator::new(
            net.coordinator.job(),
            spec,
            standby_id.public(),
            net.trainer.clone(),
            Some(test),
            [7; 32],
            net.now,
        )
        .expect("coordinator")
        .following(submitter);
        for (signer, record) in &net.log {
            standby.handle_record(signer, record, net.now);
        }
        assert!(standby.is_paused() && !standby.wants_resume());
        assert_eq!(standby.current_coordinator(), submitter);
        assert_eq!(standby.model(), second.model);
        let submitted = |c: &mut Coordinator| -> Vec<Record> {
            std::iter::from_fn(|| c.poll_output())
                .filter_map(|o| match o {
                    CoordinatorOutput::Submit(r) => Some(r),
                    _ => None,
                })
                .collect()
        };
        // The coordinator goes silent: a minute later the standby claims
        // the job.
        standby.handle_tick(net.now + 59_000);
        assert!(submitted(&mut standby).is_empty());
        assert_eq!(standby.poll_timeout(), Some(net.now + 60_000));
        standby.handle_tick(net.now + 60_000);
        let takeover = Record::Takeover {
            job: net.coordinator.job(),
        };
        assert_eq!(submitted(&mut standby), vec![takeover.clone()]);
        net.now += 60_000;

        // A takeover signed by anyone else counts for nothing.
        let stranger = Identity::from_seed(&[55; 32]).public();
        standby.handle_record(&stranger, &takeover, net.now);
        assert_eq!(standby.current_coordinator(), submitter);
        // Committed, the standby's counts everywhere: the old coordinator
        // stops acting, the standby resumes from the model round 2 ended
        // with and goes on.
        net.coordinator
            .handle_record(&standby_id.public(), &takeover, net.now);
        assert_eq!(net.coordinator.current_coordinator(), standby_id.public());
        net.coordinator.handle_tick(net.now + 3_600_000);
        assert!(submitted(&mut net.coordinator).is_empty());
        let dim = second_dim(&net);
        let update = compress::encode(&Payload::Dense(vec![0.0; dim])).expect("encodes");
        let err = net
            .coordinator
            .handle_update(&net.nodes[0].public(), 3, &update, 1, net.now)
            .expect_err("no longer coordinating");
        assert!(err.to_string().contains("does not coordinate"), "{err}");
        standby.handle_record(&standby_id.public(), &takeover, net.now);
        assert!(standby.wants_resume());
        let params = net.params[&second.model].clone();
        standby.resume(Some(params), net.now).expect("resumes");
        net.coordinator = standby;
        net.coordinator_id = standby_id;
        let third = net.round(&[0, 1, 2]);
        assert_eq!((third.round, third.parent), (3, second.model));
        assert!(third.aggregated);
        let fourth = net.round(&[0, 1, 2]);
        assert!(fourth.finished);
    }

    #[test]
    fn a_restarted_secure_coordinator_replays_what_it_charged() {
        let mut spec = secure_spec();
        spec.rounds = 4;
        spec.privacy = Some(unit_dp(None));
        let mut net = net_with(spec, 4);
        net.secure_round(&[0, 1, 2, 3]);
        // Three survivors: charged less noise than four.
        let second = net.secure_round(&[0, 1, 3]);
        // A replay that charged differently would report a problem, which
        // the test net turns into a failure.
        net.restart();
        // Round 3 starts and the node restarts again before it ends: the
        // round ends unchanged, charged at the least noise it could have
        // carried (the coordinator that ran it may have unmasked its sum);
        // a third restart replays that charge exactly.
        net.now += 1_000;
        net.coordinator.handle_tick(net.now);
        net.drain();
        net.restart();
        let third = net.drain_round_end().expect("round 3 ended");
        assert_eq!((third.round, third.responded), (3, 0));
        assert!(!third.aggregated && third.epsilon > second.epsilon);
        net.restart();
        let fourth = net.secure_round(&[0, 1, 2, 3]);
        assert_eq!(fourth.round, 4);
        assert_eq!(fourth.parent, second.model);
        assert!(fourth.finished && fourth.epsilon > third.epsilon);
    }

    #[test]
    fn rounds_train_a_model_and_end_the_job() {
        let mut net = net(spec(), 3);
        net.drain();
        net.coordinator.handle_tick(10_000);
        assert!(net.drain().is_empty(), "no round before min_clients joined");
        net.join_all();
        let mut accuracy = Vec::new();
        for round in 1..=3 {
            let s = net.round(&[0, 1, 2]);
            assert_eq!(s.round, round);
            assert!(s.aggregated);
            assert_eq!((s.selected, s.responded), (3, 3));
            assert_ne!(s.model, s.parent);
            assert_eq!(s.finished, round == 3);
            accuracy.push(s.accuracy.expect("evaluated"));
        }
        assert!(net.coordinator.is_finished());
        assert!(accuracy[2] > 0.8, "accuracy after 3 rounds: {accuracy:?}");
    }

    #[test]
    fn a_round_closes_at_its_deadline_without_a_silent_client() {
        let mut net = net(spec(), 3);
        net.drain();
        net.join_all();
        let s = net.round(&[0, 2]);
        assert!(s.aggregated, "two of three is enough");
        assert_eq!((s.selected, s.responded), (3, 2));
        // Too few: the model stays and the next round still comes.
        let s = net.round(&[1]);
        assert!(!s.aggregated);
        assert_eq!(s.model, s.parent);
        assert_eq!(net.round(&[0, 1, 2]).round, 3);
    }

    #[test]
    fn bad_updates_are_refused_and_change_nothing() {
        let mut net = net(spec(), 3);
        net.drain();
        net.join_all();
        net.now = 2_000;
        net.coordinator.handle_tick(net.now);
        net.drain();
        let stranger = Identity::from_seed(&[77; 32]).public();
        let member = net.nodes[0].public();
        let dim = net.params.values().next().expect("model").len();
        let good = compress::encode(&Payload::Dense(vec![0.01; dim])).expect("encodes");
        let short = compress::encode(&Payload::Dense(vec![0.01; dim - 1])).expect("encodes");
        let nan = compress::encode(&Payload::Dense(vec![f32::NAN; dim])).expect("encodes");
        let c = &mut net.coordinator;
        assert!(c.handle_update(&stranger, 1, &good, 10, 2_000).is_err());
        assert!(c.handle_update(&member, 2, &good, 10, 2_000).is_err());
        assert!(c.handle_update(&member, 1, &short, 10, 2_000).is_err());
        assert!(c.handle_update(&member, 1, &nan, 10, 2_000).is_err());
        assert!(c.handle_update(&member, 1, &[1, 2, 3], 10, 2_000).is_err());
        c.handle_update(&member, 1, &good, 10, 2_000)
            .expect("first good one");
        assert!(matches!(
            c.handle_update(&member, 1, &good, 10, 2_000),
            Err(Error::DuplicateClient { .. })
        ));
        // After the deadline the round closes with one update: too few.
        assert!(
            c.handle_update(&net.nodes[1].public(), 1, &good, 10, 60_000)
                .is_err()
        );
        let summary = net.drain_round_end().expect("closed");
        assert_eq!((summary.responded, summary.rejected), (1, 3));
        assert!(!summary.aggregated);
    }

    #[test]
    fn under_dp_an_update_far_outside_the_clip_bound_is_refused() {
        let mut spec = spec();
        spec.privacy = Some(unit_dp(None));
        let mut net = net_with(spec, 3);
        net.now = 2_000;
        net.coordinator.handle_tick(net.now);
        net.drain();
        let dim = net.params.values().next().expect("model").len();
        let boosted = compress::encode(&Payload::Dense(vec![1.0; dim])).expect("encodes");
        let member = net.nodes[0].public();
        let err = net
            .coordinator
            .handle_update(&member, 1, &boosted, 10, 2_000)
            .expect_err("norm far above the bound");
        assert!(
            err.to_string().contains("exceeds the job's clip bound"),
            "{err}"
        );
        assert_eq!(
            err.kind(),
            crate::ErrorKind::BadUpdate,
            "the sender's fault"
        );
        let mut clipped = vec![1.0; dim];
        dp::clip_update(&mut clipped, 1.0).expect("clips");
        let within = compress::encode(&Payload::Dense(clipped)).expect("encodes");
        net.coordinator
            .handle_update(&member, 1, &within, 10, 2_000)
            .expect("within the bound");
    }

    #[test]
    fn a_privacy_budget_ends_the_job_and_epsilon_is_reported() {
        let mut spec = spec();
        spec.rounds = 50;
        spec.privacy = Some(unit_dp(Some(10.0)));
        let mut net = net(spec, 3);
        net.drain();
        net.join_all();
        let mut last = None;
        for _ in 0..50 {
            let s = net.round(&[0, 1, 2]);
            assert!(s.epsilon.expect("epsilon") <= 10.0);
            let finished = s.finished;
            last = Some(s);
            if finished {
                break;
            }
        }
        let last = last.expect("rounds ran");
        assert!(
            last.finished && last.round < 50,
            "stopped by the budget: {last:?}"
        );
    }

    #[test]
    fn a_round_record_that_never_commits_is_submitted_again() {
        let mut net = net(spec(), 3);
        net.drain();
        net.join_all();
        net.coordinator.handle_tick(5_000);
        let first: Vec<Record> = std::iter::from_fn(|| net.coordinator.poll_output())
            .filter_map(|o| match o {
                CoordinatorOutput::Submit(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(first.len(), 1, "one round start");
        // Lost: nothing commits. After the resubmission delay it comes again.
        let again_at = 5_000 + net.coordinator.resubmit_after_ms();
        assert_eq!(net.coordinator.poll_timeout(), Some(again_at));
        net.coordinator.handle_tick(again_at - 1);
        assert!(net.coordinator.poll_output().is_none());
        net.coordinator.handle_tick(again_at);
        assert_eq!(
            net.coordinator.poll_output(),
            Some(CoordinatorOutput::Submit(first[0].clone()))
        );
        // Once it commits (twice, even), the round collects as usual.
        let me = net.coordinator_id.public();
        net.coordinator.handle_record(&me, &first[0], again_at + 10);
        net.coordinator.handle_record(&me, &first[0], again_at + 20);
        assert!(matches!(
            net.coordinator.phase,
            Phase::Collecting { round: 1, .. }
        ));
    }

    #[test]
    fn an_update_before_the_round_start_commits_here_is_kept() {
        let mut net = net(spec(), 2);
        net.drain();
        net.join_all();
        net.coordinator.handle_tick(5_000);
        let start = std::iter::from_fn(|| net.coordinator.poll_output())
            .find_map(|o| match o {
                CoordinatorOutput::Submit(r @ Record::RoundStart { .. }) => Some(r),
                _ => None,
            })
            .expect("round start submitted");
        let dim = net.trainer.descriptor().param_count();
        let update = compress::encode(&Payload::Dense(vec![0.01; dim])).expect("encodes");
        // Both participants answer before the start commits at the
        // coordinator; they claim more samples than they declared (1).
        for n in &net.nodes {
            net.coordinator
                .handle_update(&n.public(), 1, &update, 1 << 60, 5_100)
                .expect("kept");
        }
        assert!(
            net.coordinator.poll_output().is_none(),
            "not closed before the start commits"
        );
        let me = net.coordinator_id.public();
        net.coordinator.handle_record(&me, &start, 5_200);
        let summary = std::iter::from_fn(|| net.coordinator.poll_output())
            .find_map(|o| match o {
                CoordinatorOutput::RoundClosed(s) => Some(s),
                _ => None,
            })
            .expect("closed as soon as the start committed");
        assert_eq!(
            (summary.responded, summary.samples),
            (2, 2),
            "samples capped at the join"
        );
    }

    #[test]
    fn jobs_too_large_for_the_wire_are_refused() {
        let mut big = spec();
        big.architecture = Architecture::Mlp {
            inputs: 4096,
            hidden: vec![2048],
            classes: 10,
        };
        assert!(big.validate().is_err());
    }

    #[test]
    fn records_are_signed_tagged_and_validated() {
        let id = Identity::from_seed(&[1; 32]);
        let signed = Signed::sign(&id, &Record::job(&spec()).expect("valid")).expect("signs");
        let payload = encode_record(&signed).expect("encodes");
        let (signer, record) = decode_record(&payload).expect("valid").expect("a record");
        assert_eq!(signer, id.public());
        assert_eq!(record.job_spec().expect("valid"), Some(spec()));
        // The id names the signed record: another signer, another job.
        let other = Signed::sign(
            &Identity::from_seed(&[2; 32]),
            &Record::job(&spec()).expect("valid"),
        )
        .expect("signs");
        let other = encode_record(&other).expect("encodes");
        assert_ne!(job_id(&payload), job_id(&other));
        assert!(
            decode_record(b"just a transfer")
                .expect("not ours")
                .is_none()
        );
        let mut tampered = payload.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(decode_record(&tampered).is_err());
        let mut bad = spec();
        bad.min_clients = 0;
        assert!(Record::job(&bad).is_err());
        let json = serde_json::to_string(&bad).expect("json");
        let payload =
            encode_record(&Signed::sign(&id, &Record::Job(json)).expect("signs")).expect("encodes");
        assert!(
            decode_record(&payload).is_err(),
            "invalid specs are refused"
        );
        let job = JobId([0xab; 32]);
        assert_eq!(JobId::from_hex(&job.to_hex()).expect("parses"), job);
        assert!(JobId::from_hex("zz").is_err());
    }

    #[test]
    fn selection_is_deterministic_and_follows_the_participation_rule() {
        let joined: Vec<PublicKey> = (0..20u8)
            .map(|i| Identity::from_seed(&[i + 1; 32]).public())
            .collect();
        let mut s = spec();
        s.participation = Participation::Fixed { per_round: 5 };
        let job = JobId([1; 32]);
        let a = select_participants(&job, &s, 1, &joined).expect("selects");
        assert_eq!(a, select_participants(&job, &s, 1, &joined).expect("again"));
        assert_eq!(a.len(), 5);
        assert_ne!(
            a,
            select_participants(&job, &s, 2, &joined).expect("round 2")
        );
        s.participation = Participation::All;
        assert_eq!(
            select_participants(&job, &s, 1, &joined).expect("all"),
            joined
        );
    }
}
