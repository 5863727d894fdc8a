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
    #[arg(long)]
    pub token_file: PathBuf,
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
}

pub async fn run(a: LoadArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let server = ServerUrl::parse(&a.server)?;
    let token = std::fs::read_to_string(&a.token_file)?.trim().to_string();
    for i in 0..a.count {
        let mut c = AgentConfig::new(server.clone(), token.clone());
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
        tokio::spawn(agentgate_agent::run(c, stop.clone()));
        // Pace the start a little so a large process does not dial everything in one tick.
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.cancelled().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}
