//! Fuzz targets for every decoder that reads bytes from a peer, a client
//! or the disk.
//!
//! Each target is a function of arbitrary bytes that must never panic:
//! it decodes, and where an encoder exists checks the round trip (what is
//! accepted re-encodes to bytes that decode to the same encoding). The
//! same functions run three ways:
//! - under libFuzzer, one binary per target in `fuzz_targets/`
//!   (`scripts/fuzz-campaign.sh`, nightly Rust and cargo-fuzz);
//! - briefly on stable in `tests/targets.rs`: every seed in `corpus/`
//!   plus seeded mutations of them (bit flips, cuts, splices, random
//!   bytes), in CI;
//! - and any crash input, saved under `regressions/TARGET/`, is replayed
//!   by the same test for good.

use openagi_crypto::Identity;
use openagi_crypto::seal::X25519Secret;

pub mod replica;

/// A target: its name (the folder of its corpus) and the function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("consensus_message", consensus_message),
    ("consensus_bundle", consensus_bundle),
    ("ledger_request", ledger_request),
    ("ledger_response", ledger_response),
    ("gossip_announce", gossip_announce),
    ("learn_request", learn_request),
    ("learn_response", learn_response),
    ("compressed_update", compressed_update),
    ("model_file", model_file),
    ("ledger_record", ledger_record),
    ("membership_tx", membership_tx),
    ("job_spec", job_spec),
    ("mesh_envelope", mesh_envelope),
    ("sealed_envelope", sealed_envelope),
    ("key_store", key_store),
    ("genesis", genesis),
    ("invite", invite),
    ("api_tx_body", api_tx_body),
    ("pbft_replica", pbft_replica),
];

/// Sequences of events, with validly signed messages from any validator,
/// fed to one PBFT replica: see [`replica`].
pub fn pbft_replica(data: &[u8]) {
    replica::run_replica_events(data);
}

/// Largest consensus message the node reads (its direct-stream limit).
const MAX_MESSAGE: usize = openagi_net::MAX_DIRECT_BYTES;
/// The update width the compressed-update target decodes for (the
/// digits model: 64 inputs × 10 classes + 10 biases).
const UPDATE_DIM: usize = 650;

/// `encode` of what `decode` accepts decodes again, to the same encoding.
fn round_trip<T>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Option<T>,
    encode: impl Fn(&T) -> Option<Vec<u8>>,
) {
    let Some(value) = decode(data) else { return };
    let Some(once) = encode(&value) else { return };
    let again = decode(&once).unwrap_or_else(|| panic!("a re-encoded value does not decode"));
    let twice = encode(&again).unwrap_or_default();
    assert_eq!(once, twice, "encoding is not stable across a round trip");
}

/// PBFT messages from validators (`/openagi/direct/1`).
pub fn consensus_message(data: &[u8]) {
    use openagi_consensus::Message;
    round_trip(
        data,
        |b| Message::decode(b, MAX_MESSAGE).ok(),
        |m| m.encode().ok(),
    );
}

/// Batches of consensus messages in one direct frame.
pub fn consensus_bundle(data: &[u8]) {
    if let Ok(parts) = openagi_consensus::bundle::decode(data) {
        for part in parts {
            consensus_message(part);
        }
    }
}

/// `/openagi/ledger/1` requests.
pub fn ledger_request(data: &[u8]) {
    use openagi_consensus::follow::LedgerRequest;
    round_trip(data, |b| LedgerRequest::decode(b).ok(), |r| r.encode().ok());
}

/// `/openagi/ledger/1` answers (blocks and certificates a follower reads).
pub fn ledger_response(data: &[u8]) {
    use openagi_consensus::follow::LedgerResponse;
    round_trip(
        data,
        |b| LedgerResponse::decode(b).ok(),
        |r| r.encode().ok(),
    );
}

/// Gossip announcements.
pub fn gossip_announce(data: &[u8]) {
    use openagi_net::Announce;
    round_trip(data, |b| Announce::decode(b).ok(), |a| a.encode().ok());
}

/// `/openagi/learn/1` requests.
pub fn learn_request(data: &[u8]) {
    use openagi_learning::federation::LearnRequest;
    round_trip(
        data,
        |b| postcard::from_bytes::<LearnRequest>(b).ok(),
        |r| postcard::to_stdvec(r).ok(),
    );
}

/// `/openagi/learn/1` answers (model chunks, secure-aggregation messages).
pub fn learn_response(data: &[u8]) {
    use openagi_learning::federation::LearnResponse;
    round_trip(
        data,
        |b| postcard::from_bytes::<LearnResponse>(b).ok(),
        |r| postcard::to_stdvec(r).ok(),
    );
}

/// A participant's compressed update, as the coordinator decodes it.
pub fn compressed_update(data: &[u8]) {
    use openagi_learning::compress;
    let Ok(payload) = compress::decode(data, UPDATE_DIM) else {
        return;
    };
    let dense = payload.to_dense();
    assert_eq!(dense.len(), UPDATE_DIM, "decoded to the width asked for");
    round_trip(
        data,
        |b| compress::decode(b, UPDATE_DIM).ok(),
        |p| compress::encode(p).ok(),
    );
}

/// A model file under `<data dir>/models/` or a fetched model.
pub fn model_file(data: &[u8]) {
    use openagi_learning::model::{params_from_bytes, params_to_bytes};
    if let Ok(params) = params_from_bytes(data) {
        assert_eq!(params_to_bytes(&params), data, "model bytes round-trip");
    }
}

/// Membership and evidence transactions, as every node reads them from
/// committed blocks: decoded, re-encoded stably, and checked against a
/// membership (signature, network, anchor, proof) without a panic. The
/// puzzle costs microseconds here so mutations reach the proof check.
pub fn membership_tx(data: &[u8]) {
    use openagi_consensus::evidence::Equivocation;
    use openagi_consensus::membership::{Membership, MembershipRequest, ProofCache};
    use openagi_consensus::{NetworkId, StrictCrypto, Transaction, ValidatorSet};
    round_trip(
        data,
        |b| MembershipRequest::from_payload(b).ok().flatten(),
        |r| r.to_payload().ok(),
    );
    round_trip(
        data,
        |b| Equivocation::from_payload(b).ok().flatten(),
        |e| e.to_payload().ok(),
    );
    round_trip(
        data,
        |b| Equivocation::from_removal_payload(b).ok().flatten(),
        |e| e.to_removal_payload().ok(),
    );
    let Ok(set) = ValidatorSet::new(
        NetworkId::from_name("fuzz"),
        (1..=4u8)
            .map(|i| Identity::from_seed(&[i; 32]).public())
            .collect(),
    ) else {
        return;
    };
    let params = openagi_crypto::poc::PuzzleParams {
        difficulty_bits: 1,
        memory_kib: 8,
        passes: 1,
    };
    let Ok(mut membership) = Membership::genesis(set, 16, 64, params) else {
        return;
    };
    let tx = Transaction {
        client: openagi_consensus::ClientId([1; 32]),
        seq: 1,
        payload: data.to_vec().into(),
    };
    let mut proofs = ProofCache::default();
    for height in 1..=3u64 {
        let hash = [height as u8; 32];
        let txs = if height == 3 {
            std::slice::from_ref(&tx)
        } else {
            &[]
        };
        if membership
            .apply_block(height, hash, txs, &StrictCrypto, &mut proofs)
            .is_err()
        {
            return;
        }
    }
}

/// Learning records in committed transactions.
pub fn ledger_record(data: &[u8]) {
    let _ = openagi_learning::federation::decode_record(data);
}

/// A job spec, as `learn submit` and the API read it (TOML and JSON).
pub fn job_spec(data: &[u8]) {
    use openagi_learning::federation::JobSpec;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = toml::from_str::<JobSpec>(text) {
        let _ = spec.validate();
    }
    if let Ok(spec) = serde_json::from_slice::<JobSpec>(data) {
        let _ = spec.validate();
    }
}

/// Mesh envelopes from peers and from the relay's store.
pub fn mesh_envelope(data: &[u8]) {
    use openagi_mesh::Envelope;
    round_trip(data, |b| Envelope::decode(b).ok(), |e| Some(e.encode()));
}

/// A sealed envelope opened with this node's key.
pub fn sealed_envelope(data: &[u8]) {
    let recipient = X25519Secret::from_bytes([7; 32]);
    let sender = Identity::from_seed(&[9; 32]).public();
    let _ = openagi_crypto::seal::open(&recipient, &sender, "fuzz", data);
}

/// A key store file (`node.key`) read without a passphrase: the parse and
/// the checks before any key derivation.
pub fn key_store(data: &[u8]) {
    let path = std::path::Path::new("node.key");
    let _ = openagi_crypto::keystore::decode(data, path, "node", None);
}

/// `genesis.toml`.
pub fn genesis(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = openagi_node::common::genesis::Genesis::parse(text);
    }
}

/// An invite code pasted by a user (`init --join`).
pub fn invite(data: &[u8]) {
    use openagi_node::common::invite::LongInvite;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(invite) = LongInvite::decode(text) {
        let again = LongInvite::decode(&invite.encode()).expect("re-encoded invite decodes");
        assert_eq!(again, invite, "invite round-trips");
    }
}

/// The body of `POST /api/v1/tx`.
pub fn api_tx_body(data: &[u8]) {
    let _ = serde_json::from_slice::<openagi_node::daemon::api::SubmitRequest>(data);
}
