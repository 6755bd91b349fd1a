//! Client-level differential privacy, as in DP-FedAvg (McMahan, Ramage,
//! Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
//! Models"): each client's update is clipped to L2 norm `S`, the clipped
//! updates are summed, Gaussian noise with standard deviation `σ = z·S` is
//! added to the sum, and the sum is divided by a fixed denominator.
//!
//! The privacy loss is tracked by a Rényi-DP [`Accountant`] for the
//! Poisson-subsampled Gaussian mechanism (Mironov, Talwar, Zhang 2019,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism") and
//! converted to (ε, δ) with the conversion of Balle et al. 2020 ("Hypothesis
//! Testing Interpretations and Rényi Differential Privacy", Theorem 21).
//!
//! Two conditions the guarantee rests on, which the node must uphold:
//! - The noise RNG must be seeded secretly and unpredictably (from the OS).
//!   A guessable seed lets anyone subtract the noise.
//! - Amplification by sampling (`q < 1`) assumes nobody learns which clients
//!   took part. If a round's participants are published (for instance in
//!   the ledger), account each round with `q = 1`.

use rand::{Rng, RngCore};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::aggregate::ClientUpdate;
use crate::{Error, Result};

/// L2 norm of a vector, accumulated in `f64`.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

fn check_finite(v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            client: None,
            index,
        }),
        None => Ok(()),
    }
}

fn check_positive(what: &'static str, x: f64) -> Result<()> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            format!("{x} is not a finite positive number"),
        ))
    }
}

/// Scales `update` in place so its L2 norm is at most `clip_norm`, and
/// returns the norm it had before. Updates already within the bound are
/// left untouched.
///
/// The result is guaranteed to satisfy the bound in `f32` arithmetic: if
/// rounding after scaling leaves the norm a hair above `clip_norm`, it is
/// scaled down again, because the sensitivity bound is what the privacy
/// guarantee is computed from.
pub fn clip_update(update: &mut [f32], clip_norm: f64) -> Result<f64> {
    check_positive("clip norm", clip_norm)?;
    check_finite(update)?;
    let norm = l2_norm(update);
    if norm <= clip_norm {
        return Ok(norm);
    }
    let mut scale = clip_norm / norm;
    for _ in 0..CLIP_RETRIES {
        for x in update.iter_mut() {
            *x = (f64::from(*x) * scale) as f32;
        }
        if l2_norm(update) <= clip_norm {
            return Ok(norm);
        }
        // Rounding pushed it just over: shrink by a relative 2^-20 and retry.
        scale = 1.0 - f64::powi(2.0, -20);
    }
    // Only reachable with a clip norm so small that f32 subnormals cannot
    // shrink further; the zero vector is the one safe answer.
    update.iter_mut().for_each(|x| *x = 0.0);
    Ok(norm)
}

/// Shrink attempts before [`clip_update`] falls back to zeroing.
const CLIP_RETRIES: u32 = 64;

/// Adds independent Gaussian noise N(0, `std_dev`²) to every coordinate.
///
/// Sampling happens in `f64` and is rounded to `f32` once per coordinate.
pub fn add_gaussian_noise<R: Rng + ?Sized>(
    values: &mut [f32],
    std_dev: f64,
    rng: &mut R,
) -> Result<()> {
    if !(std_dev.is_finite() && std_dev >= 0.0) {
        return Err(Error::invalid(
            "noise standard deviation",
            format!("{std_dev} is not finite and non-negative"),
        ));
    }
    for x in values.iter_mut() {
        let n: f64 = StandardNormal.sample(rng);
        *x = (f64::from(*x) + std_dev * n) as f32;
    }
    Ok(())
}

/// The DP parameters of a job: clipping bound `S` and noise multiplier `z`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// L2 bound `S` each client update is clipped to.
    pub clip_norm: f64,
    /// Noise multiplier `z`; the noise on the sum has σ = z·S.
    pub noise_multiplier: f64,
}

impl DpConfig {
    /// Checks that both parameters are finite and positive.
    pub fn validate(&self) -> Result<()> {
        check_positive("clip norm", self.clip_norm)?;
        check_positive("noise multiplier", self.noise_multiplier)
    }

    /// Standard deviation of the noise added to the sum: σ = z·S.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }
}

/// DP-FedAvg's server step: clips each update to `S`, sums them, adds
/// N(0, (z·S)²) per coordinate and divides by `denominator`.
///
/// `denominator` must not depend on the data: pass the *expected* number of
/// participants `q·N` under Poisson sampling, or the fixed sample size `m`
/// under fixed-size sampling. Dividing by the actual count would leak it.
/// Every client counts equally (sample-count weights would change the
/// sensitivity). Updates should be model deltas (local − global), screened
/// beforehand with [`crate::aggregate::screen`].
pub fn dp_fedavg<R: Rng + ?Sized>(
    updates: &[ClientUpdate],
    config: &DpConfig,
    denominator: f64,
    rng: &mut R,
) -> Result<Vec<f32>> {
    config.validate()?;
    check_positive("denominator", denominator)?;
    // Also refuses duplicate senders: a client counted twice would double
    // the sensitivity the noise was calibrated for.
    let len = crate::aggregate::validate(updates)?;
    let mut sum = vec![0f64; len];
    let mut clipped = Vec::with_capacity(len);
    for u in updates {
        clipped.clear();
        clipped.extend_from_slice(&u.params);
        clip_update(&mut clipped, config.clip_norm)?;
        for (s, &c) in sum.iter_mut().zip(&clipped) {
            *s += f64::from(c);
        }
    }
    let std_dev = config.noise_std();
    Ok(sum
        .iter()
        .map(|&s| {
            let n: f64 = StandardNormal.sample(rng);
            ((s + std_dev * n) / denominator) as f32
        })
        .collect())
}

/// A uniform draw from `0..bound` (0 when `bound <= 1`) using only
/// `next_u64`, by rejection so it is unbiased. Written out here (rather than
/// using `rand`'s range sampling) so the participants chosen for a seed never
/// change with a `rand` release.
pub(crate) fn uniform_below<R: RngCore + ?Sized>(rng: &mut R, bound: u64) -> u64 {
    if bound <= 1 {
        return 0;
    }
    // 2^64 mod bound: draws below it would over-represent small results.
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let r = rng.next_u64();
        if r >= threshold {
            return r % bound;
        }
    }
}

/// A uniform draw from `[0, 1)` with 53 bits of precision.
fn unit_f64<R: RngCore + ?Sized>(rng: &mut R) -> f64 {
    (rng.next_u64() >> 11) as f64 * f64::powi(2.0, -53)
}

/// Poisson sampling: each of `n` clients takes part independently with
/// probability `q`. Returns the chosen indices in increasing order.
///
/// The result depends only on the RNG's `next_u64` stream, so with a
/// [`crate::SeededRng`] it is a stable function of the seed.
pub fn poisson_sample<R: RngCore + ?Sized>(n: usize, q: f64, rng: &mut R) -> Result<Vec<usize>> {
    if !(0.0..=1.0).contains(&q) {
        return Err(Error::invalid(
            "sample rate",
            format!("{q} is not in [0, 1]"),
        ));
    }
    Ok((0..n).filter(|_| unit_f64(rng) < q).collect())
}

/// Fixed-size sampling: `m` of `n` clients uniformly without replacement
/// (a partial Fisher–Yates shuffle). Returns the indices in increasing order.
///
/// Note that the accountant's bounds are for Poisson sampling; use them
/// with `q = m / n` only as the approximation it is, or use Poisson sampling.
pub fn fixed_size_sample<R: RngCore + ?Sized>(
    n: usize,
    m: usize,
    rng: &mut R,
) -> Result<Vec<usize>> {
    if m > n {
        return Err(Error::TooFewClients {
            rule: "fixed-size sampling",
            needed: m,
            got: n,
        });
    }
    let mut pool: Vec<usize> = (0..n).collect();
    for i in 0..m {
        let j = i + uniform_below(rng, (n - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(m);
    pool.sort_unstable();
    Ok(pool)
}

/// The RDP orders the accountant evaluates by default: 1.1 to 10.9 in steps
/// of 0.1, every integer from 11 to 64, then 80, 96, 128, 160, 192, 256.
///
/// The fine grid below 11 is the one commonly used by DP libraries (Opacus,
/// TensorFlow Privacy), so ε figures are comparable with theirs and with the
/// project's anchor (z = 1, 30 full-participation rounds, δ = 1e-5 gives
/// ε = 39.83, attained at α = 1.9). Any order gives a valid bound; a finer
/// grid would give slightly smaller ε (39.79 at the continuous optimum for
/// that anchor). The large orders matter for small ε and large `z`.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (11..=109).map(|t| f64::from(t) / 10.0).collect();
    orders.extend((11..=64).map(f64::from));
    orders.extend([80.0, 96.0, 128.0, 160.0, 192.0, 256.0]);
    orders
}

/// Numerically stable `ln(e^a + e^b)`.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `ln(erfc(x))` without underflow for large `x`.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        // erfc(25) ≈ 8e-274 is still a normal double, so the direct form
        // is exact enough up to here.
        libm::erfc(x).ln()
    } else {
        // Asymptotic series (Abramowitz & Stegun 7.1.23):
        // erfc(x) = e^{-x²}/(x√π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) + …);
        // the next term is below 1e-10 relative at x = 25.
        let x2 = x * x;
        let series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
        -x2 - (x * std::f64::consts::PI.sqrt()).ln() + series.ln()
    }
}

/// `ln A_α` for integer α (Mironov et al. 2019, Section 3.3, integer case):
/// `A_α = Σ_{k=0}^{α} C(α,k) (1−q)^{α−k} q^k exp((k²−k)/(2σ²))`, summed in
/// log space so large α and small σ do not overflow.
fn log_a_integer(q: f64, sigma: f64, alpha: u32) -> f64 {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let a = f64::from(alpha);
    let mut log_binom = 0.0f64;
    let mut acc = f64::NEG_INFINITY;
    for k in 0..=alpha {
        let kf = f64::from(k);
        if k > 0 {
            log_binom += (a - kf + 1.0).ln() - kf.ln();
        }
        let term = log_binom + kf * ln_q + (a - kf) * ln_1mq + (kf * kf - kf) / two_var;
        acc = log_add(acc, term);
    }
    acc
}

/// Terms are summed until both fall below e^-30 (A_α ≥ 1, so that is below
/// 1e-13 relative); past the cap an order is treated as giving no bound.
const FRACTIONAL_TERM_CUTOFF: f64 = -30.0;
const FRACTIONAL_MAX_TERMS: u32 = 100_000;

/// `ln A_α` for fractional α (Mironov et al. 2019, Section 3.3, fractional
/// case): `A_α = A₀ + A₁` with `z₀ = σ² ln(1/q − 1) + 1/2` and
///
/// `A₀ = Σ_k C(α,k) q^k (1−q)^{α−k} exp((k²−k)/(2σ²)) · ½ erfc((k − z₀)/(√2σ))`
///
/// `A₁ = Σ_k C(α,k) q^{α−k} (1−q)^k exp(((α−k)²−(α−k))/(2σ²)) · ½ erfc((z₀ − (α−k))/(√2σ))`
///
/// over k = 0, 1, … with generalized binomial coefficients, whose signs
/// alternate once k exceeds α. Positive and negative terms are summed in
/// separate log-sum-exps and subtracted at the end. Returns +∞ (no bound
/// from this order) if the series fails to converge.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let erfc_scale = std::f64::consts::SQRT_2 * sigma;
    let ln_half = 0.5f64.ln();
    let (mut pos, mut neg) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let mut log_binom = 0.0f64;
    let mut positive = true;
    for k in 0..FRACTIONAL_MAX_TERMS {
        let kf = f64::from(k);
        if k > 0 {
            // C(α,k) = C(α,k−1)·(α−k+1)/k.
            let factor = alpha - kf + 1.0;
            if factor == 0.0 {
                // Integer α: every later coefficient is zero.
                break;
            }
            if factor < 0.0 {
                positive = !positive;
            }
            log_binom += factor.abs().ln() - kf.ln();
        }
        let j = alpha - kf;
        let s0 = log_binom
            + kf * ln_q
            + j * ln_1mq
            + (kf * kf - kf) / two_var
            + ln_half
            + log_erfc((kf - z0) / erfc_scale);
        let s1 = log_binom
            + j * ln_q
            + kf * ln_1mq
            + (j * j - j) / two_var
            + ln_half
            + log_erfc((z0 - j) / erfc_scale);
        let term = log_add(s0, s1);
        if positive {
            pos = log_add(pos, term);
        } else {
            neg = log_add(neg, term);
        }
        if kf > alpha && s0.max(s1) < FRACTIONAL_TERM_CUTOFF {
            if neg == f64::NEG_INFINITY {
                return pos;
            }
            if neg >= pos {
                return f64::INFINITY;
            }
            return pos + (-(neg - pos).exp()).ln_1p();
        }
    }
    if neg == f64::NEG_INFINITY {
        // Only reached for integer α, whose finite sum ended early.
        return pos;
    }
    f64::INFINITY
}

/// Rényi DP of one application of the Poisson-subsampled Gaussian mechanism
/// with sample rate `q` and noise multiplier `z` (σ = z in units of the
/// sensitivity), at order `alpha > 1`.
///
/// `q = 0` costs nothing; `q = 1` is the plain Gaussian mechanism, `α/(2z²)`;
/// otherwise `ln(A_α)/(α − 1)` from Mironov et al. 2019, exact for integer
/// α and by the convergent series for fractional α. A result of +∞ means
/// this order gives no bound.
pub fn rdp_sampled_gaussian(q: f64, z: f64, alpha: f64) -> Result<f64> {
    check_rdp_args(q, z)?;
    check_order(alpha)?;
    Ok(rdp_unchecked(q, z, alpha))
}

/// Highest RDP order accepted; the integer sum costs O(α) per round, and
/// orders beyond a few hundred never give the best bound in practice.
pub const MAX_ORDER: f64 = 4096.0;

fn check_order(alpha: f64) -> Result<()> {
    if alpha.is_finite() && alpha > 1.0 && alpha <= MAX_ORDER {
        Ok(())
    } else {
        Err(Error::invalid(
            "RDP order",
            format!("{alpha} is not in (1, {MAX_ORDER}]"),
        ))
    }
}

fn check_rdp_args(q: f64, z: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&q) {
        return Err(Error::invalid(
            "sample rate",
            format!("{q} is not in [0, 1]"),
        ));
    }
    check_positive("noise multiplier", z)
}

fn rdp_unchecked(q: f64, z: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if q == 1.0 {
        return alpha / (2.0 * z * z);
    }
    // Orders are capped at MAX_ORDER, so the integer conversion is exact.
    let log_a = if alpha.fract() == 0.0 {
        log_a_integer(q, z, alpha as u32)
    } else {
        log_a_fractional(q, z, alpha)
    };
    // A_α ≥ 1 in exact arithmetic; clamp rounding noise below zero.
    (log_a / (alpha - 1.0)).max(0.0)
}

/// (ε, δ) reached, with the RDP order that gave the tightest bound.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    /// ε of the (ε, δ)-DP guarantee.
    pub epsilon: f64,
    /// δ of the guarantee.
    pub delta: f64,
    /// The RDP order the minimum was attained at (`None` when nothing has
    /// been spent, or no order gives a finite bound).
    pub order: Option<f64>,
}

/// Converts accumulated RDP at each order to (ε, δ), taking the best order.
///
/// Uses `ε = rdp − (ln δ + ln α)/(α − 1) + ln((α − 1)/α)` (Balle et al. 2020,
/// Theorem 21; the form Opacus' `get_privacy_spent` uses), which is tighter
/// than the classic `rdp + ln(1/δ)/(α − 1)`. If no privacy has been spent
/// (all RDP zero) ε is 0. ε is +∞ if no order gives a finite bound.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<PrivacySpent> {
    convert(orders, rdp, delta, |r, a, ln_delta| {
        r - (ln_delta + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln()
    })
}

/// The classic RDP-to-DP conversion, `ε = rdp + ln(1/δ)/(α − 1)` (Mironov
/// 2017, "Rényi Differential Privacy", Proposition 3), minimised over the
/// orders. Always looser than [`epsilon_from_rdp`]; kept to compare with
/// tools and papers that report it.
pub fn epsilon_from_rdp_classic(orders: &[f64], rdp: &[f64], delta: f64) -> Result<PrivacySpent> {
    convert(orders, rdp, delta, |r, a, ln_delta| {
        r - ln_delta / (a - 1.0)
    })
}

fn convert(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
    bound: impl Fn(f64, f64, f64) -> f64,
) -> Result<PrivacySpent> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(Error::invalid("delta", format!("{delta} is not in (0, 1)")));
    }
    if orders.len() != rdp.len() {
        return Err(Error::LengthMismatch {
            client: None,
            expected: orders.len(),
            found: rdp.len(),
        });
    }
    for &a in orders {
        check_order(a)?;
    }
    if rdp.iter().any(|r| r.is_nan() || *r < 0.0) {
        return Err(Error::invalid("RDP", "negative or NaN"));
    }
    if rdp.iter().all(|&r| r == 0.0) {
        return Ok(PrivacySpent {
            epsilon: 0.0,
            delta,
            order: None,
        });
    }
    let ln_delta = delta.ln();
    let mut best = PrivacySpent {
        epsilon: f64::INFINITY,
        delta,
        order: None,
    };
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = bound(r, a, ln_delta);
        if eps.is_finite() && eps < best.epsilon {
            best.epsilon = eps;
            best.order = Some(a);
        }
    }
    // The bound can dip below zero for tiny RDP; ε = 0 is then the truth.
    best.epsilon = best.epsilon.max(0.0);
    Ok(best)
}

/// Tracks the privacy spent by a training job across rounds, each with its
/// own sample rate `q` and noise multiplier `z`, and refuses rounds that
/// would exceed a budget.
///
/// RDP composes additively, so the accountant keeps one running total per
/// order and converts to (ε, δ) on demand.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AccountantState", into = "AccountantState")]
pub struct Accountant {
    delta: f64,
    orders: Vec<f64>,
    rdp: Vec<f64>,
    rounds: u64,
}

/// Serialized form of [`Accountant`], validated on the way in.
#[derive(Serialize, Deserialize)]
struct AccountantState {
    delta: f64,
    orders: Vec<f64>,
    rdp: Vec<f64>,
    rounds: u64,
}

impl TryFrom<AccountantState> for Accountant {
    type Error = Error;

    fn try_from(s: AccountantState) -> Result<Self> {
        let mut acc = Accountant::with_orders(s.delta, s.orders)?;
        if acc.orders.len() != s.rdp.len() {
            return Err(Error::LengthMismatch {
                client: None,
                expected: acc.orders.len(),
                found: s.rdp.len(),
            });
        }
        if s.rdp.iter().any(|r| r.is_nan() || *r < 0.0) {
            return Err(Error::invalid("accumulated RDP", "negative or NaN"));
        }
        acc.rdp = s.rdp;
        acc.rounds = s.rounds;
        Ok(acc)
    }
}

impl From<Accountant> for AccountantState {
    fn from(a: Accountant) -> Self {
        AccountantState {
            delta: a.delta,
            orders: a.orders,
            rdp: a.rdp,
            rounds: a.rounds,
        }
    }
}

impl Accountant {
    /// An accountant for target `delta` over [`default_orders`].
    pub fn new(delta: f64) -> Result<Self> {
        Self::with_orders(delta, default_orders())
    }

    /// An accountant over a custom set of orders (each in `(1, MAX_ORDER]`).
    pub fn with_orders(delta: f64, orders: Vec<f64>) -> Result<Self> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(Error::invalid("delta", format!("{delta} is not in (0, 1)")));
        }
        if orders.is_empty() {
            return Err(Error::invalid("RDP orders", "none given"));
        }
        for &a in &orders {
            check_order(a)?;
        }
        let rdp = vec![0.0; orders.len()];
        Ok(Accountant {
            delta,
            orders,
            rdp,
            rounds: 0,
        })
    }

    /// The δ this accountant reports ε for.
    pub fn delta(&self) -> f64 {
        self.delta
    }

    /// Rounds recorded so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// The RDP orders evaluated.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Accumulated RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// RDP of `rounds` rounds at (q, z), per order.
    fn rdp_of(&self, q: f64, z: f64, rounds: u64) -> Result<Vec<f64>> {
        check_rdp_args(q, z)?;
        Ok(self
            .orders
            .iter()
            .map(|&a| rounds as f64 * rdp_unchecked(q, z, a))
            .collect())
    }

    /// Records one round with sample rate `q` and noise multiplier `z` and
    /// returns the privacy spent so far.
    pub fn record_round(&mut self, q: f64, z: f64) -> Result<PrivacySpent> {
        self.record_rounds(q, z, 1)
    }

    /// Records `rounds` identical rounds at (q, z).
    pub fn record_rounds(&mut self, q: f64, z: f64, rounds: u64) -> Result<PrivacySpent> {
        let add = self.rdp_of(q, z, rounds)?;
        for (r, a) in self.rdp.iter_mut().zip(add) {
            *r += a;
        }
        self.rounds += rounds;
        self.spent()
    }

    /// Privacy spent by the rounds recorded so far.
    pub fn spent(&self) -> Result<PrivacySpent> {
        epsilon_from_rdp(&self.orders, &self.rdp, self.delta)
    }

    /// The privacy that would be spent after `rounds` more rounds at (q, z),
    /// without recording them.
    pub fn spent_after(&self, q: f64, z: f64, rounds: u64) -> Result<PrivacySpent> {
        let add = self.rdp_of(q, z, rounds)?;
        let total: Vec<f64> = self.rdp.iter().zip(add).map(|(r, a)| r + a).collect();
        epsilon_from_rdp(&self.orders, &total, self.delta)
    }

    /// Whether one more round at (q, z) keeps ε within `budget_epsilon`.
    /// Invalid parameters count as "no".
    pub fn can_run_round(&self, budget_epsilon: f64, q: f64, z: f64) -> bool {
        matches!(self.spent_after(q, z, 1), Ok(s) if s.epsilon <= budget_epsilon)
    }

    /// Records a round at (q, z) only if it keeps ε within `budget_epsilon`;
    /// otherwise records nothing and returns [`Error::BudgetExceeded`].
    pub fn try_record_round(
        &mut self,
        budget_epsilon: f64,
        q: f64,
        z: f64,
    ) -> Result<PrivacySpent> {
        let after = self.spent_after(q, z, 1)?;
        if after.epsilon > budget_epsilon {
            return Err(Error::BudgetExceeded {
                budget: budget_epsilon,
                would_be: after.epsilon,
            });
        }
        self.record_round(q, z)
    }
}

// ---------------------------------------------------------------------------
// Planning: how many rounds a budget allows, how much noise a target needs
// ---------------------------------------------------------------------------

/// Most rounds [`rounds_within_budget`] searches; beyond this the answer is
/// "practically unlimited" and the search would only cost time.
pub const MAX_PLANNED_ROUNDS: u64 = 1 << 40;

/// ε after `rounds` rounds at sample rate `q` and noise multiplier `z`,
/// from a fresh accountant.
fn epsilon_after(q: f64, z: f64, delta: f64, rounds: u64) -> Result<f64> {
    Ok(Accountant::new(delta)?.spent_after(q, z, rounds)?.epsilon)
}

/// The most rounds at sample rate `q` and noise multiplier `z` whose ε
/// stays within `budget` (0 if not even one does), or `None` if more than
/// [`MAX_PLANNED_ROUNDS`] fit.
pub fn rounds_within_budget(q: f64, z: f64, delta: f64, budget: f64) -> Result<Option<u64>> {
    if !(budget.is_finite() && budget > 0.0) {
        return Err(Error::InvalidArgument {
            what: "privacy budget",
            detail: format!("{budget} is not a finite positive number"),
        });
    }
    // ε grows monotonically with the number of rounds: double until the
    // budget is exceeded, then bisect.
    let fits = |r: u64| -> Result<bool> { Ok(epsilon_after(q, z, delta, r)? <= budget) };
    if !fits(1)? {
        return Ok(Some(0));
    }
    let mut lo = 1u64;
    let mut hi = 2u64;
    while fits(hi)? {
        if hi >= MAX_PLANNED_ROUNDS {
            return Ok(None);
        }
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// The smallest noise multiplier (to a relative precision of 10^-3) for
/// which `rounds` rounds at sample rate `q` stay within `epsilon`.
pub fn noise_for_epsilon(q: f64, rounds: u64, delta: f64, epsilon: f64) -> Result<f64> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(Error::InvalidArgument {
            what: "target epsilon",
            detail: format!("{epsilon} is not a finite positive number"),
        });
    }
    let eps = |z: f64| epsilon_after(q, z, delta, rounds);
    let (mut lo, mut hi) = (0.05f64, 1.0f64);
    while eps(hi)? > epsilon {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return Err(Error::InvalidArgument {
                what: "target epsilon",
                detail: format!("no noise multiplier up to 10^4 keeps ε within {epsilon}"),
            });
        }
    }
    // ε falls as z grows: bisect.
    while (hi - lo) / hi > 1e-3 {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? > epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, rng_from_seed};

    fn eps(q: f64, z: f64, rounds: u64, delta: f64) -> PrivacySpent {
        let mut acc = Accountant::new(delta).expect("accountant");
        acc.record_rounds(q, z, rounds).expect("record")
    }

    /// The project's FL+DP anchor: z = 1, 30 rounds, every client every
    /// round, δ = 1e-5 gives ε = 39.83.
    #[test]
    fn anchor_full_participation() {
        let s = eps(1.0, 1.0, 30, 1e-5);
        assert_eq!(format!("{:.2}", s.epsilon), "39.83");
        assert!((s.epsilon - 39.831_754_019_056).abs() < 1e-9, "{s:?}");
        assert_eq!(s.order, Some(1.9));
    }

    /// With q = 1 the per-order RDP is T·α/(2z²), so ε is a closed-form
    /// minimum over the grid; compare against it directly.
    #[test]
    fn full_participation_matches_closed_form() {
        for (z, rounds, delta) in [
            (2.0, 10, 1e-5),
            (0.5, 1, 1e-6),
            (1.3, 250, 1e-7),
            (5.0, 3, 1e-5),
        ] {
            let want = default_orders()
                .into_iter()
                .map(|a: f64| {
                    rounds as f64 * a / (2.0 * z * z) - (f64::ln(delta) + a.ln()) / (a - 1.0)
                        + ((a - 1.0) / a).ln()
                })
                .fold(f64::INFINITY, f64::min)
                .max(0.0);
            let got = eps(1.0, z, rounds, delta).epsilon;
            assert!(
                (got - want).abs() < 1e-12,
                "z={z} T={rounds}: {got} vs {want}"
            );
        }
        // Two values worked out by hand from that formula.
        assert!((eps(1.0, 2.0, 10, 1e-5).epsilon - 8.079_406_222_420).abs() < 1e-9);
        assert!((eps(1.0, 0.5, 1, 1e-6).epsilon - 11.688_626_799_166).abs() < 1e-9);
    }

    /// α = 2 has the closed form A₂ = 1 + q²(e^{1/σ²} − 1), and α = 3
    /// expands to four binomial terms.
    #[test]
    fn integer_orders_closed_forms() {
        for (q, z) in [(0.1f64, 1.0f64), (0.01, 0.7), (0.5, 2.0), (0.999, 1.5)] {
            let a2 = (1.0 + q * q * ((1.0 / (z * z)).exp() - 1.0)).ln();
            let got = rdp_sampled_gaussian(q, z, 2.0).expect("rdp");
            assert!((got - a2).abs() < 1e-12 * a2.max(1.0), "q={q} z={z}");
            let e = |k: f64| ((k * k - k) / (2.0 * z * z)).exp();
            let a3 = (1.0 - q).powi(3)
                + 3.0 * q * (1.0 - q).powi(2)
                + 3.0 * q * q * (1.0 - q) * e(2.0)
                + q.powi(3) * e(3.0);
            let got = rdp_sampled_gaussian(q, z, 3.0).expect("rdp");
            assert!(
                (got - a3.ln() / 2.0).abs() < 1e-12 * got.max(1.0),
                "q={q} z={z}"
            );
        }
    }

    /// The fractional series, evaluated at an integer order, must agree with
    /// the exact finite sum.
    #[test]
    fn fractional_series_agrees_with_integer_sum() {
        for (q, z, a) in [
            (0.1, 1.0, 2u32),
            (0.01, 1.1, 8),
            (0.3, 0.8, 5),
            (0.05, 2.0, 32),
        ] {
            let int = log_a_integer(q, z, a);
            let frac = log_a_fractional(q, z, f64::from(a));
            assert!(
                (int - frac).abs() < 1e-10 * int.abs().max(1e-3),
                "{q} {z} {a}: {int} vs {frac}"
            );
        }
    }

    /// `A_α = E_{x∼N(0,σ²)}[((1−q) + q·e^{(2x−1)/(2σ²)})^α]` (the definition
    /// in Mironov et al. 2019), integrated numerically by Simpson's rule,
    /// against the series for fractional orders.
    #[test]
    fn fractional_orders_match_numerical_integration() {
        for (q, z, a) in [
            (0.1, 1.0, 2.5),
            (0.01, 1.1, 1.5),
            (0.3, 0.8, 4.7),
            (0.05, 2.0, 10.3),
        ] {
            let (lo, hi, n) = (-40.0 * z, 40.0 * z + a + 5.0, 20_000);
            let h = (hi - lo) / f64::from(n);
            let mut total = 0.0;
            for i in 0..=n {
                let x = lo + f64::from(i) * h;
                let w = if i == 0 || i == n {
                    1.0
                } else if i % 2 == 1 {
                    4.0
                } else {
                    2.0
                };
                let ratio = (1.0 - q) + q * ((2.0 * x - 1.0) / (2.0 * z * z)).exp();
                total += w * (-x * x / (2.0 * z * z) + a * ratio.ln()).exp();
            }
            let integral = total * h / 3.0 / (z * (2.0 * std::f64::consts::PI).sqrt());
            let want = integral.ln() / (a - 1.0);
            let got = rdp_sampled_gaussian(q, z, a).expect("rdp");
            assert!(
                (got - want).abs() < 1e-7 * want.max(1e-6),
                "{q} {z} {a}: {got} vs {want}"
            );
        }
    }

    /// Subsampled reference points, computed independently with the same
    /// order grid (series and numerical integration agreeing to 1e-9).
    #[test]
    fn subsampled_reference_points() {
        for (q, z, rounds, want) in [
            (0.1, 1.0, 100, 7.899_255_002_434),
            (0.01, 1.1, 1000, 1.711_770_091_221),
            (0.05, 0.8, 200, 8.731_829_932_370),
            (256.0 / 60000.0, 1.1, 14062, 2.596_555_868_963),
        ] {
            let got = eps(q, z, rounds, 1e-5).epsilon;
            assert!(
                (got - want).abs() < 1e-6,
                "q={q} z={z} T={rounds}: {got} vs {want}"
            );
        }
    }

    /// Published values from TensorFlow Privacy's accountant tests, which
    /// that project checks against multi-precision numerical integration:
    /// RDP of `steps` applications at the given orders.
    #[test]
    fn matches_tensorflow_privacy_rdp_values() {
        let got = 10.0 * rdp_sampled_gaussian(0.1, 2.0, 5.0).expect("rdp");
        assert!((got - 0.07737).abs() < 5e-6, "{got}");
        for (order, want) in [
            (1.5, 0.00065),
            (2.5, 0.001085),
            (5.0, 0.00218075),
            (50.0, 0.023846),
            (100.0, 167.416307),
        ] {
            let got = 50.0 * rdp_sampled_gaussian(0.01, 2.5, order).expect("rdp");
            assert!((got - want).abs() < 5e-6, "order {order}: {got} vs {want}");
        }
    }

    /// The same suite's (ε, δ) figures use the classic conversion; with the
    /// improved one the same RDP gives the smaller ε derived alongside.
    #[test]
    fn matches_tensorflow_privacy_epsilons() {
        let orders: Vec<f64> = (2..=32).map(f64::from).collect();
        let mut acc = Accountant::with_orders(1e-5, orders.clone()).expect("acc");
        acc.record_rounds(0.01, 4.0, 10_000).expect("record");
        let classic = epsilon_from_rdp_classic(&orders, acc.rdp(), 1e-5).expect("eps");
        assert!((classic.epsilon - 1.258575).abs() < 5e-6, "{classic:?}");
        assert_eq!(classic.order, Some(20.0));
        let improved = acc.spent().expect("eps");
        assert!(
            (improved.epsilon - 1.035_490_066).abs() < 1e-6,
            "{improved:?}"
        );
        assert_eq!(improved.order, Some(17.0));

        // Composition of two different mechanisms.
        let orders = vec![
            1.25, 1.5, 1.75, 2., 2.5, 3., 4., 5., 6., 7., 8., 10., 12., 14., 16., 20., 24., 28.,
            32., 64., 256.,
        ];
        let mut acc = Accountant::with_orders(1e-5, orders.clone()).expect("acc");
        acc.record_rounds(1e-4, 0.4, 40_000).expect("record");
        acc.record_rounds(0.1, 2.0, 100).expect("record");
        let classic = epsilon_from_rdp_classic(&orders, acc.rdp(), 1e-5).expect("eps");
        assert!((classic.epsilon - 8.509656).abs() < 5e-6, "{classic:?}");
        assert_eq!(classic.order, Some(2.5));
        let improved = acc.spent().expect("eps");
        assert!(
            (improved.epsilon - 7.387_969_934).abs() < 1e-6,
            "{improved:?}"
        );
    }

    #[test]
    fn sanity_properties() {
        let delta = 1e-5;
        let mut last = 0.0;
        for rounds in [1, 2, 5, 10, 50, 100] {
            let e = eps(0.05, 1.0, rounds, delta).epsilon;
            assert!(e > last, "not increasing in rounds at {rounds}");
            last = e;
        }
        let mut last = f64::INFINITY;
        for z in [0.5, 0.8, 1.0, 1.5, 3.0] {
            let e = eps(0.05, z, 50, delta).epsilon;
            assert!(e < last, "not decreasing in z at {z}");
            last = e;
        }
        let mut last = 0.0;
        for q in [0.001, 0.01, 0.1, 0.5, 1.0] {
            let e = eps(q, 1.0, 50, delta).epsilon;
            assert!(e > last, "not increasing in q at {q}");
            last = e;
        }
        assert_eq!(eps(0.0, 1.0, 100, delta).epsilon, 0.0);
        assert!(rdp_sampled_gaussian(0.1, 1.0, 1.0).is_err());
        assert!(rdp_sampled_gaussian(0.1, 1.0, MAX_ORDER * 2.0).is_err());
        assert!(rdp_sampled_gaussian(1.1, 1.0, 2.0).is_err());
        assert!(rdp_sampled_gaussian(0.1, 0.0, 2.0).is_err());
        assert!(Accountant::with_orders(delta, vec![2.0, f64::INFINITY]).is_err());
        assert!(Accountant::new(0.0).is_err());
        let fresh = Accountant::new(delta).expect("acc");
        assert_eq!(fresh.spent().expect("spent").epsilon, 0.0);
    }

    #[test]
    fn accountant_varying_rounds_and_budget() {
        let mut acc = Accountant::new(1e-5).expect("acc");
        acc.record_round(0.1, 1.0).expect("r1");
        acc.record_round(0.2, 1.5).expect("r2");
        let mut twice = Accountant::new(1e-5).expect("acc");
        twice.record_round(0.2, 1.5).expect("r");
        twice.record_round(0.1, 1.0).expect("r");
        // Composition is order-independent (up to float summation order).
        let (x, y) = (acc.spent().expect("s"), twice.spent().expect("s"));
        assert!((x.epsilon - y.epsilon).abs() < 1e-12 && x.order == y.order);
        assert_eq!(acc.rounds(), 2);

        let mut acc = Accountant::new(1e-5).expect("acc");
        let budget = 10.0;
        let mut n = 0;
        while acc.can_run_round(budget, 1.0, 1.0) {
            let s = acc
                .try_record_round(budget, 1.0, 1.0)
                .expect("within budget");
            assert!(s.epsilon <= budget);
            n += 1;
        }
        assert!(n > 0);
        let before = acc.clone();
        let e = acc
            .try_record_round(budget, 1.0, 1.0)
            .expect_err("over budget");
        assert_eq!(e.kind(), ErrorKind::BudgetExhausted);
        assert_eq!(acc, before, "a refused round must not be recorded");
        assert!(!acc.can_run_round(budget, 1.0, f64::NAN));

        // Binary encodings round-trip exactly (JSON may lose the last bit).
        let bytes = postcard::to_stdvec(&acc).expect("ser");
        let back: Accountant = postcard::from_bytes(&bytes).expect("de");
        assert_eq!(back, acc);
        let mut value = serde_json::to_value(&acc).expect("ser");
        value["delta"] = serde_json::json!(2.0);
        assert!(serde_json::from_value::<Accountant>(value.clone()).is_err());
        value["delta"] = serde_json::json!(1e-5);
        value["rdp"] = serde_json::json!([1.0]);
        assert!(serde_json::from_value::<Accountant>(value).is_err());
    }

    #[test]
    fn clipping_bounds_norm() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip_update(&mut v, 1.0).expect("clip"), 5.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert!(l2_norm(&v) <= 1.0);
        let mut small = vec![0.1f32, 0.1];
        clip_update(&mut small, 1.0).expect("clip");
        assert_eq!(small, vec![0.1, 0.1]);
        let mut rng = rng_from_seed([7; 32]);
        for _ in 0..50 {
            let mut v: Vec<f32> = (0..1000).map(|_| rng.random_range(-10.0..10.0)).collect();
            clip_update(&mut v, 0.37).expect("clip");
            assert!(l2_norm(&v) <= 0.37);
        }
        // A clip norm below f32 resolution still yields a bounded vector.
        let mut v = vec![1e-45f32; 4];
        clip_update(&mut v, 1e-46).expect("clip");
        assert!(l2_norm(&v) <= 1e-46);
        assert!(clip_update(&mut [f32::NAN], 1.0).is_err());
        assert!(clip_update(&mut [1.0], 0.0).is_err());
    }

    #[test]
    fn noise_has_the_right_scale_and_is_seeded() {
        let mut a = vec![0f32; 20_000];
        add_gaussian_noise(&mut a, 2.0, &mut rng_from_seed([1; 32])).expect("noise");
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / a.len() as f64;
        let var = a
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "{}", var.sqrt());
        let mut b = vec![0f32; 20_000];
        add_gaussian_noise(&mut b, 2.0, &mut rng_from_seed([1; 32])).expect("noise");
        assert_eq!(a, b);
    }

    #[test]
    fn dp_fedavg_clips_sums_and_noises() {
        use crate::aggregate::ClientId;
        let us = vec![
            ClientUpdate::new(ClientId([1; 32]), vec![3.0, 4.0], 1),
            ClientUpdate::new(ClientId([2; 32]), vec![0.0, 0.5], 1),
            ClientUpdate::new(ClientId([3; 32]), vec![1e6, 0.0], 1),
        ];
        // Vanishing noise: the result is the clipped mean.
        let tiny = DpConfig {
            clip_norm: 1.0,
            noise_multiplier: 1e-12,
        };
        let got = dp_fedavg(&us, &tiny, 3.0, &mut rng_from_seed([0; 32])).expect("dp");
        let want = [(0.6 + 0.0 + 1.0) / 3.0, (0.8 + 0.5 + 0.0) / 3.0];
        assert!(
            (got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6,
            "{got:?}"
        );
        let cfg = DpConfig {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
        };
        let x = dp_fedavg(&us, &cfg, 3.0, &mut rng_from_seed([9; 32])).expect("dp");
        let y = dp_fedavg(&us, &cfg, 3.0, &mut rng_from_seed([9; 32])).expect("dp");
        assert_eq!(x, y);
        assert_ne!(x, got);
        assert!(dp_fedavg(&[], &cfg, 3.0, &mut rng_from_seed([0; 32])).is_err());
        let twice = vec![us[0].clone(), us[0].clone()];
        let e = dp_fedavg(&twice, &cfg, 2.0, &mut rng_from_seed([0; 32])).expect_err("dup");
        assert_eq!(e.kind(), ErrorKind::BadUpdate);
        assert!(dp_fedavg(&us, &cfg, 0.0, &mut rng_from_seed([0; 32])).is_err());
    }

    #[test]
    fn sampling_is_deterministic_and_well_formed() {
        let a = poisson_sample(1000, 0.1, &mut rng_from_seed([3; 32])).expect("poisson");
        let b = poisson_sample(1000, 0.1, &mut rng_from_seed([3; 32])).expect("poisson");
        assert_eq!(a, b);
        assert!((50..150).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(poisson_sample(10, 1.5, &mut rng_from_seed([3; 32])).is_err());
        assert_eq!(
            poisson_sample(10, 1.0, &mut rng_from_seed([3; 32]))
                .expect("all")
                .len(),
            10
        );
        assert!(
            poisson_sample(10, 0.0, &mut rng_from_seed([3; 32]))
                .expect("none")
                .is_empty()
        );

        let f = fixed_size_sample(100, 10, &mut rng_from_seed([4; 32])).expect("fixed");
        assert_eq!(
            f,
            fixed_size_sample(100, 10, &mut rng_from_seed([4; 32])).expect("fixed")
        );
        assert_eq!(f.len(), 10);
        assert!(f.windows(2).all(|w| w[0] < w[1]) && f.iter().all(|&i| i < 100));
        assert_ne!(
            f,
            fixed_size_sample(100, 10, &mut rng_from_seed([5; 32])).expect("fixed")
        );
        assert!(fixed_size_sample(5, 6, &mut rng_from_seed([4; 32])).is_err());
        // Every client is picked about equally often.
        let mut counts = [0u32; 10];
        let mut rng = rng_from_seed([6; 32]);
        for _ in 0..2000 {
            for i in fixed_size_sample(10, 3, &mut rng).expect("fixed") {
                counts[i] += 1;
            }
        }
        assert!(
            counts.iter().all(|&c| (500..700).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn planning_finds_the_boundary() {
        // Flower's anchor: q = 1, z = 1, δ = 1e-5 reaches ε = 39.83 after
        // 30 rounds.
        let n = rounds_within_budget(1.0, 1.0, 1e-5, 39.84)
            .expect("search")
            .expect("finite");
        assert_eq!(n, 30);
        let z = noise_for_epsilon(1.0, 30, 1e-5, 39.84).expect("z");
        assert!((z - 1.0).abs() < 2e-3, "{z}");
        assert_eq!(
            rounds_within_budget(1.0, 0.1, 1e-5, 0.01).expect("search"),
            Some(0)
        );
        assert!(rounds_within_budget(1.0, 1.0, 1e-5, f64::NAN).is_err());
        assert!(noise_for_epsilon(1.0, 30, 1e-5, 0.0).is_err());
    }
}
