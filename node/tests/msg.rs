//! Two real daemons exchanging end-to-end encrypted messages over
//! `/openagi/msg/1`, before and after one of them restarts, while the
//! other rotates its one-time keys every two seconds.

use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{Daemon, DaemonOptions, init, openagi, use_binary, wait_for};
use serde_json::{Value, json};

fn inbox(d: &Daemon) -> Vec<Value> {
    let (code, body) = d
        .get("/api/v1/inbox?limit=50", Some(d.token()))
        .expect("inbox answers");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["messages"].as_array().cloned().unwrap_or_default()
}

fn texts(d: &Daemon) -> Vec<String> {
    inbox(d)
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn two_daemons_exchange_messages_across_a_restart() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    init(&dir_a).expect("init a");
    init(&dir_b).expect("init b");
    let rotating = DaemonOptions {
        env: vec![("OPENAGI_NODE_ONE_TIME_KEY_ROTATION_SECS".into(), "2".into())],
        ..Default::default()
    };
    let a = Daemon::start(&dir_a, &rotating).expect("a starts");
    let boot = DaemonOptions {
        bootstrap: vec![a.multiaddr().expect("addr")],
        ..Default::default()
    };
    let mut b = Daemon::start(&dir_b, &boot).expect("b starts");
    wait_for("connected", Duration::from_secs(30), || {
        (a.connected_peers() == 1 && b.connected_peers() == 1).then_some(())
    })
    .expect("a and b connect");
    let id_a = a.peer_id().expect("id a");
    let id_b = b.peer_id().expect("id b");

    // B to A through the CLI: the first message opens a session.
    let b_dir = dir_b.to_str().expect("utf-8");
    let (status, out, err) = openagi(&[
        "msg",
        "send",
        "--data-dir",
        b_dir,
        "--to",
        &id_a,
        "hello from b",
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}\n{}", a.log());
    assert!(out.contains("delivered"), "{out}");
    let got = inbox(&a);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["text"], "hello from b");
    assert_eq!(got[0]["from_peer"], id_b.as_str());

    // A answers through the API.
    let (code, answer) = a
        .post(
            "/api/v1/msg",
            &json!({ "to": id_b, "text": "hello from a" }),
        )
        .expect("post");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(texts(&b), ["hello from a"]);

    // A rotates its one-time keys twice (audit trail); the sessions opened
    // before stay usable both ways, as the rest of the test shows.
    wait_for("two rotations", Duration::from_secs(30), || {
        (a.log().matches("one_time_keys_rotated").count() >= 2).then_some(())
    })
    .expect("A rotates its one-time keys");

    // B restarts: its sessions and inbox come back from the database.
    b.signal(Signal::SIGTERM).expect("sigterm");
    b.wait_exit(Duration::from_secs(15)).expect("b exits");
    drop(b);
    let b = Daemon::start(&dir_b, &boot).expect("b restarts");
    wait_for("reconnected", Duration::from_secs(30), || {
        (b.connected_peers() == 1).then_some(())
    })
    .expect("b reconnects");
    assert_eq!(texts(&b), ["hello from a"]);
    let (code, answer) = b
        .post("/api/v1/msg", &json!({ "to": id_a, "text": "b is back" }))
        .expect("post");
    assert_eq!(code, 200, "{answer}");
    let (code, answer) = a
        .post(
            "/api/v1/msg",
            &json!({ "to": id_b, "text": "welcome back" }),
        )
        .expect("post");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(texts(&a), ["hello from b", "b is back"], "newest last");
    assert_eq!(texts(&b), ["hello from a", "welcome back"]);

    // Bad requests are refused with a reason, not sent.
    let (code, _) = a
        .post("/api/v1/msg", &json!({ "to": "not-a-peer", "text": "x" }))
        .expect("post");
    assert_eq!(code, 400);
    let (code, _) = a
        .post(
            "/api/v1/msg",
            &json!({ "to": id_b, "text": "x".repeat(20_000) }),
        )
        .expect("post");
    assert_eq!(code, 413);
    // The messages never appear in the clear in either database.
    for dir in [&dir_a, &dir_b] {
        let db = std::fs::read(dir.join("node.redb")).expect("db");
        for text in ["hello from b", "welcome back"] {
            assert!(
                !db.windows(text.len()).any(|w| w == text.as_bytes()),
                "{text} stored in the clear"
            );
        }
    }
}
