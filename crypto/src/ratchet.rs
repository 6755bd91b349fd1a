//! End-to-end Double Ratchet sessions (Olm, through `vodozemac`) for
//! payloads that cross other nodes.
//!
//! A [`Ratchet`] holds one Olm account (its own Curve25519 identity key and
//! one-time keys) and, for each peer, a small bounded list of sessions.
//! The flow:
//!
//! 1. Bob publishes a [`PreKeyBundle`] (his account's identity key and one
//!    of his one-time keys), signed by his node identity so nobody can
//!    substitute keys ([`Ratchet::publish_bundles`]).
//! 2. Alice calls [`Ratchet::start_session`] with it and encrypts; her
//!    first messages are pre-key messages.
//! 3. Bob decrypts with [`Ratchet::decrypt`], which creates the inbound
//!    session from the first pre-key message (consuming the one-time key).
//!
//! The account's Curve25519 key is its own key, not the node's static
//! X25519 key from [`crate::seal`]: Olm generates and rotates its keys
//! itself, and the node vouches for them by signing the bundle.
//!
//! One-time keys are rotated on a schedule by rotating the whole account
//! ([`Ratchet::rotate_account`]): the previous account is kept, retired,
//! for one more period so bundles handed out just before the rotation
//! still work, and is dropped at the next rotation. A one-time key handed
//! out but never used therefore dies within two periods, and established
//! sessions are untouched (they do not depend on the account). `vodozemac`
//! has no call to forget single one-time keys, and evicting them by
//! generating thousands of new ones would bloat every persisted pickle.
//!
//! A failed decryption (tampered, replayed, too old) leaves every session
//! exactly as it was: `vodozemac` only commits ratchet state after the MAC
//! has verified.
//!
//! State is persisted with [`Ratchet::pickle`], which uses `vodozemac`'s
//! encrypted pickles under a key the node derives with
//! [`crate::keystore::storage_key`], and is restored with
//! [`Ratchet::from_pickle`]. Persist after every successful encrypt or
//! decrypt, or messages sent before a crash may be undecryptable after it.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{
    Account, AccountPickle, DecryptionError, OlmMessage, Session, SessionConfig,
    SessionCreationError, SessionPickle,
};
use zeroize::Zeroizing;

use crate::aead::AeadKey;
use crate::seal::X25519Public;
use crate::{Error, PublicKey};

/// Default bound on sessions kept per peer: enough for a simultaneous
/// start from both sides plus a re-key, small enough that a peer cannot
/// make us hold unbounded state.
pub const DEFAULT_MAX_SESSIONS_PER_PEER: usize = 4;
/// Version 2 added the retired account and the account creation time.
const PICKLE_VERSION: u8 = 2;

/// What a node publishes so peers can open sessions to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreKeyBundle {
    /// The account's long-term Curve25519 identity key.
    pub identity_key: X25519Public,
    /// A one-time key; each may be used by one session only.
    pub one_time_key: X25519Public,
}

/// An Olm message on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatchetMessage {
    /// Whether this is a pre-key message (one that can start a session).
    pub prekey: bool,
    /// The encoded Olm message.
    pub body: Vec<u8>,
}

impl RatchetMessage {
    fn from_olm(message: &OlmMessage) -> Self {
        let (kind, body) = message.to_parts();
        Self {
            prekey: kind == 0,
            body,
        }
    }

    fn to_olm(&self) -> Result<OlmMessage, Error> {
        OlmMessage::from_parts(usize::from(!self.prekey), &self.body).map_err(|e| {
            Error::Malformed {
                what: "ratchet message",
                detail: e.to_string(),
            }
        })
    }
}

fn curve(key: &X25519Public) -> Curve25519PublicKey {
    Curve25519PublicKey::from_bytes(key.to_bytes())
}

fn x25519(key: &Curve25519PublicKey) -> X25519Public {
    X25519Public::from_bytes(key.to_bytes())
}

fn decryption_error(e: DecryptionError) -> Error {
    match e {
        DecryptionError::InvalidMAC(_)
        | DecryptionError::InvalidMACLength(..)
        | DecryptionError::InvalidPadding(_) => Error::Decrypt {
            what: "ratchet message",
        },
        DecryptionError::NonContributoryKey => Error::NonContributory,
        DecryptionError::MissingMessageKey(_) => {
            Error::Session("message key unavailable: replayed, or too old".into())
        }
        DecryptionError::TooBigMessageGap(got, max) => Error::Session(format!(
            "{got} skipped messages, more than the {max} allowed"
        )),
    }
}

fn creation_error(e: SessionCreationError) -> Error {
    match e {
        SessionCreationError::NonContributoryKey => Error::NonContributory,
        SessionCreationError::Decryption(d) => decryption_error(d),
        other => Error::Session(other.to_string()),
    }
}

/// An Olm account and its sessions, bounded per peer.
pub struct Ratchet {
    account: Account,
    /// When `account` was created (Unix seconds, as given by the caller).
    account_created_unix_secs: u64,
    /// The account before the last rotation: answers pre-key messages made
    /// from its one-time keys until the next rotation drops it.
    retired: Option<Account>,
    /// Per peer, most recently used session first.
    sessions: HashMap<PublicKey, VecDeque<Session>>,
    max_per_peer: usize,
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ratchet")
            .field("identity_key", &self.identity_key())
            .field("retired", &self.retired.is_some())
            .field("peers", &self.sessions.len())
            .field("max_per_peer", &self.max_per_peer)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct StorePickle {
    version: u8,
    max_per_peer: u32,
    account: String,
    account_created_unix_secs: u64,
    retired: Option<String>,
    peers: Vec<(PublicKey, Vec<String>)>,
}

/// The layout of version 1, read so an upgrade keeps its sessions.
#[derive(Deserialize)]
struct StorePickleV1 {
    version: u8,
    max_per_peer: u32,
    account: String,
    peers: Vec<(PublicKey, Vec<String>)>,
}

impl Ratchet {
    /// A fresh account (keys from the operating system) created at
    /// `now_unix_secs`, keeping at most `max_sessions_per_peer` sessions
    /// (at least 1) per peer.
    pub fn new(max_sessions_per_peer: usize, now_unix_secs: u64) -> Self {
        Self {
            account: Account::new(),
            account_created_unix_secs: now_unix_secs,
            retired: None,
            sessions: HashMap::new(),
            max_per_peer: max_sessions_per_peer.max(1),
        }
    }

    /// The current account's Curve25519 identity key: the one new bundles
    /// carry.
    pub fn identity_key(&self) -> X25519Public {
        x25519(&self.account.curve25519_key())
    }

    /// The identity key of the retired account, while it is kept.
    pub fn retired_identity_key(&self) -> Option<X25519Public> {
        self.retired.as_ref().map(|a| x25519(&a.curve25519_key()))
    }

    /// When the current account was created (Unix seconds).
    pub fn account_created_unix_secs(&self) -> u64 {
        self.account_created_unix_secs
    }

    /// Starts a new account at `now_unix_secs`: the current one is retired
    /// (it still answers pre-key messages for its one-time keys) and the
    /// one retired before is dropped with every one-time key it still
    /// held. Returns how many such keys were dropped. Sessions are kept.
    pub fn rotate_account(&mut self, now_unix_secs: u64) -> usize {
        let dropped = self
            .retired
            .as_ref()
            .map_or(0, |a| a.stored_one_time_key_count());
        self.retired = Some(std::mem::replace(&mut self.account, Account::new()));
        self.account_created_unix_secs = now_unix_secs;
        dropped
    }

    /// Generates `count` one-time keys and returns them as bundles to
    /// publish (signed by the node). They are marked published, so the
    /// next call returns new ones.
    pub fn publish_bundles(&mut self, count: usize) -> Vec<PreKeyBundle> {
        self.account.generate_one_time_keys(count);
        let identity_key = self.identity_key();
        let bundles = self
            .account
            .one_time_keys()
            .values()
            .map(|k| PreKeyBundle {
                identity_key,
                one_time_key: x25519(k),
            })
            .collect();
        self.account.mark_keys_as_published();
        bundles
    }

    /// One-time keys still held (published and not yet consumed), in the
    /// current and the retired account.
    pub fn one_time_key_count(&self) -> usize {
        self.account.stored_one_time_key_count()
            + self
                .retired
                .as_ref()
                .map_or(0, |a| a.stored_one_time_key_count())
    }

    /// Opens an outbound session to `peer` from its published `bundle`.
    /// The new session becomes the one [`Ratchet::encrypt`] uses.
    pub fn start_session(&mut self, peer: &PublicKey, bundle: &PreKeyBundle) -> Result<(), Error> {
        let session = self
            .account
            .create_outbound_session(
                SessionConfig::version_1(),
                curve(&bundle.identity_key),
                curve(&bundle.one_time_key),
            )
            .map_err(creation_error)?;
        self.insert(peer, session);
        Ok(())
    }

    fn insert(&mut self, peer: &PublicKey, session: Session) {
        let list = self.sessions.entry(*peer).or_default();
        list.push_front(session);
        list.truncate(self.max_per_peer);
    }

    /// Whether any session with `peer` exists.
    pub fn has_session(&self, peer: &PublicKey) -> bool {
        self.sessions.get(peer).is_some_and(|l| !l.is_empty())
    }

    /// Number of sessions held with `peer`.
    pub fn session_count(&self, peer: &PublicKey) -> usize {
        self.sessions.get(peer).map_or(0, VecDeque::len)
    }

    /// Forgets every session with `peer`.
    pub fn forget(&mut self, peer: &PublicKey) {
        self.sessions.remove(peer);
    }

    /// Encrypts `plaintext` for `peer` with the most recently used session.
    pub fn encrypt(&mut self, peer: &PublicKey, plaintext: &[u8]) -> Result<RatchetMessage, Error> {
        let session = self
            .sessions
            .get_mut(peer)
            .and_then(|l| l.front_mut())
            .ok_or_else(|| Error::Session(format!("no session with {}", peer.fingerprint())))?;
        let message = session
            .encrypt(plaintext)
            .map_err(|_| Error::NonContributory)?;
        Ok(RatchetMessage::from_olm(&message))
    }

    /// Decrypts a message from `peer`, whose account identity keys (its
    /// current and retired one, vouched for by its node identity) are
    /// `peer_identity_keys`. A pre-key message for which no session exists
    /// creates one, from whichever of our accounts (current or retired)
    /// holds the one-time key it names.
    ///
    /// On failure no session changes.
    pub fn decrypt(
        &mut self,
        peer: &PublicKey,
        peer_identity_keys: &[X25519Public],
        message: &RatchetMessage,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let olm = message.to_olm()?;
        let no_session = || Error::Session(format!("no session with {}", peer.fingerprint()));
        match &olm {
            OlmMessage::PreKey(pre) => {
                // A session that already exists was authenticated when it
                // was created; a later rotation of the peer's account must
                // not cut it off.
                let id = pre.session_id();
                if let Some(list) = self.sessions.get_mut(peer)
                    && let Some(pos) = list.iter().position(|s| s.session_id() == id)
                {
                    let plaintext = list[pos].decrypt(&olm).map_err(decryption_error)?;
                    promote(list, pos);
                    return Ok(Zeroizing::new(plaintext));
                }
                let sender_key = pre.identity_key();
                if !peer_identity_keys.iter().any(|k| curve(k) == sender_key) {
                    return Err(Error::Session(
                        "pre-key message from another identity key".into(),
                    ));
                }
                let created = match self.account.create_inbound_session(
                    SessionConfig::version_1(),
                    sender_key,
                    pre,
                ) {
                    Err(SessionCreationError::MissingOneTimeKey(key)) => match &mut self.retired {
                        Some(retired) => retired
                            .create_inbound_session(SessionConfig::version_1(), sender_key, pre)
                            .map_err(creation_error)?,
                        None => {
                            return Err(creation_error(SessionCreationError::MissingOneTimeKey(
                                key,
                            )));
                        }
                    },
                    other => other.map_err(creation_error)?,
                };
                self.insert(peer, created.session);
                Ok(Zeroizing::new(created.plaintext))
            }
            OlmMessage::Normal(_) => {
                let list = self.sessions.get_mut(peer).ok_or_else(no_session)?;
                let mut last = no_session();
                for pos in 0..list.len() {
                    match list[pos].decrypt(&olm) {
                        Ok(plaintext) => {
                            promote(list, pos);
                            return Ok(Zeroizing::new(plaintext));
                        }
                        Err(e) => last = decryption_error(e),
                    }
                }
                Err(last)
            }
        }
    }

    /// Serialises the account and all sessions, encrypted with
    /// `vodozemac`'s pickle encryption under `key`.
    pub fn pickle(&self, key: &AeadKey) -> Result<Vec<u8>, Error> {
        let pickle = StorePickle {
            version: PICKLE_VERSION,
            max_per_peer: u32::try_from(self.max_per_peer).unwrap_or(u32::MAX),
            account: self.account.pickle().encrypt(key.as_bytes()),
            account_created_unix_secs: self.account_created_unix_secs,
            retired: self
                .retired
                .as_ref()
                .map(|a| a.pickle().encrypt(key.as_bytes())),
            peers: self
                .sessions
                .iter()
                .filter(|(_, l)| !l.is_empty())
                .map(|(peer, l)| {
                    (
                        *peer,
                        l.iter()
                            .map(|s| s.pickle().encrypt(key.as_bytes()))
                            .collect(),
                    )
                })
                .collect(),
        };
        postcard::to_stdvec(&pickle).map_err(|e| Error::Malformed {
            what: "ratchet pickle",
            detail: e.to_string(),
        })
    }

    /// Restores what [`Ratchet::pickle`] wrote. A wrong key or damaged data
    /// is an error, never a partly restored state.
    pub fn from_pickle(bytes: &[u8], key: &AeadKey) -> Result<Self, Error> {
        let malformed = |e: postcard::Error| Error::Malformed {
            what: "ratchet pickle",
            detail: e.to_string(),
        };
        // The version is the first byte of either layout.
        let pickle: StorePickle = match bytes.first() {
            Some(1) => {
                let v1: StorePickleV1 = postcard::from_bytes(bytes).map_err(malformed)?;
                StorePickle {
                    version: v1.version,
                    max_per_peer: v1.max_per_peer,
                    account: v1.account,
                    // Unknown: the next scheduled check rotates it.
                    account_created_unix_secs: 0,
                    retired: None,
                    peers: v1.peers,
                }
            }
            Some(&PICKLE_VERSION) => postcard::from_bytes(bytes).map_err(malformed)?,
            other => {
                return Err(Error::Unsupported {
                    what: "ratchet pickle version",
                    detail: other.map_or("empty".into(), u8::to_string),
                });
            }
        };
        let undecryptable = |_| Error::Decrypt {
            what: "ratchet pickle",
        };
        let unpickle_account = |encrypted: &str| {
            AccountPickle::from_encrypted(encrypted, key.as_bytes())
                .map(Account::from_pickle)
                .map_err(undecryptable)
        };
        let account = unpickle_account(&pickle.account)?;
        let retired = pickle
            .retired
            .as_deref()
            .map(unpickle_account)
            .transpose()?;
        let max_per_peer = usize::try_from(pickle.max_per_peer)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut sessions = HashMap::new();
        for (peer, list) in pickle.peers {
            let restored = list
                .iter()
                .take(max_per_peer)
                .map(|s| {
                    SessionPickle::from_encrypted(s, key.as_bytes())
                        .map(Session::from_pickle)
                        .map_err(undecryptable)
                })
                .collect::<Result<VecDeque<_>, _>>()?;
            sessions.insert(peer, restored);
        }
        Ok(Self {
            account,
            account_created_unix_secs: pickle.account_created_unix_secs,
            retired,
            sessions,
            max_per_peer,
        })
    }
}

fn promote(list: &mut VecDeque<Session>, pos: usize) {
    if let Some(session) = list.remove(pos) {
        list.push_front(session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    struct Node {
        id: PublicKey,
        ratchet: Ratchet,
    }

    fn node(byte: u8) -> Node {
        Node {
            id: Identity::from_seed(&[byte; 32]).public(),
            ratchet: Ratchet::new(DEFAULT_MAX_SESSIONS_PER_PEER, 1_000),
        }
    }

    /// Alice opens a session to Bob and Bob accepts her first message.
    fn pair() -> (Node, Node) {
        let mut alice = node(1);
        let mut bob = node(2);
        let bundle = bob.ratchet.publish_bundles(1)[0];
        alice
            .ratchet
            .start_session(&bob.id, &bundle)
            .expect("outbound");
        let first = alice
            .ratchet
            .encrypt(&bob.id, b"hello bob")
            .expect("encrypts");
        assert!(first.prekey);
        let got = bob
            .ratchet
            .decrypt(&alice.id, &[alice.ratchet.identity_key()], &first)
            .expect("inbound");
        assert_eq!(&got[..], b"hello bob");
        (alice, bob)
    }

    fn send(from: &mut Node, to: &Node, text: &[u8]) -> RatchetMessage {
        from.ratchet.encrypt(&to.id, text).expect("encrypts")
    }

    fn recv(to: &mut Node, from: &Node, msg: &RatchetMessage) -> Result<Vec<u8>, Error> {
        to.ratchet
            .decrypt(&from.id, &[from.ratchet.identity_key()], msg)
            .map(|p| p.to_vec())
    }

    /// `from` sends `text` to `to`, which must read it back.
    fn delivers(from: &mut Node, to: &mut Node, text: &[u8]) {
        let message = send(from, to, text);
        assert_eq!(recv(to, from, &message).expect("delivered"), text);
    }

    #[test]
    fn conversation_round_trips_and_consumes_one_time_keys() {
        let (mut alice, mut bob) = pair();
        assert_eq!(bob.ratchet.one_time_key_count(), 0, "one-time key consumed");
        let reply = send(&mut bob, &alice, b"hi alice");
        assert!(!reply.prekey);
        assert_eq!(
            recv(&mut alice, &bob, &reply).expect("decrypts"),
            b"hi alice"
        );
        let next = send(&mut alice, &bob, b"ratcheted");
        assert!(!next.prekey, "established after the first reply");
        assert_eq!(
            recv(&mut bob, &alice, &next).expect("decrypts"),
            b"ratcheted"
        );
    }

    #[test]
    fn out_of_order_and_skipped_messages() {
        let (mut alice, mut bob) = pair();
        let m: Vec<RatchetMessage> = (0..5u8).map(|i| send(&mut alice, &bob, &[i])).collect();
        assert_eq!(recv(&mut bob, &alice, &m[4]).expect("skips ahead"), [4]);
        assert_eq!(recv(&mut bob, &alice, &m[1]).expect("older"), [1]);
        assert_eq!(recv(&mut bob, &alice, &m[3]).expect("older"), [3]);
        // m[0] and m[2] stay skipped for now; they still decrypt later.
        let reply = send(&mut bob, &alice, b"r");
        recv(&mut alice, &bob, &reply).expect("reply");
        assert_eq!(recv(&mut bob, &alice, &m[2]).expect("late"), [2]);
        assert_eq!(recv(&mut bob, &alice, &m[0]).expect("late"), [0]);
    }

    #[test]
    fn replayed_messages_are_rejected() {
        let (mut alice, mut bob) = pair();
        let m = send(&mut alice, &bob, b"once");
        assert_eq!(recv(&mut bob, &alice, &m).expect("first"), b"once");
        assert!(matches!(recv(&mut bob, &alice, &m), Err(Error::Session(_))));
        // The session goes on working.
        let n = send(&mut alice, &bob, b"twice");
        assert_eq!(recv(&mut bob, &alice, &n).expect("next"), b"twice");
    }

    #[test]
    fn tampered_messages_are_rejected_without_changing_the_session() {
        let (mut alice, mut bob) = pair();
        let reply = send(&mut bob, &alice, b"r");
        recv(&mut alice, &bob, &reply).expect("established");
        let m = send(&mut alice, &bob, b"integrity");
        let before = bob
            .ratchet
            .pickle(&AeadKey::from_bytes([1; 32]))
            .expect("pickles")
            .len();
        for i in 0..m.body.len() {
            let mut bad = m.clone();
            bad.body[i] ^= 0x01;
            assert!(
                recv(&mut bob, &alice, &bad).is_err(),
                "byte {i} flip accepted"
            );
        }
        let after = bob
            .ratchet
            .pickle(&AeadKey::from_bytes([1; 32]))
            .expect("pickles")
            .len();
        assert_eq!(before, after);
        assert_eq!(bob.ratchet.session_count(&alice.id), 1);
        // The untouched message still decrypts: nothing advanced.
        assert_eq!(recv(&mut bob, &alice, &m).expect("original"), b"integrity");
        // A message claimed to be from someone else finds no session.
        let mallory = node(3);
        let stray = send(&mut alice, &bob, b"x");
        assert!(recv(&mut bob, &mallory, &stray).is_err());
        assert!(!bob.ratchet.has_session(&mallory.id));
    }

    fn keys_of(node: &Node) -> Vec<X25519Public> {
        std::iter::once(node.ratchet.identity_key())
            .chain(node.ratchet.retired_identity_key())
            .collect()
    }

    #[test]
    fn rotation_retires_one_time_keys_after_one_period_and_keeps_sessions() {
        let (mut alice, mut bob) = pair();
        let mut carol = node(3);
        // Carol fetches a bundle just before Bob's rotation and one in the
        // period after it; Bob then rotates again.
        let early = bob.ratchet.publish_bundles(1)[0];
        assert_eq!(bob.ratchet.rotate_account(2_000), 0);
        assert_eq!(bob.ratchet.account_created_unix_secs(), 2_000);
        assert_ne!(bob.ratchet.identity_key(), early.identity_key);
        assert_eq!(bob.ratchet.retired_identity_key(), Some(early.identity_key));

        // The established session with Alice still works both ways.
        delivers(&mut alice, &mut bob, b"still here");
        delivers(&mut bob, &mut alice, b"me too");

        // A bundle from the retired account still opens a session.
        carol
            .ratchet
            .start_session(&bob.id, &early)
            .expect("outbound");
        delivers(&mut carol, &mut bob, b"from the old bundle");

        // A key handed out before the previous rotation dies with the next.
        let mut dave = node(4);
        let stale = bob.ratchet.publish_bundles(1)[0];
        bob.ratchet.rotate_account(3_000);
        bob.ratchet.rotate_account(4_000);
        dave.ratchet
            .start_session(&bob.id, &stale)
            .expect("outbound");
        let late = send(&mut dave, &bob, b"too late");
        // A live key, so that consuming one would show.
        bob.ratchet.publish_bundles(1);
        let before = bob.ratchet.one_time_key_count();
        assert!(before > 0);
        assert!(matches!(
            recv(&mut bob, &dave, &late),
            Err(Error::Session(_))
        ));
        assert_eq!(bob.ratchet.session_count(&dave.id), 0);
        assert_eq!(
            bob.ratchet.one_time_key_count(),
            before,
            "a refused message consumes nothing"
        );
    }

    #[test]
    fn a_peer_that_rotated_is_accepted_through_its_retired_key() {
        let mut alice = node(1);
        let mut bob = node(2);
        let bundle = bob.ratchet.publish_bundles(1)[0];
        alice
            .ratchet
            .start_session(&bob.id, &bundle)
            .expect("outbound");
        let first = send(&mut alice, &bob, b"before my rotation");
        // Alice rotates before Bob reads her first message: her pre-key
        // message carries the retired key, which she still vouches for.
        alice.ratchet.rotate_account(5_000);
        assert_eq!(
            bob.ratchet
                .decrypt(&alice.id, &keys_of(&alice), &first)
                .expect("accepted")
                .to_vec(),
            b"before my rotation"
        );
        // Without the retired key the same kind of message is refused.
        let mut carol = node(3);
        let bundle = bob.ratchet.publish_bundles(1)[0];
        carol
            .ratchet
            .start_session(&bob.id, &bundle)
            .expect("outbound");
        let first = send(&mut carol, &bob, b"hi");
        carol.ratchet.rotate_account(5_000);
        assert!(
            bob.ratchet
                .decrypt(&carol.id, &[carol.ratchet.identity_key()], &first)
                .is_err()
        );
    }

    #[test]
    fn rotation_state_survives_a_restart() {
        let (mut alice, mut bob) = pair();
        let early = bob.ratchet.publish_bundles(1)[0];
        bob.ratchet.rotate_account(7_000);
        let key = AeadKey::from_bytes([9; 32]);
        bob.ratchet = Ratchet::from_pickle(&bob.ratchet.pickle(&key).expect("pickles"), &key)
            .expect("restores");
        assert_eq!(bob.ratchet.account_created_unix_secs(), 7_000);
        assert_eq!(bob.ratchet.retired_identity_key(), Some(early.identity_key));
        let mut carol = node(3);
        carol
            .ratchet
            .start_session(&bob.id, &early)
            .expect("outbound");
        delivers(&mut carol, &mut bob, b"after restart");
        delivers(&mut alice, &mut bob, b"session kept");
    }

    #[test]
    fn version_1_pickles_still_open() {
        let (_, bob) = pair();
        let key = AeadKey::from_bytes([4; 32]);
        let v1 = postcard::to_stdvec(&(
            1u8,
            4u32,
            bob.ratchet.account.pickle().encrypt(key.as_bytes()),
            Vec::<(PublicKey, Vec<String>)>::new(),
        ))
        .expect("encodes");
        let restored = Ratchet::from_pickle(&v1, &key).expect("v1 opens");
        assert_eq!(restored.identity_key(), bob.ratchet.identity_key());
        assert_eq!(restored.account_created_unix_secs(), 0);
        assert!(matches!(
            Ratchet::from_pickle(&[9u8, 0, 0], &key),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn sessions_survive_a_restart() {
        let (mut alice, mut bob) = pair();
        let key = AeadKey::from_bytes([7; 32]);
        let in_flight = send(&mut alice, &bob, b"sent before restart");
        let alice_saved = alice.ratchet.pickle(&key).expect("pickles");
        let bob_saved = bob.ratchet.pickle(&key).expect("pickles");
        assert!(
            Ratchet::from_pickle(&bob_saved, &AeadKey::from_bytes([8; 32])).is_err(),
            "wrong key"
        );
        assert!(
            Ratchet::from_pickle(&bob_saved[..bob_saved.len() / 2], &key).is_err(),
            "truncated"
        );

        alice.ratchet = Ratchet::from_pickle(&alice_saved, &key).expect("restores");
        bob.ratchet = Ratchet::from_pickle(&bob_saved, &key).expect("restores");
        assert_eq!(
            recv(&mut bob, &alice, &in_flight).expect("decrypts"),
            b"sent before restart"
        );
        delivers(&mut bob, &mut alice, b"after restart");
    }

    #[test]
    fn sessions_per_peer_are_bounded() {
        let mut alice = node(1);
        let mut bob = node(2);
        bob.ratchet.max_per_peer = 2;
        let bundles = bob.ratchet.publish_bundles(4);
        assert_eq!(bundles.len(), 4);
        for bundle in &bundles {
            alice
                .ratchet
                .start_session(&bob.id, bundle)
                .expect("outbound");
            let m = send(&mut alice, &bob, b"x");
            recv(&mut bob, &alice, &m).expect("inbound");
        }
        assert_eq!(bob.ratchet.session_count(&alice.id), 2);
        assert_eq!(
            alice.ratchet.session_count(&bob.id),
            DEFAULT_MAX_SESSIONS_PER_PEER
        );
        alice.ratchet.forget(&bob.id);
        assert!(!alice.ratchet.has_session(&bob.id));
        assert!(alice.ratchet.encrypt(&bob.id, b"x").is_err());
    }
}
