//! The user-facing tunnel API: its own listener, HTTP/1.1 and HTTP/2, TLS optional.
//!
//! - `/agents/{agent}/proxy/{path...}` reaches the agent's `default` HTTP upstream;
//! - `/agents/{agent}/upstreams/{name}/{path...}` reaches a named one;
//! - any gRPC call (content-type `application/grpc*`) with metadata `agentgate-agent: NAME`
//!   is forwarded as a raw gRPC call to that agent's gRPC upstream.
//!
//! Callers authenticate with an API token in `authorization: Bearer <token>` (stripped before
//! forwarding) or in `agentgate-token: <token>` (then `authorization` passes through to the
//! upstream untouched).

mod access_log;
mod grpc_front;
mod http_front;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::bearer_token;
use crate::http_listener::HttpListenerSettings;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::tokens::{TokenEntry, TokenKind, TokenStore};

pub use crate::tunnel::BoxError;
pub type ApiBody = UnsyncBoxBody<Bytes, BoxError>;

/// Warning lines a second for failed tunnel requests, on top of their access lines (one per
/// request, always): while Redis or a replica is down every request fails, and a warning per
/// request would flood the log. The rest are counted in the next line's `suppressed`.
static FAILED_REQUEST_LOG: agentgate_transport::LogBudget = agentgate_transport::LogBudget::new(5);

/// Header that carries the API token when `authorization` belongs to the upstream.
pub const TOKEN_HEADER: &str = "agentgate-token";
/// gRPC metadata naming the target agent.
pub const AGENT_HEADER: &str = "agentgate-agent";

pub fn full_body(data: impl Into<Bytes>) -> ApiBody {
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why an API caller was refused.
pub enum ApiAuthError {
    Missing,
    Invalid,
    Forbidden(String),
}

impl ApiAuthError {
    pub fn message(&self) -> String {
        match self {
            Self::Missing => "missing API token: send 'authorization: Bearer <api token>' or \
                              'agentgate-token: <api token>'"
                .into(),
            Self::Invalid => "invalid API token (unknown, revoked or expired)".into(),
            Self::Forbidden(agent) => format!("this API token may not reach agent {agent:?}"),
        }
    }
}

/// Where the API token was found, so the front end knows what to strip.
pub enum TokenSource {
    Authorization,
    TokenHeader,
}

/// What the tunnel API's request handlers need: API tokens, the router, the metrics.
pub struct ApiState {
    pub tokens: Arc<TokenStore>,
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace is over: answers still streaming then are ended by
    /// the gateway (a gRPC answer with UNAVAILABLE, a retryable status) and logged as
    /// `shutdown`, not left to be cut when the process exits.
    pub grace_over: tokio_util::sync::CancellationToken,
}

impl ApiState {
    /// Authenticates an API caller for `agent`.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        agent: &str,
    ) -> Result<(Arc<TokenEntry>, TokenSource), ApiAuthError> {
        let (token, source) = if let Some(v) = headers.get(TOKEN_HEADER) {
            (v.to_str().ok().map(str::trim), TokenSource::TokenHeader)
        } else if let Some(v) = headers.get(http::header::AUTHORIZATION) {
            (
                v.to_str().ok().and_then(bearer_token),
                TokenSource::Authorization,
            )
        } else {
            return Err(ApiAuthError::Missing);
        };
        let entry = token
            .and_then(|t| self.tokens.verify(TokenKind::Api, t))
            .ok_or(ApiAuthError::Invalid)?;
        if !entry.allows_agent(agent) {
            return Err(ApiAuthError::Forbidden(agent.into()));
        }
        Ok((entry, source))
    }
}

async fn route(
    api: Arc<ApiState>,
    peer: SocketAddr,
    tls: bool,
    req: Request<Incoming>,
) -> Response<ApiBody> {
    if let Some(why) = agentgate_transport::refuse_non_uri_authority(&req) {
        if let Some(suppressed) = agentgate_transport::PRE_AUTH_LOG.allow() {
            tracing::warn!(%peer, path = %req.uri().path(), suppressed, "API request refused: {why}");
        }
        let mut resp = Response::new(full_body(format!("agentgate: {why}\n")));
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
        if req.version() <= http::Version::HTTP_11 {
            // A client that sends such a Host is not one to keep a connection open for.
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        return resp;
    }
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    // Each front's future is boxed where it is made: the whole request path is in it (tens
    // of KiB), and inline it would be copied again by every wrapper it goes through (the
    // service function, the in-flight counter, hyper's dispatcher) on every request.
    if is_grpc && req.version() <= http::Version::HTTP_11 {
        // Its trailers (the call's status) cannot come back over HTTP/1.1.
        return grpc_front::over_http1();
    }
    if is_grpc {
        Box::pin(grpc_front::handle(api, peer, req)).await
    } else {
        Box::pin(http_front::handle(api, peer, tls, req)).await
    }
}

/// Serves the API listener until `shutdown`, then lets open requests finish.
pub async fn serve_api(
    api: Arc<ApiState>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    settings: HttpListenerSettings,
    shutdown: CancellationToken,
) {
    let is_tls = tls.is_some();
    let make = move |peer: SocketAddr| {
        let api = api.clone();
        tower::service_fn(move |req| {
            let api = api.clone();
            async move {
                let resp = route(api, peer, is_tls, req).await;
                // gRPC errors as headers then trailers, which every proxy in front relays.
                // The answers are the agents' upstreams' (or the gateway's own sentences).
                let resp = crate::status_in_trailers::move_status_to_trailers(resp, false);
                Ok::<_, Infallible>(resp.map(|b| b.boxed_unsync()))
            }
        })
    };
    crate::http_listener::serve_http(listener, tls, settings, make, shutdown).await;
}
