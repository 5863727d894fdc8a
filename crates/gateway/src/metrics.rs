//! The gateway's metrics: labelled counter, gauge and histogram families behind a mutex, and
//! their scrape.
//!
//! The series are kept here, looked up without allocating (hot paths touch one family once
//! per connection, per RPC or per request); the text a scrape returns is written by the
//! maintained prometheus-client encoder (`agentgate_proto::exposition`, which says why the
//! series are not kept in that crate's own types).

use std::collections::BTreeMap;
use std::sync::Mutex;

use agentgate_proto::exposition::{Kind, Scrape};
use agentgate_transport::{ConnMeta, IngressObserver, RejectReason, TransportKind};

/// Joins label values in a series key; label values are the gateway's own words (remote input
/// never becomes a label), so it never occurs in one.
const SEPARATOR: char = '\u{1f}';

/// A family of time series that share a name and label names.
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    /// Series by their label values joined with [`SEPARATOR`], so that the hot path looks a
    /// series up without allocating (per request and per RPC; measured with `bench unary`).
    values: Mutex<BTreeMap<String, f64>>,
}

impl Family {
    const fn new(
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            help,
            kind,
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// Calls `f` with the key of these label values, built in a reused per-thread buffer.
    fn with_key<R>(&self, label_values: &[&str], f: impl FnOnce(&str) -> R) -> R {
        debug_assert_eq!(label_values.len(), self.labels.len());
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        KEY.with(|k| {
            let mut k = k.borrow_mut();
            k.clear();
            for (i, v) in label_values.iter().enumerate() {
                if i > 0 {
                    k.push(SEPARATOR);
                }
                k.push_str(v);
            }
            f(&k)
        })
    }

    /// Adds `v` to the series with these label values (in the family's label order).
    pub fn add(&self, label_values: &[&str], v: f64) {
        self.with_key(label_values, |key| {
            let mut values = self.values.lock().unwrap();
            match values.get_mut(key) {
                Some(x) => *x += v,
                None => {
                    values.insert(key.to_string(), v);
                }
            }
        })
    }

    pub fn inc(&self, label_values: &[&str]) {
        self.add(label_values, 1.0);
    }

    pub fn set(&self, label_values: &[&str], v: f64) {
        self.with_key(label_values, |key| {
            self.values.lock().unwrap().insert(key.to_string(), v);
        })
    }

    /// The current value of one series (0 if never touched).
    pub fn get(&self, label_values: &[&str]) -> f64 {
        self.with_key(label_values, |key| {
            self.values.lock().unwrap().get(key).copied().unwrap_or(0.0)
        })
    }

    fn add_to(&self, scrape: &mut Scrape) {
        let family = scrape.family(self.name, self.help, self.kind);
        for (key, v) in self.values.lock().unwrap().iter() {
            family.number(label_pairs(self.labels, key), *v);
        }
    }
}

/// The label pairs of a series key.
fn label_pairs(labels: &'static [&'static str], key: &str) -> Vec<(&'static str, String)> {
    if labels.is_empty() {
        return Vec::new();
    }
    let values = key.split(SEPARATOR).map(str::to_string);
    labels.iter().copied().zip(values).collect()
}

/// Upper bounds (seconds) of the duration histograms: from a cached answer through a long poll.
const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0, 600.0,
];

#[derive(Default, Clone)]
struct Histogram {
    /// Observations per bucket (not cumulative), the last one above every bound.
    counts: [u64; DURATION_BUCKETS.len() + 1],
    sum: f64,
}

/// A family of duration histograms, keyed like [`Family`].
pub struct HistogramFamily {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    inner: Family,
    series: Mutex<BTreeMap<String, Histogram>>,
}

impl HistogramFamily {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            help,
            labels,
            // Only for its key building.
            inner: Family::new(name, help, Kind::Histogram, labels),
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one duration.
    pub fn observe(&self, label_values: &[&str], d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.inner.with_key(label_values, |key| {
            let mut series = self.series.lock().unwrap();
            let h = match series.get_mut(key) {
                Some(h) => h,
                None => series.entry(key.to_string()).or_default(),
            };
            h.counts[bucket] += 1;
            h.sum += secs;
        })
    }

    fn add_to(&self, scrape: &mut Scrape) {
        let family = scrape.family(self.name, self.help, Kind::Histogram);
        for (key, h) in self.series.lock().unwrap().iter() {
            family.histogram(
                label_pairs(self.labels, key),
                &DURATION_BUCKETS,
                &h.counts,
                h.sum,
            );
        }
    }
}

/// All of the gateway's metrics.
pub struct Metrics {
    pub connections_open: Family,
    pub connections_accepted: Family,
    pub connections_rejected: Family,
    pub http_connections_refused: Family,
    pub rpcs: Family,
    pub agents_connected: Family,
    pub tunnels_parked: Family,
    pub tunnel_streams_opened: Family,
    pub tunnel_requests: Family,
    pub tunnel_request_bytes: Family,
    pub tunnel_answers_cancelled: Family,
    pub redis_ops: Family,
    pub registry_writes: Family,
    pub forwards: Family,
    pub forwards_sent: Family,
    pub internal_rejected: Family,
    pub peers_refused: Family,
    pub peer_failures: Family,
    pub connect_rate_limited: Family,
    pub backend_calls: Family,
    pub backend_calls_open: Family,
    pub reloads: Family,
    pub tunnel_request_duration: HistogramFamily,
    pub backend_call_duration: HistogramFamily,
    pub tunnel_wait: HistogramFamily,
    pub registration_duration: HistogramFamily,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            connections_open: Family::new(
                "agentgate_connections_open",
                "Agent connections currently open, by transport.",
                Kind::Gauge,
                &["transport"],
            ),
            connections_accepted: Family::new(
                "agentgate_connections_accepted_total",
                "Agent connections accepted and classified, by transport.",
                Kind::Counter,
                &["transport"],
            ),
            connections_rejected: Family::new(
                "agentgate_connections_rejected_total",
                "Agent connections or calls refused, by reason.",
                Kind::Counter,
                &["reason"],
            ),
            http_connections_refused: Family::new(
                "agentgate_http_connections_refused_total",
                "Connections the tunnel API, admin and internal listeners refused or cut before \
                 their first request, by listener and reason.",
                Kind::Counter,
                &["listener", "reason"],
            ),
            rpcs: Family::new(
                "agentgate_rpcs_total",
                "Finished RPCs on the agent port, by method, gRPC status and transport.",
                Kind::Counter,
                &["method", "status", "transport"],
            ),
            agents_connected: Family::new(
                "agentgate_agents_connected",
                "Registered agent sessions, by transport.",
                Kind::Gauge,
                &["transport"],
            ),
            tunnels_parked: Family::new(
                "agentgate_tunnels_parked",
                "Idle tunnel streams parked by agents, ready for requests.",
                Kind::Gauge,
                &[],
            ),
            tunnel_streams_opened: Family::new(
                "agentgate_tunnel_streams_opened_total",
                "Tunnel streams agents opened (version-2 agents reuse them, so this grows with \
                 demand, not with requests).",
                Kind::Counter,
                &[],
            ),
            tunnel_requests: Family::new(
                "agentgate_tunnel_requests_total",
                "Requests through the tunnel API, by kind (http, grpc), outcome and the transport of the agent connection that served it (grpc, grpcs, ws, wss; replica when another replica did; none when no agent did).",
                Kind::Counter,
                &["kind", "outcome", "transport"],
            ),
            tunnel_request_bytes: Family::new(
                "agentgate_tunnel_bytes_total",
                "Body bytes carried through tunnels, by direction and the agent connection's transport.",
                Kind::Counter,
                &["direction", "transport"],
            ),
            tunnel_answers_cancelled: Family::new(
                "agentgate_tunnel_answers_cancelled_total",
                "Tunnelled answers the gateway cancelled at the agent, by reason (caller_stalled: \
                 the caller read nothing of it for stalled_caller_timeout) and the agent \
                 connection's transport.",
                Kind::Counter,
                &["reason", "transport"],
            ),
            redis_ops: Family::new(
                "agentgate_redis_ops_total",
                "Redis round trips (one per command or pipeline), by operation and outcome.",
                Kind::Counter,
                &["op", "outcome"],
            ),
            registry_writes: Family::new(
                "agentgate_registry_writes_total",
                "Registry entries written to Redis (never per tunnel or per request).",
                Kind::Counter,
                &[],
            ),
            forwards: Family::new(
                "agentgate_forwards_total",
                "Requests forwarded to another replica, by outcome.",
                Kind::Counter,
                &["outcome"],
            ),
            forwards_sent: Family::new(
                "agentgate_forwards_sent_total",
                "Requests sent to another replica, by route: direct (no body and one replica \
                 listed: one round trip) or reserved (a tunnel reserved first, then the request).",
                Kind::Counter,
                &["route"],
            ),
            internal_rejected: Family::new(
                "agentgate_internal_rejected_total",
                "Internal API calls refused, by reason (missing, malformed, bad_signature, \
                 expired, wrong_audience, wrong_route, wrong_head, replayed, replay_cache_full, \
                 body_mac).",
                Kind::Counter,
                &["reason"],
            ),
            peers_refused: Family::new(
                "agentgate_cluster_peers_refused_total",
                "Replica URLs read from Redis that match no internal_peers entry: ignored, sent nothing.",
                Kind::Counter,
                &[],
            ),
            peer_failures: Family::new(
                "agentgate_cluster_peer_failures_total",
                "Calls to a peer replica that could not connect or got no answer in time (the peer is then skipped for internal_peer_down_for).",
                Kind::Counter,
                &[],
            ),
            connect_rate_limited: Family::new(
                "agentgate_connect_rate_limited_total",
                "Registrations refused by the per-token connect rate limit.",
                Kind::Counter,
                &[],
            ),
            backend_calls: Family::new(
                "agentgate_backend_calls_total",
                "Finished agent calls to gateway-side backends, by backend (its configured name), \
                 outcome (answered, limited, unavailable, http_error, broken, \
                 cancelled_by_backend, cancelled_by_caller, deadline, max_duration, shutdown, revoked) and gRPC status.",
                Kind::Counter,
                &["backend", "outcome", "code"],
            ),
            reloads: Family::new(
                "agentgate_certificate_reloads_total",
                "Certificate reloads (a changed file, or SIGHUP), by listener and result.",
                Kind::Counter,
                &["listener", "result"],
            ),
            tunnel_request_duration: HistogramFamily::new(
                "agentgate_tunnel_request_duration_seconds",
                "Tunnel API requests from authentication to the answer's end, by kind and outcome.",
                &["kind", "outcome"],
            ),
            backend_call_duration: HistogramFamily::new(
                "agentgate_backend_call_duration_seconds",
                "Agent calls to gateway-side backends, from arrival to end, by backend.",
                &["backend"],
            ),
            tunnel_wait: HistogramFamily::new(
                "agentgate_tunnel_wait_seconds",
                "Time a request waited for a parked tunnel of its agent at this replica, by outcome (got, none).",
                &["outcome"],
            ),
            registration_duration: HistogramFamily::new(
                "agentgate_registration_duration_seconds",
                "From an agent connection's TCP accept to its session's registration (TLS, sniff, WebSocket upgrade, HTTP/2, Register), by transport.",
                &["transport"],
            ),
            backend_calls_open: Family::new(
                "agentgate_backend_calls_open",
                "Agent calls to gateway-side backends open now (long polls included), by backend.",
                Kind::Gauge,
                &["backend"],
            ),
        };
        m.registry_writes.set(&[], 0.0);
        m.peers_refused.set(&[], 0.0);
        m.peer_failures.set(&[], 0.0);
        m.connect_rate_limited.set(&[], 0.0);
        for t in TransportKind::ALL {
            m.connections_open.set(&[t.as_str()], 0.0);
            m.connections_accepted.set(&[t.as_str()], 0.0);
            m.agents_connected.set(&[t.as_str()], 0.0);
        }
        for r in RejectReason::ALL {
            m.connections_rejected.set(&[r.as_str()], 0.0);
        }
        m.connections_rejected.set(&[REJECT_UNAUTHENTICATED], 0.0);
        for listener in crate::http_listener::LISTENERS {
            for reason in crate::http_listener::REFUSAL_REASONS {
                m.http_connections_refused.set(&[listener, reason], 0.0);
            }
        }
        m.tunnels_parked.set(&[], 0.0);
        m.tunnel_streams_opened.set(&[], 0.0);
        m
    }
}

/// The rejection reason for calls with a missing or invalid token.
pub const REJECT_UNAUTHENTICATED: &str = "unauthenticated";

impl Metrics {
    /// Adds every family, then the process's own series, to a scrape.
    pub fn add_to(&self, scrape: &mut Scrape) {
        for f in [
            &self.connections_open,
            &self.connections_accepted,
            &self.connections_rejected,
            &self.http_connections_refused,
            &self.rpcs,
            &self.agents_connected,
            &self.tunnels_parked,
            &self.tunnel_streams_opened,
            &self.tunnel_requests,
            &self.tunnel_request_bytes,
            &self.tunnel_answers_cancelled,
            &self.redis_ops,
            &self.registry_writes,
            &self.forwards,
            &self.forwards_sent,
            &self.internal_rejected,
            &self.peers_refused,
            &self.peer_failures,
            &self.connect_rate_limited,
            &self.backend_calls,
            &self.backend_calls_open,
            &self.reloads,
        ] {
            f.add_to(scrape);
        }
        for h in [
            &self.tunnel_request_duration,
            &self.backend_call_duration,
            &self.tunnel_wait,
            &self.registration_duration,
        ] {
            h.add_to(scrape);
        }
        crate::oversized_headers::add_to(scrape);
        crate::process_metrics::add_to(scrape);
    }

    /// The whole scrape, as text.
    pub fn render(&self) -> String {
        let mut scrape = Scrape::default();
        self.add_to(&mut scrape);
        scrape.render()
    }
}

impl IngressObserver for Metrics {
    fn rejected(&self, reason: RejectReason) {
        self.connections_rejected.inc(&[reason.as_str()]);
    }
    fn opened(&self, meta: &ConnMeta) {
        self.connections_accepted.inc(&[meta.kind.as_str()]);
        self.connections_open.add(&[meta.kind.as_str()], 1.0);
    }
    fn closed(&self, meta: &ConnMeta) {
        self.connections_open.add(&[meta.kind.as_str()], -1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let h = HistogramFamily::new("t_seconds", "test", &["kind"]);
        h.observe(&["http"], std::time::Duration::from_millis(2));
        h.observe(&["http"], std::time::Duration::from_millis(2));
        h.observe(&["http"], std::time::Duration::from_secs(3600));
        let mut scrape = Scrape::default();
        h.add_to(&mut scrape);
        let out = scrape.render();
        assert!(
            out.contains("t_seconds_bucket{kind=\"http\",le=\"0.001\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{kind=\"http\",le=\"0.0025\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{kind=\"http\",le=\"600\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{kind=\"http\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("t_seconds_count{kind=\"http\"} 3\n"), "{out}");
        assert!(
            out.contains("t_seconds_sum{kind=\"http\"} 3600.004"),
            "{out}"
        );
    }

    #[test]
    fn renders_families_with_escaped_labels() {
        let m = Metrics::default();
        m.rpcs.inc(&["/a.B/C", "OK", "grpc"]);
        m.rpcs.inc(&["/a.B/C", "OK", "grpc"]);
        m.connections_rejected.inc(&["bad\"x"]);
        let text = m.render();
        assert!(text.contains(
            "agentgate_rpcs_total{method=\"/a.B/C\",status=\"OK\",transport=\"grpc\"} 2"
        ));
        assert!(text.contains("agentgate_connections_rejected_total{reason=\"bad\\\"x\"} 1"));
        assert!(text.contains("agentgate_connections_open{transport=\"wss\"} 0"));
        assert!(text.contains("# TYPE agentgate_tunnels_parked gauge\nagentgate_tunnels_parked 0"));
    }
}
