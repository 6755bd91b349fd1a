//! `openagi keys sign|verify|passphrase|rotate`: operator commands on the
//! node identity.
//!
//! File signatures are Ed25519 over the context string
//! [`SIGN_FILE_CONTEXT`], a zero byte, and the file's bytes (the same
//! domain separation every signed message of the node uses), so a file
//! signature can never be replayed as a consensus vote or a rotation
//! statement, and vice versa.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use openagi_crypto::identity::{SIGNATURE_LEN, SignedPayload};
use openagi_crypto::{Identity, PublicKey, Signature, Signed};
use openagi_keyfiles::keyfile;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::common::datadir::{DataDir, KEY_FILE};
use crate::common::passphrase::PassphraseSource;

/// Domain-separation context of `openagi keys sign --file`.
pub const SIGN_FILE_CONTEXT: &str = "openagi/keys/sign-file/v1";
/// Domain-separation context of identity rotation statements.
pub const ROTATION_CONTEXT: &str = "openagi/keys/rotation/v1";
/// Directory (inside the data directory) holding rotation statements.
pub const ROTATIONS_DIR: &str = "rotations";
/// Largest file `keys sign` / `keys verify` read into memory.
pub const MAX_SIGNED_FILE_LEN: u64 = 1 << 30;

/// Signs `file` with the node identity; returns the signature as hex.
pub fn sign_file(dir: &DataDir, passphrase: &PassphraseSource, file: &Path) -> Result<String> {
    let bytes = read_signed_file(file)?;
    let identity = dir.identity(passphrase)?;
    Ok(identity.sign(SIGN_FILE_CONTEXT, &bytes).to_hex())
}

/// Input to `keys verify` that could not even be checked: bad hex, wrong
/// lengths, an unreadable file. Exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MalformedInput(String);

/// Checks a file signature made by `keys sign`.
///
/// `Ok(true)`: valid under the strict Ed25519 rules; `Ok(false)`: well
/// formed but not a valid signature of this file by this key.
pub fn verify_file(public_key: &str, signature: &str, file: &Path) -> Result<bool, MalformedInput> {
    let public = PublicKey::from_hex(public_key)
        .map_err(|e| MalformedInput(format!("--public-key: {e} (expected 64 hex digits)")))?;
    let sig_bytes = hex::decode(signature.trim()).map_err(|e| {
        MalformedInput(format!(
            "--signature: not hexadecimal ({e}); expected {} hex digits",
            2 * SIGNATURE_LEN
        ))
    })?;
    let signature = Signature::from_bytes(&sig_bytes).map_err(|_| {
        MalformedInput(format!(
            "--signature: {} bytes, expected {SIGNATURE_LEN} ({} hex digits)",
            sig_bytes.len(),
            2 * SIGNATURE_LEN
        ))
    })?;
    let bytes = read_signed_file(file).map_err(|e| MalformedInput(format!("{e:#}")))?;
    Ok(public.verify(SIGN_FILE_CONTEXT, &bytes, &signature).is_ok())
}

fn read_signed_file(file: &Path) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", file.display());
    }
    if meta.len() > MAX_SIGNED_FILE_LEN {
        bail!(
            "{} is larger than {MAX_SIGNED_FILE_LEN} bytes; sign a digest of it instead",
            file.display()
        );
    }
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

/// Sets or changes the passphrase of `node.key`, or (with `new` = `None`)
/// stores it unencrypted. The current key is unlocked first with
/// `current`; a wrong passphrase fails before anything is written, and the
/// replacement is atomic.
pub fn change_passphrase(
    dir: &DataDir,
    current: &PassphraseSource,
    new: Option<&PassphraseSource>,
) -> Result<String> {
    let _lock = dir.lock()?;
    let path = dir.file(KEY_FILE);
    let was_encrypted = dir.key_format()?.encrypted();
    let identity = dir.identity(current)?;
    crate::common::audit::attach(dir.path(), &identity)?;
    let secret = new.map(PassphraseSource::read).transpose()?;
    dir.write_identity(&path, &identity, secret.as_ref().map(|s| s.as_slice()))?;
    let action = match (was_encrypted, secret.is_some()) {
        (true, true) => "changed",
        (false, true) => "set",
        (true, false) => "removed",
        (false, false) => "kept off",
    };
    info!(
        target: "audit",
        event = "keystore_passphrase",
        action,
        public_key = %identity.public(),
        file = %path.display(),
        "key store passphrase {action}"
    );
    crate::common::audit::flush(std::time::Duration::from_secs(5));
    Ok(if secret.is_some() {
        format!(
            "passphrase {action}: {} is encrypted (Argon2id + XChaCha20-Poly1305)",
            path.display()
        )
    } else {
        format!(
            "{} is now unencrypted (protected by its 0600 mode only)",
            path.display()
        )
    })
}

/// What an identity rotation says: from now on `new_key` speaks for the
/// node that was `old_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStatement {
    /// The key being retired.
    pub old_key: PublicKey,
    /// The key replacing it.
    pub new_key: PublicKey,
    /// When the rotation was made (seconds since the Unix epoch).
    pub unix_time: u64,
}

impl SignedPayload for RotationStatement {
    const CONTEXT: &'static str = ROTATION_CONTEXT;
}

/// A rotation statement signed by both keys: the old one (so only the
/// holder of the old identity can name a successor) and the new one (so
/// nobody can claim a key they do not hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationRecord {
    /// Signed by the old key.
    pub by_old: Signed<RotationStatement>,
    /// Signed by the new key.
    pub by_new: Signed<RotationStatement>,
}

impl RotationRecord {
    /// Signs `statement` with both keys.
    pub fn sign(old: &Identity, new: &Identity, unix_time: u64) -> Result<Self> {
        let statement = RotationStatement {
            old_key: old.public(),
            new_key: new.public(),
            unix_time,
        };
        Ok(Self {
            by_old: Signed::sign(old, &statement)?,
            by_new: Signed::sign(new, &statement)?,
        })
    }

    /// Checks both signatures strictly, that they cover the same statement
    /// and that each was made by the key the statement names. This is the
    /// only way a peer should accept a node's new key.
    pub fn verify(&self) -> Result<RotationStatement> {
        let statement = self.by_old.verify().context("old key's signature")?;
        let again = self.by_new.verify().context("new key's signature")?;
        if statement != again {
            bail!("the two signatures cover different statements");
        }
        if *self.by_old.signer() != statement.old_key {
            bail!("first signature is not by the retired key");
        }
        if *self.by_new.signer() != statement.new_key {
            bail!("second signature is not by the new key");
        }
        if statement.old_key == statement.new_key {
            bail!("a rotation must change the key");
        }
        Ok(statement)
    }

    /// The canonical encoding (postcard), as stored and sent.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(postcard::to_stdvec(self)?)
    }

    /// Decodes and verifies a record.
    pub fn from_bytes(bytes: &[u8]) -> Result<(Self, RotationStatement)> {
        let record: Self = postcard::from_bytes(bytes).context("decoding rotation record")?;
        let statement = record.verify()?;
        Ok((record, statement))
    }
}

/// What `keys rotate` did.
#[derive(Debug)]
pub struct RotationReport {
    /// The verified statement.
    pub statement: RotationStatement,
    /// Where the statement was written.
    pub record_path: PathBuf,
    /// Where the old key was kept.
    pub old_key_path: PathBuf,
}

/// Replaces the node identity with a fresh one.
///
/// Order matters for crash safety: the signed statement and a copy of the
/// old key are on disk before `node.key` is replaced, so a crash at any
/// point leaves either the old identity in place or the new one with its
/// proof of succession. The new key is protected like the old one (same
/// passphrase, if it was encrypted).
pub fn rotate(dir: &DataDir, passphrase: &PassphraseSource) -> Result<RotationReport> {
    let _lock = dir.lock()?;
    let key_path = dir.file(KEY_FILE);
    let encrypted = dir.key_format()?.encrypted();
    // Read once, so the same passphrase protects the new key without a
    // second prompt.
    let secret = if encrypted {
        Some(passphrase.read()?)
    } else {
        None
    };
    let fixed = match &secret {
        Some(s) => PassphraseSource::fixed(s.clone()),
        None => passphrase.clone(),
    };
    let old = dir.identity(&fixed)?;
    // The old key signs the entry that names the new one.
    crate::common::audit::attach(dir.path(), &old)?;
    let new = Identity::generate()?;
    let unix_time = crate::unix_ms() / 1000;
    let record = RotationRecord::sign(&old, &new, unix_time)?;
    let statement = record.verify()?;

    let rotations = dir.file(ROTATIONS_DIR);
    std::fs::create_dir_all(&rotations)
        .with_context(|| format!("creating {}", rotations.display()))?;
    let record_path = rotations.join(format!(
        "{unix_time}-{}.rotation",
        old.public().fingerprint().replace(':', "")
    ));
    let old_key_path = dir.file(&format!("{KEY_FILE}.old-{unix_time}"));
    for path in [&record_path, &old_key_path] {
        if path.exists() {
            bail!(
                "{} exists; a rotation never overwrites (wait a second and retry)",
                path.display()
            );
        }
    }
    keyfile::write_atomic(&record_path, &record.to_bytes()?, 0o644)?;
    let old_bytes = zeroize::Zeroizing::new(
        std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?,
    );
    keyfile::write_atomic(&old_key_path, &old_bytes, 0o600)?;
    dir.write_identity(&key_path, &new, secret.as_ref().map(|s| s.as_slice()))?;
    // Re-read through the normal loader: what is on disk must be the key
    // the statement names.
    if dir.identity(&fixed)?.public() != new.public() {
        bail!(
            "{} does not hold the new key after writing it; the old key is in {}",
            key_path.display(),
            old_key_path.display()
        );
    }
    info!(
        target: "audit",
        event = "identity_rotated",
        old_key = %statement.old_key,
        new_key = %statement.new_key,
        statement = %record_path.display(),
        old_key_file = %old_key_path.display(),
        "identity key rotated"
    );
    crate::common::audit::flush(std::time::Duration::from_secs(5));
    // The new key takes over the log with an entry of its own, so the
    // chain ends signed by the key the node now has.
    crate::common::audit::attach(dir.path(), &new)?;
    info!(
        target: "audit",
        event = "identity_in_use",
        public_key = %new.public(),
        "the new identity key signs the audit log from here"
    );
    crate::common::audit::flush(std::time::Duration::from_secs(5));
    Ok(RotationReport {
        statement,
        record_path,
        old_key_path,
    })
}

/// Reads and verifies a stored rotation statement.
pub fn read_rotation(path: &Path) -> Result<RotationStatement> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(RotationRecord::from_bytes(&bytes)
        .with_context(|| format!("rotation statement {}", path.display()))?
        .1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> Identity {
        Identity::from_seed(&[byte; 32])
    }

    #[test]
    fn rotation_record_needs_both_signatures_over_one_statement() {
        let record = RotationRecord::sign(&id(1), &id(2), 7).expect("signed");
        let statement = record.verify().expect("valid");
        assert_eq!(statement.new_key, id(2).public());
        let (_, decoded) =
            RotationRecord::from_bytes(&record.to_bytes().expect("encoded")).expect("decodes");
        assert_eq!(decoded, statement);

        // A stranger's key cannot be named successor with only the old
        // signature, nor can the new key claim the old identity alone.
        let forged = RotationRecord {
            by_old: record.by_old.clone(),
            by_new: RotationRecord::sign(&id(1), &id(3), 7)
                .expect("signed")
                .by_new,
        };
        assert!(forged.verify().is_err());
        let self_signed = RotationRecord {
            by_old: record.by_new.clone(),
            by_new: record.by_new.clone(),
        };
        assert!(self_signed.verify().is_err());
    }

    #[test]
    fn file_signature_is_domain_separated() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("f");
        std::fs::write(&file, b"release 1.0").expect("written");
        let identity = id(9);
        let public = identity.public().to_hex();
        let good = identity.sign(SIGN_FILE_CONTEXT, b"release 1.0").to_hex();
        assert!(verify_file(&public, &good, &file).expect("well formed"));
        let other_context = identity.sign(ROTATION_CONTEXT, b"release 1.0").to_hex();
        assert!(!verify_file(&public, &other_context, &file).expect("well formed"));
        assert!(verify_file(&public, "zz", &file).is_err());
        assert!(verify_file(&public[2..], &good, &file).is_err());
        assert!(verify_file(&public, &good, &tmp.path().join("missing")).is_err());
    }
}
