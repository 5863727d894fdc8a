//! `bench backends`: agents calling a gateway-side backend, as runners will ask a job router
//! for work.
//!
//! 1. Unary calls: h2load calling the backend straight, through nginx's `grpc_pass` (the
//!    reference proxy hop, when nginx is installed), and through the gateway's agent port with
//!    an agent token, interleaved in one run. CPU per call is read from /proc for every server
//!    process in the path (the backend; the hop and the backend), so each ratio is what a hop
//!    adds. This runs against two backends, each with its own gateway and nginx:
//!    `bench-backend` (hyper, `job_backend.rs`: the cheapest backend possible, so the worst
//!    case of every ratio) and a grpc-go server (`grpc_go_backend.rs`, when Go and grpc-go
//!    are installed: what a real job router is most likely written with).
//! 2. Long polls (against `bench-backend`): `--agents` agents connect (grpc), the gateway's
//!    RSS is read, then each agent opens one long poll over its own connection (`bench-load
//!    --long-poll`); the RSS again. The difference per poll is what an open long poll costs on
//!    top of an idle agent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::job_backend::{GET, SERVICE_PREFIX, WAIT};
use super::procs::Kid;
use super::unary::{h2load, level_name, require_h2load, LEVELS};
use super::{median, progress, reduce_samples, Bench};

/// The backend's name in the gateway's metrics (its prefix without the dot).
const BACKEND_NAME: &str = "bench.jobs.v1";
/// The gateway's count of calls the backend answered with OK.
const ANSWERED_OK: &str =
    "agentgate_backend_calls_total{backend=\"bench.jobs.v1\",outcome=\"answered\",code=\"OK\"}";
/// Seconds to let memory settle before each RSS reading (the gateway trims every 10 s).
const SETTLE: Duration = Duration::from_secs(12);

#[derive(Serialize, Clone, Copy, Default)]
struct Cell {
    calls_per_s: f64,
    /// CPU of every server process in the path, per call.
    cpu_us: f64,
    /// CPU of the proxy hop alone (the gateway, or nginx), per call (0 for the direct column).
    hop_cpu_us: f64,
    mean_latency_us: f64,
}

#[derive(Serialize)]
struct LongPolls {
    agents: usize,
    gateway_rss_per_idle_agent_kib: f64,
    gateway_rss_per_long_poll_kib: f64,
    backend_rss_per_long_poll_kib: f64,
    open_long_polls: f64,
    backend_connections: f64,
}

/// (column, level) -> median.
type UnaryCells = BTreeMap<String, BTreeMap<String, Cell>>;

#[derive(Serialize)]
pub struct BackendsReport {
    rounds: usize,
    secs: f64,
    /// Against the hyper backend.
    unary: UnaryCells,
    /// Against the grpc-go backend, or why it was not measured.
    unary_grpc_go: Result<UnaryCells, String>,
    long_polls: LongPolls,
}

const DIRECT: &str = "direct to the backend";
const NGINX: &str = "through nginx grpc_pass";
const THROUGH: &str = "through agentgate";

impl Bench {
    pub(super) async fn backends(&mut self) -> anyhow::Result<BackendsReport> {
        require_h2load("backends")?;
        let (backend, backend_addr) = self
            .spawn_server(&["bench-backend"], "job-backend.log")
            .await?;
        let gw = self.backend_gateway(backend_addr).await?;
        let unary = self
            .backend_unary("hyper", &gw, &backend, backend_addr, &self.dir)
            .await?;
        let long_polls = self.backend_long_polls(&gw, &backend).await?;
        drop((gw, backend));
        let unary_grpc_go = self.grpc_go_unary().await?;
        Ok(BackendsReport {
            rounds: self.args.rounds.max(1),
            secs: self.args.keepalive_secs,
            unary,
            unary_grpc_go,
            long_polls,
        })
    }

    /// The unary columns against the grpc-go backend, on a gateway of their own; `Err` says
    /// why they were left out.
    async fn grpc_go_unary(&self) -> anyhow::Result<Result<UnaryCells, String>> {
        if self.args.skip_grpc_go {
            return Ok(Err("left out (--skip-grpc-go)".into()));
        }
        if let Some(why) = super::grpc_go_backend::missing() {
            return Ok(Err(format!("not measured: {why}")));
        }
        progress("backends: building the grpc-go backend (go build, offline)");
        let dir = self.dir.join("grpc-go");
        let (backend, addr) = super::grpc_go_backend::start(&dir).await?;
        let gw = self.backend_gateway(addr).await?;
        Ok(Ok(self
            .backend_unary("grpc-go", &gw, &backend, addr, &dir)
            .await?))
    }

    /// A gateway routing the bench's service to `backend`.
    async fn backend_gateway(&self, backend: SocketAddr) -> anyhow::Result<super::Gw> {
        self.gateway_with(
            None,
            // Every bench agent shares one token, so the per-agent call limit (100 by
            // default) would cap the long polls: it is off here.
            &[
                "--set".into(),
                format!(
                    "backends=[{{services=[\"{SERVICE_PREFIX}\"], \
                     url=\"http://{backend}\", max_calls_per_agent=0}}]"
                ),
            ],
        )
        .await
    }

    /// The unary columns against one backend (`kind` names it in the progress lines); nginx
    /// keeps its files under `dir`.
    async fn backend_unary(
        &self,
        kind: &str,
        gw: &super::Gw,
        backend: &Kid,
        backend_addr: SocketAddr,
        dir: &std::path::Path,
    ) -> anyhow::Result<UnaryCells> {
        let nginx = super::nginx::Nginx::grpc_hop(dir, backend_addr).await?;
        let token = std::fs::read_to_string(self.token_file("runner")?)?;
        let body = self.dir.join("job-request.bin");
        // One gRPC frame: uncompressed, a 16-byte message.
        let mut frame = vec![0u8, 0, 0, 0, 16];
        frame.extend_from_slice(b"runner-0001-jobs");
        std::fs::write(&body, frame)?;
        let through = SocketAddr::from(([127, 0, 0, 1], gw.clear_port));
        // (column, where h2load calls, the hop's process)
        let mut columns: Vec<(&str, SocketAddr, Option<&Kid>)> = vec![(DIRECT, backend_addr, None)];
        if let Some(n) = &nginx {
            columns.push((NGINX, n.addr, Some(&n.kid)));
        }
        columns.push((THROUGH, through, Some(&gw.kid)));
        let rounds = self.args.rounds.max(1);
        let secs = self.args.keepalive_secs;
        let mut samples: BTreeMap<(String, String), Vec<Cell>> = BTreeMap::new();
        for round in 0..rounds {
            for level in LEVELS {
                for &(name, addr, hop) in &columns {
                    let via_gateway = name == THROUGH;
                    progress(&format!(
                        "backends: unary ({kind} backend): round {}/{rounds}: {}: {name}",
                        round + 1,
                        level_name(level)
                    ));
                    let answered0 = self.metric(gw, ANSWERED_OK).await;
                    let hop_cpu = || hop.map_or(Duration::ZERO, Kid::cpu);
                    let (h0, b0) = (hop_cpu(), backend.cpu());
                    let done = h2load(addr, GET, level, secs, &body, token.trim())?;
                    let (h1, b1) = (hop_cpu(), backend.cpu());
                    // h2load counts a gRPC error answered with HTTP 200 as a success; the
                    // gateway's own count says whether the backend really answered OK.
                    if via_gateway {
                        let answered = self.metric(gw, ANSWERED_OK).await - answered0;
                        anyhow::ensure!(
                            answered >= done.succeeded as f64 * 0.99,
                            "only {answered} of {} calls through the gateway were answered OK \
                             by the backend",
                            done.succeeded
                        );
                    }
                    let calls = done.total_done.max(1) as f64;
                    let hop_us = (h1 - h0).as_secs_f64() * 1e6 / calls;
                    let backend_us = (b1 - b0).as_secs_f64() * 1e6 / calls;
                    samples
                        .entry((name.to_string(), level_name(level)))
                        .or_default()
                        .push(Cell {
                            calls_per_s: done.succeeded as f64 / done.secs,
                            cpu_us: hop_us + backend_us,
                            hop_cpu_us: hop_us,
                            mean_latency_us: done.mean_latency_us,
                        });
                }
            }
        }
        Ok(reduce_samples(samples, |v| {
            let med = |f: fn(&Cell) -> f64| median(v.iter().map(f).collect());
            Cell {
                calls_per_s: med(|c| c.calls_per_s),
                cpu_us: med(|c| c.cpu_us),
                hop_cpu_us: med(|c| c.hop_cpu_us),
                mean_latency_us: med(|c| c.mean_latency_us),
            }
        }))
    }

    async fn backend_long_polls(&self, gw: &super::Gw, backend: &Kid) -> anyhow::Result<LongPolls> {
        let n = self.args.agents;
        let start = self.dir.join("start-long-polls");
        progress("backends: long polls: letting memory settle after the unary calls");
        tokio::time::sleep(SETTLE).await;
        let rss_before = gw.kid.rss_kib() as f64;
        let _load = self.load_with(
            gw,
            "grpc",
            "poller",
            n,
            &[
                "--long-poll".into(),
                WAIT.into(),
                "--long-poll-start-file".into(),
                start.display().to_string(),
            ],
        )?;
        self.wait_connected(gw, "grpc", n, "backends: long polls")
            .await?;
        progress("backends: long polls: agents connected; letting memory settle");
        tokio::time::sleep(SETTLE).await;
        let (rss_idle, backend_idle) = (gw.kid.rss_kib() as f64, backend.rss_kib() as f64);
        std::fs::write(&start, b"go")?;
        let series = format!("agentgate_backend_calls_open{{backend=\"{BACKEND_NAME}\"}}");
        let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 100);
        let open = loop {
            let open = self.metric(gw, &series).await;
            progress(&format!("backends: long polls: {open}/{n} open"));
            if open as usize >= n {
                break open;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {open}/{n} long polls opened in time"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        progress("backends: long polls: all open; letting memory settle");
        tokio::time::sleep(SETTLE).await;
        let (rss_polls, backend_polls) = (gw.kid.rss_kib() as f64, backend.rss_kib() as f64);
        let open_after = self.metric(gw, &series).await;
        anyhow::ensure!(
            open_after as usize >= n,
            "long polls ended while measuring: {open_after}/{n} still open"
        );
        let conns = std::fs::read_dir(format!("/proc/{}/fd", backend.pid()))
            .map(|d| d.count())
            .unwrap_or(0) as f64;
        Ok(LongPolls {
            agents: n,
            gateway_rss_per_idle_agent_kib: (rss_idle - rss_before) / n as f64,
            gateway_rss_per_long_poll_kib: (rss_polls - rss_idle) / n as f64,
            backend_rss_per_long_poll_kib: (backend_polls - backend_idle) / n as f64,
            open_long_polls: open,
            backend_connections: conns,
        })
    }
}

impl BackendsReport {
    pub fn table(&self) -> String {
        let mut out = self.unary_table("a hyper backend (the cheapest possible)", &self.unary);
        out.push('\n');
        match &self.unary_grpc_go {
            Ok(cells) => out.push_str(&self.unary_table("a grpc-go backend", cells)),
            Err(why) => out.push_str(&format!("The grpc-go backend: {why}.\n")),
        }
        let p = &self.long_polls;
        out.push_str(&format!(
            "\nLong polls: {} grpc agents, then one open long poll per agent over its own \
             connection ({} open; the backend holds {} file descriptors).\n\n\
             | gateway RSS per open long poll (target 8 KiB) | gateway RSS per idle agent | \
             backend RSS per open long poll |\n|---:|---:|---:|\n| {:.1} KiB | {:.1} KiB | \
             {:.1} KiB |\n",
            p.agents,
            p.open_long_polls,
            p.backend_connections,
            p.gateway_rss_per_long_poll_kib,
            p.gateway_rss_per_idle_agent_kib,
            p.backend_rss_per_long_poll_kib
        ));
        out
    }

    fn unary_table(&self, backend: &str, unary: &UnaryCells) -> String {
        let cell = |t: &str, l: &str| unary.get(t).and_then(|m| m.get(l)).copied();
        let with_nginx = unary.contains_key(NGINX);
        let mut out = format!(
            "Unary calls to {backend} (h2load, one thread, a 16-byte message echoed; \
             medians of {} rounds of {} s). CPU per call counts every server process in the \
             path: the backend alone direct, the hop and the backend through a hop (nginx: \
             one worker process, `grpc_pass` with kept upstream connections{}).\n\n\
             | load | agentgate / direct, CPU per call | agentgate / nginx, CPU per call | \
             agentgate / direct, mean latency | agentgate / direct, calls/s | direct CPU per \
             call | nginx CPU per call (nginx alone) | agentgate CPU per call (gateway alone) \
             | direct, nginx, agentgate mean latency | direct, nginx, agentgate calls/s |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.rounds,
            self.secs,
            if with_nginx {
                ""
            } else {
                "; not installed here"
            }
        );
        for level in LEVELS {
            let l = level_name(level);
            let (Some(d), Some(t)) = (cell(DIRECT, &l), cell(THROUGH, &l)) else {
                continue;
            };
            let n = cell(NGINX, &l);
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "| {l} | {:.2} | {} | {:.2} | {:.2} | {:.1} µs | {} | {:.1} µs ({:.1} µs) | \
                 {:.0}, {}, {:.0} µs | {:.0}, {}, {:.0} |\n",
                t.cpu_us / d.cpu_us,
                or_dash(n.map(|n| format!("{:.2}", t.cpu_us / n.cpu_us))),
                t.mean_latency_us / d.mean_latency_us,
                t.calls_per_s / d.calls_per_s,
                d.cpu_us,
                or_dash(n.map(|n| format!("{:.1} µs ({:.1} µs)", n.cpu_us, n.hop_cpu_us))),
                t.cpu_us,
                t.hop_cpu_us,
                d.mean_latency_us,
                or_dash(n.map(|n| format!("{:.0}", n.mean_latency_us))),
                t.mean_latency_us,
                d.calls_per_s,
                or_dash(n.map(|n| format!("{:.0}", n.calls_per_s))),
                t.calls_per_s
            ));
        }
        out
    }
}
