//! Federated learning on the node: the I/O around
//! [`openagi_learning::federation`].
//!
//! The service follows the learning records on this node's ledger (replayed
//! from the start at boot, then block by block as they commit). It runs the
//! [`Coordinator`] of the jobs this node submitted, submits its join to
//! jobs its local data fits, and when a committed round start names it,
//! fetches the round's model from the coordinator over `/openagi/learn/1`
//! (chunked, checked against the model id), trains on its own data and
//! sends back the clipped, compressed update.
//!
//! Models are the network's knowledge base: this node keeps the models it
//! trained from, aggregated or stands by for, in memory and under
//! `<data dir>/models/`, announces each in the DHT (a provider record
//! under [`provider_key`]) and serves it to any peer that asks. A model
//! some node still holds can be exported here: from this node's disk,
//! else the job's coordinator, else whichever holders the DHT names. What
//! each model is comes from the ledger ([`openagi_learning::catalog`]);
//! `learn.keep_recent_models` bounds what every node keeps: a running
//! job's latest rounds' models and a finished job's final model stay, so
//! other models eventually exist nowhere (their cards stay on the
//! ledger).
//!
//! Records replayed at boot only rebuild the view of jobs; the node acts
//! (joins, trains, coordinates) on records that commit while it runs, so a
//! participant that restarts trains again from the next round that names
//! it. A coordinator that restarts resumes its jobs from the model on its
//! disk (or a holder's); a job is `interrupted` only when no one has it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use openagi_crypto::{Identity, PublicKey, Signed};
use openagi_learning::catalog::{self, ModelCard, RetentionPolicy};
use openagi_learning::compress::ErrorFeedback;
use openagi_learning::data::Dataset;
use openagi_learning::federation::{
    self, Coordinator, CoordinatorOutput, JobId, JobSpec, LearnRequest, LearnResponse, Record,
    RoundSummary,
};
use openagi_learning::model::{ModelId, params_from_bytes, params_to_bytes};
use openagi_learning::participant::{
    self, FollowedJob, LocalData as LocalProfile, Notice, Participant, ParticipantOutput,
    TrainingTask,
};
use openagi_learning::secagg::{FromParticipant, SecAggParticipant, ToParticipant};
use openagi_learning::train::{Compute, Trainer};
use openagi_net::{MsgReply, NetHandle, PeerId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, info, warn};

use crate::common::config::{FAULT_POISON_ENV, LearnSection};
use crate::common::store::Store;
use crate::daemon::consensus::peer_id_of;
use crate::daemon::follower::{LedgerAccess, SubmitError};

/// Bytes of model per chunk on the wire.
pub const MODEL_CHUNK_BYTES: usize = 512 * 1024;
/// Models kept in memory (each job needs its current one).
const MODEL_CACHE: usize = 64;
/// Longest a holder the DHT named may take to serve one model.
const HOLDER_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest all the holders the DHT named may take together: a node
/// resuming a job waits at most this on strangers.
const DHT_FETCH_BUDGET: Duration = Duration::from_secs(60);
/// How often coordinators look at their deadlines.
const TICK: Duration = Duration::from_millis(200);
/// How often a secure-aggregation participant asks the coordinator for its
/// next message while it has none: a stage closes when its last reply
/// arrives, so this bounds the wait per stage on a healthy round.
const SECAGG_POLL: Duration = Duration::from_millis(100);

/// The DHT key under which the holders of `model` announce it.
pub fn provider_key(model: &ModelId) -> Vec<u8> {
    [b"/openagi/model/1/".as_slice(), &model.0].concat()
}

/// A model the ledger describes, as `learn models` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelView {
    /// Content address (hex).
    pub model: String,
    /// The job that produced it (hex).
    pub job_id: String,
    /// The job's name.
    pub job_name: String,
    /// The round that produced it (0: the initial model).
    pub round: u64,
    /// The model the round started from (hex); none for an initial model.
    pub parent: Option<String>,
    /// The architecture's short name, e.g. `logreg-64-10`.
    pub architecture: String,
    /// Input features the model takes (the data schema with `classes`).
    pub inputs: usize,
    /// Output classes.
    pub classes: usize,
    /// Test accuracy on the coordinator's evaluation set.
    pub accuracy: Option<f64>,
    /// ε spent when the model was released, with DP.
    pub epsilon: Option<f64>,
    /// The δ of that ε.
    pub delta: Option<f64>,
    /// `none`, `central`, `none+secagg` or `distributed+secagg`.
    pub privacy_mode: String,
    /// Samples behind the round's aggregated updates.
    pub samples: u64,
    /// Updates the round aggregated.
    pub participants: u32,
    /// Whether the job finished with this model.
    pub final_model: bool,
    /// Whether this node holds its parameters (and serves them).
    pub held_here: bool,
}

impl ModelView {
    fn of(card: &ModelCard, held_here: bool) -> Self {
        Self {
            model: card.model.to_hex(),
            job_id: card.job.to_hex(),
            job_name: card.job_name.clone(),
            round: card.round,
            parent: card.parent.map(|p| p.to_hex()),
            architecture: card.architecture.name(),
            inputs: card.architecture.inputs(),
            classes: card.architecture.classes(),
            accuracy: card.accuracy,
            epsilon: card.epsilon,
            delta: card.delta,
            privacy_mode: card.privacy_mode.into(),
            samples: card.samples,
            participants: card.participants,
            final_model: card.final_model,
            held_here,
        }
    }
}

/// One round of a job, as `learn status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoundView {
    /// The round.
    pub round: u64,
    /// The model after it (hex).
    pub model: String,
    /// Whether enough updates arrived to change the model.
    pub aggregated: bool,
    /// Participants selected.
    pub selected: u32,
    /// Updates received in time.
    pub responded: u32,
    /// Updates received from the selected and refused as not made by the
    /// job's rules (malformed, far over the clip bound).
    pub rejected: u32,
    /// Selected participants that did not answer in time.
    pub stragglers: u32,
    /// Samples behind the aggregated updates.
    pub samples: u64,
    /// ε after this round, with DP.
    pub epsilon: Option<f64>,
    /// Test accuracy on the coordinator's evaluation set.
    pub accuracy: Option<f64>,
}

impl From<&RoundSummary> for RoundView {
    fn from(s: &RoundSummary) -> Self {
        Self {
            round: s.round,
            model: s.model.to_hex(),
            aggregated: s.aggregated,
            selected: s.selected,
            responded: s.responded,
            rejected: s.rejected,
            stragglers: s.selected.saturating_sub(s.responded),
            samples: s.samples,
            epsilon: s.epsilon,
            accuracy: s.accuracy,
        }
    }
}

/// A job as this node's ledger shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// The job id (hex).
    pub job_id: String,
    /// Its name.
    pub name: String,
    /// The coordinator's peer id.
    pub coordinator: String,
    /// The model architecture.
    pub architecture: String,
    /// Rounds asked for.
    pub rounds: u64,
    /// Nodes that joined (each counted once, at most
    /// [`federation::MAX_PARTICIPANTS`], as the coordinator counts them).
    pub joined: usize,
    /// Whether this node joined.
    pub joined_here: bool,
    /// `gathering`, `running`, `finished` or `interrupted`.
    pub state: String,
    /// Joins the coordinator waits for before the first round.
    pub min_clients: usize,
    /// The job's ε budget, with DP.
    pub epsilon_budget: Option<f64>,
    /// How updates are protected: `none`, `central` (the coordinator adds
    /// the DP noise), `none+secagg` or `distributed+secagg` (secure
    /// aggregation; with DP the participants add the noise).
    pub privacy_mode: String,
    /// While the job is gathering: what it waits for, in words.
    pub waiting_for: Option<String>,
    /// Why this node did not join, when it did not.
    pub not_joining: Option<String>,
    /// The latest round started.
    pub round: u64,
    /// The initial model (hex).
    pub initial_model: String,
    /// Finished rounds, oldest first.
    pub history: Vec<RoundView>,
    #[serde(skip)]
    join_window_secs: u64,
}

impl JobView {
    /// The view of a job the participant follows.
    fn of(job: &FollowedJob) -> Self {
        let mut view = Self {
            job_id: job.id.to_hex(),
            name: job.spec.name.clone(),
            coordinator: peer_id_of(&job.coordinator)
                .map(|p| p.to_string())
                .unwrap_or_default(),
            architecture: job.spec.architecture.name(),
            rounds: job.spec.rounds,
            joined: job.joined(),
            joined_here: job.joined_here,
            state: job.state.as_str().into(),
            min_clients: job.spec.min_clients,
            epsilon_budget: job.spec.privacy.and_then(|p| p.budget_epsilon),
            privacy_mode: job.spec.privacy_mode().into(),
            waiting_for: None,
            not_joining: job.not_joining.clone(),
            round: job.round,
            initial_model: job.initial_model.to_hex(),
            history: job.history().map(RoundView::from).collect(),
            join_window_secs: job.spec.join_window_secs,
        };
        view.waiting_for = view.waiting_for_text();
        view
    }

    /// What a gathering job waits for, in words.
    fn waiting_for_text(&self) -> Option<String> {
        if self.state != "gathering" {
            return None;
        }
        Some(if self.joined < self.min_clients {
            format!(
                "{} more joins: {} of min_clients = {} nodes joined. A node joins when it holds the ledger \
                 (a validator or a full node) with [learn] data that fits the job; `learn status` on a node says why it did not",
                self.min_clients - self.joined,
                self.joined,
                self.min_clients
            )
        } else {
            format!(
                "enough joins ({} of min_clients = {}); the first round starts when the join window \
                 ({} s after the job) has passed",
                self.joined, self.min_clients, self.join_window_secs
            )
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// The job a per-job learning series belongs to (its id in hex). Only
/// unfinished jobs have series, and the ledger view tracks at most
/// `MAX_JOBS` of those, so the number of series stays bounded.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone)]
struct LearnMetrics {
    rounds: Family<OutcomeLabel, Counter>,
    updates_received: Counter,
    updates_refused: Counter,
    stragglers: Counter,
    updates_sent: Counter,
    local_rounds_failed: Counter,
    round: Family<JobLabel, Gauge>,
    accuracy: Family<JobLabel, FloatGauge>,
    epsilon: Family<JobLabel, FloatGauge>,
    epsilon_budget_used: Family<JobLabel, FloatGauge>,
    models_held: Gauge,
    models_pruned: Counter,
    model_fetches: Family<SourceLabel, Counter>,
}

/// Where a model this node did not hold came from.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    /// `named` (the coordinator or a node the job names) or `dht` (a
    /// holder the DHT named).
    source: &'static str,
}

impl LearnMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            rounds: Family::default(),
            updates_received: Counter::default(),
            updates_refused: Counter::default(),
            stragglers: Counter::default(),
            updates_sent: Counter::default(),
            local_rounds_failed: Counter::default(),
            round: Family::default(),
            accuracy: Family::default(),
            epsilon: Family::default(),
            epsilon_budget_used: Family::default(),
            models_held: Gauge::default(),
            models_pruned: Counter::default(),
            model_fetches: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("learn");
        r.register(
            "rounds",
            "Rounds this node coordinated, by outcome (aggregated or unchanged)",
            m.rounds.clone(),
        );
        r.register(
            "updates_received",
            "Client updates this coordinator accepted",
            m.updates_received.clone(),
        );
        r.register(
            "updates_refused",
            "Client updates this coordinator refused (not selected, late, malformed)",
            m.updates_refused.clone(),
        );
        r.register(
            "stragglers",
            "Selected participants that did not answer before a round's deadline",
            m.stragglers.clone(),
        );
        r.register(
            "updates_sent",
            "Updates this node trained and delivered as a participant",
            m.updates_sent.clone(),
        );
        r.register(
            "participation_failures",
            "Rounds this node was selected for but could not deliver an update",
            m.local_rounds_failed.clone(),
        );
        r.register(
            "round",
            "Latest finished round of each unfinished job on the ledger",
            m.round.clone(),
        );
        r.register(
            "accuracy_ratio",
            "Test accuracy (0 to 1) of each unfinished job's latest model, when its coordinator evaluates",
            m.accuracy.clone(),
        );
        r.register(
            "epsilon",
            "Privacy loss epsilon spent so far by each unfinished job with differential privacy",
            m.epsilon.clone(),
        );
        r.register(
            "epsilon_budget_used_ratio",
            "Share (0 to 1) of its epsilon budget each unfinished job with a DP budget has spent",
            m.epsilon_budget_used.clone(),
        );
        r.register(
            "models_held",
            "Models this node keeps on disk, serves and announces in the DHT",
            m.models_held.clone(),
        );
        r.register(
            "models_pruned",
            "Models deleted by the retention policy (learn.keep_recent_models)",
            m.models_pruned.clone(),
        );
        r.register(
            "model_fetches",
            "Models fetched from another node, by how the holder was found",
            m.model_fetches.clone(),
        );
        m
    }

    /// Follows a committed round end: the job's gauges show it, and a
    /// finished job's series go away. Accuracy and epsilon exist only when
    /// the round has them: a job without DP has no epsilon series (0
    /// would claim perfect privacy).
    fn round_ended(&self, summary: &RoundSummary, budget: Option<f64>) {
        let label = JobLabel {
            job: summary.job.to_hex(),
        };
        if summary.finished {
            self.round.remove(&label);
            self.accuracy.remove(&label);
            self.epsilon.remove(&label);
            self.epsilon_budget_used.remove(&label);
            return;
        }
        match (summary.epsilon, budget.filter(|b| *b > 0.0)) {
            (Some(e), Some(b)) => {
                self.epsilon_budget_used.get_or_create(&label).set(e / b);
            }
            _ => {
                self.epsilon_budget_used.remove(&label);
            }
        }
        self.round
            .get_or_create(&label)
            .set(i64::try_from(summary.round).unwrap_or(i64::MAX));
        match summary.accuracy {
            Some(a) => {
                self.accuracy.get_or_create(&label).set(a);
            }
            None => {
                self.accuracy.remove(&label);
            }
        }
        match summary.epsilon {
            Some(e) => {
                self.epsilon.get_or_create(&label).set(e);
            }
            None => {
                self.epsilon.remove(&label);
            }
        }
    }
}

struct LocalData {
    train: Dataset,
    eval: Dataset,
}

struct State {
    /// The protocol's participant side: what the ledger says of each job
    /// and what this node does about it.
    participant: Participant,
    coordinators: HashMap<JobId, Coordinator>,
    trainers: HashMap<JobId, Trainer>,
    feedback: HashMap<JobId, Option<ErrorFeedback>>,
    models: HashMap<ModelId, Arc<Vec<f32>>>,
    model_order: Vec<ModelId>,
    /// Models being written to disk.
    writing: HashSet<ModelId>,
    /// Ledger height processed.
    cursor: u64,
    /// Jobs whose coordinator is being resumed right now.
    resuming: HashSet<JobId>,
    /// The last round each job's coordinator had this node (a standby)
    /// keep a model for.
    kept_for_round: HashMap<JobId, u64>,
}

/// The node's federated-learning service.
pub struct Learner {
    identity: Identity,
    me: PublicKey,
    store: Arc<Store>,
    net: NetHandle,
    /// The ledger: this node's replica, or (a full node) its follower.
    ledger: Option<LedgerAccess>,
    local: Option<LocalData>,
    models_dir: PathBuf,
    /// Which models stay on disk.
    retention: RetentionPolicy,
    state: Mutex<State>,
    metrics: LearnMetrics,
}

/// Loads the local training and evaluation data `config` names.
fn load_local(config: &LearnSection) -> Result<Option<LocalData>> {
    let Some(source) = config.source().map_err(|e| anyhow!("learn.data: {e}"))? else {
        return Ok(None);
    };
    let (train, eval) = crate::common::learn_data::load_data(&source, 0.25, false, 1)
        .with_context(|| format!("loading learn.data = {:?}", config.data))?;
    let train = match config.shard().map_err(|e| anyhow!("learn.shard: {e}"))? {
        Some((index, count)) => {
            let parts = openagi_learning::split::iid(train.len(), count, 1)?;
            let part = parts
                .get(index)
                .with_context(|| format!("learn.shard: no shard {} of {count}", index + 1))?;
            train.subset(part)?
        }
        None => train,
    };
    Ok(Some(LocalData { train, eval }))
}

impl Learner {
    /// Starts the service; the returned task follows the ledger until the
    /// process ends.
    pub fn start(
        identity: &Identity,
        store: Arc<Store>,
        net: NetHandle,
        ledger: Option<LedgerAccess>,
        config: &LearnSection,
        data_dir: &std::path::Path,
        registry: &mut Registry,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        let local = load_local(config)?;
        if let Some(l) = &local {
            info!(
                train_samples = l.train.len(),
                eval_samples = l.eval.len(),
                features = l.train.n_features(),
                "federated learning: local data loaded (learn.join says which jobs this node trains for)"
            );
        }
        let models_dir = data_dir.join("models");
        std::fs::create_dir_all(&models_dir)
            .with_context(|| format!("creating {}", models_dir.display()))?;
        let me = identity.public();
        let profile = match &local {
            Some(l) => LocalProfile::Present(l.train.profile()),
            None => LocalProfile::Absent(
                "this node has no learn.data: set [learn] data in openagi.toml to train".into(),
            ),
        };
        let policy = config
            .join_policy()
            .map_err(|e| anyhow!("learn.coordinators: {e}"))?;
        let learner = Arc::new(Self {
            identity: Identity::from_seed(&identity.seed()),
            me,
            store,
            net,
            ledger,
            local,
            models_dir,
            retention: RetentionPolicy {
                recent_rounds: config.keep_recent_models,
            },
            state: Mutex::new(State {
                participant: Participant::with_policy(me, profile, policy),
                coordinators: HashMap::new(),
                trainers: HashMap::new(),
                feedback: HashMap::new(),
                models: HashMap::new(),
                model_order: Vec::new(),
                writing: HashSet::new(),
                cursor: 0,
                resuming: HashSet::new(),
                kept_for_round: HashMap::new(),
            }),
            metrics: LearnMetrics::register(registry),
        });
        let task = tokio::spawn(learner.clone().run());
        Ok((learner, task))
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| anyhow!("learning state lock poisoned"))
    }

    async fn run(self: Arc<Self>) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        // Subscribe before replaying so no block falls between the two.
        let mut commits = ledger.subscribe();
        // What committed before this start is history: replayed, not acted
        // on. (The height is the restored ledger's, published before the
        // consensus task runs; later blocks arrive as notices.)
        let head = ledger.height();
        self.catch_up(head, false).await;
        self.resume_coordinators().await;
        // Pruned first, so only what stays is announced.
        let this = self.clone();
        let held = tokio::task::spawn_blocking(move || {
            this.prune_models();
            this.held_models()
        })
        .await
        .unwrap_or_default();
        for model in held {
            let _ = self.net.provide(provider_key(&model)).await;
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                notice = commits.recv() => match notice {
                    Ok(n) => {
                        // The next block with nothing for us: no disk read.
                        let next = self.state().map(|s| s.cursor + 1).unwrap_or(0);
                        let has_records = n.block.txs.iter().any(|tx| {
                            tx.payload.starts_with(openagi_learning::federation::RECORD_TAG)
                        });
                        if n.height == next && !has_records {
                            if let Ok(mut s) = self.state() {
                                s.cursor = n.height;
                            }
                        } else {
                            self.catch_up(n.height, true).await;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let head = ledger.height();
                        self.catch_up(head, true).await;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    // Closing a round aggregates and evaluates: not on the
                    // async workers.
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.tick()).await;
                }
            }
        }
    }

    /// Keeps the model a round of a job ended with, fetched from its
    /// coordinator, when this node trains for the job or stands by to
    /// coordinate it: if the coordinator is lost, the model is not.
    fn keep_round_model(self: &Arc<Self>, summary: &RoundSummary) {
        if !summary.aggregated {
            return;
        }
        let Ok(s) = self.state() else { return };
        let Some(job) = s.participant.job(&summary.job) else {
            return;
        };
        let standby = job
            .spec
            .chain_position(&job.submitter, &self.me)
            .is_some_and(|p| p > 0);
        if job.coordinator == self.me || !(job.joined_here || standby) {
            return;
        }
        let (spec, coordinator, model) = (job.spec.clone(), job.coordinator, summary.model);
        drop(s);
        let this = self.clone();
        tokio::spawn(async move {
            let fetched = async {
                let trainer = Trainer::new(spec.architecture.clone(), Compute::Cpu)?;
                let peer = peer_id_of(&coordinator).context("coordinator key is not a peer id")?;
                this.model_params(&model, &trainer, Some(peer)).await
            };
            if let Err(e) = fetched.await {
                debug!(model = %model.to_hex(), error = format!("{e:#}"), "round model not kept");
            }
        });
    }

    /// Hands the coordinators rebuilt from the replayed ledger what they
    /// need to go on: the current model's parameters, from this node's
    /// disk. A job whose model is not there cannot go on and shows as
    /// interrupted.
    async fn resume_coordinators(self: &Arc<Self>) {
        let paused: Vec<(JobId, Option<ModelId>, JobSpec)> = match self.state() {
            Ok(s) => s
                .coordinators
                .iter()
                .filter(|(_, c)| c.wants_resume())
                .map(|(job, c)| (*job, c.model_to_restore(), c.spec().clone()))
                .collect(),
            Err(_) => return,
        };
        for (job, model, spec) in paused {
            // One resume per job at a time: a second task leaves it alone.
            if !self.state().is_ok_and(|mut s| s.resuming.insert(job)) {
                continue;
            }
            let params = match model {
                None => Ok(None),
                Some(id) => self.restore_model(&job, &id, &spec).await.map(Some),
            };
            let this = self.clone();
            let resumed = tokio::task::spawn_blocking(move || -> Result<()> {
                let params = params?;
                let mut s = this.state()?;
                let c = s
                    .coordinators
                    .get_mut(&job)
                    .context("the coordinator is gone")?;
                c.resume(params, crate::unix_ms())?;
                Ok(())
            })
            .await
            .unwrap_or_else(|e| Err(anyhow!("resuming panicked: {e}")));
            match resumed {
                Ok(()) => {
                    info!(%job, model = ?model.map(|m| m.to_hex()), "coordination resumed (after a restart or a takeover)")
                }
                Err(e) => {
                    // Only if it is still this node's turn: another task may
                    // have resumed it, or a later standby taken over.
                    if let Ok(mut s) = self.state()
                        && s.coordinators
                            .get(&job)
                            .is_some_and(Coordinator::wants_resume)
                    {
                        warn!(%job, error = format!("{e:#}"), "cannot resume coordinating this job: it is interrupted");
                        s.coordinators.remove(&job);
                        s.participant.handle_coordination_lost(&job);
                    }
                }
            }
            if let Ok(mut s) = self.state() {
                s.resuming.remove(&job);
            }
        }
        self.drain();
    }

    /// The parameters of `model` for resuming `job`: from this node's
    /// memory or disk, else from the nodes that joined the job (each keeps
    /// the models it trained from and the rounds' results).
    async fn restore_model(
        self: &Arc<Self>,
        job: &JobId,
        model: &ModelId,
        spec: &JobSpec,
    ) -> Result<Vec<f32>> {
        let trainer = Trainer::new(spec.architecture.clone(), Compute::Cpu)?;
        let holders: Vec<PeerId> = self
            .state()?
            .participant
            .job(job)
            .map(|j| {
                std::iter::once(j.submitter)
                    .chain(j.joiners().copied())
                    .filter(|k| *k != self.me)
                    .filter_map(|k| peer_id_of(&k))
                    .collect()
            })
            .unwrap_or_default();
        let params = self.find_model(model, &trainer, holders).await?;
        Ok(params.as_ref().clone())
    }

    /// `model` from wherever it is: this node's memory or disk, else the
    /// peers in `named` in order, else the holders the DHT names. What is
    /// fetched is checked against the id and kept.
    async fn find_model(
        self: &Arc<Self>,
        model: &ModelId,
        trainer: &Trainer,
        named: Vec<PeerId>,
    ) -> Result<Arc<Vec<f32>>> {
        if let Ok(params) = self.model_params(model, trainer, None).await {
            return Ok(params);
        }
        let mut tried = HashSet::new();
        let named: Vec<PeerId> = named.into_iter().filter(|p| tried.insert(*p)).collect();
        // The job's own nodes are trusted to try for as long as requests
        // last; no budget beyond that.
        if let Some(params) = self
            .fetch_from_holders(model, trainer, named, "named", None)
            .await
        {
            return Ok(params);
        }
        let providers = match self.net.find_providers(provider_key(model)).await {
            Ok(p) => p,
            Err(e) => {
                debug!(model = %model.to_hex(), error = %e, "no DHT lookup");
                Vec::new()
            }
        };
        let providers: Vec<PeerId> = providers
            .into_iter()
            .filter(|p| !tried.contains(p))
            .collect();
        let found = providers.len();
        // Anyone can announce itself as a holder: each gets a bounded time,
        // and the DHT's holders all together get DHT_FETCH_BUDGET.
        if let Some(params) = self
            .fetch_from_holders(model, trainer, providers, "dht", Some(DHT_FETCH_BUDGET))
            .await
        {
            return Ok(params);
        }
        bail!(
            "model {} is not on this node's disk, and none of the nodes asked ({} the job names, then {found} the DHT named) served it",
            model.to_hex(),
            tried.len(),
        )
    }

    /// `model` from the first of `holders` that serves it, within
    /// `budget` for all of them ([`HOLDER_FETCH_TIMEOUT`] each when there
    /// is one; `None`: as long as requests last); counted under `source`
    /// in the fetch metric.
    async fn fetch_from_holders(
        self: &Arc<Self>,
        model: &ModelId,
        trainer: &Trainer,
        holders: Vec<PeerId>,
        source: &'static str,
        budget: Option<Duration>,
    ) -> Option<Arc<Vec<f32>>> {
        let started = tokio::time::Instant::now();
        for peer in holders {
            let fetch = self.model_params(model, trainer, Some(peer));
            let fetched = match budget {
                None => fetch.await,
                Some(budget) => {
                    let left = budget.saturating_sub(started.elapsed());
                    tokio::time::timeout(left.min(HOLDER_FETCH_TIMEOUT), fetch)
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("{peer} took too long to serve the model")))
                }
            };
            match fetched {
                Ok(params) => {
                    self.metrics
                        .model_fetches
                        .get_or_create(&SourceLabel { source })
                        .inc();
                    return Some(params);
                }
                Err(e) => {
                    debug!(%peer, source, error = format!("{e:#}"), "model not fetched from this holder")
                }
            }
        }
        None
    }

    /// The models on this node's disk (files named by their id).
    fn held_models(&self) -> Vec<ModelId> {
        let Ok(entries) = std::fs::read_dir(&self.models_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let hex = name.to_str()?.strip_suffix(".bin")?;
                ModelId::from_hex(hex).ok()
            })
            .collect()
    }

    /// Deletes the models the retention policy lets go (never a job's
    /// final model, nor one being written) and stops announcing them.
    fn prune_models(self: &Arc<Self>) {
        let held = self.held_models();
        let gone: Vec<ModelId> = match self.state() {
            Ok(mut s) => {
                let jobs: Vec<&FollowedJob> = s.participant.jobs().collect();
                let gone: Vec<ModelId> =
                    catalog::prunable(held.iter().copied(), &jobs, self.retention)
                        .into_iter()
                        .filter(|m| !s.writing.contains(m))
                        .collect();
                for id in &gone {
                    s.models.remove(id);
                    s.model_order.retain(|m| m != id);
                }
                gone
            }
            Err(_) => return,
        };
        let mut removed = Vec::new();
        for id in gone {
            let path = self.model_path(&id);
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(id),
                Err(e) => warn!(path = %path.display(), error = %e, "pruned model not deleted"),
            }
        }
        self.metrics
            .models_held
            .set((held.len() - removed.len()) as i64);
        if removed.is_empty() {
            return;
        }
        self.metrics.models_pruned.inc_by(removed.len() as u64);
        debug!(
            count = removed.len(),
            "models pruned (learn.keep_recent_models)"
        );
        let net = self.net.clone();
        tokio::spawn(async move {
            for id in removed {
                let _ = net.stop_providing(provider_key(&id)).await;
            }
        });
    }

    /// Every model the ledger describes (jobs in ledger order, each oldest
    /// round first), with whether this node holds it.
    ///
    /// Only `job`'s models when given, only final models with
    /// `final_only`, and at most `limit` cards: the newest of the
    /// selection (a node follows up to hundreds of jobs of up to
    /// [`openagi_learning::participant::HISTORY`] rounds each).
    pub fn models(
        &self,
        job: Option<&JobId>,
        final_only: bool,
        limit: usize,
    ) -> Result<Vec<ModelView>> {
        let held: HashSet<ModelId> = self.held_models().into_iter().collect();
        let s = self.state()?;
        let mut cards: Vec<ModelCard> = s
            .participant
            .jobs()
            .filter(|j| job.is_none_or(|id| *id == j.id))
            .flat_map(catalog::cards)
            .filter(|c| !final_only || c.final_model)
            .collect();
        let skip = cards.len().saturating_sub(limit);
        cards.drain(..skip);
        Ok(cards
            .iter()
            .map(|card| {
                let here = held.contains(&card.model) || s.models.contains_key(&card.model);
                ModelView::of(card, here)
            })
            .collect())
    }

    /// Processes committed blocks up to `height`.
    async fn catch_up(self: &Arc<Self>, height: u64, live: bool) {
        loop {
            let from = match self.state() {
                Ok(s) => s.cursor + 1,
                Err(_) => return,
            };
            if from > height {
                return;
            }
            // Reading, decoding and applying (which may hash a job's
            // initial model) stay off the async workers.
            let this = self.clone();
            let done = tokio::task::spawn_blocking(move || this.apply_blocks(from, height, live))
                .await
                .unwrap_or(true);
            if done {
                return;
            }
        }
    }

    /// Applies up to 64 stored blocks from `from`, none above `height`;
    /// returns whether there is nothing more to read now.
    fn apply_blocks(self: &Arc<Self>, from: u64, height: u64, live: bool) -> bool {
        let blocks = match self.store.blocks_from(from, 64) {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => return true,
            Err(e) => {
                warn!(error = %e, "learning: reading blocks failed");
                return true;
            }
        };
        for (block, _) in blocks {
            // Blocks past `height` are for the caller that knows whether
            // they are live (the boot replay must not act on them).
            if block.height > height {
                return true;
            }
            for tx in &block.txs {
                match federation::decode_record(&tx.payload) {
                    Ok(Some((signer, record))) => self.apply(&signer, &record, &tx.payload, live),
                    Ok(None) => {}
                    Err(e) => {
                        debug!(height = block.height, error = %e, "malformed learning record ignored")
                    }
                }
            }
            if let Ok(mut s) = self.state() {
                s.cursor = block.height;
            }
        }
        false
    }

    /// Follows one committed learning record: the participant decides
    /// what it means for this node, the coordinators of this node's jobs
    /// see it too, and what they ask for is carried out.
    fn apply(self: &Arc<Self>, signer: &PublicKey, record: &Record, payload: &[u8], live: bool) {
        let now = crate::unix_ms();
        let mut outputs = Vec::new();
        {
            let Ok(mut s) = self.state() else { return };
            s.participant.handle_record(signer, record, payload, live);
            while let Some(output) = s.participant.poll_output() {
                match output {
                    // Started at once, so it sees the job record below.
                    ParticipantOutput::Coordinate {
                        job,
                        spec,
                        submitter,
                    } => match self.coordinator(job, &spec, now) {
                        Ok(c) => {
                            s.coordinators.insert(job, c.following(submitter));
                        }
                        Err(e) => {
                            warn!(%job, error = format!("{e:#}"), "cannot coordinate this job")
                        }
                    },
                    ParticipantOutput::JobFinished(job) => {
                        s.trainers.remove(&job);
                        s.feedback.remove(&job);
                        s.kept_for_round.remove(&job);
                    }
                    other => outputs.push(other),
                }
            }
            let job = job_of(record, payload);
            if let Some(c) = s.coordinators.get_mut(&job) {
                if live {
                    c.handle_record(signer, record, now);
                } else {
                    c.replay_record(signer, record);
                }
            }
        }
        self.drain();
        // A standby's takeover committed: it resumes the job (off this
        // path: the current model may have to come from its disk).
        let takeover = live
            && self.state().is_ok_and(|s| {
                s.coordinators
                    .get(&job_of(record, payload))
                    .is_some_and(Coordinator::wants_resume)
            });
        if takeover {
            let this = self.clone();
            tokio::spawn(async move { this.resume_coordinators().await });
        }
        for output in outputs {
            match output {
                ParticipantOutput::Submit(record) => self.act(Action::Submit(record)),
                ParticipantOutput::Train(task) => self.act(Action::Train(task)),
                ParticipantOutput::RoundCommitted { summary, live } => {
                    if live {
                        self.keep_round_model(&summary);
                        if summary.aggregated {
                            self.prune_models();
                        }
                    }
                    let budget = self.state().ok().and_then(|s| {
                        s.participant
                            .job(&summary.job)
                            .and_then(|j| j.spec.privacy)
                            .and_then(|p| p.budget_epsilon)
                    });
                    self.metrics.round_ended(&summary, budget);
                    if live {
                        info!(
                            job = %summary.job,
                            round = summary.round,
                            accuracy = ?summary.accuracy,
                            epsilon = ?summary.epsilon,
                            responded = summary.responded,
                            selected = summary.selected,
                            "learning round committed"
                        );
                    }
                }
                ParticipantOutput::Notice(notice) => log_notice(&notice),
                ParticipantOutput::Coordinate { .. } | ParticipantOutput::JobFinished(_) => {}
            }
        }
    }

    fn coordinator(&self, job: JobId, spec: &JobSpec, now: u64) -> Result<Coordinator> {
        let trainer = Trainer::new(spec.architecture.clone(), Compute::Cpu)?;
        let evaluation = self
            .local
            .as_ref()
            .filter(|l| spec.accepts(&l.eval))
            .map(|l| l.eval.clone());
        let mut noise_seed = [0u8; 32];
        openagi_crypto::os_random(&mut noise_seed)?;
        Ok(Coordinator::new(
            job,
            spec.clone(),
            self.me,
            trainer,
            evaluation,
            noise_seed,
            now,
        )?)
    }

    fn tick(self: &Arc<Self>) {
        let now = crate::unix_ms();
        if let Ok(mut s) = self.state() {
            for c in s.coordinators.values_mut() {
                c.handle_tick(now);
            }
        }
        self.drain();
    }

    /// Carries out what the coordinators asked for.
    fn drain(self: &Arc<Self>) {
        let mut outputs = Vec::new();
        if let Ok(mut s) = self.state() {
            for c in s.coordinators.values_mut() {
                while let Some(o) = c.poll_output() {
                    outputs.push(o);
                }
            }
            s.coordinators.retain(|_, c| !c.is_finished());
        }
        for output in outputs {
            match output {
                CoordinatorOutput::Submit(record) => self.act(Action::Submit(record)),
                CoordinatorOutput::Model { id, params, round } => {
                    debug!(model = %id.to_hex(), round, "model ready");
                    self.keep_model(id, Arc::new(params));
                }
                CoordinatorOutput::Problem(what) => warn!(problem = %what, "federated round"),
                CoordinatorOutput::RoundClosed(summary) => {
                    let outcome = if summary.aggregated {
                        "aggregated"
                    } else {
                        "unchanged"
                    };
                    self.metrics
                        .rounds
                        .get_or_create(&OutcomeLabel {
                            outcome: outcome.into(),
                        })
                        .inc();
                    self.metrics
                        .updates_received
                        .inc_by(u64::from(summary.responded));
                    self.metrics.stragglers.inc_by(u64::from(
                        summary.selected.saturating_sub(summary.responded),
                    ));
                    info!(
                        job = %summary.job,
                        round = summary.round,
                        responded = summary.responded,
                        selected = summary.selected,
                        aggregated = summary.aggregated,
                        "round closed"
                    );
                }
            }
        }
    }

    fn act(self: &Arc<Self>, action: Action) {
        let this = self.clone();
        match action {
            Action::Submit(record) => {
                tokio::spawn(async move {
                    this.replicate_model(&record).await;
                    if let Err(e) = this.submit(record).await {
                        warn!(error = format!("{e:#}"), "learning record not submitted");
                    }
                });
            }
            Action::Train(task) => {
                let (job, round) = (task.job, task.round);
                tokio::spawn(async move {
                    let cpu = Arc::new(std::sync::atomic::AtomicU64::new(0));
                    let result = this.participate(*task, &cpu).await;
                    let cpu_ms = cpu.load(std::sync::atomic::Ordering::Relaxed);
                    // Only notices come of it (the CPU cap reached).
                    let notices: Vec<ParticipantOutput> = match this.state() {
                        Ok(mut s) => {
                            s.participant.handle_training_finished(&job, cpu_ms);
                            std::iter::from_fn(|| s.participant.poll_output()).collect()
                        }
                        Err(_) => Vec::new(),
                    };
                    for output in notices {
                        match output {
                            ParticipantOutput::Notice(notice) => log_notice(&notice),
                            ParticipantOutput::Submit(record) => this.act(Action::Submit(record)),
                            ParticipantOutput::Train(task) => this.act(Action::Train(task)),
                            _ => {}
                        }
                    }
                    match result {
                        Ok(()) => {
                            this.metrics.updates_sent.inc();
                        }
                        Err(e) => {
                            this.metrics.local_rounds_failed.inc();
                            warn!(%job, round, error = format!("{e:#}"), "no update sent for this round");
                        }
                    }
                });
            }
        }
    }

    /// Signs `record` and submits it to the ledger (retrying while the
    /// replica refuses it, e.g. during a view change).
    async fn submit(&self, record: Record) -> Result<JobId> {
        let ledger = self.ledger.as_ref().context(
            "this node holds no ledger (no genesis); learning records go through the ledger",
        )?;
        let signed = Signed::sign(&self.identity, &record)?;
        let payload = federation::encode_record(&signed)?;
        let job = federation::job_id(&payload);
        // One transaction for every attempt: the ledger's exactly-once
        // rule then keeps an attempt that was taken after all from
        // committing the record twice.
        let tx = ledger.own_transaction(payload).await?;
        let mut delay = Duration::from_millis(200);
        for attempt in 0..8 {
            match ledger.submit(tx.clone()).await {
                Ok(_) => return Ok(job),
                Err(SubmitError::Duplicate) if attempt > 0 => return Ok(job),
                Err(e) if attempt < 7 => {
                    debug!(error = %e, "learning record refused; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
        bail!("learning record refused repeatedly")
    }

    /// Submits a new job coordinated by this node; returns its id.
    pub async fn submit_job(&self, spec: JobSpec) -> Result<JobId> {
        spec.validate()?;
        self.submit(Record::job(&spec)?).await
    }

    /// Every job on the ledger, newest last.
    pub fn jobs(&self) -> Result<Vec<JobView>> {
        Ok(self.state()?.participant.jobs().map(JobView::of).collect())
    }

    /// Trains for `task` and delivers the update; the training's CPU time
    /// (milliseconds, the training thread's) is added to `cpu`, for the
    /// operator's cap, whether or not the update arrives.
    async fn participate(
        self: &Arc<Self>,
        task: TrainingTask,
        cpu: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<()> {
        let Some(local) = &self.local else {
            bail!("selected, but this node has no learn.data");
        };
        if !task.spec.accepts(&local.train) {
            bail!("selected, but the local data does not fit the job's model");
        }
        let trainer = {
            let mut s = self.state()?;
            match s.trainers.get(&task.job) {
                Some(t) => t.clone(),
                None => {
                    let t = Trainer::new(task.spec.architecture.clone(), Compute::Cpu)?;
                    s.trainers.insert(task.job, t.clone());
                    t
                }
            }
        };
        let seed = federation::training_seed(&task.job, &task.spec, task.round, &self.me);
        if task.spec.secure_aggregation.is_some() {
            // Keys first: the model is fetched while the first stages run.
            return self.participate_secure(task, trainer, seed, cpu).await;
        }
        let TrainingTask {
            job,
            round,
            model,
            spec,
            coordinator,
            ..
        } = task;
        let coordinator_peer =
            peer_id_of(&coordinator).context("coordinator key is not a peer id")?;
        let params = self
            .model_params(&model, &trainer, Some(coordinator_peer))
            .await?;
        let mut feedback = self.state()?.feedback.remove(&job).flatten();
        let this = self.clone();
        let started = std::time::Instant::now();
        let cpu = cpu.clone();
        let (payload, samples, feedback) = tokio::task::spawn_blocking(move || {
            let Some(local) = &this.local else {
                return Err(anyhow!("no local data"));
            };
            let _timer = ThreadCpuTimer::start(&cpu);
            let (payload, samples) = match poison_for(&spec.name) {
                None => federation::client_update(
                    &spec,
                    &trainer,
                    &params,
                    &local.train,
                    seed,
                    &mut feedback,
                    |_| {},
                )?,
                // A hostile participant: its delta, poisoned and not
                // clipped, goes out as an honest one would.
                Some(attack) => {
                    let (mut delta, samples) = federation::client_delta(
                        &spec,
                        &trainer,
                        &params,
                        &local.train,
                        seed,
                        |_| {},
                    )?;
                    attack.apply(&mut delta);
                    let payload = openagi_learning::round::encode_update(
                        spec.compression,
                        delta,
                        &mut feedback,
                    )?;
                    (payload, samples)
                }
            };
            Ok((payload, samples, feedback))
        })
        .await??;
        self.state()?.feedback.insert(job, feedback);
        let bytes = payload.len();
        if coordinator == self.me {
            // This node coordinates the job too: no network hop to itself
            // (and the round may close here: off the async workers).
            let this = self.clone();
            tokio::task::spawn_blocking(move || {
                let accepted = match this.state()?.coordinators.get_mut(&job) {
                    Some(c) => c
                        .handle_update(&this.me, round, &payload, samples, crate::unix_ms())
                        .map_err(|e| anyhow!("own update refused: {e}")),
                    None => Err(anyhow!("this node no longer coordinates the job")),
                };
                this.drain();
                accepted
            })
            .await??;
            info!(%job, round, samples, bytes, train_ms = started.elapsed().as_millis() as u64, "update handed to the local coordinator");
            return Ok(());
        }
        let request = LearnRequest::Update {
            job,
            round,
            samples,
            payload,
        };
        match self.learn_exchange(coordinator_peer, &request).await? {
            LearnResponse::Accepted => {
                info!(%job, round, samples, bytes, train_ms = started.elapsed().as_millis() as u64, "update delivered");
                Ok(())
            }
            LearnResponse::Refused(why) => bail!("coordinator refused the update: {why}"),
            LearnResponse::Chunk { .. } | LearnResponse::SecAgg(_) => {
                bail!("coordinator answered out of turn")
            }
        }
    }

    /// A secure round from this participant's side: the SecAgg+ state
    /// machine, fed by polling the coordinator, with local training between
    /// receiving the neighbours' shares and sending the masked update.
    async fn participate_secure(
        self: &Arc<Self>,
        task: TrainingTask,
        trainer: Trainer,
        seed: u64,
        cpu: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<()> {
        let TrainingTask {
            job,
            round,
            model,
            spec,
            coordinator,
            participants,
        } = task;
        let dimension = trainer.descriptor().param_count();
        let session = federation::secure_session(&job, &spec, round, &participants, dimension)?
            .context("the job names no secure aggregation")?;
        // The masks and shares must be unpredictable: seeded from the OS.
        let mut rng_seed = [0u8; 32];
        openagi_crypto::os_random(&mut rng_seed)?;
        let mut rng = openagi_learning::rng_from_seed(rng_seed);
        let (mut part, advert) = SecAggParticipant::new(session, &self.identity, &mut rng)?;
        let started = std::time::Instant::now();
        // Five stages of at most a round deadline each, and time for the
        // round's start to commit at the coordinator.
        let give_up = started
            + Duration::from_secs(
                spec.round_deadline_secs
                    .saturating_mul(6)
                    .saturating_add(10),
            );
        let mut outgoing = Some(advert);
        let mut received = 0u32;
        let mut train_ms = 0;
        let mut retry = SECAGG_POLL;
        loop {
            if std::time::Instant::now() > give_up {
                bail!("secure round {round} did not end in time");
            }
            // A message is sent until an answer comes back; the
            // coordinator takes the same message twice without harm.
            let reply = match self
                .secagg_exchange(job, round, coordinator, received, outgoing.clone())
                .await
            {
                Ok(reply) => {
                    outgoing = None;
                    retry = SECAGG_POLL;
                    reply
                }
                // Shares revealed after the round had what it needed are
                // refused: the round is over, and nothing was lost.
                Err(e) if e.downcast_ref::<Refused>().is_some() && part.is_done() => {
                    info!(%job, round, train_ms, "masked update delivered; the round closed without this node's last shares");
                    return Ok(());
                }
                Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
                Err(e) => {
                    debug!(%job, round, error = format!("{e:#}"), "secure-aggregation exchange failed; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            if part.is_done() {
                info!(%job, round, train_ms, total_ms = started.elapsed().as_millis() as u64, "masked update delivered and unmasking shares revealed");
                return Ok(());
            }
            let Some(message) = reply else {
                tokio::time::sleep(SECAGG_POLL).await;
                continue;
            };
            received += 1;
            outgoing = match message {
                ToParticipant::Shares(shares) => {
                    part.handle_shares(&shares)?;
                    let coordinator_peer =
                        peer_id_of(&coordinator).context("coordinator key is not a peer id")?;
                    let params = self
                        .model_params(&model, &trainer, Some(coordinator_peer))
                        .await?;
                    let (trainer, spec) = (trainer.clone(), spec.clone());
                    let this = self.clone();
                    let training = std::time::Instant::now();
                    let cpu = cpu.clone();
                    let (delta, _samples) = tokio::task::spawn_blocking(move || {
                        let Some(local) = &this.local else {
                            return Err(anyhow!("no local data"));
                        };
                        let _timer = ThreadCpuTimer::start(&cpu);
                        Ok(federation::client_delta(
                            &spec,
                            &trainer,
                            &params,
                            &local.train,
                            seed,
                            |_| {},
                        )?)
                    })
                    .await??;
                    train_ms = training.elapsed().as_millis() as u64;
                    Some(part.masked_input(&delta, &mut rng)?)
                }
                other => part.handle_message(other, &self.identity, &mut rng)?,
            };
        }
    }

    /// One secure-aggregation exchange with the coordinator (this node's
    /// own coordinator without a network hop).
    async fn secagg_exchange(
        self: &Arc<Self>,
        job: JobId,
        round: u64,
        coordinator: PublicKey,
        received: u32,
        message: Option<FromParticipant>,
    ) -> Result<Option<ToParticipant>> {
        if coordinator == self.me {
            let this = self.clone();
            return tokio::task::spawn_blocking(move || {
                let reply = match this.state()?.coordinators.get_mut(&job) {
                    Some(c) => c
                        .handle_secagg(&this.me, round, received, message, crate::unix_ms())
                        .map_err(|e| anyhow!(Refused(e.to_string()))),
                    None => Err(anyhow!(Refused(
                        "this node no longer coordinates the job".into()
                    ))),
                };
                this.drain();
                reply
            })
            .await?;
        }
        let peer = peer_id_of(&coordinator).context("coordinator key is not a peer id")?;
        let request = LearnRequest::SecAgg {
            job,
            round,
            received,
            message,
        };
        match self.learn_exchange(peer, &request).await? {
            LearnResponse::SecAgg(reply) => Ok(reply),
            LearnResponse::Refused(why) => Err(anyhow!(Refused(why))),
            LearnResponse::Accepted | LearnResponse::Chunk { .. } => {
                bail!("coordinator answered out of turn")
            }
        }
    }

    /// One request on `/openagi/learn/1` and its decoded answer.
    async fn learn_exchange(&self, peer: PeerId, request: &LearnRequest) -> Result<LearnResponse> {
        let answer = self
            .net
            .learn_request(peer, postcard::to_stdvec(request)?)
            .await?;
        Ok(postcard::from_bytes(&answer)?)
    }

    /// The parameters of `model`: from memory, from disk, or fetched from
    /// `from` in chunks; always checked against the model id.
    async fn model_params(
        self: &Arc<Self>,
        model: &ModelId,
        trainer: &Trainer,
        from: Option<PeerId>,
    ) -> Result<Arc<Vec<f32>>> {
        if let Some(p) = self.state()?.models.get(model) {
            return Ok(p.clone());
        }
        let path = self.model_path(model);
        // Decoding and hashing up to 16 MiB: off the async workers.
        let check = |bytes: Vec<u8>| {
            let descriptor = trainer.descriptor().clone();
            let model = *model;
            async move {
                tokio::task::spawn_blocking(move || -> Result<Vec<f32>> {
                    let params = params_from_bytes(&bytes)?;
                    let found = ModelId::compute(&descriptor, &params)?;
                    if found != model {
                        bail!(
                            "model {} does not match its id (got {})",
                            model.to_hex(),
                            found.to_hex()
                        );
                    }
                    Ok(params)
                })
                .await?
            }
        };
        let on_disk = match tokio::fs::read(&path).await {
            Ok(bytes) => match check(bytes).await {
                Ok(params) => Some(params),
                Err(e) => {
                    // Damaged: remove it, so it can be fetched again.
                    warn!(path = %path.display(), error = format!("{e:#}"), "stored model removed");
                    let _ = tokio::fs::remove_file(&path).await;
                    None
                }
            },
            Err(_) => None,
        };
        let params = match on_disk {
            Some(p) => p,
            None => {
                let peer =
                    from.with_context(|| format!("model {} is not held here", model.to_hex()))?;
                check(self.fetch_model(peer, model, trainer).await?).await?
            }
        };
        let params = Arc::new(params);
        self.keep_model(*model, params.clone());
        Ok(params)
    }

    async fn fetch_model(
        &self,
        peer: PeerId,
        model: &ModelId,
        trainer: &Trainer,
    ) -> Result<Vec<u8>> {
        let expected = trainer.descriptor().param_count() as u64 * 4;
        let mut bytes = Vec::with_capacity(expected as usize);
        while (bytes.len() as u64) < expected {
            let request = LearnRequest::Model {
                model: *model,
                offset: bytes.len() as u64,
            };
            match self.learn_exchange(peer, &request).await? {
                LearnResponse::Chunk {
                    total,
                    bytes: chunk,
                } => {
                    if total != expected {
                        bail!("{peer} serves a model of {total} bytes; the job's has {expected}");
                    }
                    // Whole chunks only: a holder that trickles a byte at
                    // a time could hold a fetch for hours.
                    let want = (expected - bytes.len() as u64).min(MODEL_CHUNK_BYTES as u64);
                    if chunk.len() as u64 != want {
                        bail!("{peer} sent {} bytes of a {want}-byte chunk", chunk.len());
                    }
                    bytes.extend_from_slice(&chunk);
                }
                LearnResponse::Refused(why) => bail!("{peer} refused the model: {why}"),
                LearnResponse::Accepted | LearnResponse::SecAgg(_) => {
                    bail!("{peer} answered out of turn")
                }
            }
        }
        if bytes.len() as u64 != expected {
            bail!(
                "model transfer overran: {} bytes for {expected}",
                bytes.len()
            );
        }
        Ok(bytes)
    }

    fn model_path(&self, model: &ModelId) -> PathBuf {
        self.models_dir.join(format!("{}.bin", model.to_hex()))
    }

    fn keep_model(self: &Arc<Self>, id: ModelId, params: Arc<Vec<f32>>) {
        let path = self.model_path(&id);
        let write = match self.state() {
            Ok(mut s) => {
                if s.models.insert(id, params.clone()).is_none() {
                    s.model_order.push(id);
                }
                while s.model_order.len() > MODEL_CACHE {
                    let old = s.model_order.remove(0);
                    s.models.remove(&old);
                }
                // One writer per model: the temporary file name is fixed.
                !path.exists() && s.writing.insert(id)
            }
            Err(_) => false,
        };
        if write {
            let this = self.clone();
            tokio::spawn(async move {
                let written = {
                    let this = this.clone();
                    tokio::task::spawn_blocking(move || {
                        let bytes = params_to_bytes(&params);
                        let written = openagi_keyfiles::keyfile::write_atomic(&path, &bytes, 0o644);
                        if let Err(e) = &written {
                            warn!(path = %path.display(), error = %e, "model not written");
                        }
                        if let Ok(mut s) = this.state() {
                            s.writing.remove(&id);
                        }
                        if written.is_ok() {
                            this.metrics.models_held.inc();
                        }
                        written.is_ok()
                    })
                    .await
                    .unwrap_or(false)
                };
                // On disk, so it outlives a restart: now others may find it
                // (unless a prune took it in the meantime).
                if written && this.model_path(&id).exists() {
                    let _ = this.net.provide(provider_key(&id)).await;
                }
            });
        }
    }

    /// The model of `job` after `round` (the latest when `None`; round 0 is
    /// the initial model) as (id, little-endian `f32` bytes).
    pub async fn export(
        self: &Arc<Self>,
        job: &JobId,
        round: Option<u64>,
    ) -> Result<(ModelId, Vec<u8>)> {
        let (spec, coordinator, id) = {
            let s = self.state()?;
            let followed = s
                .participant
                .job(job)
                .with_context(|| format!("no job {job} on this node's ledger"))?;
            let model = match round {
                Some(r) => followed
                    .model_after(r)
                    .with_context(|| format!("round {r} of job {job} has not finished"))?,
                None => followed.current_model(),
            };
            (followed.spec.clone(), followed.coordinator, model)
        };
        let trainer = Trainer::new(spec.architecture.clone(), Compute::Cpu)?;
        let coordinator: Vec<PeerId> = if coordinator == self.me {
            Vec::new()
        } else {
            peer_id_of(&coordinator).into_iter().collect()
        };
        let params = match self.find_model(&id, &trainer, coordinator).await {
            Ok(p) => p,
            // Round 0 is a function of the spec: no one needs to send it.
            Err(_) if round == Some(0) => Arc::new(spec.initial_params()?),
            Err(e) => return Err(e),
        };
        Ok((id, params_to_bytes(&params)))
    }

    /// Answers a `/openagi/learn/1` request from `from`.
    pub async fn handle(self: &Arc<Self>, from: PeerId, data: Vec<u8>, reply: MsgReply) {
        let response = match postcard::from_bytes::<LearnRequest>(&data) {
            Err(e) => {
                // Framed right, garbage inside: counted against the sender.
                self.net.penalise(from, "learn", "malformed");
                LearnResponse::Refused(format!("malformed request: {e}"))
            }
            // Fetching the model takes network round trips: answered here.
            Ok(LearnRequest::KeepModel { job, model }) => {
                self.keep_model_for(from, job, model).await
            }
            Ok(request) => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.answer(from, request))
                    .await
                    .unwrap_or_else(|_| LearnResponse::Refused("internal error".into()))
            }
        };
        match postcard::to_stdvec(&response) {
            Ok(bytes) => {
                let _ = self.net.respond_msg(reply, bytes).await;
            }
            Err(e) => warn!(error = %e, "learning response not encoded"),
        }
    }

    /// A coordinator asks this node, one of its job's standbys, to keep the
    /// model its next round end names: fetched from it, checked against
    /// its id, kept before the answer.
    async fn keep_model_for(
        self: &Arc<Self>,
        from: PeerId,
        job: JobId,
        model: ModelId,
    ) -> LearnResponse {
        let spec = match self.state() {
            Ok(mut s) => {
                let allowed = s.participant.job(&job).and_then(|j| {
                    let sender = openagi_net::public_key_of(&from)?;
                    let standby = j
                        .spec
                        .chain_position(&j.submitter, &self.me)
                        .is_some_and(|p| p > 0);
                    // One model per started, unfinished round: a
                    // coordinator cannot make its standbys hold more.
                    let ended = j.history().last().map_or(0, |h| h.round);
                    (standby && sender == j.coordinator && j.round > ended)
                        .then(|| (j.spec.clone(), j.round))
                });
                match allowed {
                    Some((spec, round))
                        if s.kept_for_round.get(&job).is_none_or(|&r| r < round) =>
                    {
                        s.kept_for_round.insert(job, round);
                        Some(spec)
                    }
                    _ => None,
                }
            }
            Err(_) => None,
        };
        let Some(spec) = spec else {
            return LearnResponse::Refused(
                "only a job's coordinator asks its standbys to keep a model, once per round".into(),
            );
        };
        let kept = async {
            let trainer = Trainer::new(spec.architecture.clone(), Compute::Cpu)?;
            self.model_params(&model, &trainer, Some(from)).await
        };
        match kept.await {
            Ok(_) => LearnResponse::Accepted,
            Err(e) => LearnResponse::Refused(format!("model not kept: {e:#}")),
        }
    }

    /// Before a round end naming a new model commits, the job's standbys
    /// hold that model: the model outlives its coordinator. Standbys that do
    /// not answer delay the round by at most one request timeout.
    async fn replicate_model(self: &Arc<Self>, record: &Record) {
        let Record::RoundEnd(summary) = record else {
            return;
        };
        if !summary.aggregated {
            return;
        }
        let standbys = match self.state() {
            Ok(s) => s
                .participant
                .job(&summary.job)
                .and_then(|j| j.spec.standbys().ok())
                .unwrap_or_default(),
            Err(_) => return,
        };
        // All standbys at once: the round waits for the slowest, not the sum.
        let request = LearnRequest::KeepModel {
            job: summary.job,
            model: summary.model,
        };
        let asks = standbys
            .into_iter()
            .filter(|k| *k != self.me)
            .filter_map(|k| peer_id_of(&k))
            .map(|peer| {
                let request = &request;
                async move { (peer, self.learn_exchange(peer, request).await) }
            });
        for (peer, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(LearnResponse::Accepted) => {}
                Ok(other) => {
                    warn!(%peer, answer = ?other, "standby did not keep the round's model")
                }
                Err(e) => {
                    warn!(%peer, error = format!("{e:#}"), "standby did not keep the round's model")
                }
            }
        }
    }

    /// Hands a participant's message from `from` to this node's
    /// coordinator of `job`, then carries out what it asked for; an error
    /// is the refusal to send back.
    fn with_coordinator<T>(
        self: &Arc<Self>,
        from: &PeerId,
        job: &JobId,
        handle: impl FnOnce(&mut Coordinator, &PublicKey) -> openagi_learning::Result<T>,
    ) -> std::result::Result<T, String> {
        let sender = openagi_net::public_key_of(from)
            .ok_or_else(|| "sender is not an Open-AGI node".to_string())?;
        let result = match self.state() {
            Ok(mut s) => match s.coordinators.get_mut(job) {
                Some(c) => handle(c, &sender).map_err(|e| e.to_string()),
                None => Err("this node does not coordinate that job".into()),
            },
            Err(e) => Err(e.to_string()),
        };
        self.drain();
        result
    }

    fn answer(self: &Arc<Self>, from: PeerId, request: LearnRequest) -> LearnResponse {
        match request {
            // Answered in `handle`, which can wait for the network.
            LearnRequest::KeepModel { .. } => {
                LearnResponse::Refused("internal error: keep-model request misrouted".into())
            }
            LearnRequest::Model { model, offset } => {
                let cached = self
                    .state()
                    .ok()
                    .and_then(|s| s.models.get(&model).cloned());
                let params = match cached {
                    Some(p) => p,
                    // Read from disk once, then served from memory. (Its id
                    // was checked when it was kept.)
                    None => match std::fs::read(self.model_path(&model))
                        .ok()
                        .and_then(|b| params_from_bytes(&b).ok())
                    {
                        Some(p) => {
                            let p = Arc::new(p);
                            self.keep_model(model, p.clone());
                            p
                        }
                        None => {
                            return LearnResponse::Refused(format!(
                                "model {} is not held here",
                                model.to_hex()
                            ));
                        }
                    },
                };
                let total = params.len() * 4;
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                if start >= total || !start.is_multiple_of(4) {
                    return LearnResponse::Refused("offset beyond the model or unaligned".into());
                }
                let end = (start + MODEL_CHUNK_BYTES).min(total);
                LearnResponse::Chunk {
                    total: total as u64,
                    bytes: params_to_bytes(&params[start / 4..end / 4]),
                }
            }
            LearnRequest::Update {
                job,
                round,
                samples,
                payload,
            } => {
                let mut bad_update = false;
                let result = self.with_coordinator(&from, &job, |c, sender| {
                    let handled =
                        c.handle_update(sender, round, &payload, samples, crate::unix_ms());
                    // Malformed, oversized or over the clip bound: made
                    // against the rules. (A non-finite update can come of
                    // honest training that diverged; a duplicate, of a
                    // retry.)
                    bad_update = handled.as_ref().is_err_and(|e| {
                        matches!(
                            e,
                            openagi_learning::Error::Malformed { .. }
                                | openagi_learning::Error::TooLarge { .. }
                                | openagi_learning::Error::LengthMismatch { .. }
                        )
                    });
                    handled
                });
                match result {
                    Ok(()) => LearnResponse::Accepted,
                    Err(why) => {
                        self.metrics.updates_refused.inc();
                        if bad_update {
                            // Not late or unselected: made against the
                            // job's rules. The sender is counted.
                            warn!(%from, %job, round, %why, "update refused: not made by the job's rules");
                            self.net.penalise(from, "learn", "bad_update");
                        } else {
                            debug!(%from, %job, round, %why, "update refused");
                        }
                        LearnResponse::Refused(why)
                    }
                }
            }
            LearnRequest::SecAgg {
                job,
                round,
                received,
                message,
            } => {
                let result = self.with_coordinator(&from, &job, |c, sender| {
                    c.handle_secagg(sender, round, received, message, crate::unix_ms())
                });
                match result {
                    Ok(reply) => LearnResponse::SecAgg(reply),
                    Err(why) => {
                        self.metrics.updates_refused.inc();
                        debug!(%from, %job, round, %why, "secure-aggregation message refused");
                        LearnResponse::Refused(why)
                    }
                }
            }
        }
    }
}

/// The attack [`FAULT_POISON_ENV`] asks of this node for the job named
/// `job_name`, in a debug build.
fn poison_for(job_name: &str) -> Option<openagi_learning::simulate::AttackKind> {
    if !cfg!(debug_assertions) {
        return None;
    }
    use openagi_learning::simulate::AttackKind;
    let text = std::env::var(FAULT_POISON_ENV).ok()?;
    let mut parts = text.splitn(3, ':');
    let (kind, factor, only) = (parts.next()?, parts.next()?, parts.next());
    if only.is_some_and(|name| name != job_name) {
        return None;
    }
    let factor: f32 = factor.parse().ok()?;
    let attack = match kind {
        "signflip" => AttackKind::SignFlip { factor },
        "scale" => AttackKind::Scale { factor },
        _ => return None,
    };
    warn!(
        job = job_name,
        ?attack,
        "fault injection ({FAULT_POISON_ENV}): this node sends a poisoned update"
    );
    Some(attack)
}

/// Adds the CPU time the current thread spends until it is dropped to a
/// counter (milliseconds): a job's training runs on one blocking thread.
struct ThreadCpuTimer<'a> {
    total: &'a std::sync::atomic::AtomicU64,
    started: Duration,
}

impl<'a> ThreadCpuTimer<'a> {
    fn start(total: &'a std::sync::atomic::AtomicU64) -> Self {
        Self {
            total,
            started: thread_cpu_time(),
        }
    }
}

impl Drop for ThreadCpuTimer<'_> {
    fn drop(&mut self) {
        let spent = thread_cpu_time().saturating_sub(self.started);
        self.total.fetch_add(
            u64::try_from(spent.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// CPU time of the calling thread (user and system).
fn thread_cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_THREAD) {
        Ok(usage) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000)
            };
            tv(usage.user_time()) + tv(usage.system_time())
        }
        // Cannot fail for the calling thread on Linux; zero counts nothing.
        Err(_) => Duration::ZERO,
    }
}

/// Writes a participant's notice to the log.
fn log_notice(notice: &Notice) {
    match notice {
        Notice::NewJob {
            job,
            name,
            coordinator,
            min_clients,
            not_joining,
        } => {
            info!(%job, %name, %coordinator, min_clients, "learning job on the ledger");
            if let Some(why) = not_joining {
                info!(%job, reason = %why, "not joining this learning job");
            }
        }
        Notice::JoinedOwnJob {
            job,
            joined,
            min_clients,
        } => info!(%job, joined, min_clients, "a node joined this node's learning job"),
        Notice::OutOfSequence { job, round } => {
            debug!(%job, round, "round start out of sequence ignored")
        }
        Notice::TooManyJobs { job } => warn!(
            %job,
            max = participant::MAX_JOBS,
            "too many unfinished learning jobs on the ledger; ignoring this one"
        ),
        Notice::TakenOver { job, by } => {
            info!(job = %job, coordinator = %by, "a standby coordinator took the job over")
        }
        Notice::CpuCapReached {
            job,
            used_ms,
            cap_ms,
        } => {
            info!(%job, used_cpu_secs = used_ms / 1000, cap_secs = cap_ms / 1000, "stopped training for this job: learn.max_cpu_secs_per_job reached")
        }
        Notice::Unbuildable { job, error } => {
            warn!(job = %job, %error, "job's initial model cannot be built; ignoring the job")
        }
    }
}

/// The job a committed record belongs to.
fn job_of(record: &Record, payload: &[u8]) -> JobId {
    match record {
        Record::Job(_) => federation::job_id(payload),
        Record::Join { job, .. } | Record::RoundStart { job, .. } | Record::Takeover { job } => {
            *job
        }
        Record::RoundEnd(s) => s.job,
    }
}

enum Action {
    Submit(Record),
    Train(Box<TrainingTask>),
}

/// The coordinator refused a secure-aggregation message: the round is over
/// for this participant (unlike a lost connection, which is retried).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "coordinator refused: {}", self.0)
    }
}

impl std::error::Error for Refused {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The learn protocol's request limit must carry the largest update a
    /// job may produce: a dense (uncompressed) delta of the most
    /// parameters a networked job allows, inside its request envelope.
    #[test]
    fn the_learn_request_limit_covers_the_largest_update() {
        let payload =
            openagi_learning::compress::encode(&openagi_learning::compress::Payload::Dense(vec![
                0.0;
                federation::MAX_JOB_PARAMS
            ]))
            .expect("encodes");
        let request = LearnRequest::Update {
            job: JobId([0xff; 32]),
            round: u64::MAX,
            samples: u64::MAX,
            payload,
        };
        let bytes = postcard::to_stdvec(&request).expect("encodes");
        assert!(
            bytes.len() <= openagi_net::MAX_LEARN_REQUEST_BYTES,
            "{} bytes > {}",
            bytes.len(),
            openagi_net::MAX_LEARN_REQUEST_BYTES
        );
    }

    /// The same limit carries the largest masked update of a secure round.
    #[test]
    fn the_learn_request_limit_covers_the_largest_masked_update() {
        let request = LearnRequest::SecAgg {
            job: JobId([0xff; 32]),
            round: u64::MAX,
            received: u32::MAX,
            message: Some(FromParticipant::Masked(
                openagi_learning::secagg::MaskedInput(vec![u32::MAX; federation::MAX_JOB_PARAMS]),
            )),
        };
        let bytes = postcard::to_stdvec(&request).expect("encodes");
        assert!(
            bytes.len() <= openagi_net::MAX_LEARN_REQUEST_BYTES,
            "{} bytes > {}",
            bytes.len(),
            openagi_net::MAX_LEARN_REQUEST_BYTES
        );
        let back: LearnRequest = postcard::from_bytes(&bytes).expect("decodes");
        let LearnRequest::SecAgg {
            message: Some(FromParticipant::Masked(values)),
            ..
        } = back
        else {
            panic!("round trip");
        };
        assert_eq!(values.0.len(), federation::MAX_JOB_PARAMS);
    }

    fn summary(job: u8, round: u64, epsilon: Option<f64>, finished: bool) -> RoundSummary {
        RoundSummary {
            job: JobId([job; 32]),
            round,
            model: ModelId([1; 32]),
            parent: ModelId([0; 32]),
            aggregated: true,
            selected: 2,
            responded: 2,
            rejected: 0,
            samples: 100,
            epsilon,
            accuracy: Some(0.5),
            finished,
        }
    }

    fn series(registry: &Registry, name: &str) -> Vec<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
        // A family's series come in hash order.
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with(name))
            .map(String::from)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn job_gauges_exist_while_a_job_runs_and_epsilon_only_with_dp() {
        let mut registry = Registry::with_prefix("openagi");
        let metrics = LearnMetrics::register(&mut registry);
        let plain = JobId([7; 32]).to_hex();
        let private = JobId([8; 32]).to_hex();
        metrics.round_ended(&summary(7, 1, None, false), None);
        metrics.round_ended(&summary(8, 2, Some(1.5), false), Some(2.0));
        assert_eq!(
            series(&registry, "openagi_learn_round{"),
            vec![
                format!("openagi_learn_round{{job=\"{plain}\"}} 1"),
                format!("openagi_learn_round{{job=\"{private}\"}} 2"),
            ]
        );
        // No epsilon series for the job without DP, not even 0.
        assert_eq!(
            series(&registry, "openagi_learn_epsilon{"),
            vec![format!("openagi_learn_epsilon{{job=\"{private}\"}} 1.5")]
        );
        assert_eq!(series(&registry, "openagi_learn_accuracy_ratio{").len(), 2);
        // The share of the budget spent, for the job that has one.
        assert_eq!(
            series(&registry, "openagi_learn_epsilon_budget_used_ratio{"),
            vec![format!(
                "openagi_learn_epsilon_budget_used_ratio{{job=\"{private}\"}} 0.75"
            )]
        );

        // A finished job's series go.
        metrics.round_ended(&summary(8, 3, Some(2.0), true), Some(2.0));
        assert_eq!(
            series(&registry, "openagi_learn_round{"),
            vec![format!("openagi_learn_round{{job=\"{plain}\"}} 1")]
        );
        assert!(series(&registry, "openagi_learn_epsilon{").is_empty());
        assert!(series(&registry, "openagi_learn_epsilon_budget_used_ratio{").is_empty());
        assert_eq!(series(&registry, "openagi_learn_accuracy_ratio{").len(), 1);
    }
}
