//! Bounds inbound connections still being negotiated, per source address.
//!
//! libp2p's connection limits cap pending inbound connections in total; a
//! single host that opens that many TCP connections and then sends
//! nothing (half-open upgrades) holds every slot until each times out, and
//! a restarted validator cannot get in meanwhile. This behaviour refuses a
//! new pending connection from an IP address that already has
//! [`MAX_PENDING_PER_SOURCE`] in negotiation, so one host can take only
//! that many of the shared slots. Behind Tor every inbound connection
//! comes from the local tor process, so the Tor transports are not
//! limited here (their defence is the per-connection puzzle).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::swarm::behaviour::{ConnectionEstablished, ListenFailure};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Inbound connections one IP address may have in negotiation at once.
pub const MAX_PENDING_PER_SOURCE: usize = 4;

/// The behaviour; see the module documentation.
#[derive(Debug, Default)]
pub struct PendingPerSource {
    pending: HashMap<ConnectionId, IpAddr>,
    per_source: HashMap<IpAddr, usize>,
    refused: u64,
}

/// The IP address a multiaddr starts with, if any.
fn source_ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl PendingPerSource {
    /// Connections refused so far because their source had too many
    /// pending.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    fn release(&mut self, connection: ConnectionId) {
        if let Some(ip) = self.pending.remove(&connection)
            && let Some(count) = self.per_source.get_mut(&ip)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_source.remove(&ip);
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Debug)]
pub struct TooManyPending(IpAddr);

impl std::fmt::Display for TooManyPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} already has {MAX_PENDING_PER_SOURCE} connections in negotiation",
            self.0
        )
    }
}

impl std::error::Error for TooManyPending {}

impl NetworkBehaviour for PendingPerSource {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = source_ip(remote) else {
            return Ok(());
        };
        let count = self.per_source.entry(ip).or_insert(0);
        if *count >= MAX_PENDING_PER_SOURCE {
            self.refused += 1;
            return Err(ConnectionDenied::new(TooManyPending(ip)));
        }
        *count += 1;
        self.pending.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.release(connection_id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. })
            | FromSwarm::ConnectionEstablished(ConnectionEstablished { connection_id, .. }) => {
                self.release(connection_id)
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(ip: &str) -> Multiaddr {
        format!("/ip4/{ip}/tcp/4000").parse().expect("addr")
    }

    #[test]
    fn one_source_gets_a_few_pending_slots_and_others_are_unaffected() {
        let mut limit = PendingPerSource::default();
        let local = from("127.0.0.1");
        let ids: Vec<ConnectionId> = (0..MAX_PENDING_PER_SOURCE)
            .map(|_| ConnectionId::new_unchecked(rand_id()))
            .collect();
        for id in &ids {
            assert!(
                limit
                    .handle_pending_inbound_connection(*id, &local, &from("10.0.0.9"))
                    .is_ok()
            );
        }
        let extra = ConnectionId::new_unchecked(rand_id());
        assert!(
            limit
                .handle_pending_inbound_connection(extra, &local, &from("10.0.0.9"))
                .is_err(),
            "beyond the limit"
        );
        assert_eq!(limit.refused(), 1);
        let other = ConnectionId::new_unchecked(rand_id());
        assert!(
            limit
                .handle_pending_inbound_connection(other, &local, &from("10.0.0.10"))
                .is_ok(),
            "another source is not affected"
        );
        limit.release(ids[0]);
        assert!(
            limit
                .handle_pending_inbound_connection(extra, &local, &from("10.0.0.9"))
                .is_ok(),
            "a finished negotiation gives its slot back"
        );
    }

    fn rand_id() -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(1_000_000);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}
