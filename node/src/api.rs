//! The local HTTP server: `/health`, `/metrics` and the authenticated
//! operator API under `/api/v1`.
//!
//! `/health` and `/metrics` are open so that load balancers and Prometheus
//! need no secret; everything under `/api/v1` needs
//! `Authorization: Bearer <token>` with the token from the data
//! directory's `api.token`. The server binds to loopback by default.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use openagi_dashboard::MetricsRegistry;
use openagi_net::NetHandle;
use serde::Serialize;

/// Shared state of the HTTP handlers.
pub struct ApiState {
    /// The network task.
    pub net: NetHandle,
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
        StatusDocument {
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

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    let authenticated = Router::new()
        .route("/status", get(status))
        .route("/peers", get(peers))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .nest("/api/v1", authenticated)
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

/// Compares in time independent of where the first difference is, so the
/// token cannot be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), state.token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => unauthorized("wrong token"),
        None => unauthorized(
            "missing `Authorization: Bearer <token>` header (the token is in the data directory's api.token)",
        ),
    }
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
