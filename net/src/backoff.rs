//! Exponential backoff with jitter for redialling peers.

use std::time::Duration;

/// Exponential backoff: `initial * 2^attempt`, capped at `max`, with up to
/// 20% jitter subtracted so that many nodes restarted together do not
/// redial in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry).
    /// `jitter` is a caller-supplied uniform value in `[0, 1)`; keeping the
    /// randomness outside makes the schedule testable.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        let base = self.initial.saturating_mul(factor).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0) * 0.2;
        base.mul_f64(1.0 - jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_until_capped() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(1, 0.0), Duration::from_secs(2));
        assert_eq!(b.delay(3, 0.0), Duration::from_secs(8));
        assert_eq!(b.delay(4, 0.0), Duration::from_secs(10));
        assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_secs(10));
    }

    #[test]
    fn jitter_only_shortens_by_at_most_a_fifth() {
        let b = Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(60),
        };
        assert_eq!(
            b.delay(0, 0.999_999),
            Duration::from_secs(10).mul_f64(1.0 - 0.999_999 * 0.2)
        );
        assert!(b.delay(0, 5.0) >= Duration::from_secs(8));
        assert!(b.delay(0, -1.0) == Duration::from_secs(10));
    }
}
