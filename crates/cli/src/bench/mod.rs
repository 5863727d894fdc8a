//! `agentgate bench SCENARIO`: what the WebSocket wrapping costs, and how far one box goes.
//!
//! Every scenario runs each transport side by side in the same run and reports ratios against
//! direct `grpc` first, absolute numbers second: absolute times on a shared 2-core machine are
//! noisy, ratios much less so. Gateways and load generators are separate processes (this
//! binary), so RSS and CPU are measured per process from /proc.

pub mod attack;
mod backends;
pub mod compression;
pub mod control;
mod grpc_go_backend;
mod hostile;
pub mod job_backend;
pub mod keepalive;
pub mod load;
mod nginx;
mod procs;
pub mod relay;
mod unary;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate_gateway::tokens::{create_token, TokenKind};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use procs::Kid;
use serde::Serialize;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Idle,
    Burst,
    Latency,
    Throughput,
    Storm,
    /// Latency and throughput of `grpc` next to the bare tonic tunnel (see `control.rs`).
    Control,
    /// gzip's CPU cost and size change per tunnel message kind (no network; see
    /// `compression.rs`). Not part of `all`.
    Compression,
    /// Agents serving requests while hostile connections attack the agent port, one attack
    /// at a time (see `hostile.rs`). Not part of `all`.
    Hostile,
    /// HTTP/1.1 keep-alive requests at 1 and 50 connections: direct, the bare TCP relay
    /// (`relay.rs`), the bare tonic tunnel and each transport (see `keepalive.rs`). Not part of
    /// `all`.
    Keepalive,
    /// The agent port's unary calls (h2load, Health/Check) next to a bare tonic server (see
    /// `unary.rs`). Not part of `all`.
    Unary,
    /// Agents calling a gateway-side backend: gateway RSS per open long poll, and unary calls
    /// through the gateway next to the same calls straight to the backend (see
    /// `backends.rs`). Not part of `all`.
    Backends,
    All,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    scenario: Scenario,
    /// Agents for idle, burst and storm.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Transports to compare (grpc is the baseline of the ratios).
    #[arg(long, value_delimiter = ',', default_value = "grpc,grpcs,ws,wss")]
    transports: Vec<String>,
    /// Small requests per transport and concurrency level (latency).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// MiB per download and per upload (throughput).
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Agents per load-generator process (the open-file cap is 20,000 per process).
    #[arg(long, default_value_t = 6000)]
    agents_per_process: usize,
    /// Extra gateway setting NAME=VALUE for every gateway the bench starts (repeatable), for
    /// experiments such as `memory_trim_interval="0s"`.
    #[arg(long = "gateway-set", value_name = "NAME=VALUE")]
    gateway_set: Vec<String>,
    /// Worker threads of each bench agent process (`bench-load --worker-threads`, as
    /// `agentgate agent --worker-threads`); default: one per core.
    #[arg(long, value_name = "N")]
    agent_worker_threads: Option<std::num::NonZeroUsize>,
    /// Seconds to wait after a burst before measuring what memory was kept.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Hostile connections per attack (hostile).
    #[arg(long, default_value_t = 10_000)]
    hostile: usize,
    /// Seconds each attack runs at most (hostile).
    #[arg(long, default_value_t = 15)]
    attack_secs: u64,
    /// Rounds of every column (keepalive; the table shows medians).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds each keepalive or unary load runs.
    #[arg(long, default_value_t = 3.0)]
    keepalive_secs: f64,
    /// Leave out the grpc-go backend of `backends` (built with `go build` from Debian's
    /// golang-google-grpc-dev, about a minute the first time; left out anyway when absent).
    #[arg(long)]
    skip_grpc_go: bool,
}

#[derive(Serialize, Clone)]
struct Sample {
    scenario: &'static str,
    metric: &'static str,
    unit: &'static str,
    transport: String,
    value: f64,
}

struct Bench {
    args: BenchArgs,
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    tokens: PathBuf,
    api_token: String,
    upstream: SocketAddr,
    client:
        Client<HttpConnector, http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>>,
    samples: Vec<Sample>,
}

struct Gw {
    kid: Kid,
    tls_port: u16,
    clear_port: u16,
    admin: SocketAddr,
    api: SocketAddr,
}

/// The processes of the control tunnel.
struct Control {
    gateway: Kid,
    agent: Kid,
    api: SocketAddr,
}

/// A free port below the ephemeral range (32768 and up on Linux), so that the thousands of
/// client sockets of the load generators cannot take it between this check and the bind.
fn free_port() -> u16 {
    use rand::Rng;
    loop {
        let port = rand::rng().random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits up to 10 s until something accepts TCP connections on `addr`.
async fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The median of some samples (the upper one of an even count); 0 for none.
/// Samples by (column, load level), each list reduced to one cell, nested by column then
/// level: the tables of `unary` and `backends`.
fn reduce_samples<C>(
    samples: BTreeMap<(String, String), Vec<C>>,
    reduce: impl Fn(&[C]) -> C,
) -> BTreeMap<String, BTreeMap<String, C>> {
    let mut cells: BTreeMap<String, BTreeMap<String, C>> = BTreeMap::new();
    for ((column, level), v) in samples {
        cells.entry(column).or_default().insert(level, reduce(&v));
    }
    cells
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn progress(msg: &str) {
    eprint!("\r\x1b[2K[bench] {msg}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

impl Bench {
    fn push(
        &mut self,
        scenario: &'static str,
        metric: &'static str,
        unit: &'static str,
        transport: &str,
        value: f64,
    ) {
        self.samples.push(Sample {
            scenario,
            metric,
            unit,
            transport: transport.to_string(),
            value,
        });
    }

    fn token_file(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{name}.token"));
        if !path.exists() {
            let (t, _) = create_token(&self.tokens, TokenKind::Agent, name, &[])?;
            std::fs::write(&path, t)?;
        }
        Ok(path)
    }

    async fn gateway(
        &self,
        ports: Option<(u16, u16, SocketAddr, SocketAddr)>,
    ) -> anyhow::Result<Gw> {
        self.gateway_with(ports, &[]).await
    }

    /// Starts a helper server (this binary with `args`, then `--listen` and a fresh 127.0.0.1
    /// port) and waits until it accepts connections.
    async fn spawn_server(&self, args: &[&str], log: &str) -> anyhow::Result<(Kid, SocketAddr)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        argv.extend(["--listen".to_string(), addr.to_string()]);
        let kid = Kid::spawn(&argv, &self.dir.join(log))?;
        wait_listening(addr, args.join(" ").as_str()).await?;
        Ok((kid, addr))
    }

    /// A gateway with extra command-line arguments.
    async fn gateway_with(
        &self,
        ports: Option<(u16, u16, SocketAddr, SocketAddr)>,
        extra: &[String],
    ) -> anyhow::Result<Gw> {
        let (tls_port, clear_port, admin, api) = ports.unwrap_or_else(|| {
            let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            (free_port(), free_port(), a(free_port()), a(free_port()))
        });
        let args: Vec<String> = [
            "server",
            "--listen",
            &format!("127.0.0.1:{tls_port}"),
            "--cleartext-listen",
            &format!("127.0.0.1:{clear_port}"),
            "--admin-listen",
            &admin.to_string(),
            "--api-listen",
            &api.to_string(),
            "--tls-cert",
            self.cert.to_str().unwrap(),
            "--tls-key",
            self.key.to_str().unwrap(),
            "--tokens",
            self.tokens.to_str().unwrap(),
            "--set",
            "max_connections=19000",
            "--set",
            "shutdown_grace=\"2s\"",
            // Every bench agent shares one token; the per-token connect limit would pace them.
            "--set",
            "connect_rate_limit_per_minute=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            self.args
                .gateway_set
                .iter()
                .flat_map(|kv| ["--set".to_string(), kv.clone()]),
        )
        .chain(extra.iter().cloned())
        .collect();
        let kid = Kid::spawn(&args, &self.dir.join(format!("gateway-{tls_port}.log")))?;
        let gw = Gw {
            kid,
            tls_port,
            clear_port,
            admin,
            api,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.get_status(&format!("http://{admin}/healthz")).await != Some(200) {
            anyhow::ensure!(Instant::now() < deadline, "gateway did not become healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(gw)
    }

    /// Starts the bare tonic tunnel of `control.rs`: its gateway, then its agent.
    async fn control(&self) -> anyhow::Result<Control> {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let (agent_listen, api) = (a(free_port()), a(free_port()));
        let gateway = Kid::spawn(
            &[
                "bench-control".into(),
                "gateway".into(),
                "--agent-listen".into(),
                agent_listen.to_string(),
                "--api-listen".into(),
                api.to_string(),
            ],
            &self.dir.join("control-gateway.log"),
        )?;
        wait_listening(agent_listen, "control gateway").await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let agent = Kid::spawn(
            &[
                "bench-control".into(),
                "agent".into(),
                "--server".into(),
                agent_listen.to_string(),
                "--upstream".into(),
                self.upstream.to_string(),
            ],
            &self.dir.join("control-agent.log"),
        )?;
        let control = Control {
            gateway,
            agent,
            api,
        };
        while self.get_status(&format!("http://{api}/")).await != Some(200) {
            anyhow::ensure!(Instant::now() < deadline, "control tunnel did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(control)
    }

    fn url(&self, gw: &Gw, transport: &str) -> String {
        match transport {
            "grpc" => format!("grpc://127.0.0.1:{}", gw.clear_port),
            "ws" => format!("ws://127.0.0.1:{}/", gw.clear_port),
            "grpcs" => format!("grpcs://localhost:{}", gw.tls_port),
            _ => format!("wss://localhost:{}/", gw.tls_port),
        }
    }

    /// Starts load generators for `count` agents named `name` over `transport`.
    fn load(&self, gw: &Gw, transport: &str, name: &str, count: usize) -> anyhow::Result<Vec<Kid>> {
        self.load_with(gw, transport, name, count, &[])
    }

    /// Load generators with extra `bench-load` arguments.
    fn load_with(
        &self,
        gw: &Gw,
        transport: &str,
        name: &str,
        count: usize,
        extra: &[String],
    ) -> anyhow::Result<Vec<Kid>> {
        let token = self.token_file(name)?;
        let mut kids = vec![];
        let per = self.args.agents_per_process.max(1);
        let mut left = count;
        let mut i = 0;
        while left > 0 {
            let n = left.min(per);
            let mut args: Vec<String> = vec![
                "bench-load".into(),
                "--server".into(),
                self.url(gw, transport),
                "--token-file".into(),
                token.display().to_string(),
                "--count".into(),
                n.to_string(),
                "--ca-cert".into(),
                self.cert.display().to_string(),
                "--local-ip".into(),
                format!("127.0.{}.{}", 1 + i / 250, 2 + i % 250),
                "--upstream".into(),
                format!("http://{}", self.upstream),
            ];
            if let Some(n) = self.args.agent_worker_threads {
                args.extend(["--worker-threads".into(), n.to_string()]);
            }
            args.extend(extra.iter().cloned());
            let log = self.dir.join(format!("load-{name}-{i}.log"));
            kids.push(Kid::spawn(&args, &log)?);
            left -= n;
            i += 1;
        }
        Ok(kids)
    }

    async fn get_status(&self, url: &str) -> Option<u16> {
        let req = hyper::Request::get(url).body(empty()).ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req))
            .await
            .ok()?
            .ok()?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        Some(status)
    }

    async fn metrics(&self, gw: &Gw) -> String {
        let Ok(req) = hyper::Request::get(format!("http://{}/metrics", gw.admin)).body(empty())
        else {
            return String::new();
        };
        match self.client.request(req).await {
            Ok(r) => r
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn metric(&self, gw: &Gw, series: &str) -> f64 {
        let text = self.metrics(gw).await;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `count` agents over `transport` are registered with their tunnels parked.
    async fn wait_connected(
        &self,
        gw: &Gw,
        transport: &str,
        count: usize,
        what: &str,
    ) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(60 + count as u64 / 50);
        let series = format!("agentgate_agents_connected{{transport=\"{transport}\"}}");
        loop {
            let n = self.metric(gw, &series).await as usize;
            let parked = self.metric(gw, "agentgate_tunnels_parked").await as usize;
            progress(&format!(
                "{what}: {transport}: {n}/{count} agents, {parked} tunnels parked"
            ));
            if n >= count && parked >= 2 * count {
                return Ok(t0.elapsed());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {n}/{count} agents connected in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET through the API (or directly), returning latency and body bytes.
    async fn fetch(&self, url: &str, auth: bool) -> anyhow::Result<(Duration, u64)> {
        self.fetcher().get(url, auth).await
    }

    /// What `fetch` needs, to hand to tasks of its own.
    fn fetcher(&self) -> Fetcher {
        Fetcher {
            client: self.client.clone(),
            api_token: self.api_token.clone(),
        }
    }
}

/// The bench's HTTP client with the API token.
#[derive(Clone)]
struct Fetcher {
    client:
        Client<HttpConnector, http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>>,
    api_token: String,
}

impl Fetcher {
    /// GET through the API with the token; the body's length.
    async fn fetch(&self, url: &str) -> anyhow::Result<u64> {
        Ok(self.get(url, true).await?.1)
    }

    async fn get(&self, url: &str, auth: bool) -> anyhow::Result<(Duration, u64)> {
        let t = Instant::now();
        let mut req = hyper::Request::get(url);
        if auth {
            req = req.header("authorization", format!("Bearer {}", self.api_token));
        }
        let resp = self.client.request(req.body(empty())?).await?;
        anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            n += f?.data_ref().map_or(0, |d| d.len() as u64);
        }
        Ok((t.elapsed(), n))
    }
}

impl Bench {
    async fn idle_burst(&mut self, transport: &str, burst: bool) -> anyhow::Result<()> {
        let n = self.args.agents;
        let gw = self.gateway(None).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss0 = gw.kid.rss_kib() as f64;
        let _load = self.load(&gw, transport, "bench", n)?;
        let took = self.wait_connected(&gw, transport, n, "idle").await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss1 = gw.kid.rss_kib() as f64;
        self.push(
            "idle",
            "gateway RSS per agent",
            "KiB",
            transport,
            (rss1 - rss0) / n as f64,
        );
        self.push(
            "idle",
            "connect rate",
            "agents/s",
            transport,
            n as f64 / took.as_secs_f64(),
        );
        if burst {
            let sampler = procs::PeakRss::start(gw.kid.pid(), rss1 as u64);
            let url = format!("http://{}/agents/bench/proxy/bytes/{}", gw.api, 1 << 20);
            let done = AtomicU64::new(0);
            let sem = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = vec![];
            let this: &Bench = self;
            for _ in 0..n {
                let url = url.clone();
                let sem = sem.clone();
                tasks.push(async move {
                    let _permit = sem.acquire_owned().await?;
                    this.fetch(&url, true).await
                });
            }
            let results = futures_util::future::join_all(tasks.into_iter().map(|t| {
                let done = &done;
                async move {
                    let r = t.await;
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d.is_multiple_of(100) {
                        progress(&format!("burst: {transport}: {d}/{n} responses of 1 MiB"));
                    }
                    r
                }
            }))
            .await;
            let failed = results
                .iter()
                .filter(|r| !matches!(r, Ok((_, b)) if *b == 1 << 20))
                .count();
            let peak = sampler.peak_kib() as f64;
            drop(sampler);
            progress(&format!(
                "burst: {transport}: waiting 10 s for memory to settle"
            ));
            tokio::time::sleep(Duration::from_secs(10)).await;
            let rss2 = gw.kid.rss_kib() as f64;
            self.push(
                "burst",
                "peak RSS per agent",
                "KiB",
                transport,
                (peak - rss0) / n as f64,
            );
            self.push(
                "burst",
                "RSS per agent 10 s after",
                "KiB",
                transport,
                (rss2 - rss0) / n as f64,
            );
            self.push(
                "burst",
                "after / idle",
                "x",
                transport,
                (rss2 - rss0) / (rss1 - rss0).max(1.0),
            );
            self.push(
                "burst",
                "failed requests",
                "count",
                transport,
                failed as f64,
            );
        }
        Ok(())
    }

    async fn storm(&mut self, transport: &str) -> anyhow::Result<()> {
        let n = self.args.agents;
        let mut gw = self.gateway(None).await?;
        let _load = self.load(&gw, transport, "bench", n)?;
        self.wait_connected(&gw, transport, n, "storm setup")
            .await?;
        let ports = (gw.tls_port, gw.clear_port, gw.admin, gw.api);
        gw.kid.terminate(Duration::from_secs(5));
        let gw = self.gateway(Some(ports)).await?;
        let t0 = Instant::now();
        let series = format!("agentgate_agents_connected{{transport=\"{transport}\"}}");
        let mut last = (t0, 0.0f64);
        let mut peak_rate = 0.0f64;
        loop {
            let c = self.metric(&gw, &series).await;
            let now = Instant::now();
            if now.duration_since(last.0) >= Duration::from_secs(1) {
                peak_rate = peak_rate.max((c - last.1) / now.duration_since(last.0).as_secs_f64());
                last = (now, c);
            }
            progress(&format!("storm: {transport}: {c}/{n} agents back"));
            if c as usize >= n {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(120 + n as u64 / 50),
                "storm: only {c}/{n} back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let all_back = t0.elapsed().as_secs_f64();
        // A storm shorter than the one-second window still has a rate.
        peak_rate = peak_rate.max(n as f64 / all_back.max(0.001));
        self.push("storm", "time until all back", "s", transport, all_back);
        self.push(
            "storm",
            "peak reconnect rate",
            "agents/s",
            transport,
            peak_rate,
        );
        let auth_errors = self
            .metric(
                &gw,
                "agentgate_connections_rejected_total{reason=\"unauthenticated\"}",
            )
            .await;
        self.push("storm", "auth errors", "count", transport, auth_errors);
        Ok(())
    }

    /// Latency and throughput share one gateway with one agent per transport.
    async fn latency_throughput(&mut self, latency: bool, throughput: bool) -> anyhow::Result<()> {
        let gw = self.gateway(None).await?;
        let transports = self.args.transports.clone();
        let mut loads = BTreeMap::new();
        for t in &transports {
            let mut kids = self.load(&gw, t, &format!("one-{t}"), 1)?;
            self.wait_connected(&gw, t, 1, "setup").await?;
            loads.insert(t.clone(), kids.remove(0));
        }
        let control = self.control().await?;
        let mut names: Vec<String> = vec!["direct".into(), "control".into()];
        names.extend(transports.iter().cloned());
        let upstream = self.upstream;
        let base = |t: &str| -> String {
            match t {
                "direct" => format!("http://{upstream}"),
                "control" => format!("http://{}", control.api),
                _ => format!("http://{}/agents/one-{t}/proxy", gw.api),
            }
        };
        // CPU of the two tunnel ends (gateway and agent process) of a column.
        let ends_cpu = |t: &str| -> (Duration, Duration) {
            match t {
                "direct" => (Duration::ZERO, Duration::ZERO),
                "control" => (control.gateway.cpu(), control.agent.cpu()),
                _ => (
                    gw.kid.cpu(),
                    loads.get(t).map_or(Duration::ZERO, |k| k.cpu()),
                ),
            }
        };
        let auth = |t: &str| t != "direct" && t != "control";
        if latency {
            for conc in [1usize, 64] {
                let rounds = 4;
                let per_round = (self.args.requests / rounds).max(conc);
                let mut lat: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
                let mut cpu: BTreeMap<String, Duration> = BTreeMap::new();
                // Warm-up: connections, pools, tunnels.
                for t in &names {
                    for _ in 0..20 {
                        self.fetch(&format!("{}/", base(t)), auth(t)).await?;
                    }
                }
                for r in 0..rounds {
                    for t in &names {
                        progress(&format!(
                            "latency: concurrency {conc}: round {}/{rounds}: {t}",
                            r + 1
                        ));
                        let (g0, a0) = ends_cpu(t);
                        let url = format!("{}/", base(t));
                        let this: &Bench = self;
                        let results = futures_util::future::join_all((0..conc).map(|_| {
                            let url = url.clone();
                            let auth = auth(t);
                            async move {
                                let mut v = Vec::with_capacity(per_round / conc);
                                for _ in 0..per_round / conc {
                                    v.push(this.fetch(&url, auth).await.map(|x| x.0));
                                }
                                v
                            }
                        }))
                        .await;
                        let (g1, a1) = ends_cpu(t);
                        *cpu.entry(t.clone()).or_default() += (g1 - g0) + (a1 - a0);
                        let v = lat.entry(t.clone()).or_default();
                        for r in results.into_iter().flatten() {
                            v.push(r?);
                        }
                    }
                }
                let (m50, m99, mcpu): (&'static str, &'static str, &'static str) = if conc == 1 {
                    (
                        "p50 latency, concurrency 1",
                        "p99 latency, concurrency 1",
                        "CPU per request, concurrency 1",
                    )
                } else {
                    (
                        "p50 latency, concurrency 64",
                        "p99 latency, concurrency 64",
                        "CPU per request, concurrency 64",
                    )
                };
                for t in &names {
                    let mut v = lat.remove(t).unwrap_or_default();
                    v.sort();
                    let n = v.len().max(1) as f64;
                    self.push(
                        "latency",
                        m50,
                        "µs",
                        t,
                        percentile(&v, 0.5).as_secs_f64() * 1e6,
                    );
                    self.push(
                        "latency",
                        m99,
                        "µs",
                        t,
                        percentile(&v, 0.99).as_secs_f64() * 1e6,
                    );
                    if t != "direct" {
                        self.push("latency", mcpu, "µs", t, cpu[t].as_secs_f64() * 1e6 / n);
                    }
                }
            }
        }
        if throughput {
            let bytes = self.args.mib << 20;
            for t in &names {
                progress(&format!("throughput: {t}: download {} MiB", self.args.mib));
                let (gw_cpu0, agent_cpu0) = ends_cpu(t);
                let (took, n) = self
                    .fetch(&format!("{}/bytes/{bytes}", base(t)), auth(t))
                    .await?;
                anyhow::ensure!(n == bytes, "{t}: download truncated at {n}");
                self.push(
                    "throughput",
                    "download",
                    "MiB/s",
                    t,
                    self.args.mib as f64 / took.as_secs_f64(),
                );
                progress(&format!("throughput: {t}: upload {} MiB", self.args.mib));
                let took_up = self
                    .upload(&format!("{}/sink", base(t)), auth(t), bytes)
                    .await?;
                self.push(
                    "throughput",
                    "upload",
                    "MiB/s",
                    t,
                    self.args.mib as f64 / took_up.as_secs_f64(),
                );
                if t != "direct" {
                    let gib = 2.0 * self.args.mib as f64 / 1024.0;
                    let (gw_cpu1, agent_cpu1) = ends_cpu(t);
                    self.push(
                        "throughput",
                        "gateway CPU per GiB",
                        "s",
                        t,
                        (gw_cpu1 - gw_cpu0).as_secs_f64() / gib,
                    );
                    self.push(
                        "throughput",
                        "agent CPU per GiB",
                        "s",
                        t,
                        (agent_cpu1 - agent_cpu0).as_secs_f64() / gib,
                    );
                }
            }
        }
        Ok(())
    }

    async fn upload(&self, url: &str, auth: bool, bytes: u64) -> anyhow::Result<Duration> {
        let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
        let frames = futures_util::stream::unfold(bytes, move |left| {
            let chunk = chunk.clone();
            async move {
                (left > 0).then(|| {
                    let take = left.min(chunk.len() as u64) as usize;
                    (
                        Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.slice(..take))),
                        left - take as u64,
                    )
                })
            }
        });
        let mut req = hyper::Request::post(url);
        if auth {
            req = req.header("authorization", format!("Bearer {}", self.api_token));
        }
        let t = Instant::now();
        let resp = self
            .client
            .request(req.body(StreamBody::new(frames).boxed_unsync())?)
            .await?;
        anyhow::ensure!(resp.status().is_success(), "POST {url}: {}", resp.status());
        let body = resp.into_body().collect().await?.to_bytes();
        let got: u64 = String::from_utf8_lossy(&body).trim().parse().unwrap_or(0);
        anyhow::ensure!(
            got == bytes,
            "upload: upstream counted {got} of {bytes} bytes"
        );
        Ok(t.elapsed())
    }

    fn report(&self) -> String {
        let transports: Vec<String> = {
            let mut v = vec!["direct".to_string(), "control".to_string()];
            v.extend(self.args.transports.iter().cloned());
            v
        };
        let shown: Vec<&String> = transports
            .iter()
            .filter(|t| self.samples.iter().any(|s| &s.transport == *t))
            .collect();
        let mut rows: Vec<(&str, &str, &str)> = vec![];
        for s in &self.samples {
            if !rows.contains(&(s.scenario, s.metric, s.unit)) {
                rows.push((s.scenario, s.metric, s.unit));
            }
        }
        let value = |row: &(&str, &str, &str), t: &str| {
            self.samples
                .iter()
                .find(|s| (s.scenario, s.metric, s.unit) == *row && s.transport == t)
                .map(|s| s.value)
        };
        let ratio_cols: Vec<&&String> = shown.iter().filter(|t| t.as_str() != "grpc").collect();
        let mut out = String::new();
        out.push_str("| scenario | metric |");
        for t in &ratio_cols {
            out.push_str(&format!(" {t}/grpc |"));
        }
        for t in &shown {
            out.push_str(&format!(" {t} |"));
        }
        out.push_str(" unit |\n|---|---|");
        for _ in 0..ratio_cols.len() + shown.len() {
            out.push_str("---:|");
        }
        out.push_str("---|\n");
        for row in &rows {
            out.push_str(&format!("| {} | {} |", row.0, row.1));
            let base = value(row, "grpc");
            for t in &ratio_cols {
                match (value(row, t), base) {
                    (Some(v), Some(b)) if b != 0.0 => out.push_str(&format!(" {:.2} |", v / b)),
                    _ => out.push_str(" |"),
                }
            }
            for t in &shown {
                match value(row, t) {
                    Some(v) if v.abs() >= 100.0 => out.push_str(&format!(" {v:.0} |")),
                    Some(v) => out.push_str(&format!(" {v:.2} |")),
                    None => out.push_str(" |"),
                }
            }
            out.push_str(&format!(" {} |\n", row.2));
        }
        out
    }
}

fn empty() -> http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error> {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.scenario == Scenario::Compression {
        let rows = compression::measure(std::time::Duration::from_millis(300));
        println!("{}", compression::table(&rows));
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_vec_pretty(&rows)?)?;
        }
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("agentgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    let tokens = dir.join("tokens.json");
    let (api_token, _) = create_token(&tokens, TokenKind::Api, "bench-caller", &[])?;
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = up.local_addr()?;
    tokio::spawn(crate::test_upstream::serve(up));
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build(http);
    let mut b = Bench {
        args,
        dir: dir.clone(),
        cert,
        key,
        tokens,
        api_token,
        upstream,
        client,
        samples: vec![],
    };
    let s = b.args.scenario;
    // The scenarios with a table of their own: print it, save the JSON, done.
    let own = match s {
        Scenario::Hostile => {
            let rows = b.hostile().await?;
            let table = hostile::table(&rows, b.args.agents, b.args.attack_secs);
            Some((table, serde_json::to_vec_pretty(&rows)?))
        }
        Scenario::Unary => {
            let u = b.unary().await?;
            Some((u.table(), serde_json::to_vec_pretty(&u)?))
        }
        Scenario::Backends => {
            let r = b.backends().await?;
            Some((r.table(), serde_json::to_vec_pretty(&r)?))
        }
        Scenario::Keepalive => {
            let k = b.keepalive().await?;
            Some((k.table(), serde_json::to_vec_pretty(&k)?))
        }
        _ => None,
    };
    if let Some((table, json)) = own {
        eprintln!();
        println!("{table}");
        if let Some(path) = &b.args.json {
            std::fs::write(path, json)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    let transports = b.args.transports.clone();
    let started = Instant::now();
    if matches!(s, Scenario::Idle | Scenario::Burst | Scenario::All) {
        for t in &transports {
            b.idle_burst(t, s != Scenario::Idle)
                .await
                .with_context(|| format!("idle/burst over {t}"))?;
        }
    }
    if s == Scenario::Control {
        b.args.transports = vec!["grpc".into()];
    }
    if matches!(
        s,
        Scenario::Latency | Scenario::Throughput | Scenario::Control | Scenario::All
    ) {
        b.latency_throughput(s != Scenario::Throughput, s != Scenario::Latency)
            .await?;
    }
    if matches!(s, Scenario::Storm | Scenario::All) {
        for t in &transports {
            b.storm(t)
                .await
                .with_context(|| format!("storm over {t}"))?;
        }
    }
    eprintln!(
        "\r\x1b[2K[bench] done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!("{}", b.report());
    if let Some(path) = &b.args.json {
        let doc = serde_json::json!({
            "agents": b.args.agents,
            "requests": b.args.requests,
            "mib": b.args.mib,
            "samples": b.samples,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
