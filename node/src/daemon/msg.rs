//! End-to-end encrypted messages between operators: Double Ratchet (Olm)
//! sessions over `/openagi/msg/1`.
//!
//! A sender without a session fetches one of the recipient's one-time key
//! bundles (signed by the recipient's node identity, so nobody in between
//! can substitute a key), opens a session, and delivers ratchet messages
//! together with its own ratchet identity key signed by its node identity.
//! The receiver checks that signature against the peer id the connection
//! authenticated, decrypts, and acknowledges only after the new session
//! state and the inbox entry are on disk in one fsynced transaction.
//!
//! The ratchet state (account and sessions) is pickled encrypted under a
//! key derived from the node identity and written after every change;
//! inbox entries are encrypted under another such key. Every bundle fetch
//! creates a fresh one-time key, so a published key is used at most once.
//! Keys handed out but never used are retired on a schedule
//! (`node.one_time_key_rotation_secs`): the ratchet account is rotated, the
//! previous one answers for one more period, and each rotation is written
//! to the audit trail.
//!
//! A peer this node is not connected to is reached through the mesh
//! instead (`mesh.rs`): the message waits in the outbox and travels in
//! sealed envelopes from relay to relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use openagi_crypto::aead::{self, AeadKey};
use openagi_crypto::identity::SignedPayload;
use openagi_crypto::keystore::storage_key;
use openagi_crypto::ratchet::{
    DEFAULT_MAX_SESSIONS_PER_PEER, PreKeyBundle, Ratchet, RatchetMessage,
};
use openagi_crypto::seal::{X25519Public, X25519Secret};
use openagi_crypto::{Identity, PublicKey, Signed};
use openagi_net::{MsgReply, NetHandle, PeerId};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::mesh::{MeshMetrics, MeshState, OUTBOX_PURPOSE, RelayAnswer, SendOutcome};
use crate::common::store::Store;

/// Largest message text, in bytes (UTF-8).
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Most inbox entries one API call returns.
pub const MAX_INBOX_PAGE: usize = 1000;
/// Most bundle fetches answered per peer per [`FETCH_WINDOW`]: each one
/// generates a key and writes the state with fsync, so an unbounded rate
/// would let any peer keep the disk busy.
pub const MAX_FETCHES_PER_WINDOW: u32 = 10;
/// The window of [`MAX_FETCHES_PER_WINDOW`].
pub const FETCH_WINDOW: Duration = Duration::from_secs(60);
/// Most peers tracked by the fetch limiter.
const MAX_TRACKED_FETCHERS: usize = 4096;
const PICKLE_PURPOSE: &str = "openagi/msg/ratchet-pickle/v1";
const INBOX_PURPOSE: &str = "openagi/msg/inbox/v1";
const INBOX_AAD: &[u8] = b"openagi/msg/inbox-entry/v1";

/// A one-time key bundle, signed by the node that will answer to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleStatement {
    /// The bundle.
    pub bundle: PreKeyBundle,
}

impl SignedPayload for BundleStatement {
    const CONTEXT: &'static str = "openagi/msg/bundle/v1";
}

/// A node's ratchet identity keys, signed by its node identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatchetKeyStatement {
    /// The current account's Curve25519 identity key.
    pub identity_key: X25519Public,
    /// The retired account's key, still vouched for until the next
    /// rotation: sessions opened before the sender's last rotation carry it.
    pub retired_identity_key: Option<X25519Public>,
}

impl RatchetKeyStatement {
    /// Every key the statement vouches for.
    pub fn keys(&self) -> Vec<X25519Public> {
        std::iter::once(self.identity_key)
            .chain(self.retired_identity_key)
            .collect()
    }
}

impl SignedPayload for RatchetKeyStatement {
    const CONTEXT: &'static str = "openagi/msg/ratchet-key/v1";
}

/// A request on `/openagi/msg/1` (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MsgRequest {
    /// Asks for one fresh one-time key bundle.
    FetchBundle,
    /// Delivers one ratchet message.
    Deliver {
        /// The sender's ratchet identity key, signed by its node identity.
        sender_key: Box<Signed<RatchetKeyStatement>>,
        /// The message.
        message: RatchetMessage,
    },
    /// Hands over an envelope to relay or take (`mesh.rs`).
    Relay(Box<openagi_mesh::Envelope>),
}

/// A response on `/openagi/msg/1` (postcard).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MsgResponse {
    /// A signed bundle.
    Bundle(Box<Signed<BundleStatement>>),
    /// The message is stored.
    Delivered,
    /// Refused, with the reason (no session, replay, tampering, size).
    Refused(String),
    /// The answer to [`MsgRequest::Relay`].
    Relay(RelayAnswer),
}

/// A received message, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Arrival number (increasing).
    #[serde(default)]
    pub number: u64,
    /// The sender's peer id.
    pub from_peer: String,
    /// The sender's Ed25519 public key (hex).
    pub from_key: String,
    /// Unix milliseconds of arrival.
    pub received_unix_ms: u64,
    /// The text.
    pub text: String,
}

/// Counts bundle fetches per peer in fixed windows.
#[derive(Debug, Default)]
struct FetchLimiter {
    peers: HashMap<PublicKey, (Instant, u32)>,
}

impl FetchLimiter {
    /// Whether `peer` may fetch another bundle at `now` (and counts it).
    fn allow(&mut self, peer: PublicKey, now: Instant) -> bool {
        if self.peers.len() >= MAX_TRACKED_FETCHERS {
            self.peers
                .retain(|_, (start, _)| now.duration_since(*start) < FETCH_WINDOW);
            if self.peers.len() >= MAX_TRACKED_FETCHERS && !self.peers.contains_key(&peer) {
                return false;
            }
        }
        let (start, count) = self.peers.entry(peer).or_insert((now, 0));
        if now.duration_since(*start) >= FETCH_WINDOW {
            *start = now;
            *count = 0;
        }
        if *count >= MAX_FETCHES_PER_WINDOW {
            return false;
        }
        *count += 1;
        true
    }
}

/// The node's messaging service.
pub struct Messenger {
    fetches: Mutex<FetchLimiter>,
    pub(super) identity: Identity,
    pub(super) ratchet: Mutex<Ratchet>,
    pub(super) pickle_key: AeadKey,
    inbox_key: AeadKey,
    pub(super) store: Arc<Store>,
    pub(super) net: NetHandle,
    /// The node's static X25519 key: mesh bodies are sealed to it.
    pub(super) seal_secret: X25519Secret,
    pub(super) mesh: MeshState,
}

fn peer_key(peer: &PeerId) -> Result<PublicKey> {
    openagi_net::public_key_of(peer)
        .with_context(|| format!("{peer} is not an Open-AGI node id (no Ed25519 key in it)"))
}

impl Messenger {
    /// Loads the ratchet state and the mesh's envelopes from the store, or
    /// creates (and stores) a new account. Call inside the runtime.
    pub fn start(
        identity: &Identity,
        store: Arc<Store>,
        net: NetHandle,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Arc<Self>> {
        let pickle_key = storage_key(identity, PICKLE_PURPOSE);
        let inbox_key = storage_key(identity, INBOX_PURPOSE);
        let ratchet = match store.ratchet_pickle()? {
            Some(bytes) => match Ratchet::from_pickle(&bytes, &pickle_key) {
                Ok(ratchet) => Some(ratchet),
                Err(e) => {
                    // The key derives from the identity: after `keys rotate`
                    // the old state cannot be opened, and must not block the
                    // node. Peers re-establish sessions on their next send.
                    warn!(error = %e, "stored messaging sessions cannot be opened (identity rotated?); starting with a new account");
                    None
                }
            },
            None => None,
        };
        let fresh = ratchet.is_none();
        let ratchet = ratchet.unwrap_or_else(|| {
            Ratchet::new(DEFAULT_MAX_SESSIONS_PER_PEER, crate::unix_ms() / 1000)
        });
        if fresh {
            store.save_ratchet(&ratchet.pickle(&pickle_key)?, None)?;
        }
        let mesh = MeshState::new(
            openagi_mesh::Router::new(identity.public(), openagi_mesh::Limits::default()),
            storage_key(identity, OUTBOX_PURPOSE),
            MeshMetrics::register(registry),
        )?;
        let messenger = Arc::new(Self {
            fetches: Mutex::new(FetchLimiter::default()),
            identity: Identity::from_seed(&identity.seed()),
            ratchet: Mutex::new(ratchet),
            pickle_key,
            inbox_key,
            store,
            net,
            seal_secret: X25519Secret::derive_from_identity(identity),
            mesh,
        });
        messenger
            .restore_mesh()
            .context("restoring the mesh queue")?;
        Ok(messenger)
    }

    /// Whether `peer` may have another one-time key bundle now (direct
    /// fetches and mesh hellos share the limit).
    pub(super) fn allow_bundle(&self, peer: PublicKey) -> bool {
        self.fetches
            .lock()
            .is_ok_and(|mut limiter| limiter.allow(peer, Instant::now()))
    }

    /// An inbox entry encrypted for the store.
    pub(super) fn seal_inbox(&self, entry: &InboxEntry) -> Result<Vec<u8>> {
        Ok(aead::seal_random(
            &self.inbox_key,
            INBOX_AAD,
            &postcard::to_stdvec(entry)?,
        )?)
    }

    /// The statement vouching for `ratchet`'s identity keys.
    fn key_statement(&self, ratchet: &Ratchet) -> Result<Signed<RatchetKeyStatement>> {
        Ok(Signed::sign(
            &self.identity,
            &RatchetKeyStatement {
                identity_key: ratchet.identity_key(),
                retired_identity_key: ratchet.retired_identity_key(),
            },
        )?)
    }

    /// Rotates the ratchet account if it is at least `every` old at
    /// `now_unix_secs` (see the module doc); returns whether it did. The
    /// new state is on disk before this returns.
    pub fn rotate_if_due(&self, now_unix_secs: u64, every: Duration) -> Result<bool> {
        let due = |r: &Ratchet| {
            now_unix_secs.saturating_sub(r.account_created_unix_secs()) >= every.as_secs()
        };
        // Checked first without saving: the check runs every minute, and
        // saving re-encrypts and fsyncs the whole messaging state.
        let due_now = due(&*self
            .ratchet
            .lock()
            .map_err(|_| anyhow::anyhow!("messaging state lock poisoned"))?);
        if !due_now {
            return Ok(false);
        }
        let (rotated, _) = self.with_ratchet(
            |r| {
                if !due(r) {
                    return Ok(None);
                }
                let dropped = r.rotate_account(now_unix_secs);
                Ok(Some((dropped, r.identity_key())))
            },
            |_| Ok(None),
        )?;
        if let Some((dropped, key)) = rotated {
            info!(
                target: "audit",
                event = "one_time_keys_rotated",
                new_ratchet_key = %hex::encode(key.to_bytes()),
                unused_keys_dropped = dropped,
                "messaging one-time keys rotated; keys handed out before the previous rotation no longer open sessions"
            );
        }
        Ok(rotated.is_some())
    }

    /// Runs `f` on the ratchet and, if it succeeds, persists the new state
    /// (with an optional inbox entry built from its result) before the
    /// lock is released: the state on disk is never behind what was used.
    fn with_ratchet<T>(
        &self,
        f: impl FnOnce(&mut Ratchet) -> Result<T>,
        entry: impl FnOnce(&T) -> Result<Option<Vec<u8>>>,
    ) -> Result<(T, Option<u64>)> {
        let mut ratchet = self
            .ratchet
            .lock()
            .map_err(|_| anyhow::anyhow!("messaging state lock poisoned"))?;
        let value = f(&mut ratchet)?;
        let entry = entry(&value)?;
        let number = self
            .store
            .save_ratchet(&ratchet.pickle(&self.pickle_key)?, entry.as_deref())?;
        Ok((value, number))
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Arc<Self>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .context("messaging task panicked")?
    }

    pub(super) async fn request(&self, to: PeerId, request: &MsgRequest) -> Result<MsgResponse> {
        let answer = self
            .net
            .msg_request(to, postcard::to_stdvec(request)?)
            .await?;
        postcard::from_bytes(&answer).context("malformed answer from the peer")
    }

    /// Sends `text` to `to`: straight to it when it is connected (the
    /// answer says `delivered`), otherwise through the mesh (`queued`; the
    /// outbox follows it to `relayed` and `delivered`).
    pub async fn send(self: &Arc<Self>, to: PeerId, text: String) -> Result<SendOutcome> {
        if text.len() > MAX_TEXT_BYTES {
            bail!(
                "message is {} bytes; the limit is {MAX_TEXT_BYTES}",
                text.len()
            );
        }
        let peer = peer_key(&to)?;
        if peer == self.identity.public() {
            bail!("that is this node's own id");
        }
        let connected = self.net.snapshot().peers.contains_key(&to.to_string());
        if !connected {
            return self
                .blocking(move |this| this.queue_for_mesh(peer, text))
                .await;
        }
        self.send_direct(to, peer, text.clone()).await?;
        self.blocking(move |this| this.record_direct(peer, text))
            .await
    }

    /// Sends `text` straight to the connected peer `to`, opening a session
    /// first if there is none.
    async fn send_direct(
        self: &Arc<Self>,
        to: PeerId,
        peer: PublicKey,
        text: String,
    ) -> Result<()> {
        // One retry with a fresh session: the peer may have lost ours
        // (restored from backup, rotated its key).
        for attempt in 0..2 {
            let has_session = {
                let r = self
                    .ratchet
                    .lock()
                    .map_err(|_| anyhow::anyhow!("messaging state lock poisoned"))?;
                r.has_session(&peer)
            };
            if !has_session || attempt > 0 {
                let bundle = match self.request(to, &MsgRequest::FetchBundle).await? {
                    MsgResponse::Bundle(signed) => {
                        if *signed.signer() != peer {
                            bail!("{to} answered with a bundle signed by another key");
                        }
                        signed.verify().context("bundle signature")?.bundle
                    }
                    MsgResponse::Refused(why) => bail!("{to} refused a key bundle: {why}"),
                    MsgResponse::Delivered | MsgResponse::Relay(_) => {
                        bail!("{to} answered out of turn")
                    }
                };
                self.blocking(move |this| {
                    this.with_ratchet(|r| Ok(r.start_session(&peer, &bundle)?), |_| Ok(None))
                        .map(|_| ())
                })
                .await?;
            }
            let plaintext = text.clone();
            let ((message, sender_key), _) = self
                .blocking(move |this| {
                    this.with_ratchet(
                        |r| {
                            Ok((
                                r.encrypt(&peer, plaintext.as_bytes())?,
                                this.key_statement(r)?,
                            ))
                        },
                        |_| Ok(None),
                    )
                })
                .await?;
            let request = MsgRequest::Deliver {
                sender_key: Box::new(sender_key),
                message,
            };
            match self.request(to, &request).await? {
                MsgResponse::Delivered => {
                    info!(to = %to, bytes = text.len(), "message delivered");
                    return Ok(());
                }
                MsgResponse::Refused(why) if attempt == 0 => {
                    debug!(%to, %why, "message refused; retrying with a new session");
                    let forget = peer;
                    self.blocking(move |this| {
                        this.with_ratchet(
                            |r| {
                                r.forget(&forget);
                                Ok(())
                            },
                            |_| Ok(None),
                        )
                        .map(|_| ())
                    })
                    .await?;
                }
                MsgResponse::Refused(why) => bail!("{to} refused the message: {why}"),
                MsgResponse::Bundle(_) | MsgResponse::Relay(_) => {
                    bail!("{to} answered out of turn")
                }
            }
        }
        bail!("{to} refused the message twice")
    }

    /// Answers one inbound request; never fails the caller: a bad request
    /// is answered with `Refused`, or not at all when it cannot be decoded.
    pub async fn handle(self: &Arc<Self>, from: PeerId, data: Vec<u8>, reply: MsgReply) {
        let response = match postcard::from_bytes::<MsgRequest>(&data) {
            Ok(request) => self.answer(from, request).await,
            Err(e) => {
                // Framed right, garbage inside: counted against the sender.
                debug!(%from, error = %e, "malformed msg request");
                self.net.penalise(from, "msg", "malformed");
                MsgResponse::Refused("malformed request".into())
            }
        };
        match postcard::to_stdvec(&response) {
            Ok(bytes) => {
                if let Err(e) = self.net.respond_msg(reply, bytes).await {
                    debug!(%from, error = %e, "msg answer not sent");
                }
            }
            Err(e) => warn!(error = %e, "encoding a msg answer failed"),
        }
    }

    async fn answer(self: &Arc<Self>, from: PeerId, request: MsgRequest) -> MsgResponse {
        let result = match request {
            MsgRequest::FetchBundle => {
                let allowed = match (peer_key(&from), self.fetches.lock()) {
                    (Ok(peer), Ok(mut limiter)) => limiter.allow(peer, Instant::now()),
                    _ => false,
                };
                if allowed {
                    self.bundle()
                        .await
                        .map(|b| MsgResponse::Bundle(Box::new(b)))
                } else {
                    Err(anyhow::anyhow!(
                        "too many key bundle requests; at most {MAX_FETCHES_PER_WINDOW} a minute"
                    ))
                }
            }
            MsgRequest::Deliver {
                sender_key,
                message,
            } => self
                .receive(from, sender_key, message)
                .await
                .map(|()| MsgResponse::Delivered),
            MsgRequest::Relay(envelope) => {
                let this = self.clone();
                let answer =
                    tokio::task::spawn_blocking(move || this.take_envelope(from, *envelope))
                        .await
                        .unwrap_or_else(|e| RelayAnswer::Busy(format!("relay task failed: {e}")));
                Ok(MsgResponse::Relay(answer))
            }
        };
        result.unwrap_or_else(|e| {
            debug!(%from, error = format!("{e:#}"), "msg request refused");
            MsgResponse::Refused(format!("{e:#}"))
        })
    }

    async fn bundle(self: &Arc<Self>) -> Result<Signed<BundleStatement>> {
        let (bundle, _) = self
            .blocking(|this| {
                this.with_ratchet(
                    |r| {
                        r.publish_bundles(1)
                            .into_iter()
                            .next()
                            .context("no one-time key generated")
                    },
                    |_| Ok(None),
                )
            })
            .await?;
        Ok(Signed::sign(&self.identity, &BundleStatement { bundle })?)
    }

    async fn receive(
        self: &Arc<Self>,
        from: PeerId,
        sender_key: Box<Signed<RatchetKeyStatement>>,
        message: RatchetMessage,
    ) -> Result<()> {
        let peer = peer_key(&from)?;
        if *sender_key.signer() != peer {
            bail!("ratchet key not signed by the sending node");
        }
        let identity_keys = sender_key.verify()?.keys();
        let (number, text_len) = self
            .blocking(move |this| {
                let (entry, number) = this.with_ratchet(
                    |r| {
                        let plaintext = r.decrypt(&peer, &identity_keys, &message)?;
                        if plaintext.len() > MAX_TEXT_BYTES {
                            bail!("message longer than {MAX_TEXT_BYTES} bytes");
                        }
                        Ok(InboxEntry {
                            number: 0,
                            from_peer: from.to_string(),
                            from_key: peer.to_hex(),
                            received_unix_ms: crate::unix_ms(),
                            text: String::from_utf8_lossy(&plaintext).into_owned(),
                        })
                    },
                    |entry| {
                        Ok(Some(aead::seal_random(
                            &this.inbox_key,
                            INBOX_AAD,
                            &postcard::to_stdvec(entry)?,
                        )?))
                    },
                )?;
                Ok((number, entry.text.len()))
            })
            .await?;
        info!(from = %from, bytes = text_len, number = ?number, "message received");
        Ok(())
    }

    /// The newest `limit` messages, oldest first.
    pub fn inbox(&self, limit: usize) -> Result<Vec<InboxEntry>> {
        let mut out = Vec::new();
        for (number, sealed) in self.store.inbox(limit.min(MAX_INBOX_PAGE))? {
            let bytes = aead::open_random(&self.inbox_key, INBOX_AAD, &sealed)
                .with_context(|| format!("inbox entry {number}"))?;
            let mut entry: InboxEntry =
                postcard::from_bytes(&bytes).with_context(|| format!("inbox entry {number}"))?;
            entry.number = number;
            out.push(entry);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A messenger on its own store and loopback network (no traffic is
    /// needed: requests are handed to `answer` directly).
    fn messenger(
        seed: u8,
        dir: &std::path::Path,
    ) -> (Arc<Messenger>, PeerId, Arc<Store>, Identity) {
        let identity = Identity::from_seed(&[seed; 32]);
        let store = Arc::new(Store::open(dir).expect("store"));
        let mut config = crate::common::config::Config::default();
        config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        // Loopback TCP: this test is about the messenger, not Tor.
        config.network.transport = openagi_net::TransportMode::Direct;
        let net_config = config.net_config("test").expect("net config");
        let keypair = openagi_net::keypair_from_identity(&identity).expect("keypair");
        let mut registry = prometheus_client::registry::Registry::default();
        let (net, _events, _task) =
            openagi_net::NetworkService::start(keypair, net_config, &mut registry).expect("net");
        let peer = net.local_peer_id();
        let m = Messenger::start(&identity, store.clone(), net, &mut registry).expect("messenger");
        (m, peer, store, identity)
    }

    fn deliver(from: &Messenger, message: RatchetMessage) -> MsgRequest {
        MsgRequest::Deliver {
            sender_key: Box::new(
                from.with_ratchet(|r| from.key_statement(r), |_| Ok(None))
                    .expect("statement")
                    .0,
            ),
            message,
        }
    }

    fn delivered(r: &MsgResponse) -> bool {
        matches!(r, MsgResponse::Delivered)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn replayed_tampered_and_misattributed_deliveries_change_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("a")).expect("dir");
        std::fs::create_dir_all(tmp.path().join("b")).expect("dir");
        let (a, _a_peer, a_store, a_id) = messenger(1, &tmp.path().join("a"));
        let (b, b_peer, _, _) = messenger(2, &tmp.path().join("b"));
        let a_key = a_id.public();

        let bundle = a
            .bundle()
            .await
            .expect("bundle")
            .verify()
            .expect("signed")
            .bundle;
        b.with_ratchet(|r| Ok(r.start_session(&a_key, &bundle)?), |_| Ok(None))
            .expect("session");
        let encrypt = |text: &'static str| {
            b.with_ratchet(|r| Ok(r.encrypt(&a_key, text.as_bytes())?), |_| Ok(None))
                .expect("encrypt")
                .0
        };
        let first = encrypt("first");
        assert!(delivered(
            &a.answer(b_peer, deliver(&b, first.clone())).await
        ));
        // Replay: refused, nothing stored.
        assert!(!delivered(&a.answer(b_peer, deliver(&b, first)).await));

        // Tampered: refused, and the session still takes the real one.
        let second = encrypt("second");
        let mut tampered = second.clone();
        if let Some(byte) = tampered.body.last_mut() {
            *byte ^= 1;
        }
        assert!(!delivered(&a.answer(b_peer, deliver(&b, tampered)).await));
        assert!(delivered(&a.answer(b_peer, deliver(&b, second)).await));

        // Sent over another node's connection: the signed ratchet key does
        // not match the authenticated sender.
        let stranger = openagi_net::keypair_from_identity(&Identity::from_seed(&[3; 32]))
            .expect("keypair")
            .public()
            .to_peer_id();
        let third = encrypt("third");
        assert!(!delivered(
            &a.answer(stranger, deliver(&b, third.clone())).await
        ));

        let texts = |m: &Messenger| -> Vec<String> {
            m.inbox(10)
                .expect("inbox")
                .into_iter()
                .map(|e| e.text)
                .collect()
        };
        assert_eq!(texts(&a), ["first", "second"]);

        // After a restart (state reloaded from the store) the session
        // continues where it was.
        drop(a);
        let net = {
            let mut config = crate::common::config::Config::default();
            config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
            config.network.transport = openagi_net::TransportMode::Direct;
            let mut registry = prometheus_client::registry::Registry::default();
            openagi_net::NetworkService::start(
                openagi_net::keypair_from_identity(&a_id).expect("keypair"),
                config.net_config("test").expect("net config"),
                &mut registry,
            )
            .expect("net")
            .0
        };
        let a = Messenger::start(
            &a_id,
            a_store,
            net,
            &mut prometheus_client::registry::Registry::default(),
        )
        .expect("restarted");
        assert!(delivered(&a.answer(b_peer, deliver(&b, third)).await));
        assert_eq!(texts(&a), ["first", "second", "third"]);
    }

    #[test]
    fn bundle_fetches_are_limited_per_peer_and_window() {
        let mut limiter = FetchLimiter::default();
        let (a, b) = (
            Identity::from_seed(&[1; 32]).public(),
            Identity::from_seed(&[2; 32]).public(),
        );
        let t0 = Instant::now();
        for _ in 0..MAX_FETCHES_PER_WINDOW {
            assert!(limiter.allow(a, t0));
        }
        assert!(!limiter.allow(a, t0), "over the limit");
        assert!(limiter.allow(b, t0), "other peers unaffected");
        assert!(limiter.allow(a, t0 + FETCH_WINDOW), "next window");
    }

    #[test]
    fn requests_round_trip_through_postcard() {
        let identity = Identity::from_seed(&[3; 32]);
        let key = Signed::sign(
            &identity,
            &RatchetKeyStatement {
                identity_key: X25519Public::from_bytes([9; 32]),
                retired_identity_key: Some(X25519Public::from_bytes([8; 32])),
            },
        )
        .expect("signed");
        let request = MsgRequest::Deliver {
            sender_key: Box::new(key),
            message: RatchetMessage {
                prekey: true,
                body: vec![1, 2, 3],
            },
        };
        let bytes = postcard::to_stdvec(&request).expect("encodes");
        assert!(bytes.len() < openagi_net::MAX_MSG_REQUEST_BYTES);
        let back: MsgRequest = postcard::from_bytes(&bytes).expect("decodes");
        match back {
            MsgRequest::Deliver { sender_key, .. } => {
                assert_eq!(*sender_key.signer(), identity.public());
                sender_key.verify().expect("still verifies");
            }
            MsgRequest::FetchBundle | MsgRequest::Relay(_) => panic!("wrong variant"),
        }
    }
}
