//! X25519 keys and sealed envelopes.
//!
//! # Sealed envelopes
//!
//! [`seal`] encrypts a payload to a peer's X25519 public key so that only
//! the holder of the matching secret can read it, even when the envelope
//! is relayed by other nodes:
//!
//! 1. a fresh ephemeral X25519 key pair `(e, E)` is drawn;
//! 2. `ss = X25519(e, R)` for the recipient key `R`; an all-zero result
//!    (a low-order `R`) is refused, since it would make the key public;
//! 3. `key || nonce = HKDF-SHA256(ikm = ss, salt = none,
//!    info = "openagi/seal/v1" || E || R)`, 44 bytes: binding both public
//!    keys means an envelope cannot be re-targeted at another recipient or
//!    have its ephemeral key swapped;
//! 4. the payload is encrypted with ChaCha20-Poly1305 under that key and
//!    nonce (each key is used once, so a derived nonce is safe), with
//!    associated data naming the format version, the purpose string and the
//!    sender's Ed25519 identity.
//!
//! Wire format: `version (1) || E (32) || ciphertext || tag (16)`.
//!
//! The sender identity in the associated data is *bound*, not *proven*:
//! opening with a different claimed sender or purpose fails, but anyone can
//! seal under any claimed sender. Where the recipient needs proof of
//! origin, seal a [`crate::Signed`] payload, or carry the envelope over an
//! authenticated channel that already established the sender.
//!
//! # A node's static X25519 key
//!
//! [`X25519Secret::derive_from_identity`] derives the node's long-term
//! X25519 key from its Ed25519 seed with HKDF-SHA256 under a fixed,
//! versioned label. Reasons for deriving rather than storing a second
//! secret: one secret to protect, back up and rotate (the two keys live and
//! die together anyway, and the keystore already guards the seed); the
//! derivation is one-way, so the X25519 key reveals nothing about the
//! signing key; and unlike converting the Ed25519 scalar to Montgomery form
//! (the "birational map" trick), the two algorithms never share a scalar.
//! The node publishes the X25519 public key inside a message signed by its
//! identity, so peers learn it authentically.

use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::aead::{self, AeadKey};
use crate::{Error, Identity, PublicKey};

/// Length of an X25519 key (secret or public) and of a shared secret.
pub const X25519_LEN: usize = 32;
/// Version byte at the start of every envelope.
pub const ENVELOPE_VERSION: u8 = 1;
/// Bytes an envelope adds to its payload.
pub const ENVELOPE_OVERHEAD: usize = 1 + X25519_LEN + aead::TAG_LEN;

const SEAL_LABEL: &[u8] = b"openagi/seal/v1";
const STATIC_KEY_LABEL: &[u8] = b"openagi/x25519/static/v1";

/// An X25519 secret key, zeroed when dropped.
pub struct X25519Secret(StaticSecret);

impl X25519Secret {
    /// A fresh random key from the operating system.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = Zeroizing::new([0u8; X25519_LEN]);
        crate::os_random(bytes.as_mut())?;
        Ok(Self(StaticSecret::from(*bytes)))
    }

    /// Wraps raw secret bytes (clamping happens inside each exchange).
    pub fn from_bytes(bytes: [u8; X25519_LEN]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// Derives the node's static X25519 key from its Ed25519 identity seed.
    /// See the module documentation for why.
    pub fn derive_from_identity(identity: &Identity) -> Self {
        let seed = identity.seed();
        let hk = Hkdf::<Sha256>::new(Some(STATIC_KEY_LABEL), seed.as_ref());
        let mut out = Zeroizing::new([0u8; X25519_LEN]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
        if hk.expand(STATIC_KEY_LABEL, out.as_mut()).is_err() {
            unreachable!("HKDF output length is fixed and valid");
        }
        Self(StaticSecret::from(*out))
    }

    /// The secret bytes, for storing in the keystore.
    pub fn to_bytes(&self) -> Zeroizing<[u8; X25519_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public(&self) -> X25519Public {
        X25519Public(DalekPublic::from(&self.0).to_bytes())
    }

    /// X25519 with `peer`, refusing non-contributory results: a low-order
    /// peer key forces the all-zero shared secret, which an attacker knows.
    pub fn diffie_hellman(
        &self,
        peer: &X25519Public,
    ) -> Result<Zeroizing<[u8; X25519_LEN]>, Error> {
        let shared = self.0.diffie_hellman(&DalekPublic::from(peer.0));
        if !shared.was_contributory() {
            return Err(Error::NonContributory);
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

impl std::fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("X25519Secret").field(&self.public()).finish()
    }
}

/// An X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct X25519Public([u8; X25519_LEN]);

impl X25519Public {
    /// Wraps 32 public key bytes. Every 32-byte string is accepted here;
    /// low-order keys are caught when an exchange produces a
    /// non-contributory secret.
    pub fn from_bytes(bytes: [u8; X25519_LEN]) -> Self {
        Self(bytes)
    }

    /// Wraps a public key given as a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; X25519_LEN] = bytes.try_into().map_err(|_| Error::Malformed {
            what: "X25519 public key",
            detail: format!("expected {X25519_LEN} bytes, got {}", bytes.len()),
        })?;
        Ok(Self(arr))
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; X25519_LEN] {
        self.0
    }
}

impl std::fmt::Debug for X25519Public {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "X25519Public({})", hex::encode(self.0))
    }
}

fn envelope_keys(
    shared: &[u8; X25519_LEN],
    ephemeral: &X25519Public,
    recipient: &X25519Public,
) -> (AeadKey, [u8; aead::NONCE_LEN]) {
    let mut info = Vec::with_capacity(SEAL_LABEL.len() + 2 * X25519_LEN);
    info.extend_from_slice(SEAL_LABEL);
    info.extend_from_slice(&ephemeral.0);
    info.extend_from_slice(&recipient.0);
    let hk = Hkdf::<Sha256>::new(None, shared);
    let mut okm = Zeroizing::new([0u8; aead::KEY_LEN + aead::NONCE_LEN]);
    if hk.expand(&info, okm.as_mut()).is_err() {
        unreachable!("HKDF output length is fixed and valid");
    }
    let mut key = [0u8; aead::KEY_LEN];
    key.copy_from_slice(&okm[..aead::KEY_LEN]);
    let mut nonce = [0u8; aead::NONCE_LEN];
    nonce.copy_from_slice(&okm[aead::KEY_LEN..]);
    (AeadKey::from_bytes(key), nonce)
}

fn associated_data(sender: &PublicKey, purpose: &str) -> Result<Vec<u8>, Error> {
    let len = u16::try_from(purpose.len()).map_err(|_| Error::Malformed {
        what: "seal purpose",
        detail: format!("{} bytes is longer than 65535", purpose.len()),
    })?;
    let mut aad = Vec::with_capacity(SEAL_LABEL.len() + 3 + purpose.len() + 32);
    aad.extend_from_slice(SEAL_LABEL);
    aad.push(ENVELOPE_VERSION);
    aad.extend_from_slice(&len.to_be_bytes());
    aad.extend_from_slice(purpose.as_bytes());
    aad.extend_from_slice(&sender.to_bytes());
    Ok(aad)
}

/// Seals `payload` so that only the holder of `recipient`'s secret can
/// open it, bound to the claimed `sender` identity and `purpose` (e.g.
/// `"openagi/learning/update/v1"`).
pub fn seal(
    recipient: &X25519Public,
    sender: &PublicKey,
    purpose: &str,
    payload: &[u8],
) -> Result<Vec<u8>, Error> {
    let aad = associated_data(sender, purpose)?;
    let ephemeral = X25519Secret::generate()?;
    let ephemeral_public = ephemeral.public();
    let shared = ephemeral.diffie_hellman(recipient)?;
    let (key, nonce) = envelope_keys(&shared, &ephemeral_public, recipient);
    let body = aead::encrypt(&key, &nonce, &aad, payload)?;
    let mut out = Vec::with_capacity(1 + X25519_LEN + body.len());
    out.push(ENVELOPE_VERSION);
    out.extend_from_slice(&ephemeral_public.0);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens an envelope made by [`seal`] for `recipient`'s key, checking that
/// it was sealed with the same claimed `sender` and `purpose`.
pub fn open(
    recipient: &X25519Secret,
    sender: &PublicKey,
    purpose: &str,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    if envelope.len() < ENVELOPE_OVERHEAD {
        return Err(Error::Malformed {
            what: "sealed envelope",
            detail: format!(
                "{} bytes is shorter than the {ENVELOPE_OVERHEAD}-byte overhead",
                envelope.len()
            ),
        });
    }
    let (version, rest) = envelope.split_at(1);
    if version != [ENVELOPE_VERSION] {
        return Err(Error::Unsupported {
            what: "sealed envelope version",
            detail: format!("{}", version[0]),
        });
    }
    let (ephemeral, body) = rest.split_at(X25519_LEN);
    let ephemeral = X25519Public::from_slice(ephemeral)?;
    let shared = recipient.diffie_hellman(&ephemeral)?;
    let (key, nonce) = envelope_keys(&shared, &ephemeral, &recipient.public());
    let aad = associated_data(sender, purpose)?;
    aead::decrypt(&key, &nonce, &aad, body).map_err(|e| match e {
        Error::Decrypt { .. } => Error::Decrypt {
            what: "sealed envelope",
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(byte: u8) -> Identity {
        Identity::from_seed(&[byte; 32])
    }

    #[test]
    fn seal_open_round_trip() {
        let alice = identity(1);
        let bob = X25519Secret::derive_from_identity(&identity(2));
        let env = seal(
            &bob.public(),
            &alice.public(),
            "openagi/test/v1",
            b"model update",
        )
        .expect("seals");
        assert_eq!(env.len(), 12 + ENVELOPE_OVERHEAD);
        let opened = open(&bob, &alice.public(), "openagi/test/v1", &env).expect("opens");
        assert_eq!(&opened[..], b"model update");
    }

    #[test]
    fn wrong_recipient_sender_purpose_or_tampering_fail() {
        let alice = identity(1);
        let bob = X25519Secret::generate().expect("randomness");
        let carol = X25519Secret::generate().expect("randomness");
        let env = seal(&bob.public(), &alice.public(), "p/v1", b"x").expect("seals");
        assert!(matches!(
            open(&carol, &alice.public(), "p/v1", &env),
            Err(Error::Decrypt { .. })
        ));
        assert!(matches!(
            open(&bob, &identity(9).public(), "p/v1", &env),
            Err(Error::Decrypt { .. })
        ));
        assert!(matches!(
            open(&bob, &alice.public(), "p/v2", &env),
            Err(Error::Decrypt { .. })
        ));
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x80;
            assert!(
                open(&bob, &alice.public(), "p/v1", &bad).is_err(),
                "byte {i}"
            );
        }
        assert!(matches!(
            open(&bob, &alice.public(), "p/v1", &env[..ENVELOPE_OVERHEAD - 1]),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn low_order_keys_are_refused() {
        let alice = identity(1);
        // The point of order 1 (u = 0) and of order 2 (u = 1).
        for u in [[0u8; 32], {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        }] {
            let low = X25519Public::from_bytes(u);
            assert!(matches!(
                seal(&low, &alice.public(), "p", b"x"),
                Err(Error::NonContributory)
            ));
            let bob = X25519Secret::generate().expect("randomness");
            let mut env = seal(&bob.public(), &alice.public(), "p", b"x").expect("seals");
            env[1..33].copy_from_slice(&u);
            assert!(matches!(
                open(&bob, &alice.public(), "p", &env),
                Err(Error::NonContributory)
            ));
        }
    }

    #[test]
    fn static_key_derivation_is_deterministic_and_separated() {
        let a = X25519Secret::derive_from_identity(&identity(5));
        let b = X25519Secret::derive_from_identity(&identity(5));
        let c = X25519Secret::derive_from_identity(&identity(6));
        assert_eq!(a.public(), b.public());
        assert_ne!(a.public(), c.public());
        // Never the identity seed itself.
        assert_ne!(*a.to_bytes(), [5u8; 32]);
        let restored = X25519Secret::from_bytes(*a.to_bytes());
        assert_eq!(restored.public(), a.public());
    }
}
