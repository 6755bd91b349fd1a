//! The envelope every relay handles, its id and its bounds.

use std::fmt;

use openagi_crypto::PublicKey;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Largest body, in bytes: a ratchet message carrying the largest text a
/// node sends, sealed, with room to spare inside the 64 KiB request limit
/// of `/openagi/msg/1`.
pub const MAX_BODY_BYTES: usize = 60 * 1024;
/// Largest hop budget an envelope may carry: enough to cross any mesh of
/// operators' nodes, small enough that a flood dies out.
pub const MAX_HOPS: u8 = 8;
/// The hop budget a sender gives its envelopes.
pub const DEFAULT_HOPS: u8 = 6;
/// Longest an envelope may live: a week, long enough for an operator to
/// bring a node back after a weekend, short enough that seen-sets and
/// relay queues forget.
pub const MAX_LIFETIME_MS: u64 = 7 * 24 * 3600 * 1000;
/// How far ahead of the receiver's clock a sender's may be: expiries up to
/// this much beyond the longest lifetime are still accepted.
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

const ID_DOMAIN: &[u8] = b"openagi/mesh/envelope-id/v1";

/// An envelope's identity: BLAKE3 over everything but the hop budget, so
/// a copy that took another path is recognised as the same envelope and a
/// relay cannot alter what it carries without changing its id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EnvelopeId(pub [u8; 32]);

impl EnvelopeId {
    /// Lowercase hexadecimal.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hexadecimal characters.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvelopeId({}…)", &self.to_hex()[..12])
    }
}

/// What relays carry: who it is for, until when, how many more hops, and
/// a body only the recipient can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The recipient's node key.
    pub to: PublicKey,
    /// Unix milliseconds after which nobody forwards or keeps it.
    pub expires_unix_ms: u64,
    /// Hops it may still travel past the next one; the recipient itself
    /// can always be handed it.
    pub hops_left: u8,
    /// Opaque to relays (the node seals it to the recipient).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl Envelope {
    /// The envelope's id (see [`EnvelopeId`]).
    pub fn id(&self) -> EnvelopeId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(ID_DOMAIN);
        hasher.update(&self.to.to_bytes());
        hasher.update(&self.expires_unix_ms.to_le_bytes());
        hasher.update(&(self.body.len() as u64).to_le_bytes());
        hasher.update(&self.body);
        EnvelopeId(*hasher.finalize().as_bytes())
    }

    /// Checks the protocol's bounds at `now_unix_ms`.
    pub fn validate(&self, now_unix_ms: u64) -> Result<(), Error> {
        if self.body.len() > MAX_BODY_BYTES {
            return Err(Error::TooLarge(self.body.len()));
        }
        if self.hops_left > MAX_HOPS {
            return Err(Error::TooManyHops(self.hops_left));
        }
        if self.expires_unix_ms <= now_unix_ms {
            return Err(Error::Expired {
                expires_unix_ms: self.expires_unix_ms,
                now_unix_ms,
            });
        }
        if self.expires_unix_ms > now_unix_ms + MAX_LIFETIME_MS + MAX_CLOCK_SKEW_MS {
            return Err(Error::TooLongLived {
                expires_unix_ms: self.expires_unix_ms,
            });
        }
        Ok(())
    }

    /// Encodes for the wire and the store (postcard).
    pub fn encode(&self) -> Vec<u8> {
        // Serialising fixed-size fields and one byte string into a vector
        // cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes bytes from a peer or the disk, refusing more than an
    /// envelope can hold before decoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_BODY_BYTES + 128 {
            return Err(Error::TooLarge(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| Error::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openagi_crypto::Identity;

    fn envelope() -> Envelope {
        Envelope {
            to: Identity::from_seed(&[1; 32]).public(),
            expires_unix_ms: 10_000,
            hops_left: DEFAULT_HOPS,
            body: vec![7; 100],
        }
    }

    #[test]
    fn the_id_ignores_the_hop_budget_and_covers_everything_else() {
        let e = envelope();
        let mut fewer_hops = e.clone();
        fewer_hops.hops_left = 1;
        assert_eq!(e.id(), fewer_hops.id());
        let mut other_body = e.clone();
        other_body.body[0] ^= 1;
        assert_ne!(e.id(), other_body.id());
        let mut later = e.clone();
        later.expires_unix_ms += 1;
        assert_ne!(e.id(), later.id());
        let mut other_to = e.clone();
        other_to.to = Identity::from_seed(&[2; 32]).public();
        assert_ne!(e.id(), other_to.id());
    }

    #[test]
    fn bounds_are_checked() {
        let e = envelope();
        assert!(e.validate(0).is_ok());
        assert!(matches!(e.validate(10_000), Err(Error::Expired { .. })));
        let mut big = e.clone();
        big.body = vec![0; MAX_BODY_BYTES + 1];
        assert!(matches!(big.validate(0), Err(Error::TooLarge(_))));
        let mut hops = e.clone();
        hops.hops_left = MAX_HOPS + 1;
        assert!(matches!(hops.validate(0), Err(Error::TooManyHops(_))));
        let mut forever = e.clone();
        forever.expires_unix_ms = MAX_LIFETIME_MS + MAX_CLOCK_SKEW_MS + 1;
        assert!(matches!(
            forever.validate(0),
            Err(Error::TooLongLived { .. })
        ));
    }

    #[test]
    fn encoding_round_trips_and_garbage_is_an_error() {
        let e = envelope();
        assert_eq!(Envelope::decode(&e.encode()).expect("decodes"), e);
        assert!(Envelope::decode(&[0xff; 40]).is_err());
        assert!(Envelope::decode(&vec![0; MAX_BODY_BYTES + 200]).is_err());
        // The wire layout is pinned: 32-byte key, varint expiry, hop byte,
        // length-prefixed body.
        let bytes = e.encode();
        assert_eq!(bytes.len(), 32 + 2 + 1 + 1 + 100);
    }
}
