//! Finding committed transactions by hash, off the commit path.
//!
//! The indexer follows the ledger (commit notices, and the stored blocks
//! when it missed some or after a restart) and writes transaction
//! positions to the [`TxIndex`] in batches, every [`FLUSH_EVERY`] or
//! sooner when [`MAX_STAGED`] are waiting. Until a batch is written its
//! entries answer lookups from memory, so a transaction is findable as
//! soon as its commit notice is out. Batches are fsynced at most every
//! [`DURABLE_EVERY`] and at shutdown; a crash loses at most that much of
//! the index, which is re-derived from the ledger at the next start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openagi_consensus::Hash;
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use crate::common::store::{Store, StoreError, TxIndex, TxPosition};
use crate::daemon::consensus::CommitNotice;

/// How often staged entries are written to the index.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How often a write is fsynced.
pub const DURABLE_EVERY: Duration = Duration::from_secs(5);
/// Staged entries that force a write before [`FLUSH_EVERY`] (bounds memory).
pub const MAX_STAGED: usize = 100_000;
/// Blocks read from the store per step when catching up.
const CATCH_UP_CHUNK: u64 = 64;
/// Most blocks a lookup reads itself when the indexer is behind.
const MAX_LOOKUP_SCAN: u64 = 16;

/// What a lookup by transaction hash found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxLookupResult {
    /// Committed at this position.
    Committed(TxPosition),
    /// Not in any stored block.
    Unknown,
    /// The index is too far behind the ledger to say (it is being rebuilt).
    Indexing {
        /// The last block indexed.
        indexed: u64,
        /// The last stored block.
        head: u64,
    },
}

/// Lookups by transaction hash: the staged entries, then the index, then
/// the few stored blocks the indexer has not reached yet.
pub struct TxLookup {
    index: TxIndex,
    store: Arc<Store>,
    staged: Mutex<HashMap<Hash, TxPosition>>,
    /// Height of the last block staged or written.
    staged_through: AtomicU64,
}

impl TxLookup {
    /// Opens the index in `data_dir`, beside `store`.
    pub fn open(data_dir: &std::path::Path, store: Arc<Store>) -> Result<Self, StoreError> {
        Ok(Self {
            index: TxIndex::open(data_dir)?,
            store,
            staged: Mutex::new(HashMap::new()),
            staged_through: AtomicU64::new(0),
        })
    }

    /// Where the committed transaction `hash` is. A transaction whose
    /// commit was acknowledged is always found while the indexer keeps up
    /// (it trails the commit notices, so the few blocks it has not reached
    /// are read directly); while it is further behind (rebuilding the
    /// index, or stopped by a disk error) the answer is
    /// [`TxLookupResult::Indexing`], never a wrong "unknown".
    pub fn position(&self, hash: &Hash) -> Result<TxLookupResult, StoreError> {
        // Read before the lookups below so that a block staged meanwhile
        // is at worst scanned twice, never skipped.
        let through = self.staged_through.load(Ordering::Acquire);
        // Staged first: a write removes entries from here only after it
        // committed, so an entry is always in one place or the other.
        if let Some(position) = self.staged().get(hash) {
            return Ok(TxLookupResult::Committed(*position));
        }
        if let Some(position) = self.index.get(hash)? {
            return Ok(TxLookupResult::Committed(position));
        }
        let head = self.store.head_height()?;
        if head <= through {
            return Ok(TxLookupResult::Unknown);
        }
        if head - through > MAX_LOOKUP_SCAN {
            return Ok(TxLookupResult::Indexing {
                indexed: through,
                head,
            });
        }
        for (block, _) in self
            .store
            .blocks_from(through + 1, MAX_LOOKUP_SCAN as usize)?
        {
            if let Some(i) = block.txs.iter().position(|tx| tx.hash() == *hash) {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                return Ok(TxLookupResult::Committed((block.height, index)));
            }
        }
        Ok(TxLookupResult::Unknown)
    }

    fn staged(&self) -> MutexGuard<'_, HashMap<Hash, TxPosition>> {
        match self.staged.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The indexer's progress: what is staged and what is written.
struct Indexer {
    lookup: Arc<TxLookup>,
    /// Entries staged since the last write, in commit order.
    pending: Vec<(Hash, TxPosition)>,
    /// The last block staged: height and hash (height 0: none).
    staged_through: (u64, Hash),
    /// The last block written.
    written_through: u64,
    /// Whether a written batch is not yet fsynced.
    undurable: bool,
    last_durable: Instant,
}

impl Indexer {
    fn next_height(&self) -> u64 {
        self.staged_through.0 + 1
    }

    fn stage(&mut self, height: u64, block_hash: Hash, tx_hashes: &[Hash]) {
        let mut staged = self.lookup.staged();
        for (i, hash) in tx_hashes.iter().enumerate() {
            let position = (height, u32::try_from(i).unwrap_or(u32::MAX));
            // A transaction repeated in a later block took effect in the
            // first; that position stays.
            staged.entry(*hash).or_insert(position);
            self.pending.push((*hash, position));
        }
        drop(staged);
        self.staged_through = (height, block_hash);
        self.lookup.staged_through.store(height, Ordering::Release);
    }

    /// Stages stored blocks up to `until` (inclusive), a chunk at a time,
    /// until `stop` says the node is shutting down.
    fn catch_up(&mut self, until: u64, stop: &watch::Receiver<bool>) -> Result<(), StoreError> {
        while self.next_height() <= until && !*stop.borrow() {
            let limit = CATCH_UP_CHUNK.min(until + 1 - self.next_height());
            let blocks = self
                .lookup
                .store
                .blocks_from(self.next_height(), limit as usize)?;
            let mut progressed = false;
            for (block, _) in blocks {
                if block.height != self.next_height() {
                    break;
                }
                let hashes: Vec<Hash> = block.txs.iter().map(|tx| tx.hash()).collect();
                self.stage(block.height, block.hash(), &hashes);
                progressed = true;
            }
            if !progressed {
                break;
            }
            if self.pending.len() >= MAX_STAGED {
                self.write(false)?;
            }
        }
        Ok(())
    }

    /// Writes the staged entries, then forgets them from memory; fsyncs
    /// if `sync` or the last fsync is [`DURABLE_EVERY`] old.
    fn write(&mut self, sync: bool) -> Result<(), StoreError> {
        let fresh = self.staged_through.0 != self.written_through;
        let durable =
            (fresh || self.undurable) && (sync || self.last_durable.elapsed() >= DURABLE_EVERY);
        if !fresh && !durable {
            return Ok(());
        }
        self.lookup
            .index
            .write(&self.pending, self.staged_through, durable)?;
        self.undurable = !durable;
        if durable {
            self.last_durable = Instant::now();
        }
        let mut staged = self.lookup.staged();
        for (hash, _) in self.pending.drain(..) {
            staged.remove(&hash);
        }
        self.written_through = self.staged_through.0;
        Ok(())
    }
}

/// Starts the indexer: it checks the index against the ledger (an index
/// whose last block is not in the ledger, from another chain or a ledger
/// that was removed, or that cannot be read, is emptied and rebuilt),
/// catches up with the stored blocks and then follows `commits`. It ends
/// when `shutdown` turns true, after indexing the last commits.
pub fn start(
    lookup: Arc<TxLookup>,
    mut commits: Option<broadcast::Receiver<CommitNotice>>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::task::spawn_blocking(move || {
        let outcome = run(lookup, &mut commits, &mut shutdown);
        if let Err(e) = &outcome {
            // Lookups then answer "indexing" for new blocks, not "unknown".
            tracing::error!(
                error = format!("{e:#}"),
                "the transaction indexer stopped; lookups of newer transactions answer 503 until the node restarts"
            );
        }
        outcome
    })
}

fn run(
    lookup: Arc<TxLookup>,
    commits: &mut Option<broadcast::Receiver<CommitNotice>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<()> {
    let through = checked_watermark(&lookup)?;
    lookup.staged_through.store(through.0, Ordering::Release);
    let mut indexer = Indexer {
        lookup,
        pending: Vec::new(),
        staged_through: through,
        written_through: through.0,
        undurable: false,
        last_durable: Instant::now(),
    };
    let runtime = tokio::runtime::Handle::current();
    let head = indexer.lookup.store.head_height()?;
    if head > indexer.written_through {
        info!(
            from = indexer.next_height(),
            to = head,
            "indexing transactions of stored blocks"
        );
    }
    indexer.catch_up(head, shutdown)?;
    indexer.write(true)?;
    let mut flush_at = Instant::now() + FLUSH_EVERY;
    loop {
        let wait = flush_at.saturating_duration_since(Instant::now());
        let event = runtime.block_on(async {
            tokio::select! {
                _ = shutdown.changed() => Event::Stop,
                notice = next_notice(commits) => notice,
                _ = tokio::time::sleep(wait) => Event::Flush,
            }
        });
        match event {
            Event::Stop => break,
            Event::Notice(notice) => {
                if notice.height > indexer.next_height() {
                    indexer.catch_up(notice.height - 1, shutdown)?;
                }
                if notice.height == indexer.next_height() {
                    indexer.stage(notice.height, notice.block_hash, &notice.tx_hashes);
                }
                if indexer.pending.len() >= MAX_STAGED {
                    indexer.write(false)?;
                }
            }
            Event::Missed => {
                debug!("transaction indexer missed commit notices; reading the ledger");
                let head = indexer.lookup.store.head_height()?;
                indexer.catch_up(head, shutdown)?;
            }
            Event::Closed => *commits = None,
            Event::Flush => {
                // Blocks stored without a notice (state transfer)
                // are picked up here.
                let head = indexer.lookup.store.head_height()?;
                indexer.catch_up(head, shutdown)?;
                indexer.write(false)?;
                flush_at = Instant::now() + FLUSH_EVERY;
            }
        }
    }
    // The last commits (consensus has stopped): a short catch-up, not
    // a rebuild, so shutdown stays quick; the next start does the rest.
    let head = indexer.lookup.store.head_height()?;
    if head.saturating_sub(indexer.staged_through.0) <= CATCH_UP_CHUNK {
        let (_, never) = watch::channel(false);
        indexer.catch_up(head, &never)?;
    }
    indexer
        .write(true)
        .context("writing the transaction index")?;
    Ok(())
}

/// The index's watermark if it matches the ledger; otherwise the index is
/// emptied and indexing starts from the first block.
fn checked_watermark(lookup: &TxLookup) -> Result<(u64, Hash), StoreError> {
    let reason = match lookup.index.through() {
        Ok(None) => return Ok((0, [0; 32])),
        Ok(Some((height, hash))) => {
            let same = lookup
                .store
                .block(height)?
                .is_some_and(|(block, _)| block.hash() == hash);
            if same {
                return Ok((height, hash));
            }
            format!("its block {height} is not in the ledger")
        }
        Err(e) => format!("its watermark is unreadable ({e})"),
    };
    warn!(%reason, "rebuilding the transaction index");
    lookup.index.clear()?;
    Ok((0, [0; 32]))
}

enum Event {
    Stop,
    Notice(CommitNotice),
    Missed,
    Closed,
    Flush,
}

async fn next_notice(commits: &mut Option<broadcast::Receiver<CommitNotice>>) -> Event {
    match commits {
        Some(rx) => match rx.recv().await {
            Ok(notice) => Event::Notice(notice),
            Err(broadcast::error::RecvError::Lagged(_)) => Event::Missed,
            Err(broadcast::error::RecvError::Closed) => Event::Closed,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openagi_consensus::types::{BatchHeader, batch_root};
    use openagi_consensus::{Block, ClientId, CommitCertificate, PersistRecord, Transaction};

    fn block(height: u64, prev_hash: Hash, label: &str) -> (Block, CommitCertificate) {
        let txs: Vec<Transaction> = (0..5)
            .map(|i| Transaction {
                client: ClientId([7; 32]),
                seq: height * 10 + i,
                payload: format!("{label} {height}/{i}").into_bytes().into(),
            })
            .collect();
        let root = batch_root(&txs);
        let block = Block {
            height,
            view: 0,
            prev_hash,
            batch_root: root,
            timestamp: height,
            txs,
        };
        let certificate = CommitCertificate {
            view: 0,
            seq: height,
            header: BatchHeader {
                proposed_view: 0,
                timestamp: height,
                batch_root: root,
            },
            commits: Vec::new(),
        };
        (block, certificate)
    }

    /// Stores `count` blocks after the current head; returns them.
    fn append(store: &Store, count: u64, label: &str) -> Vec<Block> {
        let head = store.head_height().expect("head");
        let mut prev = match store.block(head).expect("read") {
            Some((b, _)) => b.hash(),
            None => [0; 32],
        };
        let mut out = Vec::new();
        for height in head + 1..=head + count {
            let (b, certificate) = block(height, prev, label);
            prev = b.hash();
            store
                .persist_consensus(&[PersistRecord::Block {
                    block: b.clone(),
                    certificate,
                }])
                .expect("persist");
            out.push(b);
        }
        out
    }

    async fn wait_indexed(lookup: &TxLookup, height: u64) {
        for _ in 0..200 {
            if lookup.index.through().expect("read").map(|t| t.0) == Some(height) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("index never reached height {height}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_blocks_are_found_before_and_after_indexing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let blocks = append(&store, 3, "a");
        let lookup = Arc::new(TxLookup::open(dir.path(), store.clone()).expect("index"));
        let wanted = blocks[1].txs[4].hash();
        // Not indexed yet: read from the ledger.
        assert_eq!(
            lookup.position(&wanted).expect("lookup"),
            TxLookupResult::Committed((2, 4))
        );

        let (stop, stopping) = watch::channel(false);
        let task = start(lookup.clone(), None, stopping);
        wait_indexed(&lookup, 3).await;
        assert_eq!(lookup.index.get(&wanted).expect("get"), Some((2, 4)));
        assert_eq!(
            lookup.position(&wanted).expect("lookup"),
            TxLookupResult::Committed((2, 4))
        );
        assert_eq!(
            lookup.position(&[9; 32]).expect("lookup"),
            TxLookupResult::Unknown
        );

        // Blocks stored without a notice (state transfer) are picked up.
        let later = append(&store, 2, "a");
        wait_indexed(&lookup, 5).await;
        assert_eq!(
            lookup.index.get(&later[1].txs[0].hash()).expect("get"),
            Some((5, 0))
        );
        stop.send(true).expect("stop");
        task.await.expect("joins").expect("stops cleanly");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notice_after_a_gap_indexes_the_missed_blocks_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let lookup = Arc::new(TxLookup::open(dir.path(), store.clone()).expect("index"));
        let (commits, rx) = broadcast::channel(4);
        let (stop, stopping) = watch::channel(false);
        let task = start(lookup.clone(), Some(rx), stopping);
        let blocks = append(&store, 3, "b");
        let last = &blocks[2];
        commits
            .send(CommitNotice {
                height: 3,
                block_hash: last.hash(),
                tx_hashes: last.txs.iter().map(Transaction::hash).collect(),
                block: Arc::new(last.clone()),
            })
            .expect("send");
        wait_indexed(&lookup, 3).await;
        for b in &blocks {
            for (i, tx) in b.txs.iter().enumerate() {
                assert_eq!(
                    lookup.position(&tx.hash()).expect("lookup"),
                    TxLookupResult::Committed((b.height, i as u32))
                );
            }
        }
        stop.send(true).expect("stop");
        task.await.expect("joins").expect("stops cleanly");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_index_of_another_ledger_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = {
            let store = Arc::new(Store::open(dir.path()).expect("store"));
            let blocks = append(&store, 3, "old");
            let lookup = Arc::new(TxLookup::open(dir.path(), store).expect("index"));
            let (stop, stopping) = watch::channel(false);
            let task = start(lookup.clone(), None, stopping);
            wait_indexed(&lookup, 3).await;
            stop.send(true).expect("stop");
            task.await.expect("joins").expect("stops cleanly");
            blocks
        };
        // The ledger is replaced (another chain), the index file is not.
        std::fs::remove_file(dir.path().join(crate::common::store::STORE_FILE)).expect("remove");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let new = append(&store, 4, "new");
        let lookup = Arc::new(TxLookup::open(dir.path(), store).expect("index"));
        let (stop, stopping) = watch::channel(false);
        let task = start(lookup.clone(), None, stopping);
        wait_indexed(&lookup, 4).await;
        assert_eq!(lookup.index.get(&old[0].txs[0].hash()).expect("get"), None);
        assert_eq!(
            lookup.position(&new[3].txs[2].hash()).expect("lookup"),
            TxLookupResult::Committed((4, 2))
        );
        stop.send(true).expect("stop");
        task.await.expect("joins").expect("stops cleanly");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn far_behind_it_says_indexing_and_a_repeated_transaction_keeps_its_first_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let blocks = append(&store, MAX_LOOKUP_SCAN + 4, "c");
        let lookup = Arc::new(TxLookup::open(dir.path(), store.clone()).expect("index"));
        let late = blocks[blocks.len() - 1].txs[0].hash();
        assert_eq!(
            lookup.position(&late).expect("lookup"),
            TxLookupResult::Indexing {
                indexed: 0,
                head: MAX_LOOKUP_SCAN + 4
            },
            "too far behind to scan: neither committed nor unknown"
        );

        // The same transaction again in a later block (it took no effect).
        let head = store.head_height().expect("head");
        let prev = store.block(head).expect("read").expect("block").0.hash();
        let (mut again, certificate) = block(head + 1, prev, "c");
        again.txs[1] = blocks[0].txs[2].clone();
        store
            .persist_consensus(&[PersistRecord::Block {
                block: again,
                certificate,
            }])
            .expect("persist");
        let (stop, stopping) = watch::channel(false);
        let task = start(lookup.clone(), None, stopping);
        wait_indexed(&lookup, head + 1).await;
        assert_eq!(
            lookup.position(&late).expect("lookup"),
            TxLookupResult::Committed((MAX_LOOKUP_SCAN + 4, 0))
        );
        assert_eq!(
            lookup.index.get(&blocks[0].txs[2].hash()).expect("get"),
            Some((1, 2))
        );
        stop.send(true).expect("stop");
        task.await.expect("joins").expect("stops cleanly");
    }
}
