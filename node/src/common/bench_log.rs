//! The benchmark log of a data directory: every `openagi bench` run made
//! with that data directory appends one JSON line to `bench-results.jsonl`
//! (when, which version, which settings, which figures), and the daemon's
//! dashboard plots them over time, so a regression between versions shows.
//! The file is append-only; the dashboard reads its last
//! [`MAX_READ_BYTES`].

use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::common::datadir::DataDir;

/// The log's file name in the data directory.
pub const BENCH_FILE: &str = "bench-results.jsonl";
/// How much of the end of the log the dashboard reads.
pub const MAX_READ_BYTES: u64 = 1024 * 1024;

/// One figure of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What it is.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
}

impl Figure {
    /// A figure.
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
        }
    }
}

/// Appends a run of `benchmark` with its `settings` and `figures` to the
/// log of `dir`, when `dir` is an initialised data directory (a bench run
/// elsewhere records nothing). Returns the file written.
pub fn record(
    dir: &DataDir,
    benchmark: &str,
    settings: serde_json::Value,
    figures: &[Figure],
) -> Result<Option<std::path::PathBuf>> {
    if !dir.file(crate::common::config::CONFIG_FILE).exists() {
        return Ok(None);
    }
    let path = dir.file(BENCH_FILE);
    let line = serde_json::json!({
        "unix_ms": crate::unix_ms(),
        "benchmark": benchmark,
        "version": crate::common::version::VERSION,
        "git_commit": crate::common::version::GIT_COMMIT,
        "settings": settings,
        "figures": figures,
    });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

/// The runs in the last [`MAX_READ_BYTES`] of the log of `dir`, oldest
/// first (lines that do not parse are skipped).
pub fn recent(dir: &DataDir) -> Vec<serde_json::Value> {
    let Ok(mut file) = std::fs::File::open(dir.file(BENCH_FILE)) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX_READ_BYTES);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    // Bytes, not a string: a read from the middle may start inside a
    // multi-byte character, which only the skipped first line may hold.
    let mut bytes = Vec::new();
    if file.take(MAX_READ_BYTES).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    // A read from the middle starts inside a line: skip to the next.
    let text: &str = if start > 0 {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_appended_and_read_back_only_in_a_data_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = DataDir::new(root.path());
        let figures = [Figure::new("committed throughput", 1234.0, "tx/s")];
        assert!(
            record(&dir, "consensus", serde_json::json!({}), &figures)
                .expect("no error")
                .is_none(),
            "not a data directory: nothing written"
        );
        std::fs::write(dir.file(crate::common::config::CONFIG_FILE), "").expect("config");
        for rate in [1, 2] {
            record(
                &dir,
                "consensus",
                serde_json::json!({ "rate": rate }),
                &figures,
            )
            .expect("recorded");
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.file(BENCH_FILE))
            .and_then(|mut f| f.write_all(b"not json\n"))
            .expect("garbage");
        let runs = recent(&dir);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1]["settings"]["rate"], 2);
        assert_eq!(runs[0]["figures"][0]["value"], 1234.0);
    }
}
