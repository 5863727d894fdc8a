//! The agentgate gateway.
//!
//! It accepts agents on one port over four transports (see `agentgate-transport`), serves
//! their gRPC calls on ONE tonic server, parks the tunnel streams they open, and forwards
//! user requests from its API listener down those tunnels. Above the transport layer, the
//! transport is only a label on the connection, for logs and metrics.

mod admin;
mod api;
mod auth;
pub mod backends;
pub mod cluster;
pub mod config;
pub mod directory;
mod fd_limit;
mod guarded_body;
mod headers;
mod http_listener;
mod map_response;
mod memory;
pub mod metrics;
mod process_metrics;
mod reload;
mod router;
mod rpc_guard;
mod rpc_layer;
mod session;
mod session_events;
mod status_in_trailers;
pub mod tokens;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::agent_session_server::AgentSessionServer;
use agentgate_proto::v1::tunnel_server::TunnelServer;
use agentgate_transport::{
    bind_listener, serve_ingress, ConnMeta, ConnectionLimit, IngressSettings, WsSettings,
};
use anyhow::Context;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;
use directory::Directory;
use metrics::Metrics;
use tokens::TokenStore;
use tunnel::TunnelParking;

/// State shared by every part of the gateway.
pub struct Gateway {
    pub(crate) config: GatewayConfig,
    pub(crate) tokens: TokenStore,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) directory: Arc<Directory>,
    pub(crate) tunnels: Arc<TunnelParking>,
    /// Gateway-side gRPC services agents call (`[[backends]]`).
    pub(crate) backends: Arc<backends::Backends>,
    /// Cluster mode (`--redis`): the registry and the internal API client.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
    /// Per-token connect counts of the current minute (single-process mode).
    connects: std::sync::Mutex<(u64, std::collections::HashMap<String, u32>)>,
    /// Cancelled when shutdown begins (accepting stops, GOAWAY goes out): each session ends
    /// once its connection has written the GOAWAY, so that agents read the end as planned.
    /// A child of `shutdown`: cancelling that cancels this too.
    pub(crate) stopping: CancellationToken,
    /// The certificates this gateway serves, by listener, for the expiry gauge (set at start).
    pub(crate) served_certs: std::sync::OnceLock<
        Vec<(
            &'static str,
            Arc<agentgate_transport::cert_reload::ReloadableCert>,
        )>,
    >,
    /// Cancelled during shutdown once sessions had their chance to end: ends every remaining
    /// long-lived handler.
    pub(crate) shutdown: CancellationToken,
    ready: AtomicBool,
}

/// When an aged connection starts draining: its tunnels stop being used and its agent is
/// asked to reconnect, ahead of the GOAWAY at the full age. Jittered per connection between
/// 80% and 95% of the age, so connections made together (after a restart, say) do not all
/// rebalance at the same moment.
pub fn drain_point(age: Duration, conn_id: u64) -> Duration {
    // A multiplicative hash spreads consecutive ids over [0, 1).
    let spread = (conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    age.mul_f64(0.80 + 0.15 * spread)
}

/// How long after GOAWAY long-lived handlers on an aged connection end.
const LONG_POLL_END_DELAY: Duration = Duration::from_secs(2);

impl Gateway {
    /// Agent sessions registered here (for the demo and the admin API).
    pub fn agents(&self) -> Vec<directory::AgentRecord> {
        self.directory.list()
    }

    /// Tunnels of `agent` parked here right now.
    pub fn parked_tunnels(&self, agent: &str) -> usize {
        self.tunnels.idle_count(agent)
    }

    pub fn new(config: GatewayConfig) -> anyhow::Result<Arc<Self>> {
        let path = &config.tokens;
        anyhow::ensure!(
            config.tokens_may_be_missing || path.exists(),
            "the token store {} does not exist: create a token first (agentgate token create \
             --name NAME --tokens {}), fix the path, or set tokens_may_be_missing = true to start \
             without one",
            path.display(),
            path.display()
        );
        let tokens = TokenStore::open(path)?;
        if tokens.is_empty() {
            tracing::warn!(path = %path.display(), "the token store holds no tokens: every agent and caller is refused until one is created");
        }
        config.proxy_protocol_networks()?;
        let backends = Arc::new(backends::Backends::new(&config.backends)?);
        let metrics = Arc::new(Metrics::default());
        let age = config.max_connection_age;
        let max_age = (!age.is_zero()).then_some(age);
        let cluster = match &config.redis {
            None => None,
            Some(url) => Some(cluster::setup::cluster_from_config(
                &config,
                url,
                metrics.clone(),
            )?),
        };
        let directory: Arc<Directory> = Arc::default();
        if let Some(c) = &cluster {
            let registry = c.registry.clone();
            let hook: directory::PresenceHook =
                Arc::new(move |name, up| registry.set_present(name, up));
            let _ = directory.presence.set(hook);
        }
        // Shutdown implies stopping, so that what waits for either waits for `stopping` first.
        let shutdown = CancellationToken::new();
        Ok(Arc::new(Self {
            backends,
            cluster,
            connects: std::sync::Mutex::default(),
            tunnels: Arc::new(TunnelParking::new(metrics.clone(), max_age)),
            tokens,
            metrics,
            directory,
            stopping: shutdown.child_token(),
            served_certs: std::sync::OnceLock::new(),
            shutdown,
            ready: AtomicBool::new(false),
            config,
        }))
    }

    /// Counts a new registration of `token_id`; false when over the per-minute limit.
    pub async fn allow_connect(&self, token_id: &str) -> bool {
        let limit = self.config.connect_rate_limit_per_minute;
        if limit == 0 {
            return true;
        }
        if let Some(c) = &self.cluster {
            // Shared across replicas; if Redis is down, fail open rather than lock agents out.
            if let Ok(allowed) = c.registry.allow_connect(token_id, limit).await {
                return allowed;
            }
        }
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / 60;
        let mut g = self.connects.lock().unwrap();
        if g.0 != minute {
            *g = (minute, Default::default());
        }
        let n = g.1.entry(token_id.to_string()).or_insert(0);
        *n += 1;
        *n <= limit
    }

    /// The limits and deadlines of one of the HTTP listeners (API, admin, internal).
    fn http_listener_settings(
        &self,
        name: &'static str,
        max_connections: usize,
    ) -> http_listener::HttpListenerSettings {
        let c = &self.config;
        http_listener::HttpListenerSettings {
            name,
            max_connections,
            handshake_timeout: c.handshake_timeout,
            header_read_timeout: c.http_header_read_timeout,
            idle_timeout: c.http_idle_timeout,
            http2_stream_window: c.http2_stream_window,
            http2_connection_window: c.http2_connection_window,
            shutdown_grace: c.shutdown_grace,
            proxy_protocol_from: Vec::new(),
        }
    }

    /// When the agent on `conn` is asked to move to a new connection (the moment its parked
    /// tunnels stop being used), or `None` when max age is off.
    pub fn drain_deadline(&self, conn: &ConnMeta) -> Option<tokio::time::Instant> {
        let age = self.config.max_connection_age;
        (!age.is_zero())
            .then(|| tokio::time::Instant::from_std(conn.opened_at + drain_point(age, conn.id)))
    }

    /// When the session on `conn` should end: a little after the connection's GOAWAY for max
    /// age, or never (far future) when max age is off.
    pub fn session_deadline(&self, conn: &ConnMeta) -> tokio::time::Instant {
        let age = self.config.max_connection_age;
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        let at = if age.is_zero() {
            conn.opened_at + far
        } else {
            conn.opened_at + age + LONG_POLL_END_DELAY
        };
        tokio::time::Instant::from_std(at)
    }
}

/// Addresses the gateway listens on.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub agent: SocketAddr,
    pub cleartext_agent: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub api: SocketAddr,
}

fn pair<'a>(
    what: &str,
    cert: &'a Option<std::path::PathBuf>,
    key: &'a Option<std::path::PathBuf>,
) -> anyhow::Result<Option<(&'a std::path::Path, &'a std::path::Path)>> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => anyhow::bail!("{what}: give both a certificate and a key, or neither"),
    }
}

/// Runs the gateway until `stop` is cancelled, then shuts down gracefully: stop accepting,
/// GOAWAY to every connection, end sessions and parked tunnels, let in-flight requests finish
/// within `shutdown_grace`. `on_bound` is told the listening addresses once they are bound.
pub async fn run(
    config: GatewayConfig,
    stop: CancellationToken,
    on_bound: impl FnOnce(BoundAddrs),
) -> anyhow::Result<()> {
    use agentgate_transport::cert_reload::ReloadableCert;
    use agentgate_transport::tls::{ALPN_H2, ALPN_HTTP1};
    let mut served = Vec::new();
    let mut tls_for = |listener: &'static str,
                       files: Option<(&std::path::Path, &std::path::Path)>|
     -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        let Some((cert, key)) = files else {
            return Ok(None);
        };
        let cert = ReloadableCert::load(cert, key).with_context(|| format!("{listener} TLS"))?;
        let cfg = cert.server_config(&[ALPN_H2, ALPN_HTTP1])?;
        served.push(reload::ServedCert { listener, cert });
        Ok(Some(cfg))
    };
    let agent_tls = tls_for(
        "agent port",
        pair("agent port TLS", &config.tls_cert, &config.tls_key)?,
    )?;
    let api_tls = tls_for(
        "API",
        pair("API TLS", &config.api_tls_cert, &config.api_tls_key)?,
    )?;
    fd_limit::prepare(config.max_connections);
    let gw = Gateway::new(config)?;
    if let Some(cert) = gw.cluster.as_ref().and_then(|c| c.internal_cert.clone()) {
        served.push(reload::ServedCert {
            listener: "internal API",
            cert,
        });
    }
    let _ = gw.served_certs.set(
        served
            .iter()
            .map(|c| (c.listener, c.cert.clone()))
            .collect(),
    );
    let watch_stop = CancellationToken::new();
    let watcher = tokio::spawn(reload::watch(gw.clone(), served, watch_stop.clone()));
    let result = run_with(gw, agent_tls, api_tls, stop, on_bound).await;
    watch_stop.cancel();
    let _ = watcher.await;
    result
}

/// Like [`run`], with TLS configurations already built (the demo generates its own).
pub async fn run_with(
    gw: Arc<Gateway>,
    agent_tls: Option<Arc<rustls::ServerConfig>>,
    api_tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
    on_bound: impl FnOnce(BoundAddrs),
) -> anyhow::Result<()> {
    let cfg = &gw.config;
    let agent_listener = bind_listener(cfg.listen, cfg.listen_backlog)
        .with_context(|| format!("cannot listen for agents on {}", cfg.listen))?;
    let admin_listener = bind_listener(cfg.admin_listen, 1024)
        .with_context(|| format!("cannot listen for admin on {}", cfg.admin_listen))?;
    let api_listener = bind_listener(cfg.api_listen, 1024)
        .with_context(|| format!("cannot listen for the API on {}", cfg.api_listen))?;
    let cleartext_listener = cfg
        .cleartext_listen
        .map(|a| {
            bind_listener(a, cfg.listen_backlog)
                .with_context(|| format!("cannot listen for cleartext agents on {a}"))
        })
        .transpose()?;
    let addrs = BoundAddrs {
        cleartext_agent: cleartext_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?,
        agent: agent_listener.local_addr()?,
        admin: admin_listener.local_addr()?,
        api: api_listener.local_addr()?,
    };
    tracing::info!(
        agent = %addrs.agent,
        agent_tls = agent_tls.is_some(),
        cleartext_agent = ?addrs.cleartext_agent,
        admin = %addrs.admin,
        api = %addrs.api,
        api_tls = api_tls.is_some(),
        "gateway listening"
    );
    warn_exposed_listeners(&addrs, agent_tls.is_some(), api_tls.is_some());

    let accept_stop = CancellationToken::new();
    let settings = IngressSettings {
        handshake_timeout: cfg.handshake_timeout,
        listen_backlog: cfg.listen_backlog,
        min_client_ping_interval: (!cfg.min_client_ping_interval.is_zero())
            .then_some(cfg.min_client_ping_interval),
        auth_timeout: (!cfg.auth_timeout.is_zero()).then_some(cfg.auth_timeout),
        max_connections_per_source: cfg.max_connections_per_source,
        max_handshakes_per_source: cfg.max_handshakes_per_source,
        max_bytes_before_auth: (cfg.max_bytes_before_auth > 0).then_some(cfg.max_bytes_before_auth),
        max_streams_before_auth: (cfg.max_streams_before_auth > 0)
            .then_some(cfg.max_streams_before_auth),
        proxy_protocol_from: cfg.proxy_protocol_networks()?,
        ws: WsSettings {
            read_buffer_size: cfg.ws_read_buffer_size,
            max_message_size: cfg.ws_max_message_size,
            ..WsSettings::default()
        },
    };
    let limit = ConnectionLimit::new(cfg.max_connections);
    let incoming = serve_ingress(
        agent_listener,
        agent_tls,
        settings.clone(),
        gw.metrics.clone(),
        limit.clone(),
        accept_stop.clone(),
    );
    type Incoming = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<Item = std::io::Result<agentgate_transport::ServerConn>>
                + Send,
        >,
    >;
    let mut incoming: Incoming = Box::pin(incoming);
    if let Some(l) = cleartext_listener {
        let more = serve_ingress(
            l,
            None,
            settings,
            gw.metrics.clone(),
            limit,
            accept_stop.clone(),
        );
        incoming = Box::pin(incoming.merge(more));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_serving::<AgentSessionServer<session::SessionService>>()
        .await;
    health
        .set_serving::<TunnelServer<tunnel::TunnelService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(agentgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Every service takes gzip-compressed requests: GitLab's agentk compresses every call
    // (`grpc.UseCompressor(gzip)`). Answers go out uncompressed, which every client accepts;
    // docs/compat.md has the measurement behind that choice.
    let gzip = tonic::codec::CompressionEncoding::Gzip;
    let health_service = health_service
        .accept_compressed(gzip)
        .max_decoding_message_size(cfg.max_message_size_health);
    let reflection_v1 = reflection()
        .build_v1()?
        .accept_compressed(gzip)
        .max_decoding_message_size(cfg.max_message_size_reflection);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .accept_compressed(gzip)
        .max_decoding_message_size(cfg.max_message_size_reflection);

    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .initial_stream_window_size(cfg.http2_stream_window)
        .initial_connection_window_size(cfg.http2_connection_window)
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(cfg.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(cfg.max_local_error_reset_streams));
    if !cfg.max_connection_age.is_zero() {
        builder = builder
            .max_connection_age(cfg.max_connection_age)
            .max_connection_age_grace(cfg.max_connection_age_grace);
    }
    let server_stop = CancellationToken::new();
    let server = builder
        .layer(status_in_trailers::StatusInTrailersLayer)
        .layer(rpc_layer::RpcObserveLayer {
            metrics: gw.metrics.clone(),
            backends: gw.backends.clone(),
        })
        .layer(rpc_guard::RpcGuardLayer { gw: gw.clone() })
        .layer(backends::route::BackendRouteLayer {
            backends: gw.backends.clone(),
            metrics: gw.metrics.clone(),
            directory: gw.directory.clone(),
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentSessionServer::new(session::SessionService { gw: gw.clone() })
                .accept_compressed(gzip)
                .max_decoding_message_size(gw.config.max_message_size_session),
        )
        .add_service(
            TunnelServer::new(tunnel::TunnelService { gw: gw.clone() })
                .accept_compressed(gzip)
                .max_decoding_message_size(gw.config.max_message_size_tunnel),
        )
        .serve_with_incoming_shutdown(incoming, server_stop.clone().cancelled_owned());
    let server = tokio::spawn(server);

    let admin_stop = CancellationToken::new();
    let admin_router = admin::router(gw.clone());
    let admin = tokio::spawn(http_listener::serve_http(
        admin_listener,
        None,
        gw.http_listener_settings("admin", gw.config.admin_max_connections),
        move |_peer| admin_router.clone(),
        admin_stop.clone(),
    ));
    let api_stop = CancellationToken::new();
    let api = tokio::spawn(api::serve_api(
        gw.clone(),
        api_listener,
        api_tls,
        api_stop.clone(),
    ));

    let mut background = tokio::task::JoinSet::new();
    let internal_stop = CancellationToken::new();
    let mut internal = None;
    if let Some(c) = gw.cluster.clone() {
        match c
            .registry
            .reachable_within(gw.config.redis_startup_timeout)
            .await
        {
            Ok(()) => tracing::info!("cluster mode: Redis answers"),
            Err(e) if gw.config.redis_required_at_start => anyhow::bail!(
                "Redis did not answer within {:?} ({e}); redis_required_at_start is on: start \
                 Redis, fix --redis, or turn the setting off to serve local agents without it",
                gw.config.redis_startup_timeout
            ),
            Err(e) => tracing::warn!(
                "Redis does not answer yet ({e}): serving local agents; this replica joins the \
                 cluster when Redis comes"
            ),
        }
        let l = bind_listener(gw.config.internal_listen, 1024).with_context(|| {
            format!(
                "cannot listen for the internal API on {}",
                gw.config.internal_listen
            )
        })?;
        tracing::info!(internal = %l.local_addr()?, advertised = %c.self_url, "cluster mode: internal API listening");
        internal = Some(tokio::spawn(cluster::internal_api::serve_internal(
            gw.clone(),
            l,
            internal_stop.clone(),
        )));
        // Stopped with the internal API; on its way out it removes this replica's entries.
        background.spawn(c.registry.clone().run_refresher(internal_stop.clone()));
        let gw2 = gw.clone();
        background.spawn(every(
            Duration::from_secs(5),
            internal_stop.clone(),
            move || {
                c.expire_reservations(&gw2.tunnels);
                c.signer.forget_expired();
            },
        ));
    }

    // Periodic work, in one set that shutdown stops and awaits.
    let background_stop = CancellationToken::new();
    if !gw.config.memory_trim_interval.is_zero() {
        background.spawn(every(
            gw.config.memory_trim_interval,
            background_stop.clone(),
            memory::trim,
        ));
    }
    {
        let gw = gw.clone();
        background.spawn(every(
            gw.config.stream_heartbeat_interval,
            background_stop.clone(),
            move || gw.tunnels.sweep(),
        ));
    }
    if !gw.config.token_check_interval.is_zero() {
        // Revocation bites within this interval even when nobody authenticates.
        let gw = gw.clone();
        background.spawn(every(
            gw.config.token_check_interval,
            background_stop.clone(),
            move || gw.tokens.check_now(),
        ));
    }

    gw.ready.store(true, Ordering::Relaxed);
    on_bound(addrs);
    stop.cancelled().await;

    // Graceful shutdown, in phases, each awaited.
    let grace = gw.config.shutdown_grace;
    tracing::info!(
        ?grace,
        "shutting down: no new connections, GOAWAY to every agent"
    );
    // 1. Take no new work: readiness fails, accepting stops, every connection gets GOAWAY.
    gw.ready.store(false, Ordering::Relaxed);
    accept_stop.cancel();
    server_stop.cancel();
    api_stop.cancel();
    gw.stopping.cancel();
    // 2. Sessions end, each once its GOAWAY is written (agents then read the end as planned
    //    and reconnect elsewhere); then every other long-lived handler and parked tunnel.
    let sessions_ended = wait_until(Duration::from_secs(2), || gw.directory.is_empty()).await;
    if !sessions_ended {
        tracing::info!(
            sessions = gw.directory.len(),
            "ending the sessions that are still open"
        );
    }
    gw.shutdown.cancel();
    gw.tunnels.clear();
    // 3. Requests in flight finish, within the grace period. Calls to backends still open
    //    then (long polls) end with a status their clients retry, given a moment to go out.
    let drain_started = std::time::Instant::now();
    let mut in_flight = std::pin::pin!(async {
        let _ = server.await;
        tracing::info!(
            after_ms = drain_started.elapsed().as_millis() as u64,
            "agent port: every connection closed"
        );
        let _ = api.await;
        tracing::info!(
            after_ms = drain_started.elapsed().as_millis() as u64,
            "tunnel API: every request finished"
        );
    });
    if tokio::time::timeout(grace, &mut in_flight).await.is_err() {
        gw.backends.end_open_calls();
        if tokio::time::timeout(Duration::from_secs(1), &mut in_flight)
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "requests still in flight after the grace period; exiting anyway"
            );
        }
    }
    // 4. Leave the cluster: the internal API stops and the registry removes this replica.
    internal_stop.cancel();
    if let Some(i) = internal {
        let _ = tokio::time::timeout(Duration::from_secs(2), i).await;
    }
    // 5. Periodic work stops; the registry's last write is awaited here.
    background_stop.cancel();
    let joined = tokio::time::timeout(Duration::from_secs(3), async {
        while background.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!(
            "background tasks did not stop in time (Redis unreachable?); exiting anyway"
        );
    }
    // 6. Admin last, so that /metrics and /readyz answer until the end.
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Says so when a listener faces more than this host without TLS, or the admin port (which has
/// no authentication) does at all.
fn warn_exposed_listeners(addrs: &BoundAddrs, agent_tls: bool, api_tls: bool) {
    let exposed = |a: &SocketAddr| !a.ip().is_loopback();
    if exposed(&addrs.admin) {
        tracing::warn!(
            admin = %addrs.admin,
            "the admin port has no authentication and listens beyond this host: anyone who \
             reaches it reads the agent list and metrics; bind it to 127.0.0.1 or a private \
             address"
        );
    }
    let cleartext = [
        ("agent port", (!agent_tls).then_some(addrs.agent)),
        ("cleartext agent port", addrs.cleartext_agent),
        ("tunnel API", (!api_tls).then_some(addrs.api)),
    ];
    for (what, addr) in cleartext {
        if let Some(a) = addr.filter(exposed) {
            tracing::warn!(
                addr = %a,
                "the {what} listens beyond this host without TLS: tokens cross the network in \
                 the clear unless a TLS proxy in front terminates it"
            );
        }
    }
}

/// Runs `tick` every `period` until `stop`.
async fn every(period: Duration, stop: CancellationToken, mut tick: impl FnMut() + Send) {
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => tick(),
        }
    }
}

/// Polls `done` every 10 ms for at most `limit`; whether it became true.
async fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::drain_point;
    use std::time::Duration;

    #[test]
    fn drain_points_are_spread_within_bounds() {
        let age = Duration::from_secs(100);
        let points: Vec<f64> = (1..=200)
            .map(|id| drain_point(age, id).as_secs_f64())
            .collect();
        assert!(
            points.iter().all(|p| (80.0..=95.0).contains(p)),
            "{points:?}"
        );
        let (min, max) = points
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(*p), b.max(*p)));
        assert!(max - min > 10.0, "not spread: {min}..{max}");
    }
}
