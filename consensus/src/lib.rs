//! Byzantine fault tolerant ordering for Open-AGI: a sans-IO PBFT replica,
//! the ledger blocks and commit certificates it produces. The seeded
//! simulator that checks it under faults is its harness crate,
//! `openagi-consensus-sim`.
//!
//! The replica ([`Replica`]) is a pure state machine. The node feeds it
//! client transactions ([`Replica::handle_request`]), messages from peers
//! ([`Replica::handle_message`]) and the passage of time
//! ([`Replica::handle_tick`], with milliseconds supplied by the caller), and
//! drains what it wants done with [`Replica::poll_output`]: messages to
//! send, records to persist, blocks that committed. It owns no socket,
//! clock, thread, disk or randomness, which is what lets the simulator run many
//! replicas through many adversarial schedules, each reproducible from its
//! seed.
//!
//! Persistence contract: outputs come out in order and the node must finish
//! each [`Output::Persist`] durably before it acts on any later output. The
//! replica always emits the record that commits it to a vote before the
//! message carrying that vote, so honouring the order is enough for a
//! restarted replica ([`Replica::restore`]) never to contradict itself.
//!
//! The node's loop, in short (one validator here, so it commits alone):
//!
//! ```
//! use openagi_consensus::{
//!     ClientId, Config, IdentitySigner, NetworkId, Output, PersistedState, Replica, Transaction,
//!     ValidatorSet,
//! };
//! use openagi_crypto::Identity;
//!
//! let identity = Identity::from_seed(&[7; 32]);
//! let validators = ValidatorSet::new(NetworkId::from_name("devnet"), vec![identity.public()])?;
//! let mut replica = Replica::new(Config::default(), validators, IdentitySigner::new(identity), 0)?;
//! let mut durable = PersistedState::default();
//! let tx = Transaction { client: ClientId([1; 32]), seq: 1, payload: b"hello".to_vec().into() };
//! replica.handle_request(tx, 0)?;
//! replica.handle_tick(10); // call again at `replica.poll_timeout()`
//! let mut committed = 0;
//! while let Some(output) = replica.poll_output() {
//!     match output {
//!         // Must be durable before the next output is acted upon.
//!         Output::Persist(record) => durable.apply(&record),
//!         Output::Send { to: _, message } => drop(message.encode()?),
//!         Output::Committed { block, .. } => committed = block.height,
//!         Output::ViewInstalled { .. } => {}
//!         // A validator signed conflicting votes: keep the proof, put it
//!         // on the ledger.
//!         Output::Evidence(_proof) => {}
//!         // A block changed the validator set (or refused a change); a
//!         // new set took over: route messages to it, and if this
//!         // replica is not in it, follow the chain as a full node.
//!         Output::Membership { .. } | Output::EpochStarted { .. } => {}
//!         // A peer wants blocks older than the replica keeps in memory:
//!         // read them from disk and hand them back.
//!         Output::ReadBlocks { peer, from, last } => {
//!             let stored: Vec<_> = durable.blocks.iter().skip(from as usize - 1).take((last - from + 1) as usize).cloned().collect();
//!             replica.handle_stored_blocks(&peer, stored, 10);
//!         }
//!     }
//! }
//! assert_eq!(committed, 1);
//! // After a restart: Replica::restore(config, validators, signer, durable, now).
//! # Ok::<(), openagi_consensus::Error>(())
//! ```
//!
//! Modules:
//! - [`types`]: validator sets, transactions, batches, blocks, commit
//!   certificates and [`verify_chain`].
//! - [`ledger`]: the head of the chain, its most recent blocks and the
//!   exactly-once table.
//! - [`follow`]: a full node's follower (verifying committed blocks without
//!   voting) and the `/openagi/ledger/1` messages.
//! - [`evidence`]: equivocation evidence anyone with the validator set can
//!   verify.
//! - [`membership`]: the validator set as ledger state: joins gated by
//!   proof of computation, leaves, removals for equivocation, and the
//!   epochs they make.
//! - [`messages`]: the signed wire messages.
//! - [`rotation`]: the leader schedule that skips recently failed
//!   primaries, computed from committed blocks.
//! - [`replica`]: the state machine, its configuration, outputs, persisted
//!   state and drop counters.
//! - [`signing`]: the signing and checking seam (strict Ed25519 for nodes,
//!   a shared memo for simulation).

pub mod bundle;
pub mod evidence;
pub mod follow;
pub mod ledger;
pub mod membership;
pub mod messages;
pub mod replica;
pub mod rotation;
pub mod signing;
pub mod types;

pub use ledger::Ledger;
pub use messages::Message;
pub use replica::{
    Config, DropReason, Output, PersistRecord, PersistedState, Recipient, RecoveryBound,
    RecoveryStatus, Replica, Stats,
};
pub use rotation::{PrimaryChoice, Schedule};
pub use signing::{Crypto, IdentitySigner, Signer, StrictCrypto};
pub use types::{
    Batch, Block, ClientId, CommitCertificate, NetworkId, Transaction, ValidatorSet, verify_chain,
};

/// A 32-byte BLAKE3 digest.
pub type Hash = [u8; 32];

/// Coarse classification of errors, so a caller can decide what to do
/// (penalise a peer, fix configuration, back off) without matching every
/// variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Input from outside is malformed.
    Malformed,
    /// A signature, certificate or block did not verify.
    Invalid,
    /// A bounded buffer is full or a rate limit applies; try later.
    Capacity,
    /// The configuration or validator set is unusable.
    Config,
}

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input bytes or values have the wrong shape.
    #[error("malformed input: {0}")]
    Malformed(String),
    /// A signature failed the strict check.
    #[error("signature verification failed")]
    BadSignature,
    /// A quorum certificate (commit, checkpoint, prepared, view change) is
    /// not valid.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A block does not extend the chain it claims to.
    #[error("invalid block at height {height}: {reason}")]
    InvalidBlock {
        /// Height of the offending block.
        height: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A bounded buffer is full.
    #[error("{0} is full")]
    Full(&'static str),
    /// A transaction was already applied or is already pending.
    #[error("transaction is a duplicate")]
    Duplicate,
    /// The configuration or validator set is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// This identity is not a validator of the epoch the chain has
    /// reached (it left, was removed, or never joined).
    #[error("this identity is not a validator of epoch {0}")]
    NotInValidatorSet(u64),
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Malformed(_) | Error::Duplicate => ErrorKind::Malformed,
            Error::BadSignature | Error::InvalidCertificate(_) | Error::InvalidBlock { .. } => {
                ErrorKind::Invalid
            }
            Error::Full(_) => ErrorKind::Capacity,
            Error::Config(_) | Error::NotInValidatorSet(_) => ErrorKind::Config,
        }
    }
}

impl From<openagi_crypto::Error> for Error {
    fn from(e: openagi_crypto::Error) -> Self {
        match e {
            openagi_crypto::Error::BadSignature => Error::BadSignature,
            other => Error::Malformed(other.to_string()),
        }
    }
}
