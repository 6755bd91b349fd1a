//! Cryptographic building blocks of an Open-AGI node.
//!
//! This crate is pure: it does no networking and keeps no clock. Randomness
//! comes from the operating system only where a fresh secret or nonce is
//! generated ([`Identity::generate`], key store salts and nonces, sealing
//! ephemerals, ratchet keys); everything else is a deterministic function
//! of its inputs, so consensus and learning can use it inside seeded
//! simulations. It touches no files: [`keystore`] is a byte format, and
//! the `openagi-keyfiles` crate reads and writes it on disk.
//!
//! What lives here:
//! - [`identity`]: the node's Ed25519 identity, strict signature checks and
//!   the domain-separated [`Signed`] envelope every signed message uses.
//! - [`aead`]: ChaCha20-Poly1305 and XChaCha20-Poly1305 with keys that are
//!   zeroed on drop and errors that never reveal why a tag failed.
//! - [`keystore`]: secrets at rest, encrypted under an operator passphrase
//!   (Argon2id, XChaCha20-Poly1305) in a versioned, self-describing file
//!   format, and the storage keys derived from the identity.
//! - [`seal`]: X25519 keys (a node's static key is derived from its
//!   identity seed) and sealed envelopes addressed to a peer's X25519 key.
//! - [`poc`]: proof of computation: the memory-hard identity puzzle
//!   (Argon2id) and the cheap per-connection BLAKE3 challenge.
//! - [`ratchet`]: Double Ratchet (Olm) sessions through `vodozemac`, bounded
//!   per peer and persisted as encrypted pickles.
//!
//! - [`bench`]: the throughput table of `openagi bench crypto`; the one
//!   module that reads a clock, and only to time the other modules.
//!
//! The only threads this crate starts are the worker threads of
//! [`poc::solve`], and only for the duration of that call.

pub mod aead;
pub mod bench;
pub mod identity;
pub mod keystore;
pub mod poc;
pub mod ratchet;
pub mod seal;

pub use identity::{Identity, PublicKey, Signature, Signed};

/// Coarse classification of every error this crate returns, so callers can
/// decide what to do (retry, penalise a peer, tell the operator) without
/// matching on each variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Data from outside (a peer, a file) is malformed.
    Malformed,
    /// A signature, tag or proof did not verify.
    Invalid,
    /// The local environment failed (I/O, permissions, OS randomness).
    Local,
}

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input bytes have the wrong length or shape.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },
    /// A signature did not verify under the strict rules.
    #[error("signature verification failed")]
    BadSignature,
    /// The operating system failed to supply randomness.
    #[error("operating system randomness unavailable: {0}")]
    Randomness(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but is readable by others than its owner.
    #[error("{path} has mode {mode:o}; it must be readable by its owner only (chmod 600)")]
    InsecurePermissions {
        /// The file involved.
        path: std::path::PathBuf,
        /// Its current permission bits.
        mode: u32,
    },
    /// One signature of a batch did not verify.
    #[error("signature {index} of the batch failed verification")]
    BatchSignature {
        /// Position of the first failing signature in the batch.
        index: usize,
    },
    /// An authenticated ciphertext did not decrypt: wrong key, wrong
    /// associated data, or tampered bytes. Which one is deliberately not
    /// said.
    #[error("{what}: decryption failed (wrong key or tampered data)")]
    Decrypt {
        /// What was being decrypted.
        what: &'static str,
    },
    /// A key store file was opened with the wrong passphrase (or without
    /// one where one is needed).
    #[error("{path}: wrong passphrase")]
    WrongPassphrase {
        /// The key store file.
        path: std::path::PathBuf,
    },
    /// A key store file is damaged: truncated, bit-flipped or edited.
    #[error("{path}: key store file is corrupted: {detail}")]
    Corrupted {
        /// The key store file.
        path: std::path::PathBuf,
        /// What was found wrong.
        detail: String,
    },
    /// A format version or algorithm this build does not know.
    #[error("unsupported {what}: {detail}")]
    Unsupported {
        /// What was being decoded.
        what: &'static str,
        /// What was found.
        detail: String,
    },
    /// Parameters for a key derivation or puzzle are out of range.
    #[error("invalid parameters: {0}")]
    Params(String),
    /// An X25519 exchange produced a shared secret that does not depend on
    /// our secret key (the peer sent a low-order point).
    #[error("non-contributory X25519 key exchange (low-order peer key)")]
    NonContributory,
    /// A ratchet session operation failed: no session, a replayed or
    /// too-old message, a mismatched key.
    #[error("ratchet session: {0}")]
    Session(String),
    /// A proof of computation does not meet its target.
    #[error("proof of computation rejected: {0}")]
    BadProof(&'static str),
}

impl Error {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Malformed { .. } => ErrorKind::Malformed,
            Error::Unsupported { .. } | Error::Corrupted { .. } => ErrorKind::Malformed,
            Error::BadSignature
            | Error::BatchSignature { .. }
            | Error::Decrypt { .. }
            | Error::WrongPassphrase { .. }
            | Error::NonContributory
            | Error::Session(_)
            | Error::BadProof(_) => ErrorKind::Invalid,
            Error::Randomness(_)
            | Error::Io { .. }
            | Error::InsecurePermissions { .. }
            | Error::Params(_) => ErrorKind::Local,
        }
    }
}

/// Fills `buf` with bytes from the operating system's secure generator.
pub fn os_random(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Randomness(e.to_string()))
}
