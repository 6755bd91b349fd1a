//! Messages that cross the mesh: the I/O around `openagi_mesh::Router`
//! for the messenger (`msg.rs`).
//!
//! A message to a peer this node is not connected to becomes an outbox
//! entry and, once there is a ratchet session, an envelope that the router
//! floods hop by hop (see the `mesh` crate). What relays see: the
//! recipient's key, the expiry, the hop budget and a body sealed to the
//! recipient's static X25519 key under no sender identity, so neither who
//! sent it nor what it says. Inside the seal:
//!
//! - `Message`: a Double Ratchet message with the sender's signed contact
//!   statement (its sealing key and ratchet keys, signed by its node key);
//! - `Receipt`: the recipient's signed acknowledgement of an envelope id,
//!   sealed back to the sender, which turns its outbox entry `delivered`;
//! - `Bundle`: a one-time key bundle, the answer to a `Hello`.
//!
//! First contact needs the recipient's one-time key and sealing key, so
//! the sender floods a `Hello` (its signed contact statement, addressed to
//! the recipient) and keeps the messages as `queued` until the `Bundle`
//! comes back. The `Hello` is the one body that cannot be sealed (the
//! sender does not know the recipient's key yet): relays learn that this
//! sender asked this recipient for a key (again only if the answer never
//! came). A recipient answers a given asker's hello once; a relay that
//! re-wraps it in a new envelope gets nothing.
//!
//! Order of effects, for durability: the router sends nothing it holds
//! until the node has written it and called `Router::commit`, so an
//! envelope is on disk before it leaves and before this node acknowledges
//! it to the peer that handed it over; a message taken from an envelope is
//! in the inbox, with the envelope id as seen, the new ratchet state and
//! its receipt, in one fsynced transaction before the acknowledgement; a
//! queued message and the envelope that carries it are written with the
//! ratchet state that encrypted it. A failure that is this node's (the
//! disk, a rate limit) answers "busy", so the peer offers it again; the
//! ratchet then goes back to what is on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use openagi_crypto::aead::{self, AeadKey};
use openagi_crypto::identity::SignedPayload;
use openagi_crypto::ratchet::{Ratchet, RatchetMessage};
use openagi_crypto::seal::{self, X25519Public};
use openagi_crypto::{PublicKey, Signed};
use openagi_mesh::{
    DEFAULT_HOPS, DropReason, Envelope, EnvelopeId, ErrorKind, ForwardResult, Incoming,
    MAX_LIFETIME_MS, Origin, Output, Router,
};
use openagi_net::PeerId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::msg::{
    BundleStatement, InboxEntry, MAX_TEXT_BYTES, Messenger, MsgRequest, MsgResponse,
    RatchetKeyStatement,
};
use crate::common::store::{HeldEnvelope, MsgWrite};

/// An outbox entry to write: number (0 for new), encrypted entry, envelope.
type OutboxWrite = (u64, Vec<u8>, Option<[u8; 32]>);

/// Messages that waited for a key, now in envelopes: what to write.
struct Encrypted {
    ids: Vec<EnvelopeId>,
    holds: Vec<HeldEnvelope>,
    outbox: Vec<OutboxWrite>,
}

/// How often the router's clock advances (expiries, retries).
pub const MESH_TICK: Duration = Duration::from_secs(1);
/// The seal purpose of every sealed body.
const SEAL_PURPOSE: &str = "openagi/mesh/body/v1";
/// Outbox entries are encrypted at rest under a key derived with this.
pub(super) const OUTBOX_PURPOSE: &str = "openagi/msg/outbox/v1";
const OUTBOX_AAD: &[u8] = b"openagi/msg/outbox-entry/v1";
/// Most outbox entries one API call returns.
pub const MAX_OUTBOX_PAGE: usize = 1000;
/// How many of the newest outbox entries are searched for messages
/// waiting on a key when a bundle arrives (older ones, rare with 1,024
/// envelopes of a node's own in flight at most, wait until they expire).
const WAITING_SCAN: usize = 2048;

/// A node's keys for mesh mail, signed by its node key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshContact {
    /// Its static X25519 key: bodies for it are sealed to this.
    pub seal_key: X25519Public,
    /// Its ratchet identity keys.
    pub ratchet: RatchetKeyStatement,
}

impl SignedPayload for MeshContact {
    const CONTEXT: &'static str = "openagi/mesh/contact/v1";
}

/// First contact: asks `to` for a one-time key bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshHello {
    /// Who is asked (a hello cannot be re-addressed).
    pub to: PublicKey,
    /// When it was made (Unix ms); old hellos are refused.
    pub created_unix_ms: u64,
    /// The asking node's contact statement.
    pub contact: Box<Signed<MeshContact>>,
}

impl SignedPayload for MeshHello {
    const CONTEXT: &'static str = "openagi/mesh/hello/v1";
}

/// The recipient's acknowledgement that it took an envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryReceipt {
    /// The envelope taken.
    pub envelope: EnvelopeId,
    /// The node that sent it (a receipt cannot be re-addressed).
    pub sender: PublicKey,
}

impl SignedPayload for DeliveryReceipt {
    const CONTEXT: &'static str = "openagi/mesh/receipt/v1";
}

/// An envelope's body (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MeshBody {
    /// First contact (see the module documentation).
    Hello(Box<Signed<MeshHello>>),
    /// Everything else, sealed to the recipient.
    Sealed(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// What a sealed body holds (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SealedBody {
    /// The answer to a hello.
    Bundle {
        /// The answering node's contact statement.
        contact: Box<Signed<MeshContact>>,
        /// A fresh one-time key bundle, signed by the same node.
        bundle: Box<Signed<BundleStatement>>,
    },
    /// A ratchet message.
    Message {
        /// The sender's contact statement.
        contact: Box<Signed<MeshContact>>,
        /// The message.
        message: RatchetMessage,
    },
    /// A signed delivery receipt.
    Receipt(Box<Signed<DeliveryReceipt>>),
}

/// What a held envelope carries, as far as this node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum HeldKind {
    /// Another node's envelope, held to relay.
    Relay,
    /// This node's message (kept until its receipt).
    Message,
    /// This node's hello (kept until the bundle comes back).
    Hello,
    /// This node's key bundle for an asker.
    Bundle,
    /// This node's receipt (let go once a relay has it).
    Receipt,
}

/// How a held envelope is stored: who handed it over (none for this
/// node's own), what it is and the envelope.
#[derive(Debug, Serialize, Deserialize)]
struct HeldRecord {
    upstream: Option<PublicKey>,
    kind: HeldKind,
    envelope: Envelope,
}

/// A relay's answer on `/openagi/msg/1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayAnswer {
    /// Stored (for this node or to pass on).
    Accepted,
    /// Seen before; nothing stored.
    Duplicate,
    /// Full: try again later.
    Busy(String),
    /// Invalid; do not send it again.
    Refused(String),
}

/// Where a sent message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxState {
    /// In this node's store, waiting for a next hop (or for the
    /// recipient's key).
    Queued,
    /// A next hop has stored it.
    Relayed,
    /// The recipient acknowledged it with a signed receipt (on the mesh)
    /// or stored it while connected (direct).
    Delivered,
    /// Its lifetime passed without a receipt.
    Expired,
}

/// How a message left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Straight to the connected recipient.
    Direct,
    /// Through the mesh.
    Mesh,
}

/// A sent message, as `msg outbox` and the API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Its number (increasing).
    pub number: u64,
    /// The recipient's peer id.
    pub to_peer: String,
    /// The recipient's node key (hex).
    pub to_key: String,
    /// Unix ms it was sent.
    pub created_unix_ms: u64,
    /// Unix ms its state last changed.
    pub updated_unix_ms: u64,
    /// Where it is.
    pub state: OutboxState,
    /// How it left.
    pub route: Route,
    /// The envelope carrying it (hex), once encrypted for the mesh.
    pub envelope: Option<String>,
    /// The text.
    pub text: String,
}

impl OutboxEntry {
    /// A new entry for `peer` at `now` (its number is assigned when it is
    /// written).
    fn new(peer: PublicKey, now: u64, state: OutboxState, route: Route, text: String) -> Self {
        Self {
            number: 0,
            to_peer: openagi_net::peer_id_of_key(&peer).to_string(),
            to_key: peer.to_hex(),
            created_unix_ms: now,
            updated_unix_ms: now,
            state,
            route,
            envelope: None,
            text,
        }
    }

    /// The state as of `now_ms`: a queued or relayed message a week after
    /// it was queued is shown expired (its envelope, made when the key came,
    /// may live a little longer at relays).
    fn state_at(&self, now_ms: u64) -> OutboxState {
        match self.state {
            OutboxState::Queued | OutboxState::Relayed
                if self.created_unix_ms.saturating_add(MAX_LIFETIME_MS) <= now_ms =>
            {
                OutboxState::Expired
            }
            state => state,
        }
    }

    fn waits_for_key(&self, now_ms: u64) -> bool {
        self.state_at(now_ms) == OutboxState::Queued && self.envelope.is_none()
    }
}

/// What `POST /api/v1/msg` answers.
#[derive(Debug, Clone, Serialize)]
pub struct SendOutcome {
    /// The outbox entry's number.
    pub number: u64,
    /// Where the message is now.
    pub state: OutboxState,
    /// How it left.
    pub route: Route,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabels {
    origin: &'static str,
}

/// The mesh's metrics (`openagi_mesh_*`).
#[derive(Clone, Default)]
pub struct MeshMetrics {
    held: Family<OriginLabels, Gauge>,
    held_bytes: Gauge,
    received: Family<ResultLabels, Counter>,
    forwarded: Family<ResultLabels, Counter>,
    delivered: Counter,
    receipts: Counter,
}

impl MeshMetrics {
    /// Registers under `openagi_mesh_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("mesh");
        r.register(
            "envelopes_held",
            "Envelopes this node holds, by origin (own: sent here; relay: held for others)",
            m.held.clone(),
        );
        r.register_with_unit(
            "relay_held",
            "Body bytes this node holds for other nodes",
            prometheus_client::registry::Unit::Bytes,
            m.held_bytes.clone(),
        );
        r.register(
            "envelopes_received",
            "Envelopes peers handed to this node, by result (for_me, held, duplicate, busy, refused)",
            m.received.clone(),
        );
        r.register(
            "forwards",
            "Envelopes this node offered to a peer, by answer (accepted, duplicate, busy, refused, failed)",
            m.forwarded.clone(),
        );
        r.register(
            "messages_delivered",
            "Messages that reached this node's inbox through the mesh",
            m.delivered.clone(),
        );
        r.register(
            "receipts",
            "Delivery receipts this node received for messages it sent through the mesh",
            m.receipts.clone(),
        );
        m
    }

    fn received(&self, result: &'static str) {
        self.received.get_or_create(&ResultLabels { result }).inc();
    }
}

/// Most hellos remembered as answered, by asker: a relay that re-wraps a
/// signed hello in a new envelope gets no second key for it.
const MAX_ANSWERED_HELLOS: usize = 4096;
/// How often (in clock ticks) the ids of expired envelopes taken here are
/// pruned from the store.
const SEEN_PRUNE_TICKS: u64 = 600;

/// The mesh half of the messenger: router, keys and metrics.
pub struct MeshState {
    pub(super) router: std::sync::Mutex<Router>,
    /// Hellos this node has out, by the peer asked.
    hellos: std::sync::Mutex<BTreeMap<PublicKey, EnvelopeId>>,
    /// Peers whose key queued messages wait for (so a bundle nobody asked
    /// for costs no scan of the outbox).
    waiting: std::sync::Mutex<BTreeSet<PublicKey>>,
    /// Receipts this node sent and still holds: let go once a relay has
    /// them (nobody acknowledges a receipt).
    receipts: std::sync::Mutex<BTreeSet<EnvelopeId>>,
    /// The newest hello answered per asker (its creation time).
    answered: std::sync::Mutex<BTreeMap<PublicKey, u64>>,
    ticks: std::sync::atomic::AtomicU64,
    outbox_key: AeadKey,
    metrics: MeshMetrics,
    runtime: tokio::runtime::Handle,
}

impl MeshState {
    /// A mesh state with nothing held yet; [`Messenger::restore_mesh`]
    /// loads what the store holds.
    pub fn new(router: Router, outbox_key: AeadKey, metrics: MeshMetrics) -> Result<Self> {
        Ok(Self {
            router: std::sync::Mutex::new(router),
            hellos: std::sync::Mutex::new(BTreeMap::new()),
            waiting: std::sync::Mutex::new(BTreeSet::new()),
            receipts: std::sync::Mutex::new(BTreeSet::new()),
            answered: std::sync::Mutex::new(BTreeMap::new()),
            ticks: std::sync::atomic::AtomicU64::new(0),
            outbox_key,
            metrics,
            runtime: tokio::runtime::Handle::try_current()
                .context("the messenger starts inside the runtime")?,
        })
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow!("messaging state lock poisoned"))
}

fn held_record(
    upstream: Option<PublicKey>,
    kind: HeldKind,
    envelope: &Envelope,
) -> Result<Vec<u8>> {
    postcard::to_stdvec(&HeldRecord {
        upstream,
        kind,
        envelope: envelope.clone(),
    })
    .context("encoding a held envelope")
}

/// A failure that is this node's, not the envelope's (the disk, a lock, a
/// rate limit): the peer is told "busy" and offers it again later.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Transient(String);

fn transient(e: impl std::fmt::Display) -> anyhow::Error {
    Transient(e.to_string()).into()
}

fn is_transient(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.is::<Transient>() || c.is::<crate::common::store::StoreError>())
}

/// A sealed body opened and its signatures checked, before any state is
/// touched.
enum Opened {
    Hello {
        asker: PublicKey,
        hello: MeshHello,
        contact: MeshContact,
    },
    Bundle {
        peer: PublicKey,
        contact: Box<Signed<MeshContact>>,
        statement: MeshContact,
        bundle: openagi_crypto::ratchet::PreKeyBundle,
    },
    Message {
        sender: PublicKey,
        contact: Box<Signed<MeshContact>>,
        statement: MeshContact,
        message: RatchetMessage,
    },
    Receipt {
        signer: PublicKey,
        receipt: DeliveryReceipt,
    },
}

impl Messenger {
    /// Loads the envelopes and seen ids the store holds into the router
    /// (after a restart), dropping what expired meanwhile.
    pub(super) fn restore_mesh(&self) -> Result<()> {
        let now = crate::unix_ms();
        // Lock order everywhere: ratchet, then the mesh's sets, then the
        // router.
        let mut hellos = lock(&self.mesh.hellos)?;
        let mut receipts = lock(&self.mesh.receipts)?;
        let mut router = lock(&self.mesh.router)?;
        let mut expired = Vec::new();
        for (id, bytes) in self.store.mesh_held()? {
            let record: HeldRecord = match postcard::from_bytes(&bytes) {
                Ok(record) => record,
                Err(e) => {
                    warn!(envelope = %hex::encode(id), error = %e, "unreadable held envelope dropped");
                    expired.push(id);
                    continue;
                }
            };
            let origin = record.upstream.map_or(Origin::Local, Origin::Peer);
            let to = record.envelope.to;
            if router.restore(record.envelope, origin, now) {
                match record.kind {
                    HeldKind::Hello => {
                        hellos.insert(to, EnvelopeId(id));
                    }
                    HeldKind::Receipt => {
                        receipts.insert(EnvelopeId(id));
                    }
                    _ => {}
                }
            } else {
                expired.push(id);
            }
        }
        for (id, expires) in self.store.mesh_seen(now)? {
            router.mark_seen(EnvelopeId(id), expires);
        }
        let stats = router.stats();
        drop((hellos, receipts, router));
        let mut waiting = BTreeSet::new();
        for (number, sealed) in self.store.outbox(WAITING_SCAN)? {
            let entry = self.open_outbox(number, &sealed)?;
            if entry.waits_for_key(now)
                && let Ok(key) = PublicKey::from_hex(&entry.to_key)
            {
                waiting.insert(key);
            }
        }
        *lock(&self.mesh.waiting)? = waiting;
        if !expired.is_empty() {
            self.store.write_msg(MsgWrite {
                release: expired,
                ..MsgWrite::default()
            })?;
        }
        if stats.local + stats.relaying > 0 {
            info!(
                own = stats.local,
                relaying = stats.relaying,
                "mesh envelopes restored"
            );
        }
        self.update_mesh_gauges();
        Ok(())
    }

    /// A peer connected: it gets what waits for it.
    pub fn mesh_peer_up(self: &Arc<Self>, peer: PeerId) {
        let Some(key) = openagi_net::public_key_of(&peer) else {
            return;
        };
        if let Ok(mut router) = lock(&self.mesh.router) {
            router.handle_peer_up(key, crate::unix_ms());
        }
        self.drain_mesh();
    }

    /// A peer's last connection closed.
    pub fn mesh_peer_down(&self, peer: PeerId) {
        let Some(key) = openagi_net::public_key_of(&peer) else {
            return;
        };
        if let Ok(mut router) = lock(&self.mesh.router) {
            router.handle_peer_down(key);
        }
    }

    /// Advances the router's clock: expiries and due retries; now and then
    /// the store forgets the ids of envelopes that expired.
    pub fn mesh_tick(self: &Arc<Self>) {
        let now = crate::unix_ms();
        if let Ok(mut router) = lock(&self.mesh.router) {
            router.handle_tick(now);
        }
        let ticks = self
            .mesh
            .ticks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if ticks % SEEN_PRUNE_TICKS == SEEN_PRUNE_TICKS - 1
            && let Err(e) = self.store.mesh_seen(now)
        {
            warn!(error = %e, "pruning expired envelope ids failed");
        }
        self.drain_mesh();
    }

    /// Carries out the router's outputs: forwards run as tasks (bounded by
    /// the router's in-flight limit per peer), store changes on the
    /// blocking pool.
    pub(super) fn drain_mesh(self: &Arc<Self>) {
        let outputs: Vec<Output> = match lock(&self.mesh.router) {
            Ok(mut router) => std::iter::from_fn(|| router.poll_output()).collect(),
            Err(_) => return,
        };
        let mut store_changes = Vec::new();
        for output in outputs {
            match output {
                Output::Forward { peer, id, envelope } => {
                    let this = self.clone();
                    self.mesh
                        .runtime
                        .spawn(async move { this.forward(peer, id, envelope).await });
                }
                other => store_changes.push(other),
            }
        }
        if !store_changes.is_empty() {
            let this = self.clone();
            self.mesh.runtime.spawn_blocking(move || {
                if let Err(e) = this.apply_mesh_outputs(store_changes) {
                    warn!(error = format!("{e:#}"), "mesh store update failed");
                }
            });
        }
        self.update_mesh_gauges();
    }

    fn apply_mesh_outputs(&self, outputs: Vec<Output>) -> Result<()> {
        // The ratchet lock orders every change of an outbox entry, so a
        // `relayed` read before a receipt's `delivered` never overwrites it.
        let _ratchet = lock(&self.ratchet)?;
        let now = crate::unix_ms();
        let mut write = MsgWrite::default();
        for output in outputs {
            match output {
                Output::Relayed { id } => {
                    if lock(&self.mesh.receipts)?.remove(&id) {
                        // Nobody acknowledges a receipt: once a relay has
                        // it on disk, this node lets go.
                        self.forget_envelopes(&[id]);
                        write.release.push(id.0);
                    } else if let Some(mut entry) = self.outbox_entry_for(&id)?
                        && entry.state == OutboxState::Queued
                    {
                        entry.state = OutboxState::Relayed;
                        entry.updated_unix_ms = now;
                        info!(number = entry.number, to = %entry.to_peer, "message relayed");
                        write
                            .outbox
                            .push((entry.number, self.seal_outbox(&entry)?, None));
                    }
                }
                Output::Dropped { id, reason } => {
                    if reason == DropReason::Expired {
                        debug!(envelope = %id, "mesh envelope expired");
                    }
                    lock(&self.mesh.receipts)?.remove(&id);
                    write.release.push(id.0);
                }
                Output::Forward { .. } => {}
            }
        }
        self.store.write_msg(write)?;
        Ok(())
    }

    fn update_mesh_gauges(&self) {
        if let Ok(router) = lock(&self.mesh.router) {
            let stats = router.stats();
            let m = &self.mesh.metrics;
            m.held
                .get_or_create(&OriginLabels { origin: "own" })
                .set(stats.local as i64);
            m.held
                .get_or_create(&OriginLabels { origin: "relay" })
                .set(stats.relaying as i64);
            m.held_bytes.set(stats.relaying_bytes as i64);
        }
    }

    async fn forward(self: Arc<Self>, peer: PublicKey, id: EnvelopeId, envelope: Box<Envelope>) {
        let to = openagi_net::peer_id_of_key(&peer);
        let result = match self.request(to, &MsgRequest::Relay(envelope)).await {
            Ok(MsgResponse::Relay(RelayAnswer::Accepted)) => ForwardResult::Accepted,
            Ok(MsgResponse::Relay(RelayAnswer::Duplicate)) => ForwardResult::Duplicate,
            Ok(MsgResponse::Relay(RelayAnswer::Busy(why))) => {
                debug!(%to, %why, "relay busy");
                ForwardResult::Busy
            }
            Ok(MsgResponse::Relay(RelayAnswer::Refused(why)) | MsgResponse::Refused(why)) => {
                debug!(%to, %why, "relay refused an envelope");
                ForwardResult::Refused
            }
            Ok(_) => ForwardResult::Refused,
            Err(e) => {
                debug!(%to, error = format!("{e:#}"), "forward failed");
                ForwardResult::Failed
            }
        };
        let label = match result {
            ForwardResult::Accepted => "accepted",
            ForwardResult::Duplicate => "duplicate",
            ForwardResult::Busy => "busy",
            ForwardResult::Refused => "refused",
            ForwardResult::Failed => "failed",
        };
        self.mesh
            .metrics
            .forwarded
            .get_or_create(&ResultLabels { result: label })
            .inc();
        if let Ok(mut router) = lock(&self.mesh.router) {
            router.handle_forward_result(peer, id, result, crate::unix_ms());
        }
        self.drain_mesh();
    }

    /// An envelope a peer handed over on `/openagi/msg/1`. Runs on the
    /// blocking pool (it may write with fsync).
    pub(super) fn take_envelope(self: &Arc<Self>, from: PeerId, envelope: Envelope) -> RelayAnswer {
        let Some(from_key) = openagi_net::public_key_of(&from) else {
            return RelayAnswer::Refused("sender is not an Open-AGI node id".into());
        };
        let now = crate::unix_ms();
        let verdict = match lock(&self.mesh.router) {
            Ok(mut router) => router.handle_incoming(from_key, envelope.clone(), now),
            Err(e) => return RelayAnswer::Busy(e.to_string()),
        };
        let answer = match verdict {
            Err(e) if e.kind() == ErrorKind::Busy => {
                self.mesh.metrics.received("busy");
                RelayAnswer::Busy(e.to_string())
            }
            Err(e) => {
                self.mesh.metrics.received("refused");
                self.net.penalise(from, "msg", "invalid envelope");
                RelayAnswer::Refused(e.to_string())
            }
            Ok(Incoming::Duplicate { .. }) => {
                self.mesh.metrics.received("duplicate");
                RelayAnswer::Duplicate
            }
            Ok(Incoming::Held { id }) => {
                let written =
                    held_record(Some(from_key), HeldKind::Relay, &envelope).and_then(|record| {
                        self.store
                            .write_msg(MsgWrite {
                                hold: vec![(id.0, record)],
                                ..MsgWrite::default()
                            })
                            .map_err(Into::into)
                    });
                match written {
                    Ok(_) => {
                        self.commit_envelopes(&[id]);
                        self.mesh.metrics.received("held");
                        RelayAnswer::Accepted
                    }
                    Err(e) => {
                        warn!(
                            error = format!("{e:#}"),
                            "could not store an envelope to relay"
                        );
                        self.abort_envelopes(&[id]);
                        RelayAnswer::Busy("this relay could not store it".into())
                    }
                }
            }
            Ok(Incoming::ForMe { id }) => match self.open_envelope(id, &envelope, now) {
                Ok(answer) => {
                    if answer == RelayAnswer::Accepted {
                        self.mesh.metrics.received("for_me");
                    }
                    answer
                }
                Err(e) if is_transient(&e) => {
                    self.mesh.metrics.received("busy");
                    debug!(%from, error = format!("{e:#}"), "envelope for this node deferred");
                    RelayAnswer::Busy(format!("{e:#}"))
                }
                Err(e) => {
                    // Remembered (in memory, bounded) so the same bytes
                    // offered again cost nothing.
                    if let Ok(mut router) = lock(&self.mesh.router) {
                        router.mark_seen(id, envelope.expires_unix_ms);
                    }
                    self.mesh.metrics.received("refused");
                    debug!(%from, error = format!("{e:#}"), "envelope for this node refused");
                    RelayAnswer::Refused(format!("{e:#}"))
                }
            },
        };
        self.drain_mesh();
        answer
    }

    /// Opens a body and checks its signatures: no state is read or
    /// changed, so an invalid envelope costs no lock.
    fn open_body(&self, envelope: &Envelope, now: u64) -> Result<Opened> {
        let body: MeshBody = postcard::from_bytes(&envelope.body).context("malformed body")?;
        let sealed = match body {
            MeshBody::Hello(hello) => {
                let asker = *hello.signer();
                let statement = hello.verify().context("hello signature")?;
                if statement.to != self.identity.public() {
                    bail!("hello addressed to another node");
                }
                if statement.created_unix_ms.saturating_add(MAX_LIFETIME_MS) < now
                    || statement.created_unix_ms
                        > now.saturating_add(openagi_mesh::MAX_CLOCK_SKEW_MS)
                {
                    bail!("hello outside its lifetime");
                }
                if *statement.contact.signer() != asker {
                    bail!("hello carries another node's contact statement");
                }
                let contact = statement.contact.verify().context("contact signature")?;
                return Ok(Opened::Hello {
                    asker,
                    hello: statement,
                    contact,
                });
            }
            MeshBody::Sealed(sealed) => sealed,
        };
        let opened = seal::open(
            &self.seal_secret,
            &self.identity.public(),
            SEAL_PURPOSE,
            &sealed,
        )
        .context("sealed body does not open")?;
        Ok(
            match postcard::from_bytes::<SealedBody>(&opened).context("malformed sealed body")? {
                SealedBody::Bundle { contact, bundle } => {
                    let peer = *contact.signer();
                    if *bundle.signer() != peer {
                        bail!("bundle and contact signed by different nodes");
                    }
                    let statement = contact.verify().context("contact signature")?;
                    let bundle = bundle.verify().context("bundle signature")?.bundle;
                    Opened::Bundle {
                        peer,
                        contact,
                        statement,
                        bundle,
                    }
                }
                SealedBody::Message { contact, message } => {
                    let sender = *contact.signer();
                    let statement = contact.verify().context("contact signature")?;
                    Opened::Message {
                        sender,
                        contact,
                        statement,
                        message,
                    }
                }
                SealedBody::Receipt(receipt) => {
                    let signer = *receipt.signer();
                    let receipt = receipt.verify().context("receipt signature")?;
                    if receipt.sender != self.identity.public() {
                        bail!("receipt for another sender");
                    }
                    Opened::Receipt { signer, receipt }
                }
            },
        )
    }

    /// Opens an envelope addressed to this node and acts on it.
    fn open_envelope(
        self: &Arc<Self>,
        id: EnvelopeId,
        envelope: &Envelope,
        now: u64,
    ) -> Result<RelayAnswer> {
        let opened = self.open_body(envelope, now)?;
        if let Opened::Bundle { peer, .. } = &opened
            && !lock(&self.mesh.waiting).map_err(transient)?.contains(peer)
        {
            bail!("a key bundle nobody asked for");
        }
        // The ratchet lock orders everything below against other
        // deliveries, so one envelope arriving by two paths at once is
        // taken once, and every outbox change against the others.
        let mut ratchet = lock(&self.ratchet).map_err(transient)?;
        if self.store.mesh_was_seen(&id.0)? {
            return Ok(RelayAnswer::Duplicate);
        }
        let seen = Some((id.0, envelope.expires_unix_ms));
        let result = match opened {
            Opened::Hello {
                asker,
                hello,
                contact,
            } => self.answer_hello(&mut ratchet, asker, &hello, &contact, seen, now),
            Opened::Bundle {
                peer,
                contact,
                statement,
                bundle,
            } => self.take_bundle(&mut ratchet, peer, &contact, &statement, &bundle, seen, now),
            Opened::Message {
                sender,
                contact,
                statement,
                message,
            } => self.take_message(
                &mut ratchet,
                id,
                sender,
                &contact,
                &statement,
                &message,
                seen,
                now,
            ),
            Opened::Receipt { signer, receipt } => self.take_receipt(signer, &receipt, seen),
        };
        if let Err(e) = result {
            if is_transient(&e) {
                // What the ratchet did in memory never reached the disk:
                // go back to what did.
                self.reload_ratchet(&mut ratchet);
            }
            return Err(e);
        }
        drop(ratchet);
        if let Ok(mut router) = lock(&self.mesh.router) {
            router.mark_seen(id, envelope.expires_unix_ms);
        }
        Ok(RelayAnswer::Accepted)
    }

    /// Replaces the in-memory ratchet with the one on disk.
    fn reload_ratchet(&self, ratchet: &mut Ratchet) {
        match self.store.ratchet_pickle() {
            Ok(Some(bytes)) => match Ratchet::from_pickle(&bytes, &self.pickle_key) {
                Ok(stored) => *ratchet = stored,
                Err(e) => warn!(error = %e, "stored messaging state unreadable"),
            },
            Ok(None) => {}
            Err(e) => warn!(error = %e, "could not reread the messaging state"),
        }
    }

    /// This node's signed contact statement.
    fn contact_statement(&self, ratchet: &Ratchet) -> Result<Signed<MeshContact>> {
        Ok(Signed::sign(
            &self.identity,
            &MeshContact {
                seal_key: self.seal_secret.public(),
                ratchet: RatchetKeyStatement {
                    identity_key: ratchet.identity_key(),
                    retired_identity_key: ratchet.retired_identity_key(),
                },
            },
        )?)
    }

    /// An envelope to `to` carrying `body` sealed to `seal_key`.
    fn sealed_envelope(
        &self,
        to: PublicKey,
        seal_key: &X25519Public,
        body: &SealedBody,
        now: u64,
    ) -> Result<Envelope> {
        // The seal binds the recipient's own key as the "sender": the body
        // proves who sent it, the envelope says nothing about it.
        let sealed = seal::seal(seal_key, &to, SEAL_PURPOSE, &postcard::to_stdvec(body)?)?;
        Ok(Envelope {
            to,
            expires_unix_ms: now + MAX_LIFETIME_MS,
            hops_left: DEFAULT_HOPS,
            body: postcard::to_stdvec(&MeshBody::Sealed(sealed))?,
        })
    }

    /// Hands `envelope` to the router as this node's own; nothing is sent
    /// until the caller has written it (`hold`) and called
    /// [`Messenger::commit_envelopes`] ([`Messenger::abort_envelopes`] if
    /// the write failed).
    fn originate(
        &self,
        kind: HeldKind,
        envelope: &Envelope,
        now: u64,
    ) -> Result<(EnvelopeId, Vec<u8>)> {
        let id = lock(&self.mesh.router)?
            .originate(envelope.clone(), now)
            .map_err(transient)?;
        Ok((id, held_record(None, kind, envelope)?))
    }

    fn commit_envelopes(&self, ids: &[EnvelopeId]) {
        if let Ok(mut router) = lock(&self.mesh.router) {
            for id in ids {
                router.commit(id);
            }
        }
    }

    fn abort_envelopes(&self, ids: &[EnvelopeId]) {
        if let Ok(mut router) = lock(&self.mesh.router) {
            for id in ids {
                router.abort(id);
            }
        }
    }

    fn forget_envelopes(&self, ids: &[EnvelopeId]) {
        if let Ok(mut router) = lock(&self.mesh.router) {
            for id in ids {
                router.forget(id);
            }
        }
    }

    fn answer_hello(
        &self,
        ratchet: &mut Ratchet,
        asker: PublicKey,
        hello: &MeshHello,
        contact: &MeshContact,
        seen: Option<([u8; 32], u64)>,
        now: u64,
    ) -> Result<()> {
        {
            let answered = lock(&self.mesh.answered).map_err(transient)?;
            if answered
                .get(&asker)
                .is_some_and(|&created| created >= hello.created_unix_ms)
            {
                bail!("this hello (or a newer one) was answered already");
            }
        }
        if !self.allow_bundle(asker) {
            return Err(transient(format!("too many key requests from {asker}")));
        }
        let bundle = ratchet
            .publish_bundles(1)
            .into_iter()
            .next()
            .context("no one-time key generated")?;
        let body = SealedBody::Bundle {
            contact: Box::new(self.contact_statement(ratchet)?),
            bundle: Box::new(Signed::sign(&self.identity, &BundleStatement { bundle })?),
        };
        let envelope = self.sealed_envelope(asker, &contact.seal_key, &body, now)?;
        let (answer_id, record) = self.originate(HeldKind::Bundle, &envelope, now)?;
        let written = self.store.write_msg(MsgWrite {
            ratchet: Some(&ratchet.pickle(&self.pickle_key)?),
            seen,
            hold: vec![(answer_id.0, record)],
            contact: Some((asker.to_bytes(), postcard::to_stdvec(&hello.contact)?)),
            ..MsgWrite::default()
        });
        if let Err(e) = written {
            self.abort_envelopes(&[answer_id]);
            return Err(e.into());
        }
        self.commit_envelopes(&[answer_id]);
        let mut answered = lock(&self.mesh.answered).map_err(transient)?;
        if answered.len() >= MAX_ANSWERED_HELLOS && !answered.contains_key(&asker) {
            answered.pop_first();
        }
        answered.insert(asker, hello.created_unix_ms);
        info!(to = %openagi_net::peer_id_of_key(&asker), "key bundle sent through the mesh");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn take_bundle(
        &self,
        ratchet: &mut Ratchet,
        peer: PublicKey,
        contact: &Signed<MeshContact>,
        statement: &MeshContact,
        bundle: &openagi_crypto::ratchet::PreKeyBundle,
        seen: Option<([u8; 32], u64)>,
        now: u64,
    ) -> Result<()> {
        let hello = lock(&self.mesh.hellos)
            .map_err(transient)?
            .get(&peer)
            .copied();
        ratchet.start_session(&peer, bundle)?;
        let Encrypted { ids, holds, outbox } =
            self.encrypt_waiting(ratchet, peer, statement, now)?;
        let written = self.store.write_msg(MsgWrite {
            ratchet: Some(&ratchet.pickle(&self.pickle_key)?),
            seen,
            hold: holds,
            release: hello.iter().map(|id| id.0).collect(),
            outbox,
            contact: Some((peer.to_bytes(), postcard::to_stdvec(contact)?)),
            ..MsgWrite::default()
        });
        if let Err(e) = written {
            self.abort_envelopes(&ids);
            return Err(e.into());
        }
        self.commit_envelopes(&ids);
        lock(&self.mesh.hellos).map_err(transient)?.remove(&peer);
        lock(&self.mesh.waiting).map_err(transient)?.remove(&peer);
        self.forget_envelopes(&hello.into_iter().collect::<Vec<_>>());
        info!(peer = %openagi_net::peer_id_of_key(&peer), messages = ids.len(), "session opened through the mesh; queued messages sent");
        Ok(())
    }

    /// Encrypts the outbox entries waiting for `peer`'s key into envelopes,
    /// as many as this node's own queue takes (the rest wait for the next
    /// message to `peer`). The caller writes the result.
    fn encrypt_waiting(
        &self,
        ratchet: &mut Ratchet,
        peer: PublicKey,
        contact: &MeshContact,
        now: u64,
    ) -> Result<Encrypted> {
        let peer_hex = peer.to_hex();
        let mut ids = Vec::new();
        let mut holds = Vec::new();
        let mut outbox = Vec::new();
        let my_contact = self.contact_statement(ratchet)?;
        for (number, sealed) in self.store.outbox(WAITING_SCAN)? {
            let mut entry = self.open_outbox(number, &sealed)?;
            if entry.to_key != peer_hex || !entry.waits_for_key(now) {
                continue;
            }
            let full = lock(&self.mesh.router)
                .map(|r| r.stats().local >= r.limits().max_local)
                .unwrap_or(true);
            if full {
                break;
            }
            let message = ratchet.encrypt(&peer, entry.text.as_bytes())?;
            let body = SealedBody::Message {
                contact: Box::new(my_contact.clone()),
                message,
            };
            let envelope = self.sealed_envelope(peer, &contact.seal_key, &body, now)?;
            let (id, record) = match self.originate(HeldKind::Message, &envelope, now) {
                Ok(done) => done,
                Err(e) => {
                    self.abort_envelopes(&ids);
                    return Err(e);
                }
            };
            entry.envelope = Some(id.to_hex());
            entry.updated_unix_ms = now;
            ids.push(id);
            holds.push((id.0, record));
            outbox.push((number, self.seal_outbox(&entry)?, Some(id.0)));
        }
        Ok(Encrypted { ids, holds, outbox })
    }

    #[allow(clippy::too_many_arguments)]
    fn take_message(
        &self,
        ratchet: &mut Ratchet,
        id: EnvelopeId,
        sender: PublicKey,
        contact: &Signed<MeshContact>,
        statement: &MeshContact,
        message: &RatchetMessage,
        seen: Option<([u8; 32], u64)>,
        now: u64,
    ) -> Result<()> {
        let plaintext = ratchet.decrypt(&sender, &statement.ratchet.keys(), message)?;
        if plaintext.len() > MAX_TEXT_BYTES {
            // Decrypted, so the session moved on: refuse without keeping
            // the text, but keep the session where it is now.
            self.store
                .save_ratchet(&ratchet.pickle(&self.pickle_key)?, None)?;
            bail!("message longer than {MAX_TEXT_BYTES} bytes");
        }
        let sender_peer = openagi_net::peer_id_of_key(&sender);
        let entry = InboxEntry {
            number: 0,
            from_peer: sender_peer.to_string(),
            from_key: sender.to_hex(),
            received_unix_ms: now,
            text: String::from_utf8_lossy(&plaintext).into_owned(),
        };
        let receipt = Signed::sign(
            &self.identity,
            &DeliveryReceipt {
                envelope: id,
                sender,
            },
        )?;
        let receipt_envelope = self.sealed_envelope(
            sender,
            &statement.seal_key,
            &SealedBody::Receipt(Box::new(receipt)),
            now,
        )?;
        // The message is taken even when the receipt cannot be queued
        // (this node's own queue is full): the sender then sees `relayed`
        // and never `delivered`, which is true of what it knows.
        let receipt = match self.originate(HeldKind::Receipt, &receipt_envelope, now) {
            Ok(receipt) => Some(receipt),
            Err(e) => {
                warn!(error = format!("{e:#}"), "no delivery receipt sent");
                None
            }
        };
        let receipt_ids: Vec<EnvelopeId> = receipt.iter().map(|(id, _)| *id).collect();
        let inbox = self.seal_inbox(&entry)?;
        let written = self.store.write_msg(MsgWrite {
            ratchet: Some(&ratchet.pickle(&self.pickle_key)?),
            inbox: Some(&inbox),
            seen,
            hold: receipt
                .iter()
                .map(|(id, record)| (id.0, record.clone()))
                .collect(),
            contact: Some((sender.to_bytes(), postcard::to_stdvec(contact)?)),
            ..MsgWrite::default()
        });
        let number = match written {
            Ok(written) => written.inbox,
            Err(e) => {
                self.abort_envelopes(&receipt_ids);
                return Err(e.into());
            }
        };
        if let Ok(mut receipts) = lock(&self.mesh.receipts) {
            receipts.extend(receipt_ids.iter().copied());
        }
        self.commit_envelopes(&receipt_ids);
        self.mesh.metrics.delivered.inc();
        info!(from = %sender_peer, bytes = entry.text.len(), number = ?number, "message received through the mesh");
        Ok(())
    }

    fn take_receipt(
        &self,
        signer: PublicKey,
        receipt: &DeliveryReceipt,
        seen: Option<([u8; 32], u64)>,
    ) -> Result<()> {
        let Some(mut entry) = self.outbox_entry_for(&receipt.envelope)? else {
            // Not a message of ours, or rotated out of the outbox: nothing
            // to mark, and nothing written (a receipt costs no disk).
            bail!("a receipt for no message in the outbox");
        };
        if entry.to_key != signer.to_hex() {
            bail!("receipt signed by a node the message was not for");
        }
        if entry.state == OutboxState::Delivered {
            return Ok(());
        }
        entry.state = OutboxState::Delivered;
        entry.updated_unix_ms = crate::unix_ms();
        self.store.write_msg(MsgWrite {
            seen,
            release: vec![receipt.envelope.0],
            outbox: vec![(entry.number, self.seal_outbox(&entry)?, None)],
            ..MsgWrite::default()
        })?;
        self.forget_envelopes(&[receipt.envelope]);
        self.mesh.metrics.receipts.inc();
        info!(number = entry.number, to = %entry.to_peer, "message delivered (signed receipt)");
        Ok(())
    }

    /// Queues `text` for `peer` through the mesh: encrypted now when a
    /// session and the peer's contact are known, otherwise after a hello
    /// brings its key. Runs on the blocking pool.
    pub(super) fn queue_for_mesh(
        self: &Arc<Self>,
        peer: PublicKey,
        text: String,
    ) -> Result<SendOutcome> {
        let now = crate::unix_ms();
        let contact = match self.store.mesh_contact(&peer.to_bytes())? {
            Some(bytes) => {
                let signed: Signed<MeshContact> =
                    postcard::from_bytes(&bytes).context("stored mesh contact")?;
                (*signed.signer() == peer)
                    .then(|| signed.verify().ok())
                    .flatten()
            }
            None => None,
        };
        let entry = OutboxEntry::new(peer, now, OutboxState::Queued, Route::Mesh, text);
        let mut ratchet = lock(&self.ratchet)?;
        // The entry is written first, waiting for a key; with a session it
        // is encrypted at once, with any that waited before it.
        let number = *self
            .store
            .write_msg(MsgWrite {
                outbox: vec![(0, self.seal_outbox(&entry)?, None)],
                ..MsgWrite::default()
            })?
            .outbox
            .first()
            .context("no outbox number assigned")?;
        match contact {
            Some(contact) if ratchet.has_session(&peer) => {
                let sent = self
                    .encrypt_waiting(&mut ratchet, peer, &contact, now)
                    .and_then(|Encrypted { ids, holds, outbox }| {
                        let written = self.store.write_msg(MsgWrite {
                            ratchet: Some(&ratchet.pickle(&self.pickle_key)?),
                            hold: holds,
                            outbox,
                            ..MsgWrite::default()
                        });
                        match written {
                            Ok(_) => {
                                self.commit_envelopes(&ids);
                                Ok(())
                            }
                            Err(e) => {
                                self.abort_envelopes(&ids);
                                Err(e.into())
                            }
                        }
                    });
                if let Err(e) = sent {
                    self.reload_ratchet(&mut ratchet);
                    return Err(e);
                }
            }
            _ => {
                lock(&self.mesh.waiting)?.insert(peer);
                let mut hellos = lock(&self.mesh.hellos)?;
                let pending = hellos
                    .get(&peer)
                    .is_some_and(|id| lock(&self.mesh.router).is_ok_and(|r| r.holds(id)));
                if !pending {
                    let hello = Signed::sign(
                        &self.identity,
                        &MeshHello {
                            to: peer,
                            created_unix_ms: now,
                            contact: Box::new(self.contact_statement(&ratchet)?),
                        },
                    )?;
                    let envelope = Envelope {
                        to: peer,
                        expires_unix_ms: now + MAX_LIFETIME_MS,
                        hops_left: DEFAULT_HOPS,
                        body: postcard::to_stdvec(&MeshBody::Hello(Box::new(hello)))?,
                    };
                    let (id, record) = self.originate(HeldKind::Hello, &envelope, now)?;
                    if let Err(e) = self.store.write_msg(MsgWrite {
                        hold: vec![(id.0, record)],
                        ..MsgWrite::default()
                    }) {
                        self.abort_envelopes(&[id]);
                        return Err(e.into());
                    }
                    hellos.insert(peer, id);
                    drop(hellos);
                    self.commit_envelopes(&[id]);
                }
            }
        }
        drop(ratchet);
        info!(number, to = %entry.to_peer, "message queued for the mesh");
        self.drain_mesh();
        Ok(SendOutcome {
            number,
            state: OutboxState::Queued,
            route: Route::Mesh,
        })
    }

    /// Records a message delivered straight to a connected peer.
    pub(super) fn record_direct(&self, peer: PublicKey, text: String) -> Result<SendOutcome> {
        let now = crate::unix_ms();
        let entry = OutboxEntry::new(peer, now, OutboxState::Delivered, Route::Direct, text);
        let written = self.store.write_msg(MsgWrite {
            outbox: vec![(0, self.seal_outbox(&entry)?, None)],
            ..MsgWrite::default()
        })?;
        Ok(SendOutcome {
            number: written.outbox.first().copied().unwrap_or(0),
            state: OutboxState::Delivered,
            route: Route::Direct,
        })
    }

    fn seal_outbox(&self, entry: &OutboxEntry) -> Result<Vec<u8>> {
        Ok(aead::seal_random(
            &self.mesh.outbox_key,
            OUTBOX_AAD,
            &postcard::to_stdvec(entry)?,
        )?)
    }

    fn open_outbox(&self, number: u64, sealed: &[u8]) -> Result<OutboxEntry> {
        let bytes = aead::open_random(&self.mesh.outbox_key, OUTBOX_AAD, sealed)
            .with_context(|| format!("outbox entry {number}"))?;
        let mut entry: OutboxEntry =
            postcard::from_bytes(&bytes).with_context(|| format!("outbox entry {number}"))?;
        entry.number = number;
        Ok(entry)
    }

    fn outbox_entry_for(&self, id: &EnvelopeId) -> Result<Option<OutboxEntry>> {
        let Some(number) = self.store.outbox_for_envelope(&id.0)? else {
            return Ok(None);
        };
        match self.store.outbox_entry(number)? {
            Some(sealed) => Ok(Some(self.open_outbox(number, &sealed)?)),
            None => Ok(None),
        }
    }

    /// The newest `limit` sent messages, oldest first, with their state as
    /// of now.
    pub fn outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        let now = crate::unix_ms();
        self.store
            .outbox(limit.min(MAX_OUTBOX_PAGE))?
            .into_iter()
            .map(|(number, sealed)| {
                let mut entry = self.open_outbox(number, &sealed)?;
                entry.state = entry.state_at(now);
                Ok(entry)
            })
            .collect()
    }

    /// The router's counts, for status.
    pub fn mesh_stats(&self) -> Option<openagi_mesh::RouterStats> {
        lock(&self.mesh.router).ok().map(|r| r.stats())
    }
}

/// Runs the router's clock until the process ends.
pub fn spawn_mesh_clock(messenger: Arc<Messenger>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MESH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let messenger = messenger.clone();
            // The tick may write to the store (expired envelopes).
            let _ = tokio::task::spawn_blocking(move || messenger.mesh_tick()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::store::Store;
    use openagi_crypto::Identity;

    /// A messenger on its own store and an idle loopback network: the test
    /// carries envelopes between messengers by hand.
    fn messenger(seed: u8, dir: &std::path::Path) -> (Arc<Messenger>, PeerId, Arc<Store>) {
        let identity = Identity::from_seed(&[seed; 32]);
        std::fs::create_dir_all(dir).expect("dir");
        let store = Arc::new(Store::open(dir).expect("store"));
        let mut config = crate::common::config::Config::default();
        config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        config.network.transport = openagi_net::TransportMode::Direct;
        let keypair = openagi_net::keypair_from_identity(&identity).expect("keypair");
        let mut registry = Registry::default();
        let (net, _events, _task) = openagi_net::NetworkService::start(
            keypair,
            config.net_config("test").expect("net config"),
            &mut registry,
        )
        .expect("net");
        let peer = net.local_peer_id();
        let m = Messenger::start(&identity, store.clone(), net, &mut registry).expect("messenger");
        (m, peer, store)
    }

    /// The envelopes `store` holds, decoded.
    fn held(store: &Store) -> Vec<(EnvelopeId, HeldRecord)> {
        store
            .mesh_held()
            .expect("held")
            .into_iter()
            .map(|(id, bytes)| {
                (
                    EnvelopeId(id),
                    postcard::from_bytes(&bytes).expect("record"),
                )
            })
            .collect()
    }

    /// The one envelope `store` holds that is not in `before`.
    fn new_envelope(store: &Store, before: &[EnvelopeId]) -> Envelope {
        let mut fresh: Vec<Envelope> = held(store)
            .into_iter()
            .filter(|(id, _)| !before.contains(id))
            .map(|(_, r)| r.envelope)
            .collect();
        assert_eq!(fresh.len(), 1, "exactly one new envelope");
        fresh.remove(0)
    }

    fn ids(store: &Store) -> Vec<EnvelopeId> {
        held(store).into_iter().map(|(id, _)| id).collect()
    }

    async fn hand(to: &Arc<Messenger>, from: PeerId, envelope: Envelope) -> RelayAnswer {
        let to = to.clone();
        tokio::task::spawn_blocking(move || to.take_envelope(from, envelope))
            .await
            .expect("task")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn first_contact_message_and_receipt_by_hand() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, a_peer, a_store) = messenger(1, &tmp.path().join("a"));
        let (c, c_peer, c_store) = messenger(3, &tmp.path().join("c"));
        let c_key = Identity::from_seed(&[3; 32]).public();
        let a_key = Identity::from_seed(&[1; 32]).public();

        // No session: a hello goes out and the message waits.
        let outcome = {
            let a = a.clone();
            tokio::task::spawn_blocking(move || a.queue_for_mesh(c_key, "over the mesh".into()))
                .await
                .expect("task")
                .expect("queued")
        };
        assert_eq!(outcome.state, OutboxState::Queued);
        let hello = new_envelope(&a_store, &[]);
        assert!(matches!(
            postcard::from_bytes::<MeshBody>(&hello.body),
            Ok(MeshBody::Hello(_))
        ));

        // A hello addressed to C cannot be taken by another node.
        let (b, _b_peer, _) = messenger(2, &tmp.path().join("b"));
        let mut misdirected = hello.clone();
        misdirected.to = Identity::from_seed(&[2; 32]).public();
        assert!(matches!(
            hand(&b, a_peer, misdirected).await,
            RelayAnswer::Refused(_)
        ));

        // C answers with a bundle sealed to A.
        let c_before = ids(&c_store);
        assert_eq!(hand(&c, a_peer, hello.clone()).await, RelayAnswer::Accepted);
        assert_eq!(
            hand(&c, a_peer, hello.clone()).await,
            RelayAnswer::Duplicate,
            "the same hello again"
        );
        // A relay re-wrapping the signed hello in a new envelope gets no
        // second key for it.
        let rewrapped = Envelope {
            expires_unix_ms: hello.expires_unix_ms - 1,
            ..hello
        };
        assert!(matches!(
            hand(&c, a_peer, rewrapped).await,
            RelayAnswer::Refused(why) if why.contains("answered already")
        ));
        let bundle = new_envelope(&c_store, &c_before);
        assert_eq!(bundle.to, a_key);

        // A opens the session and sends the waiting message, sealed: a
        // relay sees neither the text nor who sent it.
        let a_before = ids(&a_store);
        assert_eq!(hand(&a, c_peer, bundle).await, RelayAnswer::Accepted);
        let message = new_envelope(&a_store, &a_before);
        let message_id = message.id();
        let bytes = message.encode();
        assert!(!bytes.windows(13).any(|w| w == b"over the mesh"));
        assert!(!bytes.windows(32).any(|w| w == a_key.to_bytes()));

        // A tampered copy is refused; the real one taken once.
        let mut tampered = message.clone();
        if let Some(byte) = tampered.body.last_mut() {
            *byte ^= 1;
        }
        assert!(matches!(
            hand(&c, a_peer, tampered).await,
            RelayAnswer::Refused(_)
        ));
        let c_before = ids(&c_store);
        assert_eq!(
            hand(&c, a_peer, message.clone()).await,
            RelayAnswer::Accepted
        );
        assert_eq!(hand(&c, a_peer, message).await, RelayAnswer::Duplicate);
        let texts: Vec<String> = c
            .inbox(10)
            .expect("inbox")
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(texts, ["over the mesh"]);

        // A receipt signed by a node the message was not for is refused.
        let forged = Signed::sign(
            &Identity::from_seed(&[2; 32]),
            &DeliveryReceipt {
                envelope: message_id,
                sender: a_key,
            },
        )
        .expect("signed");
        let forged = a
            .sealed_envelope(
                a_key,
                &a.seal_secret.public(),
                &SealedBody::Receipt(Box::new(forged)),
                crate::unix_ms(),
            )
            .expect("sealed");
        assert!(matches!(
            hand(&a, c_peer, forged).await,
            RelayAnswer::Refused(_)
        ));

        // The receipt turns A's entry delivered and A lets go of its copy.
        let receipt = new_envelope(&c_store, &c_before);
        assert_eq!(a.outbox(10).expect("outbox")[0].state, OutboxState::Queued);
        assert_eq!(
            hand(&a, c_peer, receipt.clone()).await,
            RelayAnswer::Accepted
        );
        let entry = &a.outbox(10).expect("outbox")[0];
        assert_eq!(entry.state, OutboxState::Delivered);
        assert_eq!(entry.route, Route::Mesh);
        assert!(
            held(&a_store)
                .iter()
                .all(|(id, _)| Some(id.to_hex()) != entry.envelope),
            "the delivered message is no longer held"
        );
    }

    #[test]
    fn a_queued_message_expires_after_the_longest_lifetime() {
        let entry = OutboxEntry {
            number: 1,
            to_peer: String::new(),
            to_key: String::new(),
            created_unix_ms: 1_000,
            updated_unix_ms: 1_000,
            state: OutboxState::Relayed,
            route: Route::Mesh,
            envelope: None,
            text: String::new(),
        };
        assert_eq!(
            entry.state_at(1_000 + MAX_LIFETIME_MS - 1),
            OutboxState::Relayed
        );
        assert_eq!(
            entry.state_at(1_000 + MAX_LIFETIME_MS),
            OutboxState::Expired
        );
        let delivered = OutboxEntry {
            state: OutboxState::Delivered,
            ..entry
        };
        assert_eq!(
            delivered.state_at(u64::MAX),
            OutboxState::Delivered,
            "delivered stays delivered"
        );
    }
}
