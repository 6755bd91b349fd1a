//! The shipped Grafana dashboards and Prometheus alert rules against a real
//! Prometheus (Debian's `prometheus`) scraping a four-node devnet: the
//! rules file loads and every rule is healthy, and every query of every
//! dashboard panel and alert rule parses and returns data.
//!
//! Two kinds of series are allowed to be absent, because the devnet does
//! not produce them: Tor's (`openagi_tor_*`, the devnet runs the direct
//! transport) and a job's ε (`openagi_learn_epsilon`, its job runs
//! without differential privacy). Everything else must answer.
//!
//! Without `prometheus` the test says so and passes, except under CI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use openagi_tests::{DevnetProcess, free_port, use_binary, wait_for};
use serde_json::Value;

/// Series a devnet does not produce (see the module documentation).
const ABSENT_IN_A_DEVNET: &[&str] = &["openagi_tor_", "openagi_learn_epsilon"];
// (`openagi_learn_epsilon` also covers `openagi_learn_epsilon_budget_used_ratio`.)

/// Stops the Prometheus server on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        openagi_tests::stop_child(&mut self.0);
    }
}

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn try_query(prometheus: &str, path: &str, expr: Option<&str>) -> Option<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(&format!("http://{prometheus}{path}"));
    if let Some(expr) = expr {
        request = request.query("query", expr);
    }
    let mut response = request.call().ok()?;
    serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
}

fn query(prometheus: &str, path: &str, expr: Option<&str>) -> Value {
    try_query(prometheus, path, expr).expect("prometheus answers with JSON")
}

/// Every `expr` of every panel of every shipped dashboard.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = configs().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("dashboards")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "overview, consensus, network and learning"
    );
    for file in files {
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
        for panel in doc["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                out.push((
                    format!(
                        "{} / {}",
                        file.file_name().unwrap_or_default().to_string_lossy(),
                        panel["title"].as_str().unwrap_or_default()
                    ),
                    target["expr"].as_str().expect("expr").to_string(),
                ));
            }
        }
    }
    out
}

/// The value parts of a rule's expression: each side of `and`, without
/// its final comparison (a comparison that does not hold returns nothing,
/// which says nothing about the query).
fn rule_value_queries(expr: &str) -> Vec<String> {
    expr.split(" and ")
        .map(|part| {
            let mut p = part.trim().to_string();
            for op in [" == ", " > ", " < ", " >= ", " <= ", " != "] {
                if let Some(i) = p.rfind(op) {
                    p.truncate(i);
                    break;
                }
            }
            p
        })
        .collect()
}

#[test]
fn every_dashboard_and_alert_query_returns_data_from_a_real_prometheus() {
    let has_prometheus = Command::new("prometheus").arg("--version").output().is_ok();
    if !has_prometheus {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install prometheus (apt-get install prometheus)"
        );
        eprintln!("skipped: needs Debian's prometheus package");
        return;
    }
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let devnet_dir = root.path().join("devnet");
    let devnet = DevnetProcess::start(&devnet_dir, 4).expect("devnet starts");
    // "  node-N  api http://127.0.0.1:PORT/api/v1/status ..." for each node.
    let mut targets = Vec::new();
    while targets.len() < 4 {
        let target = devnet
            .wait_line(Duration::from_secs(120), |line| {
                let rest = line.split("api http://").nth(1)?;
                Some(rest.split('/').next()?.to_string())
            })
            .expect("devnet prints its nodes");
        targets.push(target);
    }

    let port = free_port();
    let prometheus = format!("127.0.0.1:{port}");
    let rules = configs().join("openagi-alerts.yml");
    let config = root.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: openagi\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .expect("prometheus.yml");
    let server = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            root.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prometheus}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let _server = Killed(server);

    // All four nodes scraped, and enough samples for rates over them.
    wait_for("four targets up", Duration::from_secs(60), || {
        let up = try_query(&prometheus, "/api/v1/query", Some("sum(up)"))?;
        (up["data"]["result"][0]["value"][1].as_str() == Some("4")).then_some(())
    })
    .expect("prometheus scrapes the devnet");
    // Training rounds end every few seconds; wait for the first.
    wait_for("a training round", Duration::from_secs(120), || {
        let r = query(
            &prometheus,
            "/api/v1/query",
            Some("max(openagi_learn_round)"),
        );
        r["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v >= 2.0)
    })
    .expect("a job's rounds reach Prometheus");
    std::thread::sleep(Duration::from_secs(5));

    // The rules file loads and every rule evaluates without error.
    let loaded = query(&prometheus, "/api/v1/rules", None);
    let rules: Vec<Value> = loaded["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(
        rules.len(),
        openagi_dashboard::alerts::RULES.len(),
        "{loaded}"
    );
    let mut failures = Vec::new();
    for rule in &rules {
        if rule["health"] != "ok" {
            failures.push(format!("rule {}: {}", rule["name"], rule["lastError"]));
        }
    }

    let mut checked = 0;
    let rule_queries = openagi_dashboard::alerts::RULES
        .iter()
        .flat_map(|r| {
            rule_value_queries(&r.promql())
                .into_iter()
                .map(|q| (format!("alert {}", r.name), q))
        })
        .collect::<Vec<_>>();
    for (what, expr) in dashboard_queries().into_iter().chain(rule_queries) {
        let answer = query(&prometheus, "/api/v1/query", Some(&expr));
        checked += 1;
        if answer["status"] != "success" {
            failures.push(format!("{what}: `{expr}` failed: {}", answer["error"]));
            continue;
        }
        let empty = answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty());
        let allowed = ABSENT_IN_A_DEVNET.iter().any(|m| expr.contains(m));
        if empty && !allowed {
            failures.push(format!("{what}: `{expr}` returned no data"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} queries:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} dashboard and alert queries answered by Prometheus");
}
