//! Twins: generated scenarios in which faulty validators are run twice
//! under one identity (Bano et al., "Twins: BFT Systems Made Robust",
//! OPODIS 2022).
//!
//! A twinned validator is two nodes with the same key: whatever one says,
//! the other may contradict, to a different part of the network, with
//! valid signatures. That covers equivocation, double voting and amnesia
//! without writing any of them by hand. A scenario fixes
//! - which identities are twinned (every subset of `twinned` validators;
//!   until a failure is on the ledger the primary of each view follows
//!   from the view, so this is what chooses whether the leaders of the
//!   first views are twinned; later ones follow the leader schedule of
//!   [`openagi_consensus::rotation`]), and
//! - for each of `phases` phases of `phase_ms`, a partition of all nodes,
//!   twins included, into at most `max_groups` groups (every such set
//!   partition is enumerated; a twin may sit apart from its original),
//!
//! and, with `faults`, a seeded schedule of a crash (restarted from what
//! it persisted, or from nothing with [`crate::Action::RecoverEmpty`]), a
//! pause (a stopped process whose messages wait), loss, duplication,
//! reordering and clock skew. The generator samples scenarios from that
//! space by seed, so a seed names one scenario exactly.
//!
//! After the phases the network heals. The simulator checks safety after
//! every step (no two correct replicas commit different blocks at one
//! height, so correct logs are prefixes of each other; no transaction
//! takes effect twice or forged), and after the heal that every correct
//! replica commits again, with every client transaction, within
//! [`liveness_bound_ms`]: f + 2 of the longest view-change timeout.
//!
//! With `twinned` = f the protocol must never break safety. With f + 1
//! (the negative control) two quorums can exist at once, and the sampled
//! scenarios must include forks: that shows the checker can see one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Action, NetConfig, Sim, SimConfig, Violation, sim_replica_config};

/// View-change timeouts commits may take to resume after the heal,
/// besides one per faulty validator: the timeout may have doubled up to
/// its cap during the partitions, and the views after the heal can have
/// a twinned primary (equivocating) or one recovering lost state (which
/// casts no vote), each costing a view change before a correct primary
/// leads. Two timeouts alone were too few: the n = 7 sweep found seed
/// 42387, whose views 2 to 4 after the heal had two twinned primaries and
/// a recovering one, and which commits again at view 5.
pub const SETTLE_TIMEOUTS: u64 = 2;

/// What a Twins sweep generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwinsOptions {
    /// Validators.
    pub n: usize,
    /// Identities run twice: f for the safety claim, f + 1 for the
    /// negative control.
    pub twinned: usize,
    /// Partition phases before the heal.
    pub phases: usize,
    /// Length of each phase in simulated milliseconds.
    pub phase_ms: u64,
    /// Most groups in one phase's partition.
    pub max_groups: usize,
    /// Also a crash, a pause, loss, duplication, reordering and skew.
    pub faults: bool,
}

impl TwinsOptions {
    /// The safety claim for `n` validators: f twinned identities, four
    /// phases a little longer than a view-change timeout, up to three
    /// groups, with the other faults.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            twinned: (n.saturating_sub(1)) / 3,
            phases: 4,
            phase_ms: 1_000,
            max_groups: 3,
            faults: true,
        }
    }

    /// The negative control: f + 1 twinned identities and nothing else.
    pub fn negative_control(n: usize) -> Self {
        Self {
            twinned: (n.saturating_sub(1)) / 3 + 1,
            faults: false,
            ..Self::new(n)
        }
    }

    /// Nodes in the simulation: the validators and the twins.
    pub fn nodes(&self) -> usize {
        self.n + self.twinned
    }
}

/// A node stopped for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    /// The node (a validator's original, never a twin).
    pub node: usize,
    /// When it stops.
    pub from_ms: u64,
    /// When it runs again.
    pub until_ms: u64,
    /// For a crash: it comes back with nothing and knows it
    /// ([`Action::RecoverEmpty`]) rather than from what it persisted.
    pub lose_state: bool,
}

/// One generated scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// The seed it was drawn with (it also seeds the simulation).
    pub seed: u64,
    /// What it was drawn from.
    pub options: TwinsOptions,
    /// Validator indices run twice; the twin of `twinned[k]` is node
    /// `n + k`.
    pub twinned: Vec<usize>,
    /// Group of each node id, per phase.
    pub phases: Vec<Vec<u8>>,
    /// Link behaviour throughout.
    pub net: NetConfig,
    /// Most a node's clock runs ahead.
    pub clock_skew_ms: u64,
    /// A crash and restart.
    pub crash: Option<Outage>,
    /// A pause and resume.
    pub pause: Option<Outage>,
}

/// Every partition of `nodes` nodes into at most `max_groups` non-empty
/// groups, each listed once, as the group of each node with groups
/// numbered in order of first appearance (restricted growth strings).
pub fn partitions(nodes: usize, max_groups: usize) -> Vec<Vec<u8>> {
    fn extend(prefix: &mut Vec<u8>, nodes: usize, max_groups: usize, out: &mut Vec<Vec<u8>>) {
        if prefix.len() == nodes {
            out.push(prefix.clone());
            return;
        }
        let used = prefix.iter().max().map_or(0, |m| usize::from(*m) + 1);
        for group in 0..=used.min(max_groups.saturating_sub(1)) {
            prefix.push(group as u8);
            extend(prefix, nodes, max_groups, out);
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    if nodes > 0 && max_groups > 0 {
        extend(&mut Vec::with_capacity(nodes), nodes, max_groups, &mut out);
    }
    out
}

/// Every `k`-subset of `0..n`, in lexicographic order.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn extend(
        start: usize,
        n: usize,
        k: usize,
        prefix: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        if prefix.len() == k {
            out.push(prefix.clone());
            return;
        }
        for i in start..n {
            prefix.push(i);
            extend(i + 1, n, k, prefix, out);
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    extend(0, n, k, &mut Vec::new(), &mut out);
    out
}

/// Draws scenarios from the space [`TwinsOptions`] describes.
#[derive(Clone, Debug)]
pub struct Generator {
    options: TwinsOptions,
    partitions: Vec<Vec<u8>>,
    twin_sets: Vec<Vec<usize>>,
}

impl Generator {
    /// Enumerates the partitions and twin sets of `options`.
    pub fn new(options: TwinsOptions) -> Self {
        Self {
            options,
            partitions: partitions(options.nodes(), options.max_groups),
            twin_sets: subsets(options.n, options.twinned),
        }
    }

    /// Partitions each phase chooses from.
    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// Scenarios before the other faults: twin sets × partitions per
    /// phase, over all phases.
    pub fn space(&self) -> f64 {
        self.twin_sets.len() as f64
            * (self.partitions.len() as f64).powi(self.options.phases as i32)
    }

    /// The scenario `seed` names.
    pub fn scenario(&self, seed: u64) -> Scenario {
        let o = self.options;
        let mut pick = ChaCha8Rng::seed_from_u64(seed ^ 0x7717_5eed);
        let twinned = match self.twin_sets.len() {
            0 => Vec::new(),
            len => self.twin_sets[pick.random_range(0..len)].clone(),
        };
        let phases = (0..o.phases)
            .map(|_| match self.partitions.len() {
                0 => vec![0; o.nodes()],
                len => self.partitions[pick.random_range(0..len)].clone(),
            })
            .collect();
        let mut scenario = Scenario {
            seed,
            options: o,
            twinned,
            phases,
            net: NetConfig::clean(),
            clock_skew_ms: 0,
            crash: None,
            pause: None,
        };
        if !o.faults {
            return scenario;
        }
        let end = o.phase_ms * o.phases as u64;
        if pick.random_bool(0.5) {
            scenario.net =
                NetConfig::lossy(pick.random_range(0.0..0.1), pick.random_range(0.0..0.1));
        }
        if pick.random_bool(0.5) {
            scenario.clock_skew_ms = pick.random_range(0..2_000);
        }
        // Outages hit validators that are not twinned: a crash or pause of
        // a correct replica must not cost safety, and it is back before
        // the heal, so not liveness either.
        let honest: Vec<usize> = (0..o.n).filter(|i| !scenario.twinned.contains(i)).collect();
        let outage = |pick: &mut ChaCha8Rng, lose_state: bool| {
            let node = honest[pick.random_range(0..honest.len())];
            let from_ms = pick.random_range(0..end.max(1));
            let until_ms = pick.random_range(from_ms..=end);
            Outage {
                node,
                from_ms,
                until_ms,
                lose_state,
            }
        };
        if !honest.is_empty() && pick.random_bool(0.3) {
            let lose_state = pick.random_bool(0.3);
            scenario.crash = Some(outage(&mut pick, lose_state));
        }
        if !honest.is_empty() && pick.random_bool(0.3) {
            scenario.pause = Some(outage(&mut pick, false));
        }
        scenario
    }
}

impl Scenario {
    /// The simulation, with its schedule, before it runs.
    pub fn sim(&self) -> Sim {
        let o = self.options;
        let mut cfg = SimConfig::new(self.seed, o.n);
        cfg.client_interval_ms = 200;
        cfg.twins = self.twinned.iter().map(|i| (*i, Vec::new())).collect();
        cfg.net = self.net;
        cfg.clock_skew_ms = self.clock_skew_ms;
        let mut sim = Sim::new(cfg);
        for (i, groups) in self.phases.iter().enumerate() {
            sim.schedule(
                i as u64 * o.phase_ms,
                Action::PartitionNodes(groups.clone()),
            );
        }
        if let Some(c) = self.crash {
            sim.schedule(c.from_ms, Action::Crash(c.node));
            let back = if c.lose_state {
                Action::RecoverEmpty(c.node)
            } else {
                Action::Restart(c.node)
            };
            sim.schedule(c.until_ms, back);
        }
        if let Some(p) = self.pause {
            sim.schedule(p.from_ms, Action::Pause(p.node));
            sim.schedule(p.until_ms, Action::Resume(p.node));
        }
        sim
    }

    /// Runs the phases, heals the network and waits for commits to resume;
    /// the first violation, if any.
    pub fn run(&self) -> Result<(), Violation> {
        let mut sim = self.sim();
        sim.run_until(self.options.phase_ms * self.phases.len() as u64)?;
        sim.heal_and_settle(liveness_bound_ms(self.options.n))
    }

    /// A simpler scenario that still fails as this one does (the same
    /// kind of violation): the other faults removed one at a time, then
    /// each phase made whole (one group), then the last phases dropped,
    /// keeping every change after which it still fails. `self` when it
    /// does not fail.
    pub fn minimise(&self) -> Scenario {
        let Err(original) = self.run() else {
            return self.clone();
        };
        let fails = |s: &Scenario| s.run().is_err_and(|v| v.kind == original.kind);
        let mut best = self.clone();
        let simplifications: [fn(&mut Scenario); 4] = [
            |s| s.crash = None,
            |s| s.pause = None,
            |s| s.net = NetConfig::clean(),
            |s| s.clock_skew_ms = 0,
        ];
        for simplify in simplifications {
            let mut candidate = best.clone();
            simplify(&mut candidate);
            if candidate != best && fails(&candidate) {
                best = candidate;
            }
        }
        for i in 0..best.phases.len() {
            let mut candidate = best.clone();
            if let Some(phase) = candidate.phases.get_mut(i) {
                phase.iter_mut().for_each(|g| *g = 0);
            }
            if candidate != best && fails(&candidate) {
                best = candidate;
            }
        }
        while best.phases.len() > 1 {
            let mut candidate = best.clone();
            candidate.phases.pop();
            if !fails(&candidate) {
                break;
            }
            best = candidate;
        }
        best
    }

    /// The scenario in a line: twins, each phase's groups (node ids; the
    /// twin of validator v is `v'`), the other faults.
    pub fn describe(&self) -> String {
        let n = self.options.n;
        let name = |node: usize| match node.checked_sub(n) {
            Some(k) => format!("{}'", self.twinned.get(k).copied().unwrap_or(node)),
            None => node.to_string(),
        };
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|groups| {
                let count = groups.iter().max().map_or(0, |m| usize::from(*m) + 1);
                (0..count)
                    .map(|g| {
                        let members: Vec<String> = (0..groups.len())
                            .filter(|i| usize::from(groups[*i]) == g)
                            .map(name)
                            .collect();
                        format!("{{{}}}", members.join(","))
                    })
                    .collect::<String>()
            })
            .collect();
        format!(
            "seed {} n {} twinned {:?} phases of {} ms [{}] net {:?} skew {} ms crash {:?} pause {:?}",
            self.seed,
            n,
            self.twinned,
            self.options.phase_ms,
            phases.join(" "),
            self.net,
            self.clock_skew_ms,
            self.crash,
            self.pause
        )
    }
}

/// How long commits may take to resume after the heal among `n`
/// validators: f + [`SETTLE_TIMEOUTS`] times the simulated replicas'
/// longest view-change timeout.
pub fn liveness_bound_ms(n: usize) -> u64 {
    let f = (n.saturating_sub(1) / 3) as u64;
    (f + SETTLE_TIMEOUTS) * sim_replica_config().max_view_change_timeout_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_the_set_partitions_into_at_most_k_groups() {
        // Stirling numbers of the second kind: S(5,1) + S(5,2) + S(5,3).
        assert_eq!(partitions(5, 3).len(), 1 + 15 + 25);
        assert_eq!(partitions(9, 3).len(), 1 + 255 + 3025);
        assert_eq!(partitions(4, 4).len(), 15, "Bell number B4");
        let all = partitions(5, 3);
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
        assert!(all.iter().all(|p| p[0] == 0 && p.iter().all(|g| *g < 3)));
        assert!(partitions(0, 3).is_empty());
    }

    #[test]
    fn a_seed_names_one_scenario() {
        let generator = Generator::new(TwinsOptions::new(4));
        assert_eq!(generator.scenario(7), generator.scenario(7));
        assert_ne!(generator.scenario(7), generator.scenario(8));
        let s = generator.scenario(7);
        assert_eq!(s.twinned.len(), 1);
        assert_eq!(s.phases.len(), 4);
        assert!(s.phases.iter().all(|p| p.len() == 5));
        assert_eq!(subsets(7, 2).len(), 21);
        assert_eq!(generator.space(), 4.0 * 41f64.powi(4));
    }

    #[test]
    fn outages_spare_the_twinned_and_end_before_the_heal() {
        let generator = Generator::new(TwinsOptions::new(7));
        let end = 4 * 1_000;
        for seed in 0..200 {
            let s = generator.scenario(seed);
            for outage in [s.crash, s.pause].into_iter().flatten() {
                assert!(!s.twinned.contains(&outage.node), "{}", s.describe());
                assert!(outage.from_ms <= outage.until_ms && outage.until_ms <= end);
            }
        }
    }

    #[test]
    fn describe_names_twins_with_a_prime() {
        let mut s = Generator::new(TwinsOptions::negative_control(4)).scenario(1);
        s.twinned = vec![0, 2];
        s.phases = vec![vec![0, 0, 1, 1, 0, 1]];
        assert!(
            s.describe().contains("[{0,1,0'}{2,3,2'}]"),
            "{}",
            s.describe()
        );
    }
}
