//! The local HTTP server: `/health`, `/ready`, `/metrics` and the
//! authenticated operator API under `/api/v1`.
//!
//! `/health` (liveness: the process answers) and `/ready` (readiness: it
//! has peers, its transport is up and its ledger has caught up) and
//! `/metrics` are open so that supervisors, load balancers and Prometheus
//! need no secret; everything under `/api/v1` needs
//! `Authorization: Bearer <token>` with the token from the data
//! directory's `api.token`. The server binds to loopback by default.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openagi_consensus::{ClientId, Transaction};
use openagi_dashboard::MetricsRegistry;
use openagi_net::NetHandle;
use serde::{Deserialize, Serialize};

use crate::common::store::Store;
use crate::daemon::consensus::{ConsensusError, ConsensusHandle, ConsensusStatus};
use crate::daemon::txindex::TxLookupResult;

/// Shared state of the HTTP handlers.
pub struct ApiState {
    /// Requests refused for a missing or wrong token
    /// (`openagi_api_auth_failures_total`).
    pub auth_failures: prometheus_client::metrics::counter::Counter,
    /// The network task.
    pub net: NetHandle,
    /// The node's part in the ledger (validator, full node or none),
    /// which may change while it runs.
    pub ledger: crate::daemon::role::LedgerRole,
    /// The node's identity, which signs its own join and leave requests.
    pub identity: Arc<openagi_crypto::Identity>,
    /// The node's database.
    pub store: Arc<Store>,
    /// Committed transactions by hash.
    pub tx_lookup: Arc<crate::daemon::txindex::TxLookup>,
    /// The metrics registry.
    pub metrics: MetricsRegistry,
    /// The bearer token `/api/v1` requires.
    pub token: String,
    /// Set once shutdown starts: `/health` then answers 503 so load
    /// balancers stop sending work.
    pub draining: AtomicBool,
    /// When the daemon started.
    pub started: Instant,
    /// Network id.
    pub network_id: String,
    /// Transport mode name.
    pub transport: String,
    /// The bound API address.
    pub api_addr: String,
    /// End-to-end encrypted messaging.
    pub messenger: Arc<crate::daemon::msg::Messenger>,
    /// Federated learning.
    pub learner: Arc<crate::daemon::federation::Learner>,
    /// Whether `network.listen` names any address: a node configured to
    /// only dial out is not expected to listen.
    pub listen_configured: bool,
    /// The web dashboard: sessions, metric history, alerts.
    pub dashboard: Arc<crate::daemon::dashboard::Dashboard>,
    /// The data directory (the dashboard reads its benchmark log).
    pub data_dir: crate::common::datadir::DataDir,
}

impl ApiState {
    /// The replica's handle while this node is a validator.
    pub fn consensus(&self) -> Option<ConsensusHandle> {
        self.ledger.consensus()
    }

    /// The follower's handle while this node is a full node.
    pub fn follower(&self) -> Option<crate::daemon::follower::FollowerHandle> {
        self.ledger.follower()
    }
}

/// The `/api/v1/status` document. Sections are stable: later parts add
/// `ledger`, `consensus`, `learning` and `tor` beside these.
#[derive(Debug, Serialize)]
pub struct StatusDocument {
    /// This node.
    pub node: NodeStatus,
    /// Its networking.
    pub network: NetworkStatus,
    /// Tor (mode, bootstrap, onion address); `null` with the direct
    /// transport.
    pub tor: Option<openagi_net::tor::TorStatus>,
    /// Consensus, when this node is a validator (else `null`).
    pub consensus: Option<ConsensusSection>,
    /// The ledger head, when this node holds the ledger (else `null`).
    pub ledger: Option<LedgerStatus>,
}

/// The `consensus` section: a validator's replica, or a full node's
/// follower; both carry `role`, `epoch` and the validator set.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ConsensusSection {
    /// This node votes.
    Validator(Box<ConsensusStatus>),
    /// This node follows the ledger without voting.
    Full(crate::daemon::follower::FollowerStatus),
}

/// The `ledger` section of the status document.
#[derive(Debug, Serialize)]
pub struct LedgerStatus {
    /// Committed height.
    pub height: u64,
    /// Head block hash (hex).
    pub head_hash: String,
}

/// The `node` section of the status document.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    /// libp2p peer id (derived from the node's Ed25519 identity).
    pub peer_id: String,
    /// Software version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Address of this API.
    pub api_addr: String,
}

/// The `network` section of the status document.
#[derive(Debug, Serialize)]
pub struct NetworkStatus {
    /// Network id.
    pub network_id: String,
    /// Transport mode.
    pub transport: String,
    /// Addresses the node listens on.
    pub listen_addrs: Vec<String>,
    /// Number of connected peers.
    pub connected_peers: usize,
    /// Their peer ids.
    pub peers: Vec<String>,
    /// Gossip messages accepted since start.
    pub gossip_received: u64,
}

impl ApiState {
    /// Builds the status document.
    pub fn status(&self) -> StatusDocument {
        let snapshot = self.net.snapshot();
        let consensus = match (self.consensus(), self.follower()) {
            (Some(c), _) => Some(ConsensusSection::Validator(Box::new(c.status()))),
            (None, Some(f)) => Some(ConsensusSection::Full(f.status())),
            (None, None) => None,
        };
        let ledger = consensus.as_ref().map(|c| match c {
            ConsensusSection::Validator(c) => LedgerStatus {
                height: c.height,
                head_hash: c.head_hash.clone(),
            },
            ConsensusSection::Full(f) => LedgerStatus {
                height: f.height,
                head_hash: f.head_hash.clone(),
            },
        });
        StatusDocument {
            consensus,
            ledger,
            node: NodeStatus {
                peer_id: snapshot.local_peer_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: self.started.elapsed().as_secs(),
                api_addr: self.api_addr.clone(),
            },
            network: NetworkStatus {
                network_id: self.network_id.clone(),
                transport: self.transport.clone(),
                listen_addrs: snapshot.listen_addrs.clone(),
                connected_peers: snapshot.peers.len(),
                peers: snapshot.peers.keys().cloned().collect(),
                gossip_received: snapshot.gossip_received,
            },
            tor: self.net.tor_status(),
        }
    }
}

/// Onion service states (as in the Tor status) in which peers can reach
/// this node: `degradedreachable` is arti's "some introduction points
/// failed, the service still answers".
const ONION_UP: &[&str] = &["running", "degradedreachable"];

impl ApiState {
    /// Why this node is not ready to serve (empty when it is): `/ready`.
    ///
    /// Ready means: at least one connected peer; the transport up (Tor
    /// bootstrapped and the onion service reachable in the Tor modes, a
    /// bound listen address in direct mode); and, on a validator, not
    /// recovering lost consensus state nor behind the height `f + 1` other
    /// validators report. A node with no peers (none configured, none
    /// found) is not ready: it cannot reach the network it serves.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.draining.load(Ordering::Relaxed) {
            reasons.push("draining".to_string());
        }
        let snapshot = self.net.snapshot();
        if snapshot.peers.is_empty() {
            reasons.push("no peers".to_string());
        }
        match self.net.tor_status() {
            Some(tor) if !tor.bootstrapped => {
                reasons.push(format!("tor not bootstrapped ({}%)", tor.bootstrap_percent))
            }
            Some(tor) if !ONION_UP.contains(&tor.onion_service.as_str()) => {
                reasons.push(format!("onion service {}", tor.onion_service))
            }
            Some(_) => {}
            None => {
                if self.listen_configured && snapshot.listen_addrs.is_empty() {
                    reasons.push("not listening".to_string());
                }
            }
        }
        if let Some(consensus) = &self.consensus() {
            let status = consensus.status();
            if status.recovery.is_some() {
                reasons.push("consensus recovering lost state".to_string());
            }
            if status.height < status.peers_height {
                reasons.push(format!(
                    "ledger behind: height {} of {} reported by validators",
                    status.height, status.peers_height
                ));
            }
        }
        reasons
    }
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    let authenticated = Router::new()
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route("/tx", post(submit_tx))
        .route("/tx/{hash}", get(tx_status))
        .route(
            "/tx/batch",
            post(submit_batch).layer(axum::extract::DefaultBodyLimit::max(MAX_BATCH_BODY)),
        )
        .route("/consensus/latency", get(consensus_latency))
        .route("/ledger/head", get(ledger_head))
        .route("/ledger/blocks/{height}", get(ledger_block))
        .route("/ledger/verify", get(ledger_verify))
        .route("/msg", post(send_msg))
        .route("/inbox", get(inbox))
        .route("/outbox", get(outbox))
        .route("/learn/jobs", get(learn_jobs).post(learn_submit))
        .route("/learn/jobs/{job}/model", get(learn_model))
        .route("/learn/models", get(learn_models))
        .route("/invites", get(list_invites).post(create_invite))
        .route("/invites/revoke", post(revoke_invite))
        .route("/validator", get(crate::daemon::validator_api::overview))
        .route("/validator/join", post(crate::daemon::validator_api::join))
        .route(
            "/validator/leave",
            post(crate::daemon::validator_api::leave),
        )
        .route(
            "/validator/puzzle",
            post(crate::daemon::validator_api::puzzle_vote),
        )
        .route(
            "/validator/changes/{tx}",
            get(crate::daemon::validator_api::change_status),
        )
        .route("/dashboard/login", post(dashboard_login))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .nest("/api/v1", authenticated)
        .merge(crate::daemon::dashboard::routes())
        .with_state(state)
}

async fn health(State(state): State<Arc<ApiState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(serde_json::json!({"status": "ok"})).into_response()
    }
}

async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let reasons = state.not_ready_reasons();
    if reasons.is_empty() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "reasons": reasons})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<ApiState>>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match state.metrics.encode_for(accept) {
        Ok((text, content_type)) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn status(State(state): State<Arc<ApiState>>) -> Json<StatusDocument> {
    Json(state.status())
}

async fn peers(State(state): State<Arc<ApiState>>) -> Response {
    let snapshot = state.net.snapshot();
    Json(serde_json::json!({ "peers": snapshot.peers.values().collect::<Vec<_>>() }))
        .into_response()
}

/// Body of `POST /api/v1/tx`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Payload as UTF-8 text.
    pub payload: Option<String>,
    /// Payload as hex (for binary data).
    pub payload_hex: Option<String>,
    /// Client id (64 hex digits); default: this node's own client id.
    pub client: Option<String>,
    /// The client's sequence number; default: the node's next one.
    pub seq: Option<u64>,
    /// Wait until the transaction commits (up to 30 s).
    #[serde(default)]
    pub wait: bool,
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Body of `POST /api/v1/msg`.
#[derive(Debug, Deserialize)]
pub struct SendMsgRequest {
    /// The recipient's peer id.
    pub to: String,
    /// The text (UTF-8, at most `msg::MAX_TEXT_BYTES`).
    pub text: String,
}

async fn send_msg(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let request: SendMsgRequest = match json_body(body) {
        Ok(value) => value,
        Err(response) => return response,
    };
    let Ok(to) = request.to.parse::<openagi_net::PeerId>() else {
        return error(StatusCode::BAD_REQUEST, "`to` is not a peer id");
    };
    if request.text.len() > crate::daemon::msg::MAX_TEXT_BYTES {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "text is limited to {} bytes",
                crate::daemon::msg::MAX_TEXT_BYTES
            ),
        );
    }
    match state.messenger.send(to, request.text).await {
        Ok(outcome) => Json(serde_json::json!({
            "status": outcome.state,
            "route": outcome.route,
            "number": outcome.number,
            "to": to.to_string(),
        }))
        .into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

/// Query of `GET /api/v1/inbox` and `/outbox`.
#[derive(Debug, Deserialize)]
pub struct InboxQuery {
    /// Most messages returned (newest ones; default 100, at most 1000).
    pub limit: Option<usize>,
}

/// Answers with `{"messages": ...}` from `read` run on the blocking pool
/// (both read and decrypt the store).
async fn messages<T: Serialize + Send + 'static>(
    state: &ApiState,
    query: InboxQuery,
    read: fn(&crate::daemon::msg::Messenger, usize) -> anyhow::Result<Vec<T>>,
) -> Response {
    let limit = query
        .limit
        .unwrap_or(100)
        .min(crate::daemon::msg::MAX_INBOX_PAGE);
    let messenger = state.messenger.clone();
    match tokio::task::spawn_blocking(move || read(&messenger, limit)).await {
        Ok(Ok(messages)) => Json(serde_json::json!({ "messages": messages })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/inbox`: the newest received messages.
async fn inbox(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<InboxQuery>, QueryRejection>,
) -> Response {
    match query_of(query) {
        Ok(query) => messages(&state, query, crate::daemon::msg::Messenger::inbox).await,
        Err(refused) => refused,
    }
}

/// `GET /api/v1/outbox`: the newest sent messages with their state.
async fn outbox(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<InboxQuery>, QueryRejection>,
) -> Response {
    match query_of(query) {
        Ok(query) => messages(&state, query, crate::daemon::msg::Messenger::outbox).await,
        Err(refused) => refused,
    }
}

// The error is the HTTP response itself, built only when a request is
// refused; boxing it would cost an allocation and buy nothing.
#[allow(clippy::result_large_err)]
fn consensus_of(state: &ApiState) -> Result<ConsensusHandle, Response> {
    state.consensus().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no consensus: it needs a genesis.toml in its data directory that lists it as a validator",
        )
    })
}

/// A JSON body, or the response that says why it was refused.
// The error is the response itself, as in `consensus_of`.
#[allow(clippy::result_large_err)]
///
/// Read as a JSON value first: serde would also build a struct from an
/// array of its fields (`[null, null]`), which no client means. A body
/// that is not an object, or whose fields do not fit, gets 422.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<T, Response> {
    let value = body.map(|Json(value)| value).map_err(|e| {
        let (status, text) = crate::daemon::http::json_rejection(&e);
        error(status, text)
    })?;
    if !value.is_object() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
}

/// A query string, or the JSON error that says why it was refused (axum
/// would answer in plain text).
// The error is the response itself, as in `consensus_of`.
#[allow(clippy::result_large_err)]
fn query_of<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Response> {
    query
        .map(|Query(value)| value)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))
}

/// A path parameter, or the JSON error that says why it was refused.
#[allow(clippy::result_large_err)]
pub(crate) fn path_of<T>(path: Result<Path<T>, PathRejection>) -> Result<T, Response> {
    path.map(|Path(value)| value)
        .map_err(|e| error(e.status(), e.body_text()))
}

/// Where a submitted transaction goes.
enum Submitter {
    /// This node's replica.
    Validator(ConsensusHandle),
    /// A validator, through this full node's follower.
    Full(crate::daemon::follower::FollowerHandle),
}

/// How long `wait` waits for a commit.
const COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn submit_tx(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let request: SubmitRequest = match json_body(body) {
        Ok(value) => value,
        Err(response) => return response,
    };
    // A validator submits to its replica; a full node forwards to one.
    let ledger = match (state.consensus(), state.follower()) {
        (Some(c), _) => Submitter::Validator(c),
        (None, Some(f)) => Submitter::Full(f),
        (None, None) => {
            return consensus_of(&state).err().unwrap_or_else(|| {
                error(StatusCode::SERVICE_UNAVAILABLE, "no ledger on this node")
            });
        }
    };
    let payload = match (request.payload, request.payload_hex) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(hex_text)) => match hex::decode(hex_text.trim()) {
            Ok(bytes) => bytes,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("payload_hex: {e}")),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of `payload` and `payload_hex`",
            );
        }
    };
    if matches!(ledger, Submitter::Full(_)) && request.client.is_some() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a full node forwards only its own transactions (validators take them from its peer id alone); submit transactions under your own client id to a validator",
        );
    }
    let tx = match (request.client, request.seq) {
        (_, Some(0)) => return error(StatusCode::BAD_REQUEST, "seq starts at 1"),
        (Some(text), seq) => {
            let Some(client) = parse_hash(text.trim()).map(ClientId) else {
                return error(StatusCode::BAD_REQUEST, "client must be 64 hex digits");
            };
            let Some(seq) = seq else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "a transaction under its own client needs its own seq (the node numbers only its own)",
                );
            };
            Transaction {
                client,
                seq,
                payload: payload.into(),
            }
        }
        (None, Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "seq needs a client: the node numbers its own transactions itself",
            );
        }
        (None, None) => {
            let own = match &ledger {
                Submitter::Validator(c) => {
                    c.own_transaction(payload).await.map_err(|e| e.to_string())
                }
                Submitter::Full(f) => f
                    .own_transaction(payload)
                    .await
                    .map_err(|e| format!("{e:#}")),
            };
            match own {
                Ok(tx) => tx,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
    };
    let seq = tx.seq;
    // Subscribe before submitting so a fast commit cannot be missed.
    let (mut commits, submitted) = match ledger {
        Submitter::Validator(c) => (c.subscribe(), c.submit(tx).await.map_err(consensus_refusal)),
        Submitter::Full(f) => (
            f.subscribe(),
            f.forward(&state.net, tx)
                .await
                .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())),
        ),
    };
    let hash = match submitted {
        Ok(h) => h,
        Err(refusal) => return refusal,
    };
    let tx_hash = hex::encode(hash);
    if !request.wait {
        return (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "tx_hash": tx_hash, "seq": seq, "status": "pending" })),
        )
            .into_response();
    }
    let waited = tokio::time::timeout(COMMIT_WAIT, async {
        loop {
            match commits.recv().await {
                Ok(notice) => {
                    if let Some(index) = notice.tx_hashes.iter().position(|h| *h == hash) {
                        return Some((notice.height, index as u32));
                    }
                }
                // Missed notices: the index on disk has the answer.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if let Ok(TxLookupResult::Committed(position)) = lookup_tx(&state, hash).await {
                        return Some(position);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await;
    match waited {
        Ok(Some((height, index))) => Json(serde_json::json!({
            "tx_hash": tx_hash, "seq": seq, "status": "committed", "height": height, "index": index
        }))
        .into_response(),
        _ => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "tx_hash": tx_hash, "seq": seq, "status": "pending" })),
        )
            .into_response(),
    }
}

/// Largest body of `POST /api/v1/tx/batch`.
const MAX_BATCH_BODY: usize = 32 * 1024 * 1024;
/// Most transactions in one batch submission.
const MAX_BATCH_TXS: usize = 100_000;

/// `POST /api/v1/tx/batch`: a postcard-encoded `Vec<Transaction>` (binary,
/// for load generators). Answers 202 once the batch is queued for the
/// replica, 503 "busy" with `Retry-After` when the validator already holds
/// all it may; duplicates and later refusals are counted in metrics.
async fn submit_batch(State(state): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let consensus = match consensus_of(&state) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let txs: Vec<Transaction> = match postcard::from_bytes(&body) {
        Ok(t) => t,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body is not a postcard Vec<Transaction>: {e}"),
            );
        }
    };
    if txs.len() > MAX_BATCH_TXS {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_BATCH_TXS} transactions per batch"),
        );
    }
    let queued = txs.len();
    match consensus.submit_batch(txs) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "queued": queued })),
        )
            .into_response(),
        Err(e) => consensus_refusal(e),
    }
}

/// The answer for a submission consensus refused: 503 with `Retry-After`
/// when the validator is busy or stopped (try again later), 413 for a
/// batch larger than it ever holds, 422 for a transaction it will not
/// take.
fn consensus_refusal(e: ConsensusError) -> Response {
    match e {
        ConsensusError::Busy { .. } | ConsensusError::Stopped => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            response
        }
        ConsensusError::BatchTooLarge { .. } => error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        other => error(StatusCode::UNPROCESSABLE_ENTITY, other.to_string()),
    }
}

/// Query of `GET /api/v1/consensus/latency`.
#[derive(Debug, Deserialize)]
pub struct LatencyQuery {
    /// Only commits at or after this unix time in milliseconds.
    #[serde(default)]
    pub since_ms: u64,
}

async fn consensus_latency(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<LatencyQuery>, QueryRejection>,
) -> Response {
    let query = match query_of(query) {
        Ok(q) => q,
        Err(refused) => return refused,
    };
    match consensus_of(&state) {
        Ok(c) => Json(c.latency(query.since_ms)).into_response(),
        Err(r) => r,
    }
}

pub(crate) fn parse_hash(text: &str) -> Option<[u8; 32]> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
}

/// Looks a transaction up off the async workers (it reads the disk).
async fn lookup_tx(state: &Arc<ApiState>, hash: [u8; 32]) -> Result<TxLookupResult, String> {
    let lookup = state.tx_lookup.clone();
    match tokio::task::spawn_blocking(move || lookup.position(&hash)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("lookup task failed: {e}")),
    }
}

async fn tx_status(
    State(state): State<Arc<ApiState>>,
    hash: Result<Path<String>, PathRejection>,
) -> Response {
    let hash = match path_of(hash) {
        Ok(h) => h,
        Err(refused) => return refused,
    };
    let Some(hash) = parse_hash(&hash) else {
        return error(
            StatusCode::BAD_REQUEST,
            "a transaction hash is 64 hex digits",
        );
    };
    match lookup_tx(&state, hash).await {
        Ok(TxLookupResult::Committed((height, index))) => Json(serde_json::json!({
            "tx_hash": hex::encode(hash), "status": "committed", "height": height, "index": index
        }))
        .into_response(),
        Ok(TxLookupResult::Unknown) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "tx_hash": hex::encode(hash), "status": "unknown" })),
        )
            .into_response(),
        // Cannot tell yet: retry later rather than believe "unknown".
        Ok(TxLookupResult::Indexing { indexed, head }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "tx_hash": hex::encode(hash), "status": "indexing",
                "indexed_height": indexed, "ledger_height": head
            })),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn ledger_head(State(state): State<Arc<ApiState>>) -> Response {
    if state.consensus().is_none()
        && let Some(f) = state.follower()
    {
        let s = f.status();
        return Json(serde_json::json!({ "height": s.height, "head_hash": s.head_hash }))
            .into_response();
    }
    match consensus_of(&state) {
        Ok(c) => {
            let s = c.status();
            Json(
                serde_json::json!({ "height": s.height, "head_hash": s.head_hash, "view": s.view }),
            )
            .into_response()
        }
        Err(r) => r,
    }
}

async fn ledger_block(
    State(state): State<Arc<ApiState>>,
    height: Result<Path<u64>, PathRejection>,
) -> Response {
    let height = match path_of(height) {
        Ok(h) => h,
        Err(refused) => return refused,
    };
    match state.store.block(height) {
        Ok(Some((block, cert))) => {
            Json(crate::common::ledger::block_json(&block, &cert)).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no block at height {height}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn ledger_verify(State(state): State<Arc<ApiState>>) -> Response {
    let genesis = match (state.consensus(), state.follower()) {
        (Some(c), _) => c.genesis().clone(),
        (None, Some(f)) => f.genesis().clone(),
        (None, None) => {
            return consensus_of(&state).err().unwrap_or_else(|| {
                error(StatusCode::SERVICE_UNAVAILABLE, "no ledger on this node")
            });
        }
    };
    let store = state.store.clone();
    let checked =
        tokio::task::spawn_blocking(move || crate::common::ledger::verify_stored(&store, &genesis))
            .await;
    match checked {
        Ok(Ok(height)) => Json(serde_json::json!({ "ok": true, "height": height })).into_response(),
        Ok(Err(e)) => {
            Json(serde_json::json!({ "ok": false, "error": format!("{e:#}") })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Compares in time independent of where the first difference is, so the
/// token cannot be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `headers` carry the API token.
pub fn bearer_ok(state: &ApiState, headers: &axum::http::HeaderMap) -> bool {
    bearer(headers).is_some_and(|token| constant_time_eq(token.as_bytes(), state.token.as_bytes()))
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// `/api/v1` needs the token; a dashboard session may also read (GET and
/// HEAD only: a session never changes anything).
async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let read_only = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    // The inbox and outbox hold private messages in the clear: the token
    // only.
    let private =
        request.uri().path().ends_with("/inbox") || request.uri().path().ends_with("/outbox");
    if read_only && !private && state.dashboard.has_session(request.headers()) {
        return next.run(request).await;
    }
    if bearer_ok(&state, request.headers()) {
        return next.run(request).await;
    }
    state.auth_failures.inc();
    audit_auth_failure(
        request.uri().path(),
        if bearer(request.headers()).is_some() {
            "wrong token"
        } else {
            "no token"
        },
    );
    match bearer(request.headers()) {
        Some(_) => unauthorized("wrong token"),
        None => unauthorized(
            "missing `Authorization: Bearer <token>` header (the token is in the data directory's api.token)",
        ),
    }
}

/// Most API authentication failures written to the audit log per second;
/// past it they are counted into the next entry, so a local flood costs the
/// log a few lines a second.
const AUDITED_AUTH_FAILURES_PER_SEC: u32 = 10;

fn audit_auth_failure(path: &str, reason: &'static str) {
    static WINDOW: std::sync::Mutex<(u64, u32, u64)> = std::sync::Mutex::new((0, 0, 0));
    let now = crate::unix_ms() / 1000;
    let Ok(mut window) = WINDOW.lock() else {
        return;
    };
    let (second, count, suppressed) = &mut *window;
    if *second != now {
        *second = now;
        *count = 0;
    }
    if *count >= AUDITED_AUTH_FAILURES_PER_SEC {
        *suppressed += 1;
        return;
    }
    *count += 1;
    let earlier = std::mem::take(suppressed);
    tracing::info!(
        target: "audit",
        event = "api_auth_failed",
        path = %path.chars().take(128).collect::<String>(),
        reason,
        suppressed_before = earlier,
        "API request without a valid token"
    );
}

fn unauthorized(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
        Json(serde_json::json!({ "error": why })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}

/// Body of `POST /api/v1/invites`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// Seconds the code works (default 7 days, at most 90 days).
    pub expires_secs: Option<u64>,
    /// Redemptions it allows (default 1, at most 1000).
    pub uses: Option<u32>,
}

/// Most invites kept (revoked and spent ones included).
const MAX_INVITES: u64 = 1000;

/// `POST /api/v1/invites`: a new invite code into this node's network.
async fn create_invite(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let request: InviteRequest = match json_body(body) {
        Ok(value) => value,
        Err(response) => return response,
    };
    if !state.ledger.has_ledger() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node holds no ledger (no genesis.toml): there is no network to invite into",
        );
    }
    let expires_secs = request.expires_secs.unwrap_or(7 * 24 * 3600);
    let uses = request.uses.unwrap_or(1);
    if !(1..=90 * 24 * 3600).contains(&expires_secs) || !(1..=1000).contains(&uses) {
        return error(
            StatusCode::BAD_REQUEST,
            "expires_secs must be 1 s to 90 days and uses 1 to 1000",
        );
    }
    let code = match crate::common::invite::generate() {
        Ok(c) => c,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let now = crate::unix_ms();
    let invite = crate::common::store::Invite {
        label: code[..9].to_string(),
        created_ms: now,
        expires_ms: now + expires_secs * 1000,
        uses_left: uses,
        revoked: false,
    };
    let hash = crate::common::invite::code_hash(&code);
    let store = state.store.clone();
    let stored =
        tokio::task::spawn_blocking(move || store.add_invite(&hash, &invite, MAX_INVITES)).await;
    match stored {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            return error(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("{MAX_INVITES} invites exist; revoke some first"),
            );
        }
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    let snapshot = state.net.snapshot();
    let bootstrap: Vec<String> = snapshot
        .listen_addrs
        .iter()
        .map(|a| format!("{a}/p2p/{}", snapshot.local_peer_id))
        .collect();
    let genesis =
        std::fs::read_to_string(state.data_dir.file(crate::common::genesis::GENESIS_FILE))
            .unwrap_or_default();
    let long = crate::common::invite::LongInvite {
        code: code.clone(),
        network_id: state.network_id.clone(),
        genesis_hash: crate::common::invite::genesis_hash(&genesis),
        bootstrap: bootstrap.clone(),
    }
    .encode();
    Json(serde_json::json!({
        "code": code,
        "long": long,
        "network_id": state.network_id,
        "expires_unix_ms": now + expires_secs * 1000,
        "uses": uses,
        "bootstrap": bootstrap,
    }))
    .into_response()
}

/// `GET /api/v1/invites`: the invites this node made (never the codes).
async fn list_invites(State(state): State<Arc<ApiState>>) -> Response {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.invites()).await {
        Ok(Ok(invites)) => {
            let now = crate::unix_ms();
            let list: Vec<serde_json::Value> = invites
                .into_iter()
                .map(|(_, i)| {
                    use crate::common::store::InviteRefusal;
                    let state = match i.refusal(now) {
                        Some(InviteRefusal::Revoked) => "revoked",
                        Some(InviteRefusal::Expired) => "expired",
                        Some(InviteRefusal::Spent) => "spent",
                        Some(InviteRefusal::Unknown) | None => "open",
                    };
                    serde_json::json!({
                        "label": i.label, "created_unix_ms": i.created_ms,
                        "expires_unix_ms": i.expires_ms, "uses_left": i.uses_left, "state": state,
                    })
                })
                .collect();
            Json(serde_json::json!({ "invites": list })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Body of `POST /api/v1/invites/revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The code to revoke.
    pub code: String,
}

/// `POST /api/v1/invites/revoke`: the code stops working.
async fn revoke_invite(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let request: RevokeRequest = match json_body(body) {
        Ok(value) => value,
        Err(response) => return response,
    };
    let code = match crate::common::invite::normalize(&request.code) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let hash = crate::common::invite::code_hash(&code);
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.revoke_invite(&hash)).await {
        Ok(Ok(true)) => Json(serde_json::json!({ "revoked": true })).into_response(),
        Ok(Ok(false)) => error(StatusCode::NOT_FOUND, "no such invite on this node"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /api/v1/dashboard/login`: a one-time login link for the web
/// dashboard.
async fn dashboard_login(State(state): State<Arc<ApiState>>) -> Response {
    match state.dashboard.login_code() {
        Ok(code) => Json(serde_json::json!({
            "url": format!("http://{}/login?code={code}", state.api_addr),
            "expires_in_secs": crate::daemon::dashboard::LOGIN_CODE_TTL.as_secs(),
            "session_secs": crate::daemon::dashboard::SESSION_TTL.as_secs(),
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no login code: {e}"),
        ),
    }
}

async fn learn_jobs(State(state): State<Arc<ApiState>>) -> Response {
    match state.learner.jobs() {
        Ok(jobs) => Json(serde_json::json!({ "jobs": jobs })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// Query of `GET /api/v1/learn/models`.
#[derive(Debug, Deserialize)]
pub struct ModelsQuery {
    /// Only this job's models (its id, 64 hex digits).
    pub job: Option<String>,
    /// Only the models jobs finished with.
    #[serde(default, rename = "final")]
    pub final_only: bool,
    /// Most cards (the newest; default and most [`MAX_MODEL_CARDS`]).
    pub limit: Option<usize>,
}

/// Most model cards one answer carries.
pub const MAX_MODEL_CARDS: usize = 1000;

async fn learn_models(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<ModelsQuery>, QueryRejection>,
) -> Response {
    let query = match query_of(query) {
        Ok(q) => q,
        Err(refused) => return refused,
    };
    let job = match query
        .job
        .as_deref()
        .map(openagi_learning::federation::JobId::from_hex)
    {
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        Some(Ok(id)) => Some(id),
        None => None,
    };
    let limit = query.limit.unwrap_or(MAX_MODEL_CARDS).min(MAX_MODEL_CARDS);
    let learner = state.learner.clone();
    let listed =
        tokio::task::spawn_blocking(move || learner.models(job.as_ref(), query.final_only, limit))
            .await;
    match listed {
        Ok(Ok(models)) => Json(serde_json::json!({ "models": models })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn learn_submit(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let spec = match json_body::<openagi_learning::federation::JobSpec>(body) {
        Ok(value) => value,
        Err(response) => return response,
    };
    if let Err(e) = spec.validate() {
        return error(StatusCode::BAD_REQUEST, format!("job spec: {e}"));
    }
    if state.consensus().is_none() {
        return error(
            StatusCode::CONFLICT,
            "this node is not a validator; submit the job through a validator of the network",
        );
    }
    match state.learner.submit_job(spec).await {
        Ok(job) => Json(serde_json::json!({ "job_id": job.to_hex(), "status": "submitted" }))
            .into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")),
    }
}

/// Query of `GET /api/v1/learn/jobs/{job}/model`.
#[derive(Debug, Deserialize)]
pub struct ModelQuery {
    /// The round whose resulting model is wanted (0: the initial model;
    /// absent: the latest).
    pub round: Option<u64>,
}

async fn learn_model(
    State(state): State<Arc<ApiState>>,
    job: Result<Path<String>, PathRejection>,
    query: Result<Query<ModelQuery>, QueryRejection>,
) -> Response {
    let (job, query) = match (path_of(job), query_of(query)) {
        (Ok(job), Ok(query)) => (job, query),
        (Err(refused), _) | (_, Err(refused)) => return refused,
    };
    let job = match openagi_learning::federation::JobId::from_hex(&job) {
        Ok(j) => j,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match state.learner.export(&job, query.round).await {
        Ok((id, bytes)) => (
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "application/octet-stream".to_string(),
                ),
                (
                    axum::http::header::HeaderName::from_static("x-openagi-model-id"),
                    id.to_hex(),
                ),
                // A browser (the dashboard's lineage links) saves it.
                (
                    axum::http::header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"model-{}.f32le\"", id.to_hex()),
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, format!("{e:#}")),
    }
}
