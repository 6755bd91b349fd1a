//! A kill -9 campaign on four real validator daemons under steady client
//! load: a validator (every third time the primary) is SIGKILLed at a
//! random moment and restarted, again and again. At the end every
//! transaction whose commit was acknowledged to a client is in every
//! node's ledger at the same height and index, the ledgers agree block by
//! block, and every node's ledger verifies.
//!
//! `CRASH_CAMPAIGN_KILLS` sets the number of kills (CI runs a few; the
//! campaign in the closing note ran 100) and `CRASH_CAMPAIGN_SEED` the
//! schedule; a failure prints both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openagi_tests::{
    Daemon, DaemonOptions, free_port, init_validators, post_json, use_binary, wait_for,
};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const VALIDATORS: usize = 4;

/// What the load thread needs to reach a live validator.
type Targets = Arc<Mutex<Vec<Option<(String, String)>>>>;

fn target(d: &Daemon) -> Option<(String, String)> {
    Some((d.api_addr().to_string(), d.token().to_string()))
}

/// Submits transactions one at a time to random live validators and keeps
/// those acknowledged as committed: (hash, height, index).
fn load(targets: Targets, stop: Arc<AtomicBool>, seed: u64) -> Vec<(String, u64, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x10ad);
    let mut acknowledged = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let live: Vec<(String, String)> = targets
            .lock()
            .map(|t| t.iter().flatten().cloned().collect())
            .unwrap_or_default();
        if live.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let (api, token) = &live[rng.random_range(0..live.len())];
        n += 1;
        let body = json!({ "payload": format!("campaign {seed} tx {n}"), "wait": true });
        if let Ok((200, answer)) = post_json(api, token, "/api/v1/tx", &body)
            && answer["status"] == "committed"
            && let (Some(hash), Some(height), Some(index)) = (
                answer["tx_hash"].as_str(),
                answer["height"].as_u64(),
                answer["index"].as_u64(),
            )
        {
            acknowledged.push((hash.to_string(), height, index));
        }
    }
    acknowledged
}

fn get_json(d: &Daemon, path: &str) -> Value {
    let (code, body) = d.get(path, Some(d.token())).expect("answers");
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("json")
}

#[test]
fn acknowledged_transactions_survive_repeated_sigkills() {
    use_binary(env!("CARGO_BIN_EXE_openagi"));
    let kills: usize = std::env::var("CRASH_CAMPAIGN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("CRASH_CAMPAIGN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    eprintln!("crash campaign: {kills} kills, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().expect("tempdir");
    let dirs = init_validators(root.path(), VALIDATORS).expect("validators");
    let ports: Vec<u16> = (0..VALIDATORS).map(|_| free_port()).collect();
    let mut ids = Vec::new();
    let mut nodes: Vec<Option<Daemon>> = Vec::new();
    // Fixed ports, so a restarted validator is found where it was.
    let listen = |i: usize| {
        vec![
            "--listen".to_string(),
            format!("/ip4/127.0.0.1/tcp/{}", ports[i]),
        ]
    };
    for (i, dir) in dirs.iter().enumerate() {
        let bootstrap = (0..i)
            .map(|j| format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", ports[j], ids[j]))
            .collect();
        let d = Daemon::start(
            dir,
            &DaemonOptions {
                bootstrap,
                args: listen(i),
                ..Default::default()
            },
        )
        .expect("validator starts");
        ids.push(d.peer_id().expect("peer id"));
        nodes.push(Some(d));
    }
    let options = |i: usize| DaemonOptions {
        bootstrap: (0..VALIDATORS)
            .filter(|j| *j != i)
            .map(|j| format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", ports[j], ids[j]))
            .collect(),
        args: listen(i),
        ..Default::default()
    };
    wait_for("full mesh", Duration::from_secs(30), || {
        nodes
            .iter()
            .flatten()
            .all(|d| d.connected_peers() == VALIDATORS - 1)
            .then_some(())
    })
    .expect("validators connect");

    let targets: Targets = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.as_ref().and_then(target)).collect(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (targets, stop) = (targets.clone(), stop.clone());
        std::thread::spawn(move || load(targets, stop, seed))
    };
    let started = Instant::now();
    let mut primaries_killed = 0;
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        let victim = if k % 3 == 2 {
            primaries_killed += 1;
            nodes
                .iter()
                .flatten()
                .find_map(|d| d.status().ok()?["consensus"]["primary_index"].as_u64())
                .map_or(0, |p| p as usize)
        } else {
            rng.random_range(0..VALIDATORS)
        };
        if let Ok(mut t) = targets.lock() {
            t[victim] = None;
        }
        if let Some(mut d) = nodes[victim].take() {
            d.kill_hard().expect("SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1000)));
        let d = Daemon::start(&dirs[victim], &options(victim))
            .unwrap_or_else(|e| panic!("seed {seed}, kill {k}: v{victim} restarts: {e}"));
        if let Ok(mut t) = targets.lock() {
            t[victim] = target(&d);
        }
        nodes[victim] = Some(d);
        // One validator down at a time: wait until it is back in the mesh.
        wait_for("back in the mesh", Duration::from_secs(30), || {
            (nodes[victim].as_ref()?.connected_peers() >= 2).then_some(())
        })
        .unwrap_or_else(|e| panic!("seed {seed}, kill {k}: {e}"));
    }
    stop.store(true, Ordering::Relaxed);
    let acknowledged = loader.join().expect("load thread");
    let live: Vec<&Daemon> = nodes.iter().flatten().collect();

    // Every node reaches the highest acknowledged height.
    let top = acknowledged.iter().map(|a| a.1).max().unwrap_or(0);
    wait_for("every ledger at the top", Duration::from_secs(120), || {
        live.iter().all(|d| d.height() >= top).then_some(())
    })
    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let mut lost = Vec::new();
    for (hash, height, index) in &acknowledged {
        for (i, d) in live.iter().enumerate() {
            let (code, body) = d
                .get(&format!("/api/v1/tx/{hash}"), Some(d.token()))
                .expect("answers");
            let found: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if code != 200
                || found["height"].as_u64() != Some(*height)
                || found["index"].as_u64() != Some(*index)
            {
                lost.push(format!(
                    "v{i}: {hash} (acknowledged at {height}/{index}): {code} {body}"
                ));
            }
        }
    }
    assert!(
        lost.is_empty(),
        "seed {seed}: lost or moved:\n{}",
        lost.join("\n")
    );
    let height = live.iter().map(|d| d.height()).min().unwrap_or(0);
    for h in 1..=height {
        let hashes: Vec<Value> = live
            .iter()
            .map(|d| get_json(d, &format!("/api/v1/ledger/blocks/{h}"))["hash"].clone())
            .collect();
        assert!(
            hashes.windows(2).all(|w| w[0] == w[1]),
            "seed {seed}: height {h} differs: {hashes:?}"
        );
    }
    for d in &live {
        let verified = get_json(d, "/api/v1/ledger/verify");
        assert_eq!(verified["ok"], true, "seed {seed}: {verified}");
    }
    eprintln!(
        "crash campaign: {kills} SIGKILLs ({primaries_killed} of the primary) in {:.0} s, \
         {} acknowledged transactions, 0 lost, {height} blocks agreed and verified on every node",
        started.elapsed().as_secs_f64(),
        acknowledged.len()
    );
}
