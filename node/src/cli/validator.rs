//! `openagi validator join|leave|status`: becoming a validator of the
//! network this node follows, and stopping.
//!
//! `join` solves the network's identity puzzle here, on this machine's
//! cores, against a recent block the daemon names (progress on stderr),
//! hands the solution to the daemon, which signs and submits the join,
//! and waits until the change is ordered and the daemon votes. `leave`
//! asks the daemon to sign and submit a leave and waits until it follows
//! the ledger as a full node again.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use openagi_crypto::PublicKey;
use openagi_crypto::poc::{PuzzleInput, PuzzleParams, solve};
use serde_json::{Value, json};

use crate::cli::client::ApiClient;
use crate::common::datadir::DataDir;
use crate::outln;

/// How often the daemon is asked whether a submitted change was ordered
/// and whether its part has switched.
const POLL: Duration = Duration::from_millis(500);

/// An anchor within this fraction of the network's anchor age of going
/// stale is solved again rather than submitted: it could go stale before
/// it is ordered.
const ANCHOR_MARGIN_DIVISOR: u64 = 16;

fn field<'a>(value: &'a Value, key: &str) -> Result<&'a Value> {
    value
        .get(key)
        .with_context(|| format!("the daemon's answer lacks `{key}`: {value}"))
}

fn u64_of(value: &Value, key: &str) -> Result<u64> {
    field(value, key)?
        .as_u64()
        .with_context(|| format!("`{key}` is not a number: {value}"))
}

fn str_of<'a>(value: &'a Value, key: &str) -> Result<&'a str> {
    field(value, key)?
        .as_str()
        .with_context(|| format!("`{key}` is not text: {value}"))
}

/// What a join must prove, as the daemon said.
struct Puzzle {
    public_key: PublicKey,
    network: Vec<u8>,
    params: PuzzleParams,
    anchor_height: u64,
    anchor_hash: [u8; 32],
}

fn puzzle_of(overview: &Value) -> Result<Puzzle> {
    let public_key =
        PublicKey::from_hex(str_of(overview, "public_key")?).context("the daemon's public key")?;
    let network = hex::decode(str_of(overview, "network")?).context("the network id")?;
    let params = field(overview, "puzzle")?;
    let params = PuzzleParams {
        difficulty_bits: u32::try_from(u64_of(params, "difficulty_bits")?)?,
        memory_kib: u32::try_from(u64_of(params, "memory_kib")?)?,
        passes: u32::try_from(u64_of(params, "passes")?)?,
    };
    let anchor = field(overview, "anchor")?;
    if anchor.is_null() {
        bail!(
            "the daemon's ledger has no block yet to anchor a proof to; wait for the first block"
        );
    }
    let anchor_hash: [u8; 32] = hex::decode(str_of(anchor, "hash")?)
        .context("the anchor hash")?
        .try_into()
        .map_err(|_| anyhow::anyhow!("the anchor hash is not 32 bytes"))?;
    Ok(Puzzle {
        public_key,
        network,
        params,
        anchor_height: u64_of(anchor, "height")?,
        anchor_hash,
    })
}

/// Solves `puzzle` on `threads` threads, printing progress to stderr
/// about once a second.
fn solve_with_progress(puzzle: &Puzzle, threads: usize, quiet: bool) -> Result<u64> {
    let input = PuzzleInput {
        public_key: &puzzle.public_key,
        network_id: &puzzle.network,
        anchor_height: puzzle.anchor_height,
        anchor_hash: &puzzle.anchor_hash,
    };
    let expected = 2f64.powi(i32::try_from(puzzle.params.difficulty_bits).unwrap_or(64));
    let attempts = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let cancel = AtomicBool::new(false);
    let found = std::thread::scope(|scope| {
        if !quiet {
            scope.spawn(|| {
                let mut last = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() < Duration::from_secs(1) {
                        continue;
                    }
                    last = Instant::now();
                    let tried = attempts.load(Ordering::Relaxed);
                    let rate = tried as f64 / started.elapsed().as_secs_f64().max(1e-3);
                    eprint!(
                        "\rsolving the join puzzle: {tried} attempts ({rate:.0}/s; about {expected:.0} expected)   "
                    );
                    let _ = std::io::stderr().flush();
                }
            });
        }
        let result = solve(
            &input,
            puzzle.params,
            threads,
            0,
            &|n| attempts.store(n, Ordering::Relaxed),
            &cancel,
        );
        done.store(true, Ordering::Relaxed);
        result
    })
    .context("solving the join puzzle")?;
    if !quiet {
        eprintln!(
            "\rsolved the join puzzle in {:.1} s ({} attempts)                         ",
            started.elapsed().as_secs_f64(),
            attempts.load(Ordering::Relaxed)
        );
    }
    found.context("the puzzle search stopped without a solution")
}

/// Waits until the committed membership transaction `tx` is scheduled
/// (returns the answer) or refused (an error with the reason).
fn wait_ordered(client: &ApiClient, tx: &str, limit: Duration) -> Result<Value> {
    let started = Instant::now();
    loop {
        let answer = client.get_json(&format!("/api/v1/validator/changes/{tx}"))?;
        match str_of(&answer, "status")? {
            "scheduled" => return Ok(answer),
            "refused" => bail!(
                "the network refused the change (block {}): {}",
                u64_of(&answer, "height").unwrap_or(0),
                str_of(&answer, "reason").unwrap_or("no reason given")
            ),
            _ if started.elapsed() > limit => bail!(
                "the change {tx} was not ordered within {} s; check `openagi status` and the daemon's log",
                limit.as_secs()
            ),
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Waits until the daemon's part in the ledger is `role`.
fn wait_role(client: &ApiClient, role: &str, limit: Duration) -> Result<Value> {
    let started = Instant::now();
    loop {
        let status = client.get_json("/api/v1/status")?;
        if status["consensus"]["role"] == role {
            return Ok(status);
        }
        if started.elapsed() > limit {
            bail!(
                "the change was ordered but this node's role is still {} after {} s; see the daemon's log",
                status["consensus"]["role"],
                limit.as_secs()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// `openagi validator join`.
pub fn join(
    dir: &DataDir,
    threads: Option<usize>,
    wait: Duration,
    json_output: bool,
) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let (nonce, puzzle) = loop {
        let overview = client.get_json("/api/v1/validator")?;
        if overview["member"] == true {
            bail!(
                "this node is already a validator of epoch {}",
                overview["epoch"]
            );
        }
        let puzzle = puzzle_of(&overview)?;
        let nonce = solve_with_progress(&puzzle, threads, json_output)?;
        // A solution anchored too far back by now would be refused as
        // stale: anchor to a newer checkpoint and solve again.
        let now = client.get_json("/api/v1/validator")?;
        let head = u64_of(&now, "height")?;
        let max_age = u64_of(&now, "anchor_max_age_blocks")?;
        if head.saturating_sub(puzzle.anchor_height) + max_age / ANCHOR_MARGIN_DIVISOR < max_age {
            break (nonce, puzzle);
        }
        eprintln!("the ledger moved on while solving; solving again against a newer block");
    };
    let submitted = client.post_json(
        "/api/v1/validator/join",
        &json!({
            "anchor_height": puzzle.anchor_height,
            "anchor_hash": hex::encode(puzzle.anchor_hash),
            "nonce": nonce,
        }),
    )?;
    let tx = str_of(&submitted, "tx_hash")?.to_string();
    if !json_output {
        outln!("join submitted ({tx}); waiting for the network to order it")?;
    }
    let ordered = wait_ordered(&client, &tx, wait)?;
    if !json_output {
        outln!(
            "join ordered at height {}; it takes effect after height {}",
            ordered["height"],
            ordered["takes_effect_after"]
        )?;
    }
    let status = wait_role(&client, "validator", wait)?;
    let answer = json!({
        "tx_hash": tx,
        "ordered_at": ordered["height"],
        "epoch": status["consensus"]["epoch"],
        "validators": status["consensus"]["validators"],
        "role": status["consensus"]["role"],
    });
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
    } else {
        outln!(
            "this node is a validator of epoch {} ({} validators)",
            answer["epoch"],
            answer["validators"]
        )?;
    }
    Ok(())
}

/// `openagi validator leave`.
pub fn leave(dir: &DataDir, wait: Duration, json_output: bool) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let submitted = client.post_json("/api/v1/validator/leave", &json!({}))?;
    let tx = str_of(&submitted, "tx_hash")?.to_string();
    if !json_output {
        outln!("leave submitted ({tx}); waiting for the network to order it")?;
    }
    let ordered = wait_ordered(&client, &tx, wait)?;
    if !json_output {
        outln!(
            "leave ordered at height {}; it takes effect after height {}",
            ordered["height"],
            ordered["takes_effect_after"]
        )?;
    }
    let status = wait_role(&client, "full", wait)?;
    let answer = json!({
        "tx_hash": tx,
        "ordered_at": ordered["height"],
        "epoch": status["consensus"]["epoch"],
        "role": status["consensus"]["role"],
    });
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
    } else {
        outln!(
            "this node left the validator set (epoch {}); it follows the ledger as a full node",
            answer["epoch"]
        )?;
    }
    Ok(())
}

/// `openagi validator vote-puzzle`: this validator's vote for new join
/// puzzle parameters; they apply once a quorum of the set votes the same.
pub fn vote_puzzle(
    dir: &DataDir,
    params: PuzzleParams,
    wait: Duration,
    json_output: bool,
) -> Result<()> {
    params
        .validate()
        .map_err(|e| anyhow::anyhow!("--difficulty/--memory-kib/--passes: {e}"))?;
    let client = ApiClient::from_data_dir(dir)?;
    let submitted = client.post_json(
        "/api/v1/validator/puzzle",
        &json!({
            "difficulty_bits": params.difficulty_bits,
            "memory_kib": params.memory_kib,
            "passes": params.passes,
        }),
    )?;
    let tx = str_of(&submitted, "tx_hash")?.to_string();
    let started = Instant::now();
    let counted = loop {
        let answer = client.get_json(&format!("/api/v1/validator/changes/{tx}"))?;
        match str_of(&answer, "status")? {
            "counted" => break answer,
            "refused" => bail!(
                "the network refused the vote: {}",
                str_of(&answer, "reason").unwrap_or("no reason given")
            ),
            _ if started.elapsed() > wait => bail!(
                "the vote {tx} was not ordered within {} s; see the daemon's log",
                wait.as_secs()
            ),
            _ => std::thread::sleep(POLL),
        }
    };
    let overview = client.get_json("/api/v1/validator")?;
    if json_output {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "tx_hash": tx,
                "counted_at": counted["height"],
                "takes_effect_after": counted["takes_effect_after"],
                "puzzle_votes": overview["puzzle_votes"],
                "pending_puzzle": overview["pending_puzzle"],
            }))?
        )?;
    } else {
        outln!("vote counted at height {}", counted["height"])?;
        match counted["takes_effect_after"].as_u64() {
            Some(boundary) => {
                outln!("a quorum agrees: joins need these parameters after height {boundary}")?
            }
            None => outln!(
                "in force once {} of the {} validators vote the same (votes so far: {})",
                quorum_of(overview["validators"].as_array().map_or(0, Vec::len)),
                overview["validators"].as_array().map_or(0, Vec::len),
                overview["puzzle_votes"]
            )?,
        }
    }
    Ok(())
}

/// Votes needed among `n` validators (`n - f`).
fn quorum_of(n: usize) -> usize {
    n - n.saturating_sub(1) / 3
}

/// `openagi validator status`.
pub fn status(dir: &DataDir, json_output: bool) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let overview = client.get_json("/api/v1/validator")?;
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&overview)?)?;
        return Ok(());
    }
    outln!(
        "epoch {} (from height {}), {} validators; this node {} one",
        overview["epoch"],
        overview["first_height"],
        overview["validators"].as_array().map_or(0, Vec::len),
        if overview["member"] == true {
            "is"
        } else {
            "is not"
        }
    )?;
    if let Some(t) = overview["transition"].as_object() {
        outln!(
            "pending: {} change(s), taking effect after height {}",
            t.get("changes")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
            t.get("boundary").cloned().unwrap_or(Value::Null)
        )?;
    }
    let p = &overview["puzzle"];
    outln!(
        "a join proves {} bits of work at {} KiB per attempt",
        p["difficulty_bits"],
        p["memory_kib"]
    )?;
    Ok(())
}
