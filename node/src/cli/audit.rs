//! `openagi audit verify|tail`: the data directory's tamper-evident audit
//! log (`common::audit`), read without the daemon.

use anyhow::{Result, bail};
use openagi_crypto::PublicKey;

use crate::cli::ledger::local_time;
use crate::common::audit;
use crate::common::datadir::DataDir;
use crate::common::passphrase::PassphraseSource;
use crate::outln;

/// `openagi audit verify`: every kept entry's hash, signature, sequence
/// and link; signatures must be by `public_key`, or by the node's own key
/// when it can be read without a passphrase.
pub fn verify(
    dir: &DataDir,
    passphrase: &PassphraseSource,
    public_key: Option<&str>,
) -> Result<()> {
    let expected = match public_key {
        Some(hex) => Some(PublicKey::from_hex(hex)?),
        None if !dir.key_format()?.encrypted() => Some(dir.identity(passphrase)?.public()),
        None => None,
    };
    if audit::files(dir.path()).is_empty() {
        bail!(
            "no {} in {}: the daemon writes it from its first start",
            audit::AUDIT_FILE,
            dir.path().display()
        );
    }
    let report = audit::verify(dir.path(), expected.as_ref())?;
    if let Some(failure) = report.failure {
        outln!("AUDIT LOG DOES NOT VERIFY: {failure}")?;
        bail!("the audit log was changed");
    }
    let (first, last) = report.seqs.unwrap_or((0, 0));
    outln!(
        "audit log verified: {} entries (seq {first} to {last}), each linked to the one before and signed by {}",
        report.entries,
        match (&expected, report.signers.as_slice()) {
            (Some(key), signers) if signers.len() > 1 => format!(
                "{} keys, each handing over to the next by a rotation entry, ending with this node's key {}",
                signers.len(),
                key.fingerprint()
            ),
            (Some(key), _) => format!("this node's key {}", key.fingerprint()),
            (None, signers) => format!(
                "{} (the key is encrypted: compare with `openagi keys show`, or pass --public-key)",
                signers.join(", ")
            ),
        }
    )?;
    if first > 1 {
        outln!("(entries before seq {first} were rotated away; the chain is checked from there)")?;
    }
    Ok(())
}

/// `openagi audit tail`: the newest entries, oldest first.
pub fn tail(dir: &DataDir, count: usize, json: bool) -> Result<()> {
    for entry in audit::tail(dir.path(), count)? {
        if json {
            outln!("{}", serde_json::to_string(&entry)?)?;
            continue;
        }
        let fields: Vec<String> = entry
            .fields
            .iter()
            .filter(|(k, _)| k.as_str() != "message")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        outln!(
            "#{} {} {} {}",
            entry.seq,
            local_time(entry.unix_ms),
            entry.event,
            fields.join(" ")
        )?;
    }
    Ok(())
}
