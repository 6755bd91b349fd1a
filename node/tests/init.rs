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
