//! The audit log of a real daemon: its start and the API's refused
//! requests are entries, `openagi audit verify` passes on the log as
//! written and names the line of an edited entry, and `audit tail` shows
//! the newest.

use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{Daemon, DaemonOptions, init, openagi, use_binary, wait_for};

#[test]
fn the_daemon_keeps_a_verifiable_audit_log_and_an_edit_is_named() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("node");
    init(&dir).expect("init");
    let mut daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("starts");
    let (code, _) = daemon
        .get("/api/v1/status", Some("not-the-token"))
        .expect("answers");
    assert_eq!(code, 401);
    let (code, _) = daemon.get("/api/v1/inbox", None).expect("answers");
    assert_eq!(code, 401);
    let log = dir.join("audit.log");
    wait_for(
        "two refusals in the audit log",
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.matches("api_auth_failed").count() >= 2).then_some(())
        },
    )
    .expect("audited");
    daemon.signal(Signal::SIGTERM).expect("sigterm");
    daemon.wait_exit(Duration::from_secs(15)).expect("exits");
    drop(daemon);

    let data_dir = dir.to_str().expect("utf-8");
    let (status, out, err) = openagi(&["audit", "verify", "--data-dir", data_dir]).expect("runs");
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("audit log verified"), "{out}");
    let text = std::fs::read_to_string(&log).expect("log");
    for event in ["daemon_started", "api_auth_failed", "daemon_stopped"] {
        assert!(text.contains(event), "{event} missing:\n{text}");
    }
    assert!(
        text.contains("wrong token") && text.contains("no token"),
        "{text}"
    );

    let (status, out, _) =
        openagi(&["audit", "tail", "--data-dir", data_dir, "-n", "1"]).expect("runs");
    assert!(status.success());
    assert!(out.contains("daemon_stopped"), "{out}");

    // Someone removes the trace of a refused request.
    let lines: Vec<&str> = text.lines().collect();
    let refusal = lines
        .iter()
        .position(|l| l.contains("api_auth_failed"))
        .expect("a refusal");
    let edited = lines[refusal].replace("wrong token", "ok token");
    let mut rewritten: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    rewritten[refusal] = edited;
    std::fs::write(&log, rewritten.join("\n") + "\n").expect("edit");
    let (status, out, _) = openagi(&["audit", "verify", "--data-dir", data_dir]).expect("runs");
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(&format!("line {}", refusal + 1)) && out.contains("edited"),
        "{out}"
    );
}
