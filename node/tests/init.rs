//! `openagi init`: the transport choice written into the config, and the
//! settings a transport ignores named at `run`.

use openagi_tests::{Daemon, DaemonOptions, openagi, use_binary};

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The uncommented `key = value` line of `key` in `text`, if any.
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.split('=').next().map(str::trim) == Some(key) && !l.starts_with('#'))
}

#[test]
fn init_writes_the_chosen_transport_and_says_what_it_means() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");

    let dir = root.path().join("default");
    let (status, out, err) = openagi(&["init", "--data-dir", path_str(&dir)]).expect("runs");
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("transport tor") && out.contains("--transport"),
        "the default transport is named with how to choose another: {out}"
    );
    let text = std::fs::read_to_string(dir.join("openagi.toml")).expect("config");
    assert_eq!(setting(&text, "transport"), Some("transport = \"tor\""));

    for (choice, transport, hybrid) in [
        ("direct", "direct", false),
        ("tor-system", "tor-system", false),
        ("hybrid", "tor", true),
    ] {
        let dir = root.path().join(choice);
        let (status, out, err) =
            openagi(&["init", "--data-dir", path_str(&dir), "--transport", choice]).expect("runs");
        assert!(status.success(), "{out}{err}");
        assert!(out.contains(&format!("transport {choice}:")), "{out}");
        let text = std::fs::read_to_string(dir.join("openagi.toml")).expect("config");
        assert_eq!(
            setting(&text, "transport"),
            Some(format!("transport = \"{transport}\"").as_str()),
            "{text}"
        );
        assert!(
            text.contains(&format!("`openagi init --transport {choice}`:")),
            "the config says what was chosen: {text}"
        );
        assert_eq!(
            setting(&text, "hybrid").is_some(),
            hybrid,
            "tor.hybrid for {choice}: {text}"
        );
    }

    let (status, _, err) = openagi(&[
        "init",
        "--data-dir",
        path_str(&root.path().join("bad")),
        "--transport",
        "onion",
    ])
    .expect("runs");
    assert!(!status.success());
    assert!(
        err.contains("tor-system") && err.contains("hybrid"),
        "{err}"
    );
}

#[test]
fn run_warns_about_settings_the_transport_ignores() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("a");
    let (status, out, err) = openagi(&[
        "init",
        "--data-dir",
        path_str(&dir),
        "--transport",
        "direct",
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}");
    let options = DaemonOptions {
        env: vec![("OPENAGI_TOR_ONION_PORT".into(), "4700".into())],
        ..Default::default()
    };
    let daemon = Daemon::start(&dir, &options).expect("starts");
    let log = daemon.log();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("tor.onion_port"))
        .unwrap_or_else(|| panic!("no warning naming tor.onion_port:\n{log}"));
    assert!(warning.contains("direct"), "{warning}");
    assert!(
        !log.contains("network.listen is ignored"),
        "direct mode uses network.listen:\n{log}"
    );
}

#[test]
fn init_again_changes_what_the_flags_ask_for_and_keeps_the_rest() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("a");
    let d = path_str(&dir);
    let (status, out, err) = openagi(&["init", "--data-dir", d]).expect("runs");
    assert!(status.success(), "{out}{err}");
    let config = dir.join("openagi.toml");
    // An operator's own edit, with a comment, must survive.
    let edited = std::fs::read_to_string(&config)
        .expect("config")
        .replace("# idle_timeout_secs = 60", "idle_timeout_secs = 30  # ours");
    std::fs::write(&config, &edited).expect("write");

    // The README's sequence: a genesis for "mynet", installed by a
    // second init that names the network.
    let (_, shown, _) = openagi(&["keys", "show", "--json", "--data-dir", d]).expect("runs");
    let key: serde_json::Value = serde_json::from_str(&shown).expect("json");
    let genesis = root.path().join("genesis.toml");
    let (status, out, err) = openagi(&[
        "genesis",
        "create",
        "--network-id",
        "mynet",
        "--validator",
        key["public_key"].as_str().expect("public_key"),
        "--out",
        path_str(&genesis),
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}");
    let (status, out, err) = openagi(&[
        "init",
        "--data-dir",
        d,
        "--network-id",
        "mynet",
        "--genesis",
        path_str(&genesis),
    ])
    .expect("runs");
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("updated existing config")
            && out.contains("network.network_id: \"openagi-main\" -> \"mynet\""),
        "{out}"
    );
    assert!(!err.contains("warning"), "{err}");
    let text = std::fs::read_to_string(&config).expect("config");
    let changed: Vec<&str> = edited
        .lines()
        .filter(|l| !text.lines().any(|m| m == *l))
        .collect();
    assert_eq!(changed, ["network_id = \"openagi-main\""], "{text}");
    assert!(text.contains("network_id = \"mynet\""));
    assert!(text.contains("idle_timeout_secs = 30  # ours"));

    // The transport too; a flag that matches the file changes nothing.
    let (status, out, err) =
        openagi(&["init", "--data-dir", d, "--transport", "direct"]).expect("runs");
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("network.transport: \"tor\" -> \"direct\""),
        "{out}"
    );
    let (status, out, _) = openagi(&[
        "init",
        "--data-dir",
        d,
        "--network-id",
        "mynet",
        "--transport",
        "direct",
    ])
    .expect("runs");
    assert!(status.success());
    assert!(out.contains("kept: it already has"), "{out}");
    let (_, out, _) = openagi(&["init", "--data-dir", d]).expect("runs");
    assert!(out.contains("found existing config"), "{out}");

    // The daemon accepts the genesis with the updated network id.
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("starts");
    let status = daemon.status().expect("status");
    assert_eq!(status["network"]["network_id"], "mynet", "{status}");
}

#[test]
fn init_refuses_what_it_cannot_change_and_leaves_the_file_alone() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("a");
    let d = path_str(&dir);
    let (status, _, _) = openagi(&["init", "--data-dir", d]).expect("runs");
    assert!(status.success());
    let config = dir.join("openagi.toml");
    // A dotted key, which a line-by-line edit cannot change in place.
    let text = "network.network_id = \"old\"\n";
    std::fs::write(&config, text).expect("write");
    let (status, out, err) =
        openagi(&["init", "--data-dir", d, "--network-id", "mynet"]).expect("runs");
    assert!(!status.success(), "{out}");
    assert!(
        err.contains("cannot update the existing config")
            && err.contains("network.network_id = \"mynet\""),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&config).expect("config"), text);

    let (status, _, err) =
        openagi(&["init", "--data-dir", d, "--network-id", "my net"]).expect("runs");
    assert!(!status.success());
    assert!(err.contains("--network-id"), "{err}");
}
