//! `openagi devnet` run twice on one directory: a fresh network each time
//! unless `--resume`, and a summary when it stops.

use openagi_tests::{openagi, use_binary};

fn devnet(dir: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "devnet",
        "--nodes",
        "4",
        "--dir",
        dir,
        "--duration",
        "8s",
        "--tx-rate",
        "10",
    ];
    args.extend_from_slice(extra);
    let (status, out, err) = openagi(&args).expect("runs");
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("devnet summary after"), "{out}");
    assert!(out.contains("  blocks        "), "{out}");
    assert!(out.contains("committed in this run"), "{out}");
    assert!(out.contains("  learning      "), "{out}");
    out
}

#[test]
fn devnet_starts_afresh_unless_resumed_and_sums_up_when_it_stops() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("devnet");
    let dir_text = dir.to_str().expect("utf-8");

    let first = devnet(dir_text, &[]);
    assert!(!first.contains("earlier devnet"), "{first}");
    let key = std::fs::read(dir.join("node-0/node.key")).expect("key");
    assert!(
        first.contains("submitted the digits training job"),
        "{first}"
    );
    let job = first
        .lines()
        .find_map(|l| l.strip_prefix("submitted the digits training job "))
        .and_then(|rest| rest.get(..8))
        .expect("job id")
        .to_string();
    assert!(
        first.contains(&format!("({job}) did not finish"))
            || first.contains(&format!("({job}) did not start"))
            || first.contains(&format!("({job}) finished")),
        "the outcome of job {job}: {first}"
    );

    let resumed = devnet(dir_text, &["--resume"]);
    assert!(resumed.contains("resuming the devnet"), "{resumed}");
    assert_eq!(
        std::fs::read(dir.join("node-0/node.key")).expect("key"),
        key,
        "--resume keeps the nodes' keys"
    );
    assert!(
        resumed.contains(&format!(
            "the ledger already holds the digits training job {job}; not submitting it again"
        )),
        "{resumed}"
    );
    assert!(resumed.contains("in this run)"), "{resumed}");

    let fresh = devnet(dir_text, &[]);
    assert!(
        fresh.contains("holds an earlier devnet (4 nodes); removing it to start a fresh network"),
        "{fresh}"
    );
    assert_ne!(
        std::fs::read(dir.join("node-0/node.key")).expect("key"),
        key,
        "a fresh devnet has new keys"
    );
    assert!(
        fresh.contains("submitted the digits training job"),
        "{fresh}"
    );
}
