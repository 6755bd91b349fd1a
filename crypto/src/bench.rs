//! Throughput of the primitives the node uses (`openagi bench crypto`, and
//! `cargo bench -p openagi-crypto` for a performance build of this crate
//! alone), through the same functions the node calls, so the figures
//! include their allocations and checks, not just the raw cipher.
//!
//! Each row runs its operation in a loop for a fixed time, several times,
//! and reports the median rate: the median is robust to a run disturbed by
//! other work on the machine, which a mean is not.

use std::time::{Duration, Instant};

use crate::aead::{self, AeadKey};
use crate::poc::{PuzzleInput, PuzzleParams, Verifier};
use crate::ratchet::Ratchet;
use crate::seal::{self, X25519Secret};
use crate::{Error, Identity, PublicKey};

type Result<T> = std::result::Result<T, Error>;

/// How long to measure.
#[derive(Debug, Clone)]
pub struct CryptoBench {
    /// How long each run of each row lasts.
    pub time: Duration,
    /// Runs per row; the median is reported.
    pub runs: usize,
}

/// OpenSSL figures the rows are compared with.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Where the figures come from, printed under the table.
    pub source: String,
    /// ChaCha20-Poly1305 at 64-byte messages, MB/s.
    pub chacha_64: f64,
    /// ChaCha20-Poly1305 at 1 KiB messages, MB/s.
    pub chacha_1k: f64,
    /// Ed25519 signatures per second.
    pub ed25519_sign: f64,
    /// Ed25519 verifications per second.
    pub ed25519_verify: f64,
}

impl Default for Reference {
    /// OpenSSL 3 as measured on the reference 2-core machine (DESIGN.md).
    fn default() -> Self {
        Self {
            source: "OpenSSL 3 on the reference 2-core machine (not this one; \
                     `openagi bench crypto --openssl` measures this machine)"
                .into(),
            chacha_64: 528.0,
            chacha_1k: 3500.0,
            ed25519_sign: 27_000.0,
            ed25519_verify: 9_800.0,
        }
    }
}

/// One measured row.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Bytes processed per operation, for rows reported in MB/s.
    pub bytes_per_op: Option<usize>,
    /// Median operations per second.
    pub ops_per_sec: f64,
    /// The OpenSSL figure of the [`Reference`], in the row's unit (MB/s
    /// or ops/s), where there is one.
    pub openssl: Option<f64>,
}

impl Row {
    /// The row's figure in its unit: MB/s (10^6 bytes) or operations/s.
    pub fn value(&self) -> f64 {
        match self.bytes_per_op {
            Some(bytes) => self.ops_per_sec * bytes as f64 / 1e6,
            None => self.ops_per_sec,
        }
    }
}

/// Runs `op` repeatedly for `time`, `runs` times; returns the median rate.
fn measure(time: Duration, runs: usize, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    // One untimed call: first-use costs (allocation, page faults of a
    // large Argon2 buffer) are not what the row is about.
    op()?;
    let mut rates = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let mut count: u64 = 0;
        loop {
            op()?;
            count += 1;
            let elapsed = started.elapsed();
            if elapsed >= time {
                rates.push(count as f64 / elapsed.as_secs_f64());
                break;
            }
        }
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Measures every row.
pub fn run(options: &CryptoBench, reference: &Reference) -> Result<Vec<Row>> {
    let CryptoBench { time, runs } = options.clone();
    let mut rows = Vec::new();

    let key = AeadKey::generate()?;
    let nonce = [7u8; aead::NONCE_LEN];
    for (size, label, openssl) in [
        (64usize, "64 B", Some(reference.chacha_64)),
        (1024, "1 KiB", Some(reference.chacha_1k)),
        (64 * 1024, "64 KiB", None),
    ] {
        let plaintext = vec![0x5au8; size];
        let rate = measure(time, runs, || {
            // Nonce reuse is harmless here: nothing is kept or sent.
            let sealed = aead::encrypt(&key, &nonce, b"", &plaintext)?;
            std::hint::black_box(sealed);
            Ok(())
        })?;
        rows.push(Row {
            name: format!("ChaCha20-Poly1305 encrypt {label}"),
            bytes_per_op: Some(size),
            ops_per_sec: rate,
            openssl,
        });
    }

    let identity = Identity::generate()?;
    let public = identity.public();
    let message = [0x42u8; 64];
    let rate = measure(time, runs, || {
        std::hint::black_box(identity.sign("openagi/bench/v1", &message));
        Ok(())
    })?;
    rows.push(Row {
        name: "Ed25519 sign (64 B)".into(),
        bytes_per_op: None,
        ops_per_sec: rate,
        openssl: Some(reference.ed25519_sign),
    });
    let signature = identity.sign("openagi/bench/v1", &message);
    let rate = measure(time, runs, || {
        public.verify("openagi/bench/v1", &message, &signature)
    })?;
    rows.push(Row {
        name: "Ed25519 verify, strict (64 B)".into(),
        bytes_per_op: None,
        ops_per_sec: rate,
        openssl: Some(reference.ed25519_verify),
    });

    let ours = X25519Secret::generate()?;
    let theirs = X25519Secret::generate()?.public();
    let rate = measure(time, runs, || {
        std::hint::black_box(ours.diffie_hellman(&theirs)?);
        Ok(())
    })?;
    rows.push(Row {
        name: "X25519 DH".into(),
        bytes_per_op: None,
        ops_per_sec: rate,
        openssl: None,
    });

    let sender: PublicKey = identity.public();
    let envelope = seal::seal(&ours.public(), &sender, "openagi/bench/v1", &[1u8; 1024])?;
    let rate = measure(time, runs, || {
        std::hint::black_box(seal::open(&ours, &sender, "openagi/bench/v1", &envelope)?);
        Ok(())
    })?;
    rows.push(Row {
        name: "sealed envelope open (1 KiB)".into(),
        bytes_per_op: None,
        ops_per_sec: rate,
        openssl: None,
    });

    // The identity puzzle's verification cost: 64 MiB, one pass. Difficulty 0 makes every nonce a
    // solution, so each call is one full verification.
    let mut verifier = Verifier::new(PuzzleParams {
        difficulty_bits: 0,
        memory_kib: 64 * 1024,
        passes: 1,
    })?;
    let input = PuzzleInput {
        public_key: &public,
        network_id: b"openagi-bench",
        anchor_height: 1,
        anchor_hash: &[1; 32],
    };
    let mut nonce_counter = 0u64;
    let rate = measure(time, runs, || {
        nonce_counter += 1;
        verifier.verify(&input, nonce_counter)
    })?;
    rows.push(Row {
        name: "puzzle verify (Argon2id 64 MiB, 1 pass)".into(),
        bytes_per_op: None,
        ops_per_sec: rate,
        openssl: None,
    });

    let mut alice = Ratchet::new(4, 0);
    let mut bob = Ratchet::new(4, 0);
    let alice_id = Identity::generate()?.public();
    let bob_id = Identity::generate()?.public();
    let bundle = bob
        .publish_bundles(1)
        .into_iter()
        .next()
        .ok_or_else(|| Error::Session("no one-time key was generated".into()))?;
    alice.start_session(&bob_id, &bundle)?;
    let (alice_key, bob_key) = (alice.identity_key(), bob.identity_key());
    let text = vec![0x33u8; 1024];
    let round_trip = || -> Result<()> {
        let to_bob = alice.encrypt(&bob_id, &text)?;
        std::hint::black_box(bob.decrypt(&alice_id, &[alice_key], &to_bob)?);
        let to_alice = bob.encrypt(&alice_id, &text)?;
        std::hint::black_box(alice.decrypt(&bob_id, &[bob_key], &to_alice)?);
        Ok(())
    };
    let rate = measure(time, runs, round_trip)?;
    rows.push(Row {
        name: "ratchet round trip (1 KiB each way)".into(),
        bytes_per_op: None,
        ops_per_sec: rate,
        openssl: None,
    });
    Ok(rows)
}

/// The table `openagi bench crypto` prints.
pub fn render(rows: &[Row], options: &CryptoBench, reference: &Reference) -> String {
    let mut out = String::new();
    if cfg!(debug_assertions) {
        out.push_str(
            "warning: debug build; figures are meaningless. Build with --release (or --profile maxperf).\n",
        );
    }
    out.push_str(&format!(
        "median of {} runs of {:?} each\n",
        options.runs.max(1),
        options.time
    ));
    out.push_str(&format!(
        "{:<42} {:>14} {:>8} {:>16}\n",
        "operation", "rate", "unit", "vs OpenSSL"
    ));
    for row in rows {
        let unit = if row.bytes_per_op.is_some() {
            "MB/s"
        } else {
            "ops/s"
        };
        let ratio = row
            .openssl
            .map(|o| format!("{:.2}x", row.value() / o))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<42} {:>14.1} {:>8} {:>16}\n",
            row.name,
            row.value(),
            unit,
            ratio
        ));
    }
    out.push_str(&format!(
        "OpenSSL: {}: ChaCha20-Poly1305 {:.0} MB/s at 64 B, {:.0} MB/s at 1 KiB; \
         Ed25519 {:.0} sign/s, {:.0} verify/s. Ratio > 1 means faster than OpenSSL.\n",
        reference.source,
        reference.chacha_64,
        reference.chacha_1k,
        reference.ed25519_sign,
        reference.ed25519_verify
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_measures_something() {
        let options = CryptoBench {
            time: Duration::from_millis(5),
            runs: 1,
        };
        let rows = run(&options, &Reference::default()).expect("bench runs");
        assert_eq!(rows.len(), 9);
        assert!(rows.iter().all(|r| r.ops_per_sec > 0.0), "{rows:?}");
        let table = render(&rows, &options, &Reference::default());
        assert!(table.contains("ChaCha20-Poly1305 encrypt 1 KiB"), "{table}");
    }
}
