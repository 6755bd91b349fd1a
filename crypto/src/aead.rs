//! Authenticated encryption: ChaCha20-Poly1305 (RFC 8439) and its
//! extended-nonce variant XChaCha20-Poly1305.
//!
//! A thin layer over the `chacha20poly1305` crate that fixes the shapes
//! the rest of the node uses: 32-byte keys zeroed on drop, nonces checked
//! for length instead of panicking, the tag appended to the ciphertext,
//! decrypted plaintext returned in a buffer zeroed on drop, and a single
//! [`Error::Decrypt`] for every authentication failure so callers cannot
//! leak which part of a message was wrong.
//!
//! Use the 12-byte-nonce functions only where the nonce is guaranteed
//! unique per key (a counter, or a key used once). Where nonces are random,
//! use [`seal_random`]/[`open_random`]: with 24-byte nonces, random choice
//! is safe for any practical number of messages.

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use zeroize::Zeroizing;

use crate::Error;

/// Length of a key.
pub const KEY_LEN: usize = 32;
/// Length of a ChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an XChaCha20-Poly1305 nonce.
pub const XNONCE_LEN: usize = 24;
/// Length of the authentication tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// A 256-bit AEAD key, zeroed when dropped.
#[derive(Clone)]
pub struct AeadKey(Zeroizing<[u8; KEY_LEN]>);

impl AeadKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Wraps a key given as a slice that must hold exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| Error::Malformed {
            what: "AEAD key",
            detail: format!("expected {KEY_LEN} bytes, got {}", bytes.len()),
        })?;
        Ok(Self::from_bytes(arr))
    }

    /// A fresh random key from the operating system.
    pub fn generate() -> Result<Self, Error> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        crate::os_random(key.as_mut())?;
        Ok(Self(key))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn chacha(&self) -> ChaCha20Poly1305 {
        // The key length is fixed by the type, so construction cannot fail;
        // `new_from_slice` avoids an unzeroed temporary copy of the key.
        match ChaCha20Poly1305::new_from_slice(self.0.as_ref()) {
            Ok(cipher) => cipher,
            Err(_) => unreachable!("key length is fixed at 32 bytes"),
        }
    }

    fn xchacha(&self) -> XChaCha20Poly1305 {
        match XChaCha20Poly1305::new_from_slice(self.0.as_ref()) {
            Ok(cipher) => cipher,
            Err(_) => unreachable!("key length is fixed at 32 bytes"),
        }
    }
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(..)")
    }
}

fn nonce_array<const N: usize>(nonce: &[u8]) -> Result<[u8; N], Error> {
    nonce.try_into().map_err(|_| Error::Malformed {
        what: "AEAD nonce",
        detail: format!("expected {N} bytes, got {}", nonce.len()),
    })
}

fn encrypt_with<A: AeadInOut>(
    cipher: &A,
    nonce: &chacha20poly1305::aead::Nonce<A>,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    // Reserve room for the tag up front so appending it never reallocates
    // and leaves a stray copy of the (by then encrypted) buffer behind.
    let mut buffer = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buffer.extend_from_slice(plaintext);
    cipher
        .encrypt_in_place(nonce, aad, &mut buffer)
        .map_err(|_| Error::Malformed {
            what: "AEAD input",
            detail: "message or associated data too long".into(),
        })?;
    Ok(buffer)
}

fn decrypt_with<A: AeadInOut>(
    cipher: &A,
    nonce: &chacha20poly1305::aead::Nonce<A>,
    aad: &[u8],
    ciphertext: &[u8],
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    cipher
        .decrypt_in_place(nonce, aad, &mut *buffer)
        .map_err(|_| Error::Decrypt { what })?;
    Ok(buffer)
}

/// Encrypts `plaintext` with ChaCha20-Poly1305 under a 12-byte `nonce`,
/// authenticating `aad` too. Returns ciphertext followed by the tag.
///
/// The nonce must never repeat under the same key.
pub fn encrypt(
    key: &AeadKey,
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let nonce = chacha20poly1305::Nonce::from(nonce_array::<NONCE_LEN>(nonce)?);
    encrypt_with(&key.chacha(), &nonce, aad, plaintext)
}

/// Decrypts and authenticates the output of [`encrypt`].
pub fn decrypt(
    key: &AeadKey,
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let nonce = chacha20poly1305::Nonce::from(nonce_array::<NONCE_LEN>(nonce)?);
    decrypt_with(
        &key.chacha(),
        &nonce,
        aad,
        ciphertext,
        "ChaCha20-Poly1305 ciphertext",
    )
}

/// Encrypts `plaintext` with XChaCha20-Poly1305 under a 24-byte `nonce`.
/// Returns ciphertext followed by the tag.
pub fn encrypt_x(
    key: &AeadKey,
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let nonce = chacha20poly1305::XNonce::from(nonce_array::<XNONCE_LEN>(nonce)?);
    encrypt_with(&key.xchacha(), &nonce, aad, plaintext)
}

/// Decrypts and authenticates the output of [`encrypt_x`].
pub fn decrypt_x(
    key: &AeadKey,
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let nonce = chacha20poly1305::XNonce::from(nonce_array::<XNONCE_LEN>(nonce)?);
    decrypt_with(
        &key.xchacha(),
        &nonce,
        aad,
        ciphertext,
        "XChaCha20-Poly1305 ciphertext",
    )
}

/// Encrypts with XChaCha20-Poly1305 under a fresh random nonce and returns
/// `nonce || ciphertext || tag`.
pub fn seal_random(key: &AeadKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let mut nonce = [0u8; XNONCE_LEN];
    crate::os_random(&mut nonce)?;
    let body = encrypt_x(key, &nonce, aad, plaintext)?;
    let mut out = Vec::with_capacity(XNONCE_LEN + body.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens the output of [`seal_random`].
pub fn open_random(key: &AeadKey, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    if sealed.len() < XNONCE_LEN + TAG_LEN {
        return Err(Error::Malformed {
            what: "sealed message",
            detail: format!("{} bytes is shorter than nonce and tag", sealed.len()),
        });
    }
    let (nonce, body) = sealed.split_at(XNONCE_LEN);
    decrypt_x(key, nonce, aad, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let key = AeadKey::from_bytes([9; KEY_LEN]);
        let ct = encrypt(&key, &[1; NONCE_LEN], b"aad", b"hello").expect("encrypts");
        assert_eq!(ct.len(), 5 + TAG_LEN);
        assert_eq!(
            &*decrypt(&key, &[1; NONCE_LEN], b"aad", &ct).expect("opens"),
            b"hello"
        );
        assert!(matches!(
            decrypt(&key, &[1; NONCE_LEN], b"aae", &ct),
            Err(Error::Decrypt { .. })
        ));
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(matches!(
            decrypt(&key, &[1; NONCE_LEN], b"aad", &bad),
            Err(Error::Decrypt { .. })
        ));
        assert!(matches!(
            decrypt(&key, &[1; 8], b"aad", &ct),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            decrypt(&key, &[1; NONCE_LEN], b"aad", &[0; 3]),
            Err(Error::Decrypt { .. })
        ));
    }

    #[test]
    fn random_nonce_sealing_round_trips() {
        let key = AeadKey::generate().expect("randomness");
        let a = seal_random(&key, b"ctx", b"secret").expect("seals");
        let b = seal_random(&key, b"ctx", b"secret").expect("seals");
        assert_ne!(a, b, "fresh nonce each time");
        assert_eq!(&*open_random(&key, b"ctx", &a).expect("opens"), b"secret");
        assert!(open_random(&key, b"other", &a).is_err());
        assert!(matches!(
            open_random(&key, b"ctx", &a[..30]),
            Err(Error::Malformed { .. })
        ));
        let other = AeadKey::generate().expect("randomness");
        assert!(matches!(
            open_random(&other, b"ctx", &a),
            Err(Error::Decrypt { .. })
        ));
    }
}
