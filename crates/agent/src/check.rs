//! `agentgate agent --check`: the agent's configuration tried once, step by step, in plain
//! words: the gateway's name resolves, a connection registers (and over which transport, and
//! why not the direct one), and each upstream accepts a TCP connection. The first thing to run
//! when an agent does not come up, and a readiness check for a new install.

use std::time::Duration;

use crate::config::AgentConfig;
use crate::connection::Dialer;

/// How long each upstream gets to accept a TCP connection.
const UPSTREAM_CONNECT: Duration = Duration::from_secs(3);

/// One step of the check.
pub struct CheckStep {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// Runs every step; the connection made is closed again at the end.
pub async fn check(cfg: AgentConfig) -> Vec<CheckStep> {
    let mut steps = vec![];
    let server = cfg.server.clone();
    let target = format!("{}:{}", server.host, server.port);
    if cfg.proxy.is_none() {
        steps.push(match tokio::net::lookup_host(&target).await {
            Ok(addrs) => {
                let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
                CheckStep {
                    what: format!("resolve {}", server.host),
                    ok: !addrs.is_empty(),
                    detail: addrs.join(", "),
                }
            }
            Err(e) => CheckStep {
                what: format!("resolve {}", server.host),
                ok: false,
                detail: format!("{e}; check the name in the gateway URL and this host's DNS"),
            },
        });
    }
    let upstreams: Vec<(String, url::Url)> = cfg
        .http_upstreams
        .iter()
        .cloned()
        .chain(cfg.grpc_upstream.clone().map(|u| ("gRPC".to_string(), u)))
        .collect();
    let connect = match Dialer::new(cfg) {
        Err(e) => CheckStep {
            what: format!("connect to {server}"),
            ok: false,
            detail: agentgate_transport::error_chain::describe(e.as_ref()),
        },
        Ok(dialer) => match dialer.connect_explained().await {
            Ok((conn, fallback)) => CheckStep {
                what: format!("connect to {server}"),
                ok: true,
                detail: format!(
                    "registered as {:?} over {} (connection {}){}",
                    conn.agent,
                    conn.transport,
                    conn.connection_id,
                    fallback
                        .map(|why| format!("; WebSocket fallback because {why}"))
                        .unwrap_or_default()
                ),
            },
            Err(e) => CheckStep {
                what: format!("connect to {server}"),
                ok: false,
                detail: e.to_string(),
            },
        },
    };
    steps.push(connect);
    for (name, url) in upstreams {
        let (host, port) = (
            url.host_str()
                .unwrap_or("")
                .trim_matches(['[', ']'])
                .to_string(),
            url.port_or_known_default().unwrap_or(80),
        );
        let what = format!("upstream {name} ({url})");
        let reached = tokio::time::timeout(
            UPSTREAM_CONNECT,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await;
        steps.push(match reached {
            Ok(Ok(_)) => CheckStep {
                what,
                ok: true,
                detail: "accepts TCP connections".into(),
            },
            Ok(Err(e)) => CheckStep {
                what,
                ok: false,
                detail: format!("{e}: tunnelled requests to it will get 502"),
            },
            Err(_) => CheckStep {
                what,
                ok: false,
                detail: format!(
                    "no TCP answer within {UPSTREAM_CONNECT:?}: requests will get 502 or 504"
                ),
            },
        });
    }
    steps
}
