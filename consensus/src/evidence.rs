//! Equivocation evidence: two conflicting votes one validator signed for
//! the same view and sequence number (two prepares or two commits for
//! different batches). Either message alone is legitimate; together they
//! prove the validator is faulty, and anyone holding the validator set can
//! check that ([`Equivocation::verify`]) without trusting who reported it.
//!
//! A replica that receives the second vote emits
//! [`crate::Output::Evidence`]; the node records it and puts it on the
//! ledger as a transaction tagged [`REMOVAL_TAG`], where anyone can check
//! it and which removes the equivocator at the next epoch boundary
//! ([`crate::membership`]).

use openagi_crypto::{PublicKey, Signed};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::messages::Prepare;
use crate::signing::Crypto;
use crate::types::{Commit, ValidatorSet};

/// The first bytes of a ledger transaction that carries evidence as a
/// record only (what earlier releases put on the ledger; it changes
/// nothing).
pub const EVIDENCE_TAG: &[u8] = b"openagi/evidence/v1\n";

/// The first bytes of a ledger transaction that carries evidence and asks
/// for the equivocator's removal from the validator set
/// ([`crate::membership`]). A tag of its own, so that evidence recorded
/// before removals existed does not remove anyone when the chain is
/// replayed by a newer release.
pub const REMOVAL_TAG: &[u8] = b"openagi/removal/v1\n";

/// Two conflicting signed votes of one validator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Equivocation {
    /// Two prepares for one (view, sequence number), different batches.
    Prepares(Signed<Prepare>, Signed<Prepare>),
    /// Two commits for one (view, sequence number), different batches.
    Commits(Signed<Commit>, Signed<Commit>),
}

/// What checked evidence shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    /// The validator that equivocated.
    pub validator: PublicKey,
    /// `prepare` or `commit`.
    pub kind: &'static str,
    /// The view.
    pub view: u64,
    /// The sequence number.
    pub seq: u64,
}

fn invalid(detail: &str) -> Error {
    Error::Malformed(format!("equivocation evidence: {detail}"))
}

impl Equivocation {
    /// Checks the evidence: both messages verify (strictly) under one
    /// member of `validators`, on its network, for the same view and
    /// sequence number, for different batches.
    pub fn verify<C: Crypto>(
        &self,
        validators: &ValidatorSet,
        crypto: &C,
    ) -> Result<Proven, Error> {
        let (signer, other, kind, a, b) = match self {
            Equivocation::Prepares(x, y) => {
                let (p, q) = (crypto.open(x)?, crypto.open(y)?);
                (
                    *x.signer(),
                    *y.signer(),
                    "prepare",
                    (p.network, p.view, p.seq, p.digest),
                    (q.network, q.view, q.seq, q.digest),
                )
            }
            Equivocation::Commits(x, y) => {
                let (p, q) = (crypto.open(x)?, crypto.open(y)?);
                (
                    *x.signer(),
                    *y.signer(),
                    "commit",
                    (p.network, p.view, p.seq, p.digest),
                    (q.network, q.view, q.seq, q.digest),
                )
            }
        };
        if signer != other {
            return Err(invalid("the two votes have different signers"));
        }
        if validators.index_of(&signer).is_none() {
            return Err(invalid("the signer is not a validator"));
        }
        if a.0 != validators.network() || b.0 != validators.network() {
            return Err(invalid("a vote is for another network"));
        }
        if (a.1, a.2) != (b.1, b.2) {
            return Err(invalid(
                "the votes are for different views or sequence numbers",
            ));
        }
        if a.3 == b.3 {
            return Err(invalid("the votes agree"));
        }
        Ok(Proven {
            validator: signer,
            kind,
            view: a.1,
            seq: a.2,
        })
    }

    /// The ledger transaction payload carrying this evidence as a record.
    pub fn to_payload(&self) -> Result<Vec<u8>, Error> {
        self.tagged(EVIDENCE_TAG)
    }

    /// The ledger transaction payload that asks for the equivocator's
    /// removal.
    pub fn to_removal_payload(&self) -> Result<Vec<u8>, Error> {
        self.tagged(REMOVAL_TAG)
    }

    fn tagged(&self, tag: &[u8]) -> Result<Vec<u8>, Error> {
        let mut out = tag.to_vec();
        out.extend(postcard::to_stdvec(self).map_err(|e| invalid(&e.to_string()))?);
        Ok(out)
    }

    /// The evidence in a ledger payload: `Ok(None)` for payloads that are
    /// not evidence, an error for tagged payloads that do not decode.
    pub fn from_payload(payload: &[u8]) -> Result<Option<Self>, Error> {
        Self::untagged(payload, EVIDENCE_TAG)
    }

    /// The evidence in a removal request's payload (see
    /// [`Equivocation::from_payload`]).
    pub fn from_removal_payload(payload: &[u8]) -> Result<Option<Self>, Error> {
        Self::untagged(payload, REMOVAL_TAG)
    }

    fn untagged(payload: &[u8], tag: &[u8]) -> Result<Option<Self>, Error> {
        match payload.strip_prefix(tag) {
            None => Ok(None),
            Some(rest) => postcard::from_bytes(rest)
                .map(Some)
                .map_err(|e| invalid(&e.to_string())),
        }
    }
}
