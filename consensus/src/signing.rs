//! Signing and checking of consensus messages, and canonical hashing.
//!
//! The replica signs and checks through the [`Signer`] and [`Crypto`]
//! traits rather than calling `openagi-crypto` directly so the simulator can
//! share one memo of already-checked signatures between all simulated
//! replicas: in an unoptimised build one strict Ed25519 check costs
//! milliseconds, and every message is checked by every replica.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use openagi_crypto::{Identity, PublicKey, Signed, identity::SignedPayload};
use serde::Serialize;

use crate::{Error, Hash};

/// BLAKE3 (keyed by a derivation context) over the postcard encoding of
/// `value`: the one canonical hash used for transactions, batches, blocks.
pub fn hash_encoded<T: Serialize + ?Sized>(context: &str, value: &T) -> Hash {
    hash_encoded_with(blake3::Hasher::new_derive_key(context), value)
}

/// [`hash_encoded`] starting from a hasher already keyed with the context:
/// hot paths keep one per context, since deriving the key costs as much as
/// hashing a small value.
pub(crate) fn hash_encoded_with<T: Serialize + ?Sized>(
    mut hasher: blake3::Hasher,
    value: &T,
) -> Hash {
    // The encoding streams into the hasher. Encoding our own plain data
    // types cannot fail; if it did, the partial input would still hash to
    // a value nobody else produces for real data.
    let _ = postcard::to_io(value, &mut hasher);
    *hasher.finalize().as_bytes()
}

/// Checks signed envelopes.
pub trait Crypto {
    /// Verifies `signed` with the strict Ed25519 rules in its payload's
    /// context and decodes the payload.
    fn open<T: SignedPayload + Clone + 'static>(&self, signed: &Signed<T>) -> Result<T, Error>;
}

/// Signs envelopes as one identity.
pub trait Signer: Crypto {
    /// The identity's public key.
    fn public(&self) -> PublicKey;
    /// Encodes and signs `value`.
    fn seal<T: SignedPayload>(&self, value: &T) -> Result<Signed<T>, Error>;
}

/// Plain strict verification with no memo; what a node uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct StrictCrypto;

impl Crypto for StrictCrypto {
    fn open<T: SignedPayload + Clone + 'static>(&self, signed: &Signed<T>) -> Result<T, Error> {
        signed.verify().map_err(Error::from)
    }
}

/// A node's signer: its identity plus strict verification.
#[derive(Debug)]
pub struct IdentitySigner {
    identity: Identity,
}

impl IdentitySigner {
    /// Wraps an identity.
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

impl Crypto for IdentitySigner {
    fn open<T: SignedPayload + Clone + 'static>(&self, signed: &Signed<T>) -> Result<T, Error> {
        StrictCrypto.open(signed)
    }
}

impl Signer for IdentitySigner {
    fn public(&self) -> PublicKey {
        self.identity.public()
    }

    fn seal<T: SignedPayload>(&self, value: &T) -> Result<Signed<T>, Error> {
        Signed::sign(&self.identity, value).map_err(Error::from)
    }
}

/// A memo of envelopes known to carry a valid signature, shared between the
/// simulated replicas of one single-threaded simulation.
///
/// Entries are keyed by context, signer, signature and payload bytes, and
/// made only from facts: envelopes produced by signing with the real key
/// (Ed25519 signing always yields a valid signature) and results of full
/// strict checks, failures included, since the check is a pure function of
/// the key. A tampered envelope has a different key, so it gets a full
/// check of its own.
///
/// It also keeps each valid envelope's decoded payload: decoding a view
/// change or a certificate decompresses every public key inside it, which
/// costs more than the rest of a simulated step.
#[derive(Clone, Default)]
pub struct VerifiedMemo {
    seen: Rc<RefCell<HashMap<Hash, bool>>>,
    decoded: Rc<RefCell<HashMap<Hash, Rc<dyn Any>>>>,
}

impl std::fmt::Debug for VerifiedMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedMemo")
            .field("entries", &self.seen.borrow().len())
            .finish()
    }
}

impl VerifiedMemo {
    fn key<T: SignedPayload>(signed: &Signed<T>) -> Hash {
        let mut hasher = blake3::Hasher::new_derive_key("openagi/consensus/sim-memo/v1");
        hasher.update(T::CONTEXT.as_bytes());
        hasher.update(&[0]);
        hasher.update(&signed.signer().to_bytes());
        hasher.update(&signed.signature().0);
        hasher.update(signed.payload_bytes());
        *hasher.finalize().as_bytes()
    }

    fn insert<T: SignedPayload>(&self, signed: &Signed<T>) {
        self.seen.borrow_mut().insert(Self::key(signed), true);
    }
}

impl Crypto for VerifiedMemo {
    fn open<T: SignedPayload + Clone + 'static>(&self, signed: &Signed<T>) -> Result<T, Error> {
        let key = Self::key(signed);
        let known = self.seen.borrow().get(&key).copied();
        let valid = match known {
            Some(valid) => valid,
            None => {
                let context = T::CONTEXT;
                let valid = signed
                    .signer()
                    .verify(context, signed.payload_bytes(), signed.signature())
                    .is_ok();
                self.seen.borrow_mut().insert(key, valid);
                valid
            }
        };
        if !valid {
            return Err(Error::BadSignature);
        }
        if let Some(value) = self
            .decoded
            .borrow()
            .get(&key)
            .and_then(|v| v.downcast_ref::<T>())
        {
            return Ok(value.clone());
        }
        let value: T = postcard::from_bytes(signed.payload_bytes())
            .map_err(|e| Error::Malformed(format!("signed payload: {e}")))?;
        self.decoded
            .borrow_mut()
            .insert(key, Rc::new(value.clone()));
        Ok(value)
    }
}

/// A signer that records what it signs in a [`VerifiedMemo`]; simulation
/// only.
#[derive(Debug)]
pub struct MemoSigner {
    identity: Rc<Identity>,
    memo: VerifiedMemo,
}

impl MemoSigner {
    /// A signer for `identity` sharing `memo`.
    pub fn new(identity: Rc<Identity>, memo: VerifiedMemo) -> Self {
        Self { identity, memo }
    }
}

impl Crypto for MemoSigner {
    fn open<T: SignedPayload + Clone + 'static>(&self, signed: &Signed<T>) -> Result<T, Error> {
        self.memo.open(signed)
    }
}

impl Signer for MemoSigner {
    fn public(&self) -> PublicKey {
        self.identity.public()
    }

    fn seal<T: SignedPayload>(&self, value: &T) -> Result<Signed<T>, Error> {
        let signed = Signed::sign(&self.identity, value)?;
        self.memo.insert(&signed);
        Ok(signed)
    }
}
