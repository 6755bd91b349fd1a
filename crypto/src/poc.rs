//! Proof of computation.
//!
//! Two puzzles with different jobs:
//!
//! - The **identity puzzle** makes identities expensive to mint. A joining
//!   node searches for a nonce such that
//!   `Argon2id(pwd = public key || anchor height || nonce || anchor hash
//!   || network id)` starts with `difficulty_bits` zero bits. Argon2id is
//!   memory-hard, so the cost is paid in memory bandwidth that GPUs and
//!   ASICs do not multiply the way they multiply plain hashing. The anchor
//!   (a recent block's height and hash) binds a proof to a point of the
//!   ledger, so work cannot be done before that block existed or
//!   stockpiled for later, and the network id to one network. Verifying costs one Argon2id run, so
//!   verifiers check it after cheaper checks, cache the result per key and
//!   limit concurrency; [`Verifier`] keeps its Argon2 memory between runs
//!   so a busy verifier does not allocate 64 MiB per check.
//! - The **connection challenge** is cheap hashcash: the server sends a
//!   random nonce and an effort, the client finds `n` with
//!   `BLAKE3(server nonce || peer id || n)` starting with `effort` zero
//!   bits. The server raises the effort under load to slow down
//!   connection floods; verification is one BLAKE3 call.
//!
//! Expected work for `b` bits is `2^b` attempts for both.
//!
//! Every input is length-framed and every hash is domain-separated, so an
//! input of one puzzle can never be read as another.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use argon2::{Algorithm, Argon2, Block, Params, Version};

use crate::{Error, PublicKey};

/// Argon2id salt for the identity puzzle: fixed, since every input that
/// must differ between proofs is in the password.
const PUZZLE_SALT: &[u8; 16] = b"openagi/poc/id/1";
const CHALLENGE_CONTEXT: &str = "openagi 2026 poc connection challenge v1";
/// Length of the puzzle hash.
pub const HASH_LEN: usize = 32;

/// Number of leading zero bits of `hash`.
pub fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for &byte in hash {
        if byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// Parameters of the identity puzzle. On a live network they come from
/// the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PuzzleParams {
    /// Required leading zero bits of the Argon2id output.
    pub difficulty_bits: u32,
    /// Argon2id memory in KiB.
    pub memory_kib: u32,
    /// Argon2id passes.
    pub passes: u32,
}

impl PuzzleParams {
    /// A starting point for production: 64 MiB and one pass (tens of
    /// milliseconds per attempt), 12 bits (about 4096 attempts, a few
    /// CPU-minutes on one core).
    pub const DEFAULT: PuzzleParams = PuzzleParams {
        difficulty_bits: 12,
        memory_kib: 64 * 1024,
        passes: 1,
    };
    /// Largest difficulty accepted.
    pub const MAX_DIFFICULTY_BITS: u32 = 64;
    /// Largest memory accepted (1 GiB): parameters may come from a peer.
    pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
    /// Largest number of passes accepted.
    pub const MAX_PASSES: u32 = 16;

    /// Checks the parameters are within bounds.
    pub fn validate(&self) -> Result<(), Error> {
        if self.difficulty_bits > Self::MAX_DIFFICULTY_BITS {
            return Err(Error::Params(format!(
                "puzzle difficulty {} bits above {}",
                self.difficulty_bits,
                Self::MAX_DIFFICULTY_BITS
            )));
        }
        if self.memory_kib < 8 || self.memory_kib > Self::MAX_MEMORY_KIB {
            return Err(Error::Params(format!(
                "puzzle memory {} KiB not in 8..={}",
                self.memory_kib,
                Self::MAX_MEMORY_KIB
            )));
        }
        if self.passes == 0 || self.passes > Self::MAX_PASSES {
            return Err(Error::Params(format!(
                "puzzle passes {} not in 1..={}",
                self.passes,
                Self::MAX_PASSES
            )));
        }
        Ok(())
    }
}

impl Default for PuzzleParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What an identity proof is about.
#[derive(Clone, Copy, Debug)]
pub struct PuzzleInput<'a> {
    /// The identity being proven.
    pub public_key: &'a PublicKey,
    /// The network the identity joins.
    pub network_id: &'a [u8],
    /// Height of the ledger block the proof is anchored to.
    pub anchor_height: u64,
    /// Hash of that block: unpredictable before it was committed.
    pub anchor_hash: &'a [u8; 32],
}

impl PuzzleInput<'_> {
    fn password(&self, nonce: u64) -> Vec<u8> {
        let mut pwd = Vec::with_capacity(32 + 8 + 8 + 32 + 4 + self.network_id.len());
        pwd.extend_from_slice(&self.public_key.to_bytes());
        pwd.extend_from_slice(&self.anchor_height.to_be_bytes());
        pwd.extend_from_slice(&nonce.to_be_bytes());
        pwd.extend_from_slice(self.anchor_hash);
        // Length-framed last field: nothing can be shifted into it.
        pwd.extend_from_slice(&(self.network_id.len() as u32).to_be_bytes());
        pwd.extend_from_slice(self.network_id);
        pwd
    }
}

/// Checks identity proofs, reusing one Argon2 memory allocation.
pub struct Verifier {
    params: PuzzleParams,
    argon: Argon2<'static>,
    blocks: Vec<Block>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `params`; allocates `params.memory_kib` KiB once.
    pub fn new(params: PuzzleParams) -> Result<Self, Error> {
        params.validate()?;
        if u64::from(params.memory_kib) > u64::try_from(isize::MAX).unwrap_or(u64::MAX) / 1024 {
            return Err(Error::Params(
                "puzzle memory does not fit this machine".into(),
            ));
        }
        let argon_params = Params::new(params.memory_kib, params.passes, 1, Some(HASH_LEN))
            .map_err(|e| Error::Params(format!("Argon2id: {e}")))?;
        let blocks = vec![Block::new(); argon_params.block_count()];
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);
        Ok(Self {
            params,
            argon,
            blocks,
        })
    }

    /// The parameters this verifier checks against.
    pub fn params(&self) -> &PuzzleParams {
        &self.params
    }

    /// The puzzle hash for `input` and `nonce`.
    pub fn hash(&mut self, input: &PuzzleInput<'_>, nonce: u64) -> Result<[u8; HASH_LEN], Error> {
        let mut out = [0u8; HASH_LEN];
        self.argon
            .hash_password_into_with_memory(
                &input.password(nonce),
                PUZZLE_SALT,
                &mut out,
                &mut self.blocks,
            )
            .map_err(|e| Error::Params(format!("Argon2id: {e}")))?;
        Ok(out)
    }

    /// Checks that `nonce` solves the puzzle for `input`.
    pub fn verify(&mut self, input: &PuzzleInput<'_>, nonce: u64) -> Result<(), Error> {
        let hash = self.hash(input, nonce)?;
        if leading_zero_bits(&hash) >= self.params.difficulty_bits {
            Ok(())
        } else {
            Err(Error::BadProof(
                "identity puzzle: not enough leading zero bits",
            ))
        }
    }
}

/// Searches for a nonce solving the identity puzzle.
///
/// Runs `threads` worker threads (at least one), each with its own
/// [`Verifier`], trying `start_nonce`, `start_nonce + 1`, ... between
/// them. `progress` is called after every attempt with the total number of
/// attempts so far (from whichever thread made it). Setting `cancel` stops
/// the search within one attempt per thread and returns `Ok(None)`.
///
/// Memory use is `threads × params.memory_kib` KiB.
pub fn solve(
    input: &PuzzleInput<'_>,
    params: PuzzleParams,
    threads: usize,
    start_nonce: u64,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<Option<u64>, Error> {
    params.validate()?;
    let threads = threads.max(1);
    let stride = threads as u64;
    let attempts = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let found: Mutex<Option<u64>> = Mutex::new(None);

    let results: Vec<Result<(), Error>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..stride)
            .map(|worker| {
                let (attempts, done, found) = (&attempts, &done, &found);
                scope.spawn(move || -> Result<(), Error> {
                    let mut verifier = Verifier::new(params)?;
                    let mut nonce = start_nonce.wrapping_add(worker);
                    while !cancel.load(Ordering::Relaxed) && !done.load(Ordering::Relaxed) {
                        let hash = verifier.hash(input, nonce).inspect_err(|_| {
                            // Stop the other workers too: the error is returned.
                            done.store(true, Ordering::Relaxed);
                        })?;
                        progress(attempts.fetch_add(1, Ordering::Relaxed) + 1);
                        if leading_zero_bits(&hash) >= params.difficulty_bits {
                            let mut slot = found
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner());
                            slot.get_or_insert(nonce);
                            done.store(true, Ordering::Relaxed);
                        }
                        nonce = nonce.wrapping_add(stride);
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    for result in results {
        result?;
    }
    let found = *found
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(found)
}

/// A per-connection hashcash challenge.
#[derive(Clone)]
pub struct Challenge {
    /// BLAKE3 state after absorbing everything but the client's nonce, so
    /// each attempt hashes only 8 more bytes.
    prefix: blake3::Hasher,
    effort_bits: u32,
}

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenge")
            .field("effort_bits", &self.effort_bits)
            .finish_non_exhaustive()
    }
}

impl Challenge {
    /// Highest effort a challenge can demand. A client builds challenges
    /// from what a server sent; without a cap a hostile server could make
    /// it spin for ever. 32 bits is about four billion hashes.
    pub const MAX_EFFORT_BITS: u32 = 32;

    /// The challenge a server with random `server_nonce` poses to the peer
    /// `peer_id` (its identity bytes), at `effort_bits` (capped at
    /// [`Self::MAX_EFFORT_BITS`]).
    pub fn new(server_nonce: [u8; 32], peer_id: &[u8], effort_bits: u32) -> Self {
        let mut prefix = blake3::Hasher::new_derive_key(CHALLENGE_CONTEXT);
        prefix.update(&server_nonce);
        prefix.update(&(peer_id.len() as u64).to_be_bytes());
        prefix.update(peer_id);
        Self {
            prefix,
            effort_bits: effort_bits.min(Self::MAX_EFFORT_BITS),
        }
    }

    /// A fresh random server nonce.
    pub fn random_server_nonce() -> Result<[u8; 32], Error> {
        let mut nonce = [0u8; 32];
        crate::os_random(&mut nonce)?;
        Ok(nonce)
    }

    /// The effort this challenge demands, in leading zero bits.
    pub fn effort_bits(&self) -> u32 {
        self.effort_bits
    }

    /// The hash of one attempt.
    pub fn hash(&self, nonce: u64) -> [u8; 32] {
        let mut hasher = self.prefix.clone();
        hasher.update(&nonce.to_be_bytes());
        *hasher.finalize().as_bytes()
    }

    /// Finds a solution, trying nonces from 0 upwards.
    pub fn solve(&self) -> u64 {
        let never = AtomicBool::new(false);
        // With effort capped at 32 bits, running out of 2^64 nonces is not
        // a practical possibility; fall back to 0 rather than panic.
        self.solve_from(0, &never).unwrap_or(0)
    }

    /// Finds a solution trying `start`, `start + 1`, ..., returning `None`
    /// if `cancel` is set first or the nonce space wraps.
    pub fn solve_from(&self, start: u64, cancel: &AtomicBool) -> Option<u64> {
        let mut nonce = start;
        loop {
            if leading_zero_bits(&self.hash(nonce)) >= self.effort_bits {
                return Some(nonce);
            }
            nonce = nonce.wrapping_add(1);
            // Checking the flag every 4096 attempts keeps it off the hot
            // path while still stopping within a millisecond or so.
            if nonce == start || (nonce & 0xfff == 0 && cancel.load(Ordering::Relaxed)) {
                return None;
            }
        }
    }

    /// Checks a client's answer.
    pub fn verify(&self, nonce: u64) -> Result<(), Error> {
        if leading_zero_bits(&self.hash(nonce)) >= self.effort_bits {
            Ok(())
        } else {
            Err(Error::BadProof(
                "connection challenge: not enough leading zero bits",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    /// Tiny Argon2 cost so the tests run in debug builds in well under a
    /// second.
    const FAST: PuzzleParams = PuzzleParams {
        difficulty_bits: 5,
        memory_kib: 16,
        passes: 1,
    };

    fn key(byte: u8) -> PublicKey {
        Identity::from_seed(&[byte; 32]).public()
    }

    fn no_progress(_: u64) {}

    #[test]
    fn leading_zero_bits_counts() {
        assert_eq!(leading_zero_bits(&[0, 0, 0x80]), 16);
        assert_eq!(leading_zero_bits(&[0, 0x01]), 15);
        assert_eq!(leading_zero_bits(&[0xff]), 0);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
    }

    #[test]
    fn identity_puzzle_solves_and_verifies_and_rejects_variations() {
        let pk = key(1);
        let input = PuzzleInput {
            public_key: &pk,
            network_id: b"testnet",
            anchor_height: 7,
            anchor_hash: &[7; 32],
        };
        let cancel = AtomicBool::new(false);
        let nonce = solve(&input, FAST, 2, 0, &no_progress, &cancel)
            .expect("runs")
            .expect("found");

        let mut verifier = Verifier::new(FAST).expect("params");
        verifier.verify(&input, nonce).expect("valid proof");
        // The same verifier, memory reused, gives the same answer.
        verifier.verify(&input, nonce).expect("still valid");

        let other_key = key(2);
        let wrong_key = PuzzleInput {
            public_key: &other_key,
            ..input
        };
        let wrong_height = PuzzleInput {
            anchor_height: 8,
            ..input
        };
        let wrong_anchor = PuzzleInput {
            anchor_hash: &[8; 32],
            ..input
        };
        let wrong_network = PuzzleInput {
            network_id: b"mainnet",
            ..input
        };
        for (what, bad) in [
            ("key", wrong_key),
            ("anchor height", wrong_height),
            ("anchor hash", wrong_anchor),
            ("network", wrong_network),
        ] {
            assert!(
                matches!(verifier.verify(&bad, nonce), Err(Error::BadProof(_))),
                "wrong {what}"
            );
        }
        // A nonce that does not solve it (the first failing one after the
        // solution) is refused.
        let wrong_nonce = (nonce + 1..)
            .find(|&n| {
                leading_zero_bits(&verifier.hash(&input, n).expect("hash")) < FAST.difficulty_bits
            })
            .expect("some nonce fails");
        assert!(matches!(
            verifier.verify(&input, wrong_nonce),
            Err(Error::BadProof(_))
        ));

        // Under-difficulty: a solution checked against a harder target.
        let zeros = leading_zero_bits(&verifier.hash(&input, nonce).expect("hash"));
        assert!(zeros >= FAST.difficulty_bits);
        let mut harder = Verifier::new(PuzzleParams {
            difficulty_bits: zeros + 1,
            ..FAST
        })
        .expect("params");
        assert!(matches!(
            harder.verify(&input, nonce),
            Err(Error::BadProof(_))
        ));
        // Different Argon2 cost is a different puzzle.
        let mut costlier = Verifier::new(PuzzleParams {
            memory_kib: 32,
            ..FAST
        })
        .expect("params");
        assert_ne!(
            costlier.hash(&input, nonce).expect("hash"),
            verifier.hash(&input, nonce).expect("hash")
        );
    }

    #[test]
    fn solving_reports_progress_and_can_be_cancelled() {
        let pk = key(3);
        let input = PuzzleInput {
            public_key: &pk,
            network_id: b"n",
            anchor_height: 1,
            anchor_hash: &[1; 32],
        };
        let cancel = AtomicBool::new(false);
        let seen = AtomicU64::new(0);
        let impossible = PuzzleParams {
            difficulty_bits: 64,
            ..FAST
        };
        let progress = |n: u64| {
            seen.fetch_max(n, Ordering::Relaxed);
            if n >= 10 {
                cancel.store(true, Ordering::Relaxed);
            }
        };
        let out = solve(&input, impossible, 2, 0, &progress, &cancel).expect("runs");
        assert_eq!(out, None);
        let seen = seen.load(Ordering::Relaxed);
        assert!(
            (10..=12).contains(&seen),
            "stopped promptly after {seen} attempts"
        );

        // Already cancelled: no work at all.
        let calls = AtomicU64::new(0);
        let count = |_: u64| {
            calls.fetch_add(1, Ordering::Relaxed);
        };
        assert_eq!(
            solve(&input, FAST, 1, 0, &count, &cancel).expect("runs"),
            None
        );
        assert_eq!(calls.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn single_threaded_solve_finds_the_first_solution() {
        let pk = key(4);
        let input = PuzzleInput {
            public_key: &pk,
            network_id: b"n",
            anchor_height: 2,
            anchor_hash: &[2; 32],
        };
        let cancel = AtomicBool::new(false);
        let nonce = solve(&input, FAST, 1, 100, &no_progress, &cancel)
            .expect("runs")
            .expect("found");
        let mut verifier = Verifier::new(FAST).expect("params");
        for earlier in 100..nonce {
            assert!(verifier.verify(&input, earlier).is_err());
        }
        verifier.verify(&input, nonce).expect("valid");
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(
            Verifier::new(PuzzleParams {
                memory_kib: 4,
                ..FAST
            })
            .is_err()
        );
        assert!(Verifier::new(PuzzleParams { passes: 0, ..FAST }).is_err());
        assert!(
            Verifier::new(PuzzleParams {
                difficulty_bits: 65,
                ..FAST
            })
            .is_err()
        );
        assert!(PuzzleParams::DEFAULT.validate().is_ok());
    }

    #[test]
    fn challenge_solves_verifies_and_binds_its_inputs() {
        let server_nonce = [9u8; 32];
        let challenge = Challenge::new(server_nonce, b"peer-a", 10);
        let nonce = challenge.solve();
        challenge.verify(nonce).expect("valid");
        let first_bad = (0..)
            .find(|&n| challenge.verify(n).is_err())
            .expect("some nonce fails");
        assert!(matches!(
            challenge.verify(first_bad),
            Err(Error::BadProof(_))
        ));
        // The answer is bound to the server nonce, the peer and the effort.
        for other in [
            Challenge::new([8u8; 32], b"peer-a", 10),
            Challenge::new(server_nonce, b"peer-b", 10),
        ] {
            assert!(other.verify(nonce).is_err());
        }
        let zeros = leading_zero_bits(&challenge.hash(nonce));
        assert!(
            Challenge::new(server_nonce, b"peer-a", zeros + 1)
                .verify(nonce)
                .is_err()
        );
        assert_eq!(
            Challenge::new(server_nonce, b"p", 99).effort_bits(),
            Challenge::MAX_EFFORT_BITS
        );
        let zero = Challenge::new(server_nonce, b"p", 0);
        assert_eq!(zero.solve(), 0);
        let cancel = AtomicBool::new(true);
        assert_eq!(
            Challenge::new(server_nonce, b"p", 32).solve_from(1, &cancel),
            None
        );
    }

    /// Expected work doubles with each bit. Over 256 fixed seeds per level,
    /// the mean number of attempts must be within 30% of 2^bits: the
    /// standard error is 2^bits / 16 (about 6%), so the bound is five
    /// standard errors wide, and the seeds are fixed, so the outcome is the
    /// same on every run.
    #[test]
    fn challenge_work_scales_as_two_to_the_bits() {
        const SEEDS: u64 = 256;
        let cancel = AtomicBool::new(false);
        let mut means = Vec::new();
        for bits in [2u32, 4, 6, 8] {
            let mut total = 0u64;
            for seed in 0..SEEDS {
                let mut server_nonce = [0u8; 32];
                server_nonce[..8].copy_from_slice(&seed.to_be_bytes());
                server_nonce[8] = bits as u8;
                let challenge = Challenge::new(server_nonce, b"stat-peer", bits);
                let nonce = challenge.solve_from(0, &cancel).expect("found");
                total += nonce + 1;
            }
            let mean = total as f64 / SEEDS as f64;
            let expected = f64::from(1u32 << bits);
            assert!(
                (mean / expected - 1.0).abs() < 0.30,
                "{bits} bits: mean {mean} attempts, expected about {expected}"
            );
            means.push(mean);
        }
        for pair in means.windows(2) {
            let ratio = pair[1] / pair[0];
            assert!(
                (2.5..6.0).contains(&ratio),
                "two more bits multiplied work by {ratio}, not about 4"
            );
        }
    }
}
