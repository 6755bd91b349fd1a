//! Joining by invite code: a validator's operator makes a code, a new node
//! initialises from the code and one bootstrap address (or the long form
//! alone), starts as a
//! full node that follows the ledger and shows up among the inviter's
//! peers; a spent, expired, revoked, mistyped and never-issued code are
//! each refused with their own message.

use std::path::Path;
use std::time::Duration;

use openagi_tests::{Daemon, DaemonOptions, init_validators, openagi, use_binary, wait_for};
use serde_json::json;

/// `openagi init --join CODE --bootstrap ADDR` on a fresh `dir`: (success,
/// stdout and stderr).
fn join(dir: &Path, code: &str, bootstrap: &str) -> (bool, String) {
    let (status, out, err) = openagi(&[
        "init",
        "--data-dir",
        &dir.to_string_lossy(),
        "--transport",
        "direct",
        "--network-id",
        openagi_tests::TEST_NETWORK,
        "--join",
        code,
        "--bootstrap",
        bootstrap,
    ])
    .expect("runs");
    (status.success(), format!("{out}{err}"))
}

fn new_code(inviter: &Daemon, expires_secs: u64, uses: u32) -> String {
    let (code, answer) = inviter
        .post(
            "/api/v1/invites",
            &json!({"expires_secs": expires_secs, "uses": uses}),
        )
        .expect("invite");
    assert_eq!(code, 200, "{answer}");
    answer["code"].as_str().expect("code").to_string()
}

#[test]
fn a_new_node_joins_by_invite_code_and_bad_codes_are_refused_each_for_its_reason() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), 1).expect("validator");
    let inviter = Daemon::start(&dirs[0], &DaemonOptions::default()).expect("starts");
    let bootstrap = inviter.multiaddr().expect("address");
    for i in 0..3 {
        let (code, answer) = inviter
            .post(
                "/api/v1/tx",
                &json!({"payload": format!("before {i}"), "wait": true}),
            )
            .expect("submit");
        assert_eq!(code, 200, "{answer}");
    }

    // The operator's command prints the code.
    let (status, out, err) = openagi(&[
        "invite",
        "--data-dir",
        &dirs[0].to_string_lossy(),
        "--uses",
        "1",
    ])
    .expect("invite");
    assert!(status.success(), "{err}");
    let code = out.trim().to_string();
    assert!(code.starts_with("OAGI-") && code.len() == 19, "{code}");
    assert!(
        err.contains("--join") && err.contains(openagi_tests::TEST_NETWORK),
        "{err}"
    );

    // The new node: init from the code and the address alone.
    let joined = root.path().join("joined");
    let (ok, text) = join(&joined, &code, &bootstrap);
    assert!(ok, "{text}");
    assert!(text.contains("joined network"), "{text}");
    assert!(joined.join("genesis.toml").exists());
    let new_node = Daemon::start(&joined, &DaemonOptions::default()).expect("joined node starts");
    let status = new_node.status().expect("status");
    assert_eq!(status["consensus"]["role"], "full", "{status}");
    let target = inviter.height();
    wait_for("the joined node follows", Duration::from_secs(20), || {
        (new_node.height() >= target).then_some(())
    })
    .expect("follows the ledger");
    let new_peer = new_node.peer_id().expect("peer id");
    wait_for("the inviter sees it", Duration::from_secs(20), || {
        let peers = inviter.status().ok()?["network"]["peers"].clone();
        peers
            .as_array()?
            .iter()
            .any(|p| p == new_peer.as_str())
            .then_some(())
    })
    .expect("among the inviter's peers");

    // The long form alone: no --network-id, no --bootstrap.
    let (http, answer) = inviter
        .post("/api/v1/invites", &json!({"expires_secs": 3600, "uses": 1}))
        .expect("invite");
    assert_eq!(http, 200, "{answer}");
    let long = answer["long"].as_str().expect("long form").to_string();
    assert!(long.starts_with("OAGI1:"), "{long}");
    let long_dir = root.path().join("long");
    let (status, out, err) = openagi(&[
        "init",
        "--data-dir",
        &long_dir.to_string_lossy(),
        "--transport",
        "direct",
        "--join",
        &long,
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}");
    let config = std::fs::read_to_string(long_dir.join("openagi.toml")).expect("config");
    assert!(config.contains(openagi_tests::TEST_NETWORK), "{config}");
    assert!(long_dir.join("genesis.toml").exists());

    // Spent: the code allowed one use.
    let (ok, text) = join(&root.path().join("second"), &code, &bootstrap);
    assert!(!ok && text.contains("already used"), "{text}");
    // Expired.
    let short = new_code(&inviter, 1, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, text) = join(&root.path().join("late"), &short, &bootstrap);
    assert!(!ok && text.contains("expired"), "{text}");
    // Revoked.
    let revoked = new_code(&inviter, 3600, 5);
    let (status, _, err) = openagi(&[
        "invite",
        "--data-dir",
        &dirs[0].to_string_lossy(),
        "revoke",
        &revoked,
    ])
    .expect("revoke");
    assert!(status.success(), "{err}");
    let (ok, text) = join(&root.path().join("revoked"), &revoked, &bootstrap);
    assert!(!ok && text.contains("revoked"), "{text}");
    // Mistyped: one symbol changed; caught by the check symbol before any
    // network traffic.
    let good = new_code(&inviter, 3600, 1);
    let mut symbols: Vec<char> = good.chars().collect();
    symbols[6] = if symbols[6] == 'X' { 'Y' } else { 'X' };
    let typo: String = symbols.into_iter().collect();
    let (ok, text) = join(&root.path().join("typo"), &typo, &bootstrap);
    assert!(!ok && text.contains("typo"), "{text}");
    // Never issued (well-formed, right check symbol).
    let forged = loop {
        let candidate = new_code(&inviter, 3600, 1);
        let (status, _, _) = openagi(&[
            "invite",
            "--data-dir",
            &dirs[0].to_string_lossy(),
            "revoke",
            &candidate,
        ])
        .expect("revoke");
        assert!(status.success());
        // A code this node never issued: same shape, fresh randomness.
        let fresh = openagi_node::common::invite::generate().expect("code");
        if fresh != candidate {
            break fresh;
        }
    };
    let (ok, text) = join(&root.path().join("forged"), &forged, &bootstrap);
    assert!(!ok && text.contains("no such invite"), "{text}");

    // The list shows each invite's state, never a code.
    let (code, list) = inviter
        .get("/api/v1/invites", Some(inviter.token()))
        .expect("list");
    assert_eq!(code, 200);
    for state in ["spent", "expired", "revoked", "open"] {
        assert!(list.contains(state), "{state} missing from {list}");
    }
    assert!(!list.contains(&good), "a code is never listed");
}
