//! The connection manager: choose a transport, dial, register, keep the tunnel pool running,
//! notice the end, back off, and do it again.
//!
//! With a ws/wss URL in `auto` mode the agent first probes direct gRPC on the same host and
//! port (h2 via ALPN for wss, h2c for ws). The probe counts only if the health RPC and the
//! authenticated registration both succeed within `probe_timeout`; otherwise the agent uses the
//! WebSocket URL as given, and re-probes every `reprobe_interval` (jittered) and on every
//! reconnect. Moving over starts the new connection first and retires the old one after:
//! requests in flight on the old connection finish there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate_proto::v1::agent_session_client::AgentSessionClient;
use agentgate_proto::v1::{session_event, RegisterRequest, SessionEvent};
use agentgate_transport::tls::{client_config, ServerVerification};
use agentgate_transport::{
    dial, DialError, DialSettings, GoawayWatch, ProxyConfig, ServerUrl, TransportKind, WsSettings,
};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Streaming};

use crate::backoff::{jittered, Backoff};
use crate::config::{AgentConfig, TransportMode};
use crate::local_listener::BackendCaller;
use crate::pool::run_pool;
use crate::upstream::Upstreams;

/// Each request body the gateway streams to this agent may wait unread in it up to
/// [`TUNNEL_STREAM_WINDOW`] (an upstream that reads slowly); all of them together up to
/// [`TUNNEL_CONNECTION_WINDOW`]. Once stalled requests fill the latter, every other request
/// through this agent waits, so it is many stream windows, not two (allocated only while
/// data waits). The gateway's `http2_connection_window` is the same for the other direction.
const TUNNEL_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const TUNNEL_CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// After the gateway ended the session as planned (a restart, max connection age), the most
/// the agent waits between attempts until one succeeds: with `backoff_max` (60 s) an agent
/// whose gateway drained for 30 s came back 65 s after the SIGTERM.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Adds the agent's credentials and extra metadata to every call.
pub struct CallCredentials {
    /// `Bearer <token>`; replaced when the token file changes (see [`TokenFile`]).
    authorization: std::sync::RwLock<http::HeaderValue>,
    pub instance_id: String,
    /// Checked at start to be valid ASCII gRPC metadata.
    extra: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl CallCredentials {
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut headers = http::HeaderMap::new();
        self.apply(&mut headers);
        Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(headers),
            Default::default(),
            msg,
        )
    }

    /// Puts the current token on a WebSocket upgrade's headers.
    fn apply_to_upgrade(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            http::header::AUTHORIZATION,
            self.authorization.read().unwrap().clone(),
        );
    }

    /// Puts the agent's token (replacing any other) and extra metadata on a call's headers.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            http::header::AUTHORIZATION,
            self.authorization.read().unwrap().clone(),
        );
        for (k, v) in &self.extra {
            headers.append(k.clone(), v.clone());
        }
    }
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP/2 to {url} failed: {source}")]
    Http2 {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("the gateway rejected the agent token: {0}")]
    Unauthenticated(String),
    #[error(
        "{call} failed: {} ({})",
        status.message(),
        agentgate_proto::status_code::code_name(status.code())
    )]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    #[error(
        "nothing at {url} answered HTTP/2 without TLS ({detail}); if the gateway has TLS on this \
         port, use grpcs:// (or wss://); if not, it may be refusing connections (at its \
         max_connections, or too many from this address: its log says why), or a TCP load \
         balancer in front of it has no live gateway behind it"
    )]
    NotCleartextHttp2 { url: String, detail: String },
    #[error(
        "{url} answered HTTP {status} instead of taking the gRPC call: a proxy in front, or \
         something that is not the gateway{}",
        agentgate_transport::refusal_hint(*status)
    )]
    HttpAnswer { url: String, status: u16 },
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// One live, registered connection to the gateway.
pub(crate) struct Connection {
    pub(crate) transport: TransportKind,
    /// What the gateway said at registration: the agent's name and this connection's id.
    pub(crate) agent: String,
    pub(crate) connection_id: String,
    /// The HTTP/2 connection itself, for local calls in sidecar mode.
    channel: Channel,
    url: ServerUrl,
    /// None once retired.
    session: Option<Streaming<SessionEvent>>,
    pool_stop: CancellationToken,
    /// Cancelled by the pool when the connection stops taking new streams.
    broken: CancellationToken,
    since: Instant,
}

/// What a session can tell the agent.
enum SessionSignal {
    /// The gateway is retiring this connection: connect anew, then let this one go.
    Draining(String),
    /// The session is over; `planned` when the gateway ended it cleanly (max age, shutdown).
    Ended { why: String, planned: bool },
}

impl Connection {
    /// Waits for the next thing the session says: draining, or its end. Cancel-safe.
    async fn next_signal(&mut self) -> SessionSignal {
        loop {
            let Some(session) = self.session.as_mut() else {
                return SessionSignal::Ended {
                    why: "the connection was retired".into(),
                    planned: true,
                };
            };
            match session.message().await {
                Ok(Some(SessionEvent {
                    event: Some(session_event::Event::Draining(d)),
                })) => return SessionSignal::Draining(d.reason),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return SessionSignal::Ended {
                        why: "the gateway ended the session".into(),
                        planned: true,
                    }
                }
                Err(s) => {
                    return SessionSignal::Ended {
                        why: session_failure(&s),
                        planned: false,
                    }
                }
            }
        }
    }

    /// Retires this connection: its session ends (which tells the gateway to send no new
    /// requests down its tunnels), the pool opens no more tunnels, idle ones close once the
    /// gateway has ended them, and busy ones finish their request.
    fn retire(&mut self) {
        self.session = None;
        self.pool_stop.cancel();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.pool_stop.cancel();
    }
}

/// Everything the manager needs, built once.
pub(crate) struct Dialer {
    cfg: AgentConfig,
    dial: DialSettings,
    auth: Arc<CallCredentials>,
    upstreams: Arc<Upstreams>,
    /// The token file, if the token came from one.
    token_file: Option<std::sync::Mutex<WatchedFile>>,
    /// The CA bundle (`--ca-cert`), and the TLS configuration made from it now.
    ca_file: Option<std::sync::Mutex<WatchedFile>>,
    tls: std::sync::RwLock<Option<Arc<rustls::ClientConfig>>>,
}

/// A file the agent re-reads before a connection when it changed since the last read: its
/// token file (a rotated token is used from the next connection on; a revoked token's session
/// ends and the agent reconnects with the new one) and its CA bundle (a renewed CA), without
/// a restart.
struct WatchedFile {
    path: std::path::PathBuf,
    stamp: Option<(std::time::SystemTime, u64)>,
}

impl WatchedFile {
    fn new(path: std::path::PathBuf) -> std::sync::Mutex<Self> {
        std::sync::Mutex::new(Self {
            stamp: file_stamp(&path),
            path,
        })
    }

    /// Whether the file changed since the last call (or since it was first seen).
    fn changed(&mut self) -> bool {
        let now = file_stamp(&self.path);
        let changed = now != self.stamp;
        self.stamp = now;
        changed
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn direct_variant(url: &ServerUrl) -> ServerUrl {
    match url.scheme {
        TransportKind::Ws => url.with_scheme(TransportKind::Grpc),
        TransportKind::Wss => url.with_scheme(TransportKind::Grpcs),
        _ => url.clone(),
    }
}

impl Dialer {
    pub(crate) fn new(cfg: AgentConfig) -> anyhow::Result<Self> {
        let verify = if cfg.insecure_skip_tls_verify {
            tracing::warn!(
                "--insecure-skip-tls-verify: the gateway's certificate is NOT verified; \
                 anyone on the path can impersonate it"
            );
            ServerVerification::InsecureSkipVerify
        } else if let Some(ca) = &cfg.ca_cert {
            ServerVerification::CaFile(ca.clone())
        } else {
            ServerVerification::SystemRoots
        };
        let needs_tls = cfg.server.scheme.is_tls();
        let tls = if needs_tls {
            Some(Arc::new(client_config(&verify)?))
        } else {
            None
        };
        let bearer = format!("Bearer {}", cfg.token);
        let authorization = http::HeaderValue::from_str(&bearer)
            .map_err(|_| anyhow::anyhow!("the agent token contains invalid characters"))?;
        let mut upgrade_headers = http::HeaderMap::new();
        upgrade_headers.insert(http::header::AUTHORIZATION, authorization.clone());
        let mut extra = vec![];
        for (k, v) in &cfg.headers {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| anyhow::anyhow!("invalid header name {k:?}"))?;
            let value = http::HeaderValue::from_str(v)
                .map_err(|_| anyhow::anyhow!("invalid value for header {k:?}"))?;
            AsciiMetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| anyhow::anyhow!("header {k:?} cannot be gRPC metadata"))?;
            AsciiMetadataValue::try_from(v.as_str())
                .map_err(|_| anyhow::anyhow!("value of header {k:?} cannot be gRPC metadata"))?;
            upgrade_headers.append(name.clone(), value.clone());
            extra.push((name, value));
        }
        let proxy = cfg.proxy.as_deref().map(ProxyConfig::parse).transpose()?;
        let dial = DialSettings {
            tls,
            server_name: cfg.tls_server_name.clone(),
            upgrade_headers,
            ws: WsSettings::default(),
            connect_timeout: cfg.connect_timeout,
            proxy,
            proxy_from_env: true,
            local_ip: cfg.local_ip,
        };
        let auth = Arc::new(CallCredentials {
            authorization: std::sync::RwLock::new(authorization),
            instance_id: cfg.instance_id.clone(),
            extra,
        });
        let upstreams = Arc::new(Upstreams::new(&cfg)?);
        let token_file = cfg.token_file.clone().map(WatchedFile::new);
        let ca_file = match (&verify, needs_tls) {
            (ServerVerification::CaFile(path), true) => Some(WatchedFile::new(path.clone())),
            _ => None,
        };
        let tls = std::sync::RwLock::new(dial.tls.clone());
        Ok(Self {
            cfg,
            dial,
            auth,
            upstreams,
            token_file,
            ca_file,
            tls,
        })
    }

    /// Reads the CA bundle again if it changed; one that does not load is logged and the
    /// previous one kept.
    fn reread_ca_file(&self) {
        let Some(file) = &self.ca_file else {
            return;
        };
        let mut file = file.lock().unwrap();
        if !file.changed() {
            return;
        }
        match client_config(&ServerVerification::CaFile(file.path.clone())) {
            Ok(cfg) => {
                *self.tls.write().unwrap() = Some(Arc::new(cfg));
                tracing::info!(path = %file.path.display(), "CA bundle changed: used from this connection on");
            }
            Err(e) => {
                tracing::warn!(path = %file.path.display(), "cannot load the changed CA bundle ({e}); keeping the previous one")
            }
        }
    }

    /// Reads the token file again if it changed since it was last read; a file that cannot
    /// be read or holds no usable token is logged and the previous token kept.
    fn reread_token_file(&self) {
        let Some(file) = &self.token_file else {
            return;
        };
        let mut file = file.lock().unwrap();
        if !file.changed() {
            return;
        }
        let token = match std::fs::read_to_string(&file.path) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                tracing::warn!(path = %file.path.display(), "cannot re-read the token file ({e}); keeping the previous token");
                return;
            }
        };
        match http::HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(v) if !token.is_empty() => {
                *self.auth.authorization.write().unwrap() = v;
                tracing::info!(path = %file.path.display(), "token file changed: the new token is used from this connection on");
            }
            _ => {
                tracing::warn!(path = %file.path.display(), "the token file holds no usable token; keeping the previous one")
            }
        }
    }

    /// An HTTP/2 channel over an already-dialled stream. The connector hands the stream out
    /// once, so a broken connection is never silently re-dialled by tonic: the manager
    /// notices and dials again itself (with backoff and transport choice).
    async fn channel_over(
        &self,
        io: agentgate_transport::BoxedIo,
        url: &ServerUrl,
    ) -> Result<Channel, ConnectError> {
        let slot = Arc::new(std::sync::Mutex::new(Some(io)));
        let endpoint = Endpoint::from_shared(format!("http://{}", url.authority()))
            .map_err(|e| ConnectError::Protocol(e.to_string()))?
            .http2_keep_alive_interval(self.cfg.keepalive_interval)
            .keep_alive_timeout(self.cfg.keepalive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(TUNNEL_STREAM_WINDOW)
            .initial_connection_window_size(TUNNEL_CONNECTION_WINDOW);
        let connector = tower::service_fn(move |_: http::Uri| {
            let io = slot.lock().unwrap().take();
            async move {
                io.map(TokioIo::new).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotConnected, "agent connection closed")
                })
            }
        });
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|source| ConnectError::Http2 {
                url: url.to_string(),
                source,
            })
    }

    /// Dials `url`, checks health when probing, registers, and starts the tunnel pool.
    async fn establish(
        &self,
        url: &ServerUrl,
        probe: bool,
        deadline: Duration,
    ) -> Result<Connection, ConnectError> {
        let goaway = CancellationToken::new();
        let attempt = async {
            self.reread_token_file();
            self.reread_ca_file();
            let mut settings = self.dial.clone();
            settings.tls = self.tls.read().unwrap().clone();
            self.auth.apply_to_upgrade(&mut settings.upgrade_headers);
            let io = dial(url, &settings).await?;
            // A GOAWAY from the gateway or a proxy in between means: move to a new connection.
            let io: agentgate_transport::BoxedIo = Box::new(GoawayWatch::new(io, goaway.clone()));
            let channel = self.channel_over(io, url).await?;
            if probe {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                let req = tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                };
                health
                    .check(req)
                    .await
                    .map_err(|status| ConnectError::Call {
                        call: "health check",
                        status,
                    })?;
            }
            let req = self.auth.request(RegisterRequest {
                instance_id: self.cfg.instance_id.clone(),
                version: self.cfg.version.clone(),
                hostname: self.cfg.hostname.clone(),
            });
            let mut session = AgentSessionClient::new(channel.clone())
                .register(req)
                .await
                .map_err(call_error)?
                .into_inner();
            let registered = match session.message().await.map_err(call_error)? {
                Some(SessionEvent {
                    event: Some(session_event::Event::Registered(r)),
                }) => r,
                other => {
                    return Err(ConnectError::Protocol(format!(
                        "expected a registered event first, got {other:?}"
                    )))
                }
            };
            Ok((channel, session, registered))
        };
        let (channel, session, registered) = tokio::time::timeout(deadline, attempt)
            .await
            .map_err(|_| ConnectError::Timeout {
                what: format!("connecting to {url}"),
                after: deadline,
            })?
            .map_err(|e| match e {
                // An HTTP answer that is not gRPC (a proxy's 502 page, a 505 from the gateway
                // behind a proxy that downgraded the call): tonic words it as a decoding
                // error ("invalid compression flag: 60") or a missing grpc-status.
                ConnectError::Call { status, .. } if http_status_of(&status).is_some() => {
                    ConnectError::HttpAnswer {
                        url: url.to_string(),
                        status: http_status_of(&status).unwrap_or_default(),
                    }
                }
                // h2c to a TLS port: the server answers our preface with TLS (or closes),
                // and the first call fails with a bare transport error whose code depends on
                // timing (UNAVAILABLE, UNKNOWN, INTERNAL, CANCELLED). A gateway's own refusals
                // start with "agentgate:" and stay as they are.
                ConnectError::Call { status, .. }
                    if url.scheme == TransportKind::Grpc
                        && !status.message().starts_with("agentgate") =>
                {
                    ConnectError::NotCleartextHttp2 {
                        url: url.to_string(),
                        detail: status.message().to_string(),
                    }
                }
                ConnectError::Http2 { source, .. } if url.scheme == TransportKind::Grpc => {
                    ConnectError::NotCleartextHttp2 {
                        url: url.to_string(),
                        detail: source.to_string(),
                    }
                }
                other => other,
            })?;
        let transport = url.scheme;
        tracing::info!(
            url = %url,
            transport = %transport,
            agent = %registered.agent_name,
            conn = %registered.connection_id,
            "connected and registered"
        );
        let pool_stop = CancellationToken::new();
        // Cancelled by a GOAWAY, or by the pool when the connection takes no new streams.
        let broken = goaway;
        tokio::spawn(run_pool(
            channel.clone(),
            self.auth.clone(),
            self.cfg.pool.clone(),
            self.upstreams.clone(),
            pool_stop.clone(),
            broken.clone(),
        ));
        Ok(Connection {
            transport,
            agent: registered.agent_name.clone(),
            connection_id: registered.connection_id.clone(),
            channel,
            url: url.clone(),
            session: Some(session),
            pool_stop,
            broken,
            since: Instant::now(),
        })
    }

    /// Connects with the configured transport policy. Returns the connection and whether it
    /// is a fallback (so the caller re-probes).
    async fn connect_preferred(&self) -> Result<(Connection, bool), ConnectError> {
        self.connect_explained()
            .await
            .map(|(c, fallback)| (c, fallback.is_some()))
    }

    /// [`Self::connect_preferred`], saying why the direct-gRPC probe failed when the
    /// connection is the WebSocket fallback (for `agent --check`).
    pub(crate) async fn connect_explained(
        &self,
    ) -> Result<(Connection, Option<String>), ConnectError> {
        let server = &self.cfg.server;
        let full = self.cfg.connect_timeout * 4;
        match (self.cfg.transport, server.scheme.is_websocket()) {
            (TransportMode::Auto, true) => {
                let direct = direct_variant(server);
                match self.establish(&direct, true, self.cfg.probe_timeout).await {
                    Ok(c) => Ok((c, None)),
                    Err(e @ ConnectError::Unauthenticated(_)) => Err(e),
                    // Nothing listens at that address (the gateway is down, or restarting),
                    // or the proxy there cannot reach the gateway: the WebSocket fallback
                    // goes the same way, so it would only fail again (or stay on WebSocket
                    // once the gateway is back), and a line about HTTP/2 would mislead.
                    Err(e @ ConnectError::Dial(DialError::Connect { .. })) => Err(e),
                    Err(
                        e @ ConnectError::HttpAnswer {
                            status: 502..=504, ..
                        },
                    ) => Err(e),
                    Err(e) => {
                        tracing::info!(probe = %direct, "direct gRPC probe failed ({e}); falling back to {server}");
                        let why = format!("the direct gRPC probe of {direct} failed: {e}");
                        Ok((self.establish(server, false, full).await?, Some(why)))
                    }
                }
            }
            (TransportMode::Grpc, true) => Ok((
                self.establish(&direct_variant(server), false, full).await?,
                None,
            )),
            _ => Ok((self.establish(server, false, full).await?, None)),
        }
    }
}

/// Why a session ended with an error, in words: a connection closed under it (HTTP/2's
/// "error reading a body from connection") is what a proxy's reload or a gateway's restart
/// looks like from here, and the agent reconnects.
fn session_failure(status: &tonic::Status) -> String {
    let m = status.message();
    let closed = [
        "error reading a body from connection",
        "connection closed",
        "connection reset",
        "broken pipe",
    ]
    .iter()
    .any(|w| m.to_ascii_lowercase().contains(w));
    if closed {
        format!(
            "the connection closed under the session ({m}): the gateway or a proxy in between \
             closed it (a restart, a reload?)"
        )
    } else {
        format!("session failed: {m}")
    }
}

/// The HTTP status of an answer that was not gRPC, from tonic's words for it.
fn http_status_of(status: &tonic::Status) -> Option<u16> {
    let m = status.message();
    let after = [
        "while receiving response with status: ",
        "mapped from HTTP status code ",
    ]
    .iter()
    .find_map(|marker| m.find(marker).map(|i| &m[i + marker.len()..]))?;
    after.get(..3)?.parse().ok().filter(|s| *s != 200)
}

fn call_error(status: tonic::Status) -> ConnectError {
    if status.code() == tonic::Code::Unauthenticated {
        ConnectError::Unauthenticated(status.message().to_string())
    } else {
        ConnectError::Call {
            call: "registration",
            status,
        }
    }
}

/// Runs the agent until `stop` is cancelled.
pub async fn run(cfg: AgentConfig, stop: CancellationToken) -> anyhow::Result<()> {
    Agent::new(cfg)?.run(stop).await
}

/// An agent, set up but not yet running: [`Agent::backend_caller`] hands out a way to call
/// the gateway's backends over its connection (what `--local-listen` serves, and what a
/// process embedding the agent uses directly).
pub struct Agent {
    ctx: Dialer,
    current: tokio::sync::watch::Sender<Option<Channel>>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> anyhow::Result<Self> {
        Ok(Self {
            ctx: Dialer::new(cfg)?,
            current: tokio::sync::watch::channel(None).0,
        })
    }

    pub fn backend_caller(&self) -> BackendCaller {
        BackendCaller::new(self.current.subscribe(), self.ctx.auth.clone())
    }

    /// Runs the agent until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        run_agent(self, stop).await
    }
}

async fn run_agent(agent: Agent, stop: CancellationToken) -> anyhow::Result<()> {
    let caller = agent.backend_caller();
    let Agent { ctx, current } = agent;
    let cfg = &ctx.cfg;
    tracing::info!(
        server = %cfg.server,
        instance = %cfg.instance_id,
        upstreams = %ctx.upstreams.http_names().join(","),
        grpc_upstream = ctx.upstreams.has_grpc(),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "agent starting"
    );
    // Sidecar mode: local calls take whichever connection is current.
    let local = match cfg.local_listen {
        None => None,
        Some(addr) => {
            let listener = crate::local_listener::bind(addr).await?;
            Some(tokio::spawn(crate::local_listener::serve(
                listener,
                caller,
                stop.clone(),
            )))
        }
    };
    let status = Arc::new(crate::status::AgentStatus::default());
    let status_endpoint = match cfg.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = crate::status::bind(addr).await?;
            Some(tokio::spawn(crate::status::serve(
                listener,
                status.clone(),
                stop.clone(),
            )))
        }
    };
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
    while !stop.is_cancelled() {
        match ctx.connect_preferred().await {
            Err(e) => match &e {
                ConnectError::Unauthenticated(_) => {
                    tracing::error!("{e}; check --token-file or AGENTGATE_TOKEN")
                }
                _ => tracing::warn!("cannot connect: {e}"),
            },
            Ok((mut conn, mut on_fallback)) => {
                backoff.clear_limit();
                current.send_replace(Some(conn.channel.clone()));
                status.connected(conn.transport);
                let (end, planned) = loop {
                    let reprobe = jittered(cfg.reprobe_interval, 0.2);
                    let broken = conn.broken.clone();
                    // Where to move, if anywhere: every move is make before break (the new
                    // connection registers while the old one still serves its requests in
                    // flight), and happens in one place below.
                    let moved: Option<(Connection, bool)> = tokio::select! {
                        signal = conn.next_signal() => match signal {
                            SessionSignal::Draining(reason) => {
                                tracing::info!(%reason, "the gateway is draining this connection; connecting anew");
                                ctx.connect_preferred().await.map_err(|e| {
                                    tracing::warn!("could not connect anew while draining ({e}); staying until the session ends");
                                }).ok()
                            }
                            SessionSignal::Ended { why, planned } => break (why, planned),
                        },
                        _ = broken.cancelled() => {
                            tracing::info!("the connection takes no new streams (GOAWAY); connecting anew");
                            // Local calls wait for the new connection instead of failing on
                            // this one (`local_listener` waits while there is none).
                            current.send_replace(None);
                            match ctx.connect_preferred().await {
                                Ok(new) => Some(new),
                                // A GOAWAY is a planned end too (a gateway draining for a
                                // restart, a proxy reloading): the next attempts stay close.
                                Err(e) => break (format!("connection unusable and reconnecting failed: {e}"), true),
                            }
                        }
                        _ = stop.cancelled() => break ("agent stopping".to_string(), true),
                        _ = tokio::time::sleep(reprobe), if on_fallback => {
                            let direct = direct_variant(&cfg.server);
                            match ctx.establish(&direct, true, cfg.probe_timeout).await {
                                Ok(new) => {
                                    tracing::info!(from = %conn.url, to = %new.url, "re-probe succeeded: moving to direct gRPC");
                                    Some((new, false))
                                }
                                Err(e) => {
                                    tracing::info!(probe = %direct, "re-probe failed, staying on {}: {e}", conn.transport);
                                    None
                                }
                            }
                        }
                    };
                    if let Some((new, fallback)) = moved {
                        current.send_replace(Some(new.channel.clone()));
                        status.connected(new.transport);
                        conn.retire();
                        conn = new;
                        on_fallback = fallback;
                    }
                };
                let lived = conn.since.elapsed();
                tracing::info!(transport = %conn.transport, lived_ms = lived.as_millis() as u64, "disconnected: {end}");
                current.send_replace(None);
                status.disconnected();
                conn.retire();
                // A clean end (max age, shutdown) is not a failure: reconnect within the first
                // backoff step, jittered, and while the gateway restarts (its port refuses for
                // its whole drain, `shutdown_grace`) try again at most
                // RESTART_BACKOFF_MAX apart, not up to `backoff_max`.
                if planned {
                    backoff.limit_until_reset(RESTART_BACKOFF_MAX);
                } else if lived >= cfg.backoff_reset_after {
                    backoff.reset();
                }
            }
        }
        if stop.is_cancelled() {
            break;
        }
        let delay = backoff.next_delay();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    if let Some(local) = local {
        let _ = local.await;
    }
    if let Some(endpoint) = status_endpoint {
        let _ = endpoint.await;
    }
    tracing::info!("agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonic_words_for_an_http_answer_give_its_status() {
        let flag = tonic::Status::internal(
            "protocol error: received message with invalid compression flag: 60 (valid flags \
             are 0 and 1) while receiving response with status: 502 Bad Gateway",
        );
        assert_eq!(http_status_of(&flag), Some(502));
        let missing = tonic::Status::unavailable(
            "grpc-status header missing, mapped from HTTP status code 503",
        );
        assert_eq!(http_status_of(&missing), Some(503));
        assert_eq!(
            http_status_of(&tonic::Status::unavailable("agentgate: busy")),
            None
        );
        let e = ConnectError::HttpAnswer {
            url: "grpcs://gw:443".into(),
            status: 505,
        };
        assert!(e.to_string().contains("grpc_pass, not proxy_pass"), "{e}");
    }

    #[test]
    fn a_connection_closed_under_the_session_is_said_so() {
        let closed =
            tonic::Status::unknown("h2 protocol error: error reading a body from connection");
        assert!(session_failure(&closed).contains("a proxy in between closed it"));
        let other = tonic::Status::internal("agentgate: something else");
        assert_eq!(
            session_failure(&other),
            "session failed: agentgate: something else"
        );
    }
}
