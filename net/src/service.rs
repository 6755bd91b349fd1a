//! The task that owns the libp2p swarm.
//!
//! The swarm is driven by one task; nothing else touches it. Other parts
//! of the node send [`Command`]s through a bounded channel and receive
//! [`NetEvent`]s through another. A [`NetSnapshot`] behind a lock gives
//! status pages a consistent view without a round trip through the task.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::metrics::Recorder;
use libp2p::swarm::SwarmEvent;
use libp2p::{
    Multiaddr, PeerId, Swarm, gossipsub, identify, identity::Keypair, kad, mdns, ping,
    request_response,
};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::behaviour::{NodeBehaviour, NodeBehaviourEvent};
use crate::config::peer_id_of;
use crate::metrics::{Direction, DirectionLabels, GossipLabels, GossipOutcome, ReasonLabels};
use crate::wire::{Announce, NodeInfo, RpcRequest, RpcResponse, Topic};
use crate::{Error, NetConfig, NetMetrics};

/// Capacity of the command channel into the network task.
const COMMAND_CAPACITY: usize = 256;
/// Capacity of the event channel out of the network task.
const EVENT_CAPACITY: usize = 4096;
/// Most inbound msg requests waiting for the node's answer; beyond this a
/// request is dropped (the peer sees a failure) rather than queued.
const MAX_PENDING_MSG_REPLIES: usize = 256;
/// Most outbound msg requests waiting for a peer's answer.
const MAX_PENDING_MSG_REQUESTS: usize = 256;
/// The same two bounds for the learn protocol, whose requests are up to
/// 16 MiB: its own, smaller share, so learning traffic cannot crowd out
/// messages. It still allows 32 × 16 MiB = 512 MiB of requests waiting for
/// an answer (in practice updates are far smaller; a per-peer share would
/// bound it tighter).
const MAX_PENDING_LEARN: usize = 32;
/// Ledger requests waiting for an answer, each way: followers ask one
/// peer at a time, so this is many followers' worth.
const MAX_PENDING_LEDGER: usize = 64;
/// How often a node with few peers asks the DHT for more.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(3);
/// Above this many connected peers, discovery relies on Kademlia's own
/// periodic bootstrap.
const DISCOVERY_TARGET_PEERS: usize = 16;
/// How long shutdown waits for connections to close politely.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A gossip message received from the network and accepted.
#[derive(Debug, Clone, Serialize)]
pub struct ReceivedGossip {
    /// Short topic name.
    pub topic: &'static str,
    /// The original author (messages are signed by their author).
    pub author: String,
    /// The payload.
    #[serde(skip)]
    pub data: Vec<u8>,
}

/// Events the network task reports to the node.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A valid gossip message arrived.
    Gossip(ReceivedGossip),
    /// The first connection to a peer was established.
    PeerConnected(PeerId),
    /// The last connection to a peer closed.
    PeerDisconnected(PeerId),
    /// A peer sent a request on the msg or learn protocol; answer it with
    /// [`NetHandle::respond_msg`] (dropping the reply answers nothing and
    /// the peer sees a failure).
    MsgRequest {
        /// Which protocol.
        protocol: AppProtocol,
        /// The sending peer (authenticated by the connection).
        from: PeerId,
        /// The request bytes, within the protocol's limit.
        data: Vec<u8>,
        /// Where the answer goes.
        reply: MsgReply,
    },
    /// A peer was banned for misbehaviour for `duration`: the node keeps
    /// it, so the ban survives a restart ([`crate::BanConfig::restored`]).
    PeerBanned {
        /// The peer.
        peer: PeerId,
        /// How long it is refused.
        duration: Duration,
    },
    /// A peer on this network told us where it listens (at most 16
    /// addresses, each ending in its `/p2p/` id), so it can be redialled
    /// after a restart.
    PeerIdentified {
        /// The peer.
        peer_id: PeerId,
        /// Its dialable addresses.
        listen_addrs: Vec<Multiaddr>,
    },
}

/// Names an inbound msg or learn request awaiting the node's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgReply(u64);

/// The request-response protocols whose bytes the node interprets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// `/openagi/msg/1`: end-to-end encrypted messages.
    Msg,
    /// `/openagi/learn/1`: model chunks and client updates.
    Learn,
    /// `/openagi/ledger/1`: committed blocks and forwarded transactions.
    Ledger,
}

impl AppProtocol {
    /// Most requests of this protocol waiting for an answer, each way.
    fn max_pending(self) -> usize {
        match self {
            AppProtocol::Msg => MAX_PENDING_MSG_REPLIES.min(MAX_PENDING_MSG_REQUESTS),
            AppProtocol::Learn => MAX_PENDING_LEARN,
            AppProtocol::Ledger => MAX_PENDING_LEDGER,
        }
    }

    /// The label used in payload metrics.
    fn label(self) -> &'static str {
        match self {
            AppProtocol::Msg => "msg",
            AppProtocol::Learn => "learn",
            AppProtocol::Ledger => "ledger",
        }
    }
}

/// What the node knows about one connected peer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerSnapshot {
    /// The peer's id.
    pub peer_id: String,
    /// Remote addresses of the open connections.
    pub addresses: Vec<String>,
    /// Whether this node dialled the first connection.
    pub outbound: bool,
    /// Unix seconds when the first current connection was established.
    pub connected_since: u64,
    /// Latest ping round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Agent version from identify.
    pub agent_version: Option<String>,
    /// Node information from the RPC protocol.
    pub info: Option<NodeInfo>,
    /// Latest announcement received from this peer.
    pub last_announce: Option<Announce>,
    /// Unix seconds when that announcement arrived.
    pub last_announce_at: Option<u64>,
    /// Application bytes to and from it since it connected, by protocol.
    pub traffic: Vec<crate::traffic::ProtocolBytes>,
    #[serde(skip)]
    connections: usize,
}

/// A consistent view of the network state, for status pages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetSnapshot {
    /// This node's peer id.
    pub local_peer_id: String,
    /// Addresses this node listens on.
    pub listen_addrs: Vec<String>,
    /// Connected peers, by peer id.
    pub peers: BTreeMap<String, PeerSnapshot>,
    /// Gossip messages accepted since start.
    pub gossip_received: u64,
    /// The last [`CONNECTION_EVENTS`] peers connecting and disconnecting,
    /// oldest first.
    pub connection_events: std::collections::VecDeque<ConnectionEvent>,
}

/// Connection events kept in [`NetSnapshot::connection_events`].
pub const CONNECTION_EVENTS: usize = 100;

impl NetSnapshot {
    /// Keeps `event`, dropping the oldest past [`CONNECTION_EVENTS`].
    fn record_connection_event(&mut self, event: ConnectionEvent) {
        if self.connection_events.len() >= CONNECTION_EVENTS {
            self.connection_events.pop_front();
        }
        self.connection_events.push_back(event);
    }
}

/// A peer connecting or disconnecting.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionEvent {
    /// Unix seconds.
    pub at: u64,
    /// The peer.
    pub peer_id: String,
    /// `connected` or `disconnected`.
    pub event: &'static str,
    /// Its address (the connection that opened first or closed last).
    pub address: String,
    /// Whether this node dialled.
    pub outbound: bool,
}

enum Command {
    Publish {
        topic: Topic,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Dial {
        addr: Multiaddr,
    },
    MsgRequest {
        protocol: AppProtocol,
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    },
    MsgRespond {
        reply: MsgReply,
        data: Vec<u8>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
    Provide {
        key: Vec<u8>,
    },
    StopProviding {
        key: Vec<u8>,
    },
    FindProviders {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<PeerId>, Error>>,
    },
}

/// A cheap, cloneable handle to the network task.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::Sender<Command>,
    direct: crate::direct::DirectSender,
    direct_peers: crate::direct::DirectPeers,
    penalties: crate::score::Penalties,
    /// Direct messages, for whoever takes them first (the consensus task).
    direct_inbox: Arc<std::sync::Mutex<Option<mpsc::Receiver<crate::direct::DirectMessage>>>>,
    snapshot: Arc<RwLock<NetSnapshot>>,
    local_peer_id: PeerId,
    tor: Option<crate::tor::TorState>,
    traffic: crate::traffic::PeerTraffic,
}

impl NetHandle {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Tor status, in the Tor transport modes.
    pub fn tor_status(&self) -> Option<crate::tor::TorStatus> {
        self.tor.as_ref().map(crate::tor::TorState::get)
    }

    /// A copy of the current network state, with each peer's traffic.
    pub fn snapshot(&self) -> NetSnapshot {
        let mut snapshot = match self.snapshot.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for (id, peer) in snapshot.peers.iter_mut() {
            if let Ok(id) = id.parse::<PeerId>() {
                peer.traffic = self.traffic.of(&id);
            }
        }
        snapshot
    }

    /// Queues `command` for the network task, waiting while the queue is
    /// full so a fast producer is slowed to the network's pace.
    async fn command(&self, command: Command) -> Result<(), Error> {
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Queues the command `make` builds around a reply channel and waits
    /// for the task's answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.command(make(reply)).await?;
        answer.await.map_err(|_| Error::Stopped)?
    }

    /// Publishes `data` on `topic`.
    pub async fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), Error> {
        self.ask(|reply| Command::Publish { topic, data, reply })
            .await
    }

    /// Sends `data` (at most [`crate::MAX_DIRECT_BYTES`]) to `peer` on the
    /// direct protocol, dialling it if needed. Returns once the message is
    /// queued behind the peer's earlier ones; a message that finds the
    /// peer's queue full is dropped and counted
    /// (`openagi_direct_send_failures_total`).
    pub async fn send_direct(&self, peer: PeerId, data: Vec<u8>) -> Result<(), Error> {
        if data.len() > crate::MAX_DIRECT_BYTES {
            return Err(Error::Setup(format!(
                "direct message of {} bytes exceeds {}",
                data.len(),
                crate::MAX_DIRECT_BYTES
            )));
        }
        if self.commands.is_closed() {
            return Err(Error::Stopped);
        }
        self.direct.send(peer, data);
        Ok(())
    }

    /// Charges `peer` for a message the node refused as malformed or not
    /// allowed on `protocol` (a fixed name, e.g. "direct"), for `reason`
    /// (a fixed name): counted in `openagi_p2p_inbound_refused_total`, and
    /// a peer that keeps doing it is disconnected and refused for a while.
    pub fn penalise(&self, peer: PeerId, protocol: &'static str, reason: &'static str) {
        self.penalties.report(peer, protocol, reason);
    }

    /// The direct messages peers send, straight from the network: the
    /// first caller gets the receiver, later ones `None`. Until it is
    /// taken, messages wait (at most [`crate::direct::DIRECT_INBOX`]).
    pub fn take_direct_inbox(&self) -> Option<mpsc::Receiver<crate::DirectMessage>> {
        self.direct_inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Names the only peers whose direct streams are read (the
    /// validators); anyone else's is refused when it opens. Replaces the
    /// previous set; nobody is allowed until this is called.
    pub fn allow_direct_from(&self, peers: impl IntoIterator<Item = PeerId>) {
        self.direct_peers.set(peers.into_iter().collect());
    }

    /// Sends a msg-protocol request to `peer` (dialling it if needed) and
    /// waits for its answer.
    pub async fn msg_request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.ask(|reply| Command::MsgRequest {
            protocol: AppProtocol::Msg,
            peer,
            data,
            reply,
        })
        .await
    }

    /// Sends a learn-protocol request to `peer` (dialling it if needed)
    /// and waits for its answer.
    pub async fn learn_request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.ask(|reply| Command::MsgRequest {
            protocol: AppProtocol::Learn,
            peer,
            data,
            reply,
        })
        .await
    }

    /// Sends a ledger-protocol request to `peer` (dialling it if needed)
    /// and waits for its answer.
    pub async fn ledger_request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.ask(|reply| Command::MsgRequest {
            protocol: AppProtocol::Ledger,
            peer,
            data,
            reply,
        })
        .await
    }

    /// Answers an inbound msg- or learn-protocol request.
    pub async fn respond_msg(&self, reply: MsgReply, data: Vec<u8>) -> Result<(), Error> {
        self.command(Command::MsgRespond { reply, data }).await
    }

    /// Announces in the DHT that this node holds the content named by
    /// `key` (Kademlia provider records, republished by the DHT while the
    /// node runs; see [`crate::MAX_PROVIDED_KEYS`]).
    pub async fn provide(&self, key: Vec<u8>) -> Result<(), Error> {
        self.command(Command::Provide { key }).await
    }

    /// Stops announcing `key` (the content was deleted).
    pub async fn stop_providing(&self, key: Vec<u8>) -> Result<(), Error> {
        self.command(Command::StopProviding { key }).await
    }

    /// The peers the DHT names as holding `key` (at most
    /// [`crate::MAX_PROVIDERS_FOUND`], this node left out). An empty list
    /// means nobody announced it; an error, that the lookup could not run.
    pub async fn find_providers(&self, key: Vec<u8>) -> Result<Vec<PeerId>, Error> {
        self.ask(|reply| Command::FindProviders { key, reply })
            .await
    }

    /// Asks the task to dial `addr`.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), Error> {
        self.command(Command::Dial { addr }).await
    }

    /// Closes listeners and connections, waiting at most a short grace
    /// period for peers to see the close.
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Shutdown { done }).await.is_ok() {
            let _ = finished.await;
        }
    }
}

/// Builds and starts the network.
pub struct NetworkService;

impl NetworkService {
    /// Builds the swarm, starts listening and spawns the task driving it.
    ///
    /// Returns once every listener is bound, so a failure to bind is an
    /// error here rather than a log line later.
    pub fn start(
        keypair: Keypair,
        config: NetConfig,
        registry: &mut Registry,
    ) -> Result<(NetHandle, mpsc::Receiver<NetEvent>, JoinHandle<()>), Error> {
        config.validate()?;
        let net_metrics = NetMetrics::register(registry);
        let behaviour = NodeBehaviour::new(&keypair, &config)?;
        // libp2p-metrics adds its own `libp2p_` prefix under ours.
        let crate::transport::Built {
            mut swarm,
            listen,
            tor,
        } = crate::transport::build_swarm(keypair.clone(), &config, behaviour, registry)?;
        let libp2p_metrics = libp2p::metrics::Metrics::new(registry);

        for topic in Topic::ALL {
            let t = gossipsub::IdentTopic::new(topic.topic_string(&config.network_id));
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&t)
                .map_err(|e| Error::Setup(format!("subscribe: {e}")))?;
        }
        for addr in &listen {
            swarm.listen_on(addr.clone()).map_err(|e| {
                Error::Setup(format!("listen on {addr}: {}", crate::error_chain(&e)))
            })?;
        }

        let local_peer_id = *swarm.local_peer_id();
        let snapshot = Arc::new(RwLock::new(NetSnapshot {
            local_peer_id: local_peer_id.to_string(),
            ..Default::default()
        }));
        let (command_tx, command_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(EVENT_CAPACITY);
        let mut control = swarm.behaviour().direct.new_control();
        let incoming = control
            .accept(crate::direct::DIRECT_PROTOCOL)
            .map_err(|e| Error::Setup(format!("direct protocol: {e}")))?;
        let direct_peers = crate::direct::DirectPeers::default();
        let budgets = crate::budget::ByteBudgets::default();
        let (penalty_tx, penalty_rx) = mpsc::channel(crate::score::PENALTY_QUEUE);
        let (inbox_tx, inbox_rx) = mpsc::channel(crate::direct::DIRECT_INBOX);
        let penalties = crate::score::Penalties {
            tx: penalty_tx,
            metrics: net_metrics.clone(),
        };
        tokio::spawn(crate::direct::serve_inbound(
            incoming,
            direct_peers.clone(),
            inbox_tx,
            net_metrics.clone(),
            penalties.clone(),
            budgets.clone(),
        ));
        let direct = crate::direct::DirectSender::new(control, net_metrics.clone());
        let topics = Topic::ALL
            .iter()
            .map(|t| {
                (
                    gossipsub::IdentTopic::new(t.topic_string(&config.network_id)).hash(),
                    *t,
                )
            })
            .collect();
        let redials = config
            .bootstrap
            .iter()
            .filter_map(|addr| {
                peer_id_of(addr).map(|peer| Redial {
                    addr: addr.clone(),
                    peer,
                    attempts: 0,
                    due: Instant::now(),
                    connected: false,
                    dialling: false,
                })
            })
            .collect();
        let traffic = net_metrics.peer_traffic.clone();
        let mut misbehaviour = crate::score::Misbehaviour::with_ban_duration(config.bans.duration);
        let now = Instant::now();
        for (peer, left) in &config.bans.restored {
            misbehaviour.restore(*peer, now + *left);
        }
        let task = NetTask {
            swarm,
            config,
            net_metrics,
            libp2p_metrics,
            snapshot: snapshot.clone(),
            events: event_tx,
            topics,
            redials,
            started: Instant::now(),
            announce_sequence: 0,
            msg_replies: HashMap::new(),
            provider_lookups: HashMap::new(),
            provider_admission: Default::default(),
            next_msg_reply: 0,
            msg_requests: HashMap::new(),
            misbehaviour,
            budgets,
        };
        let join = tokio::spawn(task.run(command_rx, penalty_rx));
        Ok((
            NetHandle {
                commands: command_tx,
                direct,
                direct_peers,
                penalties,
                direct_inbox: Arc::new(std::sync::Mutex::new(Some(inbox_rx))),
                snapshot,
                local_peer_id,
                tor,
                traffic,
            },
            event_rx,
            join,
        ))
    }
}

struct Redial {
    addr: Multiaddr,
    peer: PeerId,
    attempts: u32,
    due: Instant,
    connected: bool,
    dialling: bool,
}

struct NetTask {
    swarm: Swarm<NodeBehaviour>,
    config: NetConfig,
    net_metrics: NetMetrics,
    libp2p_metrics: libp2p::metrics::Metrics,
    snapshot: Arc<RwLock<NetSnapshot>>,
    events: mpsc::Sender<NetEvent>,
    topics: HashMap<gossipsub::TopicHash, Topic>,
    redials: Vec<Redial>,
    started: Instant,
    announce_sequence: u64,
    msg_replies: HashMap<u64, (AppProtocol, request_response::ResponseChannel<Vec<u8>>)>,
    next_msg_reply: u64,
    /// Keyed by protocol too: each behaviour numbers its requests itself.
    msg_requests: HashMap<(AppProtocol, request_response::OutboundRequestId), AnswerSender>,
    /// Penalties per peer identity; see [`crate::score`].
    misbehaviour: crate::score::Misbehaviour,
    /// Inbound bytes per peer identity; see [`crate::budget`].
    budgets: crate::budget::ByteBudgets,
    /// Provider lookups under way (at most [`MAX_PROVIDER_LOOKUPS`]),
    /// with the providers found so far.
    provider_lookups: HashMap<kad::QueryId, (ProvidersSender, Vec<PeerId>)>,
    /// Provider records other nodes made this node hold; see
    /// [`crate::providers`].
    provider_admission: crate::providers::ProviderAdmission,
}

/// Provider lookups one node runs at once: each is a Kademlia query of up
/// to its timeout; a caller past this is told to try again, rather than
/// queueing work the DHT cannot do sooner.
const MAX_PROVIDER_LOOKUPS: usize = 32;

/// Where the answer to a provider lookup goes.
type ProvidersSender = oneshot::Sender<Result<Vec<PeerId>, Error>>;

/// The refusal reason of an inbound request-response failure that the
/// peer caused (a request too large or malformed, or not sent in time);
/// `None` for failures that are ours or nobody's (a closed connection,
/// an answer we did not give).
fn inbound_failure_reason(error: &request_response::InboundFailure) -> Option<&'static str> {
    match error {
        request_response::InboundFailure::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Some("malformed")
        }
        request_response::InboundFailure::Io(_) => Some("stream_error"),
        request_response::InboundFailure::Timeout => Some("timeout"),
        request_response::InboundFailure::UnsupportedProtocols => Some("unsupported_protocol"),
        _ => None,
    }
}

/// Where the answer to an outbound msg or learn request goes.
type AnswerSender = oneshot::Sender<Result<Vec<u8>, Error>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl NetTask {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut penalties: mpsc::Receiver<crate::score::Penalty>,
    ) {
        let mut announce = tokio::time::interval(self.config.announce_interval);
        let mut redial = tokio::time::interval(Duration::from_millis(250));
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut discover = tokio::time::interval(DISCOVERY_INTERVAL);
        discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        for addr in self.config.bootstrap.clone() {
            if let Some(peer) = peer_id_of(&addr) {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr);
            }
        }
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(penalty) = penalties.recv() => self.score(penalty.peer, penalty.protocol, penalty.reason),
                command = commands.recv() => match command {
                    Some(Command::Publish { topic, data, reply }) => {
                        let _ = reply.send(self.publish(topic, data));
                    }
                    Some(Command::MsgRequest { protocol, peer, data, reply }) => {
                        self.msg_request(protocol, peer, data, reply)
                    }
                    Some(Command::MsgRespond { reply, data }) => {
                        if let Some((protocol, channel)) = self.msg_replies.remove(&reply.0) {
                            self.count_payload(None, protocol.label(), Direction::Outbound, data.len());
                            // Fails only when the peer gave up waiting.
                            let _ = self.app_behaviour(protocol).send_response(channel, data);
                        }
                    }
                    Some(Command::Provide { key }) => self.provide(key),
                    Some(Command::StopProviding { key }) => {
                        self.swarm.behaviour_mut().kad.stop_providing(&kad::RecordKey::new(&key));
                    }
                    Some(Command::FindProviders { key, reply }) => self.find_providers(key, reply),
                    Some(Command::Dial { addr }) => {
                        if let Err(e) = self.swarm.dial(addr.clone()) {
                            warn!(%addr, error = %e, "dial refused");
                        }
                    }
                    Some(Command::Shutdown { done }) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                _ = announce.tick() => self.announce(),
                _ = redial.tick() => self.redial_due(),
                _ = discover.tick() => self.discover(),
            }
        }
    }

    fn update_snapshot(&self, f: impl FnOnce(&mut NetSnapshot)) {
        match self.snapshot.write() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn emit(&self, event: NetEvent) {
        if self.events.try_send(event).is_err() {
            self.net_metrics.events_dropped.inc();
        }
    }

    fn publish(&mut self, topic: Topic, data: Vec<u8>) -> Result<(), Error> {
        let t = gossipsub::IdentTopic::new(topic.topic_string(&self.config.network_id));
        let len = data.len();
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(t, data)
            .map_err(|e| Error::Publish(e.to_string()))?;
        self.net_metrics
            .gossip_messages
            .get_or_create(&GossipLabels {
                topic: topic.name(),
                outcome: GossipOutcome::Published,
            })
            .inc();
        self.count_payload(None, "gossipsub", Direction::Outbound, len);
        Ok(())
    }

    fn announce(&mut self) {
        self.announce_sequence += 1;
        let announce = Announce {
            version: self.config.agent_version.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            sequence: self.announce_sequence,
        };
        match announce.encode() {
            Ok(bytes) => {
                if let Err(e) = self.publish(Topic::Announce, bytes) {
                    // No subscribed peers yet is normal right after start.
                    debug!(error = %e, "announce not sent");
                }
            }
            Err(e) => warn!(error = %e, "announce encoding failed"),
        }
    }

    fn redial_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.redials.len() {
            let entry = &self.redials[i];
            if entry.connected || entry.dialling || entry.due > now {
                continue;
            }
            if self.swarm.is_connected(&entry.peer) {
                self.redials[i].connected = true;
                continue;
            }
            let addr = entry.addr.clone();
            debug!(%addr, attempt = entry.attempts, "dialling bootstrap peer");
            match self.swarm.dial(addr.clone()) {
                Ok(()) => self.redials[i].dialling = true,
                Err(e) => {
                    debug!(%addr, error = %e, "bootstrap dial not started");
                    self.schedule_redial_for(i);
                }
            }
        }
    }

    /// Looks for more peers through the DHT while this node has few. A
    /// single bootstrap query right after the first connection can run
    /// before the bootstrap peer has learned of nodes that started at the
    /// same moment; repeating it closes that gap within seconds, without
    /// querying a well-connected node all the time.
    fn discover(&mut self) {
        let connected = self.swarm.connected_peers().count();
        if connected > 0 && connected < DISCOVERY_TARGET_PEERS {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    fn schedule_redial_for(&mut self, index: usize) {
        let backoff = self.config.redial;
        let entry = &mut self.redials[index];
        entry.dialling = false;
        entry.due = Instant::now() + backoff.delay(entry.attempts, rand::random::<f64>());
        entry.attempts = entry.attempts.saturating_add(1);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.update_snapshot(|s| s.listen_addrs.push(address.to_string()));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let gone = address.to_string();
                self.update_snapshot(|s| s.listen_addrs.retain(|a| *a != gone));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if self.misbehaviour.is_banned(&peer_id, Instant::now()) {
                    debug!(%peer_id, "banned peer refused");
                    self.net_metrics
                        .peers_refused
                        .get_or_create(&ReasonLabels { reason: "banned" })
                        .inc();
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let direction = if endpoint.is_dialer() {
                    Direction::Outbound
                } else {
                    Direction::Inbound
                };
                self.net_metrics
                    .connections_opened
                    .get_or_create(&DirectionLabels { direction })
                    .inc();
                let remote = endpoint.get_remote_address().to_string();
                let first = num_established.get() == 1;
                self.update_snapshot(|s| {
                    let peer = s
                        .peers
                        .entry(peer_id.to_string())
                        .or_insert_with(|| PeerSnapshot {
                            peer_id: peer_id.to_string(),
                            outbound: endpoint.is_dialer(),
                            connected_since: unix_now(),
                            ..Default::default()
                        });
                    peer.connections += 1;
                    peer.addresses.push(remote.clone());
                    if first {
                        s.record_connection_event(ConnectionEvent {
                            at: unix_now(),
                            peer_id: peer_id.to_string(),
                            event: "connected",
                            address: remote,
                            outbound: endpoint.is_dialer(),
                        });
                    }
                });
                for (i, entry) in self.redials.iter_mut().enumerate() {
                    if entry.peer == peer_id {
                        debug!(index = i, "bootstrap peer connected");
                        entry.connected = true;
                        entry.dialling = false;
                        entry.attempts = 0;
                    }
                }
                if first {
                    info!(%peer_id, "peer connected");
                    self.set_connected_gauge();
                    self.swarm
                        .behaviour_mut()
                        .rpc
                        .send_request(&peer_id, RpcRequest::Info);
                    if self.redials.iter().any(|r| r.peer == peer_id) {
                        // Learn the rest of the network from a bootstrap peer.
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                    self.emit(NetEvent::PeerConnected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                cause,
                ..
            } => {
                let direction = if endpoint.is_dialer() {
                    Direction::Outbound
                } else {
                    Direction::Inbound
                };
                self.net_metrics
                    .connections_closed
                    .get_or_create(&DirectionLabels { direction })
                    .inc();
                let remote = endpoint.get_remote_address().to_string();
                let key = peer_id.to_string();
                self.update_snapshot(|s| {
                    if num_established == 0 {
                        s.peers.remove(&key);
                        s.record_connection_event(ConnectionEvent {
                            at: unix_now(),
                            peer_id: key.clone(),
                            event: "disconnected",
                            address: remote.clone(),
                            outbound: endpoint.is_dialer(),
                        });
                    } else if let Some(peer) = s.peers.get_mut(&key) {
                        peer.connections = peer.connections.saturating_sub(1);
                        if let Some(pos) = peer.addresses.iter().position(|a| *a == remote) {
                            peer.addresses.remove(pos);
                        }
                    }
                });
                if num_established == 0 {
                    self.net_metrics.peer_traffic.forget(&peer_id);
                    info!(%peer_id, cause = ?cause, "peer disconnected");
                    self.set_connected_gauge();
                    for i in 0..self.redials.len() {
                        if self.redials[i].peer == peer_id {
                            self.redials[i].connected = false;
                            self.redials[i].attempts = 0;
                            self.schedule_redial_for(i);
                        }
                    }
                    self.emit(NetEvent::PeerDisconnected(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.net_metrics.dial_errors.inc();
                debug!(peer = ?peer_id, error = %error, "dial failed");
                if let Some(peer) = peer_id {
                    for i in 0..self.redials.len() {
                        if self.redials[i].peer == peer && !self.swarm.is_connected(&peer) {
                            self.schedule_redial_for(i);
                        }
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                // Counted by cause so an operator sees a flood of refused
                // or failed negotiations, not just its absence of peers.
                let reason = match &error {
                    libp2p::swarm::ListenError::Denied { cause } => {
                        if cause
                            .downcast_ref::<crate::pending::TooManyPending>()
                            .is_some()
                        {
                            "too_many_pending_from_source"
                        } else {
                            "connection_limit"
                        }
                    }
                    _ => "negotiation_failed",
                };
                self.net_metrics
                    .inbound_refused
                    .get_or_create(&crate::metrics::RefusalLabels {
                        protocol: "connection",
                        reason,
                    })
                    .inc();
                debug!(%error, reason, "inbound connection not established");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    /// An inbound provider record, stored only within the admission
    /// table's bounds.
    fn admit_provider(&mut self, record: kad::ProviderRecord) {
        let provider = record.provider;
        let decision = self.provider_admission.admit(record, Instant::now());
        let (expired, stored) = match decision {
            crate::providers::Admission::Store { record, expired } => (expired, Some(record)),
            crate::providers::Admission::Refuse(reason, expired) => {
                crate::score::count(&self.net_metrics, "kad", reason);
                (expired, None)
            }
        };
        let store = self.swarm.behaviour_mut().kad.store_mut();
        for (key, peer) in expired {
            kad::store::RecordStore::remove_provider(store, &key, &peer);
        }
        if let Some(record) = stored
            && let Err(e) = kad::store::RecordStore::add_provider(store, record)
        {
            debug!(%provider, error = ?e, "provider record not stored");
        }
    }

    fn provide(&mut self, key: Vec<u8>) {
        let key = kad::RecordKey::new(&key);
        // Refused only when the store holds its most keys (this node's
        // own beyond what foreign records leave): the content is still
        // served to whoever asks the node directly.
        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
            warn!(error = %e, "not announced in the DHT");
        }
    }

    fn find_providers(&mut self, key: Vec<u8>, reply: ProvidersSender) {
        if self.provider_lookups.len() >= MAX_PROVIDER_LOOKUPS {
            let _ = reply.send(Err(Error::Lookup(format!(
                "{MAX_PROVIDER_LOOKUPS} provider lookups already under way; try again"
            ))));
            return;
        }
        let id = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(kad::RecordKey::new(&key));
        self.provider_lookups.insert(id, (reply, Vec::new()));
    }

    /// A step of one of this node's Kademlia queries: provider lookups
    /// gather what each step found and answer when the query ends or has
    /// found enough.
    fn on_query_progress(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        let kad::QueryResult::GetProviders(result) = result else {
            return;
        };
        let me = *self.swarm.local_peer_id();
        let done = match (self.provider_lookups.get_mut(&id), result) {
            (None, _) => return,
            (Some((_, found)), Ok(kad::GetProvidersOk::FoundProviders { providers, .. })) => {
                for peer in providers {
                    if peer != me
                        && !found.contains(&peer)
                        && found.len() < crate::MAX_PROVIDERS_FOUND
                    {
                        found.push(peer);
                    }
                }
                last || found.len() >= crate::MAX_PROVIDERS_FOUND
            }
            (Some(_), Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. })) => true,
            (Some((_, found)), Err(e)) => {
                // A timeout after some providers were found is an answer.
                if found.is_empty() {
                    if let Some((reply, _)) = self.provider_lookups.remove(&id) {
                        let _ = reply.send(Err(Error::Lookup(e.to_string())));
                    }
                    return;
                }
                true
            }
        };
        if done {
            if let Some((reply, found)) = self.provider_lookups.remove(&id) {
                let _ = reply.send(Ok(found));
            }
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
        }
    }

    fn set_connected_gauge(&self) {
        let count = self.swarm.connected_peers().count();
        self.net_metrics.connected_peers.set(count as i64);
    }

    fn on_behaviour_event(&mut self, event: NodeBehaviourEvent) {
        match event {
            NodeBehaviourEvent::Identify(event) => {
                self.libp2p_metrics.record(&event);
                if let identify::Event::Received { peer_id, info, .. } = event {
                    if info.protocol_version != self.config.protocol_version() {
                        warn!(%peer_id, theirs = %info.protocol_version, "peer is on another network; disconnecting");
                        self.net_metrics
                            .peers_refused
                            .get_or_create(&ReasonLabels {
                                reason: "wrong_network",
                            })
                            .inc();
                        let _ = self.swarm.disconnect_peer_id(peer_id);
                        return;
                    }
                    let listen_addrs: Vec<Multiaddr> =
                        info.listen_addrs.iter().take(16).cloned().collect();
                    for addr in &listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                    let dialable = listen_addrs
                        .into_iter()
                        .map(|a| {
                            if peer_id_of(&a).is_some() {
                                a
                            } else {
                                a.with(libp2p::multiaddr::Protocol::P2p(peer_id))
                            }
                        })
                        .collect();
                    self.emit(NetEvent::PeerIdentified {
                        peer_id,
                        listen_addrs: dialable,
                    });
                    let agent: String = info
                        .agent_version
                        .chars()
                        .take(crate::wire::MAX_TEXT_LEN)
                        .collect();
                    self.update_snapshot(|s| {
                        if let Some(p) = s.peers.get_mut(&peer_id.to_string()) {
                            p.agent_version = Some(agent);
                        }
                    });
                }
            }
            NodeBehaviourEvent::Ping(event) => {
                self.libp2p_metrics.record(&event);
                if let Ok(rtt) = event.result {
                    let peer = event.peer.to_string();
                    self.update_snapshot(|s| {
                        if let Some(p) = s.peers.get_mut(&peer) {
                            p.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                        }
                    });
                } else if let Err(ping::Failure::Timeout) = event.result {
                    debug!(peer = %event.peer, "ping timeout");
                }
            }
            NodeBehaviourEvent::Kad(event) => {
                self.libp2p_metrics.record(&event);
                match event {
                    kad::Event::RoutingUpdated { peer, .. } => {
                        debug!(%peer, "routing table updated");
                    }
                    kad::Event::OutboundQueryProgressed {
                        id, result, step, ..
                    } => self.on_query_progress(id, result, step.last),
                    kad::Event::InboundRequest {
                        request:
                            kad::InboundRequest::AddProvider {
                                record: Some(record),
                            },
                    } => self.admit_provider(record),
                    _ => {}
                }
            }
            NodeBehaviourEvent::Mdns(event) => {
                if let mdns::Event::Discovered(found) = event {
                    for (peer, addr) in found.into_iter().take(64) {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer, addr.clone());
                        if !self.swarm.is_connected(&peer) {
                            let _ = self.swarm.dial(addr);
                        }
                    }
                }
            }
            NodeBehaviourEvent::Gossipsub(event) => {
                self.libp2p_metrics.record(&event);
                if let gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                } = event
                {
                    self.on_gossip(propagation_source, message_id, message);
                }
            }
            NodeBehaviourEvent::Rpc(event) => self.on_rpc(event),
            NodeBehaviourEvent::Direct(()) => {}
            NodeBehaviourEvent::Msg(event) => self.on_msg(AppProtocol::Msg, event),
            NodeBehaviourEvent::Learn(event) => self.on_msg(AppProtocol::Learn, event),
            NodeBehaviourEvent::Ledger(event) => self.on_msg(AppProtocol::Ledger, event),
            NodeBehaviourEvent::Blocked(never) => match never {},
            NodeBehaviourEvent::Limits(never) => match never {},
            NodeBehaviourEvent::Memory(never) => match never {},
            NodeBehaviourEvent::Pending(never) => match never {},
        }
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        self.count_payload(
            Some(source),
            "gossipsub",
            Direction::Inbound,
            message.data.len(),
        );
        if !self
            .budgets
            .charge(source, message.data.len(), Instant::now())
        {
            crate::score::count(&self.net_metrics, "gossipsub", "over_budget");
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &id,
                    &source,
                    gossipsub::MessageAcceptance::Ignore,
                );
            return;
        }
        let Some(topic) = self.topics.get(&message.topic).copied() else {
            self.net_metrics
                .gossip_messages
                .get_or_create(&GossipLabels {
                    topic: "unknown",
                    outcome: GossipOutcome::UnknownTopic,
                })
                .inc();
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &id,
                    &source,
                    gossipsub::MessageAcceptance::Ignore,
                );
            return;
        };
        let verdict = match topic {
            Topic::Announce => Announce::decode(&message.data),
        };
        let (acceptance, outcome) = match verdict {
            Ok(announce) => {
                if let Some(author) = message.source {
                    let key = author.to_string();
                    self.update_snapshot(|s| {
                        s.gossip_received += 1;
                        if let Some(p) = s.peers.get_mut(&key) {
                            p.last_announce = Some(announce);
                            p.last_announce_at = Some(unix_now());
                        }
                    });
                    self.emit(NetEvent::Gossip(ReceivedGossip {
                        topic: topic.name(),
                        author: key,
                        data: message.data,
                    }));
                }
                (
                    gossipsub::MessageAcceptance::Accept,
                    GossipOutcome::Accepted,
                )
            }
            Err(reason) => {
                warn!(%source, topic = topic.name(), %reason, "rejected malformed gossip");
                (
                    gossipsub::MessageAcceptance::Reject,
                    GossipOutcome::Rejected,
                )
            }
        };
        self.net_metrics
            .gossip_messages
            .get_or_create(&GossipLabels {
                topic: topic.name(),
                outcome,
            })
            .inc();
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
    }

    fn on_rpc(&mut self, event: request_response::Event<RpcRequest, RpcResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let response = match request {
                    RpcRequest::Info => RpcResponse::Info(NodeInfo {
                        network_id: self.config.network_id.clone(),
                        version: self.config.agent_version.clone(),
                        uptime_secs: self.started.elapsed().as_secs(),
                    }),
                };
                if self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!(%peer, "rpc response not sent: the request timed out or the connection closed");
                }
            }
            Event::Message {
                peer,
                message: Message::Response { response, .. },
                ..
            } => match response {
                RpcResponse::Info(info) => match info.validate() {
                    Ok(()) => {
                        let key = peer.to_string();
                        self.update_snapshot(|s| {
                            if let Some(p) = s.peers.get_mut(&key) {
                                p.info = Some(info);
                            }
                        });
                    }
                    Err(reason) => {
                        warn!(%peer, %reason, "invalid node info");
                        self.net_metrics
                            .peers_refused
                            .get_or_create(&ReasonLabels {
                                reason: "malformed_rpc",
                            })
                            .inc();
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                },
                RpcResponse::Refused(reason) => debug!(%peer, %reason, "rpc refused"),
            },
            Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "rpc request failed")
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "rpc inbound failure");
                if let Some(reason) = inbound_failure_reason(&error) {
                    self.penalise(peer, "rpc", reason);
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// Counts a refused message from `peer` and charges it.
    fn penalise(&mut self, peer: PeerId, protocol: &'static str, reason: &'static str) {
        crate::score::count(&self.net_metrics, protocol, reason);
        self.score(peer, protocol, reason);
    }

    /// Charges `peer` (already counted); disconnects and bans it at the
    /// limit.
    fn score(&mut self, peer: PeerId, protocol: &'static str, reason: &'static str) {
        if self.misbehaviour.penalise(peer, Instant::now()) {
            tracing::info!(
                target: "audit",
                event = "peer_banned",
                %peer,
                protocol,
                last_reason = reason,
                ban_secs = self.misbehaviour.ban_duration().as_secs(),
                "peer banned"
            );
            warn!(
                %peer,
                protocol,
                last_reason = reason,
                ban_secs = self.misbehaviour.ban_duration().as_secs(),
                "peer disconnected and banned for repeated refused messages"
            );
            self.emit(NetEvent::PeerBanned {
                peer,
                duration: self.misbehaviour.ban_duration(),
            });
            self.net_metrics
                .peers_refused
                .get_or_create(&ReasonLabels {
                    reason: "misbehaviour",
                })
                .inc();
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn count_payload(
        &self,
        peer: Option<PeerId>,
        protocol: &'static str,
        direction: Direction,
        bytes: usize,
    ) {
        self.net_metrics
            .count_payload(peer, protocol, direction, bytes);
    }

    fn app_behaviour(
        &mut self,
        protocol: AppProtocol,
    ) -> &mut request_response::Behaviour<crate::msg::MsgCodec> {
        let behaviour = self.swarm.behaviour_mut();
        match protocol {
            AppProtocol::Msg => &mut behaviour.msg,
            AppProtocol::Learn => &mut behaviour.learn,
            AppProtocol::Ledger => &mut behaviour.ledger,
        }
    }

    fn msg_request(
        &mut self,
        protocol: AppProtocol,
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, Error>>,
    ) {
        self.msg_requests.retain(|_, waiting| !waiting.is_closed());
        let in_flight = self
            .msg_requests
            .keys()
            .filter(|(p, _)| *p == protocol)
            .count();
        if in_flight >= protocol.max_pending() {
            let _ = reply.send(Err(Error::Request {
                peer: peer.to_string(),
                detail: format!("too many {} requests in flight", protocol.label()),
            }));
            return;
        }
        self.count_payload(
            Some(peer),
            protocol.label(),
            Direction::Outbound,
            data.len(),
        );
        let id = self.app_behaviour(protocol).send_request(&peer, data);
        self.msg_requests.insert((protocol, id), reply);
    }

    fn on_msg(&mut self, protocol: AppProtocol, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.count_payload(
                    Some(peer),
                    protocol.label(),
                    Direction::Inbound,
                    request.len(),
                );
                if !self.budgets.charge(peer, request.len(), Instant::now()) {
                    // Dropping the channel answers nothing: the peer sees
                    // a failure and its budget refills meanwhile.
                    debug!(%peer, ?protocol, "request refused: the peer is over its byte budget");
                    self.penalise(peer, protocol.label(), "over_budget");
                    return;
                }
                self.msg_replies.retain(|_, (_, c)| c.is_open());
                let waiting = self
                    .msg_replies
                    .values()
                    .filter(|(p, _)| *p == protocol)
                    .count();
                if waiting >= protocol.max_pending() {
                    debug!(%peer, ?protocol, "request dropped: too many awaiting an answer");
                    return;
                }
                self.next_msg_reply += 1;
                let reply = MsgReply(self.next_msg_reply);
                self.msg_replies.insert(reply.0, (protocol, channel));
                if self
                    .events
                    .try_send(NetEvent::MsgRequest {
                        protocol,
                        from: peer,
                        data: request,
                        reply,
                    })
                    .is_err()
                {
                    self.msg_replies.remove(&reply.0);
                    self.net_metrics.events_dropped.inc();
                }
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                self.count_payload(
                    Some(peer),
                    protocol.label(),
                    Direction::Inbound,
                    response.len(),
                );
                if let Some(waiting) = self.msg_requests.remove(&(protocol, request_id)) {
                    let _ = waiting.send(Ok(response));
                } else {
                    debug!(%peer, "msg response nobody waits for");
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(waiting) = self.msg_requests.remove(&(protocol, request_id)) {
                    let _ = waiting.send(Err(Error::Request {
                        peer: peer.to_string(),
                        detail: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "msg request not answered");
                if let Some(reason) = inbound_failure_reason(&error) {
                    self.penalise(peer, protocol.label(), reason);
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }

    async fn shutdown(&mut self) {
        info!("closing network: unsubscribing, closing listeners and connections");
        for topic in Topic::ALL {
            let t = gossipsub::IdentTopic::new(topic.topic_string(&self.config.network_id));
            self.swarm.behaviour_mut().gossipsub.unsubscribe(&t);
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while self.swarm.connected_peers().next().is_some() {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => self.on_swarm_event(event),
                Err(_) => break,
            }
        }
        self.update_snapshot(|s| {
            s.peers.clear();
            s.listen_addrs.clear();
        });
    }
}
