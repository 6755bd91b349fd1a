//! A full node: a daemon whose genesis does not list it follows four real
//! validators' ledger. It verifies and stores their blocks, serves the
//! read API (head, blocks, verify, a transaction's position), forwards a
//! transaction it is given to a validator, reports `consensus.role =
//! "full"` with the validator set, and after being stopped catches up
//! from its stored height.

use std::time::Duration;

use openagi_tests::{
    Daemon, DaemonOptions, init_full_node, init_validators, openagi, use_binary, wait_for,
};
use serde_json::json;

fn height_of(daemon: &Daemon) -> u64 {
    daemon
        .status()
        .ok()
        .and_then(|s| s["ledger"]["height"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_full_node_follows_verifies_serves_and_forwards() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), 4).expect("validators");
    let first = Daemon::start(&dirs[0], &DaemonOptions::default()).expect("v0 starts");
    let boot = DaemonOptions {
        bootstrap: vec![first.multiaddr().expect("addr")],
        ..Default::default()
    };
    let mut validators = vec![first];
    for dir in &dirs[1..] {
        validators.push(Daemon::start(dir, &boot).expect("validator starts"));
    }
    // Some history before the full node exists.
    for i in 0..5 {
        let (code, answer) = validators[0]
            .post(
                "/api/v1/tx",
                &json!({"payload": format!("before {i}"), "wait": true}),
            )
            .expect("submit");
        assert_eq!(code, 200, "{answer}");
    }

    // The full node: initialised with the network's genesis, not in it.
    let full_dir = init_full_node(root.path()).expect("full node");
    let mut full = Daemon::start(&full_dir, &boot).expect("full node starts");

    let target = height_of(&validators[0]);
    wait_for("the full node catches up", Duration::from_secs(30), || {
        (height_of(&full) >= target).then_some(())
    })
    .expect("caught up");
    let status = full.status().expect("status");
    assert_eq!(status["consensus"]["role"], "full", "{status}");
    assert_eq!(status["consensus"]["epoch"], 0);
    assert_eq!(status["consensus"]["validators"], 4, "{status}");
    assert_eq!(
        status["consensus"]["validators_keys"]
            .as_array()
            .map(Vec::len),
        Some(4),
        "{status}"
    );

    // New commits arrive within a couple of seconds.
    let (code, committed) = validators[1]
        .post(
            "/api/v1/tx",
            &json!({"payload": "while following", "wait": true}),
        )
        .expect("submit");
    assert_eq!(code, 200, "{committed}");
    let height = committed["height"].as_u64().expect("height");
    wait_for("the new block", Duration::from_secs(5), || {
        (height_of(&full) >= height).then_some(())
    })
    .expect("followed within seconds");

    // The read API from its own disk.
    let (code, block) = full
        .get(
            &format!("/api/v1/ledger/blocks/{height}"),
            Some(full.token()),
        )
        .expect("block");
    assert_eq!(code, 200, "{block}");
    let (code, verified) = full
        .get("/api/v1/ledger/verify", Some(full.token()))
        .expect("verify");
    assert_eq!(code, 200);
    assert!(verified.contains("\"ok\":true"), "{verified}");
    let hash = committed["tx_hash"].as_str().expect("hash").to_string();
    let found = wait_for("the transaction index", Duration::from_secs(10), || {
        let (code, body) = full
            .get(&format!("/api/v1/tx/{hash}"), Some(full.token()))
            .ok()?;
        (code == 200).then_some(body)
    })
    .expect("indexed on the full node");
    assert!(found.contains(&format!("\"height\":{height}")), "{found}");

    // A transaction given to the full node is forwarded and commits.
    let (code, forwarded) = full
        .post(
            "/api/v1/tx",
            &json!({"payload": "through a full node", "wait": true}),
        )
        .expect("forward");
    assert_eq!(code, 200, "{forwarded}");
    assert_eq!(forwarded["status"], "committed", "{forwarded}");

    // Stopped while the network goes on, it catches up after a restart.
    full.signal(nix::sys::signal::Signal::SIGTERM)
        .expect("stop");
    full.wait_exit(Duration::from_secs(20)).expect("exits");
    for i in 0..3 {
        let (code, answer) = validators[2]
            .post(
                "/api/v1/tx",
                &json!({"payload": format!("while away {i}"), "wait": true}),
            )
            .expect("submit");
        assert_eq!(code, 200, "{answer}");
    }
    let target = height_of(&validators[2]);
    let full = Daemon::start(&full_dir, &boot).expect("full node restarts");
    wait_for("catch-up after a restart", Duration::from_secs(30), || {
        (height_of(&full) >= target).then_some(())
    })
    .expect("caught up again");
    // Its ledger is the validators' ledger.
    let (_, mine) = full
        .get(
            &format!("/api/v1/ledger/blocks/{target}"),
            Some(full.token()),
        )
        .expect("block");
    let (_, theirs) = validators[0]
        .get(
            &format!("/api/v1/ledger/blocks/{target}"),
            Some(validators[0].token()),
        )
        .expect("block");
    // The same block; certificates may differ (any 2f+1 commit
    // signatures certify it, and each validator keeps the ones it saw).
    let hash = |text: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(text).expect("json")["hash"].clone()
    };
    assert_eq!(hash(&mine), hash(&theirs));
    assert!(!hash(&mine).is_null());
}

const JOB: &str = r#"
name = "digits-with-a-full-node"
architecture = { kind = "logistic_regression", inputs = 64, classes = 10 }
rounds = 3
min_clients = 3
round_deadline_secs = 6
join_window_secs = 2
participation = "all"
train = { learning_rate = 0.2, epochs = 1, batch_size = 16 }
aggregator = "fedavg"
seed = 5
"#;

fn first_job(d: &Daemon) -> serde_json::Value {
    d.get("/api/v1/learn/jobs", Some(d.token()))
        .ok()
        .and_then(|(code, body)| (code == 200).then_some(body))
        .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["jobs"].as_array().and_then(|j| j.first().cloned()))
        .unwrap_or_default()
}

#[test]
fn a_full_node_joins_a_training_job_and_its_updates_count() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    // Two validators train; the full node is the third participant the
    // job needs.
    let dirs = init_validators(root.path(), 4).expect("validators");
    let learn = |shard: &str| {
        vec![
            ("OPENAGI_LEARN_DATA".to_string(), "digits".to_string()),
            ("OPENAGI_LEARN_JOIN".to_string(), "fitting".to_string()),
            ("OPENAGI_LEARN_SHARD".to_string(), shard.to_string()),
        ]
    };
    let first = Daemon::start(
        &dirs[0],
        &DaemonOptions {
            env: learn("1/3"),
            ..Default::default()
        },
    )
    .expect("v0 starts");
    let bootstrap = vec![first.multiaddr().expect("addr")];
    let mut validators = vec![first];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        let env = if i == 1 { learn("2/3") } else { Vec::new() };
        validators.push(
            Daemon::start(
                dir,
                &DaemonOptions {
                    bootstrap: bootstrap.clone(),
                    env,
                    ..Default::default()
                },
            )
            .expect("validator starts"),
        );
    }
    let full_dir = init_full_node(root.path()).expect("full node");
    let full = Daemon::start(
        &full_dir,
        &DaemonOptions {
            bootstrap,
            env: learn("3/3"),
            ..Default::default()
        },
    )
    .expect("full node starts");
    wait_for("the full node follows", Duration::from_secs(20), || {
        (full.status().ok()?["consensus"]["role"] == "full").then_some(())
    })
    .expect("full node running");

    let job_file = root.path().join("job.toml");
    std::fs::write(&job_file, JOB).expect("job file");
    let (status, out, err) = openagi(&[
        "learn",
        "submit",
        "--data-dir",
        &dirs[0].to_string_lossy(),
        &job_file.to_string_lossy(),
    ])
    .expect("submit");
    assert!(status.success(), "{out}{err}");

    // The job needs three joins: the full node's is one of them, and every
    // round has three updates.
    let done = wait_for(
        "three rounds with three updates",
        Duration::from_secs(120),
        || {
            let job = first_job(&validators[0]);
            let history = job["history"].as_array()?.clone();
            (history.len() >= 3).then_some(history)
        },
    )
    .expect("the job finishes");
    for round in &done {
        assert_eq!(round["selected"], 3, "{round}");
        assert_eq!(round["responded"], 3, "{round}");
    }
    // The full node follows the job's end like the validators.
    let seen_by_full = wait_for(
        "the full node sees the end",
        Duration::from_secs(10),
        || {
            let job = first_job(&full);
            (job["state"] == "finished").then_some(job)
        },
    )
    .expect("followed to the end");
    assert_eq!(seen_by_full["joined_here"], true, "{seen_by_full}");
}

#[test]
fn bench_follow_catches_a_full_node_up_from_height_zero_and_prints_its_figures() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("bench");
    let (status, stdout, stderr) = openagi(&[
        "bench",
        "follow",
        "--blocks",
        "40",
        "--rate",
        "500",
        "--data-dir",
        &data.to_string_lossy(),
        "--dir",
        &root.path().join("nodes").to_string_lossy(),
    ])
    .expect("runs");
    assert!(status.success(), "{stdout}\n{stderr}");
    for figure in [
        "blocks verified and stored per second",
        "transactions verified and stored per second",
        "full node peak RSS while catching up",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(figure))
            .unwrap_or_else(|| panic!("no {figure} in {stdout}"));
        let value: f64 = line
            .split('|')
            .nth(2)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unreadable: {line}"));
        assert!(value > 0.0, "{line}");
    }
}

#[test]
fn bench_follow_measures_full_nodes_following_a_live_chain() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("bench");
    let (status, stdout, stderr) = openagi(&[
        "bench",
        "follow",
        "--followers",
        "2",
        "--rate",
        "50",
        "--duration",
        "5s",
        "--data-dir",
        &data.to_string_lossy(),
    ])
    .expect("runs");
    assert!(status.success(), "{stdout}\n{stderr}");
    for figure in [
        "follower lag, worst sample",
        "validators' CPU (all four)",
        "validators' peer payload out (all four)",
        "follower RSS, mean",
    ] {
        assert!(stdout.contains(figure), "no {figure} in {stdout}");
    }
    assert!(
        stdout.contains("| followers | 2.0 full nodes |"),
        "{stdout}"
    );
}
