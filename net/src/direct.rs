//! `/openagi/direct/2`: opaque one-way messages straight to one peer.
//!
//! Consensus traffic goes to the validators that need it, not flooded over
//! gossip. A message is one stream: the sender writes it and closes, the
//! end of the stream delimits it, and the receiver closes its side once it
//! has read it (the acknowledgement: a stream dropped unread ends in a
//! reset, and the sender tries once more). The payload is
//! whatever the caller encoded (the node puts bundles of PBFT messages
//! here); this layer decides who may send, how much and how many at once.
//!
//! Who may open a stream is checked when it opens, before a byte of it is
//! read: only peers the node named with [`crate::NetHandle::allow_direct_from`]
//! (the validators). Anyone else's stream is reset at once and counted, so
//! a peer that merely speaks the network id cannot make a validator hold
//! memory. An allowed peer's streams are read one at a time, each at most
//! [`MAX_DIRECT_BYTES`] and [`DIRECT_READ_TIMEOUT`] long, with at most
//! [`MAX_QUEUED_STREAMS_PER_PEER`] more waiting.
//!
//! Outbound, each destination has one writer task fed by a bounded queue,
//! with [`SENDS_IN_FLIGHT_PER_PEER`] messages in flight, so a slow peer
//! delays only its own queue; a full queue drops the message (consensus
//! retransmits). The receiver reads a peer's streams one at a time in the
//! order they reach it; with two connections to a peer neighbours can
//! swap, so order is not promised (PBFT does not need it).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::prelude::*;
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use tracing::debug;

use crate::bounded::{read_bounded, write_and_close};
use crate::budget::ByteBudgets;
use crate::metrics::{Direction, NetMetrics};
use crate::score::Penalties;

/// The protocol name. Version 2: one-way streams, no acknowledgement.
pub const DIRECT_PROTOCOL: StreamProtocol = StreamProtocol::new("/openagi/direct/2");

/// Largest direct message accepted, in bytes. A PBFT pre-prepare carries a
/// whole batch, a new view the prepared proofs of a window, and a
/// state-transfer reply several blocks; the node splits its bundles at
/// this size.
pub const MAX_DIRECT_BYTES: usize = 16 * 1024 * 1024;

/// Streams one allowed peer may have waiting to be read. They are read
/// one at a time, in order; an unread stream holds at most its
/// multiplexer's receive window, so this bounds what a faulty validator
/// can pin to one message being read plus this many windows.
pub const MAX_QUEUED_STREAMS_PER_PEER: usize = 32;

/// How long one inbound stream may take to deliver its message: a full
/// 16 MiB bundle over Tor (about 1.5 MB/s measured) fits in it.
pub const DIRECT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long writing one message to a peer may take.
pub const DIRECT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages waiting per destination. Consensus sends at most one bundle
/// per peer per processing round; this many cover a peer that is slow for
/// a few seconds, and beyond it retransmission is cheaper than memory.
pub const OUTBOUND_QUEUE_PER_PEER: usize = 64;

/// Messages to one peer in flight at once (written and not yet
/// acknowledged); the receiver queues up to [`MAX_QUEUED_STREAMS_PER_PEER`].
pub const SENDS_IN_FLIGHT_PER_PEER: usize = 8;

/// Destinations with a writer at once; a writer idle for
/// [`WRITER_IDLE`] ends, so this bounds tasks, not peers over time.
pub const MAX_DESTINATIONS: usize = 256;

/// How long an idle writer waits before it ends.
pub const WRITER_IDLE: Duration = Duration::from_secs(60);

/// Direct messages read and waiting for the node, which reads them
/// straight from the network (the consensus task does), not through the
/// general event channel. Sized for bursts of votes from every validator:
/// separate from everything else, so nothing crowds votes out.
pub const DIRECT_INBOX: usize = 8192;

/// A direct message from a peer.
#[derive(Debug, Clone)]
pub struct DirectMessage {
    /// The sending peer (authenticated by the connection, and one the
    /// node allowed).
    pub from: PeerId,
    /// The message, at most [`MAX_DIRECT_BYTES`].
    pub data: Vec<u8>,
}

/// The peers allowed to open direct streams to this node.
#[derive(Clone, Default)]
pub(crate) struct DirectPeers {
    allowed: Arc<RwLock<HashSet<PeerId>>>,
}

impl DirectPeers {
    pub(crate) fn set(&self, peers: HashSet<PeerId>) {
        match self.allowed.write() {
            Ok(mut guard) => *guard = peers,
            Err(poisoned) => *poisoned.into_inner() = peers,
        }
    }

    fn allows(&self, peer: &PeerId) -> bool {
        match self.allowed.read() {
            Ok(guard) => guard.contains(peer),
            Err(poisoned) => poisoned.into_inner().contains(peer),
        }
    }
}

/// Counts a refused direct stream and charges its sender.
fn refuse(penalties: &Penalties, peer: PeerId, reason: &'static str) {
    penalties.report(peer, "direct", reason);
}

/// Accepts inbound direct streams until `incoming` ends. A stream from a
/// peer not allowed is reset at once; an allowed peer's streams queue for
/// that peer's reader (at most [`MAX_QUEUED_STREAMS_PER_PEER`], beyond
/// which they are reset), which reads them one at a time, in the order
/// they were opened, within the size and time limits, and hands each
/// message to the node's direct inbox ([`crate::NetHandle::take_direct_inbox`]).
pub(crate) async fn serve_inbound(
    mut incoming: libp2p_stream::IncomingStreams,
    allowed: DirectPeers,
    inbox: mpsc::Sender<DirectMessage>,
    metrics: NetMetrics,
    penalties: Penalties,
    budgets: ByteBudgets,
) {
    let mut readers: HashMap<PeerId, mpsc::Sender<libp2p::Stream>> = HashMap::new();
    while let Some((peer, stream)) = incoming.next().await {
        if !allowed.allows(&peer) {
            // Dropping the stream resets it: nothing of it is read.
            refuse(&penalties, peer, "not_a_validator");
            debug!(%peer, "direct stream from a peer that is not allowed refused");
            continue;
        }
        if budgets.over(&peer, std::time::Instant::now()) {
            refuse(&penalties, peer, "over_budget");
            debug!(%peer, "direct stream from a peer over its byte budget refused");
            continue;
        }
        let stream = match readers.get(&peer) {
            Some(queue) => match queue.try_send(stream) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    refuse(&penalties, peer, "too_many_streams");
                    debug!(%peer, "direct stream beyond the peer's queue refused");
                    continue;
                }
                // The reader ended (idle): start a new one.
                Err(mpsc::error::TrySendError::Closed(stream)) => stream,
            },
            None => stream,
        };
        // Readers exist only for allowed peers (the validators), and end
        // when idle, so the map stays as small as the validator set.
        readers.retain(|_, q| !q.is_closed());
        let (tx, rx) = mpsc::channel(MAX_QUEUED_STREAMS_PER_PEER);
        // Cannot fail: the queue is new and empty.
        let _ = tx.try_send(stream);
        readers.insert(peer, tx);
        tokio::spawn(read_from_peer(
            peer,
            rx,
            inbox.clone(),
            metrics.clone(),
            penalties.clone(),
            budgets.clone(),
        ));
    }
}

/// Reads `peer`'s queued streams one at a time until the queue has been
/// idle for [`WRITER_IDLE`].
async fn read_from_peer(
    peer: PeerId,
    mut queue: mpsc::Receiver<libp2p::Stream>,
    inbox: mpsc::Sender<DirectMessage>,
    metrics: NetMetrics,
    penalties: Penalties,
    budgets: ByteBudgets,
) {
    while let Ok(Some(mut stream)) = tokio::time::timeout(WRITER_IDLE, queue.recv()).await {
        let read = tokio::time::timeout(
            DIRECT_READ_TIMEOUT,
            read_bounded(&mut stream, MAX_DIRECT_BYTES),
        )
        .await;
        let data = match read {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => {
                let reason = if e.kind() == io::ErrorKind::InvalidData {
                    "too_large"
                } else {
                    "stream_error"
                };
                refuse(&penalties, peer, reason);
                debug!(%peer, error = %e, "direct message not received");
                continue;
            }
            Err(_) => {
                refuse(&penalties, peer, "timeout");
                debug!(%peer, "direct message not received in time");
                continue;
            }
        };
        // Closing our side tells the sender the message was read.
        let _ = stream.close().await;
        metrics.count_payload(Some(peer), "direct", Direction::Inbound, data.len());
        // Read already: delivered, but an overdrawn peer's next streams
        // are refused until its budget refills.
        budgets.charge(peer, data.len(), std::time::Instant::now());
        if inbox.try_send(DirectMessage { from: peer, data }).is_err() {
            // The consensus task is far behind; PBFT retransmits.
            metrics.events_dropped.inc();
        }
    }
}

/// Sends direct messages through one ordered writer per destination.
#[derive(Clone)]
pub(crate) struct DirectSender {
    control: libp2p_stream::Control,
    queues: Arc<Mutex<HashMap<PeerId, mpsc::Sender<Vec<u8>>>>>,
    metrics: NetMetrics,
}

impl DirectSender {
    pub(crate) fn new(control: libp2p_stream::Control, metrics: NetMetrics) -> Self {
        Self {
            control,
            queues: Arc::default(),
            metrics,
        }
    }

    /// Queues `data` for `peer`; a message that finds the peer's queue
    /// full (or no writer slot free) is dropped and counted.
    pub(crate) fn send(&self, peer: PeerId, data: Vec<u8>) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let data = match queues.get(&peer) {
            Some(queue) => match queue.try_send(data) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.direct_failures.inc();
                    debug!(%peer, "direct queue full; message dropped");
                    return;
                }
                // The writer ended (idle): start a new one.
                Err(mpsc::error::TrySendError::Closed(data)) => data,
            },
            None => data,
        };
        queues.retain(|_, q| !q.is_closed());
        if queues.len() >= MAX_DESTINATIONS {
            self.metrics.direct_failures.inc();
            debug!(%peer, "too many direct destinations; message dropped");
            return;
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE_PER_PEER);
        // Cannot fail: the queue is new and empty.
        let _ = tx.try_send(data);
        queues.insert(peer, tx);
        tokio::spawn(write_to_peer(
            self.control.clone(),
            peer,
            rx,
            self.metrics.clone(),
        ));
    }
}

/// Sends `peer`'s messages, up to [`SENDS_IN_FLIGHT_PER_PEER`] at once,
/// until the queue has been idle for [`WRITER_IDLE`].
async fn write_to_peer(
    control: libp2p_stream::Control,
    peer: PeerId,
    mut queue: mpsc::Receiver<Vec<u8>>,
    metrics: NetMetrics,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(SENDS_IN_FLIGHT_PER_PEER));
    while let Ok(Some(data)) = tokio::time::timeout(WRITER_IDLE, queue.recv()).await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut control = control.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let sent = tokio::time::timeout(
                DIRECT_WRITE_TIMEOUT,
                send_acknowledged(&mut control, peer, &data),
            )
            .await;
            match sent {
                Ok(Ok(())) => {
                    metrics.count_payload(Some(peer), "direct", Direction::Outbound, data.len());
                }
                Ok(Err(e)) => {
                    metrics.direct_failures.inc();
                    debug!(%peer, error = %e, "direct message not delivered");
                }
                Err(_) => {
                    metrics.direct_failures.inc();
                    debug!(%peer, "direct message not delivered in time");
                }
            }
        });
    }
}

/// Sends one message and waits for the receiver to close its side, which
/// it does once it has read the message. A stream the receiver dropped
/// unread (its connection closed under it, or the stream layer shed it
/// while the reader was busy) ends in a reset instead, and gets one more
/// try on a fresh stream: a message delivered twice is harmless to PBFT.
async fn send_acknowledged(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    data: &[u8],
) -> io::Result<()> {
    let mut last = None;
    for _ in 0..2 {
        let attempt = async {
            let mut stream = control
                .open_stream(peer, DIRECT_PROTOCOL)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            write_and_close(&mut stream, data).await?;
            read_bounded(&mut stream, 0).await.map(|_| ())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("not sent")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_peers_are_allowed() {
        let allowed = DirectPeers::default();
        let validator = PeerId::random();
        assert!(!allowed.allows(&validator), "nobody by default");
        allowed.set([validator].into_iter().collect());
        assert!(allowed.allows(&validator));
        assert!(!allowed.allows(&PeerId::random()));
    }
}
