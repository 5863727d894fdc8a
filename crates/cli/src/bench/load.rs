//! `agentgate bench-load`: many agents in one process, for benchmarks.
//!
//! The open-file cap here is 20,000 per process, so large runs split agents over several of
//! these processes, each with its own 127.0.0.x source address.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentgate_agent::{AgentConfig, TransportMode};
use agentgate_transport::ServerUrl;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub server: String,
    /// One token, or one per line: agent i uses line (token_offset + i), so several load
    /// processes can run distinct agents from one file (`bench-tokens` makes it).
    #[arg(long)]
    pub token_file: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub token_offset: usize,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    #[arg(long)]
    pub local_ip: Option<IpAddr>,
    #[arg(long)]
    pub upstream: url::Url,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff_initial: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// Each agent holds one open call to this gateway-side backend method over its own
    /// connection (`bench backends`), made again whenever it ends.
    #[arg(long)]
    pub long_poll: Option<String>,
    /// Wait for this file to exist before opening the long polls, so the bench can measure the
    /// same agents idle first.
    #[arg(long)]
    pub long_poll_start_file: Option<PathBuf>,
    /// Worker threads of this process's runtime, as `agentgate agent --worker-threads`;
    /// default: one per core.
    #[arg(long)]
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

pub async fn run(a: LoadArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let server = ServerUrl::parse(&a.server)?;
    let text = std::fs::read_to_string(&a.token_file)?;
    let tokens: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "no token in {}", a.token_file.display());
    for i in 0..a.count {
        let token = tokens[(a.token_offset + i) % tokens.len()].to_string();
        let mut c = AgentConfig::new(server.clone(), token);
        c.transport = if server.scheme.is_websocket() {
            TransportMode::Websocket
        } else {
            TransportMode::Grpc
        };
        c.ca_cert = a.ca_cert.clone();
        c.local_ip = a.local_ip;
        c.backoff_initial = a.backoff_initial;
        c.backoff_max = a.backoff_max;
        c.instance_id = format!("{}-{i}", c.instance_id);
        c.http_upstreams = vec![("default".into(), a.upstream.clone())];
        let agent = agentgate_agent::Agent::new(c)?;
        if let Some(path) = &a.long_poll {
            tokio::spawn(hold_long_poll(
                agent.backend_caller(),
                path.clone(),
                a.long_poll_start_file.clone(),
                stop.clone(),
            ));
        }
        tokio::spawn(agent.run(stop.clone()));
        // Pace the start a little so a large process does not dial everything in one tick.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.cancelled().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// Keeps one call to `path` open over the agent's connection until `stop`; the bench
/// backend never answers it, but should it end, it is made again a second later.
async fn hold_long_poll(
    caller: agentgate_agent::BackendCaller,
    path: String,
    start_file: Option<PathBuf>,
    stop: CancellationToken,
) {
    if let Some(f) = start_file {
        while !f.exists() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = long_poll_once(&caller, &path) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn long_poll_once(caller: &agentgate_agent::BackendCaller, path: &str) {
    // One empty message, uncompressed.
    let body = http_body_util::Full::new(bytes::Bytes::from_static(&[0u8; 5]));
    let Ok(req) = http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
    else {
        return;
    };
    let mut body = caller.call(req).await.into_body();
    while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
}
