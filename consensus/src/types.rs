//! Validator sets, transactions, batches, ledger blocks and commit
//! certificates, and the chain verification a node runs on blocks it did not
//! agree on itself.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use bytes::Bytes;
use openagi_crypto::{PublicKey, Signed, identity::SignedPayload};
use serde::{Deserialize, Serialize};

use crate::signing::{Crypto, StrictCrypto, hash_encoded, hash_encoded_with};
use crate::{Error, Hash};

/// Identifies one Open-AGI network; every signed consensus message names it
/// so a signature made for one network (a testnet, say) never counts in
/// another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetworkId(pub [u8; 32]);

impl NetworkId {
    /// Derives a network id from a human-readable network name.
    pub fn from_name(name: &str) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("openagi/consensus/network-id/v1");
        hasher.update(name.as_bytes());
        NetworkId(*hasher.finalize().as_bytes())
    }
}

/// The fixed membership that runs consensus: `n` validators of which at
/// most `f = (n - 1) / 3` may be faulty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatorSet {
    network: NetworkId,
    members: Vec<PublicKey>,
}

impl ValidatorSet {
    /// Builds a validator set; refuses an empty list or a key listed twice
    /// (a duplicated key would let one signer count twice in a quorum).
    pub fn new(network: NetworkId, members: Vec<PublicKey>) -> Result<Self, Error> {
        if members.is_empty() {
            return Err(Error::Config("validator set is empty".into()));
        }
        let distinct: BTreeSet<[u8; 32]> = members.iter().map(|k| k.to_bytes()).collect();
        if distinct.len() != members.len() {
            return Err(Error::Config("validator set lists a key twice".into()));
        }
        Ok(Self { network, members })
    }

    /// The network these validators serve.
    pub fn network(&self) -> NetworkId {
        self.network
    }

    /// The members in their fixed order (index = replica id).
    pub fn members(&self) -> &[PublicKey] {
        &self.members
    }

    /// Number of validators.
    pub fn n(&self) -> usize {
        self.members.len()
    }

    /// Largest number of faulty validators tolerated.
    pub fn f(&self) -> usize {
        (self.n() - 1) / 3
    }

    /// Votes needed for a quorum certificate: `n - f`, which is `2f + 1`
    /// when `n = 3f + 1`; two quorums always share at least one correct
    /// member.
    pub fn quorum(&self) -> usize {
        self.n() - self.f()
    }

    /// The replica index of `key`, if it is a member.
    pub fn index_of(&self, key: &PublicKey) -> Option<usize> {
        self.members.iter().position(|m| m == key)
    }

    /// The key of replica `index`.
    pub fn member(&self, index: usize) -> Option<&PublicKey> {
        self.members.get(index)
    }

    /// The primary of `view`: `view mod n`.
    pub fn primary(&self, view: u64) -> usize {
        (view % self.n() as u64) as usize
    }
}

/// An opaque client identifier (for example the hash of the client's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub [u8; 32]);

/// A client transaction: opaque bytes, tagged with the client and the
/// client's own sequence number. The pair `(client, seq)` takes effect at
/// most once, whatever the client or a primary does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transaction {
    /// Who sent it.
    pub client: ClientId,
    /// The client's sequence number (or timestamp); starts at 1.
    pub seq: u64,
    /// Application data, never interpreted by consensus. Shared, not
    /// copied, when the transaction is cloned (a batch is held by the log,
    /// the block, the persisted record and the commit notice); encoded as
    /// one length-prefixed byte string.
    pub payload: Bytes,
}

impl Transaction {
    /// The exactly-once key.
    pub fn key(&self) -> (ClientId, u64) {
        (self.client, self.seq)
    }

    /// BLAKE3 hash of the canonical encoding.
    pub fn hash(&self) -> Hash {
        static KEYED: LazyLock<blake3::Hasher> =
            LazyLock::new(|| blake3::Hasher::new_derive_key("openagi/consensus/tx/v1"));
        hash_encoded_with(KEYED.clone(), self)
    }

    /// Bytes counted against batch and request size limits.
    pub fn size(&self) -> usize {
        self.payload.len() + 48
    }
}

/// What the replicas agree on for one sequence number: a primary-proposed
/// timestamp and an ordered list of transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The view in which the batch was first proposed; kept when a new
    /// primary re-proposes it, so every replica derives the same block.
    pub proposed_view: u64,
    /// Milliseconds, proposed by the primary.
    pub timestamp: u64,
    /// The transactions in order.
    pub txs: Vec<Transaction>,
}

impl Batch {
    /// The empty batch a new primary assigns to a sequence number nobody
    /// prepared; deterministic so every backup recomputes the same digest.
    pub fn null(view: u64) -> Self {
        Batch {
            proposed_view: view,
            timestamp: 0,
            txs: Vec::new(),
        }
    }

    /// The header whose hash is the batch digest.
    pub fn header(&self) -> BatchHeader {
        BatchHeader {
            proposed_view: self.proposed_view,
            timestamp: self.timestamp,
            batch_root: batch_root(&self.txs),
        }
    }

    /// The header and the hash of every transaction, in order: the hashes
    /// are computed once, for the Merkle root, and kept for whoever needs
    /// them next (the commit notice, the transaction index).
    pub fn header_and_tx_hashes(&self) -> (BatchHeader, Vec<Hash>) {
        let tx_hashes: Vec<Hash> = self.txs.iter().map(Transaction::hash).collect();
        let header = BatchHeader {
            proposed_view: self.proposed_view,
            timestamp: self.timestamp,
            batch_root: batch_root_of_hashes(&tx_hashes),
        };
        (header, tx_hashes)
    }

    /// The digest votes refer to.
    pub fn digest(&self) -> Hash {
        self.header().digest()
    }

    /// Total size of the transactions, as counted against limits.
    pub fn size(&self) -> usize {
        self.txs.iter().map(Transaction::size).sum()
    }
}

/// The part of a batch that votes bind: its digest is what pre-prepare,
/// prepare and commit messages carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// See [`Batch::proposed_view`].
    pub proposed_view: u64,
    /// See [`Batch::timestamp`].
    pub timestamp: u64,
    /// Merkle root over the transaction hashes.
    pub batch_root: Hash,
}

impl BatchHeader {
    /// BLAKE3 over the canonical encoding.
    pub fn digest(&self) -> Hash {
        hash_encoded("openagi/consensus/batch/v1", self)
    }
}

/// Binary Merkle root over transaction hashes, with distinct domains for
/// leaves, inner nodes and the empty list so no two shapes collide; an odd
/// node is carried up unchanged.
pub fn batch_root(txs: &[Transaction]) -> Hash {
    let tx_hashes: Vec<Hash> = txs.iter().map(Transaction::hash).collect();
    batch_root_of_hashes(&tx_hashes)
}

/// [`batch_root`] from the transactions' hashes ([`Transaction::hash`]),
/// for callers that already have them.
pub fn batch_root_of_hashes(tx_hashes: &[Hash]) -> Hash {
    if tx_hashes.is_empty() {
        return *blake3::Hasher::new_derive_key("openagi/consensus/merkle-empty/v1")
            .finalize()
            .as_bytes();
    }
    // Keyed once: deriving a context key costs as much as a leaf.
    static LEAF: LazyLock<blake3::Hasher> =
        LazyLock::new(|| blake3::Hasher::new_derive_key("openagi/consensus/merkle-leaf/v1"));
    static NODE: LazyLock<blake3::Hasher> =
        LazyLock::new(|| blake3::Hasher::new_derive_key("openagi/consensus/merkle-node/v1"));
    let mut level: Vec<Hash> = tx_hashes
        .iter()
        .map(|tx_hash| {
            let mut h = LEAF.clone();
            h.update(tx_hash);
            *h.finalize().as_bytes()
        })
        .collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => {
                    let mut h = NODE.clone();
                    h.update(a);
                    h.update(b);
                    *h.finalize().as_bytes()
                }
                [a] => *a,
                _ => [0; 32],
            })
            .collect();
    }
    level.first().copied().unwrap_or([0; 32])
}

/// A committed batch as it is stored in the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Equal to the PBFT sequence number; the first block is height 1.
    pub height: u64,
    /// The view in which the batch was first proposed.
    pub view: u64,
    /// Hash of the previous block, or [`genesis_hash`] for height 1.
    pub prev_hash: Hash,
    /// Merkle root over the transaction hashes.
    pub batch_root: Hash,
    /// The proposed timestamp, raised to the previous block's timestamp if
    /// it was lower, so block time never runs backwards.
    pub timestamp: u64,
    /// The batch, including transactions that took no effect because their
    /// `(client, seq)` had already been applied.
    pub txs: Vec<Transaction>,
}

#[derive(Serialize)]
struct BlockHeaderForHash<'a> {
    height: u64,
    view: u64,
    prev_hash: &'a Hash,
    batch_root: &'a Hash,
    timestamp: u64,
}

impl Block {
    /// BLAKE3 over the canonical (postcard) encoding of the header; the
    /// header commits to the transactions through `batch_root`.
    pub fn hash(&self) -> Hash {
        hash_encoded(
            "openagi/consensus/block/v1",
            &BlockHeaderForHash {
                height: self.height,
                view: self.view,
                prev_hash: &self.prev_hash,
                batch_root: &self.batch_root,
                timestamp: self.timestamp,
            },
        )
    }
}

/// The hash block 1 links to.
pub fn genesis_hash(network: NetworkId) -> Hash {
    hash_encoded("openagi/consensus/genesis/v1", &network)
}

/// A replica's statement that it has prepared `(view, seq, digest)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Network.
    pub network: NetworkId,
    /// View.
    pub view: u64,
    /// Sequence number.
    pub seq: u64,
    /// Batch digest.
    pub digest: Hash,
}

impl SignedPayload for Commit {
    const CONTEXT: &'static str = "openagi/pbft/commit/v1";
}

/// Proof that a batch committed: a quorum of signed commits for one view,
/// sequence number and batch digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitCertificate {
    /// View of the commits.
    pub view: u64,
    /// Sequence number (= block height).
    pub seq: u64,
    /// The committed batch's header; its digest is what the commits sign.
    pub header: BatchHeader,
    /// At least a quorum of commits from distinct members.
    pub commits: Vec<Signed<Commit>>,
}

impl CommitCertificate {
    /// Checks every commit strictly: members only, each member at most
    /// once, all for this network, view, sequence number and header
    /// digest. The shape (no more commits than members, no repeated
    /// signer) is checked before any signature, so a padded certificate
    /// costs no verification work.
    pub fn verify<C: Crypto>(&self, validators: &ValidatorSet, crypto: &C) -> Result<(), Error> {
        if self.commits.len() > validators.n() {
            return Err(Error::InvalidCertificate(format!(
                "{} commits for {} validators",
                self.commits.len(),
                validators.n()
            )));
        }
        let mut seen = BTreeSet::new();
        for signed in &self.commits {
            let index = validators
                .index_of(signed.signer())
                .ok_or_else(|| Error::InvalidCertificate("commit from a non-member".into()))?;
            if !seen.insert(index) {
                return Err(Error::InvalidCertificate(
                    "a validator's commit appears twice".into(),
                ));
            }
        }
        let digest = self.header.digest();
        for signed in &self.commits {
            let commit = crypto.open(signed)?;
            if commit.network != validators.network()
                || commit.view != self.view
                || commit.seq != self.seq
                || commit.digest != digest
            {
                return Err(Error::InvalidCertificate(
                    "commit does not match certificate".into(),
                ));
            }
        }
        if seen.len() < validators.quorum() {
            return Err(Error::InvalidCertificate(format!(
                "{} distinct commits, quorum is {}",
                seen.len(),
                validators.quorum()
            )));
        }
        Ok(())
    }
}

/// The last block a chain segment builds on: height, hash and timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainAnchor {
    /// Height of the anchoring block (0 for genesis).
    pub height: u64,
    /// Its hash.
    pub hash: Hash,
    /// Its timestamp.
    pub timestamp: u64,
}

impl ChainAnchor {
    /// The anchor before block 1.
    pub fn genesis(network: NetworkId) -> Self {
        ChainAnchor {
            height: 0,
            hash: genesis_hash(network),
            timestamp: 0,
        }
    }
}

/// Checks that `block` with `cert` extends `anchor`: height and hash link,
/// batch root over its transactions, header and timestamp rule against the
/// certificate, and the certificate's signatures.
pub fn verify_block<C: Crypto>(
    anchor: &ChainAnchor,
    block: &Block,
    cert: &CommitCertificate,
    validators: &ValidatorSet,
    crypto: &C,
) -> Result<(), Error> {
    let fail = |reason: &str| Error::InvalidBlock {
        height: block.height,
        reason: reason.into(),
    };
    if block.height != anchor.height.saturating_add(1) || cert.seq != block.height {
        return Err(fail("height does not follow the previous block"));
    }
    if block.prev_hash != anchor.hash {
        return Err(fail("previous hash does not link"));
    }
    if batch_root(&block.txs) != block.batch_root || cert.header.batch_root != block.batch_root {
        return Err(fail("batch root does not match the transactions"));
    }
    if cert.header.proposed_view != block.view {
        return Err(fail("view does not match the certificate"));
    }
    if block.timestamp != cert.header.timestamp.max(anchor.timestamp) {
        return Err(fail("timestamp breaks the monotonic rule"));
    }
    cert.verify(validators, crypto)
        .map_err(|e| Error::InvalidBlock {
            height: block.height,
            reason: e.to_string(),
        })
}

/// Re-checks a whole chain from genesis: every hash link, every batch root,
/// the timestamp rule and every commit certificate (strict Ed25519).
pub fn verify_chain(
    blocks: &[Block],
    certs: &[CommitCertificate],
    validators: &ValidatorSet,
) -> Result<(), Error> {
    verify_chain_from(
        ChainAnchor::genesis(validators.network()),
        blocks,
        certs,
        validators,
        &StrictCrypto,
    )
}

/// Like [`verify_chain`] but for a segment that starts after `anchor` and
/// with a caller-chosen signature checker.
pub fn verify_chain_from<C: Crypto>(
    anchor: ChainAnchor,
    blocks: &[Block],
    certs: &[CommitCertificate],
    validators: &ValidatorSet,
    crypto: &C,
) -> Result<(), Error> {
    if blocks.len() != certs.len() {
        return Err(Error::Malformed(format!(
            "{} blocks but {} certificates",
            blocks.len(),
            certs.len()
        )));
    }
    let mut anchor = anchor;
    for (block, cert) in blocks.iter().zip(certs) {
        verify_block(&anchor, block, cert, validators, crypto)?;
        anchor = ChainAnchor {
            height: block.height,
            hash: block.hash(),
            timestamp: block.timestamp,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_txs() -> Vec<Transaction> {
        (0..5u64)
            .map(|i| Transaction {
                client: ClientId([i as u8; 32]),
                seq: 1 + i * 300,
                payload: (0..(i * 200) as usize).map(|b| b as u8).collect(),
            })
            .collect()
    }

    /// The header computed with the hashes kept is the header, and the
    /// hashes are the transactions'.
    #[test]
    fn header_with_tx_hashes_matches_the_header() {
        let batch = Batch {
            proposed_view: 3,
            timestamp: 99,
            txs: sample_txs(),
        };
        let (header, tx_hashes) = batch.header_and_tx_hashes();
        assert_eq!(header, batch.header());
        let expected: Vec<Hash> = batch.txs.iter().map(Transaction::hash).collect();
        assert_eq!(tx_hashes, expected);
        assert_eq!(batch_root_of_hashes(&tx_hashes), batch_root(&batch.txs));
        assert_eq!(
            Batch::null(1).header_and_tx_hashes().0,
            Batch::null(1).header()
        );
    }

    /// Transaction hashes, batch roots and the wire encoding are part of
    /// the ledger format: pinned so an optimisation cannot change them.
    #[test]
    fn hashes_and_encodings_are_stable() {
        let txs = sample_txs();
        assert_eq!(
            hex::encode(txs[3].hash()),
            "e4ebf51ba921be08ba42063a3ad7d488e702bd3aa9d80f0ffeaf5138cdb4f49a"
        );
        assert_eq!(
            hex::encode(batch_root(&txs)),
            "8047724439adb8b7286ff26331588af983dfd380fbcda050a656831863ad8f24"
        );
        let encoded = postcard::to_stdvec(&txs[2]).expect("encodes");
        assert_eq!(
            hex::encode(blake3::hash(&encoded).as_bytes()),
            "326202a9ca10f79a55e31ce4b81e1754e60b4997b3c19361d24b6eab3d63fa41"
        );
        let decoded: Transaction = postcard::from_bytes(&encoded).expect("decodes");
        assert_eq!(decoded, txs[2]);
    }
}
