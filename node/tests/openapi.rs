//! `doc/openapi.json` describes the daemon's HTTP API exactly: its
//! operations are the router's (read from `node/src/daemon/api.rs`), every
//! `/api/v1` operation answers 401 without the token on a running daemon,
//! and schemathesis (from `tests/api/requirements.lock`, installed into
//! `tests/api/.venv` by `.ci/run`) generates requests from the description,
//! valid and invalid, against a one-validator network: no answer may be a
//! server error or stray from what the description says, and the daemon
//! must stay up with bounded memory. Without the virtual environment the
//! schemathesis part says so and is skipped, except under CI.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use openagi_tests::{Daemon, DaemonOptions, init_validators, use_binary};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

fn description() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../doc/openapi.json");
    let text = std::fs::read_to_string(&path).expect("doc/openapi.json");
    serde_json::from_str(&text).expect("doc/openapi.json is JSON")
}

/// (method, path) of every operation the description lists.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                out.insert((method.to_string(), path.clone()));
            }
        }
    }
    out
}

/// The `.route("PATH", METHOD(handler)...)` calls in `text`, each with the
/// methods its expression names.
fn routes_in(text: &str, prefix: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let start = rest.find('"').expect("a path literal");
        let end = rest[start + 1..].find('"').expect("closing quote") + start + 1;
        let path = &rest[start + 1..end];
        // The expression up to the call's closing parenthesis.
        let mut depth = 1;
        let mut close = end;
        for (i, c) in rest[end..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = end + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let expression = &rest[end..close];
        for method in METHODS {
            let call = format!("{method}(");
            let named = expression.match_indices(&call).any(|(i, _)| {
                // `get(` itself or `.get(`, not `forget(`.
                i == 0 || !expression.as_bytes()[i - 1].is_ascii_alphanumeric()
            });
            if named {
                out.insert((method.to_string(), format!("{prefix}{path}")));
            }
        }
        rest = &rest[close..];
    }
    out
}

/// The router's operations, read from the function that builds it. The
/// dashboard's routes (merged in from `daemon::dashboard::routes`) are
/// the web page and its session API, not this API, and are left out.
fn routed() -> BTreeSet<(String, String)> {
    let source = include_str!("../src/daemon/api.rs");
    let start = source.find("pub fn router(").expect("router()");
    let body = &source[start..];
    let body = &body[..body.find("\n}\n").expect("end of router()")];
    let nested = body
        .find(".route_layer(")
        .expect("the authenticated routes end");
    assert!(
        body.contains(".nest(\"/api/v1\", authenticated)"),
        "the authenticated routes are nested under /api/v1"
    );
    let mut all = routes_in(&body[..nested], "/api/v1");
    all.extend(routes_in(&body[nested..], ""));
    all
}

#[test]
fn the_description_lists_exactly_the_routers_operations() {
    let doc = description();
    assert_eq!(doc["openapi"], "3.0.3");
    let routed = routed();
    assert!(routed.len() >= 20, "{routed:?}");
    assert!(routed.contains(&("get".into(), "/api/v1/learn/models".into())));
    let documented = documented(&doc);
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes missing from doc/openapi.json: {undocumented:?}; documented but not routed: {unrouted:?}"
    );
}

#[test]
fn every_operation_needs_the_token_and_generated_requests_get_documented_answers() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), 1).expect("one validator");
    let daemon = Daemon::start(&dirs[0], &DaemonOptions::default()).expect("starts");
    let doc = description();

    // Every /api/v1 operation, each method, refuses a request without the
    // token before it looks at anything else.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let zeros = "00".repeat(32);
    for (method, path) in documented(&doc) {
        if !path.starts_with("/api/v1/") {
            continue;
        }
        let concrete = path
            .replace("{hash}", &zeros)
            .replace("{job}", &zeros)
            .replace("{height}", "1");
        let url = format!("http://{}{concrete}", daemon.api_addr());
        let answer = match method.as_str() {
            "get" => agent.get(&url).call(),
            _ => agent
                .post(&url)
                .send_json(serde_json::json!({"payload": "x"})),
        };
        let code = answer.expect("answers").status().as_u16();
        assert_eq!(code, 401, "{method} {path} without the token");
    }

    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/api/.venv");
    let st = venv.join("bin/st");
    if !st.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must make tests/api/.venv (python3 -m venv, pip install --no-deps -r requirements.lock)"
        );
        eprintln!("skipped schemathesis: no tests/api/.venv");
        return;
    }
    let before = daemon.rss_bytes();
    assert!(before > 0, "the daemon's memory is readable");
    let report = root.path().join("schemathesis.json");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/api/schemathesis.toml");
    let output = Command::new(&st)
        .current_dir(root.path())
        .args([
            "--config-file",
            config.to_str().expect("utf-8"),
            "run",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../doc/openapi.json")
                .to_str()
                .expect("utf-8"),
            "--url",
            &format!("http://{}", daemon.api_addr()),
            "--header",
            &format!("Authorization: Bearer {}", daemon.token()),
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "100",
            "--seed",
            "1",
            // One worker: with two, hypothesis parses lambda sources from
            // both threads and CPython 3.11's parser can fail inside it
            // ("AST constructor recursion depth mismatch"), a run error
            // that says nothing about the API.
            "--workers",
            "1",
            // `wait` on a transaction waits up to 30 s for its commit.
            "--request-timeout",
            "40",
            "--no-color",
            "--generation-database",
            "none",
            "--report",
            "json",
            "--report-json-path",
            report.to_str().expect("utf-8"),
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("schemathesis runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}\n{}", daemon.log());
    // Still serving, and memory did not run away.
    let status = daemon.status().expect("the daemon still answers");
    assert!(status["node"]["peer_id"].is_string());
    let after = daemon.rss_bytes();
    assert!(
        after < before + 256 * 1024 * 1024,
        "RSS grew from {before} to {after} bytes"
    );
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" generated, "))
        .map(str::trim)
        .collect();
    eprintln!(
        "schemathesis: {}; daemon RSS {:.0} MiB before, {:.0} MiB after",
        summary.join(" | "),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
}
