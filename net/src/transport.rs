//! Builds the swarm with the transports the configured mode allows.
//!
//! - `direct`: TCP and QUIC (with DNS), Noise, Yamux.
//! - `tor` / `tor-system`: only the onion transport. There is no TCP, QUIC
//!   or DNS transport in the swarm, so nothing can be dialled outside Tor
//!   and no name is resolved locally.
//! - hybrid (`tor.hybrid = true`, explicit): the onion transport and TCP,
//!   QUIC, DNS side by side.

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, Swarm, Transport, noise, tcp, yamux};
use prometheus_client::registry::Registry;
use tracing::info;

use crate::behaviour::NodeBehaviour;
use crate::tor::{self, TorMetrics, TorRuntime, TorState};
use crate::{Error, NetConfig, TransportMode};

/// The swarm and, in Tor modes, the running Tor back end.
/// How long a direct (TCP/QUIC) connection may take from the first byte to
/// an authenticated, multiplexed connection. On loopback and LANs this
/// takes milliseconds; a peer that stalls the negotiation holds a pending
/// slot for at most this long (libp2p's default is 10 s). The Tor
/// transports keep the default: their dial includes building circuits.
pub const DIRECT_UPGRADE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct Built {
    pub swarm: Swarm<NodeBehaviour>,
    pub listen: Vec<Multiaddr>,
    pub tor: Option<TorState>,
}

pub(crate) fn build_swarm(
    keypair: Keypair,
    config: &NetConfig,
    behaviour: NodeBehaviour,
    registry: &mut Registry,
) -> Result<Built, Error> {
    let idle = config.idle_timeout;
    let tor_kind = match config.transport {
        TransportMode::Direct => None,
        TransportMode::Tor => Some(tor::TorBackendKind::Embedded),
        TransportMode::TorSystem => Some(tor::TorBackendKind::System),
    };
    let Some(kind) = tor_kind else {
        let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| Error::Setup(format!("tcp transport: {e}")))?
            .with_quic()
            .with_dns()
            .map_err(|e| Error::Setup(format!("dns resolver: {e}")))?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|_| behaviour)
            .map_err(|e| Error::Setup(format!("behaviour: {e}")))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .with_connection_timeout(DIRECT_UPGRADE_TIMEOUT)
            .build();
        return Ok(Built {
            swarm,
            listen: config.listen.clone(),
            tor: None,
        });
    };
    let settings = config
        .tor
        .as_ref()
        .ok_or_else(|| Error::Config("Tor transport without Tor settings".into()))?;
    let metrics = TorMetrics::register(registry);
    let TorRuntime {
        transport: onion,
        listen: onion_addr,
        state,
    } = tor::start(kind, settings, metrics)?;
    let upgrade = move |kp: &Keypair| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
        Ok(onion
            .upgrade(Version::V1)
            .authenticate(noise::Config::new(kp)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))))
    };
    let mut listen = vec![onion_addr];
    let swarm = if settings.hybrid {
        info!("hybrid mode: Tor and direct TCP/QUIC; peers can learn this node's IP address");
        listen.extend(config.listen.iter().cloned());
        libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| Error::Setup(format!("tcp transport: {e}")))?
            .with_quic()
            .with_other_transport(upgrade)
            .map_err(|e| Error::Setup(format!("tor transport: {e}")))?
            .with_dns()
            .map_err(|e| Error::Setup(format!("dns resolver: {e}")))?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|_| behaviour)
            .map_err(|e| Error::Setup(format!("behaviour: {e}")))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build()
    } else {
        if !config.listen.is_empty() {
            info!(
                "Tor mode: network.listen is not used (onion service only; set tor.hybrid = true for direct listeners)"
            );
        }
        libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_other_transport(upgrade)
            .map_err(|e| Error::Setup(format!("tor transport: {e}")))?
            .with_bandwidth_metrics(registry)
            .with_behaviour(|_| behaviour)
            .map_err(|e| Error::Setup(format!("behaviour: {e}")))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build()
    };
    Ok(Built {
        swarm,
        listen,
        tor: Some(state),
    })
}
