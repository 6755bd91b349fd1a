//! The tamper-evident audit log: `audit.log` in the data directory.
//!
//! One JSON line per security-relevant event (API authentication
//! failures, key rotations and passphrase changes, peers banned, the
//! configuration a daemon started with, equivocation evidence seen, the
//! messaging keys rotated). Every entry carries its sequence number, the
//! hash of the entry before it and its own hash,
//! `BLAKE3("openagi/audit/v1" || JSON of {seq, unix_ms, event, fields,
//! prev})`, and a signature over that hash by the node key: an edited
//! entry no longer matches its hash, a removed or reordered one breaks the
//! sequence or the chain, and a rewritten chain needs the node's key.
//! `openagi audit verify` names the first entry that fails.
//!
//! Retention is by size: past [`MAX_FILE_BYTES`] the file becomes
//! `audit.log.1` (older ones shift up, at most [`MAX_FILES`] kept) and the
//! chain goes on in a new `audit.log`, so what is kept still verifies from
//! its oldest entry on (an entry whose predecessors were rotated away is
//! the anchor; one with sequence number 1 must start from the zero hash).
//!
//! Appends take an exclusive `flock` on the file and read the last entry
//! under it, so the daemon and a `keys` command can both write without
//! forking the chain; each append is fsynced before it returns.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};
use openagi_crypto::{Identity, PublicKey, Signature};
use serde::{Deserialize, Serialize};

/// The log's file name in the data directory.
pub const AUDIT_FILE: &str = "audit.log";
/// Size past which the file is rotated.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Rotated files kept besides the current one.
pub const MAX_FILES: u32 = 4;
/// Longest text kept of any one field (longer values are cut).
const MAX_FIELD_CHARS: usize = 512;
/// Most fields kept of one event.
const MAX_FIELDS: usize = 32;
const HASH_DOMAIN: &[u8] = b"openagi/audit/v1";
const SIGN_CONTEXT: &str = "openagi/audit/entry/v1";
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1 for the first entry a node ever wrote, then +1 each.
    pub seq: u64,
    /// When (Unix ms).
    pub unix_ms: u64,
    /// What happened, e.g. `api_auth_failed`.
    pub event: String,
    /// The event's details.
    pub fields: BTreeMap<String, String>,
    /// The previous entry's hash (hex; zeros before the first).
    pub prev: String,
    /// This entry's hash (hex).
    pub hash: String,
    /// The node key that signed the hash (hex).
    pub signer: String,
    /// Ed25519 signature over the hash (hex).
    pub signature: String,
}

/// The part of an entry its hash covers, in a fixed field order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    unix_ms: u64,
    event: &'a str,
    fields: &'a BTreeMap<String, String>,
    prev: &'a str,
}

impl AuditEntry {
    fn compute_hash(&self) -> Result<[u8; 32]> {
        let body = serde_json::to_vec(&Hashed {
            seq: self.seq,
            unix_ms: self.unix_ms,
            event: &self.event,
            fields: &self.fields,
            prev: &self.prev,
        })?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(HASH_DOMAIN);
        hasher.update(&body);
        Ok(*hasher.finalize().as_bytes())
    }

    /// Builds and signs the entry after `prev`.
    fn new(
        identity: &Identity,
        prev: Option<&AuditEntry>,
        unix_ms: u64,
        event: &str,
        fields: BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut entry = AuditEntry {
            seq: prev.map_or(1, |p| p.seq + 1),
            unix_ms,
            event: event.to_string(),
            fields,
            prev: prev.map_or_else(|| ZERO_HASH.to_string(), |p| p.hash.clone()),
            hash: String::new(),
            signer: identity.public().to_hex(),
            signature: String::new(),
        };
        let hash = entry.compute_hash()?;
        entry.hash = hex::encode(hash);
        entry.signature = identity.sign(SIGN_CONTEXT, &hash).to_hex();
        Ok(entry)
    }

    /// Checks the entry's own hash and signature.
    fn check_self(&self) -> Result<(), String> {
        let hash = self
            .compute_hash()
            .map_err(|e| format!("cannot hash: {e}"))?;
        if hex::encode(hash) != self.hash {
            return Err("its content does not match its hash (edited)".into());
        }
        let signer = PublicKey::from_hex(&self.signer).map_err(|e| format!("signer: {e}"))?;
        let signature = hex::decode(&self.signature)
            .ok()
            .and_then(|b| Signature::from_bytes(&b).ok())
            .ok_or("malformed signature")?;
        signer
            .verify(SIGN_CONTEXT, &hash, &signature)
            .map_err(|_| "its signature does not verify".to_string())
    }
}

/// The log files in `dir`, oldest first.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..=MAX_FILES)
        .rev()
        .map(|n| dir.join(format!("{AUDIT_FILE}.{n}")))
        .filter(|p| p.exists())
        .collect();
    let current = dir.join(AUDIT_FILE);
    if current.exists() {
        out.push(current);
    }
    out
}

/// The last complete entry of `file`, if any. Bytes after the last line
/// end are a torn write (a crash before its fsync: never acknowledged) and
/// are cut off.
fn last_entry(file: &mut File) -> Result<Option<AuditEntry>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    // Entries are far shorter than this; the last full line is in it.
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let complete = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let keep = start + complete as u64;
    if keep < len {
        eprintln!(
            "audit log: cutting {} bytes of a torn last line",
            len - keep
        );
        file.set_len(keep)?;
    }
    let mut lines = tail[..complete]
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace));
    match lines.next_back() {
        Some(line) => Ok(Some(
            serde_json::from_slice(line).context("the last audit entry is unreadable")?,
        )),
        None if start == 0 => Ok(None),
        None => bail!("no line end in the last 64 KiB of the audit log"),
    }
}

/// Appends one event to the log in `dir`, signed by `identity`, rotating
/// first when the file is full. Returns the entry written.
pub fn append(
    dir: &Path,
    identity: &Identity,
    unix_ms: u64,
    event: &str,
    fields: BTreeMap<String, String>,
) -> Result<AuditEntry> {
    let path = dir.join(AUDIT_FILE);
    let mut file = open_locked(&path)?;
    let mut prev = last_entry(&mut file)?;
    if prev.is_none() {
        // A fresh file after a rotation continues the chain of the last one.
        let rotated = dir.join(format!("{AUDIT_FILE}.1"));
        if rotated.exists() {
            let mut old = File::open(&rotated)?;
            prev = last_entry(&mut old)?;
        }
    }
    let fields = fields
        .into_iter()
        .take(MAX_FIELDS)
        .map(|(k, v)| (k, v.chars().take(MAX_FIELD_CHARS).collect()))
        .collect();
    let entry = AuditEntry::new(identity, prev.as_ref(), unix_ms, event, fields)?;
    let mut line = serde_json::to_vec(&entry)?;
    line.push(b'\n');
    file.seek(SeekFrom::End(0))?;
    file.write_all(&line)?;
    file.sync_data()?;
    if file.metadata()?.len() >= MAX_FILE_BYTES {
        rotate(dir)?;
    }
    Ok(entry)
}

/// Opens the log for appending, holding an exclusive `flock` until the
/// handle is dropped.
fn open_locked(path: &Path) -> Result<nix::fcntl::Flock<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
}

fn rotate(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dir.join(format!("{AUDIT_FILE}.{MAX_FILES}")));
    for n in (1..MAX_FILES).rev() {
        let from = dir.join(format!("{AUDIT_FILE}.{n}"));
        if from.exists() {
            std::fs::rename(&from, dir.join(format!("{AUDIT_FILE}.{}", n + 1)))?;
        }
    }
    std::fs::rename(dir.join(AUDIT_FILE), dir.join(format!("{AUDIT_FILE}.1")))?;
    Ok(())
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries read.
    pub entries: u64,
    /// The first and last sequence numbers kept.
    pub seqs: Option<(u64, u64)>,
    /// The keys that signed, in order of first appearance (hex).
    pub signers: Vec<String>,
    /// The first entry that fails, if one does: file, line, what.
    pub failure: Option<String>,
}

/// The event of an identity rotation; its `new_key` field names the key
/// that signs from the next entry on.
pub const ROTATION_EVENT: &str = "identity_rotated";

/// Checks every kept entry: its hash and signature, its sequence number
/// and its link to the one before. One key signs until an
/// [`ROTATION_EVENT`] entry (signed by it) hands over to the key it names.
/// With `expected`, the chain must end at that key and that key must have
/// signed an entry: a log rewritten by someone without the node's key
/// cannot end that way.
pub fn verify(dir: &Path, expected: Option<&PublicKey>) -> Result<Verified> {
    let mut report = Verified {
        entries: 0,
        seqs: None,
        signers: Vec::new(),
        failure: None,
    };
    let mut prev: Option<AuditEntry> = None;
    // The key that signs now, and the key an accepted rotation handed
    // over to (it signs from the next entry on).
    let mut signer: Option<String> = None;
    let mut handed_to: Option<String> = None;
    for path in files(dir) {
        let reader = BufReader::new(
            File::open(&path).with_context(|| format!("opening {}", path.display()))?,
        );
        for (n, line) in reader.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{} line {}", path.display(), n + 1);
            let entry: AuditEntry = match serde_json::from_str(&line) {
                Ok(entry) => entry,
                Err(e) => {
                    report.failure = Some(format!("{at}: not an audit entry ({e})"));
                    return Ok(report);
                }
            };
            let fail = |why: String| Some(format!("{at} (seq {}): {why}", entry.seq));
            if let Err(why) = entry.check_self() {
                report.failure = fail(why);
                return Ok(report);
            }
            if let Some(next) = handed_to.take() {
                signer = Some(next);
            }
            match &signer {
                None => signer = Some(entry.signer.clone()),
                Some(current) if *current != entry.signer => {
                    report.failure = fail(format!(
                        "signed by {}, but {current} signs here (no rotation handed over)",
                        entry.signer
                    ));
                    return Ok(report);
                }
                Some(_) => {}
            }
            if entry.event == ROTATION_EVENT
                && let Some(next) = entry.fields.get("new_key")
            {
                handed_to = Some(next.clone());
            }
            match &prev {
                Some(p) if entry.seq != p.seq + 1 => {
                    report.failure = fail(format!(
                        "follows seq {}: an entry is missing or out of order",
                        p.seq
                    ));
                    return Ok(report);
                }
                Some(p) if entry.prev != p.hash => {
                    report.failure = fail("does not link to the entry before it".into());
                    return Ok(report);
                }
                None if entry.seq == 1 && entry.prev != ZERO_HASH => {
                    report.failure = fail("the first entry links to something".into());
                    return Ok(report);
                }
                _ => {}
            }
            if !report.signers.contains(&entry.signer) {
                report.signers.push(entry.signer.clone());
            }
            report.entries += 1;
            report.seqs = Some((report.seqs.map_or(entry.seq, |(first, _)| first), entry.seq));
            prev = Some(entry);
        }
    }
    if let Some(key) = expected
        && prev.is_some()
    {
        if let Some(next) = &handed_to {
            report.failure = Some(format!(
                "the last entry hands the log over to {next}, which has signed nothing since"
            ));
        } else if signer.as_deref() != Some(key.to_hex().as_str()) {
            report.failure = Some(format!(
                "the entries end signed by {}, not by this node's key {key}",
                signer.unwrap_or_default()
            ));
        }
    }
    Ok(report)
}

/// The newest `count` entries, oldest first.
pub fn tail(dir: &Path, count: usize) -> Result<Vec<AuditEntry>> {
    let mut out = std::collections::VecDeque::with_capacity(count.min(1024));
    for path in files(dir) {
        let reader = BufReader::new(File::open(&path)?);
        for line in reader.lines() {
            let line = line?;
            if let Ok(entry) = serde_json::from_str::<AuditEntry>(&line) {
                if out.len() == count {
                    out.pop_front();
                }
                out.push_back(entry);
            }
        }
    }
    Ok(out.into())
}

/// Events waiting for the writer thread; past this, events are counted
/// and the count goes into the next entry written (`dropped_before`), so a
/// flood can neither block the task that logs nor hide that it happened.
pub const QUEUE: usize = 1024;

enum Job {
    Event {
        unix_ms: u64,
        name: String,
        fields: BTreeMap<String, String>,
    },
    Flush(std::sync::mpsc::SyncSender<()>),
}

static WRITER: OnceLock<Mutex<Option<std::sync::mpsc::SyncSender<Job>>>> = OnceLock::new();
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// From now on, `tracing` events with target `audit` in this process are
/// appended to the log in `dir`, signed by `identity`, by a writer thread
/// (so no task waits for the fsync).
pub fn attach(dir: &Path, identity: &Identity) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
    let dir = dir.to_path_buf();
    let identity = Identity::from_seed(&identity.seed());
    std::thread::Builder::new()
        .name("audit-log".into())
        .spawn(move || {
            for job in rx {
                match job {
                    Job::Event {
                        unix_ms,
                        name,
                        mut fields,
                    } => {
                        let dropped = DROPPED.swap(0, std::sync::atomic::Ordering::Relaxed);
                        if dropped > 0 {
                            fields.insert("dropped_before".into(), dropped.to_string());
                        }
                        if let Err(e) = append(&dir, &identity, unix_ms, &name, fields) {
                            // Not through tracing: that would come back here.
                            eprintln!("audit log: could not append {name}: {e:#}");
                        }
                    }
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        })
        .context("starting the audit log writer")?;
    let slot = WRITER.get_or_init(|| Mutex::new(None));
    if let Ok(mut slot) = slot.lock() {
        *slot = Some(tx);
    }
    Ok(())
}

/// Waits (up to `limit`) until every event logged so far is on disk.
pub fn flush(limit: std::time::Duration) {
    let Some(tx) = WRITER
        .get()
        .and_then(|slot| slot.lock().ok().and_then(|s| s.clone()))
    else {
        return;
    };
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
    if tx.send(Job::Flush(done_tx)).is_ok() {
        let _ = done_rx.recv_timeout(limit);
    }
}

/// A `tracing` layer that hands events with target `audit` to the writer
/// (nothing before [`attach`]).
pub struct AuditLayer;

struct FieldsVisitor(BTreeMap<String, String>);

impl tracing::field::Visit for FieldsVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AuditLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() != "audit" {
            return;
        }
        let Some(tx) = WRITER
            .get()
            .and_then(|slot| slot.lock().ok().and_then(|s| s.clone()))
        else {
            return;
        };
        let mut visitor = FieldsVisitor(BTreeMap::new());
        event.record(&mut visitor);
        let mut fields = visitor.0;
        let name = fields
            .remove("event")
            .unwrap_or_else(|| "unnamed".to_string());
        let job = Job::Event {
            unix_ms: crate::unix_ms(),
            name,
            fields,
        };
        if tx.try_send(job).is_err() {
            DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(dir: &Path, identity: &Identity, count: u64) {
        for n in 0..count {
            append(
                dir,
                identity,
                1_000 + n,
                "api_auth_failed",
                fields(&[("n", &n.to_string())]),
            )
            .expect("append");
        }
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(AUDIT_FILE))
            .expect("log")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rewrite(dir: &Path, lines: &[String]) {
        std::fs::write(dir.join(AUDIT_FILE), lines.join("\n") + "\n").expect("write");
    }

    #[test]
    fn a_clean_log_verifies_and_any_change_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let identity = Identity::from_seed(&[5; 32]);
        write(tmp.path(), &identity, 5);
        let ok = verify(tmp.path(), Some(&identity.public())).expect("verify");
        assert_eq!(ok.failure, None);
        assert_eq!((ok.entries, ok.seqs), (5, Some((1, 5))));
        let original = lines(tmp.path());

        // Edited: the third entry's field changed.
        let mut edited = original.clone();
        edited[2] = edited[2].replace("\"n\":\"2\"", "\"n\":\"9\"");
        rewrite(tmp.path(), &edited);
        let bad = verify(tmp.path(), None).expect("verify");
        assert!(
            bad.failure
                .as_deref()
                .is_some_and(|f| f.contains("line 3") && f.contains("edited")),
            "{bad:?}"
        );

        // Removed: the second entry gone.
        let mut removed = original.clone();
        removed.remove(1);
        rewrite(tmp.path(), &removed);
        let bad = verify(tmp.path(), None).expect("verify");
        assert!(
            bad.failure
                .as_deref()
                .is_some_and(|f| f.contains("line 2") && f.contains("missing")),
            "{bad:?}"
        );

        // Reordered.
        let mut swapped = original.clone();
        swapped.swap(3, 4);
        rewrite(tmp.path(), &swapped);
        let bad = verify(tmp.path(), None).expect("verify");
        assert!(
            bad.failure.as_deref().is_some_and(|f| f.contains("line 4")),
            "{bad:?}"
        );

        // Rewritten from the start by someone without the key: every entry
        // verifies under the forger's key, which is not the node's.
        rewrite(tmp.path(), &[]);
        std::fs::remove_file(tmp.path().join(AUDIT_FILE)).expect("rm");
        write(tmp.path(), &Identity::from_seed(&[6; 32]), 2);
        let bad = verify(tmp.path(), Some(&identity.public())).expect("verify");
        assert!(
            bad.failure.as_deref().is_some_and(|f| f.contains("not by")),
            "{bad:?}"
        );
    }

    #[test]
    fn an_identity_rotation_hands_the_log_to_the_new_key() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (old, new, stranger) = (
            Identity::from_seed(&[5; 32]),
            Identity::from_seed(&[6; 32]),
            Identity::from_seed(&[7; 32]),
        );
        write(tmp.path(), &old, 2);
        append(
            tmp.path(),
            &old,
            2_000,
            ROTATION_EVENT,
            fields(&[("new_key", &new.public().to_hex())]),
        )
        .expect("rotation");
        let pending = verify(tmp.path(), Some(&new.public())).expect("verify");
        assert!(
            pending
                .failure
                .as_deref()
                .is_some_and(|f| f.contains("signed nothing since")),
            "{pending:?}"
        );
        append(tmp.path(), &new, 2_001, "identity_in_use", BTreeMap::new()).expect("in use");
        let ok = verify(tmp.path(), Some(&new.public())).expect("verify");
        assert_eq!(ok.failure, None, "{ok:?}");
        assert_eq!(ok.signers.len(), 2);
        let old_view = verify(tmp.path(), Some(&old.public())).expect("verify");
        assert!(
            old_view.failure.is_some(),
            "the old key no longer ends the chain"
        );
        // After the hand-over, only the new key may sign.
        append(
            tmp.path(),
            &stranger,
            2_002,
            "daemon_started",
            BTreeMap::new(),
        )
        .expect("forged");
        let bad = verify(tmp.path(), None).expect("verify");
        assert!(
            bad.failure
                .as_deref()
                .is_some_and(|f| f.contains("line 5") && f.contains("no rotation")),
            "{bad:?}"
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_chain_goes_on() {
        let tmp = tempfile::tempdir().expect("tmp");
        let identity = Identity::from_seed(&[5; 32]);
        write(tmp.path(), &identity, 2);
        let path = tmp.path().join(AUDIT_FILE);
        let mut text = std::fs::read_to_string(&path).expect("log");
        text.push_str("{\"seq\":3,\"unix_ms\":12");
        std::fs::write(&path, text).expect("torn");
        write(tmp.path(), &identity, 1);
        let ok = verify(tmp.path(), Some(&identity.public())).expect("verify");
        assert_eq!(ok.failure, None, "{ok:?}");
        assert_eq!(ok.seqs, Some((1, 3)));
    }

    #[test]
    fn rotation_keeps_the_chain_and_what_is_kept_verifies() {
        let tmp = tempfile::tempdir().expect("tmp");
        let identity = Identity::from_seed(&[5; 32]);
        write(tmp.path(), &identity, 3);
        rotate(tmp.path()).expect("rotate");
        write(tmp.path(), &identity, 3);
        let ok = verify(tmp.path(), None).expect("verify");
        assert_eq!(ok.failure, None, "{ok:?}");
        assert_eq!(ok.seqs, Some((1, 6)), "the chain went on across files");
        // The oldest file dropped by retention: the rest verifies from its
        // first entry on.
        std::fs::remove_file(tmp.path().join(format!("{AUDIT_FILE}.1"))).expect("rm");
        let ok = verify(tmp.path(), None).expect("verify");
        assert_eq!(ok.failure, None);
        assert_eq!(ok.seqs, Some((4, 6)));
        assert_eq!(tail(tmp.path(), 2).expect("tail").len(), 2);
    }
}
