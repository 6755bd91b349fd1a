//! Alert rules, defined once: the daemon evaluates them on its own metrics
//! ([`AlertEngine`]), and the Prometheus rules file
//! `configs/openagi-alerts.yml` is generated from the same definitions
//! ([`prometheus_rules_yaml`]; a test keeps the file equal to it).
//!
//! A rule fires when its condition has held for its `for` time and
//! resolves only after the condition has been false for [`CLEAR_SECS`],
//! so a value hovering at a threshold does not flap. The engine reads no
//! clock and keeps bounded state: per rule a window of raw samples no
//! longer than its window, and the last [`EVENT_LOG`] events.

use std::collections::VecDeque;
use std::fmt::Write as _;

use serde::Serialize;

use crate::sample::Snapshot;

/// Seconds a firing alert's condition must stay false before it resolves.
pub const CLEAR_SECS: u64 = 60;
/// Alert events kept for the page.
pub const EVENT_LOG: usize = 200;

/// How urgent an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Look soon.
    Warning,
    /// Look now.
    Critical,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// A comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Greater than.
    Above,
    /// Equal to.
    Equal,
    /// Less than.
    Below,
}

impl Op {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Above => value > threshold,
            Op::Equal => value == threshold,
            Op::Below => value < threshold,
        }
    }

    fn promql(self) -> &'static str {
        match self {
            Op::Above => ">",
            Op::Equal => "==",
            Op::Below => "<",
        }
    }
}

/// What a rule watches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Condition {
    /// A gauge (summed over its label values) compared with a threshold.
    Gauge {
        /// The metric.
        metric: &'static str,
        /// The comparison.
        op: Op,
        /// The threshold.
        threshold: f64,
    },
    /// The largest of a gauge's series (one per job, say) compared with a
    /// threshold.
    Max {
        /// The metric.
        metric: &'static str,
        /// The comparison.
        op: Op,
        /// The threshold.
        threshold: f64,
    },
    /// A counter's per-second rate over a window (summed over the label
    /// values that match `labels`) compared with a threshold.
    Rate {
        /// The counter, with `_total`.
        metric: &'static str,
        /// Label pairs a sample must carry.
        labels: &'static [(&'static str, &'static str)],
        /// The rate's window.
        window_secs: u64,
        /// The comparison.
        op: Op,
        /// The threshold, per second.
        threshold: f64,
    },
    /// Work is waiting (`work > 0`) and `progress` has not changed for the
    /// whole window: stuck, not idle.
    Stalled {
        /// The gauge that should move.
        progress: &'static str,
        /// The gauge of waiting work.
        work: &'static str,
        /// How long without a change.
        window_secs: u64,
    },
    /// Only Prometheus can see it (the node cannot report its own absence).
    External {
        /// The PromQL expression.
        expr: &'static str,
    },
}

/// One alert rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlertRule {
    /// Its name (Prometheus `alert:`).
    pub name: &'static str,
    /// What it means, for the operator.
    pub summary: &'static str,
    /// How urgent.
    pub severity: Severity,
    /// How long the condition must hold before it fires.
    pub for_secs: u64,
    /// What it watches.
    pub condition: Condition,
}

/// Every rule, in the order of the rules file.
pub const RULES: &[AlertRule] = &[
    AlertRule {
        name: "OpenAgiNodeDown",
        summary: "is not answering /metrics",
        severity: Severity::Critical,
        for_secs: 120,
        condition: Condition::External {
            expr: "up{job=\"openagi\"} == 0",
        },
    },
    AlertRule {
        name: "OpenAgiIsolated",
        summary: "has had no peers for 5 minutes",
        severity: Severity::Warning,
        for_secs: 300,
        condition: Condition::Gauge {
            metric: "openagi_peers_connected",
            op: Op::Equal,
            threshold: 0.0,
        },
    },
    AlertRule {
        name: "OpenAgiDialErrors",
        summary: "fails more than one dial a second",
        severity: Severity::Warning,
        for_secs: 600,
        condition: Condition::Rate {
            metric: "openagi_dial_errors_total",
            labels: &[],
            window_secs: 600,
            op: Op::Above,
            threshold: 1.0,
        },
    },
    AlertRule {
        name: "OpenAgiMalformedGossip",
        summary: "keeps receiving malformed gossip",
        severity: Severity::Warning,
        for_secs: 300,
        condition: Condition::Rate {
            metric: "openagi_gossip_messages_total",
            labels: &[("outcome", "rejected")],
            window_secs: 300,
            op: Op::Above,
            threshold: 0.1,
        },
    },
    AlertRule {
        name: "OpenAgiLedgerStalled",
        summary: "has transactions waiting and its ledger has not advanced for 2 minutes",
        severity: Severity::Critical,
        for_secs: 60,
        condition: Condition::Stalled {
            progress: "openagi_consensus_height",
            work: "openagi_consensus_pending_transactions",
            window_secs: 120,
        },
    },
    AlertRule {
        name: "OpenAgiViewChangeStorm",
        summary: "changes PBFT view more than once every 20 seconds",
        severity: Severity::Warning,
        for_secs: 120,
        condition: Condition::Rate {
            metric: "openagi_consensus_view_changes_total",
            labels: &[],
            window_secs: 300,
            op: Op::Above,
            threshold: 0.05,
        },
    },
    AlertRule {
        name: "OpenAgiHostilePeers",
        summary: "refuses more than 10 inbound streams or requests a second",
        severity: Severity::Warning,
        for_secs: 120,
        condition: Condition::Rate {
            metric: "openagi_p2p_inbound_refused_total",
            labels: &[],
            window_secs: 300,
            op: Op::Above,
            threshold: 10.0,
        },
    },
    AlertRule {
        name: "OpenAgiUnusualInboundTraffic",
        summary: "receives more than 8 MiB/s of peer payload over 5 minutes: a flood, or far more than this network's consensus and training send",
        severity: Severity::Warning,
        for_secs: 120,
        condition: Condition::Rate {
            metric: "openagi_p2p_payload_bytes_total",
            labels: &[("direction", "inbound")],
            window_secs: 300,
            op: Op::Above,
            threshold: 8_388_608.0,
        },
    },
    AlertRule {
        name: "OpenAgiApiAuthFailures",
        summary: "refuses more than one API request a second for a missing or wrong token (the audit log has them)",
        severity: Severity::Warning,
        for_secs: 60,
        condition: Condition::Rate {
            metric: "openagi_api_auth_failures_total",
            labels: &[],
            window_secs: 300,
            op: Op::Above,
            threshold: 1.0,
        },
    },
    AlertRule {
        name: "OpenAgiPeersBanned",
        summary: "banned a peer for misbehaviour in the last 10 minutes (the audit log names it)",
        severity: Severity::Warning,
        for_secs: 60,
        condition: Condition::Rate {
            metric: "openagi_peers_refused_total",
            labels: &[("reason", "misbehaviour")],
            window_secs: 600,
            op: Op::Above,
            // Any ban in the window: one is 1/600 a second.
            threshold: 0.001,
        },
    },
    AlertRule {
        name: "OpenAgiTorNotBootstrapped",
        summary: "has not bootstrapped Tor for 5 minutes",
        severity: Severity::Critical,
        for_secs: 300,
        condition: Condition::Gauge {
            metric: "openagi_tor_bootstrapped",
            op: Op::Equal,
            threshold: 0.0,
        },
    },
    AlertRule {
        name: "OpenAgiEquivocation",
        summary: "saw a validator sign conflicting votes (equivocation evidence)",
        severity: Severity::Critical,
        for_secs: 0,
        condition: Condition::Rate {
            metric: "openagi_consensus_equivocations_total",
            labels: &[],
            window_secs: 600,
            op: Op::Above,
            threshold: 0.0,
        },
    },
    AlertRule {
        name: "OpenAgiValidatorSilent",
        summary: "has heard nothing from at least one validator for 30 seconds",
        severity: Severity::Warning,
        for_secs: 120,
        condition: Condition::Gauge {
            metric: "openagi_consensus_validators_silent",
            op: Op::Above,
            threshold: 0.0,
        },
    },
    AlertRule {
        name: "OpenAgiDiskNearlyFull",
        summary: "has less than 1 GiB free for its data directory",
        severity: Severity::Critical,
        for_secs: 300,
        condition: Condition::Gauge {
            metric: "openagi_data_dir_available_bytes",
            op: Op::Below,
            threshold: 1_073_741_824.0,
        },
    },
    AlertRule {
        name: "OpenAgiPrivacyBudgetNearlySpent",
        summary: "runs a training job that has spent over 90% of its privacy budget",
        severity: Severity::Warning,
        for_secs: 0,
        condition: Condition::Max {
            metric: "openagi_learn_epsilon_budget_used_ratio",
            op: Op::Above,
            threshold: 0.9,
        },
    },
    AlertRule {
        name: "OpenAgiHighMemory",
        summary: "uses more than 900 MiB of memory",
        severity: Severity::Warning,
        for_secs: 300,
        condition: Condition::Gauge {
            metric: "openagi_process_resident_memory_bytes",
            op: Op::Above,
            threshold: 943_718_400.0,
        },
    },
];

impl AlertRule {
    /// The PromQL expression Prometheus evaluates for this rule.
    pub fn promql(&self) -> String {
        match self.condition {
            Condition::Gauge {
                metric,
                op,
                threshold,
            } => format!("{metric} {} {}", op.promql(), fmt_number(threshold)),
            Condition::Max {
                metric,
                op,
                threshold,
            } => format!(
                "max by (instance) ({metric}) {} {}",
                op.promql(),
                fmt_number(threshold)
            ),
            Condition::Rate {
                metric,
                labels,
                window_secs,
                op,
                threshold,
            } => format!(
                "sum by (instance) (rate({metric}{}[{}])) {} {}",
                promql_labels(labels),
                fmt_duration(window_secs),
                op.promql(),
                fmt_number(threshold)
            ),
            Condition::Stalled {
                progress,
                work,
                window_secs,
            } => format!(
                "{work} > 0 and changes({progress}[{}]) == 0",
                fmt_duration(window_secs)
            ),
            Condition::External { expr } => expr.to_string(),
        }
    }

    /// Whether the daemon evaluates this rule itself.
    pub fn evaluated_by_node(&self) -> bool {
        !matches!(self.condition, Condition::External { .. })
    }
}

fn promql_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{{{}}}", pairs.join(","))
}

fn fmt_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn fmt_duration(secs: u64) -> String {
    if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// The Prometheus rules file for [`RULES`] (`configs/openagi-alerts.yml`).
pub fn prometheus_rules_yaml() -> String {
    let mut out = String::from(
        "# Alert rules for Open-AGI nodes, generated from the node's own rule\n\
         # definitions (dashboard/src/alerts.rs), which the daemon also evaluates\n\
         # itself; a test keeps this file equal to them. Check with:\n\
         # promtool check rules openagi-alerts.yml\n\
         groups:\n  - name: openagi\n    rules:\n",
    );
    for rule in RULES {
        let _ = write!(
            out,
            "      - alert: {}\n        expr: {}\n        for: {}\n        labels:\n          severity: {}\n        annotations:\n          summary: \"Open-AGI node {{{{ $labels.instance }}}} {}\"\n",
            rule.name,
            rule.promql(),
            fmt_duration(rule.for_secs),
            rule.severity.as_str(),
            rule.summary
        );
    }
    out
}

/// Where a rule stands.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum AlertState {
    /// The condition does not hold.
    Inactive,
    /// The condition holds, not yet for the rule's `for` time.
    Pending {
        /// Since when (ms).
        since_ms: u64,
    },
    /// Firing.
    Firing {
        /// Since when (ms).
        since_ms: u64,
        /// When the condition last stopped holding, while waiting
        /// [`CLEAR_SECS`] to resolve.
        clearing_since_ms: Option<u64>,
    },
}

/// An alert firing or resolving.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AlertEvent {
    /// The rule.
    pub alert: &'static str,
    /// Its severity.
    pub severity: Severity,
    /// `true`: it fired; `false`: it resolved.
    pub firing: bool,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Why, in words: the rule's summary and the value seen.
    pub reason: String,
}

/// A rule's state as the page shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AlertView {
    /// The rule.
    pub alert: &'static str,
    /// Its severity.
    pub severity: Severity,
    /// What it means.
    pub summary: &'static str,
    /// Its PromQL.
    pub expr: String,
    /// Where it stands.
    #[serde(flatten)]
    pub state: AlertState,
    /// The last value the condition was evaluated on.
    pub value: Option<f64>,
}

#[derive(Clone, Debug)]
struct RuleState {
    state: AlertState,
    /// Raw samples over the rule's window (rates and stalls).
    window: VecDeque<(u64, f64)>,
    value: Option<f64>,
}

/// Evaluates [`RULES`] on successive snapshots of the node's metrics.
#[derive(Clone, Debug)]
pub struct AlertEngine {
    rules: Vec<RuleState>,
    events: VecDeque<AlertEvent>,
    new_events: VecDeque<AlertEvent>,
}

impl Default for AlertEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl AlertEngine {
    /// Every rule inactive.
    pub fn new() -> Self {
        Self {
            rules: RULES
                .iter()
                .map(|_| RuleState {
                    state: AlertState::Inactive,
                    window: VecDeque::new(),
                    value: None,
                })
                .collect(),
            events: VecDeque::new(),
            new_events: VecDeque::new(),
        }
    }

    /// Evaluates every rule the node can on `snapshot`, taken at `now_ms`.
    pub fn handle_snapshot(&mut self, now_ms: u64, snapshot: &Snapshot) {
        for (rule, state) in RULES.iter().zip(&mut self.rules) {
            let value = evaluate(rule, state, now_ms, snapshot);
            state.value = value.map(|(v, _)| v);
            let holds = value.is_some_and(|(_, holds)| holds);
            let event = step(rule, state, holds, now_ms);
            if let Some(event) = event {
                if self.events.len() == EVENT_LOG {
                    self.events.pop_front();
                }
                self.events.push_back(event.clone());
                self.new_events.push_back(event);
            }
        }
    }

    /// The next event since the last call (for the log and counters).
    pub fn poll_event(&mut self) -> Option<AlertEvent> {
        self.new_events.pop_front()
    }

    /// The last [`EVENT_LOG`] events, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &AlertEvent> {
        self.events.iter()
    }

    /// Every rule with its state.
    pub fn views(&self) -> Vec<AlertView> {
        RULES
            .iter()
            .zip(&self.rules)
            .map(|(rule, state)| AlertView {
                alert: rule.name,
                severity: rule.severity,
                summary: rule.summary,
                expr: rule.promql(),
                state: state.state,
                value: state.value,
            })
            .collect()
    }

    /// Whether `name` is firing.
    pub fn is_firing(&self, name: &str) -> bool {
        RULES
            .iter()
            .zip(&self.rules)
            .any(|(r, s)| r.name == name && matches!(s.state, AlertState::Firing { .. }))
    }

    /// How many rules are firing.
    pub fn firing(&self) -> usize {
        self.rules
            .iter()
            .filter(|s| matches!(s.state, AlertState::Firing { .. }))
            .count()
    }
}

/// The value a rule looks at and whether its condition holds, or `None`
/// when the node cannot tell (metric absent, window not yet covered).
fn evaluate(
    rule: &AlertRule,
    state: &mut RuleState,
    now_ms: u64,
    snapshot: &Snapshot,
) -> Option<(f64, bool)> {
    match rule.condition {
        Condition::External { .. } => None,
        Condition::Gauge {
            metric,
            op,
            threshold,
        } => {
            let v = snapshot.sum(metric, &[])?;
            Some((v, op.holds(v, threshold)))
        }
        Condition::Max {
            metric,
            op,
            threshold,
        } => {
            let v = snapshot.max(metric)?;
            Some((v, op.holds(v, threshold)))
        }
        Condition::Rate {
            metric,
            labels,
            window_secs,
            op,
            threshold,
        } => {
            let v = snapshot.sum(metric, labels)?;
            push_window(&mut state.window, now_ms, v, window_secs);
            let rate = rate(&state.window)?;
            Some((rate, op.holds(rate, threshold)))
        }
        Condition::Stalled {
            progress,
            work,
            window_secs,
        } => {
            let p = snapshot.sum(progress, &[])?;
            let w = snapshot.sum(work, &[])?;
            push_window(&mut state.window, now_ms, p, window_secs);
            let (first_t, _) = *state.window.front()?;
            let covered = now_ms.saturating_sub(first_t) >= window_secs * 1000;
            let unchanged = state.window.iter().all(|(_, v)| *v == p);
            Some((w, w > 0.0 && covered && unchanged))
        }
    }
}

/// Keeps the samples of the last `window_secs` (and the one just before
/// it, so the window is covered end to end).
fn push_window(window: &mut VecDeque<(u64, f64)>, now_ms: u64, v: f64, window_secs: u64) {
    window.push_back((now_ms, v));
    let start = now_ms.saturating_sub(window_secs * 1000);
    while window.len() > 2 && window.get(1).is_some_and(|(t, _)| *t <= start) {
        window.pop_front();
    }
}

/// Per-second rate of a counter over the window, counting a drop as a
/// restart from zero (as Prometheus's `rate` does).
fn rate(window: &VecDeque<(u64, f64)>) -> Option<f64> {
    let (first_t, _) = *window.front()?;
    let (last_t, _) = *window.back()?;
    let span = last_t.checked_sub(first_t).filter(|&s| s > 0)?;
    let mut increase = 0.0;
    for (a, b) in window.iter().zip(window.iter().skip(1)) {
        increase += if b.1 >= a.1 { b.1 - a.1 } else { b.1 };
    }
    Some(increase * 1000.0 / span as f64)
}

/// Moves a rule's state on; returns the event when it fires or resolves.
fn step(rule: &AlertRule, state: &mut RuleState, holds: bool, now_ms: u64) -> Option<AlertEvent> {
    let event = |firing: bool, state: &RuleState| AlertEvent {
        alert: rule.name,
        severity: rule.severity,
        firing,
        at_ms: now_ms,
        reason: match state.value {
            Some(v) => format!("{} (value {})", rule.summary, fmt_number(v)),
            None => rule.summary.to_string(),
        },
    };
    match (state.state, holds) {
        (AlertState::Inactive, false) => None,
        (AlertState::Inactive, true) if rule.for_secs == 0 => {
            state.state = AlertState::Firing {
                since_ms: now_ms,
                clearing_since_ms: None,
            };
            Some(event(true, state))
        }
        (AlertState::Inactive, true) => {
            state.state = AlertState::Pending { since_ms: now_ms };
            None
        }
        (AlertState::Pending { .. }, false) => {
            state.state = AlertState::Inactive;
            None
        }
        (AlertState::Pending { since_ms }, true) => {
            if now_ms.saturating_sub(since_ms) >= rule.for_secs * 1000 {
                state.state = AlertState::Firing {
                    since_ms: now_ms,
                    clearing_since_ms: None,
                };
                Some(event(true, state))
            } else {
                None
            }
        }
        (AlertState::Firing { since_ms, .. }, true) => {
            state.state = AlertState::Firing {
                since_ms,
                clearing_since_ms: None,
            };
            None
        }
        (
            AlertState::Firing {
                since_ms,
                clearing_since_ms,
            },
            false,
        ) => {
            let clearing = clearing_since_ms.unwrap_or(now_ms);
            if now_ms.saturating_sub(clearing) >= CLEAR_SECS * 1000 {
                state.state = AlertState::Inactive;
                Some(event(false, state))
            } else {
                state.state = AlertState::Firing {
                    since_ms,
                    clearing_since_ms: Some(clearing),
                };
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(lines: &str) -> Snapshot {
        Snapshot::parse(lines)
    }

    fn run(engine: &mut AlertEngine, from_s: u64, to_s: u64, text: &str) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        let s = snapshot(text);
        let mut t = from_s;
        while t <= to_s {
            engine.handle_snapshot(t * 1000, &s);
            events.extend(std::iter::from_fn(|| engine.poll_event()));
            t += 5;
        }
        events
    }

    #[test]
    fn fires_after_its_for_time_and_resolves_after_the_clear_time() {
        let mut e = AlertEngine::new();
        // No peers: pending for 5 minutes, then firing.
        let events = run(&mut e, 0, 295, "openagi_peers_connected 0\n");
        assert!(events.is_empty(), "{events:?}");
        assert!(!e.is_firing("OpenAgiIsolated"));
        let events = run(&mut e, 300, 300, "openagi_peers_connected 0\n");
        assert_eq!(events.len(), 1);
        assert!(events[0].firing && events[0].alert == "OpenAgiIsolated");
        assert!(events[0].reason.contains("no peers"));
        assert!(e.is_firing("OpenAgiIsolated"));
        // A peer: still firing until the condition has been false for
        // CLEAR_SECS.
        let events = run(&mut e, 305, 360, "openagi_peers_connected 3\n");
        assert!(events.is_empty());
        assert!(e.is_firing("OpenAgiIsolated"));
        let events = run(&mut e, 365, 365, "openagi_peers_connected 3\n");
        assert_eq!(events.len(), 1);
        assert!(!events[0].firing);
        assert!(!e.is_firing("OpenAgiIsolated"));
        assert_eq!(e.events().count(), 2);
    }

    #[test]
    fn a_value_at_the_threshold_does_not_flap() {
        let mut e = AlertEngine::new();
        run(&mut e, 0, 300, "openagi_peers_connected 0\n");
        assert!(e.is_firing("OpenAgiIsolated"));
        // Alternating every sample for ten minutes: one firing, no resolve.
        let mut events = Vec::new();
        for i in 0..120u64 {
            let peers = if i % 2 == 0 { "1" } else { "0" };
            events.extend(run(
                &mut e,
                305 + i * 5,
                305 + i * 5,
                &format!("openagi_peers_connected {peers}\n"),
            ));
        }
        assert!(events.is_empty(), "{events:?}");
        assert!(e.is_firing("OpenAgiIsolated"));
        // A brief dip before the for time never fires.
        let mut fresh = AlertEngine::new();
        let mut events = run(&mut fresh, 0, 200, "openagi_peers_connected 0\n");
        events.extend(run(&mut fresh, 205, 205, "openagi_peers_connected 2\n"));
        events.extend(run(&mut fresh, 210, 400, "openagi_peers_connected 0\n"));
        assert!(events.is_empty(), "the pending time restarted: {events:?}");
    }

    #[test]
    fn rates_use_the_counter_increase_over_the_window() {
        let mut e = AlertEngine::new();
        // 100 view changes every 5 s: 20 a second, far above 0.05.
        let mut events = Vec::new();
        for i in 0..40u64 {
            let text = format!("openagi_consensus_view_changes_total {}\n", i * 100);
            events.extend(run(&mut e, i * 5, i * 5, &text));
        }
        assert!(e.is_firing("OpenAgiViewChangeStorm"), "{events:?}");
        let view = e
            .views()
            .into_iter()
            .find(|v| v.alert == "OpenAgiViewChangeStorm")
            .expect("rule");
        assert_eq!(view.value, Some(20.0));
    }

    #[test]
    fn an_idle_ledger_is_not_stalled_but_a_stuck_one_is() {
        let mut idle = AlertEngine::new();
        run(
            &mut idle,
            0,
            600,
            "openagi_consensus_height 7\nopenagi_consensus_pending_transactions 0\n",
        );
        assert!(!idle.is_firing("OpenAgiLedgerStalled"));
        let mut stuck = AlertEngine::new();
        run(
            &mut stuck,
            0,
            600,
            "openagi_consensus_height 7\nopenagi_consensus_pending_transactions 12\n",
        );
        assert!(stuck.is_firing("OpenAgiLedgerStalled"));
    }

    #[test]
    fn a_job_near_its_budget_fires_at_once_and_disk_fires_below() {
        let mut e = AlertEngine::new();
        let events = run(
            &mut e,
            0,
            0,
            "openagi_learn_epsilon_budget_used_ratio{job=\"a\"} 0.2\n\
             openagi_learn_epsilon_budget_used_ratio{job=\"b\"} 0.95\n",
        );
        assert!(
            events
                .iter()
                .any(|e| e.alert == "OpenAgiPrivacyBudgetNearlySpent" && e.firing)
        );
        run(&mut e, 5, 400, "openagi_data_dir_available_bytes 1000\n");
        assert!(e.is_firing("OpenAgiDiskNearlyFull"));
        let mut roomy = AlertEngine::new();
        run(&mut roomy, 0, 400, "openagi_data_dir_available_bytes 5e9\n");
        assert!(!roomy.is_firing("OpenAgiDiskNearlyFull"));
    }

    #[test]
    fn absent_metrics_never_fire() {
        let mut e = AlertEngine::new();
        run(&mut e, 0, 3600, "");
        assert_eq!(e.firing(), 0);
        assert!(e.views().iter().all(|v| v.state == AlertState::Inactive));
    }

    #[test]
    fn the_shipped_rules_file_is_generated_from_these_rules() {
        let generated = prometheus_rules_yaml();
        if std::env::var_os("BLESS").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/openagi-alerts.yml");
            std::fs::write(path, &generated).expect("writing the rules file");
        }
        let shipped = include_str!("../../configs/openagi-alerts.yml");
        assert_eq!(
            shipped, generated,
            "regenerate configs/openagi-alerts.yml from dashboard::alerts::prometheus_rules_yaml()"
        );
    }
}
