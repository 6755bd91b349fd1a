//! Ed25519 identities and domain-separated signed envelopes.
//!
//! Every signature is checked with `verify_strict`, which rejects
//! non-canonical encodings and small-order keys that plain `verify`
//! accepts; a node must never accept a signature another implementation
//! would refuse, or replicas could disagree about validity.
//!
//! Signatures are always over `context || 0x00 || message`, where the
//! context names the purpose ("openagi/consensus/prepare/v1", ...). A
//! signature made for one purpose therefore never verifies for another.

use std::fmt;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;

/// Length of an Ed25519 secret seed, public key.
pub const KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A node's long-term Ed25519 signing identity.
///
/// The secret is zeroed when dropped.
pub struct Identity {
    signing: SigningKey,
}

impl Identity {
    /// Generates a fresh identity from the operating system's generator.
    pub fn generate() -> Result<Self, Error> {
        let mut seed = Zeroizing::new([0u8; KEY_LEN]);
        crate::os_random(seed.as_mut())?;
        Ok(Self::from_seed(&seed))
    }

    /// Rebuilds an identity from its 32-byte secret seed.
    pub fn from_seed(seed: &[u8; KEY_LEN]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// Rebuilds an identity from a slice that must hold exactly 32 bytes.
    pub fn from_seed_slice(seed: &[u8]) -> Result<Self, Error> {
        let seed: &[u8; KEY_LEN] = seed.try_into().map_err(|_| Error::Malformed {
            what: "identity seed",
            detail: format!("expected {KEY_LEN} bytes, got {}", seed.len()),
        })?;
        Ok(Self::from_seed(seed))
    }

    /// The secret seed. Handle with care: anyone holding it is this node.
    pub fn seed(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The public half of this identity.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    /// Signs `message` for the purpose named by `context`.
    pub fn sign(&self, context: &str, message: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        let bytes = domain_separated(context, message);
        Signature(self.signing.sign(&bytes).to_bytes())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Decodes a public key, refusing encodings that are not valid points.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let arr: &[u8; KEY_LEN] = bytes.try_into().map_err(|_| Error::Malformed {
            what: "public key",
            detail: format!("expected {KEY_LEN} bytes, got {}", bytes.len()),
        })?;
        VerifyingKey::from_bytes(arr)
            .map(PublicKey)
            .map_err(|e| Error::Malformed {
                what: "public key",
                detail: e.to_string(),
            })
    }

    /// Decodes a public key from 64 hexadecimal digits.
    pub fn from_hex(text: &str) -> Result<Self, Error> {
        let bytes = hex::decode(text.trim()).map_err(|e| Error::Malformed {
            what: "public key",
            detail: format!("not hexadecimal: {e}"),
        })?;
        Self::from_bytes(&bytes)
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }

    /// Lowercase hexadecimal encoding.
    pub fn to_hex(&self) -> String {
        hex::encode(self.to_bytes())
    }

    /// A short human-comparable fingerprint: the first 8 bytes of the
    /// BLAKE3 hash of the key, as four hex groups.
    pub fn fingerprint(&self) -> String {
        let digest = blake3::hash(&self.to_bytes());
        let hex = hex::encode(&digest.as_bytes()[..8]);
        hex.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Checks `signature` over `message` for `context` with the strict
    /// Ed25519 rules.
    pub fn verify(
        &self,
        context: &str,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), Error> {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        let bytes = domain_separated(context, message);
        self.0
            .verify_strict(&bytes, &sig)
            .map_err(|_| Error::BadSignature)
    }
}

// Ordered by the key's bytes, so pure state machines can keep peers in
// ordered maps and iterate them the same way on every run.
impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.as_bytes().cmp(other.0.as_bytes())
    }
}

impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <[u8; KEY_LEN]>::deserialize(d)?;
        PublicKey::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A 64-byte Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl Signature {
    /// Decodes a signature from exactly 64 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; SIGNATURE_LEN] = bytes.try_into().map_err(|_| Error::Malformed {
            what: "signature",
            detail: format!("expected {SIGNATURE_LEN} bytes, got {}", bytes.len()),
        })?;
        Ok(Signature(arr))
    }

    /// Lowercase hexadecimal encoding.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", &self.to_hex()[..16])
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                Signature::from_bytes(v).map_err(E::custom)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Checks an Ed25519 signature over a raw message, without the context
/// prefix that [`PublicKey::verify`] adds, under the same strict rules.
///
/// This exists for interoperability and for checking against published
/// test vectors, which sign raw messages. Protocol messages must go through
/// [`PublicKey::verify`] or [`Signed`] so that a signature made for one
/// purpose can never be replayed for another.
///
/// Every input is taken as bytes so that malformed encodings (wrong
/// lengths, invalid points, non-canonical scalars) are refused with an
/// error instead of being impossible to express.
pub fn verify_strict_raw(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Error> {
    let key = PublicKey::from_bytes(public_key)?;
    let signature = Signature::from_bytes(signature)?;
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    key.0
        .verify_strict(message, &sig)
        .map_err(|_| Error::BadSignature)
}

/// One entry of a [`verify_batch`] call.
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    /// The claimed signer.
    pub signer: &'a PublicKey,
    /// The domain-separation context the signature was made for.
    pub context: &'a str,
    /// The signed message (without the context prefix).
    pub message: &'a [u8],
    /// The signature to check.
    pub signature: &'a Signature,
}

/// Checks many signatures at once, with exactly the acceptance rules of
/// [`PublicKey::verify`].
///
/// This deliberately runs `verify_strict` on each item rather than the
/// multi-scalar batch equation of `ed25519_dalek::verify_batch`. The batch
/// equation accepts things `verify_strict` refuses: non-canonical or
/// small-order `R` (Wycheproof tcId 151), and, because each signature is
/// weighted by a random 128-bit scalar, a signature whose error is a
/// torsion point passes whenever its weight is a multiple of 8 (one time in
/// eight, and the weights are derived from the inputs, so a forger can
/// retry until it passes). Closing those gaps needs a torsion-freeness check
/// of every `R` (a full scalar multiplication each), which costs about what
/// the batch saves. Replicas must agree bit for bit on which signatures are
/// valid, so the strict loop is the only safe choice here.
///
/// Returns [`Error::BatchSignature`] naming the first failing item.
pub fn verify_batch(items: &[BatchItem<'_>]) -> Result<(), Error> {
    for (index, item) in items.iter().enumerate() {
        item.signer
            .verify(item.context, item.message, item.signature)
            .map_err(|_| Error::BatchSignature { index })?;
    }
    Ok(())
}

fn domain_separated(context: &str, message: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(context.len() + 1 + message.len());
    bytes.extend_from_slice(context.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(message);
    bytes
}

/// Anything that can travel inside a [`Signed`] envelope names the purpose
/// its signatures are for.
pub trait SignedPayload: Serialize + DeserializeOwned {
    /// The domain-separation context, e.g. `"openagi/consensus/prepare/v1"`.
    const CONTEXT: &'static str;
}

/// A payload together with its signer and a signature over its canonical
/// (postcard) encoding in the payload's context.
///
/// The payload bytes are kept exactly as signed, so verification never
/// depends on re-encoding being byte-identical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    signer: PublicKey,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    signature: Signature,
    #[serde(skip)]
    _marker: std::marker::PhantomData<T>,
}

impl<T: SignedPayload> Signed<T> {
    /// Encodes and signs `value` with `identity`.
    pub fn sign(identity: &Identity, value: &T) -> Result<Self, Error> {
        let payload = postcard::to_stdvec(value).map_err(|e| Error::Malformed {
            what: "payload",
            detail: e.to_string(),
        })?;
        let signature = identity.sign(T::CONTEXT, &payload);
        Ok(Self {
            signer: identity.public(),
            payload,
            signature,
            _marker: Default::default(),
        })
    }

    /// Checks the signature strictly and decodes the payload.
    pub fn verify(&self) -> Result<T, Error> {
        self.signer
            .verify(T::CONTEXT, &self.payload, &self.signature)?;
        postcard::from_bytes(&self.payload).map_err(|e| Error::Malformed {
            what: "signed payload",
            detail: e.to_string(),
        })
    }

    /// The key that claims to have signed this envelope. Not yet verified.
    pub fn signer(&self) -> &PublicKey {
        &self.signer
    }

    /// The signed payload bytes.
    pub fn payload_bytes(&self) -> &[u8] {
        &self.payload
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Vote {
        height: u64,
    }
    impl SignedPayload for Vote {
        const CONTEXT: &'static str = "openagi/test/vote/v1";
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Other {
        height: u64,
    }
    impl SignedPayload for Other {
        const CONTEXT: &'static str = "openagi/test/other/v1";
    }

    fn fixed_identity(byte: u8) -> Identity {
        Identity::from_seed(&[byte; KEY_LEN])
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let id = fixed_identity(7);
        let signed = Signed::sign(&id, &Vote { height: 42 }).expect("encodes");
        assert_eq!(signed.verify().expect("valid"), Vote { height: 42 });
        assert_eq!(signed.signer(), &id.public());
    }

    #[test]
    fn signature_for_one_context_fails_in_another() {
        let id = fixed_identity(7);
        let signed = Signed::sign(&id, &Vote { height: 1 }).expect("encodes");
        let forged: Signed<Other> = Signed {
            signer: signed.signer,
            payload: signed.payload.clone(),
            signature: signed.signature,
            _marker: Default::default(),
        };
        assert!(matches!(forged.verify(), Err(Error::BadSignature)));
    }

    #[test]
    fn tampered_payload_or_signer_is_rejected() {
        let id = fixed_identity(7);
        let mut signed = Signed::sign(&id, &Vote { height: 1 }).expect("encodes");
        signed.payload[0] ^= 1;
        assert!(signed.verify().is_err());
        let mut signed = Signed::sign(&id, &Vote { height: 1 }).expect("encodes");
        signed.signer = fixed_identity(8).public();
        assert!(matches!(signed.verify(), Err(Error::BadSignature)));
    }

    #[test]
    fn public_key_hex_round_trip_and_bad_lengths() {
        let pk = fixed_identity(3).public();
        assert_eq!(PublicKey::from_hex(&pk.to_hex()).expect("valid"), pk);
        assert!(PublicKey::from_bytes(&[0u8; 31]).is_err());
        assert!(Signature::from_bytes(&[0u8; 63]).is_err());
        assert_eq!(pk.fingerprint().len(), 19);
    }

    #[test]
    fn batch_verification_matches_single_verification() {
        let ids: Vec<Identity> = (1..=5).map(fixed_identity).collect();
        let keys: Vec<PublicKey> = ids.iter().map(Identity::public).collect();
        let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10]).collect();
        let sigs: Vec<Signature> = ids
            .iter()
            .zip(&msgs)
            .map(|(id, m)| id.sign("openagi/test/batch/v1", m))
            .collect();
        let items = |sigs: &[Signature]| -> Vec<(PublicKey, Vec<u8>, Signature)> {
            keys.iter()
                .cloned()
                .zip(msgs.iter().cloned())
                .zip(sigs.iter().cloned())
                .map(|((k, m), s)| (k, m, s))
                .collect()
        };
        let owned = items(&sigs);
        let batch: Vec<BatchItem<'_>> = owned
            .iter()
            .map(|(k, m, s)| BatchItem {
                signer: k,
                context: "openagi/test/batch/v1",
                message: m,
                signature: s,
            })
            .collect();
        verify_batch(&batch).expect("all valid");
        verify_batch(&[]).expect("empty batch is valid");

        let mut bad = sigs.clone();
        bad[3].0[0] ^= 1;
        let owned = items(&bad);
        let batch: Vec<BatchItem<'_>> = owned
            .iter()
            .map(|(k, m, s)| BatchItem {
                signer: k,
                context: "openagi/test/batch/v1",
                message: m,
                signature: s,
            })
            .collect();
        assert!(matches!(
            verify_batch(&batch),
            Err(Error::BatchSignature { index: 3 })
        ));

        let wrong_context: Vec<BatchItem<'_>> = batch
            .iter()
            .map(|item| BatchItem {
                context: "openagi/test/other/v1",
                ..*item
            })
            .collect();
        assert!(matches!(
            verify_batch(&wrong_context),
            Err(Error::BatchSignature { index: 0 })
        ));
    }

    #[test]
    fn raw_strict_verification() {
        use ed25519_dalek::Signer;
        let id = fixed_identity(4);
        let sig = id.signing.sign(b"raw message").to_bytes();
        let pk = id.public().to_bytes();
        verify_strict_raw(&pk, b"raw message", &sig).expect("valid");
        assert!(matches!(
            verify_strict_raw(&pk, b"other", &sig),
            Err(Error::BadSignature)
        ));
        assert!(matches!(
            verify_strict_raw(&pk, b"raw message", &sig[..63]),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            verify_strict_raw(&pk[..31], b"raw message", &sig),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn generated_identities_differ() {
        let a = Identity::generate().expect("os randomness");
        let b = Identity::generate().expect("os randomness");
        assert_ne!(a.public(), b.public());
    }
}
