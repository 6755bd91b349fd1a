//! `openagi_tor_*` metrics. Labels come from small fixed sets; never a
//! peer id or onion address.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::{Direction, DirectionLabels};

/// Labels: outcome of an operation (`ok` or `error`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Tor metrics, registered once per node.
#[derive(Clone, Debug)]
pub struct TorMetrics {
    /// 1 once Tor can carry traffic.
    pub bootstrapped: Gauge,
    /// Bootstrap progress, 0 to 1.
    pub bootstrap_progress: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Seconds from start until Tor was ready for traffic.
    pub bootstrap_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 while the onion service is published and reachable.
    pub onion_service_up: Gauge,
    /// Time to open one onion stream (circuit building, descriptor lookup
    /// and rendezvous included).
    pub connect_duration: Histogram,
    /// Onion dials by outcome.
    pub dials: Family<OutcomeLabels, Counter>,
    /// Onion streams accepted by this node's service.
    pub inbound_streams: Counter,
    /// Bytes received through Tor streams.
    pub bytes_in: Counter,
    /// Bytes sent through Tor streams.
    pub bytes_out: Counter,
    /// System tor: ControlPort (re)connections by outcome.
    pub control_connects: Family<OutcomeLabels, Counter>,
}

impl TorMetrics {
    /// Registers the metrics under `tor_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let sub = registry.sub_registry_with_prefix("tor");
        let m = Self {
            bootstrapped: Gauge::default(),
            bootstrap_progress: Gauge::default(),
            bootstrap_seconds: Gauge::default(),
            onion_service_up: Gauge::default(),
            connect_duration: Histogram::new([0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
            dials: Family::default(),
            inbound_streams: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            control_connects: Family::default(),
        };
        sub.register(
            "bootstrapped",
            "1 once Tor is bootstrapped and can carry traffic",
            m.bootstrapped.clone(),
        );
        sub.register(
            "bootstrap_progress_ratio",
            "Tor bootstrap progress from 0 to 1",
            m.bootstrap_progress.clone(),
        );
        sub.register_with_unit(
            "bootstrap_duration",
            "Time from start until Tor was ready for traffic",
            Unit::Seconds,
            m.bootstrap_seconds.clone(),
        );
        sub.register(
            "onion_service_up",
            "1 while this node's onion service is published",
            m.onion_service_up.clone(),
        );
        sub.register_with_unit(
            "onion_connect_duration",
            "Time to open an onion stream, circuit building included",
            Unit::Seconds,
            m.connect_duration.clone(),
        );
        sub.register("onion_dials", "Onion dials by outcome", m.dials.clone());
        sub.register(
            "onion_inbound_streams",
            "Onion streams accepted by this node's service",
            m.inbound_streams.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        sub.register_with_unit(
            "transferred",
            "Bytes carried by Tor streams",
            Unit::Bytes,
            bytes.clone(),
        );
        // The family hands out the counters it holds, so the hot path
        // increments plain counters without a lookup. One call at a time:
        // the guard `get_or_create` returns holds the family's lock.
        let bytes_in = bytes
            .get_or_create(&DirectionLabels {
                direction: Direction::Inbound,
            })
            .clone();
        let bytes_out = bytes
            .get_or_create(&DirectionLabels {
                direction: Direction::Outbound,
            })
            .clone();
        let m = Self {
            bytes_in,
            bytes_out,
            ..m
        };
        sub.register(
            "control_connects",
            "System tor ControlPort connections by outcome",
            m.control_connects.clone(),
        );
        m
    }

    pub(crate) fn record_dial(&self, ok: bool, took: Duration) {
        self.dials
            .get_or_create(&OutcomeLabels {
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
        if ok {
            self.connect_duration.observe(took.as_secs_f64());
        }
    }

    pub(crate) fn set_bootstrap(&self, fraction: f64, ready: bool) {
        self.bootstrap_progress.set(fraction);
        self.bootstrapped.set(i64::from(ready));
    }
}
