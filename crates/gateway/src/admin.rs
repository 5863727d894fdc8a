//! The admin port: liveness, readiness, Prometheus metrics, and the agent list.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use agentgate_proto::exposition::{self, Kind, Scrape};
use agentgate_transport::cert_reload::ReloadableCert;

use crate::cluster::Cluster;
use crate::directory::Directory;
use crate::metrics::Metrics;

/// What the admin port shows.
pub struct AdminState {
    /// True while the agent port accepts connections (set at start, cleared at shutdown).
    pub ready: AtomicBool,
    /// The certificates this gateway serves, by listener, for the expiry gauge (set at start).
    pub served_certs: OnceLock<Vec<(&'static str, Arc<ReloadableCert>)>>,
    pub metrics: Arc<Metrics>,
    pub directory: Arc<Directory>,
    /// Cluster mode: for `?scope=cluster`.
    pub cluster: Option<Arc<Cluster>>,
    /// For the token store's reload gauges.
    pub tokens: Arc<crate::tokens::TokenStore>,
}

type AdminResponse = Response<Full<Bytes>>;

/// The admin port's pages.
enum Page {
    Health,
    Ready,
    Metrics,
    Agents,
}

/// One admin request: a match on the path, then on the method, as the internal API routes its
/// own.
pub async fn route<B>(admin: Arc<AdminState>, req: Request<B>) -> AdminResponse {
    let page = match req.uri().path() {
        "/healthz" => Page::Health,
        "/readyz" => Page::Ready,
        "/metrics" => Page::Metrics,
        "/api/v1/agents" => Page::Agents,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "no such route; the admin port serves /healthz, /readyz, /metrics and \
                 /api/v1/agents\n"
                    .into(),
            )
        }
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match page {
        Page::Health => text(StatusCode::OK, "ok\n".into()),
        Page::Ready => readyz(&admin),
        Page::Metrics => metrics(&admin),
        // Boxed: the cluster's listing is a deep future, and the admin port is not a hot path.
        Page::Agents => Box::pin(agents(&admin, req.uri().query())).await,
    }
}

fn text(status: StatusCode, body: String) -> AdminResponse {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> AdminResponse {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// How long a failed accept keeps readiness off.
const ACCEPT_FAILURE_NOT_READY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Ready while the agent port accepts connections; 503 once shutdown has begun, so a load
/// balancer stops sending new agents here.
fn readyz(admin: &AdminState) -> AdminResponse {
    if !admin.ready.load(Ordering::Relaxed) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or shutting down\n".into(),
        );
    }
    match agentgate_transport::ACCEPT_HEALTH.failing_within(ACCEPT_FAILURE_NOT_READY_FOR) {
        Some(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: accepting connections fails ({why}); for 'Too many open files' raise \
                 the open-file limit or lower max_connections\n"
            ),
        ),
        None => text(StatusCode::OK, "ready\n".into()),
    }
}

fn metrics(admin: &AdminState) -> AdminResponse {
    let mut scrape = Scrape::default();
    admin.metrics.add_to(&mut scrape);
    add_certificate_expiry(admin, &mut scrape);
    add_token_store(admin, &mut scrape);
    respond(
        StatusCode::OK,
        exposition::CONTENT_TYPE,
        scrape.render().into(),
    )
}

/// `agentgate_certificate_expiry_timestamp_seconds{listener}`: when each served certificate
/// expires, read from the certificate in use (so a renewal shows at once). Alert on
/// `... - time() < 14 * 86400`.
fn add_certificate_expiry(admin: &AdminState, scrape: &mut Scrape) {
    let Some(certs) = admin.served_certs.get().filter(|c| !c.is_empty()) else {
        return;
    };
    let family = scrape.family(
        "agentgate_certificate_expiry_timestamp_seconds",
        "When the certificate each listener serves expires (Unix time).",
        Kind::Gauge,
    );
    for (listener, cert) in certs {
        if let Some(t) = cert.not_after_unix() {
            family.number(vec![("listener", listener.to_string())], t as f64);
        }
    }
}

/// The token store's reloads: a file that cannot be read or parsed keeps the tokens loaded
/// before it, which only a log line said. Alert on `agentgate_token_store_reload_failing == 1`.
fn add_token_store(admin: &AdminState, scrape: &mut Scrape) {
    scrape
        .family(
            "agentgate_token_store_reload_failures_total",
            "Token store reloads that failed (a file that does not parse counts once per version; one that cannot be read, once per retry, every 2 s); the \
             tokens loaded before stay in use.",
            Kind::Counter,
        )
        .number(vec![], admin.tokens.failed_reloads() as f64);
    scrape
        .family(
            "agentgate_token_store_reload_failing",
            "1 while the token store's last reload failed (a missing, unreadable or invalid \
             file), else 0.",
            Kind::Gauge,
        )
        .number(vec![], f64::from(u8::from(admin.tokens.reload_failing())));
}

/// This replica's agents, or with `?scope=cluster` the whole cluster's, each with its replica.
async fn agents(admin: &AdminState, query: Option<&str>) -> AdminResponse {
    let cluster_scope = query
        .unwrap_or_default()
        .split('&')
        .any(|kv| kv == "scope=cluster");
    let json = |body: Vec<u8>| respond(StatusCode::OK, "application/json", body.into());
    match (cluster_scope, &admin.cluster) {
        (true, Some(c)) => match c.cluster_agents(&admin.directory).await {
            Ok(list) => json(serde_json::to_vec(&list).unwrap_or_default()),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cluster registry unavailable: {e}\n"),
            ),
        },
        _ => json(serde_json::to_vec(&admin.directory.list()).unwrap_or_default()),
    }
}
