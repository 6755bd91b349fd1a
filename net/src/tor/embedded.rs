//! Embedded Tor: arti inside the process.
//!
//! The client is created unbootstrapped so that start-up never blocks on
//! the Tor network; a task bootstraps it (retrying with backoff while Tor
//! is unreachable, and saying so) and mirrors progress into [`TorState`]
//! and the metrics. The onion service is launched at once; its key lives
//! in arti's keystore under the node's Tor directory, so the address
//! survives restarts, and the directory cache next to it makes restarts
//! fast.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arti_client::config::{CfgPath, TorClientConfigBuilder};
use arti_client::{BootstrapBehavior, IsolationToken, StreamPrefs, TorClient};
use futures::StreamExt;
use futures::future::BoxFuture;
use safelog::DisplayRedacted as _;
use tokio::sync::mpsc;
use tor_cell::relaycell::msg::{Connected, End};
use tor_hsservice::{HsNickname, RendRequest, StreamRequest};
use tor_proto::stream::IncomingStreamRequest;
use tor_rtcompat::PreferredRuntime;
use tracing::{debug, info, warn};

use super::transport::{Backend, BoxedIo, Started, TokenCache};
use super::{ONION_SERVICE_NICKNAME, TorError, TorMetrics, TorSettings, TorState, keys};
use crate::{Backoff, Error};

/// Incoming streams waiting for the swarm to pick them up. Beyond this the
/// service refuses new streams rather than queueing without bound.
const INCOMING_CAPACITY: usize = 32;

struct ArtiBackend {
    client: Arc<TorClient<PreferredRuntime>>,
    tokens: Mutex<TokenCache<IsolationToken>>,
}

impl Backend for ArtiBackend {
    fn dial(
        &self,
        host: String,
        port: u16,
        isolation: String,
    ) -> BoxFuture<'static, Result<BoxedIo, TorError>> {
        let token = match self.tokens.lock() {
            Ok(mut t) => t.get(&isolation, IsolationToken::new),
            Err(p) => p.into_inner().get(&isolation, IsolationToken::new),
        };
        let client = self.client.clone();
        Box::pin(async move {
            let mut prefs = StreamPrefs::new();
            prefs.connect_to_onion_services(arti_client::config::BoolOrAuto::Explicit(true));
            prefs.set_isolation(token);
            let stream = client
                .connect_with_prefs((host, port), &prefs)
                .await
                .map_err(|e| TorError::Stream(e.to_string()))?;
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}

/// Builds arti's configuration: the operator's arti file (if any) first,
/// then the node's own storage locations on top.
fn client_config(settings: &TorSettings) -> Result<arti_client::TorClientConfig, Error> {
    let mut builder = match &settings.arti_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("tor.arti_config {}: {e}", path.display())))?;
            toml::from_str::<TorClientConfigBuilder>(&text).map_err(|e| {
                Error::Config(format!(
                    "tor.arti_config {} is not an arti client configuration: {e}",
                    path.display()
                ))
            })?
        }
        None => TorClientConfigBuilder::default(),
    };
    builder
        .storage()
        .cache_dir(CfgPath::new_literal(settings.arti_cache_dir()))
        .state_dir(CfgPath::new_literal(settings.arti_state_dir()));
    builder
        .stream_timeouts()
        .connect_timeout(settings.connect_timeout);
    builder
        .build()
        .map_err(|e| Error::Config(format!("arti configuration: {e}")))
}

pub(super) fn start(
    settings: &TorSettings,
    state: TorState,
    metrics: TorMetrics,
) -> Result<Started, Error> {
    // arti's TLS (rustls) needs a process-wide crypto provider; another
    // component may have installed the same one already, which is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = client_config(settings)?;
    let runtime =
        PreferredRuntime::current().map_err(|e| Error::Setup(format!("tor runtime: {e}")))?;
    let client = TorClient::with_runtime(runtime)
        .config(config)
        .bootstrap_behavior(BootstrapBehavior::OnDemand)
        .create_unbootstrapped()
        .map_err(|e| Error::Setup(format!("tor client: {e}")))?;

    let nickname = HsNickname::new(ONION_SERVICE_NICKNAME.to_string())
        .map_err(|e| Error::Setup(format!("onion service nickname: {e}")))?;
    let service_config = tor_hsservice::config::OnionServiceConfigBuilder::default()
        .nickname(nickname)
        .build()
        .map_err(|e| Error::Setup(format!("onion service configuration: {e}")))?;
    let (service, rend_requests) = client
        .launch_onion_service(service_config)
        .map_err(|e| Error::Setup(format!("onion service: {e}")))?
        .ok_or_else(|| Error::Setup("onion service disabled".into()))?;
    let hsid = service
        .onion_address()
        .ok_or_else(|| Error::Setup("onion service has no key".into()))?;
    let host = hsid.display_unredacted().to_string();
    let listen = keys::onion_multiaddr(&host, settings.onion_port)
        .ok_or_else(|| Error::Setup(format!("arti returned an unusable onion address {host}")))?;
    info!(onion = %host, port = settings.onion_port, "onion service launched (embedded Tor)");

    tokio::spawn(bootstrap_task(
        client.clone(),
        state.clone(),
        metrics.clone(),
        settings.bootstrap_warn_after,
    ));
    {
        let state = state.clone();
        let metrics = metrics.clone();
        let mut events = service.status_events();
        let service = service.clone();
        tokio::spawn(async move {
            // Keep the service alive as long as its status is watched.
            let _service = service;
            while let Some(status) = events.next().await {
                let name = format!("{:?}", status.state()).to_ascii_lowercase();
                let up = matches!(
                    status.state(),
                    tor_hsservice::status::State::Running
                        | tor_hsservice::status::State::DegradedReachable
                );
                metrics.onion_service_up.set(i64::from(up));
                let problem = status.current_problem().map(|p| format!("{p:?}"));
                debug!(state = %name, ?problem, "onion service state");
                state.update(|s| {
                    s.onion_service = name;
                    if let Some(p) = problem {
                        s.last_error = Some(p);
                    }
                });
            }
        });
    }
    let (tx, rx) = mpsc::channel(INCOMING_CAPACITY);
    tokio::spawn(accept_task(rend_requests, settings.onion_port, tx));

    let backend = ArtiBackend {
        client,
        tokens: Mutex::new(TokenCache::new()),
    };
    Ok((Arc::new(backend), listen, rx))
}

async fn accept_task(
    rend_requests: impl futures::Stream<Item = RendRequest> + Send + 'static,
    port: u16,
    tx: mpsc::Sender<BoxedIo>,
) {
    let streams = tor_hsservice::handle_rend_requests(rend_requests);
    futures::pin_mut!(streams);
    while let Some(request) = streams.next().await {
        if tx.is_closed() {
            // The swarm is gone: stop accepting.
            break;
        }
        // Each accept waits for a round trip; do not let one slow client
        // hold up the others.
        tokio::spawn(accept_one(request, port, tx.clone()));
    }
}

async fn accept_one(request: StreamRequest, port: u16, tx: mpsc::Sender<BoxedIo>) {
    let wanted = matches!(request.request(), IncomingStreamRequest::Begin(b) if b.port() == port);
    if !wanted || tx.capacity() == 0 {
        // Same answer for a wrong port and a full queue, so the service
        // does not tell probers which it was.
        let _ = request.reject(End::new_misc()).await;
        return;
    }
    match request.accept(Connected::new_empty()).await {
        Ok(stream) => {
            if tx.try_send(Box::new(stream)).is_err() {
                debug!("incoming onion stream dropped: queue full");
            }
        }
        Err(e) => debug!(error = %e, "accepting an onion stream failed"),
    }
}

async fn bootstrap_task(
    client: Arc<TorClient<PreferredRuntime>>,
    state: TorState,
    metrics: TorMetrics,
    warn_after: Duration,
) {
    let started = Instant::now();
    {
        let state = state.clone();
        let metrics = metrics.clone();
        let mut events = client.bootstrap_events();
        tokio::spawn(async move {
            let mut last_percent = 255u8;
            while let Some(status) = events.next().await {
                let frac = f64::from(status.as_frac()).clamp(0.0, 1.0);
                let percent = (frac * 100.0).round() as u8;
                let ready = status.ready_for_traffic();
                metrics.set_bootstrap(frac, ready);
                let summary = status.to_string();
                if percent / 10 != last_percent / 10 || ready {
                    info!(percent, %summary, "tor bootstrap");
                    last_percent = percent;
                }
                state.update(|s| {
                    s.bootstrap_percent = percent;
                    s.bootstrapped = ready;
                    s.bootstrap_summary = summary;
                });
            }
        });
    }
    let backoff = Backoff {
        initial: Duration::from_secs(2),
        max: Duration::from_secs(60),
    };
    let mut attempt = 0u32;
    loop {
        let warn_timer = tokio::time::sleep(warn_after);
        tokio::pin!(warn_timer);
        let bootstrap = client.bootstrap();
        tokio::pin!(bootstrap);
        let result = loop {
            tokio::select! {
                r = &mut bootstrap => break r,
                () = &mut warn_timer => {
                    let s = state.get();
                    warn!(
                        percent = s.bootstrap_percent,
                        summary = %s.bootstrap_summary,
                        "Tor is not bootstrapped after {}s; peers stay unreachable until it is (no direct fallback)",
                        started.elapsed().as_secs()
                    );
                    warn_timer.as_mut().reset(tokio::time::Instant::now() + warn_after);
                }
            }
        };
        match result {
            Ok(()) => {
                let took = started.elapsed();
                metrics.bootstrap_seconds.set(took.as_secs_f64());
                metrics.set_bootstrap(1.0, true);
                state.update(|s| {
                    s.bootstrapped = true;
                    s.bootstrap_percent = 100;
                    s.last_error = None;
                });
                info!(seconds = took.as_secs_f64(), "Tor bootstrapped");
                return;
            }
            Err(e) => {
                let delay = backoff.delay(attempt, rand::random::<f64>());
                attempt = attempt.saturating_add(1);
                warn!(error = %e, retry_in_secs = delay.as_secs(), "Tor bootstrap failed; retrying (no direct fallback)");
                state.update(|s| s.last_error = Some(format!("bootstrap: {e}")));
                tokio::time::sleep(delay).await;
            }
        }
    }
}
