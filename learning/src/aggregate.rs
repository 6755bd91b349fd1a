//! Aggregation rules: FedAvg, coordinate-wise median, trimmed mean, Krum and
//! Multi-Krum over flat client updates.
//!
//! Every rule first screens its input: it refuses an empty set, updates of
//! different lengths, non-finite values and two updates from one client.
//! Non-finite values are refused rather than propagated because a single NaN
//! would silently poison every coordinate of a FedAvg result, and a client
//! sending two updates would double its weight. The node calls [`screen`]
//! first to drop bad updates (and penalise their senders) and then
//! aggregates the rest.
//!
//! # Job-spec syntax
//!
//! [`Aggregator`] (de)serializes as an externally tagged enum in snake case.
//! In TOML:
//!
//! ```toml
//! aggregator = "fedavg"                                  # weighted by sample counts
//! aggregator = "median"                                  # coordinate-wise median
//! aggregator = { trimmed_mean = { beta = 0.1 } }         # drop 10% each side
//! aggregator = { krum = { f = 1 } }                      # tolerate 1 Byzantine client
//! aggregator = { multi_krum = { f = 1, m = 3 } }         # average the 3 best-scored
//! ```
//!
//! Parameters are validated when the spec is parsed, so a spec with
//! `beta = 0.6` or `m = 0` is refused up front.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Identifies the client that produced an update: the 32 bytes of its
/// Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub [u8; 32]);

impl From<openagi_crypto::PublicKey> for ClientId {
    fn from(key: openagi_crypto::PublicKey) -> Self {
        ClientId(key.to_bytes())
    }
}

impl fmt::Display for ClientId {
    /// Shows the first 8 bytes in hex: enough to tell clients apart in logs
    /// and errors without printing whole keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({self})")
    }
}

/// One client's contribution to a round: a flat parameter (or delta) vector,
/// the number of local samples it was trained on, and who sent it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    /// The sender.
    pub client: ClientId,
    /// Flat parameters or parameter deltas, in the model's canonical order.
    pub params: Vec<f32>,
    /// Local training samples behind this update; FedAvg weights by it.
    pub samples: u64,
}

impl ClientUpdate {
    /// Bundles an update.
    pub fn new(client: ClientId, params: Vec<f32>, samples: u64) -> Self {
        ClientUpdate {
            client,
            params,
            samples,
        }
    }
}

/// Checks one update on its own: expected length and finite values.
pub fn check_update(update: &ClientUpdate, expected_len: usize) -> Result<()> {
    if update.params.len() != expected_len {
        return Err(Error::LengthMismatch {
            client: Some(update.client),
            expected: expected_len,
            found: update.params.len(),
        });
    }
    if let Some(index) = update.params.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            client: Some(update.client),
            index,
        });
    }
    Ok(())
}

/// The outcome of [`screen`]: the usable updates and the refused ones with
/// the reason for each.
#[derive(Debug, Default)]
pub struct Screened<'a> {
    /// Updates that passed every check, in input order.
    pub accepted: Vec<&'a ClientUpdate>,
    /// Updates refused, with why.
    pub rejected: Vec<(ClientId, Error)>,
}

/// Splits `updates` into usable and refused ones, given the model length.
///
/// An update is refused for a wrong length or a non-finite value. When one
/// client appears more than once, all of its updates are refused: there is
/// no honest reason to send two, and keeping either would let the sender
/// choose which one counts.
pub fn screen(updates: &[ClientUpdate], expected_len: usize) -> Screened<'_> {
    let mut seen = HashSet::new();
    let mut dup = HashSet::new();
    for u in updates {
        if !seen.insert(u.client) {
            dup.insert(u.client);
        }
    }
    let mut out = Screened::default();
    for u in updates {
        if dup.contains(&u.client) {
            out.rejected
                .push((u.client, Error::DuplicateClient { client: u.client }));
        } else if let Err(e) = check_update(u, expected_len) {
            out.rejected.push((u.client, e));
        } else {
            out.accepted.push(u);
        }
    }
    out
}

/// Validates a set for aggregation (non-empty, non-empty vectors of one
/// length, finite, one update per client) and returns the common length.
pub(crate) fn validate(updates: &[ClientUpdate]) -> Result<usize> {
    let first = updates.first().ok_or(Error::Empty {
        what: "client updates",
    })?;
    let len = first.params.len();
    if len == 0 {
        return Err(Error::invalid(
            "client updates",
            "parameter vectors are empty",
        ));
    }
    let mut seen = HashSet::with_capacity(updates.len());
    for u in updates {
        if !seen.insert(u.client) {
            return Err(Error::DuplicateClient { client: u.client });
        }
        check_update(u, len)?;
    }
    Ok(len)
}

/// A server-side aggregation rule, selectable by name from a job spec (see
/// the [module docs](self) for the syntax).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "AggregatorSpec")]
pub enum Aggregator {
    /// Federated averaging (McMahan et al. 2017): the mean weighted by each
    /// client's sample count. Not robust: one client can move it anywhere.
    #[serde(rename = "fedavg")]
    FedAvg,
    /// Coordinate-wise median (Yin et al. 2018); the mean of the two middle
    /// values for an even count. Robust while fewer than half the clients
    /// are Byzantine.
    Median,
    /// Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop
    /// the `⌊beta·n⌋` largest and smallest values and average the rest
    /// (unweighted).
    TrimmedMean {
        /// Fraction trimmed on each side, in `[0, 0.5)`.
        beta: f64,
    },
    /// Krum (Blanchard et al. 2017): pick the single update whose summed
    /// squared distance to its `n − f − 2` nearest neighbours is smallest.
    /// Needs `n ≥ 2f + 3`.
    Krum {
        /// Number of Byzantine clients tolerated.
        f: usize,
    },
    /// Multi-Krum (Blanchard et al. 2017): the unweighted mean of the `m`
    /// updates with the best Krum scores (scores computed once over the
    /// whole set). Needs `n ≥ 2f + 3` and `1 ≤ m ≤ n − f`.
    MultiKrum {
        /// Number of Byzantine clients tolerated.
        f: usize,
        /// Number of updates averaged.
        m: usize,
    },
}

/// The unvalidated shape of [`Aggregator`] as written in a spec; converted
/// with validation so a bad spec fails at parse time.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum AggregatorSpec {
    #[serde(rename = "fedavg")]
    FedAvg,
    Median,
    TrimmedMean {
        beta: f64,
    },
    Krum {
        f: usize,
    },
    MultiKrum {
        f: usize,
        m: usize,
    },
}

impl TryFrom<AggregatorSpec> for Aggregator {
    type Error = Error;

    fn try_from(spec: AggregatorSpec) -> Result<Self> {
        let agg = match spec {
            AggregatorSpec::FedAvg => Aggregator::FedAvg,
            AggregatorSpec::Median => Aggregator::Median,
            AggregatorSpec::TrimmedMean { beta } => Aggregator::TrimmedMean { beta },
            AggregatorSpec::Krum { f } => Aggregator::Krum { f },
            AggregatorSpec::MultiKrum { f, m } => Aggregator::MultiKrum { f, m },
        };
        agg.validate()?;
        Ok(agg)
    }
}

impl Aggregator {
    /// The name used in job specs.
    pub fn name(&self) -> &'static str {
        match self {
            Aggregator::FedAvg => "fedavg",
            Aggregator::Median => "median",
            Aggregator::TrimmedMean { .. } => "trimmed_mean",
            Aggregator::Krum { .. } => "krum",
            Aggregator::MultiKrum { .. } => "multi_krum",
        }
    }

    /// Checks the rule's own parameters (independent of the client count).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Aggregator::TrimmedMean { beta } if !(0.0..0.5).contains(&beta) => Err(Error::invalid(
                "trimmed_mean beta",
                format!("{beta} is not in [0, 0.5)"),
            )),
            Aggregator::MultiKrum { m: 0, .. } => {
                Err(Error::invalid("multi_krum m", "must be at least 1"))
            }
            _ => Ok(()),
        }
    }

    /// The fewest clients this rule can aggregate; a scheduler should not
    /// close a round with fewer accepted updates.
    pub fn min_clients(&self) -> usize {
        match *self {
            Aggregator::FedAvg | Aggregator::Median | Aggregator::TrimmedMean { .. } => 1,
            Aggregator::Krum { f } => krum_min_clients(f),
            Aggregator::MultiKrum { f, m } => krum_min_clients(f).max(m.saturating_add(f)),
        }
    }

    /// Aggregates `updates` into one parameter vector.
    ///
    /// Refuses an empty set, mismatched lengths, non-finite values,
    /// duplicate clients and (for the Krum family) too few clients for `f`.
    pub fn aggregate(&self, updates: &[ClientUpdate]) -> Result<Vec<f32>> {
        self.validate()?;
        match *self {
            Aggregator::FedAvg => fedavg(updates),
            Aggregator::Median => median(updates),
            Aggregator::TrimmedMean { beta } => trimmed_mean(updates, beta),
            Aggregator::Krum { f } => {
                let chosen = multi_krum_select(updates, f, 1)?;
                let best = chosen
                    .first()
                    .and_then(|&i| updates.get(i))
                    .ok_or(Error::Empty {
                        what: "client updates",
                    })?;
                Ok(best.params.clone())
            }
            Aggregator::MultiKrum { f, m } => {
                let chosen = multi_krum_select(updates, f, m)?;
                let len = validate(updates)?;
                let mut acc = vec![0f64; len];
                for &i in &chosen {
                    if let Some(u) = updates.get(i) {
                        add_into(&mut acc, &u.params, 1.0);
                    }
                }
                Ok(finish_mean(&acc, chosen.len() as f64))
            }
        }
    }
}

fn krum_min_clients(f: usize) -> usize {
    f.saturating_mul(2).saturating_add(3)
}

fn add_into(acc: &mut [f64], params: &[f32], weight: f64) {
    for (a, &p) in acc.iter_mut().zip(params) {
        *a += weight * f64::from(p);
    }
}

fn finish_mean(acc: &[f64], denom: f64) -> Vec<f32> {
    acc.iter().map(|&a| (a / denom) as f32).collect()
}

/// FedAvg: the mean of the updates weighted by their sample counts,
/// accumulated in `f64`. Refuses a set whose sample counts are all zero.
///
/// Sample counts are self-reported: a hostile client can claim a huge count
/// and dominate. Cap counts before calling, or use a robust rule.
pub fn fedavg(updates: &[ClientUpdate]) -> Result<Vec<f32>> {
    let len = validate(updates)?;
    let mut sum = FedAvgSum::new(len);
    for u in updates {
        sum.add(u)?;
    }
    sum.finish()
}

/// FedAvg folded one update at a time, so a server holds one `f64` vector
/// instead of every update of the round. Folding the same updates in the
/// same order gives bit-identical results to [`fedavg`], which is built on
/// it; callers that train in parallel fold in a fixed order (the
/// simulator folds in selection order) so the thread count cannot change
/// the model.
#[derive(Clone, Debug)]
pub struct FedAvgSum {
    acc: Vec<f64>,
    // Summed in f64: 2^53 samples is far beyond any federation.
    total_samples: f64,
    clients: HashSet<ClientId>,
}

impl FedAvgSum {
    /// An empty sum for updates of `len` parameters.
    pub fn new(len: usize) -> Self {
        FedAvgSum {
            acc: vec![0f64; len],
            total_samples: 0.0,
            clients: HashSet::new(),
        }
    }

    /// Adds one update, weighted by its sample count. Refuses a wrong
    /// length, a non-finite value or a client already added, leaving the
    /// sum unchanged.
    pub fn add(&mut self, update: &ClientUpdate) -> Result<()> {
        check_update(update, self.acc.len())?;
        if self.clients.contains(&update.client) {
            return Err(Error::DuplicateClient {
                client: update.client,
            });
        }
        self.clients.insert(update.client);
        add_into(&mut self.acc, &update.params, update.samples as f64);
        self.total_samples += update.samples as f64;
        Ok(())
    }

    /// Updates added so far.
    pub fn count(&self) -> usize {
        self.clients.len()
    }

    /// The weighted mean. Refuses an empty sum and one whose sample counts
    /// are all zero.
    pub fn finish(self) -> Result<Vec<f32>> {
        if self.clients.is_empty() {
            return Err(Error::Empty {
                what: "client updates",
            });
        }
        if self.total_samples <= 0.0 {
            return Err(Error::invalid(
                "sample counts",
                "all updates report zero samples",
            ));
        }
        Ok(finish_mean(&self.acc, self.total_samples))
    }
}

/// Coordinate-wise median; for an even count, the mean of the two middle
/// values.
pub fn median(updates: &[ClientUpdate]) -> Result<Vec<f32>> {
    let len = validate(updates)?;
    let n = updates.len();
    let mut column = Vec::with_capacity(n);
    let mut out = Vec::with_capacity(len);
    for j in 0..len {
        column.clear();
        column.extend(updates.iter().map(|u| u.params[j]));
        let mid = n / 2;
        let (_, &mut hi, _) = column.select_nth_unstable_by(mid, f32::total_cmp);
        if n % 2 == 1 {
            out.push(hi);
        } else {
            // After selection everything left of `mid` is <= hi; the lower
            // middle value is the largest of them.
            let lo = column[..mid]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            out.push(((f64::from(lo) + f64::from(hi)) / 2.0) as f32);
        }
    }
    Ok(out)
}

/// Coordinate-wise trimmed mean: drops `⌊beta·n⌋` values from each end of
/// every coordinate and averages the rest.
pub fn trimmed_mean(updates: &[ClientUpdate], beta: f64) -> Result<Vec<f32>> {
    if !(0.0..0.5).contains(&beta) {
        return Err(Error::invalid(
            "trimmed_mean beta",
            format!("{beta} is not in [0, 0.5)"),
        ));
    }
    let len = validate(updates)?;
    let n = updates.len();
    // beta < 0.5 guarantees 2·trim < n, so at least one value remains.
    let trim = (beta * n as f64).floor() as usize;
    let kept = n - 2 * trim;
    let mut column = Vec::with_capacity(n);
    let mut out = Vec::with_capacity(len);
    for j in 0..len {
        column.clear();
        column.extend(updates.iter().map(|u| u.params[j]));
        column.sort_unstable_by(f32::total_cmp);
        let sum: f64 = column[trim..trim + kept]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        out.push((sum / kept as f64) as f32);
    }
    Ok(out)
}

/// Krum scores (Blanchard et al. 2017): for each update, the sum of squared
/// Euclidean distances to its `n − f − 2` nearest other updates. Lower is
/// more central. Needs `n ≥ 2f + 3`.
pub fn krum_scores(updates: &[ClientUpdate], f: usize) -> Result<Vec<f64>> {
    validate(updates)?;
    let n = updates.len();
    let needed = krum_min_clients(f);
    if n < needed {
        return Err(Error::TooFewClients {
            rule: "krum",
            needed,
            got: n,
        });
    }
    let neighbours = n - f - 2;
    let mut dist = vec![0f64; n * n];
    for i in 0..n {
        for j in (i + 1)..n {
            let d: f64 = updates[i]
                .params
                .iter()
                .zip(&updates[j].params)
                .map(|(&a, &b)| {
                    let diff = f64::from(a) - f64::from(b);
                    diff * diff
                })
                .sum();
            dist[i * n + j] = d;
            dist[j * n + i] = d;
        }
    }
    let mut scores = Vec::with_capacity(n);
    let mut row = Vec::with_capacity(n);
    for i in 0..n {
        row.clear();
        row.extend((0..n).filter(|&j| j != i).map(|j| dist[i * n + j]));
        row.sort_unstable_by(f64::total_cmp);
        scores.push(row[..neighbours].iter().sum());
    }
    Ok(scores)
}

/// Indices of the `m` updates with the best Krum scores, best first; ties go
/// to the lower index so the choice is deterministic.
pub fn multi_krum_select(updates: &[ClientUpdate], f: usize, m: usize) -> Result<Vec<usize>> {
    let scores = krum_scores(updates, f)?;
    let n = scores.len();
    if m == 0 || m > n - f {
        return Err(Error::invalid(
            "multi_krum m",
            format!("{m} is not in 1..={} for n = {n}, f = {f}", n - f),
        ));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(m);
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn id(i: u8) -> ClientId {
        ClientId([i; 32])
    }

    fn upd(i: u8, params: &[f32], samples: u64) -> ClientUpdate {
        ClientUpdate::new(id(i), params.to_vec(), samples)
    }

    fn honest_plus_poison() -> Vec<ClientUpdate> {
        vec![
            upd(1, &[1.0, 2.0], 10),
            upd(2, &[1.1, 2.1], 10),
            upd(3, &[0.9, 1.9], 10),
            upd(4, &[1.0, 2.05], 10),
            upd(5, &[1.05, 1.95], 10),
            upd(6, &[1e6, -1e6], 10),
        ]
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn fedavg_weights_by_samples() {
        let us = vec![upd(1, &[1.0, 0.0], 1), upd(2, &[4.0, 3.0], 2)];
        let got = Aggregator::FedAvg.aggregate(&us).expect("fedavg");
        assert!(close(&got, &[3.0, 2.0], 1e-6), "{got:?}");
    }

    #[test]
    fn fedavg_refuses_all_zero_samples() {
        let us = vec![upd(1, &[1.0], 0), upd(2, &[2.0], 0)];
        let e = fedavg(&us).expect_err("zero weights");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn median_odd_and_even() {
        let odd = vec![
            upd(1, &[3.0, -1.0], 1),
            upd(2, &[1.0, 5.0], 1),
            upd(3, &[2.0, 0.0], 1),
        ];
        assert_eq!(median(&odd).expect("median"), vec![2.0, 0.0]);
        let even = vec![
            upd(1, &[4.0], 1),
            upd(2, &[1.0], 1),
            upd(3, &[3.0], 1),
            upd(4, &[10.0], 1),
        ];
        assert_eq!(median(&even).expect("median"), vec![3.5]);
    }

    #[test]
    fn trimmed_mean_hand_computed() {
        // n = 5, beta = 0.2 -> trim 1 each side: mean of the middle three.
        let us = vec![
            upd(1, &[1.0], 1),
            upd(2, &[2.0], 1),
            upd(3, &[3.0], 1),
            upd(4, &[4.0], 1),
            upd(5, &[100.0], 1),
        ];
        assert_eq!(trimmed_mean(&us, 0.2).expect("tm"), vec![3.0]);
        // beta = 0.1 -> floor(0.5) = 0 trimmed: plain mean.
        assert_eq!(trimmed_mean(&us, 0.1).expect("tm"), vec![22.0]);
        assert_eq!(
            trimmed_mean(&us, 0.5).expect_err("beta").kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn krum_hand_computed() {
        // n = 5, f = 1: each score sums the 2 nearest squared distances.
        let us = vec![
            upd(1, &[0.0], 1),
            upd(2, &[1.0], 1),
            upd(3, &[2.0], 1),
            upd(4, &[3.0], 1),
            upd(5, &[50.0], 1),
        ];
        let s = krum_scores(&us, 1).expect("scores");
        assert_eq!(
            s,
            vec![
                1.0 + 4.0,
                1.0 + 1.0,
                1.0 + 1.0,
                1.0 + 4.0,
                47.0 * 47.0 + 48.0 * 48.0
            ]
        );
        // Tie between indices 1 and 2 goes to the lower index.
        assert_eq!(
            Aggregator::Krum { f: 1 }.aggregate(&us).expect("krum"),
            vec![1.0]
        );
        let mk = Aggregator::MultiKrum { f: 1, m: 3 }
            .aggregate(&us)
            .expect("mk");
        // Best three: indices 1, 2 (score 2) then 0 (score 5, lower index than 3).
        assert!(close(&mk, &[1.0], 1e-6), "{mk:?}");
    }

    #[test]
    fn krum_needs_enough_clients() {
        let us: Vec<_> = (0..4).map(|i| upd(i, &[f32::from(i)], 1)).collect();
        let e = Aggregator::Krum { f: 1 }
            .aggregate(&us)
            .expect_err("n = 4 < 5");
        assert_eq!(e.kind(), ErrorKind::NotEnoughClients);
        assert!(matches!(
            e,
            Error::TooFewClients {
                needed: 5,
                got: 4,
                ..
            }
        ));
        assert_eq!(Aggregator::Krum { f: 1 }.min_clients(), 5);
        assert_eq!(Aggregator::MultiKrum { f: 1, m: 5 }.min_clients(), 6);
        let us: Vec<_> = (0..5).map(|i| upd(i, &[f32::from(i)], 1)).collect();
        let e = Aggregator::MultiKrum { f: 1, m: 5 }
            .aggregate(&us)
            .expect_err("m > n - f");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn poisoned_update_moves_fedavg_but_not_robust_rules() {
        let us = honest_plus_poison();
        let avg = Aggregator::FedAvg.aggregate(&us).expect("fedavg");
        assert!(avg[0] > 1e5, "FedAvg should be dragged away: {avg:?}");
        for agg in [
            Aggregator::Median,
            Aggregator::TrimmedMean { beta: 0.2 },
            Aggregator::Krum { f: 1 },
            Aggregator::MultiKrum { f: 1, m: 3 },
        ] {
            let got = agg.aggregate(&us).expect("robust");
            assert!(
                close(&got, &[1.0, 2.0], 0.11),
                "{} was moved by the poisoned update: {got:?}",
                agg.name()
            );
        }
    }

    #[test]
    fn refuses_bad_input() {
        let e = Aggregator::Median.aggregate(&[]).expect_err("empty");
        assert_eq!(e.kind(), ErrorKind::NotEnoughClients);

        let us = vec![upd(1, &[1.0, 2.0], 1), upd(2, &[1.0], 1)];
        let e = Aggregator::FedAvg.aggregate(&us).expect_err("lengths");
        assert!(matches!(
            e,
            Error::LengthMismatch {
                expected: 2,
                found: 1,
                ..
            }
        ));
        assert_eq!(e.kind(), ErrorKind::BadUpdate);

        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let us = vec![upd(1, &[1.0, 2.0], 1), upd(2, &[1.0, bad], 1)];
            for agg in [
                Aggregator::FedAvg,
                Aggregator::Median,
                Aggregator::TrimmedMean { beta: 0.0 },
            ] {
                let e = agg.aggregate(&us).expect_err("non-finite");
                assert_eq!(
                    e,
                    Error::NonFinite {
                        client: Some(id(2)),
                        index: 1
                    }
                );
            }
        }

        let us = vec![upd(1, &[1.0], 1), upd(1, &[2.0], 1)];
        let e = Aggregator::FedAvg.aggregate(&us).expect_err("duplicate");
        assert_eq!(e, Error::DuplicateClient { client: id(1) });
    }

    #[test]
    fn screen_separates_bad_updates() {
        let us = vec![
            upd(1, &[1.0, 2.0], 1),
            upd(2, &[1.0], 1),
            upd(3, &[f32::NAN, 2.0], 1),
            upd(4, &[0.0, 0.0], 1),
            upd(4, &[9.0, 9.0], 1),
            upd(5, &[3.0, 4.0], 1),
        ];
        let s = screen(&us, 2);
        let ok: Vec<_> = s.accepted.iter().map(|u| u.client).collect();
        assert_eq!(ok, vec![id(1), id(5)]);
        let bad: Vec<_> = s.rejected.iter().map(|(c, _)| *c).collect();
        assert_eq!(bad, vec![id(2), id(3), id(4), id(4)]);
    }

    #[test]
    fn spec_syntax_round_trips() {
        #[derive(Deserialize, Serialize)]
        struct Job {
            aggregator: Aggregator,
        }
        let cases = [
            (r#"aggregator = "fedavg""#, Aggregator::FedAvg),
            (r#"aggregator = "median""#, Aggregator::Median),
            (
                "aggregator = { trimmed_mean = { beta = 0.1 } }",
                Aggregator::TrimmedMean { beta: 0.1 },
            ),
            (
                "aggregator = { krum = { f = 2 } }",
                Aggregator::Krum { f: 2 },
            ),
            (
                "aggregator = { multi_krum = { f = 1, m = 3 } }",
                Aggregator::MultiKrum { f: 1, m: 3 },
            ),
        ];
        for (text, want) in cases {
            let job: Job = toml::from_str(text).expect(text);
            assert_eq!(job.aggregator, want);
            let json = serde_json::to_string(&job.aggregator).expect("json");
            let back: Aggregator = serde_json::from_str(&json).expect("json back");
            assert_eq!(back, want);
        }
        assert_eq!(
            serde_json::to_string(&Aggregator::FedAvg).expect("json"),
            r#""fedavg""#
        );
        for bad in [
            "aggregator = { trimmed_mean = { beta = 0.6 } }",
            "aggregator = { multi_krum = { f = 1, m = 0 } }",
            r#"aggregator = "fed_avg""#,
            "aggregator = { krum = { f = 1, g = 2 } }",
        ] {
            assert!(
                toml::from_str::<Job>(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }
}
