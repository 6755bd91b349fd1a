//! The replicated ledger: the head of the chain of committed blocks, the
//! most recent blocks, and the exactly-once table that decides which
//! transactions take effect.

use std::collections::{BTreeSet, HashMap, VecDeque};

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
/// exactly-once table derived from it. Only the most recent blocks stay in
/// memory (the node keeps the whole chain on disk), so a running replica's
/// memory does not grow with the chain; [`crate::Replica::restore`] still
/// replays the whole stored chain once.
#[derive(Clone, Debug)]
pub struct Ledger {
    network: NetworkId,
    /// The most recent blocks, oldest first.
    blocks: VecDeque<(Block, CommitCertificate)>,
    /// Most blocks kept in `blocks`.
    keep: usize,
    clients: HashMap<ClientId, ClientRecord>,
    head: ChainAnchor,
}

impl Ledger {
    /// An empty ledger for `network` that keeps every block in memory.
    pub fn new(network: NetworkId) -> Self {
        Self::keeping(network, usize::MAX)
    }

    /// An empty ledger for `network` that keeps the last `keep` blocks in
    /// memory (at least one).
    pub fn keeping(network: NetworkId, keep: usize) -> Self {
        Ledger {
            network,
            blocks: VecDeque::new(),
            keep: keep.max(1),
            clients: HashMap::new(),
            head: ChainAnchor::genesis(network),
        }
    }

    /// Height of the oldest block in memory (the next height when none).
    pub fn first_in_memory(&self) -> u64 {
        self.blocks
            .front()
            .map_or(self.head.height.saturating_add(1), |(b, _)| b.height)
    }

    /// Height of the last block (0 when empty).
    pub fn height(&self) -> u64 {
        self.head.height
    }

    /// The head: height, hash and timestamp of the last block.
    pub fn head(&self) -> ChainAnchor {
        self.head
    }

    /// The block at `height` with its certificate, if it is in memory.
    pub fn get(&self, height: u64) -> Option<&(Block, CommitCertificate)> {
        let index = usize::try_from(height.checked_sub(self.first_in_memory())?).ok()?;
        self.blocks.get(index)
    }

    /// The blocks in memory, in height order.
    pub fn blocks(&self) -> impl Iterator<Item = &(Block, CommitCertificate)> {
        self.blocks.iter()
    }

    /// Hash of the block at `height` (the genesis hash for 0), if it is in
    /// memory.
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
        self.blocks.push_back((block, cert));
        while self.blocks.len() > self.keep {
            self.blocks.pop_front();
        }
        applied
    }
}
