//! The agentgate gateway.
//!
//! It accepts agents on one port over four transports (see `agentgate-transport`), serves
//! their gRPC calls on ONE tonic server, parks the tunnel streams they open, and forwards
//! user requests from its API listener down those tunnels. Above the transport layer, the
//! transport is only a label on the connection, for logs and metrics.
//!
//! [`Gateway`] is the wiring: it builds the shared parts once, and [`run_with`] builds each
//! listener's handler state from them and hands every task the parts it needs (`agent_port.rs` the agent port, `api/` the tunnel API, `router.rs` where a
//! request goes, `tunnel/` this replica's tunnels, `session.rs` agent sessions, `cluster/`
//! the other replicas, `admin.rs` the admin port), then shuts them down in order
//! (`shutdown.rs`).

mod admin;
mod agent_port;
mod api;
mod auth;
pub mod backends;
pub mod cluster;
mod codec_error_text;
pub mod config;
pub mod directory;
mod fd_limit;
mod grpc_metadata;
mod guarded_body;
mod headers;
mod http_listener;
mod listeners;
mod map_response;
mod memory;
pub mod metrics;
mod oversized_headers;
mod process_metrics;
mod reload;
mod router;
mod rpc_guard;
mod rpc_layer;
mod session;
mod session_events;
mod shutdown;
mod status_in_trailers;
pub mod tokens;
pub mod tunnel;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agentgate_transport::bind_listener;
use anyhow::Context;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;
use directory::Directory;
pub use listeners::BoundAddrs;
use metrics::Metrics;
use tokens::TokenStore;
use tunnel::{LocalTunnels, TunnelParking};

/// The gateway's shared parts, each built once; [`run_with`] hands every task the ones it needs.
pub struct Gateway {
    config: GatewayConfig,
    metrics: Arc<Metrics>,
    tokens: Arc<TokenStore>,
    /// The agents with a session at this replica.
    directory: Arc<Directory>,
    /// This replica's tunnels: parked streams, and forwarding a request down one.
    tunnels: Arc<LocalTunnels>,
    /// Where a tunnelled request goes: a tunnel here, or the replica that holds the agent.
    router: Arc<router::Router>,
    sessions: Arc<session::Sessions>,
    /// Gateway-side gRPC services agents call (`[[backends]]`).
    backends: Arc<backends::Backends>,
    /// Cluster mode (`--redis`): the registry and the internal API client.
    cluster: Option<Arc<cluster::Cluster>>,
    admin: Arc<admin::AdminState>,
    /// Cancelled when shutdown begins (accepting stops, GOAWAY goes out): each session ends
    /// once its connection has written the GOAWAY, so that agents read the end as planned.
    /// A child of `shutdown`: cancelling that cancels this too.
    stopping: CancellationToken,
    /// Cancelled during shutdown once sessions had their chance to end: ends every remaining
    /// long-lived handler.
    shutdown: CancellationToken,
}

pub use agentgate_transport::drain_point;

impl Gateway {
    /// Agent sessions registered here (for the demo and the admin API).
    pub fn agents(&self) -> Vec<directory::AgentRecord> {
        self.directory.list()
    }

    /// Tunnels of `agent` parked here right now.
    pub fn parked_tunnels(&self, agent: &str) -> usize {
        self.tunnels.parking.idle_count(agent)
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
        let tokens = Arc::new(TokenStore::open(path)?);
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
        let stopping = shutdown.child_token();
        let parking = Arc::new(TunnelParking::new(metrics.clone(), max_age));
        let tunnels = Arc::new(LocalTunnels::new(
            parking.clone(),
            directory.clone(),
            metrics.clone(),
            (config.tunnel_wait, config.agent_reconnect_wait),
            config.tunnel_chunk_size,
            config.stalled_caller_timeout,
        ));
        let router = Arc::new(router::Router {
            local: tunnels.clone(),
            cluster: cluster.clone(),
            tokens: tokens.clone(),
            stopping: stopping.clone(),
            reconnect_wait: config.agent_reconnect_wait,
        });
        let sessions = Arc::new(session::Sessions {
            directory: directory.clone(),
            parking,
            metrics: metrics.clone(),
            connects: session::ConnectLimit::new(
                config.connect_rate_limit_per_minute,
                cluster.as_ref().map(|c| c.registry.clone()),
            ),
            heartbeat: config.stream_heartbeat_interval,
            max_connection_age: config.max_connection_age,
            stopping: stopping.clone(),
            shutdown: shutdown.clone(),
        });
        let admin = Arc::new(admin::AdminState {
            ready: AtomicBool::new(false),
            served_certs: OnceLock::new(),
            metrics: metrics.clone(),
            directory: directory.clone(),
            cluster: cluster.clone(),
            tokens: tokens.clone(),
        });
        Ok(Arc::new(Self {
            backends,
            cluster,
            tunnels,
            router,
            sessions,
            admin,
            tokens,
            metrics,
            directory,
            stopping,
            shutdown,
            config,
        }))
    }
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
    let _ = gw.admin.served_certs.set(
        served
            .iter()
            .map(|c| (c.listener, c.cert.clone()))
            .collect(),
    );
    let watch_stop = CancellationToken::new();
    let watcher = tokio::spawn(reload::watch(
        reload::Reloadables {
            tokens: gw.tokens.clone(),
            cluster: gw.cluster.clone(),
            certs: served,
            metrics: gw.metrics.clone(),
            certificate_check_interval: gw.config.certificate_check_interval,
        },
        watch_stop.clone(),
    ));
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
    oversized_headers::install();
    let listeners = listeners::Listeners::bind(cfg)?;
    let addrs = listeners.addrs;
    tracing::info!(
        agent = %addrs.agent,
        agent_tls = agent_tls.is_some(),
        cleartext_agent = %addrs
            .cleartext_agent
            .map_or_else(|| "none".to_string(), |a| a.to_string()),
        admin = %addrs.admin,
        api = %addrs.api,
        api_tls = api_tls.is_some(),
        "gateway listening"
    );
    listeners::warn_exposed(&addrs, agent_tls.is_some(), api_tls.is_some());

    let accept_stop = CancellationToken::new();
    let agent_port_stop = CancellationToken::new();
    let agent_port = shutdown::Task {
        handle: agent_port::serve(
            &gw,
            listeners.agent,
            listeners.cleartext_agent,
            agent_tls,
            accept_stop.clone(),
            agent_port_stop.clone(),
        )
        .await?,
        stop: agent_port_stop,
    };

    let admin_stop = CancellationToken::new();
    let admin_state = gw.admin.clone();
    let admin = shutdown::Task {
        handle: tokio::spawn(http_listener::serve_http(
            listeners.admin,
            None,
            http_listener::HttpListenerSettings::from_config(
                "admin",
                cfg.admin_max_connections,
                cfg,
                gw.metrics.clone(),
            ),
            move |_peer| {
                let admin = admin_state.clone();
                tower::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(admin::route(admin, req).await) }
                })
            },
            admin_stop.clone(),
        )),
        stop: admin_stop,
    };

    let api_stop = CancellationToken::new();
    let api_state = Arc::new(api::ApiState {
        tokens: gw.tokens.clone(),
        router: gw.router.clone(),
        metrics: gw.metrics.clone(),
        grace_over: gw.tunnels.grace_over(),
    });
    let mut api_settings = http_listener::HttpListenerSettings::from_config(
        "api",
        cfg.api_max_connections,
        cfg,
        gw.metrics.clone(),
    );
    api_settings.proxy_protocol_from = cfg.proxy_protocol_networks()?;
    let api = shutdown::Task {
        handle: tokio::spawn(api::serve_api(
            api_state,
            listeners.api,
            api_tls,
            api_settings,
            api_stop.clone(),
        )),
        stop: api_stop,
    };

    let mut periodic = tokio::task::JoinSet::new();
    let internal = match gw.cluster.clone() {
        Some(c) => Some(start_cluster(&gw, c, &mut periodic).await?),
        None => None,
    };
    let periodic_stop = CancellationToken::new();
    start_periodic(&gw, &mut periodic, &periodic_stop);

    gw.admin.ready.store(true, Ordering::Relaxed);
    on_bound(addrs);
    stop.cancelled().await;

    shutdown::Running {
        accept_stop,
        agent_port,
        api,
        internal,
        periodic,
        periodic_stop,
        admin,
    }
    .shut_down(&gw)
    .await;
    Ok(())
}

/// Cluster mode: asks Redis (fatal only with `redis_required_at_start`), starts the internal
/// API and the cluster's periodic work, which stops with it.
async fn start_cluster(
    gw: &Gateway,
    c: Arc<cluster::Cluster>,
    periodic: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<shutdown::Task> {
    let cfg = &gw.config;
    match c.registry.reachable_within(cfg.redis_startup_timeout).await {
        Ok(()) => tracing::info!("cluster mode: Redis answers"),
        Err(e) if cfg.redis_required_at_start && e.is_refused_password() => anyhow::bail!(
            "{e}; redis_required_at_start is on, so the gateway does not start without Redis"
        ),
        Err(e) if cfg.redis_required_at_start => anyhow::bail!(
            "Redis did not answer within {:?} ({e}); redis_required_at_start is on: start \
             Redis, fix --redis, or turn the setting off to serve local agents without it",
            cfg.redis_startup_timeout
        ),
        Err(e) if e.is_refused_password() => tracing::error!(
            "{e}: serving local agents; this replica joins the cluster once Redis takes it"
        ),
        Err(e) => tracing::warn!(
            "Redis does not answer yet ({e}): serving local agents; this replica joins the \
             cluster when Redis comes"
        ),
    }
    let l = bind_listener(cfg.internal_listen, 1024).with_context(|| {
        format!(
            "cannot listen for the internal API on {}",
            cfg.internal_listen
        )
    })?;
    tracing::info!(internal = %l.local_addr()?, advertised = %c.self_url, "cluster mode: internal API listening");
    let stop = CancellationToken::new();
    let state = Arc::new(cluster::internal_api::InternalState {
        local: gw.tunnels.clone(),
        cluster: c.clone(),
        directory: gw.directory.clone(),
        metrics: gw.metrics.clone(),
    });
    let settings = http_listener::HttpListenerSettings::from_config(
        "internal",
        cfg.internal_max_connections,
        cfg,
        state.metrics.clone(),
    );
    let handle = tokio::spawn(cluster::internal_api::serve_internal(
        state,
        l,
        settings,
        stop.clone(),
    ));
    // Stopped with the internal API; on its way out it removes this replica's entries.
    periodic.spawn(c.registry.clone().run_refresher(stop.clone()));
    let parking = gw.tunnels.parking.clone();
    periodic.spawn(every(Duration::from_secs(5), stop.clone(), move || {
        c.expire_reservations(&parking);
        c.signer.forget_expired();
    }));
    Ok(shutdown::Task { handle, stop })
}

/// The periodic work of every mode, until `stop`.
fn start_periodic(gw: &Gateway, periodic: &mut tokio::task::JoinSet<()>, stop: &CancellationToken) {
    let cfg = &gw.config;
    if !cfg.memory_trim_interval.is_zero() {
        periodic.spawn(every(cfg.memory_trim_interval, stop.clone(), memory::trim));
    }
    let parking = gw.tunnels.parking.clone();
    periodic.spawn(every(
        cfg.stream_heartbeat_interval,
        stop.clone(),
        move || parking.sweep(),
    ));
    if !cfg.token_check_interval.is_zero() {
        // Revocation bites within this interval even when nobody authenticates.
        let tokens = gw.tokens.clone();
        periodic.spawn(every(cfg.token_check_interval, stop.clone(), move || {
            tokens.check_now()
        }));
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
