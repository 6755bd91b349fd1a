//! A byte budget per peer identity across all protocols.
//!
//! Every inbound payload (direct messages, msg and learn requests, rpc,
//! gossip) is charged to the peer that sent it, from a token bucket that
//! refills at [`BUDGET_BYTES_PER_SEC`] up to [`BUDGET_BURST_BYTES`]. A peer
//! in deficit has its next direct streams refused unread and its requests
//! refused, and is penalised, until the bucket refills: one peer cannot
//! make this node process more than its share however it spreads the load
//! over protocols. The sizes are far above what consensus and training
//! need (a 16 MiB model update, 20,000 tx/s of 512 B is 10 MB/s), so only
//! a flood meets them. Pure: the caller passes the time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libp2p::PeerId;

/// Sustained inbound bytes per second one peer may send.
pub const BUDGET_BYTES_PER_SEC: u64 = 64 * 1024 * 1024;

/// Bytes one peer may send in a burst.
pub const BUDGET_BURST_BYTES: u64 = 256 * 1024 * 1024;

/// Peers with a bucket at once; a full bucket (one that has not spent
/// anything for a while) is what gets dropped, which loses nothing.
pub const MAX_BUDGETED_PEERS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Bytes available; negative when the peer overdrew (a message is
    /// charged after it was read).
    available: i64,
    updated: Instant,
}

/// The buckets, shared by the network task and the direct readers.
#[derive(Debug, Clone, Default)]
pub struct ByteBudgets {
    buckets: Arc<Mutex<HashMap<PeerId, Bucket>>>,
}

impl ByteBudgets {
    fn refill(bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated);
        let refill = (elapsed.as_secs_f64() * BUDGET_BYTES_PER_SEC as f64) as i64;
        bucket.available = bucket
            .available
            .saturating_add(refill)
            .min(BUDGET_BURST_BYTES as i64);
        bucket.updated = now;
    }

    /// Charges `bytes` from `peer` at `now`; `false` when the peer is (now)
    /// over its budget.
    pub fn charge(&self, peer: PeerId, bytes: usize, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUDGETED_PEERS && !buckets.contains_key(&peer) {
            for bucket in buckets.values_mut() {
                Self::refill(bucket, now);
            }
            buckets.retain(|_, b| b.available < BUDGET_BURST_BYTES as i64);
            if buckets.len() >= MAX_BUDGETED_PEERS {
                // Everyone is spending: the newcomer is not tracked, and
                // not refused either (the connection limits bound them).
                return true;
            }
        }
        let bucket = buckets.entry(peer).or_insert(Bucket {
            available: BUDGET_BURST_BYTES as i64,
            updated: now,
        });
        Self::refill(bucket, now);
        bucket.available = bucket
            .available
            .saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
        bucket.available >= 0
    }

    /// Whether `peer` is over its budget at `now` (its next message is
    /// refused).
    pub fn over(&self, peer: &PeerId, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match buckets.get_mut(peer) {
            Some(bucket) => {
                Self::refill(bucket, now);
                bucket.available < 0
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flood_overdraws_and_the_budget_refills() {
        let budgets = ByteBudgets::default();
        let peer = PeerId::random();
        let other = PeerId::random();
        let start = Instant::now();
        let chunk = 16 * 1024 * 1024;
        let mut sent = 0u64;
        while budgets.charge(peer, chunk, start) {
            sent += chunk as u64;
        }
        assert_eq!(sent, BUDGET_BURST_BYTES, "a burst's worth");
        assert!(budgets.over(&peer, start));
        assert!(!budgets.over(&other, start), "others unaffected");
        assert!(budgets.charge(other, chunk, start));
        // One second refills a second's rate, which repays the overdraft.
        assert!(!budgets.over(&peer, start + Duration::from_secs(1)));
    }
}
