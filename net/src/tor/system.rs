//! System tor: dials through tor's SOCKS5 port, hosts the onion service
//! through its ControlPort.
//!
//! The onion key is the node's own (see `keys`), so the address is known
//! before tor is reachable and stays the same across restarts of either
//! process. The service is added without `Detach`: it lives exactly as
//! long as our control connection, and a supervisor task reconnects with
//! backoff and adds it again whenever the connection drops (tor restarted,
//! crashed, or was not running yet).
//!
//! Inbound streams arrive from tor on a listener bound to an ephemeral
//! loopback port; SOCKS dials use the peer's isolation key as the SOCKS
//! username so that tor (IsolateSOCKSAuth, on by default) puts every peer
//! on its own circuits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tracing::{debug, info, warn};

use super::control::{Control, parse_bootstrap};
use super::keys::{self, SystemKey};
use super::transport::{Backend, BoxedIo, Started};
use super::{TorError, TorMetrics, TorSettings, TorState};
use crate::{Backoff, Error};

/// Incoming streams waiting for the swarm.
const INCOMING_CAPACITY: usize = 32;
/// How often a live control connection is checked (and bootstrap polled).
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a new onion service waits, once tor is bootstrapped, for its
/// first descriptor upload. Tor sometimes builds a descriptor and never
/// uploads it (seen on young test networks); the service is then added
/// again on a fresh control connection, which makes tor start over.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

struct SocksBackend {
    socks: SocketAddr,
}

impl Backend for SocksBackend {
    fn dial(
        &self,
        host: String,
        port: u16,
        isolation: String,
    ) -> BoxFuture<'static, Result<BoxedIo, TorError>> {
        let socks = self.socks;
        Box::pin(async move {
            // Usernames are limited to 255 bytes by RFC 1929; the key is an
            // onion host plus an epoch, well below.
            let stream = tokio_socks::tcp::Socks5Stream::connect_with_password(
                socks,
                (host.as_str(), port),
                &isolation,
                "openagi",
            )
            .await
            .map_err(|e| match e {
                tokio_socks::Error::Io(io) => {
                    TorError::Unavailable(format!("tor's SOCKS port {socks}: {io}"))
                }
                other => TorError::Stream(other.to_string()),
            })?;
            let tcp = stream.into_inner();
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(tcp.compat()) as BoxedIo)
        })
    }
}

pub(super) fn start(
    settings: &TorSettings,
    state: TorState,
    metrics: TorMetrics,
) -> Result<Started, Error> {
    let key = SystemKey::load_or_create(&settings.system_key_path())
        .map_err(|e| Error::Setup(format!("onion key: {e}")))?;
    let listen = keys::onion_multiaddr(&key.host, settings.onion_port)
        .ok_or_else(|| Error::Setup("onion address".into()))?;
    // The target tor forwards onion streams to. Bound now so a failure is a
    // start-up error, not a log line.
    let std_listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Error::Setup(format!("onion target listener: {e}")))?;
    let target = std_listener
        .local_addr()
        .map_err(|e| Error::Setup(format!("onion target listener: {e}")))?;
    let listener = TcpListener::from_std(std_listener)
        .map_err(|e| Error::Setup(format!("onion target listener: {e}")))?;
    let (tx, rx) = mpsc::channel(INCOMING_CAPACITY);
    tokio::spawn(accept_task(listener, tx));
    info!(onion = %key.host, port = settings.onion_port, %target, "onion service configured (system tor)");
    tokio::spawn(supervise(key, settings.clone(), target, state, metrics));
    Ok((
        Arc::new(SocksBackend {
            socks: settings.socks_addr,
        }),
        listen,
        rx,
    ))
}

async fn accept_task(listener: TcpListener, tx: mpsc::Sender<BoxedIo>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Only the local tor should connect here; anything else on
                // this host still has to pass Noise, but is not expected.
                if !peer.ip().is_loopback() {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                match tx.try_send(Box::new(stream.compat())) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        debug!("incoming onion stream dropped: queue full")
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            Err(e) => {
                warn!(error = %e, "onion target listener");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Keeps the onion service alive on the ControlPort: connect,
/// authenticate, `ADD_ONION`, watch; on any failure say so, back off and
/// start over.
async fn supervise(
    key: SystemKey,
    settings: TorSettings,
    target: SocketAddr,
    state: TorState,
    metrics: TorMetrics,
) {
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(30),
    };
    let started = Instant::now();
    let mut attempt = 0u32;
    let add_key = key.add_onion_key();
    loop {
        let result = session(
            &add_key,
            &key.host,
            &settings,
            target,
            &state,
            &metrics,
            started,
            &mut attempt,
        )
        .await;
        metrics.onion_service_up.set(0);
        let message = match result {
            Ok(()) => "control connection closed".to_string(),
            Err(e) => e.to_string(),
        };
        let delay = backoff.delay(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        warn!(
            control = %settings.control_addr,
            error = %message,
            retry_in_ms = delay.as_millis() as u64,
            "system tor unavailable; onion service down, retrying (no direct fallback)"
        );
        state.update(|s| {
            s.onion_service = "down".into();
            s.bootstrapped = false;
            s.last_error = Some(message);
        });
        metrics.set_bootstrap(0.0, false);
        tokio::time::sleep(delay).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    add_key: &str,
    host: &str,
    settings: &TorSettings,
    target: SocketAddr,
    state: &TorState,
    metrics: &TorMetrics,
    started: Instant,
    attempt: &mut u32,
) -> Result<(), TorError> {
    let connected = Control::connect(
        settings.control_addr,
        settings.control_password.as_deref(),
        settings.control_cookie_file.as_deref(),
    )
    .await;
    let outcome = if connected.is_ok() { "ok" } else { "error" };
    metrics
        .control_connects
        .get_or_create(&super::metrics::OutcomeLabels { outcome })
        .inc();
    let mut control = connected?;
    // Subscribed before the service exists, so its first upload is seen.
    control.set_events("HS_DESC").await?;
    let id = control
        .add_onion(add_key, settings.onion_port, target)
        .await?;
    if format!("{id}.onion") != host {
        return Err(TorError::Control(format!(
            "tor created {id}.onion, expected {host}"
        )));
    }
    *attempt = 0;
    info!(onion = %host, "onion service added on the ControlPort");
    // Dialable only once a descriptor is on the directories: a client that
    // looks it up earlier is refused, and tor does not ask those
    // directories again for 15 minutes. So the service counts as running
    // from its first upload.
    state.update(|s| {
        s.onion_service = "publishing".into();
        s.last_error = None;
    });
    let mut warned = false;
    // Every descriptor event for this service: uploads end the wait,
    // failures are reported (tor retries on its own schedule).
    let ours = |event: &str| {
        let mut words = event.split(' ');
        words.next() == Some("HS_DESC") && words.nth(1) == Some(id.as_str())
    };
    let mut uploaded = false;
    let publishing = Instant::now();
    // Tor publishes only once bootstrapped, so the wait counts from then.
    let mut give_up_at: Option<Instant> = None;
    while !uploaded {
        report_bootstrap(&mut control, settings, state, metrics, started, &mut warned).await?;
        if state.get().bootstrapped {
            let at = *give_up_at.get_or_insert_with(|| Instant::now() + PUBLISH_WAIT);
            if Instant::now() >= at {
                break;
            }
        }
        match control.wait_event(ours, HEALTH_INTERVAL).await? {
            Some(event) if event.split(' ').nth(1) == Some("UPLOADED") => uploaded = true,
            Some(event) if event.split(' ').nth(1) == Some("FAILED") => {
                warn!(onion = %host, %event, "onion service descriptor upload failed; tor retries");
            }
            Some(event) => debug!(onion = %host, %event, "onion service descriptor"),
            None => {}
        }
    }
    control.set_events("").await?;
    if !uploaded {
        return Err(TorError::Unavailable(format!(
            "tor did not upload the onion service descriptor within {} s of bootstrap; adding the service again",
            PUBLISH_WAIT.as_secs()
        )));
    }
    info!(onion = %host, seconds = publishing.elapsed().as_secs_f64(), "onion service descriptor published");
    state.update(|s| s.onion_service = "running".into());
    metrics.onion_service_up.set(1);
    loop {
        // Doubles as the liveness check of the control connection: a tor
        // that died or restarted fails this, and the service is re-added.
        report_bootstrap(&mut control, settings, state, metrics, started, &mut warned).await?;
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// Reads tor's bootstrap phase into the state and metrics.
async fn report_bootstrap(
    control: &mut Control,
    settings: &TorSettings,
    state: &TorState,
    metrics: &TorMetrics,
    started: Instant,
    warned: &mut bool,
) -> Result<(), TorError> {
    let phase = control.getinfo("status/bootstrap-phase").await?;
    let (percent, summary) = parse_bootstrap(&phase);
    let ready = percent >= 100;
    let was_ready = state.get().bootstrapped;
    metrics.set_bootstrap(f64::from(percent) / 100.0, ready);
    if ready && !was_ready {
        metrics
            .bootstrap_seconds
            .set(started.elapsed().as_secs_f64());
        info!(
            seconds = started.elapsed().as_secs_f64(),
            "system tor bootstrapped"
        );
    } else if !ready && !*warned && started.elapsed() >= settings.bootstrap_warn_after {
        warn!(percent, %summary, "system tor is not bootstrapped yet; peers stay unreachable until it is");
        *warned = true;
    } else {
        debug!(percent, %summary, "system tor bootstrap");
    }
    state.update(|s| {
        s.bootstrap_percent = percent;
        s.bootstrap_summary = summary;
        s.bootstrapped = ready;
    });
    Ok(())
}
