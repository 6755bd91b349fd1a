//! The local API's HTTP server: axum's router on hyper, with the limits
//! `axum::serve` does not set.
//!
//! Any local user can connect to the API port, and the process shares its
//! file descriptors with libp2p and redb, so connections are capped
//! ([`MAX_API_CONNECTIONS`]; further clients wait in the listen backlog),
//! a client has [`HEADER_READ_TIMEOUT`] to send its request line and
//! headers (a slowloris client is cut off), and [`BODY_READ_TIMEOUT`] for
//! its body (answered 408). A declared `Content-Length` over
//! [`MAX_API_BODY`] is refused with 413 before the body is read; routes
//! set smaller limits of their own.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Connections served at once; more wait in the kernel's listen backlog.
/// The CLI, Prometheus and a dashboard need a handful; this leaves room
/// for many while keeping far below the process's file-descriptor limit.
pub const MAX_API_CONNECTIONS: usize = 256;

/// Time a client has to send a request's line and headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to send a request's body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request body any route accepts (the transaction batch route);
/// a declared length over it is refused before anything is read.
pub const MAX_API_BODY: u64 = 64 * 1024 * 1024;

/// Serves `router` on `listener` until `shutdown` resolves, then lets the
/// connections in progress finish their current request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let router = router.layer(axum::middleware::from_fn(bounded_body));
    let permits = Arc::new(Semaphore::new(MAX_API_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of
                    // spinning, and keep serving those already connected.
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

/// Refuses a declared body over [`MAX_API_BODY`] at once (413) and gives
/// the body [`BODY_READ_TIMEOUT`] to arrive: a body still arriving then
/// fails its extractor, which answers 408.
async fn bounded_body(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_API_BODY) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_API_BODY} bytes"),
        )
            .into_response();
    }
    let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
    let (parts, body) = request.into_parts();
    let chunks = body.into_data_stream();
    let timed = futures::stream::unfold(Some(chunks), move |state| async move {
        let mut chunks = state?;
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(chunks))),
            Ok(Some(Err(e))) => Some((Err(BodyError::Read(e.to_string())), None)),
            Ok(None) => None,
            Err(_) => Some((Err(BodyError::TimedOut), None)),
        }
    });
    next.run(Request::from_parts(parts, Body::from_stream(timed)))
        .await
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body not received within {} s", BODY_READ_TIMEOUT.as_secs())]
    TimedOut,
    #[error("reading the request body: {0}")]
    Read(String),
}

/// The status for a body extractor's rejection: 413 when the body was too
/// large, 408 when it came too slowly, 400 otherwise.
pub fn rejection_status(status: StatusCode, text: &str) -> StatusCode {
    if text.contains("not received within") {
        StatusCode::REQUEST_TIMEOUT
    } else {
        status
    }
}

/// Convenience for handlers: `(status, message)` of a JSON body rejection.
pub fn json_rejection(e: &axum::extract::rejection::JsonRejection) -> (StatusCode, String) {
    let text = e.body_text();
    (rejection_status(e.status(), &text), text)
}
