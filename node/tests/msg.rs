//! Two real daemons exchanging end-to-end encrypted messages over
//! `/openagi/msg/1`, before and after one of them restarts, while the
//! other rotates its one-time keys every two seconds.

use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{Daemon, DaemonOptions, free_port, init, openagi, use_binary, wait_for};
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

fn peer_id_of(dir: &std::path::Path) -> String {
    let (status, out, err) = openagi(&[
        "keys",
        "show",
        "--data-dir",
        dir.to_str().expect("utf-8"),
        "--json",
    ])
    .expect("keys show runs");
    assert!(status.success(), "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    v["peer_id"].as_str().expect("peer id").to_string()
}

fn outbox_states(d: &Daemon) -> Vec<(String, String)> {
    let (code, body) = d
        .get("/api/v1/outbox?limit=50", Some(d.token()))
        .expect("outbox answers");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["text"].as_str().unwrap_or_default().to_string(),
                m["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn state_of(d: &Daemon, text: &str) -> Option<String> {
    outbox_states(d)
        .into_iter()
        .find(|(t, _)| t == text)
        .map(|(_, s)| s)
}

fn wait_state(d: &Daemon, text: &str, state: &str, others: &[&Daemon]) {
    wait_for(
        &format!("{text:?} {state}"),
        Duration::from_secs(60),
        || (state_of(d, text).as_deref() == Some(state)).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: outbox {:?}\n{}", outbox_states(d), logs_of(others)));
}

/// SIGTERM, and wait until it exits.
fn stop(mut d: Daemon) {
    d.signal(Signal::SIGTERM).expect("sigterm");
    d.wait_exit(Duration::from_secs(15)).expect("exits");
}

/// Sends through the API; the mesh answers `queued`.
fn send(from: &Daemon, to: &str, text: &str) {
    let (code, answer) = from
        .post("/api/v1/msg", &json!({ "to": to, "text": text }))
        .expect("post");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["status"], "queued", "{answer}");
}

fn logs_of(nodes: &[&Daemon]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, d)| format!("--- node {i} ---\n{}", d.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn metric(d: &Daemon, line_start: &str) -> f64 {
    d.metrics()
        .expect("metrics")
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Three daemons in a line, A - B - C, where A and C refuse each other
/// (`network.blocked_peers`): A's messages reach C through B, B holds only
/// ciphertext, a message to C while C is offline waits at B and arrives
/// once C is back, and B killed with a message in its queue still delivers
/// it after a restart, exactly once each time.
#[test]
fn messages_cross_the_mesh_and_wait_for_an_offline_peer() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let (dir_a, dir_b, dir_c) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    for dir in [&dir_a, &dir_b, &dir_c] {
        init(dir).expect("init");
    }
    let (id_a, id_c) = (peer_id_of(&dir_a), peer_id_of(&dir_c));
    // B keeps one fixed port across its restart so A and C can redial it.
    let b_port = free_port();
    let b_options = DaemonOptions {
        args: vec!["--listen".into(), format!("/ip4/127.0.0.1/tcp/{b_port}")],
        ..Default::default()
    };
    let mut b = Daemon::start(&dir_b, &b_options).expect("b starts");
    let b_addr = format!(
        "/ip4/127.0.0.1/tcp/{b_port}/p2p/{}",
        b.peer_id().expect("b id")
    );
    let beside_b = |blocked: &str| DaemonOptions {
        bootstrap: vec![b_addr.clone()],
        env: vec![("OPENAGI_NETWORK_BLOCKED_PEERS".into(), blocked.to_string())],
        ..Default::default()
    };
    let (a_options, c_options) = (beside_b(&id_c), beside_b(&id_a));
    let a = Daemon::start(&dir_a, &a_options).expect("a starts");
    let c = Daemon::start(&dir_c, &c_options).expect("c starts");
    wait_for("the line", Duration::from_secs(30), || {
        (a.connected_peers() == 1 && c.connected_peers() == 1 && b.connected_peers() == 2)
            .then_some(())
    })
    .expect("A and C connect to B");

    // 1. Through B.
    let (code, answer) = a
        .post(
            "/api/v1/msg",
            &json!({ "to": id_c, "text": "hello through b" }),
        )
        .expect("post");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["status"], "queued", "{answer}");
    assert_eq!(answer["route"], "mesh", "{answer}");
    wait_state(&a, "hello through b", "delivered", &[&a, &b, &c]);
    assert_eq!(texts(&c), ["hello through b"]);
    assert!(inbox(&b).is_empty(), "the relay's inbox stays empty");
    assert!(
        metric(&b, "openagi_mesh_envelopes_received_total{result=\"held\"}") >= 1.0,
        "B relayed"
    );
    assert_eq!(
        a.connected_peers(),
        1,
        "A never connected to C: {}",
        a.log()
    );

    // 2. C offline: the message waits at B and arrives when C is back.
    stop(c);
    send(&a, &id_c, "while you were away");
    wait_state(&a, "while you were away", "relayed", &[&a, &b]);
    let c = Daemon::start(&dir_c, &c_options).expect("c restarts");
    wait_state(&a, "while you were away", "delivered", &[&a, &b, &c]);
    assert_eq!(texts(&c), ["hello through b", "while you were away"]);

    // 3. B killed with the message in its queue, then restarted.
    stop(c);
    send(&a, &id_c, "survives a crash");
    wait_state(&a, "survives a crash", "relayed", &[&a, &b]);
    b.kill_hard().expect("SIGKILL b");
    drop(b);
    // A lets go of its own copy only on the receipt, so stop A too: the
    // message must come from B's disk alone.
    stop(a);
    let b = Daemon::start(&dir_b, &b_options).expect("b restarts");
    let c = Daemon::start(&dir_c, &c_options).expect("c restarts");
    wait_for("survives a crash arrives", Duration::from_secs(60), || {
        texts(&c)
            .contains(&"survives a crash".to_string())
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&[&b, &c])));
    assert_eq!(
        texts(&c),
        ["hello through b", "while you were away", "survives a crash"],
        "each exactly once"
    );
    // A comes back and learns of the delivery from C's receipt, which
    // waited at B.
    let a = Daemon::start(&dir_a, &a_options).expect("a restarts");
    wait_state(&a, "survives a crash", "delivered", &[&a, &b, &c]);
    assert_eq!(texts(&c).len(), 3, "A's own copy did not arrive twice");

    // B's database holds envelopes, never the texts.
    drop((a, b, c));
    let db = std::fs::read(dir_b.join("node.redb")).expect("db");
    for text in ["hello through b", "while you were away", "survives a crash"] {
        assert!(
            !db.windows(text.len()).any(|w| w == text.as_bytes()),
            "{text} stored in the clear at the relay"
        );
    }
}
