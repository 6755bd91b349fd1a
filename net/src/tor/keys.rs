//! Onion addresses, the system-tor onion key, and address rotation.
//!
//! A v3 onion address is `base32(pubkey || checksum || 0x03)` where the
//! checksum is the first two bytes of
//! `SHA3-256(".onion checksum" || pubkey || 0x03)` (rend-spec-v3 §6).
//! The system-tor key is kept as the 32-byte Ed25519 seed (hex, mode
//! 0600); tor's `ADD_ONION ED25519-V3:` wants the expanded form, which is
//! derived from the seed when needed.

use std::path::Path;

use data_encoding::{BASE32_NOPAD, BASE64};
use libp2p::Multiaddr;
use libp2p::multiaddr::{Onion3Addr, Protocol};
use sha2::Digest as _;
use sha3::Digest as _;
use zeroize::Zeroizing;

use super::{ONION_SERVICE_NICKNAME, TorError, TorSettings};

/// File name of the system-tor onion key inside the Tor directory.
pub(crate) const SYSTEM_KEY_FILE: &str = "onion_v3_seed";

/// The 35 bytes behind a v3 onion address for an Ed25519 public key.
fn onion_bytes(public: &[u8; 32]) -> [u8; 35] {
    let mut h = sha3::Sha3_256::new();
    sha3::Digest::update(&mut h, b".onion checksum");
    sha3::Digest::update(&mut h, public);
    sha3::Digest::update(&mut h, [3u8]);
    let sum = sha3::Digest::finalize(h);
    let mut out = [0u8; 35];
    out[..32].copy_from_slice(public);
    out[32] = sum[0];
    out[33] = sum[1];
    out[34] = 3;
    out
}

/// `<56 chars>.onion` for a public key.
pub(crate) fn onion_host(public: &[u8; 32]) -> String {
    format!(
        "{}.onion",
        BASE32_NOPAD
            .encode(&onion_bytes(public))
            .to_ascii_lowercase()
    )
}

/// The `/onion3/<addr>:<port>` multiaddr of an onion host (with or without
/// `.onion`).
pub fn onion_multiaddr(host: &str, port: u16) -> Option<Multiaddr> {
    let label = host.strip_suffix(".onion").unwrap_or(host);
    let bytes = BASE32_NOPAD
        .decode(label.to_ascii_uppercase().as_bytes())
        .ok()?;
    let bytes: [u8; 35] = bytes.try_into().ok()?;
    // Refuse addresses whose checksum or version is wrong: a typo would
    // otherwise cost a full descriptor lookup timeout.
    let mut public = [0u8; 32];
    public.copy_from_slice(&bytes[..32]);
    if onion_bytes(&public) != bytes {
        return None;
    }
    Some(Multiaddr::empty().with(Protocol::Onion3(Onion3Addr::from((bytes, port)))))
}

/// The onion host and port of an `/onion3/...` multiaddr (a trailing
/// `/p2p/<id>` is allowed).
pub fn parse_onion_multiaddr(addr: &Multiaddr) -> Option<(String, u16)> {
    let mut iter = addr.iter();
    let Some(Protocol::Onion3(onion)) = iter.next() else {
        return None;
    };
    match iter.next() {
        None | Some(Protocol::P2p(_)) => {}
        Some(_) => return None,
    }
    let host = format!(
        "{}.onion",
        BASE32_NOPAD.encode(onion.hash()).to_ascii_lowercase()
    );
    Some((host, onion.port()))
}

/// The onion host of a multiaddr, if it is one.
pub(crate) fn host_of(addr: &Multiaddr) -> Option<String> {
    parse_onion_multiaddr(addr).map(|(h, _)| h)
}

/// The system-tor onion key: loaded, or created (0600) on first use.
pub(crate) struct SystemKey {
    seed: Zeroizing<[u8; 32]>,
    /// `<56 chars>.onion`.
    pub host: String,
}

impl SystemKey {
    pub(crate) fn load_or_create(path: &Path) -> Result<Self, TorError> {
        let seed = match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|_| {
                    TorError::Control(format!(
                        "{} is not a hex key; remove it to make a new onion address",
                        path.display()
                    ))
                })?;
                let seed: [u8; 32] = bytes.try_into().map_err(|_| {
                    TorError::Control(format!(
                        "{} has the wrong length; remove it to make a new onion address",
                        path.display()
                    ))
                })?;
                seed
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed)
                    .map_err(|e| TorError::Io(std::io::Error::other(e.to_string())))?;
                openagi_keyfiles::keyfile::write_atomic(path, hex::encode(seed).as_bytes(), 0o600)
                    .map_err(|e| TorError::Io(std::io::Error::other(e.to_string())))?;
                seed
            }
            Err(e) => return Err(TorError::Io(e)),
        };
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        Ok(Self {
            seed: Zeroizing::new(seed),
            host: onion_host(&public),
        })
    }

    /// The key as `ADD_ONION` takes it: `ED25519-V3:<base64 of the
    /// 64-byte expanded secret key>`.
    pub(crate) fn add_onion_key(&self) -> String {
        let digest = sha2::Sha512::digest(*self.seed);
        let mut expanded = Zeroizing::new([0u8; 64]);
        expanded.copy_from_slice(&digest);
        // Ed25519 scalar clamping, as tor applies to its own keys.
        expanded[0] &= 248;
        expanded[31] &= 63;
        expanded[31] |= 64;
        format!("ED25519-V3:{}", BASE64.encode(&expanded[..]))
    }
}

/// The onion address a system-tor node has (creating its key if needed).
pub fn system_onion_address(settings: &TorSettings) -> Result<String, TorError> {
    Ok(SystemKey::load_or_create(&settings.system_key_path())?.host)
}

/// Forgets the node's onion keys (both modes), so the next start gets a
/// new onion address. Returns the paths removed.
pub fn rotate_address(settings: &TorSettings) -> Result<Vec<std::path::PathBuf>, TorError> {
    let mut removed = Vec::new();
    let system = settings.system_key_path();
    if system.exists() {
        std::fs::remove_file(&system)?;
        removed.push(system);
    }
    // arti keeps the service identity in its keystore and per-service
    // state (descriptor revision counters, introduction points) next to it.
    let state = settings.arti_state_dir();
    for dir in [
        state
            .join("keystore")
            .join("hss")
            .join(ONION_SERVICE_NICKNAME),
        state.join("hss").join(ONION_SERVICE_NICKNAME),
    ] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onion_addresses_round_trip_and_checksum() {
        let public = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
            .verifying_key()
            .to_bytes();
        let host = onion_host(&public);
        assert_eq!(host.len(), 62);
        let addr = onion_multiaddr(&host, 4610).expect("valid");
        assert_eq!(parse_onion_multiaddr(&addr), Some((host.clone(), 4610)));
        let with_peer = format!("{addr}/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo");
        let with_peer: Multiaddr = with_peer.parse().expect("multiaddr");
        assert_eq!(
            parse_onion_multiaddr(&with_peer),
            Some((host.clone(), 4610))
        );
        // one character changed: checksum fails
        let mut bad = host.clone().into_bytes();
        bad[0] = if bad[0] == b'a' { b'b' } else { b'a' };
        assert!(onion_multiaddr(std::str::from_utf8(&bad).expect("ascii"), 1).is_none());
        let tcp: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("multiaddr");
        assert!(parse_onion_multiaddr(&tcp).is_none());
    }

    #[test]
    fn known_vector() {
        // The all-zero key: 51 'a's for the 256 zero bits, and the final
        // character holds the low bits of the version byte 0x03.
        let host = onion_host(&[0u8; 32]);
        assert!(
            host.starts_with("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            "{host}"
        );
        assert!(host.ends_with("d.onion"), "{host}");
    }

    #[test]
    fn system_key_persists_and_rotates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = TorSettings::with_dir(dir.path());
        let a = system_onion_address(&settings).expect("create");
        let b = system_onion_address(&settings).expect("load");
        assert_eq!(a, b);
        let key = SystemKey::load_or_create(&settings.system_key_path()).expect("load");
        assert!(key.add_onion_key().starts_with("ED25519-V3:"));
        let removed = rotate_address(&settings).expect("rotate");
        assert_eq!(removed.len(), 1);
        let c = system_onion_address(&settings).expect("new");
        assert_ne!(a, c);
    }
}
