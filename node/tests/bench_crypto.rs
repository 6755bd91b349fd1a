//! `openagi bench crypto` through the real binary: it runs every row and
//! prints the table (the figures themselves are only meaningful in a
//! release build).

use openagi_tests::{openagi, use_binary};

#[test]
fn bench_crypto_prints_every_row() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let (status, out, err) =
        openagi(&["bench", "crypto", "--time", "10ms", "--runs", "1"]).expect("runs");
    assert!(status.success(), "{out}{err}");
    for row in [
        "ChaCha20-Poly1305 encrypt 64 B",
        "ChaCha20-Poly1305 encrypt 1 KiB",
        "ChaCha20-Poly1305 encrypt 64 KiB",
        "Ed25519 sign",
        "Ed25519 verify, strict",
        "X25519 DH",
        "sealed envelope open",
        "puzzle verify (Argon2id 64 MiB, 1 pass)",
        "ratchet round trip (1 KiB each way)",
    ] {
        assert!(out.contains(row), "missing {row}:\n{out}");
    }
}

#[test]
fn bench_crypto_compares_with_openssl_on_this_machine() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    if let Err(e) = std::process::Command::new("openssl")
        .arg("version")
        .output()
    {
        // CI installs openssl (.ci/run); elsewhere the comparison is optional.
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl is required in CI: {e}"
        );
        eprintln!("skipped: no openssl command on this machine");
        return;
    }
    let (status, out, err) = openagi(&[
        "bench",
        "crypto",
        "--time",
        "10ms",
        "--runs",
        "1",
        "--openssl",
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("on this machine (`openssl speed -aead`)"),
        "{out}"
    );
    // Every compared row carries a ratio computed from a parsed figure.
    let ratios = out.lines().filter(|l| l.trim_end().ends_with('x')).count();
    assert_eq!(ratios, 4, "{out}");
}
