//! Validator-set changes on real daemons, without restarting anyone: a
//! full node proves its computation with `openagi validator join` and
//! becomes a validator; its vote is then needed (a genesis validator stops
//! and commits go on); every node's `ledger verify` checks the chain
//! through the hand-off; `openagi validator leave` makes it a full node
//! again, and the others go on without it.

use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{
    Daemon, init_full_node, logs, openagi, start_validators, use_binary, wait_for,
};
use serde_json::{Value, json};

fn role_of(daemon: &Daemon) -> (String, u64, u64) {
    let status = daemon.status().unwrap_or(Value::Null);
    (
        status["consensus"]["role"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        status["consensus"]["epoch"].as_u64().unwrap_or(0),
        status["consensus"]["validators"].as_u64().unwrap_or(0),
    )
}

fn commit(daemon: &Daemon, payload: &str) -> Value {
    let (code, answer) = daemon
        .post("/api/v1/tx", &json!({"payload": payload, "wait": true}))
        .expect("submit");
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["status"], "committed", "{answer}");
    answer
}

#[test]
fn a_full_node_joins_votes_and_leaves_without_a_restart() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let mut network = start_validators(root.path(), 4).expect("validators");
    commit(&network.nodes[0], "before the join");

    let full_dir = init_full_node(root.path()).expect("full node");
    let mut full = Daemon::start(&full_dir, &network.boot).expect("full node starts");
    let head = |d: &Daemon| {
        d.status()
            .ok()
            .and_then(|s| s["ledger"]["height"].as_u64())
            .unwrap_or(0)
    };
    let target = head(&network.nodes[0]);
    wait_for("the full node catches up", Duration::from_secs(30), || {
        (head(&full) >= target).then_some(())
    })
    .expect("caught up");
    assert_eq!(role_of(&full), ("full".into(), 0, 4));

    // A join with a wrong proof is refused at once, with the reason.
    let overview = wait_for("a block to anchor to", Duration::from_secs(10), || {
        let (code, body) = full.get("/api/v1/validator", Some(full.token())).ok()?;
        let overview: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && !overview["anchor"].is_null()).then_some(overview)
    })
    .expect("overview");
    let anchor = &overview["anchor"];
    let (code, refused) = full
        .post(
            "/api/v1/validator/join",
            &json!({
                "anchor_height": anchor["height"],
                "anchor_hash": "00".repeat(32),
                "nonce": 1,
            }),
        )
        .expect("join");
    assert_eq!(code, 422, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("wrong proof")),
        "{refused}"
    );

    // The operator's command: solve, submit, wait until the node votes.
    let dir = full_dir.to_str().expect("utf-8");
    let (status, out, err) = openagi(&[
        "validator",
        "join",
        "--data-dir",
        dir,
        "--json",
        "--wait-secs",
        "120",
    ])
    .expect("runs");
    assert!(
        status.success(),
        "join failed: {out}{err}\n{}\n--- full ---\n{}",
        logs(&network.nodes),
        full.log()
    );
    let joined: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(joined["role"], "validator", "{joined}");
    assert_eq!(joined["epoch"], 1, "{joined}");
    assert_eq!(role_of(&full), ("validator".into(), 1, 5));
    // The join is readable in its block.
    let ordered_at = joined["ordered_at"].as_u64().expect("height");
    let (code, block) = network.nodes[0]
        .get(
            &format!("/api/v1/ledger/blocks/{ordered_at}"),
            Some(network.nodes[0].token()),
        )
        .expect("block");
    assert_eq!(code, 200, "{block}");
    let block: Value = serde_json::from_str(&block).expect("json");
    let full_key = overview["public_key"].clone();
    assert!(
        block["transactions"]
            .as_array()
            .expect("transactions")
            .iter()
            .any(|tx| tx["membership"]["kind"] == "join" && tx["membership"]["key"] == full_key),
        "{block}"
    );
    wait_for("the others in epoch 1", Duration::from_secs(20), || {
        network
            .nodes
            .iter()
            .all(|d| role_of(d) == ("validator".into(), 1, 5))
            .then_some(())
    })
    .expect("all validators in epoch 1");

    // A restart finds its part from its own chain: a validator again.
    full.signal(Signal::SIGTERM).expect("stop the newcomer");
    full.wait_exit(Duration::from_secs(20))
        .expect("newcomer exits");
    let full = Daemon::start(&full_dir, &network.boot).expect("newcomer restarts");
    wait_for("the newcomer votes again", Duration::from_secs(30), || {
        (role_of(&full) == ("validator".into(), 1, 5)).then_some(())
    })
    .expect("a validator after the restart");

    // Its vote now counts: with a genesis validator stopped, four of five
    // remain, the newcomer among them, and a quorum is four.
    network.nodes[3].signal(Signal::SIGTERM).expect("stop v3");
    network.nodes[3]
        .wait_exit(Duration::from_secs(20))
        .expect("v3 exits");
    let committed = commit(&network.nodes[0], "with the newcomer's vote");
    let height = committed["height"].as_u64().expect("height");
    wait_for(
        "the newcomer holds the block",
        Duration::from_secs(10),
        || (head(&full) >= height).then_some(()),
    )
    .expect("newcomer at the head");

    // The chain verifies through the hand-off on a genesis validator and
    // on the newcomer.
    for node in [&network.nodes[0], &full] {
        let (code, verified) = node
            .get("/api/v1/ledger/verify", Some(node.token()))
            .expect("verify");
        assert_eq!(code, 200, "{verified}");
        assert!(verified.contains("\"ok\":true"), "{verified}");
    }

    // And it leaves again: back to following, the others go on (four
    // validators with one stopped still commit).
    let (status, out, err) = openagi(&[
        "validator",
        "leave",
        "--data-dir",
        dir,
        "--json",
        "--wait-secs",
        "120",
    ])
    .expect("runs");
    assert!(
        status.success(),
        "leave failed: {out}{err}\n{}\n--- full ---\n{}",
        logs(&network.nodes[..3]),
        full.log()
    );
    let left: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(left["role"], "full", "{left}");
    assert_eq!(role_of(&full).0, "full");
    wait_for("the others in epoch 2", Duration::from_secs(20), || {
        network.nodes[..3]
            .iter()
            .all(|d| role_of(d) == ("validator".into(), 2, 4))
            .then_some(())
    })
    .expect("all validators in epoch 2");
    let committed = commit(&network.nodes[1], "after the leave");
    let height = committed["height"].as_u64().expect("height");
    wait_for(
        "the full node follows again",
        Duration::from_secs(10),
        || (head(&full) >= height).then_some(()),
    )
    .expect("following");

    // The join puzzle changes by vote: three of the four validators (a
    // quorum; the fourth is stopped) vote for 5 bits at 128 KiB.
    for i in 0..3 {
        let dir = network.dirs[i].to_str().expect("utf-8").to_string();
        let (status, out, err) = openagi(&[
            "validator",
            "vote-puzzle",
            "--data-dir",
            &dir,
            "--difficulty",
            "5",
            "--memory-kib",
            "128",
            "--json",
        ])
        .expect("runs");
        assert!(status.success(), "vote {i}: {out}{err}");
        let vote: Value = serde_json::from_str(&out).expect("json");
        if i < 2 {
            assert!(vote["pending_puzzle"].is_null(), "{vote}");
        } else {
            assert_eq!(
                vote["pending_puzzle"]["params"]["difficulty_bits"], 5,
                "{vote}"
            );
            assert!(vote["takes_effect_after"].is_u64(), "{vote}");
        }
    }
}
