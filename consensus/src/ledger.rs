//! The replicated ledger: the chain of committed blocks and the
//! exactly-once table that decides which transactions take effect.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::Hash;
use crate::types::{
    Batch, Block, ChainAnchor, ClientId, CommitCertificate, NetworkId, Transaction, batch_root,
};

/// How many applied sequence numbers above a client's contiguous floor are
/// remembered. A client with more gaps than this loses its oldest gaps (the
/// floor jumps), which can only refuse its transactions, never apply one
/// twice, and bounds the table per client.
pub const CLIENT_WINDOW: usize = 1024;

/// Per-client record of applied sequence numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ClientRecord {
    /// Every sequence number at or below this is applied or refused.
    floor: u64,
    /// Applied sequence numbers above `floor`.
    above: BTreeSet<u64>,
}

impl ClientRecord {
    fn contains(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        self.above.insert(seq);
        while self.above.first() == Some(&self.floor.saturating_add(1)) {
            self.above.pop_first();
            self.floor = self.floor.saturating_add(1);
        }
        while self.above.len() > CLIENT_WINDOW {
            if let Some(lowest) = self.above.pop_first() {
                self.floor = lowest;
            }
        }
    }
}

/// The chain of committed blocks with their certificates, and the
/// exactly-once table derived from it.
#[derive(Clone, Debug)]
pub struct Ledger {
    network: NetworkId,
    blocks: Vec<(Block, CommitCertificate)>,
    clients: HashMap<ClientId, ClientRecord>,
    head: ChainAnchor,
}

impl Ledger {
    /// An empty ledger for `network`.
    pub fn new(network: NetworkId) -> Self {
        Ledger {
            network,
            blocks: Vec::new(),
            clients: HashMap::new(),
            head: ChainAnchor::genesis(network),
        }
    }

    /// Height of the last block (0 when empty).
    pub fn height(&self) -> u64 {
        self.head.height
    }

    /// The head: height, hash and timestamp of the last block.
    pub fn head(&self) -> ChainAnchor {
        self.head
    }

    /// The block at `height` with its certificate.
    pub fn get(&self, height: u64) -> Option<&(Block, CommitCertificate)> {
        let index = usize::try_from(height.checked_sub(1)?).ok()?;
        self.blocks.get(index)
    }

    /// All blocks in height order.
    pub fn blocks(&self) -> &[(Block, CommitCertificate)] {
        &self.blocks
    }

    /// Hash of the block at `height` (the genesis hash for 0).
    pub fn hash_at(&self, height: u64) -> Option<Hash> {
        if height == 0 {
            return Some(ChainAnchor::genesis(self.network).hash);
        }
        self.get(height).map(|(b, _)| b.hash())
    }

    /// Whether `(client, seq)` has already taken effect (or can no longer).
    pub fn is_applied(&self, client: &ClientId, seq: u64) -> bool {
        self.clients.get(client).is_some_and(|r| r.contains(seq))
    }

    /// Builds the block that `batch` becomes at the next height.
    pub fn next_block(&self, batch: &Batch) -> Block {
        self.block_from(batch.clone(), batch_root(&batch.txs))
    }

    /// [`Self::next_block`] for a batch whose root the caller already has
    /// (hashing every transaction again is the costly part).
    pub fn block_from(&self, batch: Batch, batch_root: Hash) -> Block {
        Block {
            height: self.head.height.saturating_add(1),
            view: batch.proposed_view,
            prev_hash: self.head.hash,
            batch_root,
            timestamp: batch.timestamp.max(self.head.timestamp),
            txs: batch.txs,
        }
    }

    /// Appends a block the caller has already verified to extend the head,
    /// and returns the transactions that took effect (first time their
    /// `(client, seq)` is seen, in block order).
    pub fn append(&mut self, block: Block, cert: CommitCertificate) -> Vec<Transaction> {
        let mut applied = Vec::new();
        for tx in &block.txs {
            let record = self.clients.entry(tx.client).or_default();
            if !record.contains(tx.seq) {
                record.insert(tx.seq);
                applied.push(tx.clone());
            }
        }
        self.head = ChainAnchor {
            height: block.height,
            hash: block.hash(),
            timestamp: block.timestamp,
        };
        self.blocks.push((block, cert));
        applied
    }
}
