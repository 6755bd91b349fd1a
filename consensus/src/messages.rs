//! The PBFT wire messages. Every one is a [`Signed`] envelope whose payload
//! names the network, and every payload type has its own signing context,
//! so a signature for one purpose never counts for another.

use openagi_crypto::{Signed, identity::SignedPayload};
use serde::{Deserialize, Serialize};

// A commit vote is what certificates are made of, so it lives with them.
pub use crate::types::Commit;
use crate::types::{Batch, Block, CommitCertificate, NetworkId, Transaction};
use crate::{Error, Hash};

/// The primary's proposal of a batch digest for `(view, seq)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrePrepare {
    /// Network.
    pub network: NetworkId,
    /// View.
    pub view: u64,
    /// Sequence number.
    pub seq: u64,
    /// Batch digest ([`Batch::digest`]).
    pub digest: Hash,
}

impl SignedPayload for PrePrepare {
    const CONTEXT: &'static str = "openagi/pbft/pre-prepare/v1";
}

/// A backup's agreement with a pre-prepare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    /// Network.
    pub network: NetworkId,
    /// View.
    pub view: u64,
    /// Sequence number.
    pub seq: u64,
    /// Batch digest.
    pub digest: Hash,
}

impl SignedPayload for Prepare {
    const CONTEXT: &'static str = "openagi/pbft/prepare/v1";
}

/// A replica's statement of the ledger head after executing `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Network.
    pub network: NetworkId,
    /// Sequence number (a multiple of the checkpoint interval).
    pub seq: u64,
    /// Hash of the block at height `seq`, which commits to the whole chain.
    pub state: Hash,
}

impl SignedPayload for Checkpoint {
    const CONTEXT: &'static str = "openagi/pbft/checkpoint/v1";
}

/// A stable checkpoint: a quorum of matching checkpoint messages, or the
/// genesis state (sequence number 0, no messages).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointProof {
    /// Sequence number.
    pub seq: u64,
    /// Ledger head hash at `seq`.
    pub state: Hash,
    /// The signed checkpoint messages (empty for genesis).
    pub messages: Vec<Signed<Checkpoint>>,
}

/// Proof that a batch prepared in some view: the primary's pre-prepare,
/// the batch itself and a quorum-minus-one of matching prepares from
/// distinct backups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedProof {
    /// The signed pre-prepare.
    pub pre_prepare: Signed<PrePrepare>,
    /// The batch whose digest the pre-prepare carries.
    pub batch: Batch,
    /// Matching prepares from backups.
    pub prepares: Vec<Signed<Prepare>>,
}

/// A replica's request to move to `new_view`, with what it knows: its
/// stable checkpoint and every batch it prepared above it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// Network.
    pub network: NetworkId,
    /// The view being moved to.
    pub new_view: u64,
    /// The sender's stable checkpoint.
    pub checkpoint: CheckpointProof,
    /// Highest-view prepared proof per sequence number above the checkpoint.
    pub prepared: Vec<PreparedProof>,
}

impl SignedPayload for ViewChange {
    const CONTEXT: &'static str = "openagi/pbft/view-change/v1";
}

/// The new primary's announcement of `view`: the quorum of view-change
/// messages it used and the pre-prepares it recomputed from them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    /// Network.
    pub network: NetworkId,
    /// The view being started.
    pub view: u64,
    /// A quorum of view-change messages for `view`.
    pub view_changes: Vec<Signed<ViewChange>>,
    /// Pre-prepares for every sequence number between the highest stable
    /// checkpoint and the highest prepared sequence number in them.
    pub pre_prepares: Vec<Signed<PrePrepare>>,
}

impl SignedPayload for NewView {
    const CONTEXT: &'static str = "openagi/pbft/new-view/v1";
}

/// Client transactions a backup hands to the primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Network.
    pub network: NetworkId,
    /// The transactions.
    pub txs: Vec<Transaction>,
}

impl SignedPayload for Forward {
    const CONTEXT: &'static str = "openagi/pbft/forward/v1";
}

/// Periodic summary of where a replica is, so lagging replicas notice and
/// catch up even when no new requests arrive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Network.
    pub network: NetworkId,
    /// Current view.
    pub view: u64,
    /// Ledger height.
    pub height: u64,
    /// Stable checkpoint sequence number.
    pub stable: u64,
    /// The sender is recovering from lost state and casts no vote yet, so
    /// the others can tell when too many are recovering for progress.
    pub recovering: bool,
}

impl SignedPayload for Status {
    const CONTEXT: &'static str = "openagi/pbft/status/v2";
}

/// State transfer request for blocks `from..=to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchBlocks {
    /// Network.
    pub network: NetworkId,
    /// First height wanted.
    pub from: u64,
    /// Last height wanted.
    pub to: u64,
}

impl SignedPayload for FetchBlocks {
    const CONTEXT: &'static str = "openagi/pbft/fetch-blocks/v1";
}

/// State transfer reply: consecutive blocks with their commit certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocksReply {
    /// Network.
    pub network: NetworkId,
    /// Blocks in height order.
    pub blocks: Vec<(Block, CommitCertificate)>,
}

impl SignedPayload for BlocksReply {
    const CONTEXT: &'static str = "openagi/pbft/blocks/v1";
}

/// Everything replicas send each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A pre-prepare with the batch it proposes.
    PrePrepare {
        /// The signed pre-prepare.
        pre_prepare: Signed<PrePrepare>,
        /// The batch; its digest must equal the pre-prepare's.
        batch: Batch,
    },
    /// A prepare.
    Prepare(Signed<Prepare>),
    /// A commit.
    Commit(Signed<Commit>),
    /// A checkpoint.
    Checkpoint(Signed<Checkpoint>),
    /// A view change.
    ViewChange(Signed<ViewChange>),
    /// A new view.
    NewView(Signed<NewView>),
    /// Forwarded client transactions.
    Forward(Signed<Forward>),
    /// A status summary.
    Status(Signed<Status>),
    /// A state transfer request.
    FetchBlocks(Signed<FetchBlocks>),
    /// A state transfer reply.
    Blocks(Signed<BlocksReply>),
}

impl Message {
    /// Canonical wire encoding.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        postcard::to_stdvec(self).map_err(|e| Error::Malformed(format!("encoding message: {e}")))
    }

    /// Decodes a message received from the network, refusing anything
    /// longer than `max_len` bytes before looking inside.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<Self, Error> {
        if bytes.len() > max_len {
            return Err(Error::Malformed(format!(
                "message of {} bytes exceeds {max_len}",
                bytes.len()
            )));
        }
        postcard::from_bytes(bytes).map_err(|e| Error::Malformed(format!("decoding message: {e}")))
    }

    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::PrePrepare { .. } => "pre-prepare",
            Message::Prepare(_) => "prepare",
            Message::Commit(_) => "commit",
            Message::Checkpoint(_) => "checkpoint",
            Message::ViewChange(_) => "view-change",
            Message::NewView(_) => "new-view",
            Message::Forward(_) => "forward",
            Message::Status(_) => "status",
            Message::FetchBlocks(_) => "fetch-blocks",
            Message::Blocks(_) => "blocks",
        }
    }
}
