//! A damaged database on a real validator: with bytes of `node.redb`
//! overwritten (the header, or pages in the middle, which trip the
//! engine's own checks) or the file truncated, the node refuses to start
//! with an error that names the file and says what to do; once the
//! operator moves the file away it starts, recovers its consensus state
//! and fetches the ledger from its peers, and its chain verifies. A
//! damaged transaction index is derived data: the node moves it aside
//! and rebuilds it by itself. A full disk (a file-size limit, which fails
//! writes as ENOSPC does) stops the node with an error that says so,
//! before it acknowledges anything it could not write, and after a
//! restart every acknowledged transaction is there.

use std::time::Duration;

use nix::sys::signal::Signal;
use openagi_tests::{
    Daemon, DaemonOptions, Network, init_validators, start_validators, use_binary, wait_for,
};
use serde_json::{Value, json};

fn head(d: &Daemon) -> Option<(u64, String)> {
    let (code, body) = d.get("/api/v1/ledger/head", Some(d.token())).ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    (code == 200).then(|| {
        (
            v["height"].as_u64().unwrap_or(0),
            v["head_hash"].as_str().unwrap_or("").to_string(),
        )
    })
}

fn stop(d: &mut Daemon) {
    d.signal(Signal::SIGTERM).expect("SIGTERM");
    d.wait_exit(Duration::from_secs(20))
        .expect("drains and exits");
}

/// Flips every 61st byte from `from` on (or truncates to `truncate`).
fn damage(path: &std::path::Path, from: usize, truncate: Option<u64>) {
    if let Some(len) = truncate {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        file.set_len(len).expect("truncate");
        return;
    }
    let mut bytes = std::fs::read(path).expect("read");
    for i in (from..bytes.len()).step_by(61) {
        bytes[i] ^= 0xff;
    }
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn a_damaged_database_is_refused_by_name_and_recovered_from_peers() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let Network {
        dirs,
        mut nodes,
        boot,
    } = start_validators(root.path(), 4).expect("validators");
    let mut hashes = Vec::new();
    for i in 0..6 {
        let (code, answer) = nodes[0]
            .post(
                "/api/v1/tx",
                &json!({"payload": format!("before {i}"), "wait": true}),
            )
            .expect("submit");
        assert_eq!(code, 200, "{answer}");
        hashes.push(answer["tx_hash"].as_str().expect("hash").to_string());
    }

    // v3's database, damaged three ways while it is stopped: each time
    // the node refuses to start and says which file and what to do.
    let mut v3 = nodes.pop().expect("v3");
    stop(&mut v3);
    drop(v3);
    let db = dirs[3].join("node.redb");
    let pristine = std::fs::read(&db).expect("db");
    for (what, from, truncate) in [
        ("header", 0, None),
        ("pages", 8192, None),
        ("truncated", 0, Some(pristine.len() as u64 / 3)),
    ] {
        std::fs::write(&db, &pristine).expect("restore");
        damage(&db, from, truncate);
        let refused = Daemon::start(&dirs[3], &boot).map(|_| ()).expect_err(what);
        let text = refused.to_string();
        assert!(
            text.contains(&format!("{} is damaged", db.display()))
                && text.contains(&format!("mv {}", db.display())),
            "{what}: {text}"
        );
    }

    // The network went on meanwhile.
    for i in 0..4 {
        let (code, answer) = nodes[1]
            .post(
                "/api/v1/tx",
                &json!({"payload": format!("during {i}"), "wait": true}),
            )
            .expect("submit");
        assert_eq!(code, 200, "{answer}");
    }

    // The operator moves the file away, as the error said; the node
    // fetches the ledger from its peers.
    std::fs::rename(&db, dirs[3].join("node.redb.damaged")).expect("mv");
    let v3 = Daemon::start(&dirs[3], &boot).expect("v3 starts without its database");
    nodes.push(v3);
    let (_, want) = head(&nodes[0]).expect("head");
    wait_for("v3 catches up", Duration::from_secs(60), || {
        let (height, hash) = head(&nodes[3])?;
        let (h0, _) = head(&nodes[0])?;
        (height >= h0 && height > 0 && !hash.is_empty()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", nodes[3].log()));
    let (code, body) = nodes[3]
        .get("/api/v1/ledger/verify", Some(nodes[3].token()))
        .expect("verify");
    assert_eq!(code, 200, "{body}");
    let verdict: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert!(!want.is_empty());
    // Every transaction acknowledged before the damage is in its ledger.
    for hash in &hashes {
        let (code, body) = nodes[3]
            .get(&format!("/api/v1/tx/{hash}"), Some(nodes[3].token()))
            .expect("lookup");
        assert_eq!(code, 200, "{hash}: {body}");
    }

    // A damaged transaction index rebuilds itself.
    let mut v2 = nodes.remove(2);
    stop(&mut v2);
    drop(v2);
    damage(&dirs[2].join("txindex.redb"), 0, None);
    let v2 = Daemon::start(&dirs[2], &boot).expect("v2 starts with a damaged index");
    assert!(
        v2.log().contains("rebuilding it from the ledger"),
        "{}",
        v2.log()
    );
    let found = wait_for("the index is rebuilt", Duration::from_secs(30), || {
        let (code, _) = v2
            .get(&format!("/api/v1/tx/{}", hashes[0]), Some(v2.token()))
            .ok()?;
        (code == 200).then_some(())
    });
    assert!(found.is_ok(), "{}", v2.log());
    assert!(dirs[2].join("txindex.redb.damaged").exists());
}

#[test]
fn a_full_disk_stops_the_node_without_losing_what_it_acknowledged() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), 1).expect("one validator");
    // 3 MiB per file: the index starts at 1 MiB, the ledger fills the rest.
    let limited = DaemonOptions {
        file_size_limit_kib: Some(3 * 1024),
        ..Default::default()
    };
    let mut node = Daemon::start(&dirs[0], &limited).expect("starts");
    let payload = "x".repeat(60_000);
    let mut acknowledged = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        match node.post(
            "/api/v1/tx",
            &json!({"payload": format!("{i}{payload}"), "wait": true}),
        ) {
            Ok((200, answer)) => {
                acknowledged.push(answer["tx_hash"].as_str().expect("hash").to_string())
            }
            Ok((code, answer)) => {
                refused = Some(format!("{code} {answer}"));
                break;
            }
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    assert!(refused.is_some(), "the disk never filled");
    assert!(
        acknowledged.len() >= 10,
        "{} acknowledged",
        acknowledged.len()
    );
    let status = node
        .wait_exit(Duration::from_secs(30))
        .expect("the node stops");
    assert!(!status.success(), "{status}");
    let log = node.log();
    assert!(
        log.contains("no space to write the database") && log.contains("free space"),
        "{log}"
    );
    drop(node);

    // Space again: everything acknowledged is there, and the node goes on.
    let node = Daemon::start(&dirs[0], &DaemonOptions::default()).expect("restarts");
    for hash in &acknowledged {
        let (code, body) = node
            .get(&format!("/api/v1/tx/{hash}"), Some(node.token()))
            .expect("lookup");
        assert_eq!(code, 200, "{hash}: {body}");
    }
    let (code, body) = node
        .get("/api/v1/ledger/verify", Some(node.token()))
        .expect("verify");
    let verdict: Value = serde_json::from_str(&body).expect("json");
    assert_eq!((code, &verdict["ok"]), (200, &json!(true)), "{verdict}");
    let (code, answer) = node
        .post("/api/v1/tx", &json!({"payload": "after", "wait": true}))
        .expect("submit");
    assert_eq!(code, 200, "{answer}");
    eprintln!(
        "full disk: {} transactions acknowledged before the node stopped ({}), all found after the restart",
        acknowledged.len(),
        refused.unwrap_or_default()
    );
}
