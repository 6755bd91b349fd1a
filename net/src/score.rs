//! Misbehaviour accounting per peer identity.
//!
//! Every refused or malformed message costs its sender a penalty; a peer
//! whose penalties within [`PENALTY_WINDOW`] reach [`PENALTY_LIMIT`] is
//! disconnected and refused for the ban duration ([`BAN_DURATION`] unless
//! configured). Keyed by peer id, never by address: behind Tor every peer
//! comes from 127.0.0.1. Pure: the caller passes the time. The node keeps
//! bans on disk and hands the running ones back at start
//! ([`Misbehaviour::restore`]), so a restart does not pardon anyone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::mpsc;

use crate::metrics::{NetMetrics, RefusalLabels};

/// Penalties reported from outside the network task, waiting for it.
pub const PENALTY_QUEUE: usize = 1024;

/// One refused or malformed message, charged to its sender.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Penalty {
    pub peer: PeerId,
    pub protocol: &'static str,
    pub reason: &'static str,
}

/// Where tasks outside the network task report misbehaviour: counted at
/// once in `openagi_p2p_inbound_refused_total`, and queued for the network
/// task, which keeps the scores and disconnects (a full queue loses the
/// score, never the count).
#[derive(Clone)]
pub(crate) struct Penalties {
    pub(crate) tx: mpsc::Sender<Penalty>,
    pub(crate) metrics: NetMetrics,
}

impl Penalties {
    pub(crate) fn report(&self, peer: PeerId, protocol: &'static str, reason: &'static str) {
        count(&self.metrics, protocol, reason);
        let _ = self.tx.try_send(Penalty {
            peer,
            protocol,
            reason,
        });
    }
}

/// Counts one refused message.
pub(crate) fn count(metrics: &NetMetrics, protocol: &'static str, reason: &'static str) {
    metrics
        .inbound_refused
        .get_or_create(&RefusalLabels { protocol, reason })
        .inc();
}

/// Penalties within [`PENALTY_WINDOW`] that get a peer disconnected. An
/// honest peer produces a refused message now and then (a stream cut by
/// a restart, a timeout over Tor); a flood produces hundreds a second.
pub const PENALTY_LIMIT: u32 = 50;

/// The window penalties are counted over.
pub const PENALTY_WINDOW: Duration = Duration::from_secs(60);

/// How long a disconnected peer is refused, by default
/// (`network.ban_secs`).
pub const BAN_DURATION: Duration = Duration::from_secs(600);

/// Peers tracked at once; beyond it the one penalised longest ago is
/// forgotten, so a flood of fresh identities cannot grow the table.
pub const MAX_TRACKED_PEERS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Record {
    window_start: Instant,
    penalties: u32,
    last: Instant,
}

/// The penalty table and ban list.
#[derive(Debug)]
pub struct Misbehaviour {
    records: HashMap<PeerId, Record>,
    banned: HashMap<PeerId, Instant>,
    ban_duration: Duration,
}

impl Default for Misbehaviour {
    fn default() -> Self {
        Self::with_ban_duration(BAN_DURATION)
    }
}

impl Misbehaviour {
    /// An empty table whose bans last `ban_duration`.
    pub fn with_ban_duration(ban_duration: Duration) -> Self {
        Self {
            records: HashMap::new(),
            banned: HashMap::new(),
            ban_duration,
        }
    }

    /// How long a ban lasts.
    pub fn ban_duration(&self) -> Duration {
        self.ban_duration
    }

    /// Bans `peer` until `until` (a ban from before a restart). At most
    /// [`MAX_TRACKED_PEERS`] bans are held; a full list keeps the ones it
    /// has.
    pub fn restore(&mut self, peer: PeerId, until: Instant) {
        if self.banned.len() < MAX_TRACKED_PEERS || self.banned.contains_key(&peer) {
            self.banned.insert(peer, until);
        }
    }

    /// Records one penalty for `peer` at `now`; `true` when the peer has
    /// reached the limit and is now banned.
    pub fn penalise(&mut self, peer: PeerId, now: Instant) -> bool {
        if self.records.len() >= MAX_TRACKED_PEERS && !self.records.contains_key(&peer) {
            let oldest = self
                .records
                .iter()
                .min_by_key(|(_, r)| r.last)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.records.remove(&oldest);
            }
        }
        let record = self.records.entry(peer).or_insert(Record {
            window_start: now,
            penalties: 0,
            last: now,
        });
        if now.saturating_duration_since(record.window_start) > PENALTY_WINDOW {
            record.window_start = now;
            record.penalties = 0;
        }
        record.penalties += 1;
        record.last = now;
        if record.penalties >= PENALTY_LIMIT {
            self.records.remove(&peer);
            if self.banned.len() >= MAX_TRACKED_PEERS {
                self.banned.retain(|_, until| *until > now);
            }
            if self.banned.len() < MAX_TRACKED_PEERS {
                self.banned.insert(peer, now + self.ban_duration);
            }
            return true;
        }
        false
    }

    /// Whether `peer` is banned at `now`.
    pub fn is_banned(&mut self, peer: &PeerId, now: Instant) -> bool {
        match self.banned.get(peer) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.banned.remove(peer);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_bans_and_occasional_faults_do_not() {
        let mut table = Misbehaviour::default();
        let start = Instant::now();
        let honest = PeerId::random();
        // One fault a minute for an hour never adds up.
        for minute in 0..60u64 {
            let at = start + Duration::from_secs(61 * minute);
            assert!(!table.penalise(honest, at));
        }
        let flooder = PeerId::random();
        let banned_at = (0..PENALTY_LIMIT)
            .position(|_| table.penalise(flooder, start))
            .expect("banned");
        assert_eq!(banned_at as u32, PENALTY_LIMIT - 1);
        assert!(table.is_banned(&flooder, start + Duration::from_secs(1)));
        assert!(!table.is_banned(&honest, start));
        assert!(
            !table.is_banned(&flooder, start + BAN_DURATION + Duration::from_secs(1)),
            "bans expire"
        );
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut table = Misbehaviour::default();
        let now = Instant::now();
        for _ in 0..MAX_TRACKED_PEERS + 100 {
            table.penalise(PeerId::random(), now);
        }
        assert!(table.records.len() <= MAX_TRACKED_PEERS);
    }

    #[test]
    fn a_configured_ban_lasts_as_long_and_a_restored_one_refuses_at_once() {
        let start = Instant::now();
        let mut table = Misbehaviour::with_ban_duration(Duration::from_secs(5));
        let flooder = PeerId::random();
        for _ in 0..PENALTY_LIMIT {
            table.penalise(flooder, start);
        }
        assert!(table.is_banned(&flooder, start + Duration::from_secs(4)));
        assert!(!table.is_banned(&flooder, start + Duration::from_secs(6)));

        let mut restarted = Misbehaviour::default();
        let returning = PeerId::random();
        restarted.restore(returning, start + Duration::from_secs(30));
        assert!(restarted.is_banned(&returning, start));
        assert!(!restarted.is_banned(&returning, start + Duration::from_secs(31)));
    }
}
