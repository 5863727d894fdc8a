//! One scrape in the Prometheus text format (version 0.0.4), for the gateway's and the agent's
//! `/metrics`: each binary fills a [`Scrape`] with the series it keeps, and the maintained
//! `prometheus-client` encoder writes it (`# HELP`/`# TYPE`, escaping, cumulative histogram
//! buckets, `+Inf`, number formats).
//!
//! Why the series are handed over as a snapshot rather than kept in prometheus-client's own
//! metric types: its `Family` finds a series by an owned label set, which is one allocation
//! per touch, and the gateway touches a labelled series on every RPC and every tunnelled
//! request. The gateway's families (`agentgate_gateway::metrics`) look series up through a
//! reused buffer instead; only a scrape copies them, and a scrape is rare.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// What a family measures, as Prometheus types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A family's series: label pairs (in the family's order) and a value.
#[derive(Debug)]
struct Series {
    labels: Vec<(&'static str, String)>,
    value: Value,
}

#[derive(Debug)]
enum Value {
    Number(f64),
    /// Observations per bucket (not cumulative) by upper bound, the last bound `+Inf`.
    Histogram {
        sum: f64,
        buckets: Vec<(f64, u64)>,
    },
}

/// One family of a scrape.
#[derive(Debug)]
pub struct Family {
    /// The full name, counters with their `_total` (the encoder adds it back).
    name: &'static str,
    help: &'static str,
    kind: Kind,
    series: Vec<Series>,
}

impl Family {
    /// Adds a counter's or a gauge's series.
    pub fn number(&mut self, labels: Vec<(&'static str, String)>, value: f64) -> &mut Self {
        debug_assert_ne!(self.kind, Kind::Histogram);
        self.series.push(Series {
            labels,
            value: Value::Number(value),
        });
        self
    }

    /// Adds a histogram's series: `counts[i]` observations at most `bounds[i]`, and one more
    /// count (the last) above every bound.
    pub fn histogram(
        &mut self,
        labels: Vec<(&'static str, String)>,
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
    ) -> &mut Self {
        debug_assert_eq!(self.kind, Kind::Histogram);
        debug_assert_eq!(bounds.len() + 1, counts.len());
        let buckets = bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts.iter().copied())
            .collect();
        self.series.push(Series {
            labels,
            value: Value::Histogram { sum, buckets },
        });
        self
    }
}

/// The families of one scrape, in the order they are added.
#[derive(Debug, Default)]
pub struct Scrape {
    families: Vec<Family>,
}

impl Scrape {
    /// Starts a family; add its series to what this returns. A family with no series is
    /// still described (`# HELP`, `# TYPE`).
    pub fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Family {
        self.families.push(Family {
            name,
            help,
            kind,
            series: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }

    /// The scrape in the Prometheus text format.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// The content type of [`Scrape::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for f in &self.families {
            let (name, kind) = match f.kind {
                Kind::Counter => (
                    f.name.strip_suffix("_total").unwrap_or(f.name),
                    MetricType::Counter,
                ),
                Kind::Gauge => (f.name, MetricType::Gauge),
                Kind::Histogram => (f.name, MetricType::Histogram),
            };
            let mut metric = encoder.encode_descriptor(name, f.help, None, kind)?;
            for s in &f.series {
                let mut series = metric.encode_family(&s.labels)?;
                match (&s.value, f.kind) {
                    (Value::Number(v), Kind::Counter) => match whole(*v) {
                        Some(n) if n >= 0 => {
                            series.encode_counter::<NoLabelSet, _, u64>(&(n as u64), None)?
                        }
                        _ => series.encode_counter::<NoLabelSet, _, f64>(v, None)?,
                    },
                    (Value::Number(v), _) => match whole(*v) {
                        Some(n) => series.encode_gauge(&n)?,
                        None => series.encode_gauge(v)?,
                    },
                    (Value::Histogram { sum, buckets }, _) => {
                        let count = buckets.iter().map(|(_, n)| n).sum();
                        series.encode_histogram::<NoLabelSet>(*sum, count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// `v` as an integer when it is one (so `3` prints as `3`, not `3.0`).
fn whole(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() < 9.0e15).then_some(v as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_in_the_text_format() {
        let mut s = Scrape::default();
        s.family("t_requests_total", "Requests.", Kind::Counter)
            .number(vec![("kind", "http".into())], 2.0)
            .number(vec![("kind", "a\"b\\c\nd".into())], 0.5);
        s.family("t_open", "Open now.", Kind::Gauge)
            .number(vec![], -1.0);
        s.family("t_empty", "Never touched.", Kind::Gauge);
        s.family("t_seconds", "Durations.", Kind::Histogram)
            .histogram(
                vec![("kind", "http".into())],
                &[0.001, 600.0],
                &[1, 2, 3],
                3600.5,
            );
        let text = s.render();
        for want in [
            "# HELP t_requests_total Requests.\n# TYPE t_requests_total counter\n",
            "t_requests_total{kind=\"http\"} 2\n",
            "t_requests_total{kind=\"a\\\"b\\\\c\\nd\"} 0.5\n",
            "# TYPE t_open gauge\nt_open -1\n",
            "# HELP t_empty Never touched.\n# TYPE t_empty gauge\n",
            "t_seconds_bucket{kind=\"http\",le=\"0.001\"} 1\n",
            "t_seconds_bucket{kind=\"http\",le=\"600\"} 3\n",
            "t_seconds_bucket{kind=\"http\",le=\"+Inf\"} 6\n",
            "t_seconds_sum{kind=\"http\"} 3600.5\n",
            "t_seconds_count{kind=\"http\"} 6\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert!(!text.contains("_total_total"), "{text}");
    }
}
