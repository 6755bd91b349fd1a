//! The network's models as its ledger describes them, and which of them a
//! node keeps.
//!
//! Every model a job produces is content-addressed ([`ModelId`]) and
//! described by records on the ledger: the job's spec (architecture, data
//! schema, privacy terms, coordinator) and each round's end (parent,
//! samples, accuracy, ε spent). A [`ModelCard`] is that description put
//! together for one model, so every node that follows the ledger describes
//! the same model the same way, whether or not it holds its parameters.
//!
//! Nodes keep the models they trained from or aggregated, serve them to
//! whoever asks and announce them in the DHT. [`prunable`] is the policy
//! that bounds what a node keeps: it never deletes a job's final model.

use std::collections::HashSet;

use serde::Serialize;

use crate::federation::JobId;
use crate::model::ModelId;
use crate::models::Architecture;
use crate::participant::{FollowedJob, JobState};

/// What the ledger says about one model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelCard {
    /// The model's content address.
    pub model: ModelId,
    /// The job that produced it.
    pub job: JobId,
    /// The job's name (for people; not an identifier).
    pub job_name: String,
    /// The round that produced it (0: the job's initial model).
    pub round: u64,
    /// The model the round started from (`None` for the initial model).
    pub parent: Option<ModelId>,
    /// The architecture; its input width and class count are the data
    /// schema the model was trained on.
    pub architecture: Architecture,
    /// Test accuracy on the coordinator's evaluation set, when evaluated.
    pub accuracy: Option<f64>,
    /// ε the job had spent when this model was released, with DP.
    pub epsilon: Option<f64>,
    /// δ that ε is stated for, with DP.
    pub delta: Option<f64>,
    /// How the job protected updates (see
    /// [`crate::federation::JobSpec::privacy_mode`]).
    pub privacy_mode: &'static str,
    /// Samples behind the round's aggregated updates (0 for the initial
    /// model).
    pub samples: u64,
    /// Participants whose updates the round aggregated.
    pub participants: u32,
    /// Whether this is the model the job finished with.
    pub final_model: bool,
}

/// Cards for every model `job` has produced, oldest first: its initial
/// model, then each round that changed the model (a round that
/// aggregated nothing produces no model). Only rounds still in the job's
/// followed history ([`crate::participant::HISTORY`]) have cards.
pub fn cards(job: &FollowedJob) -> Vec<ModelCard> {
    let spec = &job.spec;
    let finished = job.state == JobState::Finished;
    let current = job.current_model();
    let card = |model, round, parent| ModelCard {
        model,
        job: job.id,
        job_name: spec.name.clone(),
        round,
        parent,
        architecture: spec.architecture.clone(),
        accuracy: None,
        epsilon: None,
        delta: spec.privacy.map(|p| p.delta),
        privacy_mode: spec.privacy_mode(),
        samples: 0,
        participants: 0,
        final_model: finished && model == current,
    };
    let mut cards = vec![card(job.initial_model, 0, None)];
    for round in job.history().filter(|r| r.aggregated) {
        cards.push(ModelCard {
            accuracy: round.accuracy,
            epsilon: round.epsilon,
            samples: round.samples,
            participants: round.responded,
            ..card(round.model, round.round, Some(round.parent))
        });
    }
    // A finished job whose rounds never aggregated ends at its initial
    // model: that card is the final one, and only one card says so.
    let mut seen_final = false;
    for c in cards.iter_mut().rev() {
        if c.final_model {
            c.final_model = !seen_final;
            seen_final = true;
        }
    }
    cards
}

/// How many models a node keeps per job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Models of a job's latest rounds kept besides the model the job
    /// stands at (its final model once finished). 0 keeps only that one.
    pub recent_rounds: usize,
}

impl Default for RetentionPolicy {
    /// Two earlier rounds: enough to serve a participant or standby that
    /// is a round behind, and to compare the last rounds.
    fn default() -> Self {
        Self { recent_rounds: 2 }
    }
}

/// The models among `held` that `policy` lets a node delete.
///
/// Per job, a node keeps the model the job stands at (for a finished job,
/// its final model, kept for good; for a running or interrupted one, the
/// model its next round or its resumption starts from) and, while the job
/// has not finished, the models of its `recent_rounds` latest rounds
/// before that. Any other model a job on the ledger names may go. A model no followed job names is kept: it
/// may be a round's model whose end has not committed yet, or belong to a
/// job this node has not seen.
pub fn prunable(
    held: impl IntoIterator<Item = ModelId>,
    jobs: &[&FollowedJob],
    policy: RetentionPolicy,
) -> Vec<ModelId> {
    let mut named = HashSet::new();
    let mut kept = HashSet::new();
    for job in jobs {
        let models: Vec<ModelId> = cards(job).iter().map(|c| c.model).collect();
        let current = job.current_model();
        kept.insert(current);
        // The latest rounds that produced a model other than the current,
        // while the job runs: a finished job needs only its final model.
        let recent = if job.state == JobState::Finished {
            0
        } else {
            policy.recent_rounds
        };
        kept.extend(models.iter().rev().filter(|m| **m != current).take(recent));
        named.extend(models);
    }
    held.into_iter()
        .filter(|m| named.contains(m) && !kept.contains(m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::{self, JobSpec, Record, RoundSummary, encode_record};
    use crate::participant::{LocalData, Participant};
    use openagi_crypto::{Identity, Signed};

    fn model(n: u8) -> ModelId {
        ModelId([n; 32])
    }

    /// A node following one job whose rounds 1..=`rounds` ended,
    /// `aggregated` saying which changed the model (round r's model is
    /// `model(r)`); the last one finished the job when `finished`.
    fn followed(rounds: u64, aggregated: impl Fn(u64) -> bool, finished: bool) -> Participant {
        let coordinator = Identity::from_seed(&[1; 32]);
        let spec = JobSpec {
            rounds: rounds.max(1),
            ..federation::tests::spec()
        };
        let record = Record::job(&spec).expect("job record");
        let payload =
            encode_record(&Signed::sign(&coordinator, &record).expect("signed")).expect("encoded");
        let job = federation::job_id(&payload);
        let signer = coordinator.public();
        let mut participant = Participant::new(
            Identity::from_seed(&[2; 32]).public(),
            LocalData::Absent("no data".into()),
        );
        participant.handle_record(&signer, &record, &payload, false);
        let mut parent = participant.job(&job).expect("followed").initial_model;
        for round in 1..=rounds {
            let start = Record::RoundStart {
                job,
                round,
                model: parent,
                participants: vec![],
            };
            participant.handle_record(&signer, &start, &[], false);
            let changed = aggregated(round);
            let model = if changed { model(round as u8) } else { parent };
            let end = Record::RoundEnd(RoundSummary {
                job,
                round,
                model,
                parent,
                aggregated: changed,
                selected: 1,
                responded: u32::from(changed),
                rejected: 0,
                samples: if changed { 10 } else { 0 },
                epsilon: None,
                accuracy: changed.then_some(0.5 + round as f64 / 100.0),
                finished: finished && round == rounds,
            });
            participant.handle_record(&signer, &end, &[], false);
            parent = model;
        }
        participant
    }

    fn only_job(p: &Participant) -> &FollowedJob {
        p.jobs().next().expect("one job")
    }

    #[test]
    fn cards_follow_the_lineage_and_name_one_final_model() {
        let p = followed(4, |r| r != 3, true);
        let job = only_job(&p);
        let cards = cards(job);
        let rounds: Vec<u64> = cards.iter().map(|c| c.round).collect();
        assert_eq!(rounds, vec![0, 1, 2, 4], "round 3 changed nothing");
        assert_eq!(cards[0].parent, None);
        assert_eq!(cards[1].parent, Some(job.initial_model));
        assert_eq!(cards[3].parent, Some(model(2)), "round 4 started from 2");
        assert_eq!(cards[3].accuracy, Some(0.54));
        assert_eq!(cards[3].samples, 10);
        assert_eq!(cards[0].privacy_mode, job.spec.privacy_mode());
        let finals: Vec<u64> = cards
            .iter()
            .filter(|c| c.final_model)
            .map(|c| c.round)
            .collect();
        assert_eq!(finals, vec![4]);
    }

    #[test]
    fn a_job_that_never_aggregated_finishes_at_its_initial_model() {
        let p = followed(2, |_| false, true);
        let cards = cards(only_job(&p));
        assert_eq!(cards.len(), 1);
        assert!(cards[0].final_model);
        let running = followed(2, |_| true, false);
        assert!(
            super::cards(only_job(&running))
                .iter()
                .all(|c| !c.final_model)
        );
    }

    #[test]
    fn pruning_keeps_the_final_model_the_recent_rounds_and_unknown_models() {
        let p = followed(5, |_| true, true);
        let job = only_job(&p);
        let stranger = model(99);
        let held: Vec<ModelId> = [job.initial_model, stranger]
            .into_iter()
            .chain((1..=5).map(model))
            .collect();
        let gone = |recent_rounds| {
            let mut g = prunable(held.clone(), &[job], RetentionPolicy { recent_rounds });
            g.sort();
            g
        };
        // Finished: only the final model (and the stranger) stays,
        // whatever the number of recent rounds.
        for recent_rounds in [0, 2, 100] {
            let g = gone(recent_rounds);
            assert_eq!(g.len(), 5, "{recent_rounds}");
            assert!(!g.contains(&model(5)) && !g.contains(&stranger));
        }
        // Running: the recent rounds stay too.
        let p = followed(5, |_| true, false);
        let job = only_job(&p);
        let mut g = prunable(held.clone(), &[job], RetentionPolicy { recent_rounds: 2 });
        g.sort();
        let mut expected = vec![job.initial_model, model(1), model(2)];
        expected.sort();
        assert_eq!(g, expected, "current 5, recent 4 and 3 stay");
        let all = RetentionPolicy { recent_rounds: 100 };
        assert!(prunable(held.clone(), &[job], all).is_empty());
    }

    #[test]
    fn a_model_two_jobs_share_stays_while_one_keeps_it() {
        // Two followers of the same spec see the same initial model; a
        // job that has not started keeps it as its current model.
        let started = followed(3, |_| true, false);
        let fresh = followed(0, |_| true, false);
        let a = only_job(&started);
        let b = only_job(&fresh);
        assert_eq!(a.initial_model, b.initial_model);
        let gone = prunable(
            [a.initial_model, model(1)],
            &[a, b],
            RetentionPolicy { recent_rounds: 0 },
        );
        assert_eq!(gone, vec![model(1)]);
    }
}
