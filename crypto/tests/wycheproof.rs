//! Wycheproof test vectors (see `tests/vectors/NOTICE`) run against the
//! primitives this crate relies on and against its own wrappers.
//!
//! Every test asserts the exact number of vectors it ran, so a truncated or
//! swapped vector file cannot pass silently.

use std::path::PathBuf;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use openagi_crypto::aead::{self, AeadKey};
use openagi_crypto::identity::verify_strict_raw;
use openagi_crypto::seal;
use serde_json::Value;

fn load(name: &str) -> Value {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "vectors", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path).expect("vector file present");
    serde_json::from_str(&text).expect("vector file is JSON")
}

fn hex_field(test: &Value, field: &str) -> Vec<u8> {
    hex::decode(test[field].as_str().expect("hex string field")).expect("valid hex")
}

/// Calls `f(group, test)` for every test and returns how many there were.
fn for_each_test(file: &Value, mut f: impl FnMut(&Value, &Value)) -> usize {
    let mut count = 0;
    for group in file["testGroups"].as_array().expect("testGroups") {
        for test in group["tests"].as_array().expect("tests") {
            f(group, test);
            count += 1;
        }
    }
    assert_eq!(
        count as u64,
        file["numberOfTests"].as_u64().expect("numberOfTests")
    );
    count
}

#[derive(Clone, Copy)]
enum Variant {
    ChaCha,
    XChaCha,
}

/// Runs one AEAD file through the `chacha20poly1305` crate directly and
/// through `openagi_crypto::aead`, checking both encryption and decryption.
fn run_aead(name: &str, variant: Variant) -> usize {
    let file = load(name);
    let nonce_len = match variant {
        Variant::ChaCha => aead::NONCE_LEN,
        Variant::XChaCha => aead::XNONCE_LEN,
    };
    for_each_test(&file, |_, t| {
        let id = t["tcId"].as_u64().expect("tcId");
        let key = hex_field(t, "key");
        let iv = hex_field(t, "iv");
        let aad = hex_field(t, "aad");
        let msg = hex_field(t, "msg");
        let mut ct = hex_field(t, "ct");
        ct.extend_from_slice(&hex_field(t, "tag"));
        let valid = match t["result"].as_str().expect("result") {
            "valid" => true,
            "invalid" => false,
            other => panic!("tcId {id}: unexpected result {other}"),
        };

        // Our wrapper.
        let ours = AeadKey::from_slice(&key).expect("32-byte key");
        let (enc, dec) = match variant {
            Variant::ChaCha => (
                aead::encrypt(&ours, &iv, &aad, &msg),
                aead::decrypt(&ours, &iv, &aad, &ct),
            ),
            Variant::XChaCha => (
                aead::encrypt_x(&ours, &iv, &aad, &msg),
                aead::decrypt_x(&ours, &iv, &aad, &ct),
            ),
        };
        if valid {
            assert_eq!(enc.expect("encrypts"), ct, "tcId {id}: ciphertext");
            assert_eq!(&*dec.expect("decrypts"), &msg[..], "tcId {id}: plaintext");
        } else {
            assert!(
                dec.is_err(),
                "tcId {id}: invalid vector accepted by wrapper"
            );
            if iv.len() != nonce_len {
                assert!(enc.is_err(), "tcId {id}: bad nonce length accepted");
            }
        }

        // The underlying crate, where the nonce has a representable length.
        if iv.len() == nonce_len {
            let (enc, dec) = match variant {
                Variant::ChaCha => {
                    let c = ChaCha20Poly1305::new_from_slice(&key).expect("key");
                    let n = chacha20poly1305::Nonce::try_from(&iv[..]).expect("nonce");
                    (
                        c.encrypt(
                            &n,
                            Payload {
                                msg: &msg,
                                aad: &aad,
                            },
                        ),
                        c.decrypt(
                            &n,
                            Payload {
                                msg: &ct,
                                aad: &aad,
                            },
                        ),
                    )
                }
                Variant::XChaCha => {
                    let c = XChaCha20Poly1305::new_from_slice(&key).expect("key");
                    let n = chacha20poly1305::XNonce::try_from(&iv[..]).expect("nonce");
                    (
                        c.encrypt(
                            &n,
                            Payload {
                                msg: &msg,
                                aad: &aad,
                            },
                        ),
                        c.decrypt(
                            &n,
                            Payload {
                                msg: &ct,
                                aad: &aad,
                            },
                        ),
                    )
                }
            };
            if valid {
                assert_eq!(enc.expect("encrypts"), ct, "tcId {id}: crate ciphertext");
                assert_eq!(dec.expect("decrypts"), msg, "tcId {id}: crate plaintext");
            } else {
                assert!(dec.is_err(), "tcId {id}: invalid vector accepted by crate");
            }
        } else {
            assert!(
                !valid,
                "tcId {id}: valid vector with a nonce of {} bytes",
                iv.len()
            );
        }
    })
}

#[test]
fn chacha20_poly1305_vectors() {
    assert_eq!(
        run_aead("chacha20_poly1305_test.json", Variant::ChaCha),
        325
    );
}

#[test]
fn xchacha20_poly1305_vectors() {
    assert_eq!(
        run_aead("xchacha20_poly1305_test.json", Variant::XChaCha),
        315
    );
}

#[test]
fn ed25519_vectors_with_strict_verification() {
    let file = load("ed25519_test.json");
    let (mut accepted, mut rejected) = (0, 0);
    let count = for_each_test(&file, |group, t| {
        let id = t["tcId"].as_u64().expect("tcId");
        let pk = hex::decode(group["publicKey"]["pk"].as_str().expect("pk")).expect("hex");
        let msg = hex_field(t, "msg");
        let sig = hex_field(t, "sig");
        let result = verify_strict_raw(&pk, &msg, &sig);
        match t["result"].as_str().expect("result") {
            "valid" => {
                assert!(
                    result.is_ok(),
                    "tcId {id}: valid signature rejected: {result:?}"
                );
                accepted += 1;
            }
            "invalid" => {
                assert!(result.is_err(), "tcId {id}: invalid signature accepted");
                rejected += 1;
            }
            other => panic!("tcId {id}: unexpected result {other}"),
        }
        if id == 151 {
            // R encodes the identity with the sign bit set: only strict
            // (small-order R) checking refuses it.
            assert!(
                result.is_err(),
                "tcId 151 must be rejected by strict verification"
            );
        }
    });
    assert_eq!((count, accepted, rejected), (151, 88, 63));
}

#[test]
fn x25519_vectors_with_contributory_check() {
    let file = load("x25519_test.json");
    let (mut zero, mut ok) = (0, 0);
    let count = for_each_test(&file, |_, t| {
        let id = t["tcId"].as_u64().expect("tcId");
        let private: [u8; 32] = hex_field(t, "private").try_into().expect("32-byte private");
        let public = hex_field(t, "public");
        let shared = hex_field(t, "shared");
        assert!(
            matches!(t["result"].as_str(), Some("valid" | "acceptable")),
            "tcId {id}"
        );
        let secret = seal::X25519Secret::from_bytes(private);
        let peer = seal::X25519Public::from_slice(&public).expect("32-byte public");
        match secret.diffie_hellman(&peer) {
            Ok(got) => {
                assert_ne!(shared, [0u8; 32], "tcId {id}: zero secret accepted");
                assert_eq!(&got[..], &shared[..], "tcId {id}: shared secret");
                ok += 1;
            }
            Err(e) => {
                assert_eq!(
                    shared, [0u8; 32],
                    "tcId {id}: contributory exchange refused"
                );
                assert!(
                    matches!(e, openagi_crypto::Error::NonContributory),
                    "tcId {id}"
                );
                zero += 1;
            }
        }
    });
    assert_eq!((count, ok, zero), (518, 487, 31));
}

/// The reason `identity::verify_batch` loops over `verify_strict`: the
/// batch equation accepts tcId 151 (an `R` that encodes the identity with
/// the sign bit set), which strict verification refuses.
#[test]
fn dalek_batch_verification_accepts_what_strict_refuses() {
    use ed25519_dalek::{Signature, VerifyingKey};
    let file = load("ed25519_test.json");
    let mut seen = 0;
    for_each_test(&file, |group, t| {
        if t["tcId"].as_u64() != Some(151) {
            return;
        }
        seen += 1;
        let pk: [u8; 32] = hex::decode(group["publicKey"]["pk"].as_str().expect("pk"))
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        let msg = hex_field(t, "msg");
        let sig: [u8; 64] = hex_field(t, "sig").try_into().expect("64 bytes");
        let key = VerifyingKey::from_bytes(&pk).expect("valid key");
        let sig = Signature::from_bytes(&sig);
        assert!(ed25519_dalek::verify_batch(&[&msg[..]], &[sig], &[key]).is_ok());
        assert!(key.verify_strict(&msg, &sig).is_err());
        assert!(verify_strict_raw(&pk, &msg, &sig.to_bytes()).is_err());
    });
    assert_eq!(seen, 1);
}
