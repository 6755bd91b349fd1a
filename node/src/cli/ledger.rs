//! `openagi submit`, `openagi ledger ...`, `openagi genesis create`,
//! `openagi keys show` and `openagi msg send|inbox`: operator commands
//! served by the running daemon or the data directory.

use anyhow::{Context, Result, bail};
use openagi_consensus::types::genesis_hash;
use serde_json::{Value, json};

use crate::cli::client::ApiClient;
use crate::common::datadir::DataDir;
use crate::common::genesis::{GENESIS_FILE, Genesis};
use crate::common::store::{LedgerReader, STORE_FILE};
use crate::outln;

/// Prints the node's identity: peer id, public key and fingerprint.
pub fn keys_show(
    dir: &DataDir,
    passphrase: &crate::common::passphrase::PassphraseSource,
    json_output: bool,
) -> Result<()> {
    let identity = dir.identity(passphrase)?;
    let encrypted = dir.key_format()?.encrypted();
    let public = identity.public();
    let peer_id = openagi_net::keypair_from_identity(&identity)?
        .public()
        .to_peer_id();
    if json_output {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "peer_id": peer_id.to_string(),
                "public_key": public.to_hex(),
                "fingerprint": public.fingerprint(),
                "key_encrypted": encrypted,
            }))?
        )?;
    } else {
        outln!("peer id      {peer_id}")?;
        outln!("public key   {}", public.to_hex())?;
        outln!("fingerprint  {}", public.fingerprint())?;
        outln!(
            "key store    {}",
            if encrypted {
                "encrypted (Argon2id + XChaCha20-Poly1305)"
            } else {
                "UNENCRYPTED (file mode 0600 only; `openagi keys passphrase` encrypts it)"
            }
        )?;
    }
    Ok(())
}

/// Writes a genesis file for `validators` (hex public keys).
pub fn genesis_create(
    network_id: &str,
    validators: Vec<String>,
    out: &std::path::Path,
    consensus: crate::common::genesis::GenesisConsensus,
) -> Result<()> {
    let genesis = Genesis {
        network_id: network_id.to_string(),
        validators,
        consensus,
    };
    genesis.membership()?;
    if out.exists() {
        bail!(
            "{} exists; a genesis is never overwritten (remove it first if you mean it)",
            out.display()
        );
    }
    std::fs::write(out, genesis.to_toml()?)
        .with_context(|| format!("writing {}", out.display()))?;
    outln!(
        "wrote {} ({} validators, network {network_id})",
        out.display(),
        genesis.validators.len()
    )?;
    Ok(())
}

/// Installs a genesis file into the data directory.
pub fn install_genesis(dir: &DataDir, source: &std::path::Path) -> Result<String> {
    let genesis = Genesis::load(source)?;
    let target = dir.file(GENESIS_FILE);
    if target.exists() {
        let existing = Genesis::load(&target)?;
        if existing == genesis {
            return Ok(format!(
                "found identical genesis {} (kept)",
                target.display()
            ));
        }
        bail!(
            "{} exists and differs from {}; a node's genesis never changes",
            target.display(),
            source.display()
        );
    }
    openagi_keyfiles::keyfile::write_atomic(&target, genesis.to_toml()?.as_bytes(), 0o644)?;
    Ok(format!(
        "installed genesis {} ({} validators)",
        target.display(),
        genesis.validators.len()
    ))
}

/// Submits a transaction through the running daemon and prints the result.
pub fn submit(
    dir: &DataDir,
    payload: &str,
    hex_payload: bool,
    wait: bool,
    json_output: bool,
) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?.with_timeout(std::time::Duration::from_secs(45));
    let body = if hex_payload {
        json!({ "payload_hex": payload, "wait": wait })
    } else {
        json!({ "payload": payload, "wait": wait })
    };
    let answer = client.post_json("/api/v1/tx", &body)?;
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    match answer["status"].as_str() {
        Some("committed") => outln!(
            "committed at height {} index {} (tx {})",
            answer["height"],
            answer["index"],
            text(&answer["tx_hash"])
        )?,
        _ => outln!(
            "accepted, pending (tx {}); check with the ledger or /api/v1/tx/<hash>",
            text(&answer["tx_hash"])
        )?,
    }
    Ok(())
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(String::from)
        .unwrap_or_else(|| v.to_string())
}

/// `openagi ledger head|get|verify`: through the daemon's API while one
/// runs on `dir`, otherwise from its database, which is not changed.
pub fn ledger(dir: &DataDir, command: LedgerCommand, json_output: bool) -> Result<()> {
    if !dir.path().is_dir() {
        bail!(
            "no data directory at {} (`openagi init` creates one; --data-dir names another)",
            dir.path().display()
        );
    }
    let (answer, ok) = match dir.lock_shared() {
        // Held while reading, so no daemon starts and writes meanwhile.
        Ok(Some(_no_daemon)) => ledger_offline(dir, command)
            .with_context(|| format!("no daemon runs on {}", dir.path().display()))?,
        Ok(None) => ledger_online(dir, command).context(
            "a daemon holds the data directory's lock (so its database cannot be read directly), \
             but its API did not answer",
        )?,
        Err(lock_error) => ledger_online(dir, command).map_err(|api_error| {
            anyhow::anyhow!(
                "cannot read the ledger: whether a daemon runs is unknown ({lock_error:#}), \
                 and no daemon answers ({api_error:#})"
            )
        })?,
    };
    show_ledger(command, &answer, ok, json_output)
}

/// The answer of the running daemon's API, and whether it is a success.
fn ledger_online(dir: &DataDir, command: LedgerCommand) -> Result<(Value, bool)> {
    let client = ApiClient::from_data_dir(dir)?;
    Ok(match command {
        LedgerCommand::Head => (client.get_json("/api/v1/ledger/head")?, true),
        LedgerCommand::Get(height) => (
            client.get_json(&format!("/api/v1/ledger/blocks/{height}"))?,
            true,
        ),
        LedgerCommand::Verify => {
            let v = client
                .clone()
                .without_timeout()
                .get_json("/api/v1/ledger/verify")?;
            let ok = v["ok"].as_bool().unwrap_or(false);
            (v, ok)
        }
    })
}

/// The same answer as the API's, from the database of a node whose daemon
/// is not running (the caller holds the lock that says so).
fn ledger_offline(dir: &DataDir, command: LedgerCommand) -> Result<(Value, bool)> {
    let genesis_path = dir.file(GENESIS_FILE);
    if !genesis_path.exists() {
        bail!(
            "{} is missing: this node runs no consensus and keeps no ledger",
            genesis_path.display()
        );
    }
    let genesis = Genesis::load(&genesis_path)?;
    let validators = genesis.validator_set()?;
    let membership = genesis.membership()?;
    let reader = LedgerReader::open(dir.path())?;
    // On stderr, so that --json output stays one document.
    eprintln!(
        "no daemon runs on {}: reading {}{}",
        dir.path().display(),
        dir.file(STORE_FILE).display(),
        if reader.repaired() {
            " (left open by a crash: read from a repaired copy; the file is not changed)"
        } else {
            ""
        }
    );
    Ok(match command {
        LedgerCommand::Head => {
            let height = reader.head_height()?;
            let hash = match reader.block(height)? {
                Some((block, _)) => block.hash(),
                None if height == 0 => genesis_hash(validators.network()),
                None => bail!("the head block {height} is missing from the database"),
            };
            let head = json!({
                "height": height,
                "head_hash": hex::encode(hash),
                "view": reader.view()?,
            });
            (head, true)
        }
        LedgerCommand::Get(height) => match reader.block(height)? {
            Some((block, certificate)) => (
                crate::common::ledger::block_json(&block, &certificate),
                true,
            ),
            None => bail!("no block at height {height}"),
        },
        LedgerCommand::Verify => match crate::common::ledger::verify_blocks(&reader, &membership) {
            Ok(height) => (json!({ "ok": true, "height": height }), true),
            Err(e) => (json!({ "ok": false, "error": format!("{e:#}") }), false),
        },
    })
}

/// Prints a ledger answer, failing after a verification that failed.
fn show_ledger(command: LedgerCommand, answer: &Value, ok: bool, json_output: bool) -> Result<()> {
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
    } else {
        match command {
            // A full node votes in no view: it has none to show.
            LedgerCommand::Head => match answer.get("view").filter(|v| !v.is_null()) {
                Some(view) => outln!(
                    "height {}  head {}  view {view}",
                    answer["height"],
                    text(&answer["head_hash"])
                )?,
                None => outln!(
                    "height {}  head {}",
                    answer["height"],
                    text(&answer["head_hash"])
                )?,
            },
            LedgerCommand::Get(_) => {
                outln!("height     {}", answer["height"])?;
                outln!("hash       {}", text(&answer["hash"]))?;
                outln!("prev       {}", text(&answer["prev_hash"]))?;
                outln!("view       {}", answer["view"])?;
                outln!("timestamp  {} ms", answer["timestamp_ms"])?;
                let txs = answer["transactions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                outln!("txs        {}", txs.len())?;
                for tx in txs {
                    outln!(
                        "  {} client {}… seq {}",
                        text(&tx["hash"]),
                        &text(&tx["client"])[..8.min(text(&tx["client"]).len())],
                        tx["seq"]
                    )?;
                }
                let signers = answer["certificate"]["signers"]
                    .as_array()
                    .map(Vec::len)
                    .unwrap_or(0);
                outln!("certified  by {signers} commit signatures")?;
            }
            LedgerCommand::Verify if ok => outln!(
                "ledger verified: every block from genesis to height {} links and is certified",
                answer["height"]
            )?,
            LedgerCommand::Verify => outln!("LEDGER DOES NOT VERIFY: {}", text(&answer["error"]))?,
        }
    }
    if !ok {
        bail!("ledger verification failed");
    }
    Ok(())
}

/// What `openagi ledger` shows.
#[derive(Debug, Clone, Copy)]
pub enum LedgerCommand {
    /// The head.
    Head,
    /// One block.
    Get(u64),
    /// Re-check the whole chain.
    Verify,
}

/// `openagi msg send`: sends through the running daemon. A connected
/// recipient acknowledges at once (`delivered`); any other is reached
/// through the mesh (`queued`, followed by `openagi msg outbox`).
pub fn msg_send(dir: &DataDir, to: &str, message: &str) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?.with_timeout(std::time::Duration::from_secs(60));
    let answer = client.post_json("/api/v1/msg", &json!({ "to": to, "text": message }))?;
    match answer["status"].as_str() {
        Some("delivered") => outln!("delivered to {}", text(&answer["to"]))?,
        _ => outln!(
            "{} for {} through the mesh (outbox #{}); `openagi msg outbox` shows when it is relayed and delivered",
            text(&answer["status"]),
            text(&answer["to"]),
            answer["number"]
        )?,
    }
    Ok(())
}

/// `openagi msg outbox`: the newest sent messages and where they are.
pub fn msg_outbox(dir: &DataDir, limit: usize, json_output: bool) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let answer = client.get_json(&format!("/api/v1/outbox?limit={limit}"))?;
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    for m in answer["messages"].as_array().cloned().unwrap_or_default() {
        let updated = m["updated_unix_ms"]
            .as_u64()
            .map_or_else(|| text(&m["updated_unix_ms"]), local_time);
        outln!(
            "#{} to {} {} ({}, {updated}): {}",
            m["number"],
            text(&m["to_peer"]),
            text(&m["state"]),
            text(&m["route"]),
            text(&m["text"])
        )?;
    }
    Ok(())
}

/// `openagi msg inbox`: the newest messages, oldest first.
pub fn msg_inbox(dir: &DataDir, limit: usize, json_output: bool) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let answer = client.get_json(&format!("/api/v1/inbox?limit={limit}"))?;
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    for m in answer["messages"].as_array().cloned().unwrap_or_default() {
        let received = m["received_unix_ms"]
            .as_u64()
            .map_or_else(|| text(&m["received_unix_ms"]), local_time);
        outln!(
            "#{} from {} at {received}: {}",
            m["number"],
            text(&m["from_peer"]),
            text(&m["text"])
        )?;
    }
    Ok(())
}

/// `unix_ms` as the local date and time with its offset from UTC, e.g.
/// `2026-12-02 14:03:11 +01:00`. Where the local zone cannot be found
/// (no TZ, no /etc/localtime) chrono uses UTC, which the `+00:00` shows.
pub fn local_time(unix_ms: u64) -> String {
    time_in(unix_ms, &chrono::Local)
}

/// `unix_ms` in `zone`, or the raw number (with its unit) when it is no
/// representable time.
fn time_in<Tz: chrono::TimeZone>(unix_ms: u64, zone: &Tz) -> String
where
    Tz::Offset: std::fmt::Display,
{
    i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| zone.timestamp_millis_opt(ms).single())
        .map_or_else(
            || format!("{unix_ms} ms after 1970"),
            |t| t.format("%Y-%m-%d %H:%M:%S %:z").to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_times_read_as_dates_with_their_offset() {
        let paris_winter = chrono::FixedOffset::east_opt(3600).expect("offset");
        assert_eq!(
            time_in(1_796_216_591_000, &paris_winter),
            "2026-12-02 14:03:11 +01:00"
        );
        assert_eq!(time_in(0, &chrono::Utc), "1970-01-01 00:00:00 +00:00");
        assert_eq!(
            time_in(u64::MAX, &chrono::Utc),
            format!("{} ms after 1970", u64::MAX)
        );
        assert!(local_time(0).starts_with("19"), "{}", local_time(0));
    }
}
