//! Which provider records other nodes may make this node hold.
//!
//! Kademlia's ADD_PROVIDER is open to every peer (the record must only name
//! its sender), and the DHT store shares one key budget between this
//! node's own announcements and everyone else's. Left alone, one peer
//! could fill it with junk keys for two days and this node could no longer
//! announce what it holds. So the behaviour hands inbound provider records
//! to the node ([`libp2p::kad::StoreInserts::FilterBoth`]) and this table
//! admits them within named bounds: foreign keys in all, keys per
//! announcing peer, key length, and addresses kept per record. Pure: the
//! caller passes the time.

use std::collections::HashMap;
use std::time::Instant;

use libp2p::kad::{ProviderRecord, RecordKey};
use libp2p::{Multiaddr, PeerId};

/// Keys other nodes may make this node remember providers for; the rest
/// of [`crate::MAX_PROVIDED_KEYS`] is this node's own.
pub const MAX_FOREIGN_PROVIDER_KEYS: usize = 1024;
/// Keys one peer may announce itself as provider of here.
pub const MAX_PROVIDER_KEYS_PER_PEER: usize = 256;
/// Longest provider key accepted (the node's model keys are 49 bytes).
pub const MAX_PROVIDER_KEY_BYTES: usize = 64;
/// Addresses kept per provider record, each at most
/// [`MAX_PROVIDER_ADDR_BYTES`]: with the counts above, what all foreign
/// records can cost stays under about 10 MB.
pub const MAX_PROVIDER_ADDRS: usize = 2;
/// Longest address kept in a provider record.
pub const MAX_PROVIDER_ADDR_BYTES: usize = 128;

/// The foreign provider records admitted, with when each expires.
#[derive(Debug, Default)]
pub(crate) struct ProviderAdmission {
    keys: HashMap<RecordKey, Vec<(PeerId, Option<Instant>)>>,
    per_peer: HashMap<PeerId, usize>,
}

/// What to do with an inbound provider record.
#[derive(Debug, PartialEq)]
pub(crate) enum Admission {
    /// Store this (trimmed) record; and first drop these expired ones.
    Store {
        record: ProviderRecord,
        expired: Vec<(RecordKey, PeerId)>,
    },
    /// Refuse it, for this reason (a fixed name, for the refusal counter).
    Refuse(&'static str, Vec<(RecordKey, PeerId)>),
}

impl ProviderAdmission {
    /// Decides on `record` at `now`.
    pub(crate) fn admit(&mut self, mut record: ProviderRecord, now: Instant) -> Admission {
        if record.key.as_ref().len() > MAX_PROVIDER_KEY_BYTES {
            return Admission::Refuse("key_too_long", Vec::new());
        }
        record.addresses = trim_addresses(std::mem::take(&mut record.addresses));
        let provider = record.provider;
        // Renewing a record already held costs nothing more.
        if let Some(entry) = self.keys.get_mut(&record.key)
            && let Some(slot) = entry.iter_mut().find(|(p, _)| *p == provider)
        {
            slot.1 = record.expires;
            return Admission::Store {
                record,
                expired: Vec::new(),
            };
        }
        let mut expired = Vec::new();
        let full = self.keys.len() >= MAX_FOREIGN_PROVIDER_KEYS
            || self.per_peer.get(&provider).copied().unwrap_or(0) >= MAX_PROVIDER_KEYS_PER_PEER;
        if full {
            expired = self.expire(now);
        }
        if self.per_peer.get(&provider).copied().unwrap_or(0) >= MAX_PROVIDER_KEYS_PER_PEER {
            return Admission::Refuse("too_many_from_peer", expired);
        }
        let known_key = self.keys.contains_key(&record.key);
        if !known_key && self.keys.len() >= MAX_FOREIGN_PROVIDER_KEYS {
            return Admission::Refuse("provider_store_full", expired);
        }
        let entry = self.keys.entry(record.key.clone()).or_default();
        if entry.len() >= crate::MAX_PROVIDERS_PER_KEY {
            return Admission::Refuse("key_full", expired);
        }
        entry.push((provider, record.expires));
        *self.per_peer.entry(provider).or_insert(0) += 1;
        Admission::Store { record, expired }
    }

    /// Forgets records past their expiry; returns them, for the store.
    fn expire(&mut self, now: Instant) -> Vec<(RecordKey, PeerId)> {
        let mut gone = Vec::new();
        self.keys.retain(|key, providers| {
            providers.retain(|(peer, expires)| {
                let alive = expires.is_none_or(|at| at > now);
                if !alive {
                    gone.push((key.clone(), *peer));
                }
                alive
            });
            !providers.is_empty()
        });
        for (_, peer) in &gone {
            if let Some(count) = self.per_peer.get_mut(peer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_peer.remove(peer);
                }
            }
        }
        gone
    }
}

fn trim_addresses(addresses: Vec<Multiaddr>) -> Vec<Multiaddr> {
    addresses
        .into_iter()
        .filter(|a| a.as_ref().len() <= MAX_PROVIDER_ADDR_BYTES)
        .take(MAX_PROVIDER_ADDRS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(key: &[u8], provider: PeerId, expires: Instant) -> ProviderRecord {
        ProviderRecord {
            key: RecordKey::new(&key),
            provider,
            expires: Some(expires),
            addresses: vec!["/ip4/127.0.0.1/tcp/1".parse().expect("addr"); 5],
        }
    }

    #[test]
    fn one_peer_cannot_fill_the_store_and_expired_records_make_room() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3600);
        let mut table = ProviderAdmission::default();
        let flooder = PeerId::random();
        let mut stored = 0;
        for i in 0..(MAX_PROVIDER_KEYS_PER_PEER + 50) {
            match table.admit(record(&(i as u32).to_le_bytes(), flooder, later), now) {
                Admission::Store { record, .. } => {
                    assert_eq!(record.addresses.len(), MAX_PROVIDER_ADDRS);
                    stored += 1;
                }
                Admission::Refuse(reason, _) => assert_eq!(reason, "too_many_from_peer"),
            }
        }
        assert_eq!(stored, MAX_PROVIDER_KEYS_PER_PEER);
        // Renewing one of its records is still fine.
        assert!(matches!(
            table.admit(record(&0u32.to_le_bytes(), flooder, later), now),
            Admission::Store { .. }
        ));
        // Another peer is not affected.
        assert!(matches!(
            table.admit(record(b"model", PeerId::random(), later), now),
            Admission::Store { .. }
        ));
        // Once the flooder's records expire they are dropped, store too.
        match table.admit(
            record(b"next", flooder, later),
            later + Duration::from_secs(1),
        ) {
            Admission::Store { expired, .. } => {
                assert_eq!(expired.len(), MAX_PROVIDER_KEYS_PER_PEER + 1)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            table.admit(record(&[7; 65], flooder, later), now),
            Admission::Refuse("key_too_long", _)
        ));
    }

    #[test]
    fn many_peers_cannot_take_more_than_the_foreign_share() {
        let now = Instant::now();
        let later = now + Duration::from_secs(3600);
        let mut table = ProviderAdmission::default();
        let mut refused = 0;
        for i in 0..(MAX_FOREIGN_PROVIDER_KEYS + 10) {
            let peer = PeerId::random();
            if let Admission::Refuse(reason, _) =
                table.admit(record(&(i as u32).to_le_bytes(), peer, later), now)
            {
                assert_eq!(reason, "provider_store_full");
                refused += 1;
            }
        }
        assert_eq!(refused, 10);
    }
}
