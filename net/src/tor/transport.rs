//! The libp2p transport over onion streams, shared by both back ends.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Ready};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::{Multiaddr, Transport};
use tokio::sync::mpsc;
use tracing::debug;

use super::keys::parse_onion_multiaddr;
use super::{TorError, TorMetrics};

/// A byte stream through Tor, whatever back end made it.
pub(crate) trait TorIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TorIo for T {}

/// A boxed Tor byte stream.
pub(crate) type BoxedIo = Box<dyn TorIo>;

/// What a started back end hands the transport: itself, the node's onion
/// multiaddr, and the queue of inbound streams.
pub(crate) type Started = (Arc<dyn Backend>, Multiaddr, mpsc::Receiver<BoxedIo>);

/// How the transport asks a back end for a stream.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Opens a stream to `host` (`<56 chars>.onion`) port `port`, on
    /// circuits reserved for `isolation`.
    fn dial(
        &self,
        host: String,
        port: u16,
        isolation: String,
    ) -> BoxFuture<'static, Result<BoxedIo, TorError>>;
}

/// Per-peer isolation keys, renewed every rotation period so that new
/// streams to a long-known peer get fresh circuits.
pub(crate) struct Isolation {
    rotation: Duration,
    epoch_started: Instant,
    epoch: u64,
}

impl Isolation {
    pub(crate) fn new(rotation: Duration) -> Self {
        Self {
            rotation,
            epoch_started: Instant::now(),
            epoch: 0,
        }
    }

    /// The isolation key for `host` now.
    pub(crate) fn key(&mut self, host: &str) -> (String, u64) {
        self.key_at(host, Instant::now())
    }

    /// The isolation key for `host` at `now`.
    fn key_at(&mut self, host: &str, now: Instant) -> (String, u64) {
        if !self.rotation.is_zero()
            && now.saturating_duration_since(self.epoch_started) >= self.rotation
        {
            self.epoch += 1;
            self.epoch_started = now;
        }
        (host.to_string(), self.epoch)
    }
}

/// Maps isolation keys to back-end tokens. Keys carry the rotation epoch,
/// so old entries are never used again; the map is simply started afresh
/// when it is full.
#[cfg(feature = "tor")]
pub(crate) struct TokenCache<T> {
    tokens: std::collections::HashMap<String, T>,
}

#[cfg(feature = "tor")]
impl<T: Clone> TokenCache<T> {
    /// Most keys remembered; clearing only means peers get new circuits.
    const MAX: usize = 4096;

    pub(crate) fn new() -> Self {
        Self {
            tokens: std::collections::HashMap::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &str, make: impl FnOnce() -> T) -> T {
        if self.tokens.len() >= Self::MAX && !self.tokens.contains_key(key) {
            self.tokens.clear();
        }
        self.tokens
            .entry(key.to_string())
            .or_insert_with(make)
            .clone()
    }
}

/// A libp2p transport whose connections are onion streams.
pub(crate) struct OnionTransport {
    backend: Arc<dyn Backend>,
    isolation: Arc<Mutex<Isolation>>,
    metrics: TorMetrics,
    local: Multiaddr,
    incoming: Option<mpsc::Receiver<BoxedIo>>,
    listener: Option<ListenerId>,
    events: VecDeque<TransportEvent<Ready<Result<TorStream, TorError>>, TorError>>,
    waker: Option<Waker>,
    connect_timeout: Duration,
}

impl OnionTransport {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        metrics: TorMetrics,
        local: Multiaddr,
        incoming: mpsc::Receiver<BoxedIo>,
        connect_timeout: Duration,
        rotation: Duration,
    ) -> Self {
        Self {
            backend,
            isolation: Arc::new(Mutex::new(Isolation::new(rotation))),
            metrics,
            local,
            incoming: Some(incoming),
            listener: None,
            events: VecDeque::new(),
            waker: None,
            connect_timeout,
        }
    }

    fn push(&mut self, event: TransportEvent<Ready<Result<TorStream, TorError>>, TorError>) {
        self.events.push_back(event);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

fn same_onion(a: &Multiaddr, b: &Multiaddr) -> bool {
    match (parse_onion_multiaddr(a), parse_onion_multiaddr(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

impl Transport for OnionTransport {
    type Output = TorStream;
    type Error = TorError;
    type ListenerUpgrade = Ready<Result<TorStream, TorError>>;
    type Dial = BoxFuture<'static, Result<TorStream, TorError>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        // The only address this transport can listen on is the node's own
        // onion service, and only once.
        if !same_onion(&addr, &self.local) || self.listener.is_some() || self.incoming.is_none() {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.listener = Some(id);
        let listen_addr = self.local.clone();
        self.push(TransportEvent::NewAddress {
            listener_id: id,
            listen_addr,
        });
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        if self.listener != Some(id) {
            return false;
        }
        self.listener = None;
        self.incoming = None;
        self.push(TransportEvent::ListenerClosed {
            listener_id: id,
            reason: Ok(()),
        });
        true
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some((host, port)) = parse_onion_multiaddr(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let (key, epoch) = match self.isolation.lock() {
            Ok(mut iso) => iso.key(&host),
            Err(p) => p.into_inner().key(&host),
        };
        let isolation = format!("{key}#{epoch}");
        let backend = self.backend.clone();
        let metrics = self.metrics.clone();
        let timeout = self.connect_timeout;
        Ok(async move {
            let started = Instant::now();
            let result =
                tokio::time::timeout(timeout, backend.dial(host.clone(), port, isolation)).await;
            let outcome = match result {
                Ok(Ok(io)) => {
                    metrics.record_dial(true, started.elapsed());
                    debug!(onion = %host, ms = started.elapsed().as_millis(), "onion stream open");
                    return Ok(TorStream::new(io, metrics));
                }
                Ok(Err(e)) => e,
                Err(_) => TorError::Timeout(timeout),
            };
            metrics.record_dial(false, started.elapsed());
            debug!(onion = %host, error = %outcome, "onion dial failed");
            Err(outcome)
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        if let Some(event) = self.events.pop_front() {
            return Poll::Ready(event);
        }
        if let (Some(id), Some(rx)) = (self.listener, self.incoming.as_mut()) {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(io)) => {
                    let stream = TorStream::new(io, self.metrics.clone());
                    self.metrics.inbound_streams.inc();
                    let local_addr = self.local.clone();
                    // Inbound onion streams carry no address of the
                    // dialer. The node's own onion address stands in for
                    // it: never an IP address (which would make every
                    // Tor peer look like one host, 127.0.0.1, to
                    // gossipsub's IP colocation scoring), so limits and
                    // scores key on peer ids only.
                    let send_back_addr = self.local.clone();
                    return Poll::Ready(TransportEvent::Incoming {
                        listener_id: id,
                        upgrade: futures::future::ready(Ok(stream)),
                        local_addr,
                        send_back_addr,
                    });
                }
                Poll::Ready(None) => {
                    self.listener = None;
                    self.incoming = None;
                    return Poll::Ready(TransportEvent::ListenerClosed {
                        listener_id: id,
                        reason: Err(TorError::Unavailable("the onion service stopped".into())),
                    });
                }
                Poll::Pending => {}
            }
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A Tor stream that counts the bytes it carries.
pub(crate) struct TorStream {
    inner: BoxedIo,
    metrics: TorMetrics,
}

impl TorStream {
    fn new(inner: BoxedIo, metrics: TorMetrics) -> Self {
        Self { inner, metrics }
    }
}

impl AsyncRead for TorStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.metrics.bytes_in.inc_by(*n as u64);
        }
        r
    }
}

impl AsyncWrite for TorStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.metrics.bytes_out.inc_by(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Driven by explicit instants: the rotation depends on time passing,
    /// not on how fast the test runs.
    #[test]
    fn isolation_is_per_host_and_rotates() {
        let rotation = Duration::from_secs(600);
        let mut iso = Isolation::new(rotation);
        let t0 = iso.epoch_started;
        let key = |host: &str, epoch: u64| (host.to_string(), epoch);
        assert_eq!(iso.key_at("a.onion", t0), key("a.onion", 0));
        assert_eq!(iso.key_at("b.onion", t0), key("b.onion", 0));
        let almost = t0 + rotation - Duration::from_millis(1);
        assert_eq!(iso.key_at("a.onion", almost), key("a.onion", 0));
        // The epoch turns once the rotation period has passed, and the
        // next period counts from then.
        let t1 = t0 + rotation;
        assert_eq!(iso.key_at("a.onion", t1), key("a.onion", 1));
        assert_eq!(iso.key_at("b.onion", t1), key("b.onion", 1));
        assert_eq!(iso.key_at("a.onion", t1 + rotation / 2), key("a.onion", 1));
        assert_eq!(iso.key_at("a.onion", t1 + rotation), key("a.onion", 2));
        // A clock that reads earlier than the epoch start changes nothing.
        assert_eq!(iso.key_at("a.onion", t0), key("a.onion", 2));

        let mut never = Isolation::new(Duration::ZERO);
        let start = never.epoch_started;
        assert_eq!(never.key_at("a.onion", start), key("a.onion", 0));
        let much_later = start + Duration::from_secs(1_000_000);
        assert_eq!(never.key_at("a.onion", much_later), key("a.onion", 0));
    }
}
