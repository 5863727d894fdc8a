//! `bench unary`: the agent port's own unary calls, as runners will make them by the hundred
//! thousand: h2load sending `grpc.health.v1.Health/Check` over h2c to the gateway's agent port,
//! next to a bare tonic server with only the health service (`bench-control health`), in one
//! run. Server CPU per call is read from /proc; h2load runs in its own process.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use super::{median, progress, reduce_samples, Bench};

/// (connections, streams per connection) of the two load levels.
pub(super) const LEVELS: [(usize, usize); 2] = [(1, 1), (50, 4)];

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// The gateway's count of health checks it answered OK over h2c.
const HEALTH_OK: &str = "agentgate_rpcs_total{method=\"/grpc.health.v1.Health/Check\",status=\"OK\",transport=\"grpc\"}";

#[derive(Serialize, Clone, Copy, Default)]
struct Cell {
    calls_per_s: f64,
    cpu_us: f64,
}

#[derive(Serialize)]
pub struct Unary {
    rounds: usize,
    secs: f64,
    /// (column, level) -> median.
    cells: BTreeMap<String, BTreeMap<String, Cell>>,
}

pub(super) fn level_name((c, m): (usize, usize)) -> String {
    format!("{c} conn. x {m} streams")
}

impl Bench {
    pub(super) async fn unary(&mut self) -> anyhow::Result<Unary> {
        require_h2load("unary")?;
        let (bare, bare_addr) = self
            .spawn_server(&["bench-control", "health"], "bare-health.log")
            .await?;
        let gw = self.gateway(None).await?;
        let token = std::fs::read_to_string(self.token_file("unary-caller")?)?;
        let body = self.dir.join("health-request.bin");
        // One gRPC frame: uncompressed, length 0 (an empty HealthCheckRequest).
        std::fs::write(&body, [0u8; 5])?;
        let columns = [
            ("bare tonic", bare_addr, &bare),
            (
                "agentgate",
                SocketAddr::from(([127, 0, 0, 1], gw.clear_port)),
                &gw.kid,
            ),
        ];
        let rounds = self.args.rounds.max(1);
        let secs = self.args.keepalive_secs;
        let mut samples: BTreeMap<(String, String), Vec<Cell>> = BTreeMap::new();
        for round in 0..rounds {
            for level in LEVELS {
                for (name, addr, kid) in &columns {
                    progress(&format!(
                        "unary: round {}/{rounds}: {}: {name}",
                        round + 1,
                        level_name(level)
                    ));
                    let through_gateway = std::ptr::eq(*kid, &gw.kid);
                    let ok0 = self.metric(&gw, HEALTH_OK).await;
                    let cpu0 = kid.cpu();
                    let done = h2load(*addr, HEALTH_CHECK, level, secs, &body, token.trim())?;
                    let cpu1 = kid.cpu();
                    // h2load counts a gRPC error answered with HTTP 200 as a success; the
                    // gateway's own count says whether the calls were answered OK.
                    if through_gateway {
                        let ok = self.metric(&gw, HEALTH_OK).await - ok0;
                        anyhow::ensure!(
                            ok >= done.succeeded as f64 * 0.99,
                            "only {ok} of {} health checks were answered OK by the gateway",
                            done.succeeded
                        );
                    }
                    samples
                        .entry((name.to_string(), level_name(level)))
                        .or_default()
                        .push(Cell {
                            calls_per_s: done.succeeded as f64 / done.secs,
                            cpu_us: (cpu1 - cpu0).as_secs_f64() * 1e6
                                / (done.total_done.max(1)) as f64,
                        });
                }
            }
        }
        let cells = reduce_samples(samples, |v| {
            let med = |f: fn(&Cell) -> f64| median(v.iter().map(f).collect());
            Cell {
                calls_per_s: med(|c| c.calls_per_s),
                cpu_us: med(|c| c.cpu_us),
            }
        });
        Ok(Unary {
            rounds,
            secs,
            cells,
        })
    }
}

/// Fails with what to install when h2load is missing.
pub(super) fn require_h2load(scenario: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::process::Command::new("h2load")
            .arg("--version")
            .output()
            .is_ok(),
        "bench {scenario} needs h2load (Debian: apt-get install nghttp2-client)"
    );
    Ok(())
}

pub(super) struct H2loadResult {
    /// Responses with a 2xx status.
    pub succeeded: u64,
    /// All requests done (the denominator of CPU per call).
    pub total_done: u64,
    pub secs: f64,
    /// h2load's mean "time for request", in µs.
    pub mean_latency_us: f64,
}

/// Runs h2load for `secs` (no warm-up phase, so that its counts cover the whole time the
/// server's CPU is measured) and reads its summary.
pub(super) fn h2load(
    addr: SocketAddr,
    path: &str,
    (conns, streams): (usize, usize),
    secs: f64,
    body: &std::path::Path,
    token: &str,
) -> anyhow::Result<H2loadResult> {
    let out = std::process::Command::new("h2load")
        .arg(format!("http://{addr}{path}"))
        .args(["-c", &conns.to_string(), "-m", &streams.to_string()])
        .args(["-t", "1"])
        .arg(format!("--duration={secs}"))
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "h2load failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    // "requests: 1000 total, 1000 started, 1000 done, 1000 succeeded, 0 failed, ..."
    let field = |line: &str, after: &str| -> Option<u64> {
        let i = line.find(after)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .ok_or_else(|| anyhow::anyhow!("h2load printed no summary: {text}"))?;
    let succeeded = field(requests, " succeeded").unwrap_or(0);
    let done = field(requests, " done").unwrap_or(0);
    anyhow::ensure!(succeeded > 0, "no call succeeded: {text}");
    // "time for request:      151us    2.53ms    285us    102us    88.13%": min, max, mean, sd.
    let mean_latency_us = text
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(micros)
        .unwrap_or(f64::NAN);
    Ok(H2loadResult {
        succeeded,
        total_done: done,
        secs,
        mean_latency_us,
    })
}

/// h2load's "151us", "2.53ms", "1.2s" in µs.
fn micros(v: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|n| n * scale)
}

impl Unary {
    pub fn table(&self) -> String {
        let cell = |t: &str, l: &str| self.cells.get(t).and_then(|m| m.get(l)).copied();
        let mut out = format!(
            "h2load, unary grpc.health.v1.Health/Check over h2c, one h2load thread; medians of \
             {} rounds of {} s\n\n\
             | load | agentgate / bare tonic, CPU per call | agentgate / bare tonic, calls/s | \
             bare tonic CPU per call | agentgate CPU per call | bare tonic calls/s | agentgate \
             calls/s |\n|---|---:|---:|---:|---:|---:|---:|\n",
            self.rounds, self.secs
        );
        for level in LEVELS {
            let l = level_name(level);
            let (Some(b), Some(a)) = (cell("bare tonic", &l), cell("agentgate", &l)) else {
                continue;
            };
            out.push_str(&format!(
                "| {l} | {:.2} | {:.2} | {:.1} µs | {:.1} µs | {:.0} | {:.0} |\n",
                a.cpu_us / b.cpu_us,
                a.calls_per_s / b.calls_per_s,
                b.cpu_us,
                a.cpu_us,
                b.calls_per_s,
                a.calls_per_s
            ));
        }
        out
    }
}
