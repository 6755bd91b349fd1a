//! The web dashboard's server side: the page at `/`, its login, its data
//! and its live event stream, and the sampler that keeps the metric
//! history and evaluates the alert rules.
//!
//! Access works the way Jupyter's does: `openagi dashboard` (with the API
//! token) asks for a one-time login code and prints a URL with it; the
//! browser trades the code at `/login` for a session cookie that scripts
//! cannot read (`HttpOnly`) and other sites cannot send (`SameSite=Strict`).
//! A session reads (GET) the page, its data and the `/api/v1` read
//! routes; it never writes. The token itself never reaches a page.
//!
//! Everything is bounded: [`MAX_LOGIN_CODES`] codes alive for
//! [`LOGIN_CODE_TTL`], [`MAX_SESSIONS`] sessions for [`SESSION_TTL`], and
//! [`MAX_EVENT_STREAMS`] live streams at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use openagi_dashboard::alerts::{AlertEngine, AlertEvent};
use openagi_dashboard::history::{FINE_POINTS, History, SAMPLE_INTERVAL_MS};
use openagi_dashboard::sample::Snapshot;
use openagi_dashboard::web;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::daemon::api::ApiState;

/// Prefix of the session cookie's name; the API port follows, because
/// browsers share cookies across the ports of one host (two nodes on one
/// machine must not overwrite or read each other's sessions).
pub const SESSION_COOKIE: &str = "openagi_session";

/// The session cookie's name for the API listening on `api_addr`.
pub fn session_cookie_name(api_addr: &str) -> String {
    let port = api_addr.rsplit(':').next().unwrap_or_default();
    format!("{SESSION_COOKIE}_{port}")
}
/// How long a login code may wait to be used.
pub const LOGIN_CODE_TTL: Duration = Duration::from_secs(300);
/// Login codes alive at once (the oldest goes first).
pub const MAX_LOGIN_CODES: usize = 16;
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions alive at once (the oldest goes first).
pub const MAX_SESSIONS: usize = 64;
/// Live event streams at once; more are refused with 503.
pub const MAX_EVENT_STREAMS: usize = 16;
/// How often a live stream sends an update.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabel {
    alert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertEventLabel {
    alert: String,
    event: String,
}

struct Inner {
    history: History,
    alerts: AlertEngine,
    codes: HashMap<String, Instant>,
    sessions: HashMap<String, Instant>,
}

/// The dashboard's state in the daemon.
pub struct Dashboard {
    inner: Mutex<Inner>,
    cookie_name: String,
    streams: Arc<Semaphore>,
    firing: Family<AlertLabel, Gauge>,
    events: Family<AlertEventLabel, Counter>,
    disk_available: Gauge,
}

fn random_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    openagi_crypto::os_random(&mut bytes).map_err(std::io::Error::other)?;
    Ok(hex::encode(bytes))
}

/// Drops expired entries, then the oldest while more than `max - 1`
/// remain, so one more fits.
fn make_room(map: &mut HashMap<String, Instant>, ttl: Duration, max: usize) {
    map.retain(|_, at| at.elapsed() < ttl);
    while map.len() >= max {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
    }
}

impl Dashboard {
    /// A dashboard with an empty history; registers
    /// `openagi_alerts_firing{alert}` and
    /// `openagi_alert_events_total{alert,event}`.
    pub fn new(registry: &mut Registry, api_addr: &str) -> Arc<Self> {
        let firing = Family::<AlertLabel, Gauge>::default();
        let events = Family::<AlertEventLabel, Counter>::default();
        registry.register(
            "alerts_firing",
            "Whether each alert rule the node evaluates is firing (1) or not (0)",
            firing.clone(),
        );
        registry.register(
            "alert_events",
            "Alerts fired and resolved, by rule",
            events.clone(),
        );
        let disk_available = Gauge::default();
        registry.register_with_unit(
            "data_dir_available",
            "Space available to the daemon on the data directory's file system",
            prometheus_client::registry::Unit::Bytes,
            disk_available.clone(),
        );
        for rule in openagi_dashboard::alerts::RULES
            .iter()
            .filter(|r| r.evaluated_by_node())
        {
            firing
                .get_or_create(&AlertLabel {
                    alert: rule.name.into(),
                })
                .set(0);
            for event in ["fired", "resolved"] {
                let _ = events.get_or_create(&AlertEventLabel {
                    alert: rule.name.into(),
                    event: event.into(),
                });
            }
        }
        Arc::new(Self {
            cookie_name: session_cookie_name(api_addr),
            inner: Mutex::new(Inner {
                history: History::new(),
                alerts: AlertEngine::new(),
                codes: HashMap::new(),
                sessions: HashMap::new(),
            }),
            streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
            firing,
            events,
            disk_available,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A fresh one-time login code.
    pub fn login_code(&self) -> std::io::Result<String> {
        let code = random_secret()?;
        let mut inner = self.inner();
        make_room(&mut inner.codes, LOGIN_CODE_TTL, MAX_LOGIN_CODES);
        inner.codes.insert(code.clone(), Instant::now());
        Ok(code)
    }

    /// Trades a login code (once) for a new session id.
    fn redeem(&self, code: &str) -> Option<String> {
        let mut inner = self.inner();
        let issued = inner.codes.remove(code)?;
        if issued.elapsed() >= LOGIN_CODE_TTL {
            return None;
        }
        let session = random_secret().ok()?;
        make_room(&mut inner.sessions, SESSION_TTL, MAX_SESSIONS);
        inner.sessions.insert(session.clone(), Instant::now());
        Some(session)
    }

    /// Whether the request's cookies carry a live session.
    pub fn has_session(&self, headers: &HeaderMap) -> bool {
        let Some(id) = session_cookie(headers, &self.cookie_name) else {
            return false;
        };
        let inner = self.inner();
        inner
            .sessions
            .get(id)
            .is_some_and(|at| at.elapsed() < SESSION_TTL)
    }

    /// Takes one sample of `metrics` at `now_ms`: the history and the
    /// alert rules see it; alert events are logged and counted.
    pub fn sample(&self, exposition: &str, now_ms: u64) {
        let snapshot = Snapshot::parse(exposition);
        let events: Vec<AlertEvent> = {
            let mut inner = self.inner();
            inner
                .history
                .record(now_ms, |spec| snapshot.sum(spec.metric, spec.labels));
            inner.alerts.handle_snapshot(now_ms, &snapshot);
            std::iter::from_fn(|| inner.alerts.poll_event()).collect()
        };
        for event in events {
            let label = AlertLabel {
                alert: event.alert.into(),
            };
            self.firing
                .get_or_create(&label)
                .set(i64::from(event.firing));
            self.events
                .get_or_create(&AlertEventLabel {
                    alert: event.alert.into(),
                    event: if event.firing { "fired" } else { "resolved" }.into(),
                })
                .inc();
            // Alerts are security-relevant as well as operational (auth
            // failure bursts, hostile peers, floods): the audit log keeps
            // each change, signed, beside the events that caused it.
            if event.firing {
                warn!(alert = event.alert, severity = ?event.severity, reason = %event.reason, "alert firing");
                warn!(target: "audit", event = "alert_fired", alert = event.alert, severity = ?event.severity, reason = %event.reason, "alert fired");
            } else {
                info!(alert = event.alert, reason = %event.reason, "alert resolved");
                info!(target: "audit", event = "alert_resolved", alert = event.alert, reason = %event.reason, "alert resolved");
            }
        }
    }

    fn alerts_json(&self) -> serde_json::Value {
        let inner = self.inner();
        serde_json::json!({
            "rules": inner.alerts.views(),
            "events": inner.alerts.events().collect::<Vec<_>>(),
        })
    }
}

fn session_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
}

/// Samples the node's metrics every [`SAMPLE_INTERVAL_MS`] until the
/// daemon drains.
pub fn spawn_sampler(state: Arc<ApiState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(SAMPLE_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            // Free space first, so this sample's rules see it.
            if let Ok(fs) = nix::sys::statvfs::statvfs(state.data_dir.path()) {
                let bytes = fs.blocks_available().saturating_mul(fs.fragment_size());
                state
                    .dashboard
                    .disk_available
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
            match state.metrics.encode() {
                Ok(text) => state.dashboard.sample(&text, crate::unix_ms()),
                Err(e) => warn!(error = %e, "dashboard: could not read the metrics"),
            }
        }
    })
}

/// Headers every dashboard response carries.
fn protect(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(web::CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The login URL carries a code: never send it on as a Referer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn not_logged_in() -> Response {
    protect(
        (
            StatusCode::UNAUTHORIZED,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            "Not logged in. Run `openagi dashboard --data-dir <dir>` on this machine and open the URL it prints.\n",
        )
            .into_response(),
    )
}

/// The dashboard's routes (merged into the API router).
pub fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/", get(page))
        .route("/login", get(login))
        .route("/dashboard/app.js", get(asset))
        .route("/dashboard/app.css", get(asset))
        // Browsers ask for it on any page, the refusal included.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/dashboard/api/state", get(state_json))
        .route("/dashboard/api/events", get(events))
        .route("/dashboard/api/bench", get(bench_runs))
}

async fn page(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !state.dashboard.has_session(&headers) {
        return not_logged_in();
    }
    protect(
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            web::INDEX_HTML,
        )
            .into_response(),
    )
}

async fn asset(request: Request) -> Response {
    match web::asset(request.uri().path()) {
        Some((body, content_type)) => protect(
            (
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
                .into_response(),
        ),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Query of `/login`.
#[derive(Debug, Deserialize)]
struct LoginQuery {
    code: String,
}

async fn login(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return not_logged_in();
    };
    let Some(session) = state.dashboard.redeem(query.code.trim()) else {
        return protect(
            (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "This login link was used already or has expired. Run `openagi dashboard` for a new one.\n",
            )
                .into_response(),
        );
    };
    let cookie = format!(
        "{}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        state.dashboard.cookie_name,
        SESSION_TTL.as_secs()
    );
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    protect(response)
}

/// Whether the request may read dashboard data: a session, or the API
/// token (for tools).
fn may_read(state: &ApiState, headers: &HeaderMap) -> bool {
    state.dashboard.has_session(headers) || crate::daemon::api::bearer_ok(state, headers)
}

/// The latency of commits in the last minute.
fn latency_json(state: &ApiState) -> serde_json::Value {
    match state.consensus() {
        Some(c) => serde_json::to_value(c.latency(crate::unix_ms().saturating_sub(60_000)))
            .unwrap_or(serde_json::Value::Null),
        None => serde_json::Value::Null,
    }
}

/// What changes between updates: status, peers, jobs, alerts, latency.
fn live_fields(state: &ApiState) -> serde_json::Map<String, serde_json::Value> {
    let snapshot = state.net.snapshot();
    let jobs = state.learner.jobs().unwrap_or_default();
    let mut map = serde_json::Map::new();
    map.insert(
        "status".into(),
        serde_json::to_value(state.status()).unwrap_or_default(),
    );
    map.insert(
        "peers".into(),
        serde_json::to_value(snapshot.peers.values().collect::<Vec<_>>()).unwrap_or_default(),
    );
    map.insert(
        "connection_events".into(),
        serde_json::to_value(&snapshot.connection_events).unwrap_or_default(),
    );
    map.insert(
        "jobs".into(),
        serde_json::to_value(jobs).unwrap_or_default(),
    );
    map.insert("alerts".into(), state.dashboard.alerts_json());
    map.insert("latency".into(), latency_json(state));
    map.insert("now_ms".into(), crate::unix_ms().into());
    map.insert("fine_points".into(), FINE_POINTS.into());
    map
}

async fn state_json(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !may_read(&state, &headers) {
        return not_logged_in();
    }
    let mut doc = live_fields(&state);
    let history = state.dashboard.inner().history.views();
    doc.insert(
        "history".into(),
        serde_json::to_value(history).unwrap_or_default(),
    );
    let mut response = Json(serde_json::Value::Object(doc)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    protect(response)
}

/// The benchmark runs recorded in this node's data directory.
async fn bench_runs(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !may_read(&state, &headers) {
        return not_logged_in();
    }
    let dir = state.data_dir.clone();
    let runs = tokio::task::spawn_blocking(move || crate::common::bench_log::recent(&dir))
        .await
        .unwrap_or_default();
    protect(Json(serde_json::json!({ "runs": runs })).into_response())
}

async fn events(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !may_read(&state, &headers) {
        return not_logged_in();
    }
    let Ok(permit) = state.dashboard.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("at most {MAX_EVENT_STREAMS} live dashboards at once\n"),
        )
            .into_response();
    };
    let tick = tokio::time::interval(EVENT_INTERVAL);
    let stream = futures::stream::unfold(
        (state, tick, permit),
        |(state, mut tick, permit)| async move {
            tick.tick().await;
            if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            let mut doc = live_fields(&state);
            let points = state.dashboard.inner().history.latest_points();
            doc.insert(
                "points".into(),
                serde_json::to_value(points).unwrap_or_default(),
            );
            let event = Event::default()
                .json_data(serde_json::Value::Object(doc))
                .unwrap_or_default();
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (state, tick, permit),
            ))
        },
    );
    protect(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_codes_work_once_and_sessions_are_bounded() {
        let mut registry = Registry::default();
        let d = Dashboard::new(&mut registry, "127.0.0.1:4611");
        let code = d.login_code().expect("code");
        let session = d.redeem(&code).expect("session");
        assert!(d.redeem(&code).is_none(), "a code works once");
        assert!(d.redeem("not-a-code").is_none());
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {SESSION_COOKIE}_4611={session}"))
                .expect("header"),
        );
        assert!(d.has_session(&headers));
        for _ in 0..MAX_SESSIONS {
            let code = d.login_code().expect("code");
            d.redeem(&code).expect("session");
        }
        assert!(d.inner().sessions.len() <= MAX_SESSIONS);
        assert!(!d.has_session(&headers), "the oldest session made room");
        for _ in 0..3 * MAX_LOGIN_CODES {
            d.login_code().expect("code");
        }
        assert!(d.inner().codes.len() <= MAX_LOGIN_CODES);
    }
}
