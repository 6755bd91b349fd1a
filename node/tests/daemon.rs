//! Real daemons on loopback: discovery, gossip, restarts, signals, config
//! errors, API authentication and metrics format.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{Daemon, DaemonOptions, init, openagi, use_binary, wait_for};

fn fresh_node(root: &std::path::Path, name: &str) -> std::path::PathBuf {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let dir = root.join(name);
    init(&dir).expect("init");
    dir
}

/// The value of label `name` in one exposition line.
fn label(line: &str, name: &str) -> Option<String> {
    // Preceded by `{` or `,`, so `version` does not match `rustc_version`.
    let start = [format!("{{{name}=\""), format!(",{name}=\"")]
        .iter()
        .find_map(|key| line.find(key.as_str()).map(|i| i + key.len()))?;
    let rest = line.get(start..)?;
    Some(rest.get(..rest.find('"')?)?.to_string())
}

fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn three_daemons_find_each_other_and_gossip() {
    let root = tempfile::tempdir().expect("tempdir");
    let a =
        Daemon::start(&fresh_node(root.path(), "a"), &DaemonOptions::default()).expect("a starts");
    let boot = DaemonOptions {
        bootstrap: vec![a.multiaddr().expect("addr")],
        ..Default::default()
    };
    let b = Daemon::start(&fresh_node(root.path(), "b"), &boot).expect("b starts");
    let c = Daemon::start(&fresh_node(root.path(), "c"), &boot).expect("c starts");
    let nodes = [&a, &b, &c];
    let ids: Vec<String> = nodes
        .iter()
        .map(|d| d.peer_id().expect("peer id"))
        .collect();

    // B and C only know A; they must find each other through the DHT.
    wait_for("full mesh", Duration::from_secs(30), || {
        nodes.iter().all(|d| d.connected_peers() == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log()));

    // Every node receives the others' signed announcements over gossipsub.
    wait_for(
        "announcements from both other nodes",
        Duration::from_secs(30),
        || {
            let announced_peers = |d: &Daemon| -> usize {
                d.peers()
                    .ok()
                    .and_then(|p| p["peers"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter(|p| p["last_announce"]["sequence"].as_u64().is_some())
                    .count()
            };
            nodes.iter().all(|d| announced_peers(d) == 2).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));

    for (i, node) in nodes.iter().enumerate() {
        // `openagi status --json` reports the other two peers.
        let (status, out, err) = openagi(&[
            "status",
            "--json",
            "--data-dir",
            node.dir.to_str().expect("utf-8"),
        ])
        .expect("runs");
        assert!(status.success(), "{err}");
        let doc: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(doc["node"]["peer_id"], ids[i]);
        let reported: BTreeSet<String> = doc["network"]["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p.as_str().map(String::from))
            .collect();
        let expected: BTreeSet<String> = ids.iter().filter(|id| **id != ids[i]).cloned().collect();
        assert_eq!(reported, expected);

        // And so do its metrics.
        let metrics = node.metrics().expect("metrics");
        assert_eq!(
            metric_value(&metrics, "openagi_peers_connected"),
            Some(2.0),
            "{metrics}"
        );
        let accepted = metric_value(
            &metrics,
            "openagi_gossip_messages_total{topic=\"announce\",outcome=\"accepted\"}",
        )
        .unwrap_or(0.0);
        assert!(accepted >= 2.0, "{metrics}");
        let opened: f64 = ["inbound", "outbound"]
            .iter()
            .filter_map(|d| {
                metric_value(
                    &metrics,
                    &format!("openagi_connections_opened_total{{direction=\"{d}\"}}"),
                )
            })
            .sum();
        assert!(opened >= 2.0, "{metrics}");
    }
}

#[test]
fn sigkill_restart_keeps_peer_id_and_reconnects_from_the_address_book() {
    let root = tempfile::tempdir().expect("tempdir");
    let a =
        Daemon::start(&fresh_node(root.path(), "a"), &DaemonOptions::default()).expect("a starts");
    let b_dir = fresh_node(root.path(), "b");
    let boot = DaemonOptions {
        bootstrap: vec![a.multiaddr().expect("addr")],
        ..Default::default()
    };
    let mut b = Daemon::start(&b_dir, &boot).expect("b starts");
    let b_id = b.peer_id().expect("id");
    wait_for("b connected", Duration::from_secs(20), || {
        (b.connected_peers() == 1).then_some(())
    })
    .expect("connects");
    // Give the address book a moment: identify runs right after connecting.
    wait_for("identify", Duration::from_secs(10), || {
        b.peers().ok()?["peers"][0]["agent_version"]
            .as_str()
            .map(|_| ())
    })
    .expect("identified");

    b.kill_hard().expect("SIGKILL");
    wait_for("a notices", Duration::from_secs(20), || {
        (a.connected_peers() == 0).then_some(())
    })
    .expect("disconnect seen");

    // Restart with no bootstrap at all: only what B stored can bring it back.
    let b = Daemon::start(&b_dir, &DaemonOptions::default()).expect("b restarts");
    assert_eq!(
        b.peer_id().expect("id"),
        b_id,
        "identity must survive SIGKILL"
    );
    wait_for("b reconnected", Duration::from_secs(30), || {
        (b.connected_peers() == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log()));
}

#[test]
fn sigterm_drains_and_exits_zero_within_the_bound() {
    let root = tempfile::tempdir().expect("tempdir");
    let a =
        Daemon::start(&fresh_node(root.path(), "a"), &DaemonOptions::default()).expect("a starts");
    let boot = DaemonOptions {
        bootstrap: vec![a.multiaddr().expect("addr")],
        ..Default::default()
    };
    let mut b = Daemon::start(&fresh_node(root.path(), "b"), &boot).expect("b starts");
    wait_for("connected", Duration::from_secs(20), || {
        (b.connected_peers() == 1).then_some(())
    })
    .expect("connects");
    b.signal(Signal::SIGTERM).expect("signal");
    // The configured bound is 10 s; allow process start-up noise on top.
    let status = b.wait_exit(Duration::from_secs(12)).expect("exits in time");
    assert!(status.success(), "exit status {status}\n{}", b.log());
    assert!(
        !b.dir.join("api.addr").exists(),
        "api.addr must be removed on clean exit"
    );
    assert!(b.log().contains("stopped"));
    wait_for("a sees b leave", Duration::from_secs(10), || {
        (a.connected_peers() == 0).then_some(())
    })
    .expect("peer closed the connection");
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = fresh_node(root.path(), "a");
    let _first = Daemon::start(&dir, &DaemonOptions::default()).expect("first starts");
    let mut second = Daemon::spawn(&dir, &DaemonOptions::default()).expect("spawned");
    let status = wait_for("second exits", Duration::from_secs(10), || {
        second.try_wait().ok().flatten()
    })
    .expect("second must exit");
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.join("daemon.log")).expect("log");
    assert!(
        log.contains("another openagi daemon is already running"),
        "{log}"
    );
}

/// Spawns `openagi run` on `dir` and waits for it to exit (killing it
/// after `limit`); returns whether it exited, its status, and its log.
fn run_until_exit(
    dir: &std::path::Path,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let mut child = Daemon::spawn(dir, &DaemonOptions::default()).expect("spawned");
    let status = wait_for("exit", limit, || child.try_wait().ok().flatten()).ok();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    (status, log)
}

#[test]
fn loose_permissions_on_the_data_dir_or_token_stop_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().expect("tempdir");
    let dir = fresh_node(root.path(), "a");
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };

    chmod(&dir, 0o755);
    let (status, log) = run_until_exit(&dir, Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "must refuse:\n{log}");
    let shown = dir.display().to_string();
    assert!(
        log.contains(&format!("data directory {shown} has mode 0755"))
            && log.contains(&format!("chmod 700 {shown}")),
        "{log}"
    );
    assert!(
        !dir.join("node.lock").exists(),
        "nothing created before the check"
    );

    chmod(&dir, 0o700);
    let token = dir.join("api.token");
    chmod(&token, 0o644);
    std::fs::remove_file(dir.join("daemon.log")).expect("clear log");
    let (status, log) = run_until_exit(&dir, Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "must refuse:\n{log}");
    let shown = token.display().to_string();
    assert!(
        log.contains(&format!("API token {shown} has mode 0644"))
            && log.contains(&format!("chmod 600 {shown}")),
        "{log}"
    );

    chmod(&token, 0o600);
    Daemon::start(&dir, &DaemonOptions::default()).expect("starts once fixed");
}

#[test]
fn the_log_file_rotates_by_size() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = fresh_node(root.path(), "a");
    let env = |k: &str, v: &str| (k.to_string(), v.to_string());
    let options = DaemonOptions {
        env: vec![
            env("OPENAGI_LOG_FILE", "logs/node.log"),
            env("OPENAGI_LOG_MAX_FILE_BYTES", "400"),
            env("OPENAGI_LOG_MAX_FILES", "2"),
        ],
        ..Default::default()
    };
    let a = Daemon::start(&dir, &options).expect("starts");
    let file = dir.join("logs/node.log");
    let rotated = |n: u32| dir.join(format!("logs/node.log.{n}"));
    // Start-up alone logs more than three files of this size.
    wait_for("two rotations", Duration::from_secs(30), || {
        let _ = a.status();
        rotated(2).exists().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    assert!(!rotated(3).exists(), "max_files = 2 keeps two old files");
    for path in [rotated(1), rotated(2)] {
        let text = std::fs::read_to_string(&path).expect("rotated file");
        // Whole lines only, none split across files; a single event may
        // exceed the limit alone.
        assert!(text.ends_with('\n'), "{}: {text}", path.display());
        assert!(
            text.len() <= 400 || text.lines().count() == 1,
            "{} holds {} bytes",
            path.display(),
            text.len()
        );
        assert!(!text.contains('\u{1b}'), "no colour codes in the file");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file)
        .expect("log file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // The file gets what stderr gets.
    let everything: String = [rotated(2), rotated(1), file]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    assert!(everything.contains("openagi"), "{everything}");
}

#[test]
fn malformed_config_names_the_key_and_the_fix() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = fresh_node(root.path(), "a");
    let config = dir.join("openagi.toml");
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("[network]", "[network]\nlisten_adress = []");
    std::fs::write(&config, text).expect("write");
    let (status, _, err) =
        openagi(&["run", "--data-dir", dir.to_str().expect("utf-8")]).expect("runs");
    assert!(!status.success());
    assert!(
        err.contains("listen_adress") && err.contains("valid keys"),
        "{err}"
    );

    let (status, _, err) = openagi(&[
        "run",
        "--data-dir",
        dir.to_str().expect("utf-8"),
        "--config",
        "/nonexistent/openagi.toml",
    ])
    .expect("runs");
    assert!(!status.success());
    assert!(err.contains("/nonexistent/openagi.toml"), "{err}");
}

#[test]
fn api_refuses_missing_or_wrong_token() {
    let root = tempfile::tempdir().expect("tempdir");
    let a =
        Daemon::start(&fresh_node(root.path(), "a"), &DaemonOptions::default()).expect("starts");
    for path in ["/api/v1/status", "/api/v1/peers"] {
        assert_eq!(
            a.get(path, None).expect("answers").0,
            401,
            "{path} without token"
        );
        assert_eq!(
            a.get(path, Some("0000")).expect("answers").0,
            401,
            "{path} wrong token"
        );
        let mut almost = a.token().to_string();
        almost.pop();
        almost.push('x');
        assert_eq!(
            a.get(path, Some(&almost)).expect("answers").0,
            401,
            "{path} near-miss token"
        );
        assert_eq!(
            a.get(path, Some(a.token())).expect("answers").0,
            200,
            "{path} right token"
        );
    }
    assert_eq!(a.get("/health", None).expect("answers").0, 200);

    // Every route of /api/v1, each method, refuses a request without the
    // token before it looks at the request.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let hash = "00".repeat(32);
    let gets = [
        "/api/v1/status".to_string(),
        "/api/v1/peers".into(),
        format!("/api/v1/tx/{hash}"),
        "/api/v1/consensus/latency".into(),
        "/api/v1/ledger/head".into(),
        "/api/v1/ledger/blocks/1".into(),
        "/api/v1/ledger/verify".into(),
        "/api/v1/inbox".into(),
        "/api/v1/learn/jobs".into(),
        format!("/api/v1/learn/jobs/{hash}/model"),
        "/api/v1/invites".into(),
    ];
    for path in &gets {
        let url = format!("http://{}{path}", a.api_addr());
        let code = agent.get(&url).call().expect("answers").status().as_u16();
        assert_eq!(code, 401, "GET {path} without token");
    }
    for path in [
        "/api/v1/tx",
        "/api/v1/tx/batch",
        "/api/v1/msg",
        "/api/v1/learn/jobs",
        "/api/v1/dashboard/login",
        "/api/v1/invites",
        "/api/v1/invites/revoke",
    ] {
        let url = format!("http://{}{path}", a.api_addr());
        let code = agent
            .post(&url)
            .send_json(serde_json::json!({"payload": "x"}))
            .expect("answers")
            .status()
            .as_u16();
        assert_eq!(code, 401, "POST {path} without token");
    }
}

#[test]
fn ready_waits_for_a_peer_while_health_answers_at_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let a =
        Daemon::start(&fresh_node(root.path(), "a"), &DaemonOptions::default()).expect("starts");
    assert_eq!(a.get("/health", None).expect("answers").0, 200);
    // Alone, listening, no consensus: the only thing missing is a peer.
    let (code, body) = a.get("/ready", None).expect("answers");
    assert_eq!(code, 503, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(doc["status"], "not ready", "{body}");
    assert_eq!(doc["reasons"], serde_json::json!(["no peers"]), "{body}");

    let boot = DaemonOptions {
        bootstrap: vec![a.multiaddr().expect("addr")],
        ..Default::default()
    };
    let b = Daemon::start(&fresh_node(root.path(), "b"), &boot).expect("b starts");
    for node in [&a, &b] {
        let body = wait_for("ready", Duration::from_secs(20), || {
            node.get("/ready", None)
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(|(_, body)| body)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
        let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(doc, serde_json::json!({"status": "ready"}));
    }
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let root = tempfile::tempdir().expect("tempdir");
    let a =
        Daemon::start(&fresh_node(root.path(), "a"), &DaemonOptions::default()).expect("starts");
    let boot = DaemonOptions {
        bootstrap: vec![a.multiaddr().expect("addr")],
        ..Default::default()
    };
    let b = Daemon::start(&fresh_node(root.path(), "b"), &boot).expect("b starts");
    wait_for("traffic", Duration::from_secs(20), || {
        (b.connected_peers() == 1).then_some(())
    })
    .expect("connects");
    std::thread::sleep(Duration::from_secs(2));
    let metrics = b.metrics().expect("metrics");
    let build_info = metrics
        .lines()
        .find(|l| l.starts_with("openagi_build_info{"))
        .unwrap_or_else(|| panic!("no build info:\n{metrics}"));
    let (version, git_commit, rustc_version) = (
        label(build_info, "version"),
        label(build_info, "git_commit"),
        label(build_info, "rustc_version"),
    );
    assert_eq!(
        version.as_deref(),
        Some(env!("CARGO_PKG_VERSION")),
        "{build_info}"
    );
    // A short hash from git, or "unknown" when built without git.
    let git_commit = git_commit.unwrap_or_else(|| panic!("{build_info}"));
    assert!(
        git_commit == "unknown"
            || (git_commit.len() >= 7 && git_commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{build_info}"
    );
    let rustc_version = rustc_version.unwrap_or_else(|| panic!("{build_info}"));
    assert!(rustc_version.starts_with("rustc "), "{build_info}");
    assert!(build_info.ends_with(" 1"), "{build_info}");
    // Per-job learning gauges exist only for running jobs, and epsilon
    // only for jobs with DP: with no job, none at all (never a 0).
    for family in [
        "openagi_learn_round",
        "openagi_learn_accuracy_ratio",
        "openagi_learn_epsilon",
    ] {
        assert!(
            !metrics
                .lines()
                .any(|l| l.starts_with(&format!("{family} "))
                    || l.starts_with(&format!("{family}{{"))),
            "{family} without a job:\n{metrics}"
        );
    }
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("openagi_"),
            "metric outside the namespace: {line}"
        );
        assert!(!line.contains("12D3Koo"), "peer id used as a label: {line}");
    }
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    match promtool {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(metrics.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool runs");
            assert!(
                out.status.success(),
                "promtool check metrics failed:\n{}{}\n{metrics}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "promtool not installed ({e}); install Debian's `prometheus` package to run this check"
            )
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    }
}

/// The files of a `debug bundle` archive, by path inside it.
fn bundle_files(archive: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let file = std::fs::File::open(archive).expect("archive written");
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut files = Vec::new();
    for entry in tar.entries().expect("a tar.gz") {
        let mut entry = entry.expect("entry");
        let path = entry.path().expect("path").to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).expect("contents");
        files.push((path, bytes));
    }
    files
}

#[test]
fn debug_bundle_has_what_a_bug_report_needs_and_no_secret() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = fresh_node(root.path(), "a");
    let dir_text = dir.to_str().expect("utf-8");
    let key_hex = std::fs::read_to_string(dir.join("node.key"))
        .expect("plain hex key")
        .trim()
        .to_string();
    let key_raw = hex_decode(&key_hex);
    let token = std::fs::read_to_string(dir.join("api.token"))
        .expect("token")
        .trim()
        .to_string();
    let secrets: [(&str, Vec<u8>); 4] = [
        ("key hex", key_hex.clone().into_bytes()),
        (
            "key hex upper case",
            key_hex.to_ascii_uppercase().into_bytes(),
        ),
        ("raw key", key_raw),
        ("token", token.into_bytes()),
    ];
    let check = |files: &[(String, Vec<u8>)]| {
        for (path, bytes) in files {
            for (what, secret) in &secrets {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                    "{path} contains the {what}"
                );
            }
        }
    };
    let names = |files: &[(String, Vec<u8>)]| -> BTreeSet<String> {
        files
            .iter()
            .filter_map(|(p, _)| p.split_once('/').map(|(_, rest)| rest.to_string()))
            .collect()
    };
    let text = |files: &[(String, Vec<u8>)], name: &str| -> String {
        files
            .iter()
            .find(|(p, _)| p.ends_with(&format!("/{name}")))
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| panic!("no {name} in the bundle"))
    };

    // Stopped: the bundle says so.
    let out = root.path().join("stopped.tar.gz");
    let (status, stdout, err) = openagi(&[
        "debug",
        "bundle",
        "--data-dir",
        dir_text,
        "--out",
        out.to_str().expect("utf-8"),
    ])
    .expect("runs");
    assert!(status.success(), "{stdout}{err}");
    let files = bundle_files(&out);
    check(&files);
    assert!(text(&files, "daemon.txt").starts_with("daemon not running"));
    assert!(!names(&files).contains("status.json"));

    // Running, with a log file: status, metrics and logs come in.
    let env = |k: &str, v: &str| (k.to_string(), v.to_string());
    let options = DaemonOptions {
        env: vec![env("OPENAGI_LOG_FILE", "node.log")],
        ..Default::default()
    };
    let a = Daemon::start(&dir, &options).expect("starts");
    let out = root.path().join("running.tar.gz");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_openagi"));
    command
        .args(["debug", "bundle", "--data-dir", dir_text, "--out"])
        .arg(&out)
        // The same settings the daemon got, so the bundle finds its log.
        .env("OPENAGI_LOG_FILE", "node.log");
    let output = command.output().expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files = bundle_files(&out);
    check(&files);
    let listed = names(&files);
    for name in [
        "README.txt",
        "versions.txt",
        "config.toml",
        "daemon.txt",
        "status.json",
        "metrics.txt",
        "logs/node.log",
        "store.txt",
        "files.txt",
    ] {
        assert!(listed.contains(name), "{name} missing from {listed:?}");
    }
    assert_eq!(listed.len(), 9, "{listed:?}");
    let versions = text(&files, "versions.txt");
    assert!(
        versions.contains(env!("CARGO_PKG_VERSION"))
            && versions.contains("git commit ")
            && versions.contains("rustc ")
            && versions.contains("kernel Linux"),
        "{versions}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&text(&files, "status.json")).expect("status json");
    assert_eq!(status["node"]["peer_id"], a.peer_id().expect("peer id"));
    assert!(text(&files, "metrics.txt").contains("openagi_build_info{"));
    assert!(text(&files, "logs/node.log").contains("ready"));
    assert!(text(&files, "store.txt").contains("schema version: "));
    assert!(text(&files, "config.toml").contains("[network]"));
    // Names and sizes of the data directory, never contents.
    let listing = text(&files, "files.txt");
    for name in ["node.key\t", "api.token\t", "node.redb\t", "openagi.toml\t"] {
        assert!(listing.contains(name), "{name} not listed:\n{listing}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out)
        .expect("archive")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn devnet_connects_all_nodes_and_leaves_no_orphans() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("devnet");
    let dir_text = dir.to_str().expect("utf-8");
    let (status, out, err) = openagi(&[
        "devnet",
        "--nodes",
        "3",
        "--dir",
        dir_text,
        "--duration",
        "8s",
    ])
    .expect("runs");
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains("all 3 nodes connected to each other after"),
        "{out}"
    );
    assert!(out.contains("devnet stopped"), "{out}");
    for i in 0..3 {
        let log = std::fs::read_to_string(dir.join(format!("node-{i}/daemon.log"))).expect("log");
        assert!(log.contains("stopped"), "node-{i} did not drain:\n{log}");
        assert!(!dir.join(format!("node-{i}/api.addr")).exists());
    }
}

#[test]
fn a_taken_p2p_port_is_named_with_its_cause() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = fresh_node(root.path(), "a");
    // Held until the end of the test, so the daemon cannot bind the port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let output = std::process::Command::new(openagi_tests::openagi_bin())
        .args(["run", "--data-dir", dir.to_str().expect("utf-8")])
        .args(["--listen", &listen, "--api-listen", "127.0.0.1:0"])
        .env("OPENAGI_NETWORK_TRANSPORT", "direct")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains(&format!("listen on {listen}")), "{err}");
    assert!(err.contains("Address already in use"), "{err}");
    drop(taken);
}

/// `openagi ledger …` on `dir` with `--json`: status, parsed answer, stderr.
fn ledger_json(dir: &std::path::Path, args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut all = vec![
        "ledger",
        "--json",
        "--data-dir",
        dir.to_str().expect("utf-8"),
    ];
    all.extend_from_slice(args);
    let (status, out, err) = openagi(&all).expect("runs");
    let answer = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (status.success(), answer, err)
}

#[test]
fn a_stopped_or_crashed_nodes_ledger_reads_and_verifies_offline() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = openagi_tests::init_validators(root.path(), 1).expect("one validator");
    let dir = &dirs[0];
    let mut node = Daemon::start(dir, &DaemonOptions::default()).expect("starts");
    for text in ["one", "two"] {
        let (code, body) = node
            .post(
                "/api/v1/tx",
                &serde_json::json!({ "payload": text, "wait": true }),
            )
            .expect("answers");
        assert_eq!(code, 200, "{body}\n{}", node.log());
        assert_eq!(body["status"], "committed", "{body}");
    }
    let (ok, online, err) = ledger_json(dir, &["head"]);
    assert!(ok, "through the API: {err}");
    let height = online["height"].as_u64().expect("height");
    assert!(height >= 2, "{online}");

    node.signal(Signal::SIGTERM).expect("signal");
    assert!(
        node.wait_exit(Duration::from_secs(12))
            .expect("exits")
            .success()
    );
    let store = dir.join("node.redb");
    let before = std::fs::read(&store).expect("database");
    let (ok, head, err) = ledger_json(dir, &["head"]);
    assert!(ok, "{err}");
    assert_eq!(head["height"], online["height"], "{err}");
    assert_eq!(head["head_hash"], online["head_hash"], "{err}");
    assert!(err.contains("no daemon runs"), "says where it read: {err}");
    assert!(
        !err.contains("crash"),
        "a clean stop is read in place: {err}"
    );
    let (ok, block, err) = ledger_json(dir, &["get", "1"]);
    assert!(ok && block["height"] == 1, "{block} {err}");
    let (ok, verified, err) = ledger_json(dir, &["verify"]);
    assert!(ok, "{verified} {err}");
    assert_eq!(verified["ok"], true);
    assert_eq!(verified["height"], online["height"]);
    let (status, out, err) = openagi(&[
        "ledger",
        "verify",
        "--data-dir",
        dir.to_str().expect("utf-8"),
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}");
    assert!(out.contains(&format!("to height {height}")), "{out}");
    assert_eq!(
        std::fs::read(&store).expect("database"),
        before,
        "unchanged"
    );

    // A crash leaves the database open; reading it must not repair it in
    // place either.
    let mut node = Daemon::start(dir, &DaemonOptions::default()).expect("restarts");
    node.kill_hard().expect("SIGKILL");
    let before = std::fs::read(&store).expect("database");
    let (ok, head, err) = ledger_json(dir, &["head"]);
    assert!(ok, "{err}");
    assert_eq!(head["head_hash"], online["head_hash"], "{err}");
    assert!(err.contains("repaired copy"), "{err}");
    let (ok, verified, err) = ledger_json(dir, &["verify"]);
    assert!(ok && verified["height"] == height, "{verified} {err}");
    assert_eq!(
        std::fs::read(&store).expect("database"),
        before,
        "unchanged"
    );

    // A data directory without a database says so.
    let empty = root.path().join("fresh");
    init(&empty).expect("init");
    std::fs::copy(root.path().join("genesis.toml"), empty.join("genesis.toml")).expect("genesis");
    let (ok, _, err) = ledger_json(&empty, &["head"]);
    assert!(!ok && err.contains("has not run yet"), "{err}");
}
