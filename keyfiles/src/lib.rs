//! Secrets on disk: the node's identity key file and its key store files,
//! read and written with the care private keys need (owner-only modes,
//! atomic replacement with fsync, refusal of files others can read).
//!
//! This crate is the file I/O around [`openagi_crypto`]'s byte formats, so
//! that `crypto` stays free of I/O; the node and the network's onion keys
//! both write through it. Errors are [`openagi_crypto::Error`] (its
//! `Io`, `InsecurePermissions`, `Corrupted` and `WrongPassphrase` variants),
//! classified by [`openagi_crypto::ErrorKind`].

pub mod keyfile;
pub mod keystore;

pub use keyfile::write_atomic;
