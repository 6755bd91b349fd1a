//! The node's on-disk store: one redb database in the data directory, and
//! a second one for the transaction index.
//!
//! Every write to the store is one redb transaction committed with
//! immediate durability (fsync) before the call returns, so anything the
//! node acknowledges has reached the disk. The transaction index
//! ([`TxIndex`]) is derived from the ledger and lives in its own file with
//! its own, lazier durability: inserting a block's transaction hashes at
//! random places in a B-tree costs more than writing the block (measured:
//! 19 ms against 2 ms for 1024 transactions), so it is kept off the path
//! that acknowledges commits and rebuilt from the ledger after a crash.
//! The engine sits behind this module alone, so changing it is a one-file
//! change.

use std::path::{Path, PathBuf};

use openagi_consensus::{Block, CommitCertificate, PersistRecord, PersistedState};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// The database file name inside the data directory.
pub const STORE_FILE: &str = "node.redb";

/// The transaction index's file inside the data directory.
pub const TX_INDEX_FILE: &str = "txindex.redb";
/// redb's page cache for `node.redb`. redb's default is 1 GiB per
/// database, a ceiling that a node writing blocks fills with pages it
/// never reads again (a validator offered 30,000 tx/s reached 458-614 MiB
/// resident). What is read back is the B-tree's interior pages and the
/// recent blocks a lagging peer asks for; 64 MiB holds those with room.
pub const STORE_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// redb's page cache for the transaction index: lookups touch one path
/// through the tree each.
pub const TX_INDEX_CACHE_BYTES: usize = 32 * 1024 * 1024;

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const PEERS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("peers");
/// Peers banned for misbehaviour: peer id to the unix ms the ban ends.
const BANS: TableDefinition<'_, &str, u64> = TableDefinition::new("bans");
/// Consensus scalars: current view, stable checkpoint.
const PBFT_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("pbft_meta");
/// Latest vote per sequence number: postcard `(view, digest)`.
const PBFT_VOTES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("pbft_votes");
/// Highest-view prepared proof per sequence number (postcard).
const PBFT_PREPARED: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("pbft_prepared");
/// Ledger blocks by height: postcard `(Block, CommitCertificate)`.
const BLOCKS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("blocks");
/// Where each committed transaction is: hash to `(height, index)`. In
/// [`TX_INDEX_FILE`]; versions before it kept the table in the store.
const TX_INDEX: TableDefinition<'_, &[u8; 32], (u64, u32)> = TableDefinition::new("tx_index");
/// The transaction index's watermark: `"through"` holds postcard
/// `(height, block hash)` of the last block indexed.
const TX_INDEX_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("tx_index_meta");
/// Messaging state: `"ratchet"` holds the encrypted Double Ratchet pickle
/// (account and sessions).
const MSG_STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("msg_state");
/// Received messages by arrival number, each encrypted at rest.
const INBOX: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("inbox");
/// Invite codes by hash (the codes themselves are never stored).
const INVITES: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("invites");
/// Envelopes this node holds for the mesh, by envelope id: postcard
/// `(upstream peer key or none for our own, envelope)`. Bodies are sealed
/// to their recipients.
const MESH_HELD: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("mesh_held");
/// Ids of envelopes addressed to this node that it has taken, with their
/// expiry (Unix ms): a copy arriving later by another path is a duplicate.
const MESH_SEEN: TableDefinition<'_, &[u8; 32], u64> = TableDefinition::new("mesh_seen");
/// Messages this node sent, by number, each encrypted at rest.
const OUTBOX: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("outbox");
/// Which outbox entry an envelope this node sent belongs to.
const OUTBOX_BY_ENVELOPE: TableDefinition<'_, &[u8; 32], u64> =
    TableDefinition::new("outbox_by_envelope");
/// Peers' signed mesh contact statements (their sealing and ratchet keys)
/// by node key.
const MESH_CONTACTS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("mesh_contacts");

/// Most messages kept in the inbox; the oldest go first.
pub const MAX_INBOX: u64 = 10_000;
/// Most messages kept in the outbox; the oldest go first (whatever their
/// state: an entry this old has long expired).
pub const MAX_OUTBOX: u64 = 10_000;
/// Most peers whose mesh contact statement is kept.
pub const MAX_MESH_CONTACTS: u64 = 4096;

/// Every messaging change one event makes, written in one fsynced
/// transaction so that a crash leaves all of it or none: the ratchet state
/// never runs ahead of the inbox, the outbox or the envelopes that carry
/// its messages.
#[derive(Debug, Default)]
pub struct MsgWrite<'a> {
    /// The new ratchet pickle.
    pub ratchet: Option<&'a [u8]>,
    /// A received message (encrypted entry) for the inbox.
    pub inbox: Option<&'a [u8]>,
    /// An envelope addressed to this node that is now taken: id, expiry.
    pub seen: Option<([u8; 32], u64)>,
    /// Envelopes to hold: id and encoded `(upstream, envelope)`.
    pub hold: Vec<HeldEnvelope>,
    /// Envelopes to let go of.
    pub release: Vec<[u8; 32]>,
    /// Outbox entries to write: number (0 for a new one) and encrypted
    /// entry; with the envelope that carries it, when there is one.
    pub outbox: Vec<(u64, Vec<u8>, Option<[u8; 32]>)>,
    /// A peer's contact statement: its node key and the statement.
    pub contact: Option<([u8; 32], Vec<u8>)>,
}

/// A held envelope as stored: its id and encoded `(upstream, envelope)`.
pub type HeldEnvelope = ([u8; 32], Vec<u8>);

/// What a [`MsgWrite`] assigned.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MsgWritten {
    /// The inbox entry's number.
    pub inbox: Option<u64>,
    /// The outbox entries' numbers, in the order written.
    pub outbox: Vec<u64>,
}

/// Most peers kept in the address book; the least recently seen go first.
pub const MAX_KNOWN_PEERS: usize = 1024;
/// Bans kept, as many as the network layer tracks.
pub const MAX_BANS: usize = openagi_net::MAX_TRACKED_PEERS;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database engine failed.
    #[error("database {0}")]
    Engine(String),
    /// The database has an older schema; `openagi run --migrate` upgrades it.
    #[error(
        "{STORE_FILE} has schema version {found} and this openagi uses {supported}: back up the data directory, \
         then start the node once with `openagi run --migrate` to upgrade it (UPGRADING.md says what changes)"
    )]
    NeedsMigration {
        /// The version found.
        found: u32,
        /// The version this build uses.
        supported: u32,
    },
    /// The database was written by a newer version.
    #[error(
        "{STORE_FILE} has schema version {found}, written by a newer openagi; this one reads up to {supported}: \
         run the newer version (a database is never migrated backwards)"
    )]
    TooNew {
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// There is no database: the node has not run yet.
    #[error("no database at {}: this node has not run yet", .0.display())]
    Missing(PathBuf),
    /// A write failed for lack of space: a full disk, a file-size limit or
    /// a quota. What was written before is intact (every write is one
    /// transaction), and nothing that failed was acknowledged.
    #[error(
        "no space to write the database ({0}): free space on the disk holding the data directory (or raise \
         the file-size limit or quota), then start the node again; nothing it acknowledged is lost"
    )]
    NoSpace(String),
    /// The database file is damaged (truncated, overwritten, flipped
    /// bits): it cannot be opened.
    #[error(
        "{} is damaged ({detail}). Move it away (`mv {} {}.damaged`) and start the node \
         again: it fetches the ledger from its peers (a validator recovers its consensus state as after a \
         lost disk)",
        .path.display(), .path.display(), .path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What the database engine found.
        detail: String,
    },
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table}, key {key}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// The decoding error.
        detail: String,
    },
}

/// The stamped schema version; a database without one is version 1.
fn read_schema_version(db: &impl ReadableDatabase) -> Result<u32, StoreError> {
    let txn = db.begin_read().map_err(engine)?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(1),
        Err(e) => return Err(engine(e)),
    };
    match meta.get(SCHEMA_KEY).map_err(engine)? {
        None => Ok(1),
        Some(v) => <[u8; 4]>::try_from(v.value())
            .map(u32::from_le_bytes)
            .map_err(|_| StoreError::Corrupt {
                table: "meta",
                key: SCHEMA_KEY.into(),
                detail: format!("{} bytes, expected 4", v.value().len()),
            }),
    }
}

fn stamp_schema(txn: &redb::WriteTransaction, version: u32) -> Result<(), StoreError> {
    txn.open_table(META)
        .map_err(engine)?
        .insert(SCHEMA_KEY, version.to_le_bytes().as_slice())
        .map_err(engine)?;
    Ok(())
}

fn engine(e: impl std::fmt::Display) -> StoreError {
    let text = e.to_string();
    // redb passes I/O errors on as text; the OS's codes for a full disk
    // (ENOSPC), a file-size limit (EFBIG) and a disk quota (EDQUOT) are
    // stable in it, and the operator's fix differs from an engine fault.
    const NO_SPACE: [&str; 3] = ["(os error 28)", "(os error 27)", "(os error 122)"];
    if NO_SPACE.iter().any(|code| text.contains(code)) {
        return StoreError::NoSpace(text);
    }
    StoreError::Engine(text)
}

/// An error opening the database file at `path`: [`StoreError::Damaged`]
/// when the engine says the file is not a sound database.
fn damage_or_engine(path: &Path, e: redb::DatabaseError) -> StoreError {
    let damaged = match &e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => true,
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    };
    if damaged {
        StoreError::Damaged {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    } else {
        engine(e)
    }
}

/// Runs `open` (the engine opening the database file at `path`), turning
/// a panic inside it into [`StoreError::Damaged`]: a damaged file can trip
/// the engine's own consistency checks, and the operator needs the file's
/// name and what to do (the panic's own line still reaches stderr).
fn open_guarded<T>(
    path: &Path,
    open: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)) {
        Ok(result) => result,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the database engine stopped on it".into());
            Err(StoreError::Damaged {
                path: path.to_path_buf(),
                detail,
            })
        }
    }
}

/// A peer the node has been connected to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    /// Addresses it was reached at (dialable multiaddrs with `/p2p/` id).
    pub addresses: Vec<String>,
    /// Unix seconds it was last connected.
    pub last_seen: u64,
}

/// The node's database.
pub struct Store {
    db: Database,
    /// Whether [`Store::open`] created the file (it did not exist before).
    created: bool,
}

/// The layout of `node.redb` this version reads and writes. Every change
/// to a table's layout or meaning bumps it and adds a step to
/// [`Store::open_migrating`]; UPGRADING.md says what each step does.
///
/// - 1: the layout before versions were stamped (it may still hold the
///   transaction index as the `tx_index` table).
/// - 2: `meta.schema_version` stamped; the transaction index lives in
///   its own file (`txindex.redb`, rebuilt from the blocks);
///   `pbft_meta.instance` ties the consensus state to `consensus.started`.
pub const SCHEMA_VERSION: u32 = 2;

/// Key of the schema version in the `meta` table (4 bytes, little endian).
const SCHEMA_KEY: &str = "schema_version";

/// An invite as the inviter keeps it (under its code's hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Invite {
    /// The code's first group, to recognise it in a list (`OAGI-7K2M`).
    pub label: String,
    /// When it was made (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it stops working.
    pub expires_ms: u64,
    /// Redemptions left.
    pub uses_left: u32,
    /// Revoked by the operator.
    pub revoked: bool,
}

impl Invite {
    /// Why the invite cannot be redeemed at `now_ms`, or `None` when it can.
    pub fn refusal(&self, now_ms: u64) -> Option<InviteRefusal> {
        if self.revoked {
            Some(InviteRefusal::Revoked)
        } else if now_ms >= self.expires_ms {
            Some(InviteRefusal::Expired)
        } else if self.uses_left == 0 {
            Some(InviteRefusal::Spent)
        } else {
            None
        }
    }
}

/// Why an invite code was not redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InviteRefusal {
    /// No invite has this code.
    #[error("no such invite code on this node (check the code, or ask for a new one)")]
    Unknown,
    /// The operator revoked it.
    #[error("this invite code was revoked by the node that made it")]
    Revoked,
    /// Its time ran out.
    #[error("this invite code has expired; ask for a new one")]
    Expired,
    /// All its uses are spent.
    #[error("this invite code was already used; ask for a new one")]
    Spent,
}

impl Store {
    /// Opens or creates the database in `data_dir`. A database of an older
    /// schema is refused ([`StoreError::NeedsMigration`]) and so is one
    /// of a newer version ([`StoreError::TooNew`]): nothing is changed
    /// until the operator asks for the migration.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, false).map(|(store, _)| store)
    }

    /// Opens the database like [`Store::open`], first migrating an older
    /// schema step by step (each step one fsynced transaction). Returns
    /// the steps taken, in words, for the log.
    pub fn open_migrating(data_dir: &Path) -> Result<(Self, Vec<String>), StoreError> {
        Self::open_with(data_dir, true)
    }

    fn open_with(data_dir: &Path, migrate: bool) -> Result<(Self, Vec<String>), StoreError> {
        let path = data_dir.join(STORE_FILE);
        let created = !path.exists();
        // Only the engine's own opening of the file is guarded: a panic in
        // the schema checks or a migration is a bug, not a damaged file.
        let db = open_guarded(&path, || {
            Database::builder()
                .set_cache_size(STORE_CACHE_BYTES)
                .create(&path)
                .map_err(|e| damage_or_engine(&path, e))
        })?;
        Self::prepare(db, created, migrate)
    }

    /// Checks the schema (migrating if asked) and makes sure every table
    /// exists.
    fn prepare(
        db: Database,
        created: bool,
        migrate: bool,
    ) -> Result<(Self, Vec<String>), StoreError> {
        let found = if created {
            SCHEMA_VERSION
        } else {
            read_schema_version(&db)?
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        let mut steps = Vec::new();
        if found < SCHEMA_VERSION {
            if !migrate {
                return Err(StoreError::NeedsMigration {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            // Version 1 to 2: the transaction index moved to its own file,
            // where it is rebuilt from the blocks; the stamp is new.
            let txn = db.begin_write().map_err(engine)?;
            txn.delete_table(TX_INDEX).map_err(engine)?;
            stamp_schema(&txn, 2)?;
            txn.commit().map_err(engine)?;
            steps.push(format!(
                "schema {found} -> 2: transaction index moved to {TX_INDEX_FILE} (rebuilt from the blocks)"
            ));
        }
        let txn = db.begin_write().map_err(engine)?;
        txn.open_table(META).map_err(engine)?;
        txn.open_table(PEERS).map_err(engine)?;
        txn.open_table(BANS).map_err(engine)?;
        txn.open_table(PBFT_META).map_err(engine)?;
        txn.open_table(PBFT_VOTES).map_err(engine)?;
        txn.open_table(PBFT_PREPARED).map_err(engine)?;
        txn.open_table(BLOCKS).map_err(engine)?;
        txn.open_table(MSG_STATE).map_err(engine)?;
        txn.open_table(INBOX).map_err(engine)?;
        txn.open_table(INVITES).map_err(engine)?;
        txn.open_table(MESH_HELD).map_err(engine)?;
        txn.open_table(MESH_SEEN).map_err(engine)?;
        txn.open_table(OUTBOX).map_err(engine)?;
        txn.open_table(OUTBOX_BY_ENVELOPE).map_err(engine)?;
        txn.open_table(MESH_CONTACTS).map_err(engine)?;
        if created {
            stamp_schema(&txn, SCHEMA_VERSION)?;
        }
        txn.commit().map_err(engine)?;
        Ok((Self { db, created }, steps))
    }

    /// The schema version of the database in `data_dir` without changing
    /// anything, or `None` when there is none. Fails while a daemon holds
    /// the database open.
    pub fn schema_version_at(data_dir: &Path) -> Result<Option<u32>, StoreError> {
        let path = data_dir.join(STORE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let db = Database::open(&path).map_err(engine)?;
        read_schema_version(&db).map(Some)
    }

    /// Whether this process created the database file: nothing that an
    /// earlier run stored is in it.
    pub fn created_now(&self) -> bool {
        self.created
    }

    /// The consensus instance this database belongs to (see
    /// `consensus::ReplicaSetup::marker`), if the replica ever ran on it.
    pub fn consensus_instance(&self) -> Result<Option<[u8; 16]>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let meta = txn.open_table(PBFT_META).map_err(engine)?;
        match meta.get("instance").map_err(engine)? {
            None => Ok(None),
            Some(v) => v
                .value()
                .try_into()
                .map(Some)
                .map_err(|_| StoreError::Corrupt {
                    table: "pbft_meta",
                    key: "instance".into(),
                    detail: format!("{} bytes, expected 16", v.value().len()),
                }),
        }
    }

    /// Records the consensus instance id, fsynced before it returns.
    pub fn set_consensus_instance(&self, id: [u8; 16]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        txn.open_table(PBFT_META)
            .map_err(engine)?
            .insert("instance", id.as_slice())
            .map_err(engine)?;
        txn.commit().map_err(engine)?;
        Ok(())
    }

    /// The stored (encrypted) ratchet pickle, if any.
    pub fn ratchet_pickle(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MSG_STATE).map_err(engine)?;
        Ok(table
            .get("ratchet")
            .map_err(engine)?
            .map(|v| v.value().to_vec()))
    }

    /// Replaces the ratchet pickle and, with `received`, appends one
    /// (encrypted) inbox entry, in one fsynced transaction: a message is
    /// never in the inbox without the session state that decrypted it, so
    /// a replay after a crash is refused. Returns the entry's number.
    pub fn save_ratchet(
        &self,
        pickle: &[u8],
        received: Option<&[u8]>,
    ) -> Result<Option<u64>, StoreError> {
        self.write_msg(MsgWrite {
            ratchet: Some(pickle),
            inbox: received,
            ..MsgWrite::default()
        })
        .map(|written| written.inbox)
    }

    /// Writes every part of `write` in one fsynced transaction.
    pub fn write_msg(&self, write: MsgWrite<'_>) -> Result<MsgWritten, StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        let mut written = MsgWritten::default();
        {
            if let Some(pickle) = write.ratchet {
                let mut state = txn.open_table(MSG_STATE).map_err(engine)?;
                state.insert("ratchet", pickle).map_err(engine)?;
            }
            if let Some(entry) = write.inbox {
                let mut inbox = txn.open_table(INBOX).map_err(engine)?;
                let next = inbox
                    .last()
                    .map_err(engine)?
                    .map_or(1, |(k, _)| k.value() + 1);
                inbox.insert(next, entry).map_err(engine)?;
                if next > MAX_INBOX {
                    let cutoff = next - MAX_INBOX;
                    inbox.retain_in(..=cutoff, |_, _| false).map_err(engine)?;
                }
                written.inbox = Some(next);
            }
            if let Some((id, expires)) = write.seen {
                let mut seen = txn.open_table(MESH_SEEN).map_err(engine)?;
                seen.insert(&id, expires).map_err(engine)?;
            }
            let mut held = txn.open_table(MESH_HELD).map_err(engine)?;
            for (id, bytes) in &write.hold {
                held.insert(id, bytes.as_slice()).map_err(engine)?;
            }
            for id in &write.release {
                held.remove(id).map_err(engine)?;
            }
            let mut outbox = txn.open_table(OUTBOX).map_err(engine)?;
            let mut by_envelope = txn.open_table(OUTBOX_BY_ENVELOPE).map_err(engine)?;
            for (number, entry, envelope) in &write.outbox {
                let number = if *number == 0 {
                    outbox
                        .last()
                        .map_err(engine)?
                        .map_or(1, |(k, _)| k.value() + 1)
                } else {
                    *number
                };
                outbox.insert(number, entry.as_slice()).map_err(engine)?;
                if let Some(id) = envelope {
                    by_envelope.insert(id, number).map_err(engine)?;
                }
                if number > MAX_OUTBOX {
                    let cutoff = number - MAX_OUTBOX;
                    outbox.retain_in(..=cutoff, |_, _| false).map_err(engine)?;
                    // The envelope index is keyed by envelope, so pruning
                    // it scans it: once every 256 messages, not every one.
                    if number % 256 == 0 {
                        by_envelope.retain(|_, n| n > cutoff).map_err(engine)?;
                    }
                }
                written.outbox.push(number);
            }
            if let Some((key, statement)) = &write.contact {
                let mut contacts = txn.open_table(MESH_CONTACTS).map_err(engine)?;
                if contacts.get(key).map_err(engine)?.is_some()
                    || contacts.len().map_err(engine)? < MAX_MESH_CONTACTS
                {
                    contacts.insert(key, statement.as_slice()).map_err(engine)?;
                }
            }
        }
        txn.commit().map_err(engine)?;
        Ok(written)
    }

    /// Every envelope held for the mesh: id and encoded
    /// `(upstream, envelope)`.
    pub fn mesh_held(&self) -> Result<Vec<HeldEnvelope>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MESH_HELD).map_err(engine)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(engine)? {
            let (k, v) = item.map_err(engine)?;
            out.push((*k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Forgets the ids of envelopes taken here that expired before
    /// `now_ms`, then returns the rest with their expiry.
    pub fn mesh_seen(&self, now_ms: u64) -> Result<Vec<([u8; 32], u64)>, StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        let mut out = Vec::new();
        {
            let mut table = txn.open_table(MESH_SEEN).map_err(engine)?;
            table
                .retain(|_, expires| expires > now_ms)
                .map_err(engine)?;
            for item in table.iter().map_err(engine)? {
                let (k, v) = item.map_err(engine)?;
                out.push((*k.value(), v.value()));
            }
        }
        txn.commit().map_err(engine)?;
        Ok(out)
    }

    /// Whether the envelope `id` addressed to this node was taken already.
    pub fn mesh_was_seen(&self, id: &[u8; 32]) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MESH_SEEN).map_err(engine)?;
        Ok(table.get(id).map_err(engine)?.is_some())
    }

    /// The newest `limit` outbox entries (number, encrypted entry), oldest
    /// first.
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.newest(OUTBOX, limit)
    }

    /// One outbox entry (encrypted) by number.
    pub fn outbox_entry(&self, number: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(OUTBOX).map_err(engine)?;
        Ok(table
            .get(number)
            .map_err(engine)?
            .map(|v| v.value().to_vec()))
    }

    /// The outbox entry an envelope this node sent belongs to.
    pub fn outbox_for_envelope(&self, id: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(OUTBOX_BY_ENVELOPE).map_err(engine)?;
        Ok(table.get(id).map_err(engine)?.map(|v| v.value()))
    }

    /// A peer's stored contact statement.
    pub fn mesh_contact(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(MESH_CONTACTS).map_err(engine)?;
        Ok(table.get(key).map_err(engine)?.map(|v| v.value().to_vec()))
    }

    /// The newest `limit` inbox entries (number, encrypted entry), oldest
    /// first.
    pub fn inbox(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.newest(INBOX, limit)
    }

    /// The newest `limit` entries of a numbered table, oldest first.
    fn newest(
        &self,
        table: TableDefinition<'_, u64, &[u8]>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(table).map_err(engine)?;
        let mut entries = Vec::with_capacity(limit.min(1024));
        for item in table.iter().map_err(engine)?.rev().take(limit) {
            let (k, v) = item.map_err(engine)?;
            entries.push((k.value(), v.value().to_vec()));
        }
        entries.reverse();
        Ok(entries)
    }

    /// Keeps a new invite under its code's hash, unless `max` invites
    /// exist already (checked in the same transaction); whether it was kept.
    pub fn add_invite(
        &self,
        hash: &[u8; 32],
        invite: &Invite,
        max: u64,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        {
            let mut table = txn.open_table(INVITES).map_err(engine)?;
            if table.len().map_err(engine)? >= max {
                return Ok(false);
            }
            table
                .insert(hash, encode(invite)?.as_slice())
                .map_err(engine)?;
        }
        txn.commit().map_err(engine)?;
        Ok(true)
    }

    /// Every invite, with its code's hash.
    pub fn invites(&self) -> Result<Vec<([u8; 32], Invite)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let table = txn.open_table(INVITES).map_err(engine)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(engine)? {
            let (k, v) = item.map_err(engine)?;
            out.push((*k.value(), decode("invites", "invite", v.value())?));
        }
        Ok(out)
    }

    /// Revokes the invite whose code hashes to `hash`; whether there was one.
    pub fn revoke_invite(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.update_invite(hash, |invite| {
            invite.revoked = true;
            Ok(())
        })
        .map(|found| found.is_some())
    }

    /// Redeems one use of the invite whose code hashes to `hash` at
    /// `now_ms`, in one durable transaction: refused (and unchanged) when
    /// unknown, revoked, expired or spent.
    pub fn redeem_invite(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
    ) -> Result<Result<(), InviteRefusal>, StoreError> {
        let outcome = self.update_invite(hash, |invite| match invite.refusal(now_ms) {
            Some(refusal) => Err(refusal),
            None => {
                invite.uses_left -= 1;
                Ok(())
            }
        })?;
        Ok(outcome.unwrap_or(Err(InviteRefusal::Unknown)))
    }

    /// Applies `change` to one invite and writes it back if it succeeds;
    /// `None` when there is no such invite.
    fn update_invite(
        &self,
        hash: &[u8; 32],
        change: impl FnOnce(&mut Invite) -> Result<(), InviteRefusal>,
    ) -> Result<Option<Result<(), InviteRefusal>>, StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        let outcome = {
            let mut table = txn.open_table(INVITES).map_err(engine)?;
            let current: Option<Invite> = match table.get(hash).map_err(engine)? {
                Some(v) => Some(decode("invites", "invite", v.value())?),
                None => None,
            };
            match current {
                None => None,
                Some(mut invite) => {
                    let result = change(&mut invite);
                    if result.is_ok() {
                        table
                            .insert(hash, encode(&invite)?.as_slice())
                            .map_err(engine)?;
                    }
                    Some(result)
                }
            }
        };
        txn.commit().map_err(engine)?;
        Ok(outcome)
    }

    /// Counts one more start of the daemon and returns the new count.
    pub fn record_start(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        let count = {
            let mut meta = txn.open_table(META).map_err(engine)?;
            let previous = match meta.get("starts").map_err(engine)? {
                Some(v) => decode_u64(v.value()).ok_or_else(|| StoreError::Corrupt {
                    table: "meta",
                    key: "starts".into(),
                    detail: "not an 8-byte counter".into(),
                })?,
                None => 0,
            };
            let count = previous.saturating_add(1);
            meta.insert("starts", count.to_le_bytes().as_slice())
                .map_err(engine)?;
            count
        };
        txn.commit().map_err(engine)?;
        Ok(count)
    }

    /// Records that `peer_id` was connected at `address` at `now`.
    pub fn remember_peer(&self, peer_id: &str, address: &str, now: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        {
            let mut peers = txn.open_table(PEERS).map_err(engine)?;
            let mut entry = match peers.get(peer_id).map_err(engine)? {
                Some(v) => decode_peer(peer_id, v.value())?,
                None => KnownPeer {
                    addresses: Vec::new(),
                    last_seen: now,
                },
            };
            entry.last_seen = now;
            entry.addresses.retain(|a| a != address);
            entry.addresses.insert(0, address.to_string());
            entry.addresses.truncate(4);
            let bytes = serde_json::to_vec(&entry).map_err(engine)?;
            peers.insert(peer_id, bytes.as_slice()).map_err(engine)?;
            if peers.len().map_err(engine)? > MAX_KNOWN_PEERS as u64 {
                let mut oldest: Option<(String, u64)> = None;
                for row in peers.iter().map_err(engine)? {
                    let (k, v) = row.map_err(engine)?;
                    let seen = decode_peer(k.value(), v.value())
                        .map(|p| p.last_seen)
                        .unwrap_or(0);
                    if oldest.as_ref().is_none_or(|(_, s)| seen < *s) {
                        oldest = Some((k.value().to_string(), seen));
                    }
                }
                if let Some((key, _)) = oldest {
                    peers.remove(key.as_str()).map_err(engine)?;
                }
            }
        }
        txn.commit().map_err(engine)?;
        Ok(())
    }

    /// Keeps that `peer_id` is banned until `until_ms` (unix ms). Expired
    /// bans are dropped; past [`MAX_BANS`] the one ending first goes.
    pub fn ban_peer(&self, peer_id: &str, until_ms: u64, now_ms: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        {
            let mut bans = txn.open_table(BANS).map_err(engine)?;
            bans.insert(peer_id, until_ms).map_err(engine)?;
            bans.retain(|_, until| until > now_ms).map_err(engine)?;
            while bans.len().map_err(engine)? > MAX_BANS as u64 {
                let mut first: Option<(String, u64)> = None;
                for row in bans.iter().map_err(engine)? {
                    let (k, v) = row.map_err(engine)?;
                    if first.as_ref().is_none_or(|(_, u)| v.value() < *u) {
                        first = Some((k.value().to_string(), v.value()));
                    }
                }
                match first {
                    Some((key, _)) => {
                        bans.remove(key.as_str()).map_err(engine)?;
                    }
                    None => break,
                }
            }
        }
        txn.commit().map_err(engine)?;
        Ok(())
    }

    /// The bans still running at `now_ms`: peer id and the unix ms each
    /// ends.
    pub fn bans(&self, now_ms: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let bans = txn.open_table(BANS).map_err(engine)?;
        let mut running = Vec::new();
        for row in bans.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            if v.value() > now_ms {
                running.push((k.value().to_string(), v.value()));
            }
        }
        Ok(running)
    }

    /// The `limit` most recently seen peers, newest first.
    pub fn known_peers(&self, limit: usize) -> Result<Vec<(String, KnownPeer)>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let peers = txn.open_table(PEERS).map_err(engine)?;
        let mut all = Vec::new();
        for row in peers.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            all.push((k.value().to_string(), decode_peer(k.value(), v.value())?));
        }
        all.sort_by_key(|(_, peer)| std::cmp::Reverse(peer.last_seen));
        all.truncate(limit);
        Ok(all)
    }
}

impl Store {
    /// Writes consensus records in one durable transaction, in order. The
    /// replica's next outputs (votes to send, replies to clients) may only
    /// be acted on after this returns.
    pub fn persist_consensus(&self, records: &[PersistRecord]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        {
            let mut meta = txn.open_table(PBFT_META).map_err(engine)?;
            let mut votes = txn.open_table(PBFT_VOTES).map_err(engine)?;
            let mut prepared = txn.open_table(PBFT_PREPARED).map_err(engine)?;
            let mut blocks = txn.open_table(BLOCKS).map_err(engine)?;
            for record in records {
                match record {
                    PersistRecord::View { view, changing } => {
                        meta.insert("view", encode(&(*view, *changing))?.as_slice())
                            .map_err(engine)?;
                    }
                    PersistRecord::Vote { view, seq, digest } => {
                        votes
                            .insert(*seq, encode(&(*view, *digest))?.as_slice())
                            .map_err(engine)?;
                    }
                    PersistRecord::Prepared(proof) => {
                        let seq = prepared_seq(proof)?;
                        prepared
                            .insert(seq, encode(proof)?.as_slice())
                            .map_err(engine)?;
                    }
                    PersistRecord::Block { block, certificate } => {
                        blocks
                            .insert(block.height, encode(&(block, certificate))?.as_slice())
                            .map_err(engine)?;
                    }
                    PersistRecord::Recovering { bound } => {
                        meta.insert("recovering", encode(bound)?.as_slice())
                            .map_err(engine)?;
                    }
                    PersistRecord::Recovered => {
                        meta.remove("recovering").map_err(engine)?;
                    }
                    PersistRecord::ScheduleBasis(basis) => {
                        // A new key, no migration: a store without it was
                        // written before leader schedules existed, when
                        // every view followed plain rotation, which is
                        // what basis 0 (genesis) gives.
                        meta.insert("schedule_basis", encode(basis)?.as_slice())
                            .map_err(engine)?;
                    }
                    PersistRecord::StableCheckpoint(proof) => {
                        meta.insert("stable", encode(proof)?.as_slice())
                            .map_err(engine)?;
                        // Votes and proofs at or below a stable checkpoint
                        // are never needed again.
                        votes.retain(|seq, _| seq > proof.seq).map_err(engine)?;
                        prepared.retain(|seq, _| seq > proof.seq).map_err(engine)?;
                    }
                }
            }
        }
        txn.commit().map_err(engine)?;
        Ok(())
    }

    /// Everything a replica persisted, for [`openagi_consensus::Replica::restore`].
    pub fn load_consensus(&self) -> Result<PersistedState, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let meta = txn.open_table(PBFT_META).map_err(engine)?;
        let mut state = PersistedState::default();
        if let Some(v) = meta.get("view").map_err(engine)? {
            (state.view, state.changing) = decode("pbft_meta", "view", v.value())?;
        }
        if let Some(v) = meta.get("stable").map_err(engine)? {
            state.stable = Some(decode("pbft_meta", "stable", v.value())?);
        }
        if let Some(v) = meta.get("recovering").map_err(engine)? {
            state.recovering = Some(decode("pbft_meta", "recovering", v.value())?);
        }
        if let Some(v) = meta.get("schedule_basis").map_err(engine)? {
            state.schedule_basis = decode("pbft_meta", "schedule_basis", v.value())?;
        }
        for row in txn
            .open_table(PBFT_VOTES)
            .map_err(engine)?
            .iter()
            .map_err(engine)?
        {
            let (k, v) = row.map_err(engine)?;
            state.votes.insert(
                k.value(),
                decode("pbft_votes", &k.value().to_string(), v.value())?,
            );
        }
        for row in txn
            .open_table(PBFT_PREPARED)
            .map_err(engine)?
            .iter()
            .map_err(engine)?
        {
            let (k, v) = row.map_err(engine)?;
            state.prepared.insert(
                k.value(),
                decode("pbft_prepared", &k.value().to_string(), v.value())?,
            );
        }
        for row in txn
            .open_table(BLOCKS)
            .map_err(engine)?
            .iter()
            .map_err(engine)?
        {
            let (k, v) = row.map_err(engine)?;
            state
                .blocks
                .push(decode("blocks", &k.value().to_string(), v.value())?);
        }
        Ok(state)
    }

    /// The block at `height` with its certificate.
    pub fn block(&self, height: u64) -> Result<Option<(Block, CommitCertificate)>, StoreError> {
        read_block(&self.db, height)
    }

    /// All blocks from `from` up, at most `limit`.
    pub fn blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(Block, CommitCertificate)>, StoreError> {
        read_blocks_from(&self.db, from, limit)
    }

    /// The height of the last stored block (0: none yet).
    pub fn head_height(&self) -> Result<u64, StoreError> {
        read_head_height(&self.db)
    }

    /// Reserves the next sequence number for transactions this node
    /// submits as a client; durable, so a restart never reuses one.
    pub fn next_client_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        let next = {
            let mut meta = txn.open_table(META).map_err(engine)?;
            let previous = match meta.get("client_seq").map_err(engine)? {
                Some(v) => decode_u64(v.value()).unwrap_or(0),
                None => 0,
            };
            let next = previous.saturating_add(1);
            meta.insert("client_seq", next.to_le_bytes().as_slice())
                .map_err(engine)?;
            next
        };
        txn.commit().map_err(engine)?;
        Ok(next)
    }
}

/// Somewhere stored blocks can be read from: the daemon's [`Store`] or a
/// [`LedgerReader`] of a stopped node's database.
pub trait BlockSource {
    /// All blocks from `from` up, at most `limit`.
    fn blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(Block, CommitCertificate)>, StoreError>;
}

impl BlockSource for Store {
    fn blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(Block, CommitCertificate)>, StoreError> {
        Store::blocks_from(self, from, limit)
    }
}

fn read_block(
    db: &impl ReadableDatabase,
    height: u64,
) -> Result<Option<(Block, CommitCertificate)>, StoreError> {
    let txn = db.begin_read().map_err(engine)?;
    let blocks = txn.open_table(BLOCKS).map_err(engine)?;
    match blocks.get(height).map_err(engine)? {
        Some(v) => Ok(Some(decode("blocks", &height.to_string(), v.value())?)),
        None => Ok(None),
    }
}

fn read_blocks_from(
    db: &impl ReadableDatabase,
    from: u64,
    limit: usize,
) -> Result<Vec<(Block, CommitCertificate)>, StoreError> {
    let txn = db.begin_read().map_err(engine)?;
    let blocks = txn.open_table(BLOCKS).map_err(engine)?;
    let mut out = Vec::new();
    for row in blocks.range(from..).map_err(engine)?.take(limit) {
        let (k, v) = row.map_err(engine)?;
        out.push(decode("blocks", &k.value().to_string(), v.value())?);
    }
    Ok(out)
}

fn read_head_height(db: &impl ReadableDatabase) -> Result<u64, StoreError> {
    let txn = db.begin_read().map_err(engine)?;
    let blocks = txn.open_table(BLOCKS).map_err(engine)?;
    Ok(blocks.last().map_err(engine)?.map_or(0, |(k, _)| k.value()))
}

/// The ledger in the database of a node whose daemon is not running, read
/// without changing the file: `openagi ledger` on a stopped or crashed
/// node.
///
/// A database closed cleanly opens read-only. One left by a crash cannot:
/// redb first rebuilds its allocator state, which writes to the file, so
/// the reader copies the file to the temporary directory, lets redb
/// repair the copy, and removes the copy when dropped. The caller makes
/// sure no daemon writes meanwhile (the data directory's lock).
pub struct LedgerReader {
    db: ReaderDb,
    /// Dropped after `db`, so the copy is closed before it is removed.
    copy: Option<TempCopy>,
}

enum ReaderDb {
    ReadOnly(redb::ReadOnlyDatabase),
    Repaired(Database),
}

/// A temporary file, removed when dropped.
struct TempCopy(PathBuf);

impl Drop for TempCopy {
    fn drop(&mut self) {
        // Best effort: a copy left behind in the temporary directory holds
        // nothing the data directory does not.
        let _ = std::fs::remove_file(&self.0);
    }
}

impl LedgerReader {
    /// Opens `node.redb` in `data_dir` for reading.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(STORE_FILE);
        if !path.exists() {
            return Err(StoreError::Missing(path));
        }
        let reader = match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => Self {
                db: ReaderDb::ReadOnly(db),
                copy: None,
            },
            Err(redb::DatabaseError::RepairAborted) => Self::open_repaired_copy(&path)?,
            Err(e) => return Err(engine(e)),
        };
        let found = match &reader.db {
            ReaderDb::ReadOnly(db) => read_schema_version(db)?,
            ReaderDb::Repaired(db) => read_schema_version(db)?,
        };
        // Blocks have had one layout in every schema so far, so an older
        // database reads as it is; a newer one may not.
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(reader)
    }

    fn open_repaired_copy(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let copy = TempCopy(std::env::temp_dir().join(format!(
            "openagi-ledger-{}-{nanos}.redb",
            std::process::id()
        )));
        let io = |what: &str, e: std::io::Error| {
            StoreError::Engine(format!("{what} {}: {e}", copy.0.display()))
        };
        let mut target = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&copy.0)
            .map_err(|e| io("creating the copy", e))?;
        let mut source = std::fs::File::open(path)
            .map_err(|e| StoreError::Engine(format!("{}: {e}", path.display())))?;
        std::io::copy(&mut source, &mut target).map_err(|e| io("copying to", e))?;
        drop(target);
        let db = Database::create(&copy.0).map_err(engine)?;
        Ok(Self {
            db: ReaderDb::Repaired(db),
            copy: Some(copy),
        })
    }

    /// Whether the database was left by a crash, so what is read comes
    /// from a repaired copy (the same committed data).
    pub fn repaired(&self) -> bool {
        self.copy.is_some()
    }

    /// The block at `height` with its certificate.
    pub fn block(&self, height: u64) -> Result<Option<(Block, CommitCertificate)>, StoreError> {
        match &self.db {
            ReaderDb::ReadOnly(db) => read_block(db, height),
            ReaderDb::Repaired(db) => read_block(db, height),
        }
    }

    /// The height of the last stored block (0: none yet).
    pub fn head_height(&self) -> Result<u64, StoreError> {
        match &self.db {
            ReaderDb::ReadOnly(db) => read_head_height(db),
            ReaderDb::Repaired(db) => read_head_height(db),
        }
    }

    /// The last consensus view the replica entered (0: none recorded).
    pub fn view(&self) -> Result<u64, StoreError> {
        let txn = match &self.db {
            ReaderDb::ReadOnly(db) => db.begin_read(),
            ReaderDb::Repaired(db) => db.begin_read(),
        }
        .map_err(engine)?;
        let meta = match txn.open_table(PBFT_META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(engine(e)),
        };
        match meta.get("view").map_err(engine)? {
            Some(v) => Ok(decode::<(u64, bool)>("pbft_meta", "view", v.value())?.0),
            None => Ok(0),
        }
    }
}

impl BlockSource for LedgerReader {
    fn blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(Block, CommitCertificate)>, StoreError> {
        match &self.db {
            ReaderDb::ReadOnly(db) => read_blocks_from(db, from, limit),
            ReaderDb::Repaired(db) => read_blocks_from(db, from, limit),
        }
    }
}

/// Where a committed transaction is: its block's height and its index in
/// the block.
pub type TxPosition = (u64, u32);

/// The transaction index: hash of every committed transaction to its
/// position, and the last block indexed.
///
/// It is derived data. Writes are atomic (entries and watermark in one
/// transaction) but only those asked to be durable are fsynced; a crash
/// loses the others together with their watermark, and the indexer
/// re-derives them from the ledger.
pub struct TxIndex {
    db: Database,
}

impl TxIndex {
    /// Opens or creates the index file in `data_dir`.
    ///
    /// The index is derived from the ledger, so a damaged index file is
    /// not an operator's problem: it is moved aside (`txindex.redb.damaged`,
    /// replacing an older one) and a new index is built from the blocks.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(TX_INDEX_FILE);
        match Self::open_file(&path) {
            Err(StoreError::Damaged { detail, .. }) => {
                let aside = data_dir.join(format!("{TX_INDEX_FILE}.damaged"));
                tracing::warn!(
                    file = %path.display(), moved_to = %aside.display(), %detail,
                    "the transaction index is damaged; rebuilding it from the ledger"
                );
                std::fs::rename(&path, &aside).map_err(engine)?;
                Self::open_file(&path)
            }
            other => other,
        }
    }

    fn open_file(path: &Path) -> Result<Self, StoreError> {
        let db = open_guarded(path, || {
            Database::builder()
                .set_cache_size(TX_INDEX_CACHE_BYTES)
                .create(path)
                .map_err(|e| damage_or_engine(path, e))
        })?;
        let txn = db.begin_write().map_err(engine)?;
        txn.open_table(TX_INDEX).map_err(engine)?;
        txn.open_table(TX_INDEX_META).map_err(engine)?;
        txn.commit().map_err(engine)?;
        Ok(Self { db })
    }

    /// The last block indexed: its height and hash (`None`: nothing yet).
    pub fn through(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let meta = txn.open_table(TX_INDEX_META).map_err(engine)?;
        match meta.get("through").map_err(engine)? {
            Some(v) => Ok(Some(decode("tx_index_meta", "through", v.value())?)),
            None => Ok(None),
        }
    }

    /// Where the transaction with `hash` is, if it is indexed.
    pub fn get(&self, hash: &[u8; 32]) -> Result<Option<TxPosition>, StoreError> {
        let txn = self.db.begin_read().map_err(engine)?;
        let index = txn.open_table(TX_INDEX).map_err(engine)?;
        Ok(index.get(hash).map_err(engine)?.map(|v| v.value()))
    }

    /// Adds `entries` and moves the watermark to `through` in one
    /// transaction, fsynced only if `durable` (a later durable write makes
    /// it durable too).
    pub fn write(
        &self,
        entries: &[([u8; 32], TxPosition)],
        through: (u64, [u8; 32]),
        durable: bool,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(engine)?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(engine)?;
        }
        {
            let mut index = txn.open_table(TX_INDEX).map_err(engine)?;
            // Sorted keys touch each B-tree page once per write; the sort
            // is stable, so of a transaction repeated in later blocks the
            // first (the one that took effect) comes first and stays.
            let mut sorted: Vec<&([u8; 32], TxPosition)> = entries.iter().collect();
            sorted.sort_by_key(|entry| entry.0);
            sorted.dedup_by_key(|entry| entry.0);
            for (hash, position) in sorted {
                let earlier = index
                    .insert(hash, *position)
                    .map_err(engine)?
                    .map(|old| old.value())
                    .filter(|old| old.0 < position.0);
                if let Some(earlier) = earlier {
                    index.insert(hash, earlier).map_err(engine)?;
                }
            }
            let mut meta = txn.open_table(TX_INDEX_META).map_err(engine)?;
            meta.insert("through", encode(&through)?.as_slice())
                .map_err(engine)?;
        }
        txn.commit().map_err(engine)?;
        Ok(())
    }

    /// Empties the index (the ledger it was built from is gone), durably.
    pub fn clear(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(engine)?;
        txn.delete_table(TX_INDEX).map_err(engine)?;
        txn.delete_table(TX_INDEX_META).map_err(engine)?;
        txn.open_table(TX_INDEX).map_err(engine)?;
        txn.open_table(TX_INDEX_META).map_err(engine)?;
        txn.commit().map_err(engine)?;
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(engine)
}

fn decode<T: serde::de::DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_string(),
        detail: e.to_string(),
    })
}

/// The sequence number a prepared proof is for, read from its pre-prepare
/// (our own record, already verified when it was made).
fn prepared_seq(proof: &openagi_consensus::messages::PreparedProof) -> Result<u64, StoreError> {
    let pre_prepare: openagi_consensus::messages::PrePrepare =
        postcard::from_bytes(proof.pre_prepare.payload_bytes()).map_err(|e| {
            StoreError::Corrupt {
                table: "pbft_prepared",
                key: "?".into(),
                detail: e.to_string(),
            }
        })?;
    Ok(pre_prepare.seq)
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_le_bytes)
}

fn decode_peer(key: &str, bytes: &[u8]) -> Result<KnownPeer, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: "peers",
        key: key.to_string(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that loses whatever was written since the last sync when the
    /// power goes: what a SIGKILL test cannot show (the kernel keeps a
    /// killed process's unsynced pages).
    #[derive(Debug, Clone, Default)]
    struct PowerCutDisk {
        state: std::sync::Arc<std::sync::Mutex<(Vec<u8>, Vec<u8>)>>,
    }

    impl PowerCutDisk {
        fn with<T>(&self, f: impl FnOnce(&mut (Vec<u8>, Vec<u8>)) -> T) -> T {
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        }

        /// The power goes: only synced bytes remain.
        fn cut(&self) {
            self.with(|(current, synced)| *current = synced.clone());
        }
    }

    impl redb::StorageBackend for PowerCutDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            Ok(self.with(|(current, _)| current.len() as u64))
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.with(|(current, _)| {
                let start = offset as usize;
                let end = start + out.len();
                if end > current.len() {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                out.copy_from_slice(&current[start..end]);
                Ok(())
            })
        }

        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.with(|(current, _)| current.resize(len as usize, 0));
            Ok(())
        }

        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.with(|(current, synced)| *synced = current.clone());
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.with(|(current, _)| {
                let start = offset as usize;
                if current.len() < start + data.len() {
                    current.resize(start + data.len(), 0);
                }
                current[start..start + data.len()].copy_from_slice(data);
            });
            Ok(())
        }
    }

    /// `n` linked blocks with (unsigned) certificates: storage does not
    /// check them.
    fn test_chain(n: u64) -> Vec<(Block, CommitCertificate)> {
        let mut prev = [0u8; 32];
        (1..=n)
            .map(|height| {
                let block = Block {
                    height,
                    view: 0,
                    prev_hash: prev,
                    batch_root: [height as u8; 32],
                    timestamp: height,
                    txs: Vec::new(),
                };
                prev = block.hash();
                let certificate = CommitCertificate {
                    view: 0,
                    seq: height,
                    header: openagi_consensus::types::BatchHeader {
                        proposed_view: 0,
                        timestamp: height,
                        batch_root: block.batch_root,
                    },
                    commits: Vec::new(),
                };
                (block, certificate)
            })
            .collect()
    }

    fn open_on(disk: &PowerCutDisk) -> Store {
        let created = disk.with(|(current, _)| current.is_empty());
        let db = redb::Database::builder()
            .create_with_backend(disk.clone())
            .expect("database");
        Store::prepare(db, created, false).expect("store").0
    }

    #[test]
    fn the_view_and_its_leader_schedule_basis_survive_a_power_cut() {
        let disk = PowerCutDisk::default();
        let store = open_on(&disk);
        assert_eq!(store.load_consensus().expect("load").schedule_basis, 0);
        store
            .persist_consensus(&[
                PersistRecord::ScheduleBasis(48),
                PersistRecord::View {
                    view: 7,
                    changing: true,
                },
            ])
            .expect("persisted");
        disk.cut();
        std::mem::forget(store);
        let state = open_on(&disk).load_consensus().expect("load");
        assert_eq!(
            (state.view, state.changing, state.schedule_basis),
            (7, true, 48)
        );
    }

    #[test]
    fn what_the_store_acknowledges_survives_a_power_cut() {
        let disk = PowerCutDisk::default();
        let store = open_on(&disk);
        let chain = test_chain(5);
        for (block, certificate) in &chain {
            store
                .persist_consensus(&[PersistRecord::Block {
                    block: block.clone(),
                    certificate: certificate.clone(),
                }])
                .expect("persisted");
        }
        let seq = store.next_client_seq().expect("seq");
        // The power goes with the database open: no destructor runs (a
        // clean close would sync on its own).
        disk.cut();
        std::mem::forget(store);
        let store = open_on(&disk);
        assert_eq!(store.head_height().expect("height"), 5);
        for (block, _) in &chain {
            let (stored, _) = store.block(block.height).expect("read").expect("present");
            assert_eq!(stored.hash(), block.hash());
        }
        assert!(
            store.next_client_seq().expect("seq") > seq,
            "a sequence number is never reused"
        );

        // The control: a commit that skips the sync is lost at a power
        // cut, so the test above would see a missing fsync.
        let txn = {
            let mut txn = store.db.begin_write().expect("txn");
            txn.set_durability(redb::Durability::None)
                .expect("durability");
            txn
        };
        {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert("unsynced", [1u8].as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
        disk.cut();
        std::mem::forget(store);
        let store = open_on(&disk);
        let read = store.db.begin_read().expect("read");
        let meta = read.open_table(META).expect("meta");
        assert!(
            meta.get("unsynced").expect("get").is_none(),
            "unsynced data survived"
        );
    }

    /// Writes a database the way versions before schema stamps did: the
    /// same tables, no `schema_version`, and the transaction index inside.
    pub(crate) fn write_schema_1(data_dir: &Path) {
        let db = Database::create(data_dir.join(STORE_FILE)).expect("create");
        let txn = db.begin_write().expect("write");
        {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert("starts", 3u64.to_le_bytes().as_slice())
                .expect("starts");
            txn.open_table(PEERS).expect("peers");
            txn.open_table(PBFT_META).expect("pbft_meta");
            txn.open_table(PBFT_VOTES).expect("votes");
            txn.open_table(PBFT_PREPARED).expect("prepared");
            txn.open_table(BLOCKS).expect("blocks");
            txn.open_table(MSG_STATE).expect("msg");
            txn.open_table(INBOX).expect("inbox");
            let mut index = txn.open_table(TX_INDEX).expect("tx_index");
            index.insert(&[7u8; 32], (1, 0)).expect("entry");
        }
        txn.commit().expect("commit");
    }

    fn has_tx_index_table(data_dir: &Path) -> bool {
        let db = Database::open(data_dir.join(STORE_FILE)).expect("open");
        let txn = db.begin_read().expect("read");
        txn.open_table(TX_INDEX).is_ok()
    }

    #[test]
    fn a_new_store_is_stamped_with_the_current_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        assert_eq!(
            Store::schema_version_at(dir.path()).expect("read"),
            Some(SCHEMA_VERSION)
        );
    }

    #[test]
    fn an_older_schema_is_refused_untouched_then_migrated_on_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_schema_1(dir.path());
        match Store::open(dir.path()) {
            Err(e @ StoreError::NeedsMigration { found: 1, .. }) => {
                assert!(e.to_string().contains("--migrate"), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("an old schema must not open without --migrate"),
        }
        // Refusing changed nothing: still version 1, old index still there.
        assert_eq!(Store::schema_version_at(dir.path()).expect("read"), Some(1));
        assert!(has_tx_index_table(dir.path()));
        let (store, steps) = Store::open_migrating(dir.path()).expect("migrates");
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert_eq!(store.record_start().expect("write"), 4, "data kept");
        drop(store);
        assert!(!has_tx_index_table(dir.path()), "old index dropped");
        assert_eq!(
            Store::schema_version_at(dir.path()).expect("read"),
            Some(SCHEMA_VERSION)
        );
        let (_, steps) = Store::open_migrating(dir.path()).expect("again");
        assert!(steps.is_empty(), "nothing left to migrate");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        {
            let db = Database::open(dir.path().join(STORE_FILE)).expect("open");
            let txn = db.begin_write().expect("write");
            stamp_schema(&txn, SCHEMA_VERSION + 1).expect("stamp");
            txn.commit().expect("commit");
        }
        for result in [
            Store::open(dir.path()).map(|_| ()),
            Store::open_migrating(dir.path()).map(|_| ()),
        ] {
            match result {
                Err(StoreError::TooNew { .. }) => {}
                Err(e) => panic!("wrong error: {e}"),
                Ok(()) => panic!("a newer schema must be refused"),
            }
        }
    }

    #[test]
    fn starts_are_counted_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            assert_eq!(store.record_start().expect("write"), 1);
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.record_start().expect("write"), 2);
    }

    #[test]
    fn address_book_keeps_newest_first_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .remember_peer("a", "/ip4/127.0.0.1/tcp/1/p2p/a", 10)
                .expect("write");
            store
                .remember_peer("b", "/ip4/127.0.0.1/tcp/2/p2p/b", 20)
                .expect("write");
            store
                .remember_peer("a", "/ip4/127.0.0.1/tcp/3/p2p/a", 30)
                .expect("write");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let peers = store.known_peers(10).expect("read");
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].0, "a");
        assert_eq!(peers[0].1.addresses[0], "/ip4/127.0.0.1/tcp/3/p2p/a");
        assert_eq!(store.known_peers(1).expect("read").len(), 1);
    }

    #[test]
    fn bans_are_kept_until_they_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.ban_peer("a", 2_000, 1_000).expect("ban");
        store.ban_peer("b", 5_000, 1_000).expect("ban");
        assert_eq!(store.bans(1_500).expect("read").len(), 2);
        assert_eq!(
            store.bans(3_000).expect("read"),
            vec![("b".to_string(), 5_000)]
        );
        // An expired ban is dropped at the next write.
        store.ban_peer("c", 9_000, 3_000).expect("ban");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        let mut kept = store.bans(0).expect("read");
        kept.sort();
        assert_eq!(
            kept,
            vec![("b".to_string(), 5_000), ("c".to_string(), 9_000)]
        );
    }
}
