//! Every setting of the gateway, named, with its default and the reason for it.
//!
//! The CLI fills this from a TOML file, then `AGENTGATE_*` environment variables, then flags.
//! Every field's doc comment is what `agentgate config defaults` prints above it (the derive
//! refuses a field without one), so this file is the one home of each setting's meaning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use documented::DocumentedFields;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Agent port: all four transports.
    pub listen: SocketAddr,
    /// An optional second agent listener that never uses TLS (say, for agents inside the
    /// cluster while `listen` faces the internet with TLS). Same gRPC server, same services.
    pub cleartext_listen: Option<SocketAddr>,
    /// Admin port: /healthz, /readyz, /metrics, /api/v1/agents.
    pub admin_listen: SocketAddr,
    /// User-facing tunnel API (HTTP and gRPC).
    pub api_listen: SocketAddr,
    /// PEM certificate chain for TLS on the agent port (with `tls_key`; both or neither).
    /// Without it the agent port serves grpc:// and ws:// only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM certificate chain for TLS on the API port (with `api_tls_key`; both or neither).
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key for `api_tls_cert`.
    pub api_tls_key: Option<PathBuf>,
    /// Token store (agent and API tokens, hashed).
    pub tokens: PathBuf,
    /// How often the token store file is checked for changes. A revoked token's sessions,
    /// parked tunnels and calls end within this time; `0s` checks only when a token is
    /// presented.
    #[serde(with = "humantime_serde")]
    pub token_check_interval: Duration,
    /// Start even when the token store file does not exist (it is read once tokens are
    /// created). Off by default: a typo in `--tokens` would otherwise start a gateway that
    /// refuses every agent.
    pub tokens_may_be_missing: bool,
    /// How often the TLS certificate and key files are checked for changes (SIGHUP also
    /// reloads them). New handshakes get a changed certificate; open connections keep theirs.
    /// `0s`: only on SIGHUP.
    #[serde(with = "humantime_serde")]
    pub certificate_check_interval: Duration,

    /// Deadline for the TLS handshake, the 24-byte sniff, and the WebSocket upgrade, each.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Agent connections open at once. The process is capped at 20,000 open files here, so
    /// the default leaves room for the admin and API listeners and upstream sockets.
    pub max_connections: usize,
    /// Listen backlog for the agent port (the OS default of 128 overflows in reconnect storms).
    pub listen_backlog: u32,
    /// A connection on which no call authenticated within this time is closed (reason
    /// `auth_timeout`). Agents register at once; this bounds clients that finish TLS or the
    /// WebSocket upgrade and then send nothing, or only health checks. `0s` disables.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Token-less calls (health, reflection) that a connection which has not authenticated
    /// may hold open at once; more get RESOURCE_EXHAUSTED (reason `unauthenticated_calls`).
    pub max_unauthenticated_calls_per_connection: u32,
    /// Calls refused (no or wrong token, unknown method or encoding, too many token-less calls)
    /// on a connection that has not authenticated, after which the connection is closed
    /// (reason `refused_calls`): each refused stream still costs HTTP/2 work, and an agent
    /// that is refused backs off on a new connection.
    pub max_refused_calls_before_auth: u32,
    /// Agent connections open at once from one source address. Agents behind one NAT share
    /// an address, so this is generous; it stops one host from taking every slot.
    pub max_connections_per_source: usize,
    /// TLS handshakes, sniffs and WebSocket upgrades in progress at once from one address;
    /// on the API, admin and internal listeners, connections from one address that have not
    /// begun a request.
    pub max_handshakes_per_source: usize,
    /// Bytes a connection may send before one of its calls authenticated, counted under TLS
    /// and WebSocket. At the budget the gateway stops reading for up to 500 ms while a call's
    /// token is checked (so a large first call passes), then closes the connection (reason
    /// `pre_auth_bytes`). This bounds what a client without a token can make the gateway
    /// buffer (a WebSocket message is read whole). 0 disables.
    pub max_bytes_before_auth: usize,
    /// Bytes all agent connections without an authenticated call may hold together, on both
    /// agent ports: each counts what it read past its first 16 KiB until a call authenticates
    /// or it closes (1,000 connections that each sent most of a WebSocket message and then
    /// waited held 1 GiB). At it they stop reading, and one that neither authenticates nor gets
    /// room within 500 ms is closed (reason `pre_auth_bytes_total`). An agent sends a few KiB
    /// before its first call authenticates, within its first 16 KiB: clients that fill the
    /// pool do not keep agents out. 0 disables.
    pub max_bytes_before_auth_total: usize,
    /// Load balancers in TCP mode that send the PROXY protocol (v1 or v2; HAProxy
    /// `send-proxy-v2`, AWS NLB, ...): addresses or CIDRs. A connection from one of them must
    /// start with a PROXY header, and the client it names is the connection's address for
    /// logs, per-source limits and the agent list; a connection without a valid header within
    /// `handshake_timeout` is closed (reason `proxy_header`). From other addresses no header
    /// is looked for, so an agent cannot claim another address. Empty: off. The agent ports and
    /// the tunnel API port (its access log then names each caller).
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub proxy_protocol_from: Vec<String>,
    /// Streams a connection may open before one of its calls authenticated, counted as the
    /// bytes arrive (before HTTP/2 decodes them, so a flood costs nothing more); past it the
    /// gateway sends GOAWAY and closes the connection if the client goes on (reason
    /// `streams_before_auth`; see docs/configuration.md). agentk opens about one stream per
    /// module at start; 0 disables.
    pub max_streams_before_auth: u32,
    /// HTTP/2 streams one agent connection may have open (advertised in SETTINGS): the agent
    /// pool's cap of 500 tunnels, its session, and headroom.
    pub max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server accepts them (HTTP/2 rapid
    /// reset, CVE-2023-44487); past it the connection is closed (hyper's default is 20).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset because the client broke a rule, per connection, before
    /// the connection is closed (hyper's default 1024; tonic switches it off unless set).
    pub max_local_error_reset_streams: usize,
    /// Largest decoded message per service: AgentSession (RegisterRequest: three short strings).
    pub max_message_size_session: usize,
    /// Largest decoded message for grpc.health.v1 (a service name).
    pub max_message_size_health: usize,
    /// Largest decoded message for server reflection (a symbol or file name).
    pub max_message_size_reflection: usize,
    /// Largest decoded message on a tunnel stream (a body chunk of the agent's choosing; ours
    /// are 64 KiB; gRPC's usual default).
    pub max_message_size_tunnel: usize,
    /// Connections open at once on the tunnel API listener.
    pub api_max_connections: usize,
    /// Connections open at once on the admin listener (it has no authentication: keep it on
    /// a private address).
    pub admin_max_connections: usize,
    /// Connections open at once on the internal (replica-to-replica) listener.
    pub internal_max_connections: usize,
    /// API, admin and internal listeners: deadline for the first request to begin on a new
    /// connection (after the whole HTTP/2 preface: `http_idle_timeout` from set-up), and for
    /// reading an HTTP/1.1
    /// request's headers (slowloris).
    #[serde(with = "humantime_serde")]
    pub http_header_read_timeout: Duration,
    /// API, admin and internal listeners: a connection with no request in flight and no bytes
    /// moving for this long is closed. Requests in flight (long polls included) are not cut.
    #[serde(with = "humantime_serde")]
    pub http_idle_timeout: Duration,
    /// Largest WebSocket message accepted from an agent (kas: 10 MiB).
    pub ws_max_message_size: usize,
    /// Largest read from a WebSocket connection. The read buffer starts at 512 bytes and grows
    /// to this on a full read (tungstenite's 128 KiB default, allocated up front, cost
    /// ~127 KiB of RSS per idle agent).
    pub ws_read_buffer_size: usize,

    /// Server HTTP/2 PING interval: below the usual 60 s load-balancer idle timeout (kas: 50 s).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long to wait for a PING acknowledgement before closing the connection.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Clients pinging more often than this (three times in a row with no DATA or HEADERS sent
    /// to them in between, as grpc-go) are disconnected, reason `too_many_pings` (kas: 20 s). `0s` disables the check.
    #[serde(with = "humantime_serde")]
    pub min_client_ping_interval: Duration,
    /// Application-level heartbeat on long-lived streams (sessions and parked tunnels), for
    /// proxies whose per-stream idle timeouts HTTP/2 PINGs do not reset (nginx, CDNs: ~60 s).
    #[serde(with = "humantime_serde")]
    pub stream_heartbeat_interval: Duration,
    /// Connections older than this get GOAWAY, so agents rebalance across replicas (kas: 2 h).
    /// Each connection drains earlier, at a point jittered between 80% and 95% of the age:
    /// its agent is asked to reconnect and its tunnels stop taking requests. `0s` disables.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// After GOAWAY for age, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// On SIGTERM: how long in-flight requests may take to finish before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,

    /// How long a request for a known agent that is connected nowhere waits for it to
    /// connect (to this replica or, in cluster mode, any) before 503: agents are between two
    /// connections for a moment during rolling restarts and proxy reloads. `0s`: answer at once.
    #[serde(with = "humantime_serde")]
    pub agent_reconnect_wait: Duration,
    /// How long a request waits for an idle tunnel of a connected agent before 503.
    #[serde(with = "humantime_serde")]
    pub tunnel_wait: Duration,
    /// How long an agent has to send the descriptor on a new tunnel stream.
    #[serde(with = "humantime_serde")]
    pub tunnel_descriptor_timeout: Duration,
    /// Largest body chunk sent through a tunnel; bounds per-request buffering.
    pub tunnel_chunk_size: usize,
    /// A streaming answer whose caller (an API client, or a peer replica relaying for one)
    /// reads nothing of it for this long is cancelled at the agent, outcome `caller_stalled`:
    /// its unread bytes hold the agent connection's window (`http2_connection_window`), and
    /// about 32 stalled callers would freeze every other request to that agent. Time the answer
    /// waits on the agent (a watch, a long poll) does not count. `0s` disables (nginx's
    /// `send_timeout` is 60 s too).
    #[serde(with = "humantime_serde")]
    pub stalled_caller_timeout: Duration,
    /// HTTP/2 stream window for agent connections. Larger windows raise bulk throughput (a
    /// tonic relay went from 395 to 595 Mbit/s at 2 MiB / 4 MiB).
    pub http2_stream_window: u32,
    /// HTTP/2 connection window for agent connections: what all streams of one agent may hold
    /// unread together. A tunnel whose caller stops reading holds up to `http2_stream_window`
    /// of it; once stalled streams hold it all, every other request to that agent waits. At 4
    /// MiB three stalled downloads froze an agent; 64 MiB takes 32, until
    /// `stalled_caller_timeout` cancels them; nothing is allocated until data waits).
    pub http2_connection_window: u32,

    /// Cluster mode: `redis://[:password@]host:port/db`, `rediss://...`, or
    /// `redis+sentinel://host:port[,host:port...]/MASTER[/db]` to follow a Redis failover
    /// through its Sentinels (`rediss+sentinel://` for TLS to the Sentinels and the master). Unset means a single process with no shared state.
    pub redis: Option<String>,
    /// Internal API for other replicas (cluster mode only).
    pub internal_listen: SocketAddr,
    /// How other replicas reach this one's internal API (default: `http://{internal_listen}`).
    pub internal_url: Option<String>,
    /// File with the secret shared by all replicas, for signing internal calls: one secret per
    /// line, at least 32 bytes each. The first line signs; every line verifies, so a new
    /// secret can be rolled out without downtime (docs/cluster.md). Re-read on SIGHUP.
    pub internal_secret_file: Option<PathBuf>,
    /// Validity of the signed token on each internal call (short: a few seconds). Each token
    /// is also bound to one method, path, target replica and agent, and is accepted once.
    #[serde(with = "humantime_serde")]
    pub internal_token_validity: Duration,
    /// PEM certificate chain and key for TLS on the internal API (both or neither). With TLS
    /// the replica refuses cleartext there, and `internal_url` must be `https://`. The pair
    /// is also this replica's client certificate towards its peers. Reloaded like the agent
    /// port's.
    pub internal_tls_cert: Option<PathBuf>,
    /// PEM private key for `internal_tls_cert`.
    pub internal_tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign the replicas' internal certificates: peers' servers are
    /// verified against them (default: the system trust store), and with
    /// `internal_require_client_cert` so are the clients.
    pub internal_ca_cert: Option<PathBuf>,
    /// Mutual TLS on the internal API: a caller without a client certificate signed by
    /// `internal_ca_cert` is refused at the handshake.
    pub internal_require_client_cert: bool,
    /// Where this replica may send requests and tokens: peer URLs from Redis must match one
    /// entry: a CIDR (`10.0.0.0/8`), a host name or address (`gw-2.internal`), or a URL
    /// pattern with `*` (`https://*.agentgate.svc:8155`). A field in Redis that matches
    /// nothing is ignored, logged and counted. Empty: every URL is accepted (a warning at
    /// start says so). From the environment: `a,b` or a TOML array.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub internal_peers: Vec<String>,
    /// Deadline for a TCP (and TLS) connect to a peer replica.
    #[serde(with = "humantime_serde")]
    pub internal_connect_timeout: Duration,
    /// Deadline for a small internal call (reserve, release, list) on top of the tunnel wait
    /// it carries.
    #[serde(with = "humantime_serde")]
    pub internal_call_timeout: Duration,
    /// Deadline for the response head of a request forwarded to another replica (its agent's
    /// upstream answering); `0s`: none.
    #[serde(with = "humantime_serde")]
    pub internal_first_byte_timeout: Duration,
    /// A peer that failed to connect or answer in time is skipped for this long (unless it is
    /// the only one), so a dead replica costs one timeout, not one per request.
    #[serde(with = "humantime_serde")]
    pub internal_peer_down_for: Duration,
    /// Expiry written into each registry entry (kas: 5 min).
    #[serde(with = "humantime_serde")]
    pub registry_ttl: Duration,
    /// How often this replica refreshes its registry entries (kas: 4 min; below the TTL).
    #[serde(with = "humantime_serde")]
    pub registry_refresh_interval: Duration,
    /// Deadline for each Redis round trip; past it the call counts as a Redis error.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// CA certificates (PEM) for a `rediss://` or `rediss+sentinel://` Redis (and its
    /// Sentinels) with a private CA (default: the system trust store).
    pub redis_ca_cert: Option<PathBuf>,
    /// The ACL user the Sentinels want (`redis+sentinel://`, `rediss+sentinel://`); the user
    /// in the URL is the master's.
    pub redis_sentinel_username: Option<String>,
    /// File with the Sentinels' password (`requirepass` in sentinel.conf), first line; the
    /// password in the URL is the master's. Read at start, never logged.
    pub redis_sentinel_password_file: Option<PathBuf>,
    /// Start only if Redis answers within `redis_startup_timeout`. Off: start anyway, serve
    /// local agents, and join the cluster when Redis comes.
    pub redis_required_at_start: bool,
    /// With `redis_required_at_start`: how long to wait for Redis at start before exiting.
    #[serde(with = "humantime_serde")]
    pub redis_startup_timeout: Duration,
    /// How often to hand freed heap memory back to the OS (glibc `malloc_trim`). After a burst
    /// of large transfers glibc keeps the freed memory in its arenas; trimming brings RSS back
    /// to the idle baseline. `0s` disables.
    #[serde(with = "humantime_serde")]
    pub memory_trim_interval: Duration,
    /// New agent connections (registrations) allowed per token per minute; 0 disables. Held
    /// in Redis in cluster mode, so it holds across replicas.
    pub connect_rate_limit_per_minute: u32,

    /// gRPC services behind the gateway that agents (and any client holding an agent token)
    /// call over the agent port, routed by service-name prefix (`[[backends]]` in TOML,
    /// `--backend PREFIX=URL` on the command line). Empty: the port serves only its own
    /// services.
    pub backends: Vec<BackendConfig>,
}

/// One gateway-side gRPC service (or group of services) that agents call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// What callers, logs and metrics call this backend (never its address). Default: the
    /// first service prefix without its trailing dot.
    pub name: String,
    /// Prefixes of full service names (`runner.jobs.v1.` or `runner.jobs.v1.JobRouter`); a
    /// call goes to the backend with the longest matching prefix.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub services: Vec<String>,
    /// `http://host:port` (HTTP/2 without TLS) or `https://host:port` (TLS with ALPN h2);
    /// without a port, 80 and 443.
    pub url: String,
    /// CA certificates (PEM) that sign an `https://` backend's certificate; default: the
    /// system's trust store. Refused on an `http://` backend.
    pub ca_cert: Option<PathBuf>,
    /// Name checked against an `https://` backend's certificate; default: the URL's host.
    /// Refused on an `http://` backend.
    pub tls_server_name: Option<String>,
    /// Deadline for the TCP connection and the TLS and HTTP/2 handshakes to the backend, up
    /// to its answer to a first PING (so a backend that accepts and stays silent fails here).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Calls one agent name may have in flight to this backend at once; more get
    /// RESOURCE_EXHAUSTED. A long poll holds its place until it ends. 0: no limit.
    pub max_calls_per_agent: u32,
    /// A call still running after this long is ended by the gateway with UNAVAILABLE, which
    /// gRPC clients retry, and cancelled at the backend. Set it below the idle and call
    /// timeouts of the proxies in front (docs/backends.md) so long polls end on the
    /// gateway's terms. `0s`: no limit.
    #[serde(with = "humantime_serde")]
    pub max_call_duration: Duration,
    /// Calls carried at once by one HTTP/2 connection to the backend, at least 1; past it
    /// the gateway opens another (servers commonly allow 100 streams per connection).
    pub max_calls_per_connection: u32,
    /// How often the gateway looks at each connection to the backend: one with calls in
    /// flight gets a PING (no answer within 20 s closes it), one that carried no call since
    /// the last look is closed. gRPC servers allow one PING per 5 minutes by default and
    /// close connections PINGed more often; lower it only for a backend configured to
    /// permit that. `0s`: never; otherwise at least 1 s.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A file holding a secret: when set, each call carries `agentgate-identity-signature`,
    /// an HMAC-SHA256 over the identity metadata, the method and a timestamp, so the backend
    /// can check that the identity came from the gateway (docs/backends.md).
    pub signing_secret_file: Option<PathBuf>,
}

impl BackendConfig {
    /// The configured name, or the default one: the first service prefix without its
    /// trailing dot (the URL when there is no prefix, which the gateway then refuses).
    pub fn effective_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        self.services
            .first()
            .map(|p| p.trim_end_matches('.').to_string())
            .unwrap_or_else(|| self.url.clone())
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            services: Vec::new(),
            url: String::new(),
            ca_cert: None,
            tls_server_name: None,
            connect_timeout: Duration::from_secs(5),
            max_calls_per_agent: 100,
            max_call_duration: Duration::ZERO,
            max_calls_per_connection: 100,
            keepalive_interval: Duration::from_secs(300),
            signing_secret_file: None,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8150".parse().unwrap(),
            cleartext_listen: None,
            admin_listen: "127.0.0.1:8151".parse().unwrap(),
            api_listen: "127.0.0.1:8154".parse().unwrap(),
            tls_cert: None,
            tls_key: None,
            api_tls_cert: None,
            api_tls_key: None,
            tokens: PathBuf::from("agentgate-tokens.json"),
            token_check_interval: Duration::from_secs(2),
            tokens_may_be_missing: false,
            certificate_check_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 18_000,
            listen_backlog: 4096,
            auth_timeout: Duration::from_secs(10),
            max_unauthenticated_calls_per_connection: 4,
            max_refused_calls_before_auth: 16,
            max_connections_per_source: 5_000,
            max_handshakes_per_source: 64,
            max_bytes_before_auth: 1024 * 1024,
            max_bytes_before_auth_total: 64 * 1024 * 1024,
            max_streams_before_auth: 100,
            proxy_protocol_from: vec![],
            max_concurrent_streams: 520,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            max_message_size_session: 16 * 1024,
            max_message_size_health: 4 * 1024,
            max_message_size_reflection: 64 * 1024,
            max_message_size_tunnel: 4 * 1024 * 1024,
            api_max_connections: 4096,
            admin_max_connections: 256,
            internal_max_connections: 4096,
            http_header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(120),
            ws_max_message_size: 10 * 1024 * 1024,
            ws_read_buffer_size: 8 * 1024,
            keepalive_interval: Duration::from_secs(50),
            keepalive_timeout: Duration::from_secs(20),
            min_client_ping_interval: Duration::from_secs(20),
            stream_heartbeat_interval: Duration::from_secs(20),
            max_connection_age: Duration::from_secs(2 * 3600),
            max_connection_age_grace: Duration::from_secs(30 * 60),
            shutdown_grace: Duration::from_secs(30),
            agent_reconnect_wait: Duration::from_secs(2),
            tunnel_wait: Duration::from_secs(10),
            tunnel_descriptor_timeout: Duration::from_secs(10),
            tunnel_chunk_size: 64 * 1024,
            stalled_caller_timeout: Duration::from_secs(60),
            http2_stream_window: 2 * 1024 * 1024,
            http2_connection_window: 64 * 1024 * 1024,
            redis: None,
            internal_listen: "127.0.0.1:8155".parse().unwrap(),
            internal_url: None,
            internal_secret_file: None,
            internal_token_validity: Duration::from_secs(5),
            internal_tls_cert: None,
            internal_tls_key: None,
            internal_ca_cert: None,
            internal_require_client_cert: false,
            internal_peers: vec![],
            internal_connect_timeout: Duration::from_secs(2),
            internal_call_timeout: Duration::from_secs(3),
            internal_first_byte_timeout: Duration::from_secs(300),
            internal_peer_down_for: Duration::from_secs(10),
            registry_ttl: Duration::from_secs(5 * 60),
            registry_refresh_interval: Duration::from_secs(4 * 60),
            redis_timeout: Duration::from_secs(1),
            redis_ca_cert: None,
            redis_sentinel_username: None,
            redis_sentinel_password_file: None,
            redis_required_at_start: false,
            redis_startup_timeout: Duration::from_secs(10),
            connect_rate_limit_per_minute: 600,
            memory_trim_interval: Duration::from_secs(10),
            backends: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// `proxy_protocol_from` as networks: a bare address is a network of one.
    pub fn proxy_protocol_networks(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.proxy_protocol_from
            .iter()
            .map(|e| {
                let e = e.trim();
                e.parse::<ipnet::IpNet>()
                    .or_else(|_| e.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "proxy_protocol_from entry {e:?} is neither an address (10.0.0.5) nor \
                             a CIDR (10.0.0.0/24)"
                        )
                    })
            })
            .collect()
    }
}

/// A list of strings from a file (a TOML array) or from one line of text, as environment
/// variables and `--set` give it: `a,b,c`, spaces around items ignored, empty items dropped.
fn list_or_comma_separated<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrText::deserialize(d)? {
        ListOrText::List(items) => items,
        ListOrText::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_its_doc_comment() {
        // The derive refuses undocumented fields; this pins that the names line up with serde's.
        let table = toml::Table::try_from(GatewayConfig::default()).unwrap();
        for key in table.keys() {
            assert!(
                GatewayConfig::get_field_docs(key).is_ok(),
                "{key} has no doc comment"
            );
        }
        assert_eq!(
            GatewayConfig::FIELD_NAMES.len(),
            GatewayConfig::FIELD_DOCS.len()
        );
    }

    #[test]
    fn lists_read_from_arrays_and_from_comma_separated_text() {
        let c: GatewayConfig =
            toml::from_str("internal_peers = \"10.0.0.0/8, gw-2.internal,\"").unwrap();
        assert_eq!(c.internal_peers, ["10.0.0.0/8", "gw-2.internal"]);
        let c: GatewayConfig = toml::from_str("internal_peers = [\"a\", \"b\"]").unwrap();
        assert_eq!(c.internal_peers, ["a", "b"]);
        assert!(toml::from_str::<GatewayConfig>("internal_peers = 7").is_err());
    }
}
