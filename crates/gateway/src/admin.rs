//! The admin port: liveness, readiness, Prometheus metrics, and the agent list.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

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
}

pub fn router(admin: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/agents", get(agents))
        .with_state(admin)
}

/// Ready while the agent port accepts connections; 503 once shutdown has begun, so a load
/// balancer stops sending new agents here.
/// How long a failed accept keeps readiness off.
const ACCEPT_FAILURE_NOT_READY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

async fn readyz(State(admin): State<Arc<AdminState>>) -> impl IntoResponse {
    if !admin.ready.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or shutting down\n".to_string(),
        );
    }
    match agentgate_transport::ACCEPT_HEALTH.failing_within(ACCEPT_FAILURE_NOT_READY_FOR) {
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: accepting connections fails ({why}); for 'Too many open files' raise \
                 the open-file limit or lower max_connections\n"
            ),
        ),
        None => (StatusCode::OK, "ready\n".to_string()),
    }
}

async fn metrics(State(admin): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut scrape = Scrape::default();
    admin.metrics.add_to(&mut scrape);
    add_certificate_expiry(&admin, &mut scrape);
    (
        [(header::CONTENT_TYPE, exposition::CONTENT_TYPE)],
        scrape.render(),
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

#[derive(serde::Deserialize)]
struct AgentsQuery {
    /// `cluster` lists every replica's agents (cluster mode).
    scope: Option<String>,
}

/// This replica's agents, or with `?scope=cluster` the whole cluster's, each with its replica.
async fn agents(
    State(admin): State<Arc<AdminState>>,
    Query(q): Query<AgentsQuery>,
) -> axum::response::Response {
    match (q.scope.as_deref(), &admin.cluster) {
        (Some("cluster"), Some(c)) => match c.cluster_agents(&admin.directory).await {
            Ok(list) => Json(list).into_response(),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cluster registry unavailable: {e}\n"),
            )
                .into_response(),
        },
        _ => Json(admin.directory.list()).into_response(),
    }
}
