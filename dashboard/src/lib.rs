//! Operator-facing observability of an Open-AGI node.
//!
//! Owns the node's single Prometheus registry ([`MetricsRegistry`]): every
//! crate registers its metrics into it under the `openagi_` namespace
//! (libp2p's own metrics land under `openagi_libp2p_`), and
//! [`MetricsRegistry::encode`] renders the Prometheus text exposition
//! format served at `/metrics`.
//!
//! Conventions kept here: base units (seconds, bytes), counters end in
//! `_total`, and no label ever carries a peer id or network address, so the
//! number of series stays bounded.
//!
//! It also holds what the daemon's web dashboard is made of, apart from
//! the HTTP serving (the node's job): [`sample`] reads values back out of
//! the exposition, [`history`] keeps a fixed-memory history of the key
//! series, [`alerts`] defines the alert rules once and evaluates them, and
//! [`web`] is the embedded page.

pub mod alerts;
pub mod history;
pub mod sample;
pub mod web;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// The Prometheus namespace of every metric the node exports.
pub const NAMESPACE: &str = "openagi";

/// Errors from rendering metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text encoder failed (a label value that cannot be written).
    #[error("encoding metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// What the binary was built from: the labels of `openagi_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfo {
    /// The software version.
    pub version: String,
    /// The git commit it was built from (short hash, or "unknown").
    pub git_commit: String,
    /// The compiler, as `rustc --version` prints it (or "unknown").
    pub rustc_version: String,
}

/// The node's metrics registry.
pub struct MetricsRegistry {
    registry: Registry,
    /// Seconds since the process started, updated on every scrape.
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Resident memory, read from /proc on every scrape.
    resident_memory: Gauge,
    started: std::time::Instant,
}

impl MetricsRegistry {
    /// A registry with `openagi_build_info{version,git_commit,rustc_version}`
    /// and `openagi_process_uptime_seconds` already registered.
    pub fn new(build: &BuildInfo) -> Self {
        let mut registry = Registry::with_prefix(NAMESPACE);
        let build_info = Family::<BuildInfo, Gauge>::default();
        build_info.get_or_create(build).set(1);
        registry.register(
            "build_info",
            "Build information; the value is always 1",
            build_info,
        );
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "process_uptime",
            "Time since the daemon started",
            Unit::Seconds,
            uptime.clone(),
        );
        let resident_memory = Gauge::default();
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the daemon process",
            Unit::Bytes,
            resident_memory.clone(),
        );
        Self {
            registry,
            uptime,
            resident_memory,
            started: std::time::Instant::now(),
        }
    }

    /// The registry, for registering more metrics during start-up.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Renders every metric in the OpenMetrics text format (ending in
    /// `# EOF`), for scrapers that accept it.
    pub fn encode(&self) -> Result<String, Error> {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        if let Some(bytes) = resident_memory_bytes() {
            self.resident_memory
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut text = String::with_capacity(16 * 1024);
        encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Renders every metric in the classic Prometheus text format 0.0.4,
    /// for scrapers and tools (`promtool`, older Prometheus) that do not
    /// ask for OpenMetrics.
    pub fn encode_classic(&self) -> Result<String, Error> {
        Ok(openmetrics_to_classic(&self.encode()?))
    }

    /// Picks the format for an HTTP `Accept` header: OpenMetrics when the
    /// client lists it, the classic format otherwise. Returns the body and
    /// its content type.
    pub fn encode_for(&self, accept: Option<&str>) -> Result<(String, &'static str), Error> {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            Ok((self.encode()?, OPENMETRICS_CONTENT_TYPE))
        } else {
            Ok((self.encode_classic()?, CLASSIC_CONTENT_TYPE))
        }
    }
}

/// This process's resident memory (`VmRSS` in `/proc/self/status`), where
/// the system has it.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Converts OpenMetrics text to the classic format: a counter family is
/// named with its `_total` suffix in HELP and TYPE (as its samples are),
/// and the OpenMetrics-only `# UNIT` and `# EOF` lines are dropped.
pub fn openmetrics_to_classic(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn exports_namespaced_build_info_and_counters_with_total() {
        let mut metrics = MetricsRegistry::new(&BuildInfo {
            version: "1.2.3".into(),
            git_commit: "abc1234".into(),
            rustc_version: "rustc 1.95.0 (0123456789 2026-01-01)".into(),
        });
        let counter = Counter::<u64>::default();
        metrics
            .registry_mut()
            .register("widgets", "Widgets made", counter.clone());
        counter.inc_by(3);
        let text = metrics.encode().expect("encodes");
        assert!(
            text.contains(
                "openagi_build_info{version=\"1.2.3\",git_commit=\"abc1234\",rustc_version=\"rustc 1.95.0 (0123456789 2026-01-01)\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("openagi_widgets_total 3"), "{text}");
        assert!(
            text.contains("# TYPE openagi_process_uptime_seconds gauge"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));

        let classic = metrics.encode_classic().expect("encodes");
        assert!(
            classic.contains("# TYPE openagi_widgets_total counter\n"),
            "{classic}"
        );
        assert!(
            classic.contains("# HELP openagi_widgets_total Widgets made.\n"),
            "{classic}"
        );
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
        assert!(classic.contains("openagi_widgets_total 3"));
    }

    #[test]
    fn content_negotiation_follows_accept() {
        let metrics = MetricsRegistry::new(&BuildInfo {
            version: "1".into(),
            git_commit: "unknown".into(),
            rustc_version: "unknown".into(),
        });
        let (_, ct) = metrics
            .encode_for(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            ))
            .expect("ok");
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert_eq!(
            metrics.encode_for(None).expect("ok").1,
            CLASSIC_CONTENT_TYPE
        );
        assert_eq!(
            metrics.encode_for(Some("text/plain")).expect("ok").1,
            CLASSIC_CONTENT_TYPE
        );
    }
}
