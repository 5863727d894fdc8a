//! The agent's settings: one struct that is at once the flags of `agentgate agent` (clap,
//! each flag also read from its `AGENTGATE_AGENT_*` variable), a section of the agent's
//! config file (`--config`, TOML) and the source of `agentgate config defaults --for agent`.
//! The layers are those of the gateway (crate::settings): defaults, the file, then the
//! environment and the flags, which clap reads together (a flag beats its variable).
//!
//! Every field is optional here so that "not given" can be told from "given as the
//! default"; `Default` fills in the agent's defaults from [`AgentConfig::new`], their one home.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use agentgate_agent::{AgentConfig, TransportMode};
use agentgate_transport::ServerUrl;
use anyhow::Context;
use clap::Args;
use documented::DocumentedFields;
use serde::{Deserialize, Serialize};

#[derive(Args, Serialize, Deserialize, DocumentedFields, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// Gateway URL: grpc://host:port, grpcs://host:port, ws://host:port/path or
    /// wss://host:port/path. Required.
    #[arg(long, env = "AGENTGATE_SERVER", help_heading = "Gateway")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// File holding the agent token, re-read before each new connection when it changed (or
    /// set AGENTGATE_TOKEN).
    #[arg(long, env = "AGENTGATE_TOKEN_FILE", help_heading = "Gateway")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// auto: with a ws/wss URL try direct gRPC on the same host and port first, fall back to
    /// the WebSocket, and re-probe later; grpc: direct gRPC only; websocket: the URL as given.
    #[arg(long, env = "AGENTGATE_TRANSPORT", help_heading = "Gateway",
          value_parser = ["auto", "grpc", "websocket", "ws"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// CA certificate(s) that sign the gateway's certificate (PEM); default: the system's
    /// trust store.
    #[arg(long, env = "AGENTGATE_AGENT_CA_CERT", help_heading = "Gateway")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Verify the gateway's certificate against this name instead of the URL's host.
    #[arg(
        long,
        env = "AGENTGATE_AGENT_TLS_SERVER_NAME",
        help_heading = "Gateway"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Do not verify the gateway's certificate (prints a warning). For tests only.
    #[arg(long, env = "AGENTGATE_AGENT_INSECURE_SKIP_TLS_VERIFY", help_heading = "Gateway",
          num_args = 0..=1, default_missing_value = "true", value_name = "BOOL",
          value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure_skip_tls_verify: Option<bool>,
    /// Extra header 'Name: value' on the WebSocket upgrade and as gRPC metadata. Repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE", help_heading = "Gateway")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// HTTP proxy for egress (http://[user:pass@]host:port); default: HTTPS_PROXY, HTTP_PROXY
    /// and NO_PROXY from the environment.
    #[arg(long, env = "AGENTGATE_PROXY", help_heading = "Gateway")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Instance id, telling replicas that share a token apart; default: random per process.
    #[arg(long, env = "AGENTGATE_AGENT_INSTANCE_ID", help_heading = "Gateway")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,

    /// HTTP upstream as NAME=URL, or a bare URL for `default`. Repeatable; from the
    /// environment, comma-separated.
    #[arg(
        long = "upstream",
        value_name = "[NAME=]URL",
        env = "AGENTGATE_AGENT_UPSTREAM",
        value_delimiter = ',',
        help_heading = "Upstreams (services next to the agent)"
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    /// gRPC upstream URL (http:// for h2c, https:// for TLS).
    #[arg(
        long,
        env = "AGENTGATE_AGENT_GRPC_UPSTREAM",
        help_heading = "Upstreams (services next to the agent)"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_upstream: Option<String>,
    /// CA certificate(s) for https upstreams (PEM); default: the system's trust store.
    #[arg(
        long,
        env = "AGENTGATE_AGENT_UPSTREAM_CA",
        help_heading = "Upstreams (services next to the agent)"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,
    /// Deadline for connecting to an upstream.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_UPSTREAM_CONNECT_TIMEOUT",
          help_heading = "Upstreams (services next to the agent)")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub upstream_connect_timeout: Option<Duration>,
    /// Deadline for an HTTP upstream's response head (504 after it).
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_UPSTREAM_RESPONSE_TIMEOUT",
          help_heading = "Upstreams (services next to the agent)")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub upstream_response_timeout: Option<Duration>,

    /// While on the WebSocket fallback, how often to re-probe direct gRPC (jittered ±20%).
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_REPROBE_INTERVAL",
          help_heading = "Connection")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub reprobe_interval: Option<Duration>,
    /// Deadline of a direct-gRPC probe (dial, health check and registration).
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_PROBE_TIMEOUT",
          help_heading = "Connection")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub probe_timeout: Option<Duration>,
    /// First reconnect backoff ceiling (full jitter below it, doubling per attempt).
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_BACKOFF_INITIAL",
          help_heading = "Connection")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub backoff_initial: Option<Duration>,
    /// Largest reconnect backoff.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_BACKOFF_MAX",
          help_heading = "Connection")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<Duration>,
    /// HTTP/2 PING interval: below the usual 60 s load-balancer idle timeout (kas: 55 s).
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_KEEPALIVE_INTERVAL",
          help_heading = "Connection")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub keepalive_interval: Option<Duration>,

    /// Idle tunnels kept ready, so a request never waits for a stream to open (kas: 2).
    #[arg(
        long,
        env = "AGENTGATE_AGENT_POOL_MIN_IDLE",
        help_heading = "Tunnel pool"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_min_idle: Option<usize>,
    /// Tunnels opened at once under demand (kas: 10).
    #[arg(
        long,
        env = "AGENTGATE_AGENT_POOL_SCALE_STEP",
        help_heading = "Tunnel pool"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_scale_step: Option<usize>,
    /// Tunnels per connection at most, busy and idle (kas: 500).
    #[arg(long, env = "AGENTGATE_AGENT_POOL_MAX", help_heading = "Tunnel pool")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_max: Option<usize>,
    /// Idle lifetime of surplus tunnels (beyond `pool_min_idle`).
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_POOL_IDLE_LIFETIME",
          help_heading = "Tunnel pool")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub pool_idle_lifetime: Option<Duration>,

    /// Sidecar mode: listen here (loopback; a bare PORT means 127.0.0.1:PORT) for gRPC calls
    /// from local processes, and send them to the gateway's backends over this agent's
    /// connection, as this agent. They need no token of their own.
    #[arg(long, value_name = "ADDR", value_parser = parse_local_listen,
          env = "AGENTGATE_AGENT_LOCAL_LISTEN", help_heading = "Local listeners")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_listen: Option<SocketAddr>,
    /// Serve /healthz, /readyz (registered with the gateway) and /metrics here, e.g.
    /// 127.0.0.1:9101 (a bare PORT means 127.0.0.1:PORT).
    #[arg(long, value_name = "ADDR", value_parser = parse_local_listen,
          env = "AGENTGATE_AGENT_METRICS_LISTEN", help_heading = "Local listeners")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,

    /// Worker threads of the agent's runtime; default: one per core (or TOKIO_WORKER_THREADS).
    /// 1 suits an agent that serves a request or two at a time: no wake-up crosses between
    /// threads (docs/operations.md, "Worker threads"). Read at start only.
    #[arg(
        long,
        value_name = "N",
        env = "AGENTGATE_AGENT_WORKER_THREADS",
        help_heading = "Process"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<NonZeroUsize>,
}

/// The settings of an agent that was given nothing: what `AgentConfig::new` chooses.
impl Default for AgentSettings {
    fn default() -> Self {
        let placeholder = ServerUrl::parse("grpc://unset:1").expect("a valid URL");
        let d = AgentConfig::new(placeholder, String::new());
        Self {
            server: None,
            token_file: None,
            transport: Some("auto".into()),
            ca_cert: None,
            tls_server_name: None,
            insecure_skip_tls_verify: Some(false),
            headers: vec![],
            proxy: None,
            instance_id: None,
            upstreams: vec![],
            grpc_upstream: None,
            upstream_ca: None,
            upstream_connect_timeout: Some(d.upstream_connect_timeout),
            upstream_response_timeout: Some(d.upstream_response_timeout),
            reprobe_interval: Some(d.reprobe_interval),
            probe_timeout: Some(d.probe_timeout),
            backoff_initial: Some(d.backoff_initial),
            backoff_max: Some(d.backoff_max),
            keepalive_interval: Some(d.keepalive_interval),
            pool_min_idle: Some(d.pool.min_idle),
            pool_scale_step: Some(d.pool.scale_step),
            pool_max: Some(d.pool.max),
            pool_idle_lifetime: Some(d.pool.idle_lifetime),
            local_listen: None,
            metrics_listen: None,
            worker_threads: None,
        }
    }
}

impl AgentSettings {
    /// The agent's configuration from the layered settings, with the token read.
    pub fn to_config(&self) -> anyhow::Result<AgentConfig> {
        let server = self.server.as_deref().context(
            "no gateway URL: give --server URL, set AGENTGATE_SERVER, or put `server = \"URL\"` \
             in the config file",
        )?;
        let server = ServerUrl::parse(server)?;
        let token = match (&self.token_file, std::env::var("AGENTGATE_TOKEN")) {
            (Some(f), _) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read token file {}", f.display()))?
                .trim()
                .to_string(),
            (None, Ok(t)) => t.trim().to_string(),
            (None, Err(_)) => {
                anyhow::bail!("no agent token: give --token-file FILE or set AGENTGATE_TOKEN")
            }
        };
        if token.is_empty() {
            anyhow::bail!("the agent token is empty");
        }
        let mut c = AgentConfig::new(server, token);
        c.token_file = self.token_file.clone();
        if let Some(t) = &self.transport {
            c.transport = t.parse::<TransportMode>().map_err(anyhow::Error::msg)?;
        }
        if c.transport == TransportMode::Websocket && !c.server.scheme.is_websocket() {
            anyhow::bail!(
                "--transport websocket needs a ws:// or wss:// URL (it carries the path)"
            );
        }
        c.ca_cert = self.ca_cert.clone();
        c.tls_server_name = self.tls_server_name.clone();
        c.insecure_skip_tls_verify = self.insecure_skip_tls_verify.unwrap_or(false);
        for h in &self.headers {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("--header {h:?}: expected 'Name: value'"))?;
            c.headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        c.proxy = self.proxy.clone();
        c.local_listen = self.local_listen;
        c.metrics_listen = self.metrics_listen;
        for u in &self.upstreams {
            let (name, url) = match u.split_once('=') {
                Some((n, url)) if !n.contains("://") => (n.to_string(), url),
                _ => ("default".to_string(), u.as_str()),
            };
            let url =
                url::Url::parse(url).with_context(|| format!("--upstream {u:?}: invalid URL"))?;
            if !matches!(url.scheme(), "http" | "https") {
                anyhow::bail!(
                    "--upstream {u:?}: only http:// and https:// upstreams are supported"
                );
            }
            c.http_upstreams.push((name, url));
        }
        if let Some(u) = &self.grpc_upstream {
            c.grpc_upstream = Some(
                url::Url::parse(u)
                    .with_context(|| format!("--grpc-upstream {u:?}: invalid URL"))?,
            );
        }
        c.upstream_ca = self.upstream_ca.clone();
        if let Some(id) = &self.instance_id {
            c.instance_id = id.clone();
        }
        macro_rules! given {
            ($setting:ident => $($field:ident).+) => {
                if let Some(v) = self.$setting {
                    c.$($field).+ = v;
                }
            };
        }
        given!(upstream_connect_timeout => upstream_connect_timeout);
        given!(upstream_response_timeout => upstream_response_timeout);
        given!(reprobe_interval => reprobe_interval);
        given!(probe_timeout => probe_timeout);
        given!(backoff_initial => backoff_initial);
        given!(backoff_max => backoff_max);
        given!(keepalive_interval => keepalive_interval);
        given!(pool_min_idle => pool.min_idle);
        given!(pool_scale_step => pool.scale_step);
        given!(pool_max => pool.max);
        given!(pool_idle_lifetime => pool.idle_lifetime);
        Ok(c)
    }
}

/// `--local-listen`: `IP:port`, or a bare port on 127.0.0.1. `localhost:PORT` is 127.0.0.1
/// (what it names on every system the agent runs on); other names are refused, since a name
/// could resolve to an address that is not loopback.
pub fn parse_local_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Some(port) = s
        .strip_prefix("localhost:")
        .and_then(|p| p.parse::<u16>().ok())
    {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not an IP address and port (127.0.0.1:9100, [::1]:9100) nor a port")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_listen_takes_an_address_a_port_or_localhost() {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(parse_local_listen("9100"), Ok(loopback(9100)));
        assert_eq!(parse_local_listen("localhost:9101"), Ok(loopback(9101)));
        assert_eq!(
            parse_local_listen("[::1]:9102"),
            Ok("[::1]:9102".parse().unwrap())
        );
        let e = parse_local_listen("runner-host:9100").unwrap_err();
        assert!(e.contains("not an IP address and port"), "{e}");
    }
}
