//! Every fuzz target, briefly, on stable: each seed of its corpus
//! (`corpus/TARGET/`), every saved crash input (`regressions/TARGET/`),
//! and seeded mutations of the seeds: bit flips, cuts, splices, inserted
//! runs and plain random bytes. `FUZZ_MUTATIONS` sets mutations per
//! target (default 3,000); `BLESS=1` rewrites the seed corpora from the
//! values built below.

use std::path::{Path, PathBuf};

use openagi_consensus::Message;
use openagi_consensus::messages::Status;
use openagi_consensus::types::NetworkId;
use openagi_crypto::{Identity, Signed};
use openagi_fuzz::TARGETS;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target)
}

fn files(path: &Path) -> Vec<Vec<u8>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// Valid inputs for each target, built from the real encoders.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let id = Identity::from_seed(&[3; 32]);
    match target {
        "consensus_message" | "consensus_bundle" => {
            let status = Status {
                network: NetworkId::from_name("fuzz"),
                view: 2,
                height: 17,
                stable: 16,
                recovering: false,
            };
            let message = Message::Status(Signed::sign(&id, &status).expect("signs"));
            let bytes = message.encode().expect("encodes");
            if target == "consensus_bundle" {
                let part = std::sync::Arc::new(bytes);
                openagi_consensus::bundle::pack(&[part.clone(), part], 1 << 20)
            } else {
                vec![bytes]
            }
        }
        "ledger_request" => {
            use openagi_consensus::follow::LedgerRequest;
            vec![
                LedgerRequest::Blocks { from: 1, max: 64 }
                    .encode()
                    .expect("encodes"),
            ]
        }
        "ledger_response" => {
            use openagi_consensus::follow::LedgerResponse;
            vec![
                LedgerResponse::Blocks(Vec::new())
                    .encode()
                    .expect("encodes"),
            ]
        }
        "gossip_announce" => Vec::new(),
        "learn_request" => {
            use openagi_learning::federation::LearnRequest;
            use openagi_learning::model::ModelId;
            vec![
                postcard::to_stdvec(&LearnRequest::Model {
                    model: ModelId([5; 32]),
                    offset: 0,
                })
                .expect("encodes"),
            ]
        }
        "learn_response" => {
            use openagi_learning::federation::LearnResponse;
            vec![
                postcard::to_stdvec(&LearnResponse::Chunk {
                    total: 8,
                    bytes: vec![0, 0, 128, 63, 0, 0, 0, 64],
                })
                .expect("encodes"),
                postcard::to_stdvec(&LearnResponse::Refused("no".into())).expect("encodes"),
            ]
        }
        "compressed_update" => {
            use openagi_learning::compress::{self, Payload};
            vec![compress::encode(&Payload::Dense(vec![0.25; 650])).expect("encodes")]
        }
        "model_file" => vec![openagi_learning::model::params_to_bytes(&[1.0, -2.5, 0.0])],
        "ledger_record" => Vec::new(),
        "job_spec" => vec![include_bytes!("../../configs/digits-job.toml").to_vec()],
        "mesh_envelope" => Vec::new(),
        "sealed_envelope" => {
            let recipient = openagi_crypto::seal::X25519Secret::from_bytes([7; 32]);
            let sender = Identity::from_seed(&[9; 32]).public();
            vec![
                openagi_crypto::seal::seal(&recipient.public(), &sender, "fuzz", b"hello")
                    .expect("seals"),
            ]
        }
        "key_store" => Vec::new(),
        "genesis" => vec![
            format!(
                "network_id = \"fuzz\"\nvalidators = [\"{}\"]\n",
                id.public().to_hex()
            )
            .into_bytes(),
        ],
        "invite" => Vec::new(),
        "api_tx_body" => vec![br#"{"payload": "hello", "wait": true}"#.to_vec()],
        "membership_tx" => {
            use openagi_consensus::membership::{LeaveRequest, MembershipRequest};
            let member = Identity::from_seed(&[1; 32]);
            let leave = LeaveRequest {
                network: NetworkId::from_name("fuzz"),
                epoch: 0,
            };
            vec![
                MembershipRequest::Leave(Signed::sign(&member, &leave).expect("signs"))
                    .to_payload()
                    .expect("encodes"),
            ]
        }
        "pbft_replica" => vec![openagi_fuzz::replica::committing_seed()],
        _ => Vec::new(),
    }
}

fn mutate(rng: &mut ChaCha8Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = if seeds.is_empty() || rng.random_bool(0.1) {
        let len = rng.random_range(0..256);
        (0..len).map(|_| rng.random()).collect()
    } else {
        seeds[rng.random_range(0..seeds.len())].clone()
    };
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..5) {
            0 if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !data.is_empty() => {
                let cut = rng.random_range(0..data.len());
                data.truncate(cut);
            }
            2 if !seeds.is_empty() => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = rng.random_range(0..=other.len());
                data.extend_from_slice(&other[from..]);
            }
            3 => {
                let at = rng.random_range(0..=data.len());
                let byte: u8 = if rng.random_bool(0.5) {
                    0xff
                } else {
                    rng.random()
                };
                let run = vec![byte; rng.random_range(1..16)];
                data.splice(at..at, run);
            }
            _ if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data[i] = rng.random();
            }
            _ => {}
        }
    }
    data
}

#[test]
fn every_target_survives_its_corpus_regressions_and_mutations() {
    let mutations: usize = std::env::var("FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    for (name, target) in TARGETS {
        let corpus = dir("corpus", name);
        if std::env::var_os("BLESS").is_some() {
            std::fs::create_dir_all(&corpus).expect("corpus folder");
            for (i, seed) in seeds(name).iter().enumerate() {
                std::fs::write(corpus.join(format!("seed-{i}")), seed).expect("seed");
            }
        }
        let seeds = files(&corpus);
        for input in seeds.iter().chain(files(&dir("regressions", name)).iter()) {
            target(input);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(name.len() as u64 * 7919);
        for _ in 0..mutations {
            target(&mutate(&mut rng, &seeds));
        }
    }
}

#[test]
fn the_replica_target_reaches_commits_and_checkpoints_from_its_seed() {
    // A structure-aware target that never got past the first checks would
    // test little: its seed must commit blocks and move the checkpoint.
    let reached =
        openagi_fuzz::replica::run_replica_events(&openagi_fuzz::replica::committing_seed());
    assert!(reached.committed >= 4, "{reached:?}");
    assert!(reached.stable >= 4, "{reached:?}");
}

#[test]
fn every_target_has_a_libfuzzer_binary_and_seeds_where_it_can() {
    for (name, _) in TARGETS {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz_targets")
            .join(format!("{name}.rs"));
        assert!(binary.exists(), "{} missing", binary.display());
        if !seeds(name).is_empty() {
            assert!(
                !files(&dir("corpus", name)).is_empty(),
                "no seed corpus for {name}: run BLESS=1 cargo test -p openagi-fuzz"
            );
        }
    }
}
