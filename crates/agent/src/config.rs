//! Every setting of the agent, named, with its default and the reason for it.

use std::path::PathBuf;
use std::time::Duration;

use agentgate_transport::ServerUrl;

/// Which transport the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportMode {
    /// With a ws/wss URL: probe direct gRPC on the same host and port first, fall back to the
    /// WebSocket URL, and re-probe later. With a grpc/grpcs URL: gRPC only.
    Auto,
    /// Direct gRPC only (a ws/wss URL is dialled as grpc/grpcs on its host and port).
    Grpc,
    /// The URL exactly as given; never probes.
    Websocket,
}

impl std::str::FromStr for TransportMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "grpc" => Ok(Self::Grpc),
            "websocket" | "ws" => Ok(Self::Websocket),
            other => Err(format!(
                "unknown transport {other:?}: use auto, grpc or websocket"
            )),
        }
    }
}

/// The tunnel pool (REFERENCE.md section 3 describes kas's numbers).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Idle tunnels kept open, so a request never waits for a stream to be opened (kas: 2).
    pub min_idle: usize,
    /// Most tunnels opened at once beyond the minimum when none is idle: one per busy tunnel,
    /// up to this many (kas: 10).
    pub scale_step: usize,
    /// Tunnels per connection at most, busy and idle (kas: 500).
    pub max: usize,
    /// A tunnel idle for this long is closed if more than `min_idle` are idle. Heartbeats keep
    /// the ones that stay alive through proxies, so this only shrinks the pool after a burst.
    pub idle_lifetime: Duration,
    /// The tunnel protocol version announced to the gateway (2: streams carry requests one
    /// after another; 1: one request per stream, as agents before 0.2 did). Lower it only to
    /// reproduce an old agent.
    pub protocol_version: u32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            min_idle: 2,
            scale_step: 10,
            max: 500,
            idle_lifetime: Duration::from_secs(60),
            protocol_version: 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: ServerUrl,
    pub token: String,
    /// Where `token` came from, if a file: re-read before a connection when it changed.
    pub token_file: Option<PathBuf>,
    pub transport: TransportMode,
    pub ca_cert: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub insecure_skip_tls_verify: bool,
    /// Extra headers: on the WebSocket upgrade and as gRPC metadata on every call.
    pub headers: Vec<(String, String)>,
    /// Source IP for the connection to the gateway (`None`: the OS chooses).
    pub local_ip: Option<std::net::IpAddr>,
    /// Explicit egress proxy (`http://[user:pass@]host:port`); otherwise the environment.
    pub proxy: Option<String>,
    /// Sidecar mode: a loopback gRPC listener whose calls go to the gateway's backends over
    /// this agent's connection, as this agent (`--local-listen`).
    pub local_listen: Option<std::net::SocketAddr>,
    /// `/healthz`, `/readyz` (registered) and `/metrics` on this address (`--metrics-listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// HTTP upstreams by name (`default` for a bare URL).
    pub http_upstreams: Vec<(String, url::Url)>,
    pub grpc_upstream: Option<url::Url>,
    /// CA for https upstreams (otherwise the system roots).
    pub upstream_ca: Option<PathBuf>,
    /// Deadline for connecting to an upstream.
    pub upstream_connect_timeout: Duration,
    /// Deadline for an HTTP upstream's response head (gRPC calls use the caller's deadline).
    pub upstream_response_timeout: Duration,

    /// HTTP/2 PING interval: below the usual 60 s load-balancer idle timeout (kas: 55 s).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Deadline for each step of a dial (TCP, proxy, TLS, WebSocket) and for registration.
    pub connect_timeout: Duration,
    /// Reconnect backoff: full jitter between 0 and min(max, initial * 2^attempt).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A connection that stayed up this long resets the backoff.
    pub backoff_reset_after: Duration,
    /// Deadline for a direct-gRPC probe (dial, health and authenticated registration).
    pub probe_timeout: Duration,
    /// While on the WebSocket fallback, how often to re-probe direct gRPC (jittered ±20%).
    pub reprobe_interval: Duration,
    pub pool: PoolSettings,
    /// Largest body chunk sent through a tunnel.
    pub chunk_size: usize,
    /// Random per process: tells replicas that share a token apart.
    pub instance_id: String,
    pub version: String,
    pub hostname: String,
}

impl AgentConfig {
    /// A configuration with every setting at its default.
    pub fn new(server: ServerUrl, token: String) -> Self {
        let mut id = [0u8; 8];
        rand::Rng::fill(&mut rand::rng(), &mut id);
        Self {
            server,
            token,
            token_file: None,
            transport: TransportMode::Auto,
            ca_cert: None,
            tls_server_name: None,
            insecure_skip_tls_verify: false,
            headers: vec![],
            proxy: None,
            local_listen: None,
            metrics_listen: None,
            local_ip: None,
            http_upstreams: vec![],
            grpc_upstream: None,
            upstream_ca: None,
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_response_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(55),
            keepalive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_reset_after: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(5),
            reprobe_interval: Duration::from_secs(30 * 60),
            pool: PoolSettings::default(),
            chunk_size: 64 * 1024,
            instance_id: hex::encode(id),
            version: format!("agentgate/{}", env!("CARGO_PKG_VERSION")),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| "unknown".into()),
        }
    }
}
