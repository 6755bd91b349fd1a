//! Leader rotation that skips validators which recently failed as primary.
//!
//! Plain PBFT rotates the primary as `view mod n`, so a crashed validator
//! costs one view-change timeout every `n` views for as long as it stays
//! down, and the timeout doubles on consecutive failures. Here the
//! rotation is over the validators that are not *excluded*, and the
//! excluded ones are those that recently caused a view change, as the
//! committed ledger shows it. Only committed data goes in (block heights,
//! proposal views and timestamps), so every replica that has executed the
//! same blocks computes the same order.
//!
//! How it is computed ([`Reputation`], fed every executed block in order):
//! - Blocks carry the view their batch was first proposed in. A view that
//!   no block carries, below one that a block does carry, ended in a view
//!   change without its primary getting one batch committed: it is
//!   charged to that primary (under the schedule in force at the previous
//!   checkpoint). A primary that led a view with committed blocks is not
//!   charged when that view later changes: it has shown it was up, and a
//!   primary that then stays down is charged on its next turn.
//! - At each checkpoint height (a multiple of the checkpoint interval K)
//!   a [`Schedule`] is taken: up to `f` validators with a failure whose
//!   block is at most [`REPUTATION_WINDOW_MS`] older than the checkpoint's
//!   block, the most failures first. At most `f` are skipped, so at least
//!   `2f + 1` validators stay in the rotation and one of them is correct.
//!
//! Which schedule a replica uses ([`crate::Replica`]): while changing to
//! a view, the one at its own stable checkpoint (refreshed as that
//! checkpoint moves), fixed once the view is installed, and persisted.
//! Replicas changing view have stopped committing and exchange
//! checkpoints, so they mostly agree. A replica that lags converges as it
//! catches up, and also accepts a new view whose sender leads by the
//! schedule at the checkpoint that new view carries when its own schedule
//! is older. Until then it fetches blocks and sits the view out. A replica
//! that cannot tell the primary of a long-lived view (the schedule it was
//! chosen by is no longer kept) sits it out until the next view change,
//! which its absence brings about if its vote is needed. Disagreeing
//! about a primary costs at most liveness, never safety: a prepared certificate needs `2f + 1`
//! distinct signers in one view whoever the primary was, and an honest
//! replica signs one digest per view and sequence number.
//!
//! Failures are charged under the schedule at the last checkpoint before
//! the block that shows them, which is what the replicas used unless the
//! schedule changed just then; the charge is a heuristic for who to skip,
//! and a wrong one only skips a correct validator for a while.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::types::Block;

/// A failure counts against a validator for this long in block time: ten
/// minutes, long enough that a crashed validator is skipped until its
/// operator has restarted it, short enough that a validator that stalled
/// once is back in the rotation soon after.
pub const REPUTATION_WINDOW_MS: u64 = 10 * 60 * 1_000;

/// Most failures remembered; older ones are forgotten first. Bounds memory
/// when the chain records a long run of view changes.
pub const MAX_REMEMBERED_FAILURES: usize = 1_024;

/// Schedules kept for lookups by height: 32 checkpoints, which covers
/// the default window (4 checkpoints) many times over.
pub const SCHEDULES_KEPT: usize = 32;

/// Most failed views charged for one block: a jump of thousands of views
/// (a long partition) charges each primary of the last few rotations, not
/// every view one by one.
const MAX_CHARGED_VIEWS_PER_BLOCK: u64 = 64;

/// Which validators lead views, as of one checkpoint. Built only by
/// [`Reputation`], which keeps fewer than `n` validators excluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The checkpoint height this schedule was taken at (0 for genesis).
    pub height: u64,
    /// Number of validators.
    n: usize,
    /// Skipped validators, in ascending index order.
    excluded: Vec<usize>,
}

/// The primary of one view and how it was chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryChoice {
    /// Index of the primary.
    pub index: usize,
    /// The index plain rotation (`view mod n`) would have chosen.
    pub rotation: usize,
    /// Validators skipped by this schedule (recent failures as primary).
    pub skipped: Vec<usize>,
}

impl PrimaryChoice {
    /// `"rotation"` when plain rotation's choice leads, `"skipped"` when
    /// skipping validators moved the choice to another one.
    pub fn reason(&self) -> &'static str {
        if self.index == self.rotation {
            "rotation"
        } else {
            "skipped"
        }
    }
}

impl Schedule {
    /// The schedule before any block: plain rotation.
    pub fn genesis(n: usize) -> Self {
        Schedule {
            height: 0,
            n: n.max(1),
            excluded: Vec::new(),
        }
    }

    /// Validators skipped, ascending.
    pub fn excluded(&self) -> &[usize] {
        &self.excluded
    }

    /// The primary of `view`: rotation over the validators not skipped, in
    /// index order.
    pub fn primary(&self, view: u64) -> usize {
        let candidates = self.n - self.excluded.len();
        let mut position = (view % candidates as u64) as usize;
        // Walk the indices, jumping over excluded ones; `excluded` is small
        // (at most f) and sorted.
        for &skipped in &self.excluded {
            if skipped <= position {
                position += 1;
            } else {
                break;
            }
        }
        position
    }

    /// The primary of `view` with the reason, for status displays.
    pub fn choice(&self, view: u64) -> PrimaryChoice {
        PrimaryChoice {
            index: self.primary(view),
            rotation: (view % self.n as u64) as usize,
            skipped: self.excluded.clone(),
        }
    }
}

/// One view that ended in a view change, charged to its primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Failure {
    /// Timestamp of the block that showed the failure.
    at_ms: u64,
    /// The primary of the failed view.
    validator: usize,
}

/// Folds executed blocks into failure records and schedules; see the
/// module documentation.
#[derive(Clone, Debug)]
pub struct Reputation {
    checkpoint_interval: u64,
    max_excluded: usize,
    /// Members that joined at the start of this epoch: they lead no view
    /// in it (ascending).
    ineligible: Vec<usize>,
    /// The lowest view not yet known to have produced a block or failed.
    next_view: u64,
    /// Height of the last block folded in.
    height: u64,
    failures: VecDeque<Failure>,
    /// The schedule taken at the last checkpoint height.
    current: Schedule,
    /// The most recent schedules, oldest first (the last is `current`):
    /// a new view names a stable checkpoint that this replica may already
    /// have executed past.
    history: VecDeque<Schedule>,
}

impl Reputation {
    /// A tracker for `n` validators (at most `f` skipped) that takes a
    /// schedule every `checkpoint_interval` blocks.
    pub fn new(n: usize, checkpoint_interval: u64) -> Self {
        Reputation {
            checkpoint_interval: checkpoint_interval.max(1),
            max_excluded: n.saturating_sub(1) / 3,
            ineligible: Vec::new(),
            next_view: 0,
            height: 0,
            failures: VecDeque::new(),
            current: Schedule::genesis(n),
            history: VecDeque::from([Schedule::genesis(n)]),
        }
    }

    /// Starts the rotation of a new validator set after the block at
    /// `height` (an epoch boundary): `n` members, of which `newcomers`
    /// (indices) lead no view in this epoch. The old set's failures are
    /// forgotten (its indices mean nothing now); the schedule taken at
    /// `height` becomes the new set's.
    pub fn enter_epoch(&mut self, height: u64, n: usize, newcomers: &[usize]) {
        let n = n.max(1);
        let mut ineligible: Vec<usize> = newcomers.iter().copied().filter(|i| *i < n).collect();
        ineligible.sort_unstable();
        ineligible.dedup();
        if ineligible.len() >= n {
            // Someone must lead.
            ineligible.clear();
        }
        self.max_excluded = n.saturating_sub(1) / 3;
        self.failures.clear();
        self.current = Schedule {
            height,
            n,
            excluded: ineligible.clone(),
        };
        self.ineligible = ineligible;
        if self.history.back().is_some_and(|s| s.height == height) {
            self.history.pop_back();
        }
        self.history.push_back(self.current.clone());
        while self.history.len() > SCHEDULES_KEPT {
            self.history.pop_front();
        }
    }

    /// The newest schedule taken at or below `height` that is still kept
    /// (the oldest kept when all are newer: a basis more than
    /// [`SCHEDULES_KEPT`] checkpoints behind the executed blocks, which a
    /// replica's own stable checkpoint never is for long).
    pub fn at(&self, height: u64) -> &Schedule {
        self.history
            .iter()
            .rev()
            .find(|s| s.height <= height)
            .or(self.history.front())
            .unwrap_or(&self.current)
    }

    /// The schedule taken at the last checkpoint folded in.
    pub fn current(&self) -> &Schedule {
        &self.current
    }

    /// Height of the last block folded in.
    pub fn height(&self) -> u64 {
        self.height
    }

    /// Folds in the next executed block; returns the new schedule when the
    /// block is at a checkpoint height. Blocks must come in height order
    /// (a block that does not extend the last one is ignored).
    pub fn record(&mut self, block: &Block) -> Option<&Schedule> {
        if block.height != self.height.saturating_add(1) {
            return None;
        }
        self.height = block.height;
        if block.view >= self.next_view {
            let first = self
                .next_view
                .max(block.view.saturating_sub(MAX_CHARGED_VIEWS_PER_BLOCK));
            for failed in first..block.view {
                self.failures.push_back(Failure {
                    at_ms: block.timestamp,
                    validator: self.current.primary(failed),
                });
            }
            while self.failures.len() > MAX_REMEMBERED_FAILURES {
                self.failures.pop_front();
            }
            self.next_view = block.view.saturating_add(1);
        }
        if !block.height.is_multiple_of(self.checkpoint_interval) {
            return None;
        }
        let horizon = block.timestamp.saturating_sub(REPUTATION_WINDOW_MS);
        while self.failures.front().is_some_and(|f| f.at_ms < horizon) {
            self.failures.pop_front();
        }
        // (failures, latest failure's position) per validator.
        let mut tally: Vec<(usize, usize)> = vec![(0, 0); self.current.n];
        for (position, failure) in self.failures.iter().enumerate() {
            if let Some(entry) = tally.get_mut(failure.validator) {
                entry.0 += 1;
                entry.1 = position;
            }
        }
        let mut ranked: Vec<usize> = (0..self.current.n).filter(|&i| tally[i].0 > 0).collect();
        // Most failures first; among equals the most recent failure first,
        // then the lower index, so the order is total.
        ranked.sort_by(|&a, &b| {
            tally[b]
                .0
                .cmp(&tally[a].0)
                .then(tally[b].1.cmp(&tally[a].1))
                .then(a.cmp(&b))
        });
        ranked.truncate(self.max_excluded.saturating_sub(self.ineligible.len()));
        ranked.extend(self.ineligible.iter().copied());
        ranked.sort_unstable();
        ranked.dedup();
        self.current = Schedule {
            height: block.height,
            n: self.current.n,
            excluded: ranked,
        };
        self.history.push_back(self.current.clone());
        while self.history.len() > SCHEDULES_KEPT {
            self.history.pop_front();
        }
        Some(&self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetworkId;
    use crate::types::genesis_hash;

    fn block(height: u64, view: u64, timestamp: u64) -> Block {
        Block {
            height,
            view,
            prev_hash: genesis_hash(NetworkId::from_name("test")),
            batch_root: [0; 32],
            timestamp,
            txs: Vec::new(),
        }
    }

    #[test]
    fn plain_rotation_until_a_view_fails() {
        let mut reputation = Reputation::new(4, 2);
        for height in 1..=8 {
            reputation.record(&block(height, 0, height * 10));
        }
        let schedule = reputation.current();
        assert_eq!(schedule.height, 8);
        assert!(schedule.excluded().is_empty());
        assert_eq!(
            (0..8).map(|v| schedule.primary(v)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 0, 1, 2, 3]
        );
        assert_eq!(schedule.choice(5).reason(), "rotation");
    }

    #[test]
    fn a_failed_primary_is_skipped_from_the_next_checkpoint_and_returns_later() {
        let mut reputation = Reputation::new(4, 2);
        reputation.record(&block(1, 0, 10));
        reputation.record(&block(2, 0, 20));
        // View 1 (primary 1) failed: block 3 was proposed in view 2. View 0
        // had blocks, so its primary is not charged.
        reputation.record(&block(3, 2, 30));
        assert!(
            reputation.current().excluded().is_empty(),
            "only at a checkpoint"
        );
        let schedule = reputation.record(&block(4, 2, 40)).cloned();
        let schedule = schedule.expect("height 4 is a checkpoint");
        assert_eq!(schedule.excluded(), &[1]);
        assert_eq!(
            (0..6).map(|v| schedule.primary(v)).collect::<Vec<_>>(),
            vec![0, 2, 3, 0, 2, 3]
        );
        assert_eq!(
            reputation.at(3).excluded(),
            &[] as &[usize],
            "the schedule at 2"
        );
        assert_eq!(reputation.at(4), &schedule);
        let choice = schedule.choice(1);
        assert_eq!(
            (choice.index, choice.rotation, choice.reason()),
            (2, 1, "skipped")
        );
        // Ten minutes of block time later, the failure has expired.
        reputation.record(&block(5, 2, 50));
        let later = reputation
            .record(&block(6, 2, 40 + REPUTATION_WINDOW_MS + 1))
            .cloned()
            .expect("checkpoint");
        assert!(later.excluded().is_empty());
    }

    #[test]
    fn at_most_f_are_skipped_and_the_most_failed_first() {
        let mut reputation = Reputation::new(7, 1);
        // Views 0..3 fail once each (primaries 0, 1, 2), then with the
        // schedule skipping two of them, more views fail.
        reputation.record(&block(1, 3, 100));
        let first = reputation.current().clone();
        assert_eq!(first.excluded().len(), 2, "f = 2 of 7");
        // All three failed once: the two most recent failures (2, then 1)
        // are skipped.
        assert_eq!(first.excluded(), &[1, 2]);
        // Views 4 and 5 fail under this schedule (rotation over 0, 3, 4,
        // 5, 6: view 4 is led by 6, view 5 by 0). Validator 0 now has two
        // failures and goes first; of those with one, 6 failed last.
        reputation.record(&block(2, 6, 200));
        assert_eq!(reputation.current().excluded(), &[0, 6]);
    }

    #[test]
    fn a_huge_view_jump_charges_a_bounded_number_of_views() {
        let mut reputation = Reputation::new(4, 1);
        reputation.record(&block(1, u64::MAX / 2, 10));
        assert_eq!(reputation.current().excluded().len(), 1);
        assert!(reputation.failures.len() <= MAX_CHARGED_VIEWS_PER_BLOCK as usize);
    }

    #[test]
    fn blocks_out_of_order_are_ignored() {
        let mut reputation = Reputation::new(4, 1);
        assert!(reputation.record(&block(2, 5, 10)).is_none());
        assert_eq!(reputation.height(), 0);
    }
}
