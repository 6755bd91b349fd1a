//! Seeded simulation of a mesh of routers: random graphs, nodes that crash
//! and come back with only what they had persisted, links that fail,
//! answers that are lost (so envelopes arrive twice), and messages to
//! peers that are offline. After the network heals every message must
//! reach its recipient exactly once, and once everything has expired
//! every relay's queue must be empty.
//!
//! `MESH_SIM_SEEDS=N` runs more seeds than the default.

use std::collections::{BTreeMap, BTreeSet};

use openagi_crypto::{Identity, PublicKey};
use openagi_mesh::{
    DEFAULT_HOPS, Envelope, EnvelopeId, ForwardResult, Incoming, Limits, MAX_LIFETIME_MS, Origin,
    Output, Router,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a node keeps on disk: the envelopes it holds and the ids of the
/// envelopes addressed to it that it stored (its inbox).
#[derive(Default, Clone)]
struct Disk {
    held: BTreeMap<EnvelopeId, (Envelope, Origin)>,
    inbox: BTreeMap<EnvelopeId, (u32, u64)>,
}

struct Node {
    key: PublicKey,
    router: Option<Router>,
    disk: Disk,
}

struct InTransit {
    from: usize,
    to: usize,
    id: EnvelopeId,
    envelope: Envelope,
    at: u64,
    /// The answer is lost on the way back (the receiver still acts on it).
    answer_lost: bool,
}

struct Sim {
    rng: ChaCha8Rng,
    now: u64,
    nodes: Vec<Node>,
    links: BTreeSet<(usize, usize)>,
    up: BTreeSet<(usize, usize)>,
    transit: Vec<InTransit>,
    sent: BTreeMap<EnvelopeId, usize>,
    limits: Limits,
    max_relaying_seen: usize,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = rng.random_range(4..=7usize);
        let limits = Limits {
            retry_initial_ms: 50,
            retry_max_ms: 800,
            max_held_per_upstream: 64,
            max_in_flight_per_peer: 2,
            ..Limits::default()
        };
        let nodes = (0..n)
            .map(|i| {
                let key = Identity::from_seed(&[i as u8 + 1; 32]).public();
                Node {
                    key,
                    router: Some(Router::new(key, limits)),
                    disk: Disk::default(),
                }
            })
            .collect();
        // A random spanning tree (so the healed graph is connected) plus a
        // few random extra links; pairs without a link never meet.
        let mut links = BTreeSet::new();
        for i in 1..n {
            let j = rng.random_range(0..i);
            links.insert((j, i));
        }
        for _ in 0..rng.random_range(0..n) {
            let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
            if a != b {
                links.insert((a.min(b), a.max(b)));
            }
        }
        Self {
            rng,
            now: 1_000,
            nodes,
            links,
            up: BTreeSet::new(),
            transit: Vec::new(),
            sent: BTreeMap::new(),
            limits,
            max_relaying_seen: 0,
        }
    }

    fn online(&self, i: usize) -> bool {
        self.nodes[i].router.is_some()
    }

    fn connect(&mut self, a: usize, b: usize) {
        let pair = (a.min(b), a.max(b));
        if !self.links.contains(&pair) || !self.online(a) || !self.online(b) {
            return;
        }
        if self.up.insert(pair) {
            let (ka, kb) = (self.nodes[a].key, self.nodes[b].key);
            let now = self.now;
            self.router(a).handle_peer_up(kb, now);
            self.router(b).handle_peer_up(ka, now);
        }
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        let pair = (a.min(b), a.max(b));
        if self.up.remove(&pair) {
            let (ka, kb) = (self.nodes[a].key, self.nodes[b].key);
            if let Some(r) = self.nodes[a].router.as_mut() {
                r.handle_peer_down(kb);
            }
            if let Some(r) = self.nodes[b].router.as_mut() {
                r.handle_peer_down(ka);
            }
        }
    }

    fn router(&mut self, i: usize) -> &mut Router {
        self.nodes[i].router.as_mut().expect("online")
    }

    fn crash(&mut self, i: usize) {
        let pairs: Vec<(usize, usize)> = self
            .up
            .iter()
            .copied()
            .filter(|&(a, b)| a == i || b == i)
            .collect();
        for (a, b) in pairs {
            self.disconnect(a, b);
        }
        self.nodes[i].router = None;
    }

    /// Restarts node `i` from its disk alone.
    fn restart(&mut self, i: usize) {
        let key = self.nodes[i].key;
        let mut router = Router::new(key, self.limits);
        let now = self.now;
        let disk = self.nodes[i].disk.clone();
        for (id, (envelope, origin)) in &disk.held {
            if !router.restore(envelope.clone(), *origin, now) {
                self.nodes[i].disk.held.remove(id);
            }
        }
        for (id, (_, expires)) in &disk.inbox {
            router.mark_seen(*id, *expires);
        }
        self.nodes[i].router = Some(router);
        let links: Vec<(usize, usize)> = self.links.iter().copied().collect();
        for (a, b) in links {
            if a == i || b == i {
                self.connect(a, b);
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, n: u32) {
        let envelope = Envelope {
            to: self.nodes[to].key,
            expires_unix_ms: self.now + MAX_LIFETIME_MS,
            hops_left: DEFAULT_HOPS,
            body: n.to_le_bytes().to_vec(),
        };
        let now = self.now;
        let id = self
            .router(from)
            .originate(envelope.clone(), now)
            .expect("within the local budget");
        self.nodes[from]
            .disk
            .held
            .insert(id, (envelope, Origin::Local));
        self.router(from).commit(&id);
        self.sent.insert(id, to);
    }

    /// Carries out every output of every online router.
    fn drain(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(output) = self.nodes[i].router.as_mut().and_then(Router::poll_output) {
                match output {
                    Output::Forward { peer, id, envelope } => {
                        let to = self
                            .nodes
                            .iter()
                            .position(|n| n.key == peer)
                            .expect("known peer");
                        let delay = self.rng.random_range(1..30);
                        let answer_lost = self.rng.random_bool(0.05);
                        self.transit.push(InTransit {
                            from: i,
                            to,
                            id,
                            envelope: *envelope,
                            at: self.now + delay,
                            answer_lost,
                        });
                    }
                    Output::Relayed { .. } => {}
                    Output::Dropped { id, .. } => {
                        self.nodes[i].disk.held.remove(&id);
                    }
                }
            }
            let stats = self.nodes[i].router.as_ref().map(Router::stats);
            if let Some(stats) = stats {
                self.max_relaying_seen = self.max_relaying_seen.max(stats.relaying);
            }
        }
    }

    fn deliver_due(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.transit)
            .into_iter()
            .partition(|t| t.at <= now);
        self.transit = later;
        for t in due {
            let pair = (t.from.min(t.to), t.from.max(t.to));
            let result = if self.up.contains(&pair) && self.online(t.to) {
                self.receive(t.to, t.from, t.envelope)
            } else {
                ForwardResult::Failed
            };
            let result = if t.answer_lost {
                ForwardResult::Failed
            } else {
                result
            };
            let peer = self.nodes[t.to].key;
            // The sender may have crashed since; its new router never sent it.
            if let Some(r) = self.nodes[t.from].router.as_mut() {
                r.handle_forward_result(peer, t.id, result, now);
            }
        }
    }

    fn receive(&mut self, at: usize, from: usize, envelope: Envelope) -> ForwardResult {
        let from_key = self.nodes[from].key;
        let now = self.now;
        let expires = envelope.expires_unix_ms;
        match self
            .router(at)
            .handle_incoming(from_key, envelope.clone(), now)
        {
            Ok(Incoming::ForMe { id }) => {
                let disk = &mut self.nodes[at].disk;
                if disk.inbox.contains_key(&id) {
                    return ForwardResult::Duplicate;
                }
                let n = u32::from_le_bytes(envelope.body[..4].try_into().expect("4 bytes"));
                disk.inbox.insert(id, (n, expires));
                self.router(at).mark_seen(id, expires);
                ForwardResult::Accepted
            }
            Ok(Incoming::Held { id }) => {
                self.nodes[at]
                    .disk
                    .held
                    .insert(id, (envelope, Origin::Peer(from_key)));
                self.router(at).commit(&id);
                ForwardResult::Accepted
            }
            Ok(Incoming::Duplicate { .. }) => ForwardResult::Duplicate,
            Err(e) if e.kind() == openagi_mesh::ErrorKind::Busy => ForwardResult::Busy,
            Err(_) => ForwardResult::Refused,
        }
    }

    fn step(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        for node in &mut self.nodes {
            if let Some(r) = node.router.as_mut() {
                r.handle_tick(now);
            }
        }
        self.drain();
        self.deliver_due();
        self.drain();
    }

    fn chaos(&mut self, steps: usize) {
        let n = self.nodes.len();
        let mut count = 0u32;
        for _ in 0..steps {
            let roll: f64 = self.rng.random();
            let a = self.rng.random_range(0..n);
            let b = self.rng.random_range(0..n);
            if roll < 0.05 {
                if self.online(a) {
                    self.crash(a);
                } else {
                    self.restart(a);
                }
            } else if roll < 0.15 {
                self.disconnect(a, b);
            } else if roll < 0.35 {
                self.connect(a, b);
            } else if roll < 0.55 && a != b && self.online(a) {
                self.send(a, b, count);
                count += 1;
            }
            let ms = self.rng.random_range(1..40);
            self.step(ms);
        }
    }

    fn heal(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.online(i) {
                self.restart(i);
            }
        }
        let links: Vec<(usize, usize)> = self.links.iter().copied().collect();
        for (a, b) in links {
            self.connect(a, b);
        }
        // Long enough for the longest backoff several times over.
        for _ in 0..400 {
            self.step(25);
        }
    }
}

fn run(seed: u64) {
    let mut sim = Sim::new(seed);
    sim.chaos(600);
    sim.heal();
    let mut delivered: BTreeMap<EnvelopeId, usize> = BTreeMap::new();
    for (i, node) in sim.nodes.iter().enumerate() {
        for id in node.disk.inbox.keys() {
            assert_eq!(sim.sent.get(id), Some(&i), "seed {seed}: misdelivered");
            *delivered.entry(*id).or_insert(0) += 1;
        }
    }
    for (id, to) in &sim.sent {
        assert_eq!(
            delivered.get(id),
            Some(&1),
            "seed {seed}: envelope {id:?} to node {to} delivered {:?} times (links {:?})",
            delivered.get(id),
            sim.links
        );
    }
    assert!(sim.max_relaying_seen <= sim.limits.max_held);
    // Past every expiry nothing is held anywhere.
    sim.step(MAX_LIFETIME_MS + 1);
    for node in &sim.nodes {
        let stats = node.router.as_ref().expect("online").stats();
        assert_eq!(stats.relaying + stats.local, 0, "seed {seed}");
        assert!(node.disk.held.is_empty(), "seed {seed}: store not emptied");
    }
}

#[test]
fn every_message_arrives_exactly_once_after_the_mesh_heals() {
    let seeds: u64 = std::env::var("MESH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    for seed in 0..seeds {
        run(seed);
    }
}
