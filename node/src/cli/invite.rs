//! `openagi invite` (make, list and revoke invite codes through the
//! running daemon) and the joining side of `openagi init --join`: redeem a
//! code over the network and install the network's genesis.
//!
//! Redeeming needs no running daemon: `init` starts a short-lived network
//! endpoint with the new node's own identity, dials the bootstrap address,
//! asks over `/openagi/ledger/1`, and stops. The new node then starts as a
//! full node of that network.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use openagi_consensus::follow::{LedgerRequest, LedgerResponse};
use openagi_net::{Multiaddr, NetworkService, PeerId};
use toml::Value;

use crate::cli::client::ApiClient;
use crate::common::config::{CliOverrides, Config, FileEdit, edit_config_text};
use crate::common::datadir::DataDir;
use crate::common::passphrase::PassphraseSource;
use crate::outln;

/// How long a redemption may take, dialling included.
const REDEEM_TIMEOUT: Duration = Duration::from_secs(30);
/// The same over Tor, where the endpoint first bootstraps its Tor client
/// and then builds a circuit to the inviter's onion service (each can take
/// tens of seconds on the public network).
const REDEEM_TIMEOUT_TOR: Duration = Duration::from_secs(150);

/// `openagi invite`: a new code from the daemon on `dir`.
pub fn create(dir: &DataDir, expires: Duration, uses: u32) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let answer = client.post_json(
        "/api/v1/invites",
        &serde_json::json!({ "expires_secs": expires.as_secs(), "uses": uses }),
    )?;
    let code = answer["code"].as_str().context("no code in the answer")?;
    outln!("{code}")?;
    let bootstrap = answer["bootstrap"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .unwrap_or("<this node's address>/p2p/<its peer id>");
    eprintln!(
        "Works {uses} time(s) for {}. The new operator runs:\n  openagi init --data-dir DIR --transport direct --network-id {network} --join {code} --bootstrap {bootstrap}\n(with this node's reachable address in place of a loopback one), or, with everything in one token:\n  openagi init --data-dir DIR --transport direct --join {long}",
        humantime::format_duration(expires),
        network = answer["network_id"].as_str().unwrap_or("?"),
        long = answer["long"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `openagi invite list`.
pub fn list(dir: &DataDir, json: bool) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let answer = client.get_json("/api/v1/invites")?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    for invite in answer["invites"].as_array().cloned().unwrap_or_default() {
        outln!(
            "{}-…  {:<8} uses left {}",
            invite["label"].as_str().unwrap_or("?"),
            invite["state"].as_str().unwrap_or("?"),
            invite["uses_left"]
        )?;
    }
    Ok(())
}

/// `openagi invite revoke CODE`.
pub fn revoke(dir: &DataDir, code: &str) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    client.post_json(
        "/api/v1/invites/revoke",
        &serde_json::json!({ "code": code }),
    )?;
    outln!("revoked")?;
    Ok(())
}

/// Redeems `code` at the node behind `bootstrap` (a multiaddr ending in
/// `/p2p/<peer id>`) as the node of the initialised `dir`, then installs
/// the network's genesis and writes the network id and the bootstrap
/// address into its config. Returns lines for the operator.
pub fn join(
    dir: &DataDir,
    passphrase: &PassphraseSource,
    code: &str,
    bootstrap: Option<&str>,
) -> Result<Vec<String>> {
    // The long form carries the network id, the genesis hash and the
    // inviter's addresses; the short one needs --bootstrap (and the
    // network id in the config, from `init --network-id`).
    let (code, bootstrap, expected_genesis) =
        if code.trim().starts_with(crate::common::invite::LONG_PREFIX) {
            let long = crate::common::invite::LongInvite::decode(code)?;
            let bootstrap = match bootstrap {
                Some(b) => b.to_string(),
                None => long
                    .bootstrap
                    .first()
                    .cloned()
                    .context("the invite names no address; give --bootstrap")?,
            };
            let edits = crate::common::config::init_edits(Some(&long.network_id), None);
            let config_path = dir.file(crate::common::config::CONFIG_FILE);
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            let (edited, _) = edit_config_text(&text, &edits)
                .map_err(|e| anyhow::anyhow!("editing the config: {e}"))?;
            openagi_keyfiles::keyfile::write_atomic(&config_path, edited.as_bytes(), 0o600)?;
            (long.code, bootstrap, Some(long.genesis_hash))
        } else {
            let bootstrap = bootstrap
                .context("a short invite code needs --bootstrap <the inviter's address>")?
                .to_string();
            (crate::common::invite::normalize(code)?, bootstrap, None)
        };
    let bootstrap = bootstrap.as_str();
    let addr: Multiaddr = bootstrap
        .parse()
        .with_context(|| format!("--bootstrap {bootstrap:?} is not a multiaddr"))?;
    let peer = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
            _ => None,
        })
        .context("--bootstrap must end in /p2p/<peer id> of the inviting node")?;
    let identity = dir.identity(passphrase)?;
    // The environment counts as it does for `run` (OPENAGI_TOR_ARTI_CONFIG,
    // for one, says which Tor network to use).
    let mut config = Config::load(dir.path(), None, std::env::vars(), &CliOverrides::default())?;
    let timeout = if config.network.transport.is_tor() {
        REDEEM_TIMEOUT_TOR
    } else {
        REDEEM_TIMEOUT
    };
    // Only dial out: this endpoint lives for one request.
    config.network.listen.clear();
    config.network.bootstrap.clear();
    let network_id = config.network.network_id.clone();
    let net_config = config.net_config_for(crate::common::version::VERSION, dir.path())?;
    let keypair = openagi_net::keypair_from_identity(&identity)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let answer = runtime.block_on(async move {
        let mut registry = prometheus_client::registry::Registry::default();
        let (net, _events, task) = NetworkService::start(keypair, net_config, &mut registry)?;
        let outcome = tokio::time::timeout(timeout, redeem(&net, addr, peer, &code, timeout)).await;
        task.abort();
        outcome.unwrap_or_else(|_| {
            bail!(
                "no answer from {peer} within {} s: is it reachable, and is --network-id {:?} the inviting network's id (`openagi invite` prints the whole command)?",
                timeout.as_secs(),
                network_id
            )
        })
    })?;
    let (network_id, genesis_toml) = match answer {
        LedgerResponse::Invitation {
            network_id,
            genesis_toml,
        } => (network_id, genesis_toml),
        LedgerResponse::Refused(why) => bail!("the invitation was refused: {why}"),
        _ => bail!("{peer} answered out of turn"),
    };
    if let Some(expected) = expected_genesis
        && crate::common::invite::genesis_hash(&genesis_toml) != expected
    {
        bail!("the genesis the inviter sent does not match the hash in the invite; refusing it");
    }
    // Parsed and its validator set checked, as the daemon will at start.
    let genesis = crate::common::genesis::Genesis::parse(&genesis_toml)
        .context("the genesis the inviter sent is not valid")?;
    if genesis.network_id != network_id {
        bail!(
            "the inviter's genesis is for network {:?}, not {network_id:?}",
            genesis.network_id
        );
    }
    openagi_keyfiles::keyfile::write_atomic(
        &dir.file(crate::common::genesis::GENESIS_FILE),
        genesis_toml.as_bytes(),
        0o644,
    )?;
    let config_path = dir.file(crate::common::config::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let edits = [
        FileEdit {
            section: "network",
            key: "network_id",
            value: Value::String(network_id.clone()),
        },
        FileEdit {
            section: "network",
            key: "bootstrap",
            value: Value::Array(vec![Value::String(bootstrap.to_string())]),
        },
    ];
    let (edited, mut lines) =
        edit_config_text(&text, &edits).map_err(|e| anyhow::anyhow!("editing the config: {e}"))?;
    openagi_keyfiles::keyfile::write_atomic(&config_path, edited.as_bytes(), 0o600)?;
    lines.insert(
        0,
        format!(
            "joined network {network_id:?}: genesis with {} validators installed; this node follows the ledger as a full node",
            genesis.validators.len()
        ),
    );
    Ok(lines)
}

/// Dials `addr`, waits for the connection to `peer` and asks it to redeem
/// `code`.
async fn redeem(
    net: &openagi_net::NetHandle,
    addr: Multiaddr,
    peer: PeerId,
    code: &str,
    limit: Duration,
) -> Result<LedgerResponse> {
    // Dialled again every few seconds until connected: over Tor the first
    // dials fail while the client is still bootstrapping or the inviter's
    // onion service descriptor is not yet reachable.
    const REDIAL: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let mut next_dial = started;
    let mut last_error = String::new();
    while !net.snapshot().peers.contains_key(&peer.to_string()) {
        if Instant::now() >= next_dial {
            if let Err(e) = net.dial(addr.clone()).await {
                last_error = format!(" (last dial: {e})");
            }
            next_dial = Instant::now() + REDIAL;
        }
        if started.elapsed() > limit {
            bail!(
                "could not connect to {peer} within {} s{last_error}",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = LedgerRequest::Redeem {
        code: code.to_string(),
    }
    .encode()?;
    let bytes = net.ledger_request(peer, request).await?;
    Ok(LedgerResponse::decode(&bytes)?)
}
