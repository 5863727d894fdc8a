//! `agentgate demo`: the whole product on embedded defaults, in one process.
//!
//! A gateway (TLS on the agent port plus a cleartext agent port), a small HTTP upstream, and
//! one agent per transport, each under its own name. It measures requests through each agent,
//! prints a table, and then keeps running with the URLs printed so a person can `curl` through
//! it. Certificates and tokens are generated into a throwaway directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentgate_agent::{AgentConfig, TransportMode};
use agentgate_gateway::tokens::{create_token, TokenKind};
use agentgate_gateway::{BoundAddrs, Gateway, GatewayConfig};
use agentgate_transport::ServerUrl;
use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Agent port with TLS (grpcs and wss).
    #[arg(long, default_value = "127.0.0.1:8150")]
    listen: SocketAddr,
    /// Agent port without TLS (grpc and ws).
    #[arg(long, default_value = "127.0.0.1:8152")]
    cleartext_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8151")]
    admin_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8154")]
    api_listen: SocketAddr,
    /// Small requests per transport for the latency column.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Size of the download per transport for the throughput column, in MiB.
    #[arg(long, default_value_t = 64)]
    download_mib: u64,
    /// Exit after printing the table instead of serving until Ctrl-C.
    #[arg(long)]
    exit_after_table: bool,
}

const TRANSPORTS: [&str; 4] = ["grpc", "grpcs", "ws", "wss"];

fn write_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let cert = dir.join("demo-cert.pem");
    let key = dir.join("demo-key.pem");
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    Ok((cert, key))
}

struct Row {
    name: String,
    requests: usize,
    p50: Duration,
    p99: Duration,
    mib_per_s: f64,
}

async fn measure(url_base: &str, token: &str, n: usize, mib: u64) -> anyhow::Result<Row> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let get = |path: String| {
        let req = hyper::Request::get(format!("{url_base}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::new())
            .unwrap();
        client.request(req)
    };
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp = get("/".into()).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "GET {url_base}/ returned {}",
            resp.status()
        );
        resp.into_body().collect().await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let t = Instant::now();
    let resp = get(format!("/bytes/{}", mib * 1024 * 1024)).await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "download returned {}",
        resp.status()
    );
    let mut body = resp.into_body();
    let mut total = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f?.into_data() {
            total += d.len() as u64;
        }
    }
    anyhow::ensure!(
        total == mib * 1024 * 1024,
        "download truncated at {total} bytes"
    );
    let secs = t.elapsed().as_secs_f64();
    Ok(Row {
        name: String::new(),
        requests: n,
        p50: lat[n / 2],
        p99: lat[(n * 99 / 100).min(n - 1)],
        mib_per_s: mib as f64 / secs,
    })
}

pub async fn run(a: DemoArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("agentgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = write_cert(&dir)?;
    let tokens = dir.join("tokens.json");
    let mut agent_tokens = vec![];
    for t in TRANSPORTS {
        agent_tokens.push(create_token(&tokens, TokenKind::Agent, &format!("demo-{t}"), &[])?.0);
    }
    let (api_token, _) = create_token(&tokens, TokenKind::Api, "demo-user", &[])?;

    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = up.local_addr()?;
    tokio::spawn(crate::test_upstream::serve(up));

    let config = GatewayConfig {
        listen: a.listen,
        cleartext_listen: Some(a.cleartext_listen),
        admin_listen: a.admin_listen,
        api_listen: a.api_listen,
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        tokens: tokens.clone(),
        ..GatewayConfig::default()
    };
    use agentgate_transport::tls::{server_config, ALPN_H2, ALPN_HTTP1};
    let tls = server_config(&cert, &key, &[ALPN_H2, ALPN_HTTP1])?;
    let gw = Gateway::new(config)?;
    let gw_stop = CancellationToken::new();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<BoundAddrs>();
    let gateway = tokio::spawn(agentgate_gateway::run_with(
        gw.clone(),
        Some(tls),
        None,
        gw_stop.clone(),
        move |b| {
            let _ = bound_tx.send(b);
        },
    ));
    let bound = match bound_rx.await {
        Ok(b) => b,
        Err(_) => return gateway.await?.context("the gateway did not start"),
    };
    let clear = bound.cleartext_agent.context("cleartext port bound")?;

    let agent_stop = CancellationToken::new();
    for (t, token) in TRANSPORTS.iter().zip(agent_tokens) {
        let url = match *t {
            "grpc" => format!("grpc://{clear}"),
            "grpcs" => format!("grpcs://localhost:{}", bound.agent.port()),
            "ws" => format!("ws://{clear}/"),
            _ => format!("wss://localhost:{}/", bound.agent.port()),
        };
        let mut c = AgentConfig::new(ServerUrl::parse(&url)?, token);
        c.transport = if t.starts_with("ws") {
            TransportMode::Websocket
        } else {
            TransportMode::Grpc
        };
        c.ca_cert = Some(cert.clone());
        c.http_upstreams = vec![(
            "default".into(),
            url::Url::parse(&format!("http://{up_addr}"))?,
        )];
        tokio::spawn(agentgate_agent::run(c, agent_stop.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while TRANSPORTS
        .iter()
        .any(|t| gw.parked_tunnels(&format!("demo-{t}")) == 0)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "agents did not connect within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("\nagents connected:");
    for r in gw.agents() {
        eprintln!(
            "  {:<12} transport={:<5} peer={}",
            r.name, r.transport, r.peer
        );
    }

    let mut rows = vec![];
    let mut direct = measure(&format!("http://{up_addr}"), "", a.requests, a.download_mib).await?;
    direct.name = "direct (no tunnel)".into();
    for t in TRANSPORTS {
        let base = format!("http://{}/agents/demo-{t}/proxy", bound.api);
        let mut row = measure(&base, &api_token, a.requests, a.download_mib).await?;
        row.name = t.to_string();
        rows.push(row);
    }
    println!();
    println!("| transport | requests | p50 latency | p99 latency | download MiB/s | vs direct |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in std::iter::once(&direct).chain(rows.iter()) {
        println!(
            "| {} | {} | {:.0} µs | {:.0} µs | {:.0} | {:.2}x |",
            r.name,
            r.requests,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.mib_per_s,
            r.mib_per_s / direct.mib_per_s
        );
    }
    println!();
    println!(
        "gateway: agents on {} (TLS) and {} (cleartext); admin http://{}; API http://{}",
        bound.agent, clear, bound.admin, bound.api
    );
    println!("try:");
    println!(
        "  curl -H 'authorization: Bearer {api_token}' http://{}/agents/demo-wss/proxy/",
        bound.api
    );
    println!("  curl http://{}/api/v1/agents", bound.admin);
    println!("  curl http://{}/metrics", bound.admin);
    println!("(certificate and tokens in {})", dir.display());

    if !a.exit_after_table {
        eprintln!("\nrunning; Ctrl-C to stop");
        stop.cancelled().await;
    }
    agent_stop.cancel();
    gw_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
