//! A node's side of federated learning, as a sans-IO state machine.
//!
//! Every node follows the learning records on the ledger, in commit order:
//! jobs, joins, round starts and ends. The [`Participant`] keeps what the
//! ledger says about each job ([`FollowedJob`]) and decides, by the
//! protocol's rules, what the node does: join a job its local data fits,
//! coordinate a job it submitted, train when a round names it. It does no
//! I/O: the node feeds it committed records
//! ([`Participant::handle_record`]) and the end of local training
//! ([`Participant::handle_training_finished`]), and carries out what
//! [`Participant::poll_output`] asks for (submit a record, train, keep
//! metrics). The coordinator's side is [`crate::federation::Coordinator`].
//!
//! The rules it keeps:
//! - a round start counts only when it comes from the job's coordinator,
//!   for the next round of an unfinished job, from the model its last round
//!   ended with: a coordinator cannot make participants train on anything
//!   else;
//! - a node trains at most once per round and one round of a job at a time;
//! - records replayed at start (`live == false`) rebuild the state but
//!   start no join or training; a job this node coordinates gets its
//!   coordinator back (it rebuilds its state from the same records and
//!   resumes at its next round), and is `Interrupted` only if the node
//!   cannot resume it ([`Participant::handle_coordination_lost`]);
//! - at most [`MAX_JOBS`] jobs are followed (a finished one is forgotten
//!   first) and [`HISTORY`] rounds of each are kept.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use openagi_crypto::PublicKey;

use crate::data::DataProfile;
use crate::federation::{self, JobId, JobSpec, MAX_PARTICIPANTS, Record, RoundSummary};
use crate::model::ModelId;

/// Most jobs followed at once.
pub const MAX_JOBS: usize = 256;
/// Most finished rounds kept per job.
pub const HISTORY: usize = 1000;

/// Where a job stands, as this node's ledger shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for joins before its first round.
    Gathering,
    /// Rounds are running.
    Running,
    /// Its last round ended.
    Finished,
    /// This node coordinated it, restarted, and could not resume it (the
    /// current model was not on its disk).
    Interrupted,
}

impl JobState {
    /// The state's name in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Gathering => "gathering",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Interrupted => "interrupted",
        }
    }
}

/// A job as the ledger shows it to this node.
#[derive(Clone, Debug)]
pub struct FollowedJob {
    /// The job.
    pub id: JobId,
    /// Its spec.
    pub spec: JobSpec,
    /// The node that coordinates it: its submitter, or the standby that
    /// took it over last.
    pub coordinator: PublicKey,
    /// The node that submitted it (first in its chain of coordinators).
    pub submitter: PublicKey,
    /// The round-0 model.
    pub initial_model: ModelId,
    /// Where it stands.
    pub state: JobState,
    /// The latest round started.
    pub round: u64,
    /// Whether this node joined.
    pub joined_here: bool,
    /// Why this node does not join, when it does not.
    pub not_joining: Option<String>,
    joiners: HashSet<PublicKey>,
    history: VecDeque<RoundSummary>,
}

impl FollowedJob {
    /// The nodes that joined (who hold the models they trained from).
    pub fn joiners(&self) -> impl Iterator<Item = &PublicKey> {
        self.joiners.iter()
    }

    /// Nodes that joined, each counted once, at most
    /// [`MAX_PARTICIPANTS`] (as the coordinator counts them).
    pub fn joined(&self) -> usize {
        self.joiners.len()
    }

    /// Finished rounds, oldest first (the last [`HISTORY`]).
    pub fn history(&self) -> impl Iterator<Item = &RoundSummary> {
        self.history.iter()
    }

    /// The model the job stands at: the last round's, or the initial one.
    pub fn current_model(&self) -> ModelId {
        self.history.back().map_or(self.initial_model, |h| h.model)
    }

    /// The model after `round` (0: the initial model), if that round has
    /// finished and is still in the history.
    pub fn model_after(&self, round: u64) -> Option<ModelId> {
        if round == 0 {
            return Some(self.initial_model);
        }
        self.history
            .iter()
            .find(|h| h.round == round)
            .map(|h| h.model)
    }
}

/// What the local data is, for the join decision.
#[derive(Clone, Debug, PartialEq)]
pub enum LocalData {
    /// The shape of the data this node trains on.
    Present(DataProfile),
    /// The node has no training data, and why (in the operator's words).
    Absent(String),
}

/// Which jobs the operator lets this node join (among those its data
/// fits).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct JoinPolicy {
    /// Join nothing at all.
    pub never: bool,
    /// When not empty, only jobs these keys coordinate.
    pub coordinators: Vec<PublicKey>,
    /// Only jobs with client-level differential privacy.
    pub require_dp: bool,
    /// Only jobs whose privacy budget caps ε at this or less (a job
    /// without DP, or without a budget, promises no bound).
    pub max_epsilon: Option<f64>,
    /// Only jobs whose coordinator sees sums, never this node's update.
    pub require_secure_aggregation: bool,
    /// When not empty, only these model kinds (`logistic_regression`,
    /// `mlp`, `cnn`).
    pub models: Vec<String>,
    /// Only jobs of at most this many rounds (a cap on the work one job
    /// can ask of this node).
    pub max_rounds: Option<u64>,
    /// Stop training for a job once its local training has used this many
    /// milliseconds of CPU time on this node (counted since the node
    /// started). The job's later rounds count this node as a straggler.
    pub max_cpu_ms: Option<u64>,
}

impl JoinPolicy {
    /// Why the policy keeps this node out of `spec` (coordinated by
    /// `coordinator`), in the operator's terms; `None` when it allows it.
    pub fn refusal(&self, spec: &JobSpec, coordinator: &PublicKey) -> Option<String> {
        if self.never {
            return Some(
                "the operator's policy joins no job (learn.join = \"none\"; set it to \
                 \"fitting\" to train for jobs the data fits)"
                    .into(),
            );
        }
        if !self.coordinators.is_empty() && !self.coordinators.contains(coordinator) {
            return Some(format!(
                "its coordinator {} is not in learn.coordinators",
                coordinator.fingerprint()
            ));
        }
        // A standby may take the job over and receive this node's updates:
        // the allowlist covers every node in the job's chain.
        if !self.coordinators.is_empty()
            && let Some(standby) = spec
                .standbys()
                .unwrap_or_default()
                .into_iter()
                .find(|k| !self.coordinators.contains(k))
        {
            return Some(format!(
                "its standby coordinator {} is not in learn.coordinators",
                standby.fingerprint()
            ));
        }
        if self.require_dp && spec.privacy.is_none() {
            return Some("it runs without differential privacy and learn.require_dp is set".into());
        }
        if let Some(limit) = self.max_epsilon {
            match spec.privacy.and_then(|p| p.budget_epsilon) {
                Some(budget) if budget <= limit => {}
                Some(budget) => {
                    return Some(format!(
                        "its ε budget {budget} is above learn.max_epsilon = {limit}"
                    ));
                }
                None => {
                    return Some(format!(
                        "it promises no ε bound (no [privacy] budget_epsilon) and \
                         learn.max_epsilon = {limit}"
                    ));
                }
            }
        }
        if self.require_secure_aggregation && spec.secure_aggregation.is_none() {
            return Some(
                "its coordinator would see this node's update (no secure_aggregation) and \
                 learn.require_secure_aggregation is set"
                    .into(),
            );
        }
        let kind = spec.architecture.kind();
        if !self.models.is_empty() && !self.models.iter().any(|m| m == kind) {
            return Some(format!(
                "its model is a {kind}, not one of learn.models = {:?}",
                self.models
            ));
        }
        if let Some(limit) = self.max_rounds
            && spec.rounds > limit
        {
            return Some(format!(
                "it runs {} rounds, more than learn.max_rounds = {limit}",
                spec.rounds
            ));
        }
        None
    }
}

/// Something the operator should hear about.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// A new job committed (live only).
    NewJob {
        /// The job.
        job: JobId,
        /// Its name.
        name: String,
        /// Its coordinator's key fingerprint.
        coordinator: String,
        /// Joins it waits for.
        min_clients: usize,
        /// Why this node does not join it.
        not_joining: Option<String>,
    },
    /// A node joined a job this node coordinates (live only).
    JoinedOwnJob {
        /// The job.
        job: JobId,
        /// Joins so far.
        joined: usize,
        /// Joins it waits for.
        min_clients: usize,
    },
    /// A round start that breaks the sequence was ignored.
    OutOfSequence {
        /// The job.
        job: JobId,
        /// The round it named.
        round: u64,
    },
    /// A job was not followed: too many unfinished jobs.
    TooManyJobs {
        /// The job.
        job: JobId,
    },
    /// A standby coordinator took a job over (live only).
    TakenOver {
        /// The job.
        job: JobId,
        /// The new coordinator's fingerprint.
        by: String,
    },
    /// This node stopped training for a job: it reached its CPU cap.
    CpuCapReached {
        /// The job.
        job: JobId,
        /// CPU milliseconds its training used here.
        used_ms: u64,
        /// The cap (`learn.max_cpu_secs_per_job`), in milliseconds.
        cap_ms: u64,
    },
    /// A job was not followed: its initial model cannot be built.
    Unbuildable {
        /// The job.
        job: JobId,
        /// Why.
        error: String,
    },
}

/// A round this node is to train for.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingTask {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u64,
    /// The model to train from.
    pub model: ModelId,
    /// The job's spec.
    pub spec: JobSpec,
    /// Where the update goes.
    pub coordinator: PublicKey,
    /// The round's participants in their committed order (a secure round
    /// builds its session from them).
    pub participants: Vec<PublicKey>,
}

/// What the participant asks its node to do.
#[derive(Clone, Debug, PartialEq)]
pub enum ParticipantOutput {
    /// Sign and submit this record (a join) to the ledger.
    Submit(Record),
    /// This node submitted the job or is one of its standby coordinators:
    /// start its coordinator (also when the job record is replayed at
    /// start, to resume it). A standby's coordinator follows the job
    /// passively until it takes over.
    Coordinate {
        /// The job.
        job: JobId,
        /// Its spec.
        spec: Box<JobSpec>,
        /// Who submitted it.
        submitter: PublicKey,
    },
    /// Train for a round and send the update to the coordinator; report
    /// the end with [`Participant::handle_training_finished`].
    Train(Box<TrainingTask>),
    /// A round of a followed job committed.
    RoundCommitted {
        /// The round's ledger record.
        summary: RoundSummary,
        /// Whether it committed now (not replayed at start).
        live: bool,
    },
    /// A job ended: its local training state (trainer, error feedback) can
    /// go.
    JobFinished(JobId),
    /// Something for the log.
    Notice(Notice),
}

/// A node's participant state machine (see the module documentation).
#[derive(Debug)]
pub struct Participant {
    me: PublicKey,
    local: LocalData,
    policy: JoinPolicy,
    jobs: BTreeMap<JobId, FollowedJob>,
    /// (job, round) this node already trained for.
    trained: HashSet<(JobId, u64)>,
    /// Jobs this node is training for right now.
    training: HashSet<JobId>,
    /// CPU milliseconds each job's training used here, for
    /// [`JoinPolicy::max_cpu_ms`].
    cpu_ms: HashMap<JobId, u64>,
    outputs: VecDeque<ParticipantOutput>,
}

impl Participant {
    /// A participant for the node with key `me` and local data `local`
    /// that joins every job its data fits (see [`Participant::with_policy`]).
    pub fn new(me: PublicKey, local: LocalData) -> Self {
        Self::with_policy(me, local, JoinPolicy::default())
    }

    /// A participant that joins only the jobs `policy` allows.
    pub fn with_policy(me: PublicKey, local: LocalData, policy: JoinPolicy) -> Self {
        Self {
            me,
            local,
            policy,
            jobs: BTreeMap::new(),
            trained: HashSet::new(),
            training: HashSet::new(),
            cpu_ms: HashMap::new(),
            outputs: VecDeque::new(),
        }
    }

    /// Every followed job, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &FollowedJob> {
        self.jobs.values()
    }

    /// One followed job.
    pub fn job(&self, id: &JobId) -> Option<&FollowedJob> {
        self.jobs.get(id)
    }

    /// Why this node does not join `spec` (coordinated by `coordinator`),
    /// or `None` when its data fits and the operator's policy allows it.
    pub fn join_refusal(&self, spec: &JobSpec, coordinator: &PublicKey) -> Option<String> {
        match &self.local {
            LocalData::Absent(why) => Some(why.clone()),
            LocalData::Present(profile) => spec
                .misfit_profile(profile)
                .or_else(|| self.policy.refusal(spec, coordinator)),
        }
    }

    /// This node coordinates `job` but could not resume it after a restart:
    /// it shows as interrupted.
    pub fn handle_coordination_lost(&mut self, job: &JobId) {
        if let Some(followed) = self.jobs.get_mut(job)
            && followed.state != JobState::Finished
        {
            followed.state = JobState::Interrupted;
        }
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<ParticipantOutput> {
        self.outputs.pop_front()
    }

    /// Local training for `job` ended (with or without an update sent).
    pub fn handle_training_finished(&mut self, job: &JobId, cpu_ms: u64) {
        self.training.remove(job);
        let used = self.cpu_ms.entry(*job).or_insert(0);
        *used = used.saturating_add(cpu_ms);
        let used = *used;
        let Some(cap) = self.policy.max_cpu_ms else {
            return;
        };
        if used < cap {
            return;
        }
        if let Some(followed) = self.jobs.get_mut(job)
            && followed.state != JobState::Finished
            && followed.not_joining.is_none()
        {
            followed.not_joining = Some(format!(
                "stopped training: this job used {:.1} s of CPU here, learn.max_cpu_secs_per_job is {}",
                used as f64 / 1000.0,
                cap / 1000
            ));
            self.notice(Notice::CpuCapReached {
                job: *job,
                used_ms: used,
                cap_ms: cap,
            });
        }
    }

    /// Whether this node may still train for `job` under its CPU cap.
    fn within_cpu_cap(&self, job: &JobId) -> bool {
        self.policy
            .max_cpu_ms
            .is_none_or(|cap| self.cpu_ms.get(job).copied().unwrap_or(0) < cap)
    }

    /// A committed learning record signed by `signer`; `payload` is the
    /// transaction it came in (a job's id is the hash of it). `live`: it
    /// committed now, rather than being replayed from the ledger at start.
    pub fn handle_record(
        &mut self,
        signer: &PublicKey,
        record: &Record,
        payload: &[u8],
        live: bool,
    ) {
        match record {
            Record::Job(_) => self.job_record(signer, record, payload, live),
            Record::Join { job, .. } => self.join_record(signer, job, live),
            Record::RoundStart {
                job,
                round,
                model,
                participants,
            } => self.round_start(signer, job, *round, model, participants, live),
            Record::RoundEnd(summary) => self.round_end(signer, summary, live),
            Record::Takeover { job } => self.takeover(signer, job, live),
        }
    }

    fn notice(&mut self, notice: Notice) {
        self.outputs.push_back(ParticipantOutput::Notice(notice));
    }

    fn job_record(&mut self, signer: &PublicKey, record: &Record, payload: &[u8], live: bool) {
        let Ok(Some(spec)) = record.job_spec() else {
            return;
        };
        let job = federation::job_id(payload);
        if self.jobs.contains_key(&job) {
            return;
        }
        let initial_model = match spec
            .architecture
            .descriptor()
            .and_then(|d| ModelId::compute(&d, &spec.initial_params()?))
        {
            Ok(model) => model,
            Err(e) => {
                // Validated specs build; one that does not cannot run
                // here, so it is not followed.
                self.notice(Notice::Unbuildable {
                    job,
                    error: e.to_string(),
                });
                return;
            }
        };
        if self.jobs.len() >= MAX_JOBS {
            // Forget a finished job first; refuse to follow more
            // unfinished ones than this.
            let finished = self
                .jobs
                .iter()
                .find(|(_, j)| j.state == JobState::Finished)
                .map(|(id, _)| *id);
            match finished {
                Some(id) => {
                    self.jobs.remove(&id);
                    self.cpu_ms.remove(&id);
                }
                None => {
                    self.notice(Notice::TooManyJobs { job });
                    return;
                }
            }
        }
        // The submitter and every standby run a coordinator for the job.
        let mine = spec.chain_position(signer, &self.me).is_some();
        let not_joining = self.join_refusal(&spec, signer);
        let followed = FollowedJob {
            id: job,
            spec: spec.clone(),
            coordinator: *signer,
            submitter: *signer,
            initial_model,
            state: JobState::Gathering,
            round: 0,
            joined_here: false,
            not_joining: not_joining.clone(),
            joiners: HashSet::new(),
            history: VecDeque::new(),
        };
        self.jobs.insert(job, followed);
        if !live {
            if mine {
                // Coordination resumes: the coordinator follows the rest
                // of the replay and takes over where the ledger ends.
                self.outputs.push_back(ParticipantOutput::Coordinate {
                    job,
                    spec: Box::new(spec),
                    submitter: *signer,
                });
            }
            return;
        }
        self.notice(Notice::NewJob {
            job,
            name: spec.name.clone(),
            coordinator: signer.fingerprint(),
            min_clients: spec.min_clients,
            not_joining: not_joining.clone(),
        });
        if mine {
            self.outputs.push_back(ParticipantOutput::Coordinate {
                job,
                spec: Box::new(spec),
                submitter: *signer,
            });
        }
        if not_joining.is_none()
            && let LocalData::Present(profile) = &self.local
        {
            let samples = profile.samples as u64;
            self.outputs
                .push_back(ParticipantOutput::Submit(Record::Join { job, samples }));
        }
    }

    /// A standby takes the job over if it comes later in the chain than
    /// the current coordinator: from now on round records count only from
    /// it, and updates go to it.
    fn takeover(&mut self, signer: &PublicKey, job: &JobId, live: bool) {
        let Some(followed) = self.jobs.get_mut(job) else {
            return;
        };
        let position = |key: &PublicKey| followed.spec.chain_position(&followed.submitter, key);
        let later = match (position(signer), position(&followed.coordinator)) {
            (Some(new), Some(old)) => new > old,
            _ => false,
        };
        if !later || followed.state == JobState::Finished {
            return;
        }
        followed.coordinator = *signer;
        if live {
            self.notice(Notice::TakenOver {
                job: *job,
                by: signer.fingerprint(),
            });
        }
    }

    fn join_record(&mut self, signer: &PublicKey, job: &JobId, live: bool) {
        let me = self.me;
        let Some(followed) = self.jobs.get_mut(job) else {
            return;
        };
        if followed.joiners.len() >= MAX_PARTICIPANTS || !followed.joiners.insert(*signer) {
            return;
        }
        followed.joined_here |= *signer == me;
        if live && followed.coordinator == me && followed.state == JobState::Gathering {
            let notice = Notice::JoinedOwnJob {
                job: *job,
                joined: followed.joined(),
                min_clients: followed.spec.min_clients,
            };
            self.notice(notice);
        }
    }

    fn round_start(
        &mut self,
        signer: &PublicKey,
        job: &JobId,
        round: u64,
        model: &ModelId,
        participants: &[PublicKey],
        live: bool,
    ) {
        let Some(followed) = self.jobs.get_mut(job) else {
            return;
        };
        if *signer != followed.coordinator {
            return;
        }
        let next = followed.history.back().map_or(1, |h| h.round + 1);
        if followed.state == JobState::Finished
            || round != next
            || round > followed.spec.rounds
            || *model != followed.current_model()
        {
            self.notice(Notice::OutOfSequence { job: *job, round });
            return;
        }
        followed.round = followed.round.max(round);
        // A round from whoever coordinates now: the job lives (even if
        // this node could not resume it before a standby took over).
        if matches!(followed.state, JobState::Gathering | JobState::Interrupted) {
            followed.state = JobState::Running;
        }
        let spec = followed.spec.clone();
        let coordinator = followed.coordinator;
        if live
            && participants.contains(&self.me)
            && self.within_cpu_cap(job)
            && !self.training.contains(job)
            && self.trained.insert((*job, round))
        {
            self.training.insert(*job);
            self.outputs
                .push_back(ParticipantOutput::Train(Box::new(TrainingTask {
                    job: *job,
                    round,
                    model: *model,
                    spec,
                    coordinator,
                    participants: participants.to_vec(),
                })));
        }
    }

    fn round_end(&mut self, signer: &PublicKey, summary: &RoundSummary, live: bool) {
        let job = summary.job;
        let Some(followed) = self.jobs.get_mut(&job) else {
            return;
        };
        if *signer != followed.coordinator {
            return;
        }
        // A resubmitted round end may commit twice.
        if followed
            .history
            .back()
            .is_some_and(|h| h.round >= summary.round)
        {
            return;
        }
        // The lineage holds: the next round, started, from the model the
        // last one ended with. An end that breaks it is not followed.
        let next = followed.history.back().map_or(1, |h| h.round + 1);
        if summary.round != next
            || summary.round > followed.round
            || summary.parent != followed.current_model()
        {
            self.notice(Notice::OutOfSequence {
                job,
                round: summary.round,
            });
            return;
        }
        if followed.history.len() >= HISTORY {
            followed.history.pop_front();
        }
        followed.history.push_back(summary.clone());
        if summary.finished {
            followed.state = JobState::Finished;
            self.trained.retain(|(j, _)| *j != job);
            self.cpu_ms.remove(&job);
            self.outputs.push_back(ParticipantOutput::JobFinished(job));
        }
        self.outputs.push_back(ParticipantOutput::RoundCommitted {
            summary: summary.clone(),
            live,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::encode_record;
    use openagi_crypto::{Identity, Signed};

    fn spec(rounds: u64) -> JobSpec {
        JobSpec {
            rounds,
            ..crate::federation::tests::spec()
        }
    }

    fn digits() -> LocalData {
        LocalData::Present(DataProfile {
            samples: 100,
            features: 64,
            classes: 10,
        })
    }

    fn key(seed: u8) -> Identity {
        Identity::from_seed(&[seed; 32])
    }

    /// A job record signed by `coordinator`: (record, payload, job id).
    fn job(coordinator: &Identity, spec: &JobSpec) -> (Record, Vec<u8>, JobId) {
        let record = Record::job(spec).expect("job record");
        let payload =
            encode_record(&Signed::sign(coordinator, &record).expect("signed")).expect("encoded");
        let id = federation::job_id(&payload);
        (record, payload, id)
    }

    fn drain(p: &mut Participant) -> Vec<ParticipantOutput> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    fn start(job: JobId, round: u64, model: ModelId, participants: Vec<PublicKey>) -> Record {
        Record::RoundStart {
            job,
            round,
            model,
            participants,
        }
    }

    fn end(job: JobId, round: u64, parent: ModelId, model: ModelId, finished: bool) -> Record {
        Record::RoundEnd(RoundSummary {
            job,
            round,
            model,
            parent,
            aggregated: true,
            selected: 2,
            responded: 2,
            rejected: 0,
            samples: 200,
            epsilon: None,
            accuracy: Some(0.5),
            finished,
        })
    }

    #[test]
    fn a_job_that_fits_is_joined_and_one_that_does_not_says_why() {
        let (coordinator, me) = (key(1), key(2));
        let (record, payload, id) = job(&coordinator, &spec(2));
        let mut p = Participant::new(me.public(), digits());
        p.handle_record(&coordinator.public(), &record, &payload, true);
        let outputs = drain(&mut p);
        assert!(outputs.contains(&ParticipantOutput::Submit(Record::Join {
            job: id,
            samples: 100
        })));
        assert!(
            !outputs
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Coordinate { .. }))
        );
        let followed = p.job(&id).expect("followed");
        assert_eq!(followed.state, JobState::Gathering);
        assert_eq!(followed.not_joining, None);

        let mut without = Participant::new(me.public(), LocalData::Absent("no data".into()));
        without.handle_record(&coordinator.public(), &record, &payload, true);
        assert!(
            !drain(&mut without)
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Submit(_)))
        );
        assert_eq!(
            without.job(&id).expect("followed").not_joining.as_deref(),
            Some("no data")
        );

        let mut misfit = Participant::new(
            me.public(),
            LocalData::Present(DataProfile {
                samples: 100,
                features: 10,
                classes: 2,
            }),
        );
        misfit.handle_record(&coordinator.public(), &record, &payload, true);
        let why = misfit.job(&id).expect("followed").not_joining.clone();
        assert!(why.is_some_and(|w| w.contains("10 features")));
    }

    #[test]
    fn own_jobs_are_coordinated_live_and_resumed_when_replayed() {
        let me = key(1);
        let (record, payload, id) = job(&me, &spec(2));
        let mut live = Participant::new(me.public(), digits());
        live.handle_record(&me.public(), &record, &payload, true);
        assert!(
            drain(&mut live)
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Coordinate { job, .. } if *job == id))
        );

        let mut replayed = Participant::new(me.public(), digits());
        replayed.handle_record(&me.public(), &record, &payload, false);
        let outputs = drain(&mut replayed);
        assert!(
            matches!(outputs.as_slice(), [ParticipantOutput::Coordinate { job, .. }] if *job == id),
            "a replay resumes coordination and starts nothing else: {outputs:?}"
        );
        assert_eq!(
            replayed.job(&id).expect("followed").state,
            JobState::Gathering
        );
        replayed.handle_coordination_lost(&id);
        assert_eq!(
            replayed.job(&id).expect("followed").state,
            JobState::Interrupted
        );
    }

    #[test]
    fn the_policy_holds_jobs_to_privacy_model_and_size_limits() {
        use crate::dp::DpConfig;
        use crate::round::Privacy;
        let coordinator = key(1).public();
        let private = |budget: Option<f64>| JobSpec {
            privacy: Some(Privacy {
                dp: DpConfig {
                    clip_norm: 1.0,
                    noise_multiplier: 1.0,
                },
                delta: 1e-5,
                budget_epsilon: budget,
            }),
            ..spec(2)
        };
        let eps = JoinPolicy {
            max_epsilon: Some(8.0),
            ..JoinPolicy::default()
        };
        assert_eq!(eps.refusal(&private(Some(8.0)), &coordinator), None);
        let why = eps
            .refusal(&private(Some(10.0)), &coordinator)
            .expect("refused");
        assert!(
            why.contains("budget 10 is above learn.max_epsilon = 8"),
            "{why}"
        );
        let why = eps.refusal(&private(None), &coordinator).expect("refused");
        assert!(why.contains("promises no ε bound"), "{why}");
        assert!(
            eps.refusal(&spec(2), &coordinator).is_some(),
            "no DP at all"
        );

        let secure = JoinPolicy {
            require_secure_aggregation: true,
            ..JoinPolicy::default()
        };
        let why = secure.refusal(&spec(2), &coordinator).expect("refused");
        assert!(why.contains("would see this node's update"), "{why}");
        let secure_job = JobSpec {
            min_clients: 3,
            secure_aggregation: Some(crate::secagg::SecAggSpec {
                neighbours: 4,
                threshold: None,
                clip_range: 4.0,
                quant_bits: crate::secagg::DEFAULT_QUANT_BITS,
            }),
            ..spec(2)
        };
        assert_eq!(secure.refusal(&secure_job, &coordinator), None);

        let standby = key(9).public();
        let with_standby = JobSpec {
            standby_coordinators: vec![standby.to_hex()],
            ..spec(2)
        };
        let allow_coordinator = JoinPolicy {
            coordinators: vec![coordinator],
            ..JoinPolicy::default()
        };
        let why = allow_coordinator
            .refusal(&with_standby, &coordinator)
            .expect("refused");
        assert!(why.contains("its standby coordinator"), "{why}");
        let allow_both = JoinPolicy {
            coordinators: vec![coordinator, standby],
            ..JoinPolicy::default()
        };
        assert_eq!(allow_both.refusal(&with_standby, &coordinator), None);

        let models = JoinPolicy {
            models: vec!["mlp".into(), "cnn".into()],
            ..JoinPolicy::default()
        };
        let why = models.refusal(&spec(2), &coordinator).expect("refused");
        assert!(
            why.contains("a logistic_regression, not one of learn.models"),
            "{why}"
        );
        let rounds = JoinPolicy {
            max_rounds: Some(1),
            ..JoinPolicy::default()
        };
        let why = rounds.refusal(&spec(2), &coordinator).expect("refused");
        assert!(
            why.contains("2 rounds, more than learn.max_rounds = 1"),
            "{why}"
        );
        assert_eq!(JoinPolicy::default().refusal(&spec(2), &coordinator), None);
    }

    #[test]
    fn the_operators_policy_decides_among_the_jobs_the_data_fits() {
        let (coordinator, other, me) = (key(1), key(4), key(2));
        let (record, payload, id) = job(&coordinator, &spec(2));
        let joins = |policy: JoinPolicy| {
            let mut p = Participant::with_policy(me.public(), digits(), policy);
            p.handle_record(&coordinator.public(), &record, &payload, true);
            let joined = drain(&mut p)
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Submit(Record::Join { .. })));
            (joined, p.job(&id).expect("followed").not_joining.clone())
        };
        assert_eq!(joins(JoinPolicy::default()), (true, None));
        let (joined, why) = joins(JoinPolicy {
            never: true,
            ..JoinPolicy::default()
        });
        assert!(!joined && why.is_some_and(|w| w.contains("learn.join")));
        let (joined, why) = joins(JoinPolicy {
            coordinators: vec![other.public()],
            ..JoinPolicy::default()
        });
        assert!(!joined && why.is_some_and(|w| w.contains("learn.coordinators")));
        assert_eq!(
            joins(JoinPolicy {
                coordinators: vec![other.public(), coordinator.public()],
                ..JoinPolicy::default()
            }),
            (true, None)
        );
        // The job has no DP: a node that requires it stays out.
        let (joined, why) = joins(JoinPolicy {
            require_dp: true,
            ..JoinPolicy::default()
        });
        assert!(!joined && why.is_some_and(|w| w.contains("require_dp")));
    }

    #[test]
    fn joins_count_each_node_once() {
        let (coordinator, me, other) = (key(1), key(2), key(3));
        let (record, payload, id) = job(&coordinator, &spec(2));
        let mut p = Participant::new(me.public(), digits());
        p.handle_record(&coordinator.public(), &record, &payload, true);
        let join = Record::Join {
            job: id,
            samples: 5,
        };
        for signer in [&other, &other, &me] {
            p.handle_record(&signer.public(), &join, &[], true);
        }
        let followed = p.job(&id).expect("followed");
        assert_eq!(followed.joined(), 2);
        assert!(followed.joined_here);
    }

    #[test]
    fn only_the_coordinators_next_round_from_the_last_model_is_trained_once() {
        let (coordinator, me, stranger) = (key(1), key(2), key(3));
        let spec = spec(2);
        let (record, payload, id) = job(&coordinator, &spec);
        let mut p = Participant::new(me.public(), digits());
        p.handle_record(&coordinator.public(), &record, &payload, true);
        drain(&mut p);
        let initial = p.job(&id).expect("followed").initial_model;
        let everyone = vec![me.public()];

        // Not the coordinator, the wrong round, the wrong model: ignored.
        p.handle_record(
            &stranger.public(),
            &start(id, 1, initial, everyone.clone()),
            &[],
            true,
        );
        p.handle_record(
            &coordinator.public(),
            &start(id, 2, initial, everyone.clone()),
            &[],
            true,
        );
        p.handle_record(
            &coordinator.public(),
            &start(id, 1, ModelId([9; 32]), everyone.clone()),
            &[],
            true,
        );
        let outputs = drain(&mut p);
        assert!(
            !outputs
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Train(_)))
        );
        assert_eq!(
            outputs
                .iter()
                .filter(|o| matches!(o, ParticipantOutput::Notice(Notice::OutOfSequence { .. })))
                .count(),
            2,
            "the stranger's start is not even a notice"
        );
        assert_eq!(p.job(&id).expect("followed").state, JobState::Gathering);

        // The right start trains once, even when it commits twice.
        let first = start(id, 1, initial, everyone.clone());
        p.handle_record(&coordinator.public(), &first, &[], true);
        p.handle_record(&coordinator.public(), &first, &[], true);
        let trains: Vec<_> = drain(&mut p)
            .into_iter()
            .filter(|o| matches!(o, ParticipantOutput::Train(_)))
            .collect();
        assert_eq!(trains.len(), 1);
        assert!(matches!(
            &trains[0],
            ParticipantOutput::Train(task) if task.round == 1 && task.model == initial
        ));
        assert_eq!(p.job(&id).expect("followed").state, JobState::Running);

        // Round 2 starts from round 1's model, and only once training for
        // round 1 has finished here.
        let after_one = ModelId([4; 32]);
        p.handle_record(
            &coordinator.public(),
            &end(id, 1, initial, after_one, false),
            &[],
            true,
        );
        p.handle_record(
            &coordinator.public(),
            &start(id, 2, after_one, everyone.clone()),
            &[],
            true,
        );
        assert!(
            !drain(&mut p)
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Train(_))),
            "still training round 1"
        );
        p.handle_training_finished(&id, 0);
        assert_eq!(p.job(&id).expect("followed").current_model(), after_one);
        assert_eq!(p.job(&id).expect("followed").model_after(0), Some(initial));
        assert_eq!(
            p.job(&id).expect("followed").model_after(1),
            Some(after_one)
        );
    }

    /// With `max_cpu_ms`, a node trains until a job's training has used
    /// that much CPU here, then stops and says why.
    #[test]
    fn training_stops_at_the_cpu_cap_and_says_why() {
        let (coordinator, me) = (key(1), key(2));
        let (record, payload, id) = job(&coordinator, &spec(5));
        let policy = JoinPolicy {
            max_cpu_ms: Some(1_000),
            ..JoinPolicy::default()
        };
        let mut p = Participant::with_policy(me.public(), digits(), policy);
        p.handle_record(&coordinator.public(), &record, &payload, true);
        let everyone = vec![me.public()];
        let mut model = p.job(&id).expect("followed").initial_model;
        let trains = |p: &mut Participant| {
            drain(p)
                .iter()
                .filter(|o| matches!(o, ParticipantOutput::Train(_)))
                .count()
        };
        for (round, cpu_ms) in [(1u64, 600u64), (2, 500)] {
            p.handle_record(
                &coordinator.public(),
                &start(id, round, model, everyone.clone()),
                &[],
                true,
            );
            assert_eq!(trains(&mut p), 1, "round {round} trains");
            p.handle_training_finished(&id, cpu_ms);
            let next = ModelId([round as u8 + 10; 32]);
            p.handle_record(
                &coordinator.public(),
                &end(id, round, model, next, false),
                &[],
                true,
            );
            model = next;
        }
        let followed = p.job(&id).expect("followed");
        let why = followed.not_joining.clone().expect("says why");
        assert!(
            why.contains("1.1 s") && why.contains("max_cpu_secs_per_job"),
            "{why}"
        );
        p.handle_record(
            &coordinator.public(),
            &start(id, 3, model, everyone),
            &[],
            true,
        );
        assert_eq!(trains(&mut p), 0, "over the cap");
    }

    #[test]
    fn round_ends_are_counted_once_and_the_last_finishes_the_job() {
        let (coordinator, me) = (key(1), key(2));
        let (record, payload, id) = job(&coordinator, &spec(1));
        let mut p = Participant::new(me.public(), digits());
        p.handle_record(&coordinator.public(), &record, &payload, true);
        let initial = p.job(&id).expect("followed").initial_model;
        p.handle_record(
            &coordinator.public(),
            &start(id, 1, initial, vec![]),
            &[],
            true,
        );
        drain(&mut p);
        let last = end(id, 1, initial, ModelId([4; 32]), true);
        p.handle_record(&coordinator.public(), &last, &[], false);
        p.handle_record(&coordinator.public(), &last, &[], true);
        let outputs = drain(&mut p);
        assert_eq!(
            outputs
                .iter()
                .filter(|o| matches!(o, ParticipantOutput::RoundCommitted { .. }))
                .count(),
            1
        );
        assert!(outputs.contains(&ParticipantOutput::JobFinished(id)));
        assert_eq!(p.job(&id).expect("followed").state, JobState::Finished);
        assert_eq!(p.job(&id).expect("followed").history().count(), 1);
        // Nothing starts after the end.
        p.handle_record(
            &coordinator.public(),
            &start(id, 2, ModelId([4; 32]), vec![me.public()]),
            &[],
            true,
        );
        assert!(
            !drain(&mut p)
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Train(_)))
        );
    }

    #[test]
    fn a_round_end_that_breaks_the_lineage_is_not_followed() {
        let (coordinator, me) = (key(1), key(2));
        let (record, payload, id) = job(&coordinator, &spec(3));
        let mut p = Participant::new(me.public(), digits());
        p.handle_record(&coordinator.public(), &record, &payload, true);
        let initial = p.job(&id).expect("followed").initial_model;
        let c = coordinator.public();
        // Not started yet.
        p.handle_record(&c, &end(id, 1, initial, ModelId([4; 32]), false), &[], true);
        assert_eq!(p.job(&id).expect("followed").history().count(), 0);
        p.handle_record(&c, &start(id, 1, initial, vec![]), &[], true);
        // From another parent, or skipping a round.
        p.handle_record(
            &c,
            &end(id, 1, ModelId([9; 32]), ModelId([4; 32]), false),
            &[],
            true,
        );
        p.handle_record(&c, &end(id, 2, initial, ModelId([4; 32]), false), &[], true);
        assert_eq!(p.job(&id).expect("followed").history().count(), 0);
        p.handle_record(&c, &end(id, 1, initial, ModelId([4; 32]), false), &[], true);
        assert_eq!(
            p.job(&id).expect("followed").current_model(),
            ModelId([4; 32])
        );
    }

    #[test]
    fn the_job_table_is_bounded_and_forgets_finished_jobs_first() {
        let (coordinator, me) = (key(1), key(2));
        let mut p = Participant::new(me.public(), LocalData::Absent("none".into()));
        let mut first = None;
        for n in 0..MAX_JOBS as u64 {
            let mut s = spec(1);
            s.seed = n;
            let (record, payload, id) = job(&coordinator, &s);
            p.handle_record(&coordinator.public(), &record, &payload, false);
            first.get_or_insert(id);
        }
        assert_eq!(p.jobs().count(), MAX_JOBS);
        let mut s = spec(1);
        s.seed = 1_000_000;
        let (record, payload, extra) = job(&coordinator, &s);
        p.handle_record(&coordinator.public(), &record, &payload, true);
        assert!(p.job(&extra).is_none(), "no room: every job is unfinished");
        assert!(
            drain(&mut p)
                .iter()
                .any(|o| matches!(o, ParticipantOutput::Notice(Notice::TooManyJobs { .. })))
        );

        // Finish one: the next job takes its place.
        let finished = first.expect("a job");
        let initial = p.job(&finished).expect("followed").initial_model;
        p.handle_record(
            &coordinator.public(),
            &start(finished, 1, initial, vec![]),
            &[],
            true,
        );
        p.handle_record(
            &coordinator.public(),
            &end(finished, 1, initial, initial, true),
            &[],
            true,
        );
        p.handle_record(&coordinator.public(), &record, &payload, true);
        assert!(p.job(&extra).is_some());
        assert!(p.job(&finished).is_none());
        assert_eq!(p.jobs().count(), MAX_JOBS);
    }
}
