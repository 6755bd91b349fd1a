//! `openagi mcp` driven by a real MCP client: the official Python SDK
//! (`tests/mcp/client.py`, installed from `tests/mcp/requirements.lock`
//! into `tests/mcp/.venv`, which `.ci/run` makes) starts the server over
//! stdio against a running daemon, lists the tools with their schemas,
//! reads the node's status (its peer id must match), and calls a write
//! tool, refused without `--allow-writes` and passed to the daemon with
//! it. Without the virtual environment the test says so and passes,
//! except under CI.

use std::path::Path;
use std::process::Command;

use openagi_tests::{Daemon, DaemonOptions, init, openagi_bin, use_binary};

#[test]
fn a_real_mcp_client_reads_the_node_and_writes_only_when_allowed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp");
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must make tests/mcp/.venv (python3 -m venv, pip install --no-deps -r requirements.lock)"
        );
        eprintln!("skipped: no tests/mcp/.venv with the MCP Python SDK");
        return;
    }
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path().join("node");
    init(&dir).expect("init");
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("starts");
    let peer_id = daemon.peer_id().expect("peer id");
    for writes in [false, true] {
        let mut command = Command::new(&python);
        command
            .arg(root.join("client.py"))
            .arg(openagi_bin())
            .arg(&dir)
            .arg(&peer_id);
        if writes {
            command.arg("--allow-writes");
        }
        let output = command.output().expect("python runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "MCP client failed (allow_writes {writes}):\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("{}", stdout.trim());
    }
}
