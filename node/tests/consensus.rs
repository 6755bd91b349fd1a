//! Four real validator daemons on loopback: transactions commit, ledgers
//! agree and verify, a killed backup catches up, a stopped primary is
//! replaced and rejoins, and a crashed validator is skipped as primary.

use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{
    Daemon, DaemonOptions, env_vars, init_validators, init_validators_with, openagi, use_binary,
    wait_for,
};
use serde_json::json;

struct Network {
    _root: tempfile::TempDir,
    dirs: Vec<std::path::PathBuf>,
    nodes: Vec<Option<Daemon>>,
}

fn start_network(n: usize) -> Network {
    start_network_with(n, &[])
}

/// Starts `n` validators with extra environment variables.
fn start_network_with(n: usize, env: &[(&str, &str)]) -> Network {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    // The genesis carries what every node must share: a test that tunes
    // the checkpoint interval or window for its validators writes it there.
    let mut genesis_args: Vec<&str> = Vec::new();
    for (key, value) in env {
        match *key {
            "OPENAGI_CONSENSUS_CHECKPOINT_INTERVAL" => {
                genesis_args.extend(["--checkpoint-interval", value]);
            }
            "OPENAGI_CONSENSUS_WINDOW" => genesis_args.extend(["--window", value]),
            _ => {}
        }
    }
    let dirs = init_validators_with(root.path(), n, &genesis_args).expect("validators");
    let env = env_vars(env);
    let solo = DaemonOptions {
        env: env.clone(),
        ..Default::default()
    };
    let first = Daemon::start(&dirs[0], &solo).expect("v0 starts");
    let boot = DaemonOptions {
        bootstrap: vec![first.multiaddr().expect("addr")],
        env,
        ..Default::default()
    };
    let mut nodes = vec![Some(first)];
    for dir in &dirs[1..] {
        nodes.push(Some(Daemon::start(dir, &boot).expect("validator starts")));
    }
    let net = Network {
        _root: root,
        dirs,
        nodes,
    };
    wait_for("full mesh", Duration::from_secs(30), || {
        net.live()
            .all(|d| d.connected_peers() == n - 1)
            .then_some(())
    })
    .expect("validators connect");
    net
}

impl Network {
    fn live(&self) -> impl Iterator<Item = &Daemon> {
        self.nodes.iter().flatten()
    }

    fn node(&self, i: usize) -> &Daemon {
        self.nodes[i].as_ref().expect("running")
    }

    fn submit(&self, via: usize, text: &str) -> serde_json::Value {
        let (code, body) = self
            .node(via)
            .post("/api/v1/tx", &json!({ "payload": text, "wait": true }))
            .expect("answers");
        assert_eq!(code, 200, "submit via v{via}: {body}");
        assert_eq!(body["status"], "committed", "{body}");
        body
    }

    fn primary_index(&self) -> usize {
        let status = self
            .live()
            .next()
            .expect("a node")
            .status()
            .expect("status");
        status["consensus"]["primary_index"]
            .as_u64()
            .expect("primary") as usize
    }

    fn block_hash(&self, i: usize, height: u64) -> String {
        let (code, body) = self
            .node(i)
            .get(
                &format!("/api/v1/ledger/blocks/{height}"),
                Some(self.node(i).token()),
            )
            .expect("answers");
        assert_eq!(code, 200, "{body}");
        let block: serde_json::Value = serde_json::from_str(&body).expect("json");
        block["hash"].as_str().expect("hash").to_string()
    }

    fn assert_ledgers_agree(&self, up_to: u64) {
        for height in 1..=up_to {
            let hashes: Vec<String> = (0..self.nodes.len())
                .filter(|i| self.nodes[*i].is_some())
                .map(|i| self.block_hash(i, height))
                .collect();
            assert!(
                hashes.windows(2).all(|w| w[0] == w[1]),
                "height {height}: {hashes:?}"
            );
        }
    }
}

#[test]
fn transactions_commit_and_every_ledger_agrees_and_verifies() {
    let net = start_network(4);
    let mut heights = Vec::new();
    for i in 0..8 {
        let body = net.submit(i % 4, &format!("transfer {i}"));
        heights.push(body["height"].as_u64().expect("height"));
    }
    let top = *heights.iter().max().expect("some");
    wait_for("all at the top height", Duration::from_secs(20), || {
        net.live().all(|d| d.height() >= top).then_some(())
    })
    .expect("replicas converge");
    net.assert_ledgers_agree(top);

    for i in 0..4 {
        let dir = net.dirs[i].to_str().expect("utf-8");
        let (status, out, err) = openagi(&["ledger", "verify", "--data-dir", dir]).expect("runs");
        assert!(status.success(), "{out}{err}");
        assert!(out.contains("ledger verified"), "{out}");
    }
    // A transaction reported committed is findable by hash on every node.
    let body = net.submit(1, "find me");
    let hash = body["tx_hash"].as_str().expect("hash");
    wait_for("indexed everywhere", Duration::from_secs(20), || {
        net.live()
            .all(|d| {
                d.get(&format!("/api/v1/tx/{hash}"), Some(d.token()))
                    .map(|(c, _)| c == 200)
                    .unwrap_or(false)
            })
            .then_some(())
    })
    .expect("every replica indexes it");
}

#[test]
fn a_killed_backup_catches_up_and_a_stopped_primary_is_replaced() {
    let mut net = start_network(4);
    net.submit(0, "warm up");
    let primary = net.primary_index();
    let backup = (primary + 1) % 4;

    // SIGKILL a backup while transactions keep committing without it.
    net.nodes[backup]
        .as_mut()
        .expect("running")
        .kill_hard()
        .expect("kill");
    net.nodes[backup] = None;
    let via = (backup + 1) % 4;
    for i in 0..6 {
        net.submit(via, &format!("while v{backup} is down {i}"));
    }
    let top = net.node(via).height();
    let boot = DaemonOptions {
        bootstrap: vec![net.node(primary).multiaddr().expect("addr")],
        ..Default::default()
    };
    net.nodes[backup] = Some(Daemon::start(&net.dirs[backup], &boot).expect("restarts"));
    wait_for("backup catches up", Duration::from_secs(60), || {
        (net.node(backup).height() >= top).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", net.node(backup).log()));
    net.assert_ledgers_agree(top);

    // SIGSTOP the primary: the others must change view and keep going.
    let primary = net.primary_index();
    net.node(primary).signal(Signal::SIGSTOP).expect("stop");
    let via = (primary + 1) % 4;
    let (code, body) = net
        .node(via)
        .post(
            "/api/v1/tx",
            &json!({ "payload": "after the primary froze", "wait": true }),
        )
        .expect("answers");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["status"], "committed",
        "no progress without the primary: {body}"
    );
    let new_primary =
        net.node(via).status().expect("status")["consensus"]["primary_index"].as_u64();
    assert_ne!(new_primary, Some(primary as u64), "view must have changed");

    // SIGCONT: the old primary rejoins and catches up.
    net.node(primary).signal(Signal::SIGCONT).expect("cont");
    let top = net.node(via).height();
    wait_for("old primary catches up", Duration::from_secs(60), || {
        (net.node(primary).height() >= top).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", net.node(primary).log()));
    net.assert_ledgers_agree(top);
}

#[test]
fn a_validator_that_lost_its_database_recovers_and_catches_up() {
    // Checkpoints every 2 blocks, so the others' logs no longer hold what
    // it missed and it must fetch blocks, and one block in memory, so they
    // come from the others' disks.
    const ENV: [(&str, &str); 3] = [
        ("OPENAGI_CONSENSUS_BLOCKS_IN_MEMORY", "1"),
        ("OPENAGI_CONSENSUS_CHECKPOINT_INTERVAL", "2"),
        ("OPENAGI_CONSENSUS_WINDOW", "4"),
    ];
    let mut net = start_network_with(4, &ENV);
    for i in 0..4 {
        net.submit(0, &format!("before the loss {i}"));
    }
    let primary = net.primary_index();
    let victim = (primary + 2) % 4;
    net.nodes[victim]
        .as_mut()
        .expect("running")
        .kill_hard()
        .expect("kill");
    net.nodes[victim] = None;
    std::fs::remove_file(net.dirs[victim].join("node.redb")).expect("database removed");
    let boot = DaemonOptions {
        bootstrap: vec![net.node(primary).multiaddr().expect("addr")],
        env: env_vars(&ENV),
        ..Default::default()
    };
    net.nodes[victim] = Some(Daemon::start(&net.dirs[victim], &boot).expect("restarts"));
    assert!(
        net.node(victim)
            .log()
            .contains("consensus state lost; recovering"),
        "the marker must make it recover instead of voting afresh"
    );
    for i in 0..4 {
        net.submit(primary, &format!("after the loss {i}"));
    }
    let top = net.node(primary).height();
    wait_for("victim catches up", Duration::from_secs(60), || {
        (net.node(victim).height() >= top).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", net.node(victim).log()));
    net.assert_ledgers_agree(top);
    let served: f64 = net
        .live()
        .filter_map(|d| d.metrics().ok())
        .filter_map(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("openagi_consensus_blocks_served_from_disk_total ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
        .sum();
    assert!(served > 0.0, "no block was served from disk");
}

/// Operators start validators one at a time and restart them after a
/// config mistake: `first` validators run alone for a few seconds (no
/// block can commit), stop with SIGTERM, and then all `n` start. That stop
/// must not look like lost state, and the network must commit.
fn restart_before_the_first_block(n: usize, first: usize) {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), n).expect("validators");
    let mut early: Vec<Daemon> = Vec::new();
    for dir in &dirs[..first] {
        let options = DaemonOptions {
            bootstrap: early
                .first()
                .map(|d| d.multiaddr().expect("addr"))
                .into_iter()
                .collect(),
            ..Default::default()
        };
        early.push(Daemon::start(dir, &options).expect("starts alone"));
    }
    std::thread::sleep(Duration::from_secs(3));
    for daemon in &mut early {
        assert_eq!(daemon.height(), 0, "nothing can commit without a quorum");
        daemon.signal(Signal::SIGTERM).expect("SIGTERM");
        let status = daemon.wait_exit(Duration::from_secs(20)).expect("exits");
        assert!(status.success(), "clean exit: {status}");
    }
    drop(early);

    let first_node = Daemon::start(&dirs[0], &DaemonOptions::default()).expect("restarts");
    let boot = DaemonOptions {
        bootstrap: vec![first_node.multiaddr().expect("addr")],
        ..Default::default()
    };
    let mut nodes = vec![Some(first_node)];
    for dir in &dirs[1..] {
        nodes.push(Some(Daemon::start(dir, &boot).expect("starts")));
    }
    let net = Network {
        _root: root,
        dirs,
        nodes,
    };
    wait_for("full mesh", Duration::from_secs(30), || {
        net.live()
            .all(|d| d.connected_peers() == n - 1)
            .then_some(())
    })
    .expect("validators connect");
    for i in 0..3 {
        net.submit(i % n, &format!("after the early stop {i}"));
    }
    for (i, daemon) in net.live().enumerate() {
        let log = daemon.log();
        assert!(
            !log.contains("consensus state lost"),
            "validator {i} took a clean stop for lost state:\n{log}"
        );
        let status = daemon.status().expect("status");
        assert_eq!(status["consensus"]["recovering_validators"], 0, "{status}");
        assert!(status["consensus"]["recovery"].is_null(), "{status}");
    }
    let top = net.node(0).height();
    wait_for("all at the top height", Duration::from_secs(20), || {
        net.live().all(|d| d.height() >= top).then_some(())
    })
    .expect("replicas converge");
    net.assert_ledgers_agree(top);
}

#[test]
fn one_of_two_validators_stopped_before_the_first_block_rejoins() {
    restart_before_the_first_block(2, 1);
}

#[test]
fn two_of_four_validators_stopped_before_the_first_block_rejoin() {
    restart_before_the_first_block(4, 2);
}

#[test]
fn a_crashed_validator_is_skipped_as_primary_once_the_ledger_shows_its_failure() {
    // Checkpoints every 2 blocks, so a leader schedule is taken soon after
    // the failure reaches the ledger.
    const ENV: [(&str, &str); 2] = [
        ("OPENAGI_CONSENSUS_CHECKPOINT_INTERVAL", "2"),
        ("OPENAGI_CONSENSUS_WINDOW", "4"),
    ];
    let mut net = start_network_with(4, &ENV);
    net.submit(0, "warm up");
    let first = net.primary_index();
    // The validator plain rotation makes the next primary crashes.
    let crashed = (first + 1) % 4;
    net.nodes[crashed]
        .as_mut()
        .expect("running")
        .kill_hard()
        .expect("kill");
    net.nodes[crashed] = None;
    let via = (first + 2) % 4;
    let consensus =
        |net: &Network, i: usize| net.node(i).status().expect("status")["consensus"].clone();
    let enqueue = |net: &Network, i: usize, text: &str| {
        let (code, body) = net
            .node(i)
            .post("/api/v1/tx", &json!({ "payload": text }))
            .expect("answers");
        assert!(code == 200 || code == 202, "{body}");
    };

    // Freeze the primary until the others give up on it, then let it go:
    // the next view's primary is the crashed validator, so that view
    // fails too and the one after leads.
    net.node(first).signal(Signal::SIGSTOP).expect("stop");
    enqueue(&net, via, "while the primary is frozen");
    wait_for("a view change starts", Duration::from_secs(30), || {
        (consensus(&net, via)["view"].as_u64() >= Some(1)).then_some(())
    })
    .expect("view change");
    net.node(first).signal(Signal::SIGCONT).expect("cont");
    let failed_view = wait_for(
        "a view led by a live validator",
        Duration::from_secs(60),
        || {
            let c = consensus(&net, via);
            (c["changing_view"] == false && c["view"].as_u64() >= Some(2))
                .then(|| c["view"].clone())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", net.node(via).log()));
    // Blocks proposed in this view put the failure on the ledger; the
    // next checkpoint's schedule skips the crashed validator.
    for i in 0..6 {
        net.submit(via, &format!("after view {failed_view} {i}"));
    }
    wait_for(
        "every node's next schedule skips it",
        Duration::from_secs(30),
        || {
            (0..4)
                .filter(|i| *i != crashed)
                .all(|i| consensus(&net, i)["next_skipped_validators"] == json!([crashed]))
                .then_some(())
        },
    )
    .expect("the schedule shows the failure");

    // Another view change: its primary comes from the rotation that skips
    // the crashed validator, and status says so.
    let frozen = net.primary_index();
    let via = (0..4)
        .find(|i| *i != crashed && *i != frozen)
        .expect("a live backup");
    let view_before = consensus(&net, via)["view"].as_u64().expect("view");
    net.node(frozen).signal(Signal::SIGSTOP).expect("stop");
    enqueue(&net, via, "while the second primary is frozen");
    wait_for(
        "the second view change starts",
        Duration::from_secs(30),
        || (consensus(&net, via)["view"].as_u64() > Some(view_before)).then_some(()),
    )
    .expect("view change");
    // With one validator down, the view change needs the frozen one back.
    net.node(frozen).signal(Signal::SIGCONT).expect("cont");
    let c = wait_for(
        "a new view without the crashed primary",
        Duration::from_secs(60),
        || {
            let c = consensus(&net, via);
            (c["changing_view"] == false && c["primary_index"].as_u64() != Some(frozen as u64))
                .then_some(c)
        },
    )
    .unwrap_or_else(|e| {
        let views: Vec<String> = (0..4)
            .filter(|i| *i != crashed)
            .map(|i| {
                let c = consensus(&net, i);
                format!(
                    "v{i}: view {} changing {} primary {} skipped {} next {} stable {} height {} schedule {}",
                    c["view"], c["changing_view"], c["primary_index"], c["skipped_validators"],
                    c["next_skipped_validators"], c["stable_checkpoint"], c["height"], c["schedule_checkpoint"]
                )
            })
            .collect();
        panic!("{e}\n{}", views.join("\n"))
    });
    let rotation = c["view"].as_u64().expect("view") % 4;
    let expected_reason = if c["primary_index"].as_u64() == Some(rotation) {
        "rotation"
    } else {
        "skipped"
    };
    assert_eq!(c["primary_reason"], expected_reason, "{c}");
    assert_eq!(c["skipped_validators"], json!([crashed]), "{c}");
    assert_ne!(c["primary_index"].as_u64(), Some(crashed as u64), "{c}");
    let (exit, status_text, stderr) =
        openagi(&["status", "--data-dir", &net.dirs[via].to_string_lossy()]).expect("status runs");
    assert!(exit.success(), "{stderr}");
    assert!(
        status_text.contains(&format!("rotation skipping {}", crashed + 1)),
        "{status_text}"
    );
    net.submit(via, "after the second view change");
    let top = net.node(via).height();
    wait_for(
        "the thawed primary catches up",
        Duration::from_secs(60),
        || (net.node(frozen).height() >= top).then_some(()),
    )
    .expect("catch-up");
    net.assert_ledgers_agree(top);
}
