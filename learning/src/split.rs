//! Partitions of a labelled data set across simulated clients, for
//! experiments and benchmarks: IID, Dirichlet label skew, and a fixed number
//! of labels per client.
//!
//! Every function returns one list of sample indices per client, sorted
//! ascending, with no index given to two clients, and is a deterministic
//! function of its inputs and `seed`. The IID and labels-per-client splits
//! depend only on the ChaCha20 stream of the seed and are stable across
//! releases; the Dirichlet split draws Gamma variates from `rand_distr`,
//! whose exact values may change with that crate's major versions.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

use crate::dp::uniform_below;
use crate::{Error, Result, SeededRng};

fn check_clients(n_clients: usize) -> Result<()> {
    if n_clients == 0 {
        return Err(Error::invalid("client count", "must be at least 1"));
    }
    Ok(())
}

/// Fisher–Yates shuffle on the seeded stream (stable across releases).
pub(crate) fn shuffle<T>(items: &mut [T], rng: &mut SeededRng) {
    for i in (1..items.len()).rev() {
        let j = uniform_below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

fn finish(mut parts: Vec<Vec<usize>>) -> Vec<Vec<usize>> {
    parts.iter_mut().for_each(|p| p.sort_unstable());
    parts
}

/// Sample indices grouped by label, labels ascending.
fn by_label(labels: &[u32]) -> BTreeMap<u32, Vec<usize>> {
    let mut classes: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        classes.entry(l).or_default().push(i);
    }
    classes
}

/// IID split: shuffles the `n_samples` indices and deals them round-robin,
/// so client sizes differ by at most one and each client's label mix
/// follows the data set's.
pub fn iid(n_samples: usize, n_clients: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    check_clients(n_clients)?;
    let mut rng = SeededRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n_samples).collect();
    shuffle(&mut order, &mut rng);
    let mut parts = vec![Vec::with_capacity(n_samples / n_clients + 1); n_clients];
    for (k, i) in order.into_iter().enumerate() {
        parts[k % n_clients].push(i);
    }
    Ok(finish(parts))
}

/// Dirichlet label skew (Hsu, Qi, Brown 2019, "Measuring the Effects of
/// Non-Identical Data Distribution for Federated Visual Classification"):
/// for every class, client shares are drawn from Dirichlet(α, …, α) and the
/// class's shuffled samples are cut at those proportions.
///
/// Large α approaches IID; small α (≤ 0.1) gives most clients only a few
/// classes, and some clients may receive no samples at all.
pub fn dirichlet(
    labels: &[u32],
    n_clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    check_clients(n_clients)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::invalid(
            "Dirichlet alpha",
            format!("{alpha} is not a finite positive number"),
        ));
    }
    let gamma =
        Gamma::new(alpha, 1.0).map_err(|e| Error::invalid("Dirichlet alpha", e.to_string()))?;
    let mut rng = SeededRng::seed_from_u64(seed);
    let mut parts = vec![Vec::new(); n_clients];
    let mut shares = vec![0f64; n_clients];
    for (_, mut members) in by_label(labels) {
        shuffle(&mut members, &mut rng);
        // A Dirichlet draw is independent Gamma(α, 1) draws, normalised.
        for s in shares.iter_mut() {
            *s = gamma.sample(&mut rng);
        }
        let total: f64 = shares.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            // Tiny α can underflow every draw to zero; the α → 0 limit is
            // the whole class going to a single client.
            let c = uniform_below(&mut rng, n_clients as u64) as usize;
            parts[c].extend_from_slice(&members);
            continue;
        }
        let n = members.len();
        let mut cum = 0.0;
        let mut start = 0usize;
        for (c, &s) in shares.iter().enumerate() {
            cum += s / total;
            let end = if c + 1 == n_clients {
                n
            } else {
                ((cum * n as f64).round() as usize).clamp(start, n)
            };
            parts[c].extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    Ok(finish(parts))
}

/// Pathological non-IID split in the spirit of McMahan et al. 2017: each
/// client holds exactly `labels_each` distinct labels, and each label's
/// samples are shared evenly among the clients that hold it.
///
/// Labels are shuffled by the seed, then client `c` takes labels
/// `c·labels_each … c·labels_each + labels_each − 1` (wrapping around), so
/// labels are spread as evenly as possible. When `n_clients · labels_each`
/// is smaller than the number of distinct labels, the samples of the labels
/// nobody draws are left out.
pub fn labels_per_client(
    labels: &[u32],
    n_clients: usize,
    labels_each: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    check_clients(n_clients)?;
    let classes = by_label(labels);
    let k = classes.len();
    if labels_each == 0 || labels_each > k {
        return Err(Error::invalid(
            "labels per client",
            format!("{labels_each} is not in 1..={k} (distinct labels present)"),
        ));
    }
    let mut rng = SeededRng::seed_from_u64(seed);
    let mut order: Vec<u32> = classes.keys().copied().collect();
    shuffle(&mut order, &mut rng);
    // holders[label position] = clients holding it, in client order.
    let mut holders: Vec<Vec<usize>> = vec![Vec::new(); k];
    for c in 0..n_clients {
        for j in 0..labels_each {
            holders[(c * labels_each + j) % k].push(c);
        }
    }
    let mut parts = vec![Vec::new(); n_clients];
    for (pos, label) in order.iter().enumerate() {
        let clients = &holders[pos];
        let Some(members) = classes.get(label) else {
            continue;
        };
        if clients.is_empty() {
            continue;
        }
        let mut members = members.clone();
        shuffle(&mut members, &mut rng);
        let share = clients.len();
        for (i, idx) in members.into_iter().enumerate() {
            parts[clients[i % share]].push(idx);
        }
    }
    Ok(finish(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// 10 classes × 300 samples, labels interleaved.
    fn labels() -> Vec<u32> {
        (0..3000).map(|i| (i % 10) as u32).collect()
    }

    fn assert_disjoint(parts: &[Vec<usize>], n: usize, complete: bool) {
        let mut seen = HashSet::new();
        for p in parts {
            assert!(p.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
            for &i in p {
                assert!(i < n);
                assert!(seen.insert(i), "index {i} given twice");
            }
        }
        if complete {
            assert_eq!(seen.len(), n, "every sample assigned");
        }
    }

    fn class_counts(part: &[usize], labels: &[u32]) -> [usize; 10] {
        let mut c = [0; 10];
        for &i in part {
            c[labels[i] as usize] += 1;
        }
        c
    }

    #[test]
    fn iid_is_balanced() {
        let l = labels();
        let parts = iid(l.len(), 7, 1).expect("iid");
        assert_disjoint(&parts, l.len(), true);
        let sizes: Vec<_> = parts.iter().map(Vec::len).collect();
        assert!(sizes.iter().max().expect("max") - sizes.iter().min().expect("min") <= 1);
        for p in &parts {
            // ~43 per class per client; allow generous sampling noise.
            assert!(class_counts(p, &l).iter().all(|&c| (20..70).contains(&c)));
        }
        assert_eq!(parts, iid(l.len(), 7, 1).expect("iid"));
        assert_ne!(parts, iid(l.len(), 7, 2).expect("iid"));
        assert!(iid(10, 0, 1).is_err());
        assert_eq!(
            iid(3, 5, 1)
                .expect("iid")
                .iter()
                .filter(|p| p.is_empty())
                .count(),
            2
        );
    }

    /// Mean over clients of the largest single-class share of its data.
    fn skew(parts: &[Vec<usize>], l: &[u32]) -> f64 {
        let nonempty: Vec<_> = parts.iter().filter(|p| !p.is_empty()).collect();
        nonempty
            .iter()
            .map(|p| *class_counts(p, l).iter().max().expect("max") as f64 / p.len() as f64)
            .sum::<f64>()
            / nonempty.len() as f64
    }

    #[test]
    fn dirichlet_skew_follows_alpha() {
        let l = labels();
        let near_iid = dirichlet(&l, 10, 1000.0, 3).expect("dir");
        assert_disjoint(&near_iid, l.len(), true);
        let skewed = dirichlet(&l, 10, 0.05, 3).expect("dir");
        assert_disjoint(&skewed, l.len(), true);
        let (a, b) = (skew(&near_iid, &l), skew(&skewed, &l));
        assert!(a < 0.2, "α = 1000 should be close to 0.1: {a}");
        assert!(b > 0.6, "α = 0.05 should concentrate classes: {b}");
        assert_eq!(skewed, dirichlet(&l, 10, 0.05, 3).expect("dir"));
        // Extremely small α still assigns every sample.
        assert_disjoint(&dirichlet(&l, 10, 1e-6, 3).expect("dir"), l.len(), true);
        assert!(dirichlet(&l, 10, 0.0, 3).is_err());
        assert!(dirichlet(&l, 10, f64::NAN, 3).is_err());
    }

    #[test]
    fn n_labels_per_client() {
        let l = labels();
        for (clients, each) in [(10, 2), (5, 2), (20, 1), (3, 4), (4, 10)] {
            let parts = labels_per_client(&l, clients, each, 9).expect("split");
            assert_disjoint(&parts, l.len(), clients * each >= 10);
            for p in &parts {
                let distinct = class_counts(p, &l).iter().filter(|&&c| c > 0).count();
                assert_eq!(distinct, each, "clients={clients} each={each}");
            }
            // Holders of a label share it evenly (within one sample).
            let sizes: Vec<_> = parts.iter().map(Vec::len).collect();
            if clients * each % 10 == 0 {
                assert!(
                    sizes.iter().max().expect("max") - sizes.iter().min().expect("min") <= each
                );
            }
        }
        assert!(labels_per_client(&l, 10, 0, 9).is_err());
        assert!(labels_per_client(&l, 10, 11, 9).is_err());
        assert_eq!(
            labels_per_client(&l, 10, 2, 9).expect("a"),
            labels_per_client(&l, 10, 2, 9).expect("b")
        );
    }
}
