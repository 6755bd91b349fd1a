//! Key store files on disk: reading (refused when group- or
//! world-readable or larger than any key store file), atomic writes (mode
//! 0600, fsync, rename), passphrase changes that leave the file as it was
//! on any failure. The format itself is
//! [`openagi_crypto::keystore`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use openagi_crypto::keystore::{
    FileInfo, IDENTITY_LABEL, MAX_FILE_LEN, Protection, StoredSecret, decode, encode, inspect_bytes,
};
use openagi_crypto::{Error, Identity};
use zeroize::Zeroizing;

fn corrupted(path: &Path, detail: impl Into<String>) -> Error {
    Error::Corrupted {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(corrupted(
            path,
            format!("{} bytes is larger than any key store file", meta.len()),
        ));
    }
    Ok(Zeroizing::new(fs::read(path).map_err(io)?))
}

/// Writes `secret` under `label` to `path`, replacing any existing file
/// atomically. Use for secrets that change (session pickles); use
/// [`create`] for keys that must never be overwritten by accident.
pub fn write(
    path: &Path,
    label: &str,
    secret: &[u8],
    protection: &Protection<'_>,
) -> Result<(), Error> {
    let bytes = encode(label, secret, protection)?;
    crate::keyfile::write_atomic(path, &bytes, 0o600)
}

/// Like [`write()`], but fails if `path` exists.
pub fn create(
    path: &Path,
    label: &str,
    secret: &[u8],
    protection: &Protection<'_>,
) -> Result<(), Error> {
    if path.exists() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "key store file exists"),
        });
    }
    write(path, label, secret, protection)
}

/// Reads the secret stored under `label` at `path`.
///
/// `passphrase` may be `None` for unencrypted files; for encrypted ones a
/// missing or wrong passphrase gives [`Error::WrongPassphrase`]. Reading
/// never modifies the file.
pub fn read(path: &Path, label: &str, passphrase: Option<&[u8]>) -> Result<StoredSecret, Error> {
    let bytes = read_file(path)?;
    decode(&bytes, path, label, passphrase)
}

/// Reads a file's self-description without the passphrase: whether to ask
/// the operator for one, and whether to warn that it is unencrypted.
pub fn inspect(path: &Path) -> Result<FileInfo, Error> {
    let bytes = read_file(path)?;
    inspect_bytes(&bytes, path)
}

/// Re-encrypts the file at `path` under new protection (a new passphrase,
/// new Argon2id parameters, or to or from unencrypted).
///
/// The old passphrase is checked first; on any failure the file is left
/// exactly as it was. The replacement is atomic.
pub fn change_passphrase(
    path: &Path,
    old: Option<&[u8]>,
    new: &Protection<'_>,
) -> Result<(), Error> {
    let bytes = read_file(path)?;
    let label = inspect_bytes(&bytes, path)?.label;
    let stored = decode(&bytes, path, &label, old)?;
    write(path, &label, &stored.secret, new)
}

/// Saves a new identity (fails if the file exists).
pub fn save_identity(
    path: &Path,
    identity: &Identity,
    protection: &Protection<'_>,
) -> Result<(), Error> {
    create(path, IDENTITY_LABEL, identity.seed().as_ref(), protection)
}

/// Loads the identity stored at `path`.
pub fn load_identity(
    path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<(Identity, FileInfo), Error> {
    let stored = read(path, IDENTITY_LABEL, passphrase)?;
    let identity = Identity::from_seed_slice(&stored.secret)?;
    Ok((identity, stored.info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openagi_crypto::keystore::KdfParams;

    /// Small enough for fast tests; never use outside tests.
    const FAST: KdfParams = KdfParams {
        memory_kib: 64,
        passes: 1,
        lanes: 1,
    };

    fn protect(passphrase: &[u8]) -> Protection<'_> {
        Protection::Passphrase {
            passphrase,
            params: FAST,
        }
    }

    fn fixed_identity() -> Identity {
        Identity::from_seed(&[42; 32])
    }

    #[test]
    fn encrypted_identity_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        save_identity(&path, &fixed_identity(), &protect(b"correct horse")).expect("saved");
        let mode = fs::metadata(&path).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let raw = fs::read(&path).expect("readable");
        assert!(
            !raw.windows(32).any(|w| w == [42u8; 32]),
            "seed must not appear in the clear"
        );

        let (id, info) = load_identity(&path, Some(b"correct horse")).expect("loads");
        assert_eq!(id.public(), fixed_identity().public());
        assert!(info.encrypted);
        assert_eq!(info.kdf, Some(FAST));
        assert_eq!(inspect(&path).expect("inspects"), info);
        assert!(
            save_identity(&path, &fixed_identity(), &protect(b"x")).is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn wrong_or_missing_passphrase_is_a_typed_error_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        save_identity(&path, &fixed_identity(), &protect(b"right")).expect("saved");
        let before = fs::read(&path).expect("readable");
        assert!(matches!(
            load_identity(&path, Some(b"wrong")),
            Err(Error::WrongPassphrase { .. })
        ));
        assert!(matches!(
            load_identity(&path, None),
            Err(Error::WrongPassphrase { .. })
        ));
        assert!(matches!(
            change_passphrase(&path, Some(b"wrong"), &protect(b"new")),
            Err(Error::WrongPassphrase { .. })
        ));
        assert_eq!(fs::read(&path).expect("readable"), before);
        let err = load_identity(&path, Some(b"wrong")).expect_err("refused");
        assert!(err.to_string().contains("wrong passphrase"), "{err}");
    }

    #[test]
    fn truncated_or_corrupted_files_are_reported_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        save_identity(&path, &fixed_identity(), &protect(b"pw")).expect("saved");
        let good = fs::read(&path).expect("readable");
        // Every truncation and every single-bit flip, checked in memory
        // (the file path is only used in messages); then on disk below.
        let at = dir.path().join("damaged.key");
        for len in 0..good.len() {
            let err =
                decode(&good[..len], &at, IDENTITY_LABEL, Some(b"pw")).expect_err("truncated");
            assert!(matches!(err, Error::Corrupted { .. }), "len {len}: {err}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            let err = decode(&bad, &at, IDENTITY_LABEL, Some(b"pw")).expect_err("flipped");
            assert!(
                matches!(err, Error::Corrupted { .. } | Error::Unsupported { .. }),
                "byte {i}: {err}"
            );
        }
        let bad_path = dir.path().join("damaged.key");
        crate::keyfile::write_atomic(&bad_path, &good[..good.len() - 1], 0o600).expect("written");
        let err = load_identity(&bad_path, Some(b"pw")).expect_err("truncated file");
        assert!(err.to_string().contains("corrupted"), "{err}");
        // A failed rotation of a damaged file leaves it as it was.
        let mut bad = good.clone();
        bad[good.len() - 40] ^= 1;
        crate::keyfile::write_atomic(&bad_path, &bad, 0o600).expect("written");
        assert!(change_passphrase(&bad_path, Some(b"pw"), &protect(b"new")).is_err());
        assert_eq!(fs::read(&bad_path).expect("readable"), bad);
        assert_eq!(fs::read(&path).expect("readable"), good);
    }

    #[test]
    fn passphrase_rotation_and_unencrypted_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("identity.key");
        save_identity(&path, &fixed_identity(), &Protection::Unencrypted).expect("saved");
        let info = inspect(&path).expect("inspects");
        assert!(!info.encrypted, "flagged so the node can warn");
        let (id, _) = load_identity(&path, None).expect("loads without passphrase");
        assert_eq!(id.public(), fixed_identity().public());

        change_passphrase(&path, None, &protect(b"first")).expect("encrypts");
        assert!(inspect(&path).expect("inspects").encrypted);
        change_passphrase(&path, Some(b"first"), &protect(b"second")).expect("rotates");
        assert!(matches!(
            load_identity(&path, Some(b"first")),
            Err(Error::WrongPassphrase { .. })
        ));
        let (id, info) = load_identity(&path, Some(b"second")).expect("loads");
        assert_eq!(id.public(), fixed_identity().public());
        assert!(info.encrypted);
        let tmp = dir.path().join(".identity.key.tmp");
        assert!(!tmp.exists(), "no temporary file left behind");
    }

    #[test]
    fn refusals_labels_and_params() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        write(&path, "ratchet", b"pickle", &protect(b"pw")).expect("written");
        assert!(matches!(
            read(&path, IDENTITY_LABEL, Some(b"pw")),
            Err(Error::Malformed { .. })
        ));
        assert_eq!(
            &*read(&path, "ratchet", Some(b"pw")).expect("reads").secret,
            b"pickle"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            read(&path, "ratchet", Some(b"pw")),
            Err(Error::InsecurePermissions { .. })
        ));

        assert!(matches!(
            write(&path, "x", b"s", &protect(b"")),
            Err(Error::Params(_))
        ));
        assert!(write(&path, "bad label", b"s", &Protection::Unencrypted).is_err());
        let silly = KdfParams {
            memory_kib: 4,
            passes: 1,
            lanes: 1,
        };
        assert!(
            write(
                &path,
                "x",
                b"s",
                &Protection::Passphrase {
                    passphrase: b"p",
                    params: silly
                }
            )
            .is_err()
        );
        assert!(KdfParams::PRODUCTION.validate().is_ok());
        assert_eq!(KdfParams::default(), KdfParams::PRODUCTION);
    }
}
