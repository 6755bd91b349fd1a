//! The web dashboard in a real browser: a four-node `openagi devnet` with
//! its transaction load and training job, node 0's dashboard opened in
//! Debian's headless Chromium by Playwright (`tests/browser/dashboard.mjs`):
//! the login link works, the overview shows the node and a rising ledger
//! height, charts draw, the explorer shows a block, a training job's
//! accuracy appears, benchmark runs recorded with the node's data
//! directory are listed, and a page without a login is refused. Screenshots of
//! each page land in `$CARGO_TARGET_TMPDIR/dashboard-screenshots` (and in
//! `doc/dashboard/` with `BLESS=1`).
//!
//! Needs `/usr/bin/chromium` and `npm ci` in `tests/browser` (`.ci/run`
//! installs both). Without them the test says what is missing and passes,
//! except under CI (`CI` set), where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use openagi_tests::{DevnetProcess, openagi, use_binary};

/// The dashboard's pages, each screenshotted.
const PAGES: [&str; 6] = [
    "overview",
    "network",
    "consensus",
    "learning",
    "alerts",
    "benchmarks",
];

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser")
}

/// What is missing to run the browser, if anything.
fn missing() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!("{chromium} (apt-get install chromium)"));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("playwright-core (npm ci --prefix tests/browser)".into());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node (Node.js)".into());
    }
    None
}

#[test]
fn the_dashboard_of_a_devnet_in_a_real_browser() {
    if let Some(what) = missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the browser test cannot run under CI without {what}"
        );
        eprintln!("skipped: the browser test needs {what}");
        return;
    }
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("devnet");
    let devnet = DevnetProcess::start(&dir, 4).expect("devnet starts");
    // The devnet prints node 0's login URL once its nodes answer.
    let login = devnet
        .wait_line(Duration::from_secs(120), |line| {
            line.contains("/login?code=")
                .then(|| line.trim().to_string())
        })
        .expect("devnet printed a dashboard login URL");
    let node0 = dir.join("node-0");
    let (status, out, err) =
        openagi(&["status", "--json", "--data-dir", &node0.to_string_lossy()]).expect("status");
    assert!(status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let peer_id = doc["node"]["peer_id"]
        .as_str()
        .expect("peer id")
        .to_string();

    // Two short crypto benchmark runs with node 0's data directory, for the
    // Benchmarks page.
    for _ in 0..2 {
        let (status, _, err) = openagi(&[
            "bench",
            "crypto",
            "--time",
            "50ms",
            "--runs",
            "1",
            "--data-dir",
            &node0.to_string_lossy(),
        ])
        .expect("bench runs");
        assert!(status.success(), "{err}");
        assert!(err.contains("recorded in"), "{err}");
    }

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let output = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .env("DASHBOARD_LOGIN", &login)
        .env("EXPECT_PEER_ID", &peer_id)
        .env("SCREENSHOT_DIR", &shots)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}\n{stderr}\n--- node-0 log ---\n{}",
        std::fs::read_to_string(node0.join("daemon.log")).unwrap_or_default()
    );
    eprintln!("dashboard figures: {}", stdout.trim());
    for page in PAGES {
        assert!(
            shots.join(format!("{page}.png")).exists(),
            "no screenshot of {page}"
        );
    }
    if std::env::var_os("BLESS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../doc/dashboard");
        std::fs::create_dir_all(&docs).expect("doc/dashboard");
        for page in PAGES {
            let name = format!("{page}.png");
            std::fs::copy(shots.join(&name), docs.join(&name)).expect("copy screenshot");
        }
    }
    drop(devnet);
}
