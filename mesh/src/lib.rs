//! Store-and-forward routing of end-to-end encrypted envelopes across the
//! mesh: the relay's rules as a pure state machine.
//!
//! A node that wants to reach a peer it is not connected to hands an
//! [`Envelope`] (the recipient's key, an expiry, a hop budget and an
//! opaque, already encrypted body) to its [`Router`]. The router floods
//! it: to the recipient alone when the recipient is connected, otherwise
//! to every connected peer that does not have it yet, one hop less each
//! time. Every node on the way keeps the envelope (bounded per upstream
//! peer and in total) until it has handed it to the recipient or it
//! expires, and offers it again to peers that connect later, so a message
//! to an offline peer waits in the mesh and arrives when the peer comes
//! back. A seen-set of envelope ids stops loops and duplicates.
//!
//! Why flooding and not routing through the DHT: the recipient may be
//! offline (no route exists until it returns, and then it may reappear
//! next to any node), behind Tor every peer looks alike to the address
//! book, and a mesh of operators' nodes is small enough that sending each
//! envelope once over each link is cheap; the hop budget bounds how far a
//! flood goes, and the per-upstream quotas what one neighbour can make a
//! relay hold (not what many identities together can: see ARCHITECTURE
//! "Known limits").
//!
//! The router is sans-IO like the PBFT replica: peers coming and going,
//! envelopes from peers, the answers to its forwards and the time are
//! inputs (`handle_*`, [`Router::originate`], [`Router::restore`]); what to
//! send and what to delete are outputs ([`Router::poll_output`]). The node
//! persists an accepted envelope before it acknowledges it, and deletes it
//! when the router says so. Relays see the recipient's key, the expiry,
//! the hop budget and ciphertext, nothing else: bodies are the node's
//! business (sealed to the recipient).

mod envelope;
mod router;

pub use envelope::{
    DEFAULT_HOPS, Envelope, EnvelopeId, MAX_BODY_BYTES, MAX_CLOCK_SKEW_MS, MAX_HOPS,
    MAX_LIFETIME_MS,
};
pub use router::{
    DropReason, ForwardResult, Incoming, Limits, Origin, Output, Router, RouterStats,
};

/// Coarse classification of this crate's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The envelope is malformed or outside the protocol's bounds: the
    /// sender is at fault and may be penalised.
    Invalid,
    /// The envelope is fine but this node holds all it may: the sender
    /// should try again later.
    Busy,
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("envelope body of {0} bytes exceeds {MAX_BODY_BYTES}")]
    TooLarge(usize),
    /// The hop budget is larger than [`MAX_HOPS`].
    #[error("hop budget {0} exceeds {MAX_HOPS}")]
    TooManyHops(u8),
    /// The expiry has passed.
    #[error("envelope expired at {expires_unix_ms} (now {now_unix_ms})")]
    Expired {
        /// When it expired.
        expires_unix_ms: u64,
        /// The receiver's clock.
        now_unix_ms: u64,
    },
    /// The expiry is further away than [`MAX_LIFETIME_MS`] allows.
    #[error("envelope expiry {expires_unix_ms} is more than the longest lifetime ahead")]
    TooLongLived {
        /// The expiry asked for.
        expires_unix_ms: u64,
    },
    /// The envelope is addressed to the node handing it over, or sent by
    /// this node to itself.
    #[error("envelope addressed to the peer that sent it")]
    Misaddressed,
    /// This node already holds as many envelopes from that peer, or in
    /// total, as its limits allow.
    #[error("relay queue full ({what}); try again later")]
    Full {
        /// Which limit was reached.
        what: &'static str,
    },
    /// The envelope bytes do not decode.
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Full { .. } => ErrorKind::Busy,
            _ => ErrorKind::Invalid,
        }
    }
}
