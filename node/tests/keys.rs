//! The key commands through the real binary: file signatures and their
//! exit statuses, the encrypted key store, passphrase changes, identity
//! rotation, and a daemon started on an encrypted key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use openagi_tests::{Daemon, DaemonOptions, TEST_NETWORK, init, openagi, openagi_bin, use_binary};

/// Runs the binary with extra environment variables; stdin is not a
/// terminal, so nothing can prompt.
fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let output = Command::new(openagi_bin())
        .args(args)
        .env_remove("OPENAGI_PASSPHRASE")
        .env_remove("OPENAGI_PASSPHRASE_FILE")
        .env_remove("OPENAGI_NEW_PASSPHRASE")
        .env_remove("OPENAGI_NEW_PASSPHRASE_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn run(args: &[&str]) -> (i32, String, String) {
    run_env(args, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn public_key(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["keys", "show", "--json", "--data-dir", s(dir)];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "keys show: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["public_key"].as_str().expect("public_key").to_string()
}

#[test]
fn sign_and_verify_a_file_with_exact_exit_statuses() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("node");
    init(&dir).expect("init");
    let file = root.path().join("release.tar");
    std::fs::write(&file, b"the bytes of a release").expect("written");

    let (code, sig, err) = run(&["keys", "sign", "--file", s(&file), "--data-dir", s(&dir)]);
    assert_eq!(code, 0, "{err}");
    let sig = sig.trim().to_string();
    assert_eq!(sig.len(), 128, "{sig}");
    let key = public_key(&dir, &[]);

    let verify = |key: &str, sig: &str, file: &Path| {
        run(&[
            "keys",
            "verify",
            "--public-key",
            key,
            "--signature",
            sig,
            "--file",
            s(file),
        ])
    };
    let (code, out, err) = verify(&key, &sig, &file);
    assert_eq!(code, 0, "valid: {out}{err}");

    // Invalid: a changed file, a signature by another key, a flipped bit.
    let other = root.path().join("other.tar");
    std::fs::write(&other, b"the bytes of a releasE").expect("written");
    let (code, out, _) = verify(&key, &sig, &other);
    assert_eq!(code, 1, "changed file: {out}");
    assert!(out.contains("INVALID"), "{out}");
    let stranger = root.path().join("stranger");
    init(&stranger).expect("init");
    let (code, _, _) = verify(&public_key(&stranger, &[]), &sig, &file);
    assert_eq!(code, 1, "other key");
    let mut flipped = sig.clone().into_bytes();
    flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).expect("ascii");
    let (code, _, _) = verify(&key, &flipped, &file);
    assert_eq!(code, 1, "flipped bit");

    // Malformed: bad hex, wrong lengths, unreadable file.
    for (k, sg, f, what) in [
        (key.as_str(), "not-hex", file.as_path(), "bad signature hex"),
        (key.as_str(), &sig[..126], file.as_path(), "short signature"),
        ("zz", sig.as_str(), file.as_path(), "bad key hex"),
        (&key[..62], sig.as_str(), file.as_path(), "short key"),
        (
            key.as_str(),
            sig.as_str(),
            root.path().join("missing").as_path(),
            "missing file",
        ),
    ] {
        let (code, _, err) = verify(k, sg, f);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains("malformed input"), "{what}: {err}");
    }
}

#[test]
fn encrypted_key_store_passphrase_change_and_rotation() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("node");
    let p1 = root.path().join("p1");
    let p2 = root.path().join("p2");
    std::fs::write(&p1, "first passphrase\n").expect("written");
    std::fs::write(&p2, "second passphrase\n").expect("written");
    let key_path = dir.join("node.key");

    let (code, out, err) = run(&[
        "init",
        "--encrypt",
        "--passphrase-file",
        s(&p1),
        "--network-id",
        TEST_NETWORK,
        "--data-dir",
        s(&dir),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("encrypted"), "{out}");
    let raw = std::fs::read(&key_path).expect("key");
    assert!(raw.starts_with(b"OAGIKEY\0"), "key store format");
    let mode = std::fs::metadata(&key_path)
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let key = public_key(&dir, &["--passphrase-file", s(&p1)]);
    let (code, out, err) = run(&[
        "keys",
        "show",
        "--data-dir",
        s(&dir),
        "--passphrase-file",
        s(&p1),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("key store    encrypted"), "{out}");

    // No passphrase and no terminal: a clear refusal. Wrong passphrase:
    // a clear error and the file untouched.
    let (code, _, err) = run(&["keys", "show", "--data-dir", s(&dir)]);
    assert_ne!(code, 0);
    assert!(err.contains("--passphrase-file"), "{err}");
    let (code, _, err) = run(&[
        "keys",
        "show",
        "--data-dir",
        s(&dir),
        "--passphrase-file",
        s(&p2),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("wrong passphrase"), "{err}");
    let (code, _, err) = run(&[
        "keys",
        "passphrase",
        "--data-dir",
        s(&dir),
        "--passphrase-file",
        s(&p2),
        "--new-passphrase-file",
        s(&p1),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(std::fs::read(&key_path).expect("key"), raw, "unchanged");

    // The environment variable works too.
    let (code, _, err) = run_env(
        &["keys", "show", "--data-dir", s(&dir)],
        &[("OPENAGI_PASSPHRASE", "first passphrase")],
    );
    assert_eq!(code, 0, "{err}");

    // Change the passphrase: the old one stops working, the key is the same.
    let (code, out, err) = run(&[
        "keys",
        "passphrase",
        "--data-dir",
        s(&dir),
        "--passphrase-file",
        s(&p1),
        "--new-passphrase-file",
        s(&p2),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("audit"), "audit line: {err}");
    assert_eq!(public_key(&dir, &["--passphrase-file", s(&p2)]), key);
    let (code, _, _) = run(&[
        "keys",
        "show",
        "--data-dir",
        s(&dir),
        "--passphrase-file",
        s(&p1),
    ]);
    assert_ne!(code, 0, "old passphrase no longer opens the key");

    // Rotate: a new key under the same passphrase, the old one kept, a
    // statement signed by both.
    let before_rotation = std::fs::read(&key_path).expect("key");
    let (code, out, err) = run(&[
        "keys",
        "rotate",
        "--data-dir",
        s(&dir),
        "--passphrase-file",
        s(&p2),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("identity key rotated"), "audit line: {err}");
    let new_key = public_key(&dir, &["--passphrase-file", s(&p2)]);
    assert_ne!(new_key, key);
    assert!(out.contains(&key) && out.contains(&new_key), "{out}");
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let old_file = entries
        .iter()
        .find(|n| n.starts_with("node.key.old-"))
        .expect("old key kept");
    let old_mode = std::fs::metadata(dir.join(old_file))
        .expect("old key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(old_mode, 0o600);
    assert_eq!(
        std::fs::read(dir.join(old_file)).expect("old"),
        before_rotation,
        "the old key file is kept byte for byte"
    );
    let statements: Vec<_> = std::fs::read_dir(dir.join("rotations"))
        .expect("rotations dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    assert_eq!(statements.len(), 1);
    let statement =
        openagi_node::cli::keys::read_rotation(&statements[0]).expect("statement verifies");
    assert_eq!(statement.old_key.to_hex(), key);
    assert_eq!(statement.new_key.to_hex(), new_key);

    // Remove the passphrase: back to the plain format, same key.
    let (code, out, err) = run(&[
        "keys",
        "passphrase",
        "--remove",
        "--data-dir",
        s(&dir),
        "--passphrase-file",
        s(&p2),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(public_key(&dir, &[]), new_key);
}

#[test]
fn daemon_runs_on_an_encrypted_key_and_warns_on_a_plain_one() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let plain = root.path().join("plain");
    init(&plain).expect("init");
    let daemon = Daemon::start(&plain, &DaemonOptions::default()).expect("starts");
    assert!(daemon.log().contains("unencrypted"), "{}", daemon.log());
    drop(daemon);

    let dir = root.path().join("enc");
    let pass = root.path().join("pass");
    std::fs::write(&pass, "daemon passphrase").expect("written");
    let (status, out, err) = openagi(&[
        "init",
        "--encrypt",
        "--passphrase-file",
        s(&pass),
        "--network-id",
        TEST_NETWORK,
        "--data-dir",
        s(&dir),
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}");
    let options = DaemonOptions {
        env: vec![("OPENAGI_PASSPHRASE_FILE".into(), s(&pass).into())],
        ..Default::default()
    };
    let daemon = Daemon::start(&dir, &options).expect("starts on the encrypted key");
    assert!(!daemon.log().contains("unencrypted"), "{}", daemon.log());
    assert_eq!(
        daemon.peer_id().expect("peer id"),
        serde_json::from_str::<serde_json::Value>(
            &run(&[
                "keys",
                "show",
                "--json",
                "--data-dir",
                s(&dir),
                "--passphrase-file",
                s(&pass)
            ])
            .1
        )
        .expect("json")["peer_id"]
            .as_str()
            .expect("peer id")
    );
}

#[test]
fn a_closed_stdout_ends_keys_show_quietly() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("a");
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    init(&dir).expect("init");
    for json in [false, true] {
        // The reading end is closed before the child starts, so its first
        // write meets a closed pipe, like `openagi keys show | head -0`.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut args = vec!["keys", "show", "--data-dir", s(&dir)];
        if json {
            args.push("--json");
        }
        let output = Command::new(openagi_bin())
            .args(&args)
            .env_remove("OPENAGI_PASSPHRASE_FILE")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("binary runs");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.is_empty(), "nothing to say about a closed pipe: {err}");
        assert!(output.status.success(), "{:?} {err}", output.status);
    }
}
