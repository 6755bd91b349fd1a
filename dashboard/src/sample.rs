//! Reading values back out of the node's own metrics exposition, so that
//! the history and the alert rules use exactly the metric names and
//! label values `/metrics` shows (and Prometheus sees).

/// One sample line of the exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name, as exposed (counters with `_total`).
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// Every sample of one exposition (OpenMetrics or classic text).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    samples: Vec<Sample>,
}

impl Snapshot {
    /// Parses an exposition; lines that are not samples (comments, `# EOF`,
    /// anything malformed) are skipped.
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text.lines().filter_map(parse_line).collect(),
        }
    }

    /// The sum of `metric` over its samples whose labels include every pair
    /// of `labels`, or `None` when no sample matches.
    pub fn sum(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matched = false;
        let mut sum = 0.0;
        for s in self.samples.iter().filter(|s| s.name == metric) {
            let all = labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v));
            if all {
                matched = true;
                sum += s.value;
            }
        }
        matched.then_some(sum)
    }
}

impl Snapshot {
    /// The largest value among `metric`'s samples, or `None` without any.
    pub fn max(&self, metric: &str) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| s.name == metric)
            .map(|s| s.value)
            .reduce(f64::max)
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the pairs and what follows `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let mut chars = s[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return None;
        }
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in chars {
            match (escaped, c) {
                (true, 'n') => {
                    value.push('\n');
                    escaped = false;
                }
                (true, c) => {
                    value.push(c);
                    escaped = false;
                }
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                (false, c) => value.push(c),
            }
        }
        s = &s[end?..];
        labels.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_label_filters() {
        let text = "# HELP openagi_x_total X\n# TYPE openagi_x counter\n\
            openagi_x_total{direction=\"inbound\",protocol=\"msg\"} 3\n\
            openagi_x_total{direction=\"outbound\",protocol=\"msg\"} 4\n\
            openagi_x_total{direction=\"inbound\",protocol=\"a\\\"b,c}\"} 5\n\
            openagi_up 1\n\
            openagi_latency_seconds_bucket{le=\"+Inf\"} 7 1700000000\n\
            garbage line\n# EOF\n";
        let s = Snapshot::parse(text);
        assert_eq!(s.sum("openagi_x_total", &[]), Some(12.0));
        assert_eq!(
            s.sum("openagi_x_total", &[("direction", "inbound")]),
            Some(8.0)
        );
        assert_eq!(
            s.sum("openagi_x_total", &[("protocol", "a\"b,c}")]),
            Some(5.0)
        );
        assert_eq!(s.sum("openagi_up", &[]), Some(1.0));
        assert_eq!(
            s.sum("openagi_latency_seconds_bucket", &[("le", "+Inf")]),
            Some(7.0)
        );
        assert_eq!(s.sum("openagi_missing", &[]), None);
        assert_eq!(s.max("openagi_x_total"), Some(5.0));
        assert_eq!(s.max("openagi_missing"), None);
        assert_eq!(s.sum("openagi_x_total", &[("direction", "sideways")]), None);
    }
}
