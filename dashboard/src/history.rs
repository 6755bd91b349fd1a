//! Metric history kept by the daemon for its dashboard: a fixed set of
//! series, each in two fixed-size rings, so memory never grows.
//!
//! - the **fine** ring holds every sample of the last hour
//!   ([`FINE_POINTS`] at one sample per [`SAMPLE_INTERVAL_MS`]);
//! - the **coarse** ring holds one point per minute for 24 hours
//!   ([`COARSE_POINTS`]), the mean of that minute's samples.
//!
//! A point is 16 bytes (time and value), so one series takes
//! `(FINE_POINTS + COARSE_POINTS) × 16` = 34,560 bytes and the history of
//! the 13 [`SERIES`] 449,280 bytes, allocated once when the history is
//! made.
//! Time is passed in (milliseconds since the Unix epoch): the history reads
//! no clock.

use std::collections::VecDeque;

use serde::Serialize;

/// How often the daemon samples its metrics.
pub const SAMPLE_INTERVAL_MS: u64 = 5_000;
/// Samples kept at full resolution: one hour.
pub const FINE_POINTS: usize = 720;
/// Width of a downsampled point.
pub const COARSE_STEP_MS: u64 = 60_000;
/// Downsampled points kept: 24 hours of minutes.
pub const COARSE_POINTS: usize = 1440;

/// How a series' value comes out of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The value as sampled (a gauge).
    Gauge,
    /// The per-second rate of a counter between two samples.
    Rate,
}

/// One series the history keeps: a name for the page, the metric it reads
/// (summed over the label values that match `labels`), and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SeriesSpec {
    /// The name the page uses.
    pub name: &'static str,
    /// The Prometheus metric it reads, as `/metrics` shows it.
    pub metric: &'static str,
    /// Label pairs a sample must carry to count (empty: every sample).
    #[serde(skip)]
    pub labels: &'static [(&'static str, &'static str)],
    /// Gauge or counter rate.
    pub kind: Kind,
    /// Unit shown on the page.
    pub unit: &'static str,
}

/// The series every node keeps, in page order.
pub const SERIES: &[SeriesSpec] = &[
    SeriesSpec {
        name: "peers",
        metric: "openagi_peers_connected",
        labels: &[],
        kind: Kind::Gauge,
        unit: "peers",
    },
    SeriesSpec {
        name: "ledger_height",
        metric: "openagi_consensus_height",
        labels: &[],
        kind: Kind::Gauge,
        unit: "blocks",
    },
    SeriesSpec {
        name: "committed_tx_rate",
        metric: "openagi_consensus_committed_transactions_total",
        labels: &[],
        kind: Kind::Rate,
        unit: "tx/s",
    },
    SeriesSpec {
        name: "block_rate",
        metric: "openagi_consensus_committed_blocks_total",
        labels: &[],
        kind: Kind::Rate,
        unit: "blocks/s",
    },
    SeriesSpec {
        name: "view",
        metric: "openagi_consensus_view",
        labels: &[],
        kind: Kind::Gauge,
        unit: "view",
    },
    SeriesSpec {
        name: "view_change_rate",
        metric: "openagi_consensus_view_changes_total",
        labels: &[],
        kind: Kind::Rate,
        unit: "changes/s",
    },
    SeriesSpec {
        name: "pending_transactions",
        metric: "openagi_consensus_pending_transactions",
        labels: &[],
        kind: Kind::Gauge,
        unit: "tx",
    },
    SeriesSpec {
        name: "bytes_in_rate",
        metric: "openagi_p2p_payload_bytes_total",
        labels: &[("direction", "inbound")],
        kind: Kind::Rate,
        unit: "B/s",
    },
    SeriesSpec {
        name: "bytes_out_rate",
        metric: "openagi_p2p_payload_bytes_total",
        labels: &[("direction", "outbound")],
        kind: Kind::Rate,
        unit: "B/s",
    },
    SeriesSpec {
        name: "gossip_rate",
        metric: "openagi_gossip_messages_total",
        labels: &[("outcome", "accepted")],
        kind: Kind::Rate,
        unit: "messages/s",
    },
    SeriesSpec {
        name: "dial_error_rate",
        metric: "openagi_dial_errors_total",
        labels: &[],
        kind: Kind::Rate,
        unit: "errors/s",
    },
    SeriesSpec {
        name: "refused_rate",
        metric: "openagi_p2p_inbound_refused_total",
        labels: &[],
        kind: Kind::Rate,
        unit: "refusals/s",
    },
    SeriesSpec {
        name: "resident_memory",
        metric: "openagi_process_resident_memory_bytes",
        labels: &[],
        kind: Kind::Gauge,
        unit: "B",
    },
];

/// One point of a series.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Point {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    /// The value.
    pub v: f64,
}

/// A ring of points with a fixed capacity: the oldest goes when full.
#[derive(Clone, Debug)]
struct Ring {
    points: VecDeque<Point>,
    capacity: usize,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            points: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    fn push(&mut self, point: Point) {
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back(point);
    }
}

/// One series' rings and what it needs to turn counters into rates and
/// samples into minutes.
#[derive(Clone, Debug)]
struct SeriesState {
    fine: Ring,
    coarse: Ring,
    /// The previous raw sample of a counter, for its rate.
    last_raw: Option<Point>,
    /// The minute being filled: its start, value sum and count.
    minute: Option<(u64, f64, u32)>,
}

/// The metric history (see the module documentation).
#[derive(Clone, Debug)]
pub struct History {
    series: Vec<SeriesState>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

/// A series as the page reads it.
#[derive(Clone, Debug, Serialize)]
pub struct SeriesView {
    /// What it is.
    #[serde(flatten)]
    pub spec: SeriesSpec,
    /// The last hour, every sample.
    pub fine: Vec<Point>,
    /// The last 24 hours, one point a minute.
    pub coarse: Vec<Point>,
}

impl History {
    /// An empty history of [`SERIES`], its memory allocated now.
    pub fn new() -> Self {
        Self {
            series: SERIES
                .iter()
                .map(|_| SeriesState {
                    fine: Ring::new(FINE_POINTS),
                    coarse: Ring::new(COARSE_POINTS),
                    last_raw: None,
                    minute: None,
                })
                .collect(),
        }
    }

    /// Records one sample taken at `now_ms`: `read` gives the raw value of
    /// a spec's metric (`None` when the node does not export it, e.g. no
    /// consensus on this node). Counters become per-second rates; a
    /// counter that went down (a restart) starts over without a point.
    pub fn record(&mut self, now_ms: u64, read: impl Fn(&SeriesSpec) -> Option<f64>) {
        for (spec, state) in SERIES.iter().zip(&mut self.series) {
            let Some(raw) = read(spec).filter(|v| v.is_finite()) else {
                continue;
            };
            let value = match spec.kind {
                Kind::Gauge => Some(raw),
                Kind::Rate => {
                    let rate = state.last_raw.and_then(|last| {
                        let dt = now_ms.checked_sub(last.t).filter(|&dt| dt > 0)?;
                        let dv = raw - last.v;
                        (dv >= 0.0).then(|| dv * 1000.0 / dt as f64)
                    });
                    state.last_raw = Some(Point { t: now_ms, v: raw });
                    rate
                }
            };
            let Some(v) = value else { continue };
            state.fine.push(Point { t: now_ms, v });
            let minute = now_ms - now_ms % COARSE_STEP_MS;
            match &mut state.minute {
                Some((start, sum, count)) if *start == minute => {
                    *sum += v;
                    *count += 1;
                }
                slot => {
                    if let Some((start, sum, count)) = slot.take() {
                        state.coarse.push(Point {
                            t: start,
                            v: sum / f64::from(count),
                        });
                    }
                    *slot = Some((minute, v, 1));
                }
            }
        }
    }

    /// The latest value of series `name`.
    pub fn latest(&self, name: &str) -> Option<f64> {
        self.index(name)
            .and_then(|i| self.series[i].fine.points.back())
            .map(|p| p.v)
    }

    /// The points of series `name` at or after `since_ms`, oldest first.
    pub fn since(&self, name: &str, since_ms: u64) -> Vec<Point> {
        self.index(name)
            .map(|i| {
                self.series[i]
                    .fine
                    .points
                    .iter()
                    .filter(|p| p.t >= since_ms)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every series with both rings (the minute being filled included in
    /// the coarse view), for the page.
    pub fn views(&self) -> Vec<SeriesView> {
        SERIES
            .iter()
            .zip(&self.series)
            .map(|(spec, state)| {
                let mut coarse: Vec<Point> = state.coarse.points.iter().copied().collect();
                if let Some((start, sum, count)) = state.minute {
                    coarse.push(Point {
                        t: start,
                        v: sum / f64::from(count),
                    });
                }
                SeriesView {
                    spec: *spec,
                    fine: state.fine.points.iter().copied().collect(),
                    coarse,
                }
            })
            .collect()
    }

    /// The latest point of every series, for live updates.
    pub fn latest_points(&self) -> Vec<(&'static str, Point)> {
        SERIES
            .iter()
            .zip(&self.series)
            .filter_map(|(spec, state)| state.fine.points.back().map(|p| (spec.name, *p)))
            .collect()
    }

    fn index(&self, name: &str) -> Option<usize> {
        SERIES.iter().position(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(name: &'static str, v: f64) -> impl Fn(&SeriesSpec) -> Option<f64> {
        move |s| (s.name == name).then_some(v)
    }

    /// The sizes the module documentation and the README state.
    #[test]
    fn documented_sizes_hold() {
        let per_series = (FINE_POINTS + COARSE_POINTS) * std::mem::size_of::<Point>();
        assert_eq!(per_series, 34_560);
        assert_eq!(SERIES.len(), 13);
        assert_eq!(SERIES.len() * per_series, 449_280);
    }

    #[test]
    fn rings_never_grow_past_their_capacity() {
        let mut h = History::new();
        let start = 1_700_000_000_000;
        for i in 0..(FINE_POINTS as u64 * 30) {
            h.record(start + i * SAMPLE_INTERVAL_MS, value_of("peers", i as f64));
        }
        let views = h.views();
        let peers = views
            .iter()
            .find(|v| v.spec.name == "peers")
            .expect("series");
        assert_eq!(peers.fine.len(), FINE_POINTS);
        // 30 hours of samples: the coarse ring is full and holds the last
        // 24 hours (plus the minute being filled).
        assert_eq!(peers.coarse.len(), COARSE_POINTS + 1);
        let last = start + (FINE_POINTS as u64 * 30 - 1) * SAMPLE_INTERVAL_MS;
        assert_eq!(peers.fine.last().map(|p| p.t), Some(last));
        assert!(peers.coarse[0].t >= last - 24 * 3600 * 1000 - COARSE_STEP_MS);
        for state in &h.series {
            assert!(state.fine.points.capacity() >= FINE_POINTS);
            assert!(state.fine.points.len() <= FINE_POINTS);
            assert!(state.coarse.points.len() <= COARSE_POINTS);
        }
    }

    #[test]
    fn a_minute_is_the_mean_of_its_samples() {
        let mut h = History::new();
        let minute = 1_700_000_040_000 - 1_700_000_040_000 % COARSE_STEP_MS;
        for (i, v) in [2.0, 4.0, 6.0].into_iter().enumerate() {
            h.record(minute + i as u64 * 1000, value_of("peers", v));
        }
        h.record(minute + COARSE_STEP_MS, value_of("peers", 100.0));
        let view = h
            .views()
            .into_iter()
            .find(|v| v.spec.name == "peers")
            .expect("series");
        assert_eq!(view.coarse[0], Point { t: minute, v: 4.0 });
        assert_eq!(
            view.coarse[1],
            Point {
                t: minute + COARSE_STEP_MS,
                v: 100.0
            }
        );
    }

    #[test]
    fn counters_become_rates_and_a_reset_starts_over() {
        let mut h = History::new();
        let t0 = 1_700_000_000_000;
        let tx = |v: f64| move |s: &SeriesSpec| (s.name == "committed_tx_rate").then_some(v);
        h.record(t0, tx(100.0));
        assert_eq!(
            h.latest("committed_tx_rate"),
            None,
            "one sample has no rate"
        );
        h.record(t0 + 5_000, tx(600.0));
        assert_eq!(h.latest("committed_tx_rate"), Some(100.0));
        // The node restarted: the counter went down. No negative rate.
        h.record(t0 + 10_000, tx(50.0));
        assert_eq!(h.since("committed_tx_rate", 0).len(), 1);
        h.record(t0 + 15_000, tx(100.0));
        assert_eq!(h.latest("committed_tx_rate"), Some(10.0));
    }

    #[test]
    fn missing_or_non_finite_values_add_nothing() {
        let mut h = History::new();
        h.record(1, |_| None);
        h.record(2, |_| Some(f64::NAN));
        assert!(
            h.views()
                .iter()
                .all(|v| v.fine.is_empty() && v.coarse.is_empty())
        );
    }
}
