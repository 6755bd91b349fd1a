//! The relay's state machine: which envelopes this node holds, which
//! peer should get which, and when to give up on them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use openagi_crypto::PublicKey;

use crate::{Envelope, EnvelopeId, Error};

/// What a router may hold and how it paces its forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most envelopes held for other nodes. With [`crate::MAX_BODY_BYTES`]
    /// bodies [`Limits::max_held_bytes`] binds first; this bounds the
    /// bookkeeping of many small ones.
    pub max_held: usize,
    /// Most body bytes held for other nodes: the relay's memory and disk
    /// budget for strangers' mail.
    pub max_held_bytes: usize,
    /// Most envelopes held that one upstream peer handed over, so one
    /// sender cannot fill a relay's queue.
    pub max_held_per_upstream: usize,
    /// Most envelopes this node originated and still holds (its messages,
    /// hellos, and the bundles and receipts it answers with), apart from
    /// what it holds for others, so relaying never crowds them out.
    pub max_local: usize,
    /// Most envelope ids remembered after they were handled, for dedup.
    /// Past it the ids closest to expiry are forgotten first.
    pub max_seen: usize,
    /// Most forwards awaiting one peer's answer at once; the rest wait in
    /// that peer's queue, so a slow peer gets one envelope at a time
    /// rather than a burst.
    pub max_in_flight_per_peer: usize,
    /// Wait before offering an envelope again to a peer that failed or was
    /// busy; doubled per attempt up to [`Limits::retry_max_ms`].
    pub retry_initial_ms: u64,
    /// Longest wait between two offers to one peer.
    pub retry_max_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_held: 4096,
            max_held_bytes: 64 * 1024 * 1024,
            max_held_per_upstream: 256,
            max_local: 1024,
            max_seen: 65_536,
            max_in_flight_per_peer: 4,
            retry_initial_ms: 1_000,
            retry_max_ms: 5 * 60 * 1000,
        }
    }
}

/// Where a held envelope came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// This node sent it.
    Local,
    /// This peer handed it over for relaying.
    Peer(PublicKey),
}

/// What the router made of an envelope a peer handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Addressed to this node: the node opens it and, once what it holds
    /// is on disk, calls [`Router::mark_seen`] and acknowledges.
    ForMe {
        /// Its id.
        id: EnvelopeId,
    },
    /// Taken for relaying: the node persists it, calls
    /// [`Router::commit`] (or [`Router::abort`] when it could not), then
    /// acknowledges.
    Held {
        /// Its id.
        id: EnvelopeId,
    },
    /// Already seen: acknowledge as a duplicate, nothing to store.
    Duplicate {
        /// Its id.
        id: EnvelopeId,
    },
}

/// A peer's answer to a forward, as the node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardResult {
    /// The peer stored it (for itself or to relay).
    Accepted,
    /// The peer had it already.
    Duplicate,
    /// The peer's queue is full: try again later.
    Busy,
    /// The peer refused it as invalid: never offer it to that peer again.
    Refused,
    /// No answer (connection lost, timeout): try again later.
    Failed,
}

/// Why the router let go of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Its expiry passed.
    Expired,
    /// The recipient itself has it.
    HandedToRecipient,
}

/// Something for the node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `envelope` to `peer` and report the answer with
    /// [`Router::handle_forward_result`].
    Forward {
        /// The next hop.
        peer: PublicKey,
        /// The envelope's id.
        id: EnvelopeId,
        /// The envelope with the hop budget it travels with (boxed: it is
        /// much larger than the other outputs).
        envelope: Box<Envelope>,
    },
    /// An envelope this node sent was taken by a next hop for the first
    /// time (the sender's `relayed`).
    Relayed {
        /// Its id.
        id: EnvelopeId,
    },
    /// Delete the envelope from the store.
    Dropped {
        /// Its id.
        id: EnvelopeId,
        /// Why.
        reason: DropReason,
    },
}

/// Counts for status pages and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Envelopes this node sent and still holds.
    pub local: usize,
    /// Envelopes held for other nodes.
    pub relaying: usize,
    /// Body bytes held for other nodes.
    pub relaying_bytes: usize,
    /// Envelope ids remembered for dedup.
    pub seen: usize,
    /// Connected peers.
    pub peers: usize,
    /// Forwards awaiting an answer.
    pub in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OfferState {
    /// In the peer's send queue.
    Waiting,
    /// Sent; the answer is outstanding.
    InFlight,
    /// The peer has it (or refused it for good).
    Done,
    /// Offer again at this time if the peer is connected.
    RetryAt(u64),
}

#[derive(Debug, Clone, Copy)]
struct Offer {
    state: OfferState,
    /// Failed or busy attempts so far, for the backoff.
    failures: u32,
}

#[derive(Debug)]
struct Held {
    envelope: Envelope,
    origin: Origin,
    offers: BTreeMap<PublicKey, Offer>,
    relayed: bool,
    /// The node has it on disk ([`Router::commit`]); nothing is sent
    /// before, so no peer holds what a crash could take back.
    committed: bool,
}

#[derive(Debug, Default)]
struct PeerState {
    /// Forwards sent over this connection and not answered yet: answers to
    /// forwards sent over an earlier connection free none of its slots.
    in_flight: BTreeSet<EnvelopeId>,
    queue: VecDeque<EnvelopeId>,
}

/// The store-and-forward relay (see the crate documentation).
#[derive(Debug)]
pub struct Router {
    me: PublicKey,
    limits: Limits,
    held: BTreeMap<EnvelopeId, Held>,
    relaying_bytes: usize,
    relaying: usize,
    local: usize,
    per_upstream: BTreeMap<PublicKey, usize>,
    seen: BTreeMap<EnvelopeId, u64>,
    seen_by_expiry: BTreeSet<(u64, EnvelopeId)>,
    peers: BTreeMap<PublicKey, PeerState>,
    outputs: VecDeque<Output>,
}

impl Router {
    /// A router for the node whose key is `me`, holding nothing.
    pub fn new(me: PublicKey, limits: Limits) -> Self {
        Self {
            me,
            limits,
            held: BTreeMap::new(),
            relaying_bytes: 0,
            relaying: 0,
            local: 0,
            per_upstream: BTreeMap::new(),
            seen: BTreeMap::new(),
            seen_by_expiry: BTreeSet::new(),
            peers: BTreeMap::new(),
            outputs: VecDeque::new(),
        }
    }

    /// The limits this router enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A peer connected at `now_unix_ms`: it is offered every envelope it
    /// should have, at once (a new connection is a fresh chance, whatever
    /// the backoff said).
    pub fn handle_peer_up(&mut self, peer: PublicKey, _now_unix_ms: u64) {
        self.peers.entry(peer).or_default();
        let ids: Vec<EnvelopeId> = self.held.keys().copied().collect();
        for id in &ids {
            if let Some(held) = self.held.get_mut(id)
                && let Some(offer) = held.offers.get_mut(&peer)
                && matches!(offer.state, OfferState::RetryAt(_))
            {
                held.offers.remove(&peer);
            }
        }
        for id in ids {
            self.schedule(id);
        }
        self.pump(peer);
    }

    /// A peer's last connection closed: what was queued for it is offered
    /// again when it returns; forwards in flight end with their result.
    pub fn handle_peer_down(&mut self, peer: PublicKey) {
        self.peers.remove(&peer);
        for held in self.held.values_mut() {
            if let Some(offer) = held.offers.get(&peer)
                && matches!(offer.state, OfferState::Waiting | OfferState::RetryAt(_))
            {
                held.offers.remove(&peer);
            }
        }
    }

    /// An envelope a peer handed over (see [`Incoming`]). Refusals are
    /// errors: [`crate::ErrorKind::Invalid`] ones count against the peer,
    /// [`crate::ErrorKind::Busy`] ones ask it to come back later.
    pub fn handle_incoming(
        &mut self,
        from: PublicKey,
        envelope: Envelope,
        now_unix_ms: u64,
    ) -> Result<Incoming, Error> {
        envelope.validate(now_unix_ms)?;
        if envelope.to == from {
            return Err(Error::Misaddressed);
        }
        let id = envelope.id();
        if let Some(held) = self.held.get_mut(&id) {
            // A copy that took a shorter path carries a larger hop budget:
            // keep the larger one, or a copy that first arrived the long way
            // round could never reach peers a few hops further on.
            if envelope.hops_left > held.envelope.hops_left {
                held.envelope.hops_left = envelope.hops_left;
                self.schedule(id);
                self.pump_all();
            }
            return Ok(Incoming::Duplicate { id });
        }
        if self.seen.contains_key(&id) {
            return Ok(Incoming::Duplicate { id });
        }
        if envelope.to == self.me {
            return Ok(Incoming::ForMe { id });
        }
        let from_this_peer = self.per_upstream.get(&from).copied().unwrap_or(0);
        if from_this_peer >= self.limits.max_held_per_upstream {
            return Err(Error::Full {
                what: "envelopes from this peer",
            });
        }
        if self.relaying >= self.limits.max_held {
            return Err(Error::Full {
                what: "envelopes held",
            });
        }
        if self.relaying_bytes + envelope.body.len() > self.limits.max_held_bytes {
            return Err(Error::Full { what: "bytes held" });
        }
        self.insert(id, envelope, Origin::Peer(from), false);
        Ok(Incoming::Held { id })
    }

    /// An envelope this node sends: held, and offered to the recipient or
    /// the mesh once the node has persisted it and called
    /// [`Router::commit`] ([`Router::abort`] when it could not).
    pub fn originate(&mut self, envelope: Envelope, now_unix_ms: u64) -> Result<EnvelopeId, Error> {
        envelope.validate(now_unix_ms)?;
        if envelope.to == self.me {
            return Err(Error::Misaddressed);
        }
        let id = envelope.id();
        if self.held.contains_key(&id) {
            return Ok(id);
        }
        if self.local >= self.limits.max_local {
            return Err(Error::Full {
                what: "this node's own queued envelopes",
            });
        }
        self.insert(id, envelope, Origin::Local, false);
        Ok(id)
    }

    /// Puts back an envelope the node had stored before a restart. Returns
    /// false (and keeps nothing) when it has expired or is addressed to
    /// this node: the node deletes it. Limits are not re-checked: what was
    /// stored was within them.
    pub fn restore(&mut self, envelope: Envelope, origin: Origin, now_unix_ms: u64) -> bool {
        if envelope.validate(now_unix_ms).is_err() || envelope.to == self.me {
            return false;
        }
        let id = envelope.id();
        if self.held.contains_key(&id) {
            return true;
        }
        self.insert(id, envelope, origin, true);
        self.schedule(id);
        true
    }

    /// The node has persisted the envelope `id`: it may now be offered.
    pub fn commit(&mut self, id: &EnvelopeId) {
        if let Some(held) = self.held.get_mut(id)
            && !held.committed
        {
            held.committed = true;
            self.schedule(*id);
            self.pump_all();
        }
    }

    /// The node could not persist the envelope `id`: it is let go and its
    /// id forgotten, so the peer that offered it may offer it again.
    pub fn abort(&mut self, id: &EnvelopeId) {
        if self.remove(id).is_some()
            && let Some(expiry) = self.seen.remove(id)
        {
            self.seen_by_expiry.remove(&(expiry, *id));
        }
    }

    /// Remembers that the envelope `id` was handled here until
    /// `expires_unix_ms` (the node calls it for envelopes addressed to it
    /// once they are on disk, and for the ids it stored before a restart).
    pub fn mark_seen(&mut self, id: EnvelopeId, expires_unix_ms: u64) {
        if let Some(old) = self.seen.insert(id, expires_unix_ms) {
            self.seen_by_expiry.remove(&(old, id));
        }
        self.seen_by_expiry.insert((expires_unix_ms, id));
        while self.seen.len() > self.limits.max_seen {
            let Some((expiry, oldest)) = self.seen_by_expiry.pop_first() else {
                break;
            };
            self.seen.remove(&oldest);
            let _ = expiry;
        }
    }

    /// Whether `id` was seen (handled or held) here.
    pub fn has_seen(&self, id: &EnvelopeId) -> bool {
        self.seen.contains_key(id) || self.held.contains_key(id)
    }

    /// Lets go of an envelope without an output (the node deleted it, for
    /// example when the recipient acknowledged it end to end). Returns
    /// whether it was held.
    pub fn forget(&mut self, id: &EnvelopeId) -> bool {
        self.remove(id).is_some()
    }

    /// The answer `peer` gave to the forward of `id`.
    pub fn handle_forward_result(
        &mut self,
        peer: PublicKey,
        id: EnvelopeId,
        result: ForwardResult,
        now_unix_ms: u64,
    ) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.in_flight.remove(&id);
        }
        let retry_initial = self.limits.retry_initial_ms;
        let retry_max = self.limits.retry_max_ms;
        let mut handed_to_recipient = false;
        let mut newly_relayed = false;
        if let Some(held) = self.held.get_mut(&id) {
            let offer = held.offers.entry(peer).or_insert(Offer {
                state: OfferState::InFlight,
                failures: 0,
            });
            match result {
                ForwardResult::Accepted | ForwardResult::Duplicate => {
                    offer.state = OfferState::Done;
                    if held.origin == Origin::Local && !held.relayed {
                        held.relayed = true;
                        newly_relayed = true;
                    }
                    handed_to_recipient = peer == held.envelope.to;
                }
                ForwardResult::Refused => offer.state = OfferState::Done,
                ForwardResult::Busy | ForwardResult::Failed => {
                    let wait = backoff(retry_initial, retry_max, offer.failures);
                    offer.failures = offer.failures.saturating_add(1);
                    offer.state = OfferState::RetryAt(now_unix_ms.saturating_add(wait));
                }
            }
        }
        if newly_relayed {
            self.outputs.push_back(Output::Relayed { id });
        }
        if handed_to_recipient {
            self.remove(&id);
            self.outputs.push_back(Output::Dropped {
                id,
                reason: DropReason::HandedToRecipient,
            });
        }
        self.pump(peer);
    }

    /// Time passed: expired envelopes are dropped, due retries sent, and
    /// expired ids forgotten.
    pub fn handle_tick(&mut self, now_unix_ms: u64) {
        let expired: Vec<EnvelopeId> = self
            .held
            .iter()
            .filter(|(_, h)| h.envelope.expires_unix_ms <= now_unix_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove(&id);
            self.outputs.push_back(Output::Dropped {
                id,
                reason: DropReason::Expired,
            });
        }
        for (id, held) in &mut self.held {
            for (peer, offer) in &mut held.offers {
                if let OfferState::RetryAt(at) = offer.state
                    && at <= now_unix_ms
                    && let Some(state) = self.peers.get_mut(peer)
                {
                    offer.state = OfferState::Waiting;
                    state.queue.push_back(*id);
                }
            }
        }
        while let Some((expiry, id)) = self.seen_by_expiry.first().copied() {
            if expiry > now_unix_ms {
                break;
            }
            self.seen_by_expiry.pop_first();
            self.seen.remove(&id);
        }
        self.pump_all();
    }

    /// The next thing for the node to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The earliest time [`Router::handle_tick`] has something to do.
    pub fn poll_timeout(&self) -> Option<u64> {
        let expiries = self.held.values().map(|h| h.envelope.expires_unix_ms);
        let retries = self.held.values().flat_map(|h| {
            h.offers.values().filter_map(|o| match o.state {
                OfferState::RetryAt(at) => Some(at),
                _ => None,
            })
        });
        expiries.chain(retries).min()
    }

    /// Whether the envelope `id` is held here.
    pub fn holds(&self, id: &EnvelopeId) -> bool {
        self.held.contains_key(id)
    }

    /// Counts for status pages and metrics.
    pub fn stats(&self) -> RouterStats {
        RouterStats {
            local: self.local,
            relaying: self.relaying,
            relaying_bytes: self.relaying_bytes,
            seen: self.seen.len(),
            peers: self.peers.len(),
            in_flight: self.peers.values().map(|p| p.in_flight.len()).sum(),
        }
    }

    fn insert(&mut self, id: EnvelopeId, envelope: Envelope, origin: Origin, committed: bool) {
        let mut offers = BTreeMap::new();
        match origin {
            Origin::Local => self.local += 1,
            Origin::Peer(upstream) => {
                self.relaying += 1;
                self.relaying_bytes += envelope.body.len();
                *self.per_upstream.entry(upstream).or_insert(0) += 1;
                // The peer that handed it over has it.
                offers.insert(
                    upstream,
                    Offer {
                        state: OfferState::Done,
                        failures: 0,
                    },
                );
            }
        }
        let expires = envelope.expires_unix_ms;
        self.held.insert(
            id,
            Held {
                envelope,
                origin,
                offers,
                relayed: false,
                committed,
            },
        );
        self.mark_seen(id, expires);
    }

    fn remove(&mut self, id: &EnvelopeId) -> Option<Held> {
        let held = self.held.remove(id)?;
        match held.origin {
            Origin::Local => self.local = self.local.saturating_sub(1),
            Origin::Peer(upstream) => {
                self.relaying = self.relaying.saturating_sub(1);
                self.relaying_bytes = self.relaying_bytes.saturating_sub(held.envelope.body.len());
                if let Some(count) = self.per_upstream.get_mut(&upstream) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.per_upstream.remove(&upstream);
                    }
                }
            }
        }
        Some(held)
    }

    /// Queues `id` for every connected peer that should get it and has not
    /// been offered it: the recipient alone when connected, otherwise every
    /// peer while hops remain.
    fn schedule(&mut self, id: EnvelopeId) {
        let Some(held) = self.held.get_mut(&id) else {
            return;
        };
        if !held.committed {
            return;
        }
        let to = held.envelope.to;
        let targets: Vec<PublicKey> = if self.peers.contains_key(&to) {
            vec![to]
        } else if held.envelope.hops_left > 0 {
            self.peers.keys().copied().collect()
        } else {
            Vec::new()
        };
        for peer in targets {
            if held.offers.contains_key(&peer) {
                continue;
            }
            held.offers.insert(
                peer,
                Offer {
                    state: OfferState::Waiting,
                    failures: 0,
                },
            );
            if let Some(state) = self.peers.get_mut(&peer) {
                state.queue.push_back(id);
            }
        }
    }

    fn pump_all(&mut self) {
        let peers: Vec<PublicKey> = self.peers.keys().copied().collect();
        for peer in peers {
            self.pump(peer);
        }
    }

    /// Sends what waits for `peer`, up to its in-flight limit.
    fn pump(&mut self, peer: PublicKey) {
        let cap = self.limits.max_in_flight_per_peer;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        while state.in_flight.len() < cap {
            let Some(id) = state.queue.pop_front() else {
                break;
            };
            let Some(held) = self.held.get_mut(&id) else {
                continue;
            };
            let Some(offer) = held.offers.get_mut(&peer) else {
                continue;
            };
            if offer.state != OfferState::Waiting {
                continue;
            }
            offer.state = OfferState::InFlight;
            state.in_flight.insert(id);
            let mut envelope = held.envelope.clone();
            if peer != envelope.to {
                envelope.hops_left = envelope.hops_left.saturating_sub(1);
            }
            self.outputs.push_back(Output::Forward {
                peer,
                id,
                envelope: Box::new(envelope),
            });
        }
    }
}

fn backoff(initial_ms: u64, max_ms: u64, failures: u32) -> u64 {
    initial_ms
        .saturating_mul(1u64 << failures.min(32))
        .min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_HOPS;
    use openagi_crypto::Identity;

    fn key(n: u8) -> PublicKey {
        Identity::from_seed(&[n; 32]).public()
    }

    fn envelope(to: PublicKey, body: u8) -> Envelope {
        Envelope {
            to,
            expires_unix_ms: 100_000,
            hops_left: DEFAULT_HOPS,
            body: vec![body; 10],
        }
    }

    /// Originates and commits, as the node does once the envelope is on
    /// disk.
    fn originate(r: &mut Router, e: Envelope, now: u64) -> Result<EnvelopeId, Error> {
        let id = r.originate(e, now)?;
        r.commit(&id);
        Ok(id)
    }

    /// Takes an envelope from a peer and commits it when held.
    fn relay(r: &mut Router, from: PublicKey, e: Envelope, now: u64) -> Result<Incoming, Error> {
        let verdict = r.handle_incoming(from, e, now);
        if let Ok(Incoming::Held { id }) = verdict {
            r.commit(&id);
        }
        verdict
    }

    fn drain(r: &mut Router) -> Vec<Output> {
        std::iter::from_fn(|| r.poll_output()).collect()
    }

    fn forwards(outputs: &[Output]) -> Vec<(PublicKey, u8)> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Forward { peer, envelope, .. } => Some((*peer, envelope.hops_left)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_connected_recipient_gets_it_alone_and_others_get_it_with_a_hop_less() {
        let (me, b, c, d) = (key(1), key(2), key(3), key(4));
        let mut r = Router::new(me, Limits::default());
        r.handle_peer_up(b, 0);
        r.handle_peer_up(c, 0);
        let id = originate(&mut r, envelope(d, 1), 0).expect("taken");
        let out = drain(&mut r);
        assert_eq!(
            forwards(&out),
            [(b, DEFAULT_HOPS - 1), (c, DEFAULT_HOPS - 1)]
        );
        // The recipient connects: offered to it at its full budget.
        r.handle_peer_up(d, 1);
        assert_eq!(forwards(&drain(&mut r)), [(d, DEFAULT_HOPS)]);
        r.handle_forward_result(b, id, ForwardResult::Accepted, 2);
        assert_eq!(drain(&mut r), [Output::Relayed { id }]);
        r.handle_forward_result(d, id, ForwardResult::Accepted, 3);
        assert_eq!(
            drain(&mut r),
            [Output::Dropped {
                id,
                reason: DropReason::HandedToRecipient
            }]
        );
        assert!(!r.holds(&id));
        assert!(r.has_seen(&id), "remembered for dedup");
    }

    #[test]
    fn relays_never_send_back_upstream_and_refuse_duplicates() {
        let (me, a, b, c) = (key(1), key(2), key(3), key(4));
        let mut r = Router::new(me, Limits::default());
        r.handle_peer_up(a, 0);
        r.handle_peer_up(b, 0);
        let e = envelope(c, 2);
        let id = match relay(&mut r, a, e.clone(), 0) {
            Ok(Incoming::Held { id }) => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(forwards(&drain(&mut r)), [(b, DEFAULT_HOPS - 1)]);
        assert_eq!(
            relay(&mut r, b, e.clone(), 0),
            Ok(Incoming::Duplicate { id })
        );
        let mut fewer = e.clone();
        fewer.hops_left = 0;
        assert_eq!(
            relay(&mut r, b, fewer, 0),
            Ok(Incoming::Duplicate { id }),
            "the hop budget is not part of the id"
        );
    }

    #[test]
    fn a_copy_with_more_hops_left_raises_the_budget() {
        let (me, a, b, c, d) = (key(1), key(2), key(3), key(4), key(5));
        let mut r = Router::new(me, Limits::default());
        r.handle_peer_up(b, 0);
        let mut long_way = envelope(c, 9);
        long_way.hops_left = 0;
        relay(&mut r, a, long_way, 0).expect("held");
        assert!(forwards(&drain(&mut r)).is_empty(), "no hops left");
        let short_way = envelope(c, 9);
        assert!(matches!(
            relay(&mut r, d, short_way, 1),
            Ok(Incoming::Duplicate { .. })
        ));
        assert_eq!(forwards(&drain(&mut r)), [(b, DEFAULT_HOPS - 1)]);
    }

    #[test]
    fn an_envelope_out_of_hops_waits_for_the_recipient() {
        let (me, a, b, c) = (key(1), key(2), key(3), key(4));
        let mut r = Router::new(me, Limits::default());
        r.handle_peer_up(b, 0);
        let mut e = envelope(c, 3);
        e.hops_left = 0;
        relay(&mut r, a, e, 0).expect("held");
        assert!(forwards(&drain(&mut r)).is_empty());
        r.handle_peer_up(c, 1);
        assert_eq!(forwards(&drain(&mut r)), [(c, 0)]);
    }

    #[test]
    fn quotas_bound_each_upstream_and_the_total() {
        let me = key(1);
        let limits = Limits {
            max_held: 3,
            max_held_per_upstream: 2,
            max_held_bytes: 1_000,
            ..Limits::default()
        };
        let mut r = Router::new(me, limits);
        let (a, b, c) = (key(2), key(3), key(4));
        relay(&mut r, a, envelope(c, 1), 0).expect("1");
        relay(&mut r, a, envelope(c, 2), 0).expect("2");
        let full = relay(&mut r, a, envelope(c, 3), 0).expect_err("per peer");
        assert_eq!(full.kind(), crate::ErrorKind::Busy);
        relay(&mut r, b, envelope(c, 4), 0).expect("other peer");
        assert!(matches!(
            relay(&mut r, b, envelope(c, 5), 0),
            Err(Error::Full { .. })
        ));
        // Local sends have their own budget.
        originate(&mut r, envelope(c, 6), 0).expect("own message");
        let mut big = envelope(c, 7);
        big.body = vec![0; 1_001];
        let mut r = Router::new(me, limits);
        assert!(matches!(
            relay(&mut r, a, big, 0),
            Err(Error::Full { what: "bytes held" })
        ));
        assert_eq!(r.stats().relaying, 0);
    }

    #[test]
    fn invalid_envelopes_are_refused_as_the_senders_fault() {
        let (me, a) = (key(1), key(2));
        let mut r = Router::new(me, Limits::default());
        let expired = envelope(key(3), 1);
        let e = relay(&mut r, a, expired, 100_000).expect_err("expired");
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
        assert_eq!(
            relay(&mut r, a, envelope(a, 1), 0),
            Err(Error::Misaddressed)
        );
        assert!(matches!(
            relay(&mut r, a, envelope(me, 1), 0),
            Ok(Incoming::ForMe { .. })
        ));
        assert_eq!(r.stats().relaying, 0, "mail for me is the node's to store");
    }

    #[test]
    fn failures_back_off_and_a_reconnection_retries_at_once() {
        let (me, b, c) = (key(1), key(2), key(3));
        let limits = Limits {
            retry_initial_ms: 100,
            retry_max_ms: 300,
            ..Limits::default()
        };
        let mut r = Router::new(me, limits);
        r.handle_peer_up(b, 0);
        let id = originate(&mut r, envelope(c, 1), 0).expect("taken");
        drain(&mut r);
        r.handle_forward_result(b, id, ForwardResult::Failed, 0);
        r.handle_tick(99);
        assert!(forwards(&drain(&mut r)).is_empty(), "not before 100 ms");
        assert_eq!(r.poll_timeout(), Some(100));
        r.handle_tick(100);
        assert_eq!(forwards(&drain(&mut r)).len(), 1);
        r.handle_forward_result(b, id, ForwardResult::Busy, 100);
        r.handle_tick(250);
        assert!(forwards(&drain(&mut r)).is_empty(), "second wait is 200 ms");
        r.handle_tick(300);
        assert_eq!(forwards(&drain(&mut r)).len(), 1);
        r.handle_forward_result(b, id, ForwardResult::Failed, 300);
        r.handle_forward_result(b, id, ForwardResult::Failed, 300);
        // Capped at 300 ms; but a fresh connection does not wait at all.
        r.handle_peer_down(b);
        r.handle_peer_up(b, 301);
        assert_eq!(forwards(&drain(&mut r)).len(), 1);
    }

    #[test]
    fn a_slow_peer_has_a_bounded_number_in_flight() {
        let (me, b, c) = (key(1), key(2), key(3));
        let limits = Limits {
            max_in_flight_per_peer: 2,
            ..Limits::default()
        };
        let mut r = Router::new(me, limits);
        r.handle_peer_up(b, 0);
        let ids: Vec<EnvelopeId> = (0..5)
            .map(|n| originate(&mut r, envelope(c, n), 0).expect("taken"))
            .collect();
        assert_eq!(forwards(&drain(&mut r)).len(), 2);
        r.handle_forward_result(b, ids[0], ForwardResult::Accepted, 1);
        let out = drain(&mut r);
        assert_eq!(forwards(&out).len(), 1, "one answer frees one slot");
        assert_eq!(r.stats().in_flight, 2);
    }

    #[test]
    fn expiry_drops_envelopes_and_forgets_their_ids() {
        let (me, a, c) = (key(1), key(2), key(3));
        let mut r = Router::new(me, Limits::default());
        let e = envelope(c, 1);
        let expires = e.expires_unix_ms;
        let id = match relay(&mut r, a, e, 0) {
            Ok(Incoming::Held { id }) => id,
            other => panic!("{other:?}"),
        };
        r.handle_tick(expires);
        assert_eq!(
            drain(&mut r),
            [Output::Dropped {
                id,
                reason: DropReason::Expired
            }]
        );
        assert!(!r.has_seen(&id));
        assert_eq!(r.stats(), RouterStats::default());
    }

    #[test]
    fn nothing_leaves_before_it_is_committed_and_an_abort_forgets_it() {
        let (me, a, b, c) = (key(1), key(2), key(3), key(4));
        let mut r = Router::new(me, Limits::default());
        r.handle_peer_up(b, 0);
        let e = envelope(c, 1);
        let Ok(Incoming::Held { id }) = r.handle_incoming(a, e.clone(), 0) else {
            panic!("held");
        };
        r.handle_tick(1);
        r.handle_peer_up(key(5), 1);
        assert!(forwards(&drain(&mut r)).is_empty(), "not on disk yet");
        r.abort(&id);
        assert!(!r.has_seen(&id));
        assert!(
            matches!(r.handle_incoming(a, e, 2), Ok(Incoming::Held { .. })),
            "offered again after an abort, it is taken again"
        );
        r.commit(&id);
        assert_eq!(forwards(&drain(&mut r)).len(), 2);
        let own = r.originate(envelope(c, 2), 3).expect("taken");
        assert!(forwards(&drain(&mut r)).is_empty());
        r.commit(&own);
        assert_eq!(forwards(&drain(&mut r)).len(), 2);
    }

    #[test]
    fn answers_over_an_old_connection_do_not_free_the_new_ones_slots() {
        let (me, b, c) = (key(1), key(2), key(3));
        let limits = Limits {
            max_in_flight_per_peer: 1,
            ..Limits::default()
        };
        let mut r = Router::new(me, limits);
        r.handle_peer_up(b, 0);
        let first = originate(&mut r, envelope(c, 1), 0).expect("taken");
        let second = originate(&mut r, envelope(c, 2), 0).expect("taken");
        assert_eq!(forwards(&drain(&mut r)).len(), 1);
        r.handle_peer_down(b);
        r.handle_peer_up(b, 1);
        assert_eq!(
            forwards(&drain(&mut r)).len(),
            1,
            "the second, on the new connection"
        );
        // The first's answer comes back from the old connection.
        r.handle_forward_result(b, first, ForwardResult::Failed, 2);
        assert_eq!(
            r.stats().in_flight,
            1,
            "the new connection's forward is still out"
        );
        let _ = second;
    }

    #[test]
    fn the_seen_set_is_bounded() {
        let limits = Limits {
            max_seen: 3,
            ..Limits::default()
        };
        let mut r = Router::new(key(1), limits);
        for n in 0..10u8 {
            r.mark_seen(EnvelopeId([n; 32]), 1_000 + u64::from(n));
        }
        assert_eq!(r.stats().seen, 3);
        assert!(r.has_seen(&EnvelopeId([9; 32])), "the longest-lived stay");
        assert!(!r.has_seen(&EnvelopeId([0; 32])));
    }
}
