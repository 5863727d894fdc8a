//! `bench keepalive`: HTTP/1.1 keep-alive requests through the tunnel API, as a new user tries
//! it with `wrk -t1`, next to the same requests sent directly, through a bare reverse TCP relay
//! (`relay.rs`, the L4 reference) and through the bare tonic tunnel (`control.rs`).
//!
//! The load generator is its own process (`bench-http1`, one thread like `wrk -t1`), so the CPU
//! of the tunnel processes is measured from /proc without the client in it. Columns run
//! interleaved, one after another in each round, and the table shows medians of the rounds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use super::nginx::Nginx;
use super::procs::Kid;
use super::{free_port, median, progress, wait_listening, Bench};

/// Connection counts the scenario measures (one request after another, and many at once).
const CONNECTIONS: [usize; 2] = [1, 50];

#[derive(clap::Args)]
pub struct Http1LoadArgs {
    /// `http://HOST:PORT/PATH` to GET over and over.
    #[arg(long)]
    url: url::Url,
    #[arg(long)]
    connections: usize,
    /// Seconds measured, after half a second of warm-up.
    #[arg(long)]
    secs: f64,
    /// Sent as `authorization: Bearer ...` when given.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where to write the result (JSON).
    #[arg(long)]
    out: PathBuf,
}

/// What one load run measured.
#[derive(Serialize, Deserialize, Default)]
struct LoadResult {
    /// Every request, warm-up included (the denominator of CPU per request).
    total: u64,
    /// Requests that finished inside the measured window.
    measured: u64,
    window_secs: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

/// `agentgate bench-http1`: keep-alive GETs on N connections from one thread, like `wrk -t1`.
pub fn run_load(a: Http1LoadArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(load(&a))?;
    std::fs::write(&a.out, serde_json::to_vec(&result)?)?;
    Ok(())
}

async fn load(a: &Http1LoadArgs) -> anyhow::Result<LoadResult> {
    let host = a.url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = a.url.port_or_known_default().unwrap_or(80);
    let path = match a.url.query() {
        Some(q) => format!("{}?{q}", a.url.path()),
        None => a.url.path().to_string(),
    };
    let auth = match &a.token_file {
        Some(f) => Some(format!("Bearer {}", std::fs::read_to_string(f)?.trim())),
        None => None,
    };
    let warm_until = Instant::now() + Duration::from_millis(500);
    let end = warm_until + Duration::from_secs_f64(a.secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.connections {
        let (host, path, auth) = (host.clone(), path.clone(), auth.clone());
        tasks.spawn(async move {
            let (mut total, mut errors, mut lat) = (0u64, 0u64, Vec::<u32>::new());
            // Servers close keep-alive connections now and then (nginx after
            // `keepalive_requests`); like wrk, the generator dials again and counts an error
            // only for a request that failed.
            'connection: while Instant::now() < end {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                loop {
                    let started = Instant::now();
                    if started >= end {
                        break 'connection;
                    }
                    if send.ready().await.is_err() {
                        continue 'connection;
                    }
                    let mut req = hyper::Request::get(path.as_str()).header("host", host.as_str());
                    if let Some(a) = &auth {
                        req = req.header("authorization", a.as_str());
                    }
                    let ok = match send.send_request(req.body(Empty::<Bytes>::new())?).await {
                        Ok(resp) => {
                            let status = resp.status();
                            match resp.into_body().collect().await {
                                Ok(_) if status.is_success() => true,
                                Ok(_) => {
                                    eprintln!("request {total}: {status}");
                                    false
                                }
                                Err(e) => {
                                    eprintln!("request {total}: body failed: {e}");
                                    false
                                }
                            }
                        }
                        Err(e) if e.is_canceled() => continue 'connection,
                        Err(e) => {
                            eprintln!("request {total} failed: {e}");
                            false
                        }
                    };
                    total += 1;
                    if !ok {
                        errors += 1;
                        anyhow::ensure!(errors < 100, "more than 100 requests failed");
                        continue 'connection;
                    }
                    let done = Instant::now();
                    if started >= warm_until && done <= end {
                        lat.push(done.duration_since(started).as_micros() as u32);
                    }
                }
            }
            anyhow::Ok((total, errors, lat))
        });
    }
    let mut r = LoadResult {
        window_secs: a.secs,
        ..Default::default()
    };
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (total, errors, lat) = done??;
        r.total += total;
        r.errors += errors;
        all.extend(lat);
    }
    all.sort_unstable();
    r.measured = all.len() as u64;
    let pick = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |v| *v as f64)
    };
    r.p50_us = pick(0.5);
    r.p99_us = pick(0.99);
    Ok(r)
}

/// One measured cell: a column at one connection count in one round.
#[derive(Serialize, Clone, Copy, Default)]
pub struct Cell {
    req_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU of the tunnel's processes per request (0 for direct).
    cpu_us: f64,
}

/// The medians per column and connection count.
#[derive(Serialize)]
pub struct Keepalive {
    upstream: &'static str,
    columns: Vec<String>,
    rounds: usize,
    secs: f64,
    /// (column, connections) -> median cell.
    cells: BTreeMap<String, BTreeMap<usize, Cell>>,
}

/// The tunnel's processes of one column, whose CPU counts.
type Ends<'a> = Vec<&'a Kid>;

impl Bench {
    pub(super) async fn keepalive(&mut self) -> anyhow::Result<Keepalive> {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let _nginx = match Nginx::serve_file(&self.dir).await? {
            Some(n) => {
                self.upstream = n.addr;
                Some(n)
            }
            None => None,
        };
        let upstream_name = if _nginx.is_some() {
            "nginx, a 64-byte file"
        } else {
            "the built-in test upstream (no nginx found)"
        };
        let (relay_clients, relay_agents) = (a(free_port()), a(free_port()));
        let relay_server = Kid::spawn(
            &[
                "bench-relay".into(),
                "server".into(),
                "--client-listen".into(),
                relay_clients.to_string(),
                "--agent-listen".into(),
                relay_agents.to_string(),
            ],
            &self.dir.join("relay-server.log"),
        )?;
        wait_listening(relay_agents, "relay server").await?;
        let relay_agent = Kid::spawn(
            &[
                "bench-relay".into(),
                "agent".into(),
                "--server".into(),
                relay_agents.to_string(),
                "--upstream".into(),
                self.upstream.to_string(),
            ],
            &self.dir.join("relay-agent.log"),
        )?;
        let control = self.control().await?;
        let gw = self.gateway(None).await?;
        let transports = self.args.transports.clone();
        let mut loads = BTreeMap::new();
        for t in &transports {
            let mut kids = self.load(&gw, t, &format!("ka-{t}"), 1)?;
            self.wait_connected(&gw, t, 1, "setup").await?;
            loads.insert(t.clone(), kids.remove(0));
        }
        let token = self.dir.join("api.token");
        std::fs::write(&token, &self.api_token)?;
        let mut columns: Vec<String> = vec!["direct".into(), "relay".into(), "control".into()];
        columns.extend(transports.iter().cloned());
        let upstream = self.upstream;
        let url = |t: &str| -> String {
            match t {
                "direct" => format!("http://{upstream}/"),
                "relay" => format!("http://{relay_clients}/"),
                "control" => format!("http://{}/", control.api),
                _ => format!("http://{}/agents/ka-{t}/proxy/", gw.api),
            }
        };
        let ends = |t: &str| -> Ends {
            match t {
                "direct" => vec![],
                "relay" => vec![&relay_server, &relay_agent],
                "control" => vec![&control.gateway, &control.agent],
                _ => vec![&gw.kid, &loads[t]],
            }
        };
        let rounds = self.args.rounds.max(1);
        let secs = self.args.keepalive_secs;
        let mut samples: BTreeMap<(String, usize), Vec<Cell>> = BTreeMap::new();
        for round in 0..rounds {
            for conns in CONNECTIONS {
                for t in &columns {
                    progress(&format!(
                        "keepalive: round {}/{rounds}: {conns} connections: {t}",
                        round + 1
                    ));
                    let cpu0: Duration = ends(t).iter().map(|k| k.cpu()).sum();
                    let r = self
                        .http1_load(&url(t), conns, secs, (t != "direct").then_some(&token))
                        .await?;
                    let cpu1: Duration = ends(t).iter().map(|k| k.cpu()).sum();
                    anyhow::ensure!(
                        r.errors == 0 && r.measured > 0,
                        "keepalive {t} at {conns} connections: {} of {} requests failed",
                        r.errors,
                        r.total
                    );
                    samples.entry((t.clone(), conns)).or_default().push(Cell {
                        req_per_s: r.measured as f64 / r.window_secs,
                        p50_us: r.p50_us,
                        p99_us: r.p99_us,
                        cpu_us: (cpu1 - cpu0).as_secs_f64() * 1e6 / r.total as f64,
                    });
                }
            }
        }
        let mut cells: BTreeMap<String, BTreeMap<usize, Cell>> = BTreeMap::new();
        for ((t, conns), v) in samples {
            let med = |f: fn(&Cell) -> f64| median(v.iter().map(f).collect());
            cells.entry(t).or_default().insert(
                conns,
                Cell {
                    req_per_s: med(|c| c.req_per_s),
                    p50_us: med(|c| c.p50_us),
                    p99_us: med(|c| c.p99_us),
                    cpu_us: med(|c| c.cpu_us),
                },
            );
        }
        Ok(Keepalive {
            upstream: upstream_name,
            columns,
            rounds,
            secs,
            cells,
        })
    }

    async fn http1_load(
        &self,
        url: &str,
        connections: usize,
        secs: f64,
        token: Option<&PathBuf>,
    ) -> anyhow::Result<LoadResult> {
        let out = self.dir.join("http1-load.json");
        let _ = std::fs::remove_file(&out);
        let mut args = vec![
            "bench-http1".to_string(),
            "--url".into(),
            url.into(),
            "--connections".into(),
            connections.to_string(),
            "--secs".into(),
            secs.to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if let Some(t) = token {
            args.extend(["--token-file".into(), t.display().to_string()]);
        }
        let mut kid = Kid::spawn(&args, &self.dir.join("http1-load.log"))?;
        let status = tokio::task::spawn_blocking(move || kid.child.wait()).await??;
        let log = std::fs::read_to_string(self.dir.join("http1-load.log")).unwrap_or_default();
        anyhow::ensure!(status.success(), "load generator failed: {}", log.trim());
        Ok(serde_json::from_slice(&std::fs::read(&out)?)?)
    }
}

impl Keepalive {
    /// Ratios first (req/s to direct, CPU to the relay), then the numbers they come from.
    pub fn table(&self) -> String {
        let cell = |t: &str, c: usize| self.cells.get(t).and_then(|m| m.get(&c)).copied();
        let mut out = format!(
            "HTTP/1.1 keep-alive GET from {}, one load thread; medians of {} rounds of {} s\n\n\
             | metric |",
            self.upstream, self.rounds, self.secs
        );
        for t in &self.columns {
            out.push_str(&format!(" {t} |"));
        }
        out.push_str(" unit |\n|---|");
        for _ in &self.columns {
            out.push_str("---:|");
        }
        out.push_str("---|\n");
        let mut row = |name: String, unit: &str, f: &dyn Fn(&str) -> Option<f64>| {
            out.push_str(&format!("| {name} |"));
            for t in &self.columns {
                match f(t) {
                    Some(v) if v.abs() >= 100.0 => out.push_str(&format!(" {v:.0} |")),
                    Some(v) => out.push_str(&format!(" {v:.2} |")),
                    None => out.push_str(" |"),
                }
            }
            out.push_str(&format!(" {unit} |\n"));
        };
        for c in CONNECTIONS {
            row(format!("req/s, {c} conn., ratio to direct"), "x", &|t| {
                Some(cell(t, c)?.req_per_s / cell("direct", c)?.req_per_s)
            });
        }
        for c in CONNECTIONS {
            row(
                format!("CPU per request, {c} conn., ratio to relay"),
                "x",
                &|t| {
                    (t != "direct").then_some(())?;
                    Some(cell(t, c)?.cpu_us / cell("relay", c)?.cpu_us)
                },
            );
        }
        for c in CONNECTIONS {
            row(format!("p50 added to direct, {c} conn."), "µs", &|t| {
                Some(cell(t, c)?.p50_us - cell("direct", c)?.p50_us)
            });
        }
        for c in CONNECTIONS {
            row(format!("req/s, {c} conn."), "req/s", &|t| {
                Some(cell(t, c)?.req_per_s)
            });
            row(format!("CPU per request, {c} conn."), "µs", &|t| {
                (t != "direct").then_some(())?;
                Some(cell(t, c)?.cpu_us)
            });
            row(format!("p50 latency, {c} conn."), "µs", &|t| {
                Some(cell(t, c)?.p50_us)
            });
            row(format!("p99 latency, {c} conn."), "µs", &|t| {
                Some(cell(t, c)?.p99_us)
            });
        }
        out
    }
}
