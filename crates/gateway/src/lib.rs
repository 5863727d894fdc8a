//! The agentgate gateway.
//!
//! It accepts agents on one port over four transports (see `agentgate-transport`), serves
//! their gRPC calls on ONE tonic server, parks the tunnel streams they open, and forwards
//! user requests from its API listener down those tunnels. Above the transport layer, the
//! transport is only a label on the connection, for logs and metrics.

mod admin;
mod api;
mod auth;
pub mod config;
pub mod directory;
mod headers;
pub mod metrics;
mod rpc_layer;
mod session;
pub mod tokens;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::agent_session_server::AgentSessionServer;
use agentgate_proto::v1::tunnel_server::TunnelServer;
use agentgate_transport::{bind_listener, serve_ingress, ConnMeta, IngressSettings, WsSettings};
use anyhow::Context;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;
use directory::Directory;
use metrics::Metrics;
use tokens::TokenStore;
use tunnel::TunnelRegistry;

/// State shared by every part of the gateway.
pub struct Gateway {
    pub config: GatewayConfig,
    pub tokens: TokenStore,
    pub metrics: Arc<Metrics>,
    pub directory: Arc<Directory>,
    pub tunnels: TunnelRegistry,
    /// Cancelled during shutdown, after GOAWAY: ends sessions and other long-lived handlers.
    pub shutdown: CancellationToken,
    ready: AtomicBool,
}

/// How long after GOAWAY long-lived handlers on an aged connection end.
const LONG_POLL_END_DELAY: Duration = Duration::from_secs(2);

impl Gateway {
    pub fn new(config: GatewayConfig) -> anyhow::Result<Arc<Self>> {
        let tokens = TokenStore::open(&config.tokens)?;
        let metrics = Arc::new(Metrics::default());
        let age = config.max_connection_age;
        let drain_after = (!age.is_zero()).then(|| age.mul_f64(0.9));
        Ok(Arc::new(Self {
            tunnels: TunnelRegistry::new(metrics.clone(), drain_after),
            tokens,
            metrics,
            directory: Arc::default(),
            shutdown: CancellationToken::new(),
            ready: AtomicBool::new(false),
            config,
        }))
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
    use agentgate_transport::tls::{server_config, ALPN_H2, ALPN_HTTP1};
    let agent_tls = pair("agent port TLS", &config.tls_cert, &config.tls_key)?
        .map(|(c, k)| server_config(c, k, &[ALPN_H2, ALPN_HTTP1]))
        .transpose()
        .context("agent port TLS")?;
    let api_tls = pair("API TLS", &config.api_tls_cert, &config.api_tls_key)?
        .map(|(c, k)| server_config(c, k, &[ALPN_H2, ALPN_HTTP1]))
        .transpose()
        .context("API TLS")?;
    let gw = Gateway::new(config)?;
    run_with(gw, agent_tls, api_tls, stop, on_bound).await
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

    let accept_stop = CancellationToken::new();
    let settings = IngressSettings {
        handshake_timeout: cfg.handshake_timeout,
        max_connections: cfg.max_connections,
        listen_backlog: cfg.listen_backlog,
        min_client_ping_interval: (!cfg.min_client_ping_interval.is_zero())
            .then_some(cfg.min_client_ping_interval),
        ws: WsSettings {
            read_buffer_size: cfg.ws_read_buffer_size,
            max_message_size: cfg.ws_max_message_size,
            ..WsSettings::default()
        },
    };
    let incoming = serve_ingress(
        agent_listener,
        agent_tls,
        settings.clone(),
        gw.metrics.clone(),
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
        let more = serve_ingress(l, None, settings, gw.metrics.clone(), accept_stop.clone());
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
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .initial_stream_window_size(cfg.http2_stream_window)
        .initial_connection_window_size(cfg.http2_connection_window);
    if !cfg.max_connection_age.is_zero() {
        builder = builder
            .max_connection_age(cfg.max_connection_age)
            .max_connection_age_grace(cfg.max_connection_age_grace);
    }
    let server_stop = CancellationToken::new();
    let server = builder
        .layer(rpc_layer::RpcObserveLayer {
            metrics: gw.metrics.clone(),
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentSessionServer::new(session::SessionService {
            gw: gw.clone(),
        }))
        .add_service(TunnelServer::new(tunnel::TunnelService { gw: gw.clone() }))
        .serve_with_incoming_shutdown(incoming, server_stop.clone().cancelled_owned());
    let server = tokio::spawn(server);

    let admin_stop = CancellationToken::new();
    let admin_serve = axum::serve(admin_listener, admin::router(gw.clone()))
        .with_graceful_shutdown(admin_stop.clone().cancelled_owned());
    let admin = tokio::spawn(async move { admin_serve.await });
    let api_stop = CancellationToken::new();
    let api = tokio::spawn(api::serve_api(
        gw.clone(),
        api_listener,
        api_tls,
        api_stop.clone(),
    ));

    let sweeper = {
        let gw = gw.clone();
        let every = gw.config.stream_heartbeat_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                gw.tunnels.sweep();
            }
        })
    };

    gw.ready.store(true, Ordering::Relaxed);
    on_bound(addrs);
    stop.cancelled().await;

    // Graceful shutdown, in the order that avoids "EOF after GOAWAY" at agents.
    let grace = gw.config.shutdown_grace;
    tracing::info!(
        ?grace,
        "shutting down: no new connections, GOAWAY to every agent"
    );
    gw.ready.store(false, Ordering::Relaxed);
    accept_stop.cancel();
    server_stop.cancel();
    api_stop.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.shutdown.cancel();
    gw.tunnels.clear();
    sweeper.abort();
    let drained = tokio::time::timeout(grace, async {
        let _ = server.await;
        let _ = api.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "requests still in flight after the grace period; exiting anyway"
        );
    }
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
    tracing::info!("gateway stopped");
    Ok(())
}
