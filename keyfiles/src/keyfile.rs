//! The identity secret on disk.
//!
//! The file holds the 32-byte Ed25519 seed as hex on one line. It is
//! written atomically (temporary file, fsync, rename, fsync of the
//! directory) with mode 0600, and refused on load if anyone but the owner
//! can read it, the way OpenSSH treats private keys.
//!
//! Encryption at rest under an operator passphrase is
//! [`crate::keystore`], which writes its files through [`write_atomic`].

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use openagi_crypto::{Error, Identity};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with the given Unix mode.
///
/// The data is on disk (file and directory entry fsynced) when this
/// returns, so a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // The mode given to open() is filtered by the umask; set it exactly.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// Saves `identity` to `path` (mode 0600). Fails if the file exists: a
/// node's key is never overwritten by accident.
pub fn save_new(path: &Path, identity: &Identity) -> Result<(), Error> {
    if path.exists() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "key file exists"),
        });
    }
    let text = Zeroizing::new(format!("{}\n", hex::encode(identity.seed().as_ref())));
    write_atomic(path, text.as_bytes(), 0o600)
}

/// Loads the identity stored at `path`, refusing group- or world-readable
/// files and anything that is not exactly one 32-byte hex seed.
pub fn load(path: &Path) -> Result<Identity, Error> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io_err(path))?);
    let seed = Zeroizing::new(hex::decode(text.trim()).map_err(|e| Error::Malformed {
        what: "identity key file",
        detail: format!("{}: not hexadecimal ({e})", path.display()),
    })?);
    Identity::from_seed_slice(&seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_with_owner_only_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        let id = Identity::generate().expect("randomness");
        save_new(&path, &id).expect("saved");
        let mode = fs::metadata(&path).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&path).expect("loads").public(), id.public());
    }

    #[test]
    fn existing_key_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        let first = Identity::generate().expect("randomness");
        save_new(&path, &first).expect("saved");
        assert!(save_new(&path, &Identity::generate().expect("randomness")).is_err());
        assert_eq!(load(&path).expect("loads").public(), first.public());
    }

    #[test]
    fn world_readable_or_corrupt_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.key");
        save_new(&path, &Identity::generate().expect("randomness")).expect("saved");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            load(&path),
            Err(Error::InsecurePermissions { .. })
        ));

        write_atomic(&path, b"zz-not-hex\n", 0o600).expect("written");
        assert!(matches!(load(&path), Err(Error::Malformed { .. })));
        write_atomic(&path, b"abcd\n", 0o600).expect("written");
        assert!(matches!(load(&path), Err(Error::Malformed { .. })));
    }
}
