//! The internal API that replicas call on each other. Every call must carry a token signed
//! for exactly that call ([`super::signing`]): the method, path, this replica, the agent and
//! the forwarded head, used once. Anything else gets 401, a metric by reason and a log line.
//! A forwarded body must match its MAC trailer, or the request is aborted before its last
//! bytes reach the agent.
//!
//! - `POST /internal/v1/agents/{agent}/reserve?wait_ms=N`: take a ready tunnel of `agent` and
//!   hold it for a request; answers the reservation id, or 404 if there is none.
//! - `POST /internal/v1/reservations/{id}/release`: put the tunnel back in the pool.
//! - `ANY /internal/v1/reservations/{id}/request`: the request itself, streamed both ways.
//! - `ANY /internal/v1/agents/{agent}/request`: a request without a body, for which this
//!   replica takes a tunnel and forwards at once (one round trip instead of two); every
//!   answer carries `ROUTE_HEADER`, so a sender can tell an older replica's 404 from it.
//! - `GET /internal/v1/agents`: this replica's agents.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::RequestHead;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use super::{
    ERROR_HEADER, INTERNAL_TOKEN_HEADER, KIND_HEADER, PATH_HEADER, ROUTE_HEADER, TIMEOUT_HEADER,
    UPSTREAM_HEADER,
};
use crate::directory::Directory;
use crate::headers::to_proto;
use crate::http_listener::HttpListenerSettings;
use crate::metrics::Metrics;
use crate::tunnel::{ForwardError, ForwardResponse, LocalTunnels, ResponseBody, ServedOver};

/// What the internal API's handlers need: this replica's tunnels and agents, the cluster's
/// signer and reservations, the metrics.
pub struct InternalState {
    pub local: Arc<LocalTunnels>,
    pub cluster: Arc<Cluster>,
    pub directory: Arc<Directory>,
    pub metrics: Arc<Metrics>,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut r = Response::new(
        http_body_util::Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

async fn route(
    state: Arc<InternalState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    if let Some(why) = agentgate_transport::refuse_non_uri_authority(&req) {
        if let Some(suppressed) = agentgate_transport::PRE_AUTH_LOG.allow() {
            tracing::warn!(%peer, path = %req.uri().path(), suppressed, "internal API call refused: {why}");
        }
        return text(
            StatusCode::BAD_REQUEST,
            format!("agentgate internal API: {why}\n"),
        );
    }
    let cluster = &state.cluster;
    let token = req
        .headers()
        .get(INTERNAL_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let path = req.uri().path().to_string();
    // Only a forwarded request carries a head worth binding; the others have none.
    let head_digest = if path.ends_with("/request") {
        super::signing::head_digest(&[], req.headers())
    } else {
        String::new()
    };
    let verified = match cluster
        .signer
        .verify(token, req.method(), &path_and_query, &head_digest)
    {
        Ok(v) => v,
        Err(e) => {
            state.metrics.internal_rejected.inc(&[e.reason()]);
            // Anyone who reaches the port can cause this line: the shared budget of lines
            // a client without credentials may cause (SECURITY.md).
            if let Some(suppressed) = agentgate_transport::PRE_AUTH_LOG.allow() {
                tracing::warn!(%peer, path = %path, suppressed, "internal API call refused: {e}");
            }
            return text(
                StatusCode::UNAUTHORIZED,
                format!("agentgate internal API: {e}\n"),
            );
        }
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (http::Method::GET, ["internal", "v1", "agents"]) => {
            let body = serde_json::to_vec(&state.directory.list()).unwrap_or_default();
            text(StatusCode::OK, body)
        }
        (http::Method::POST, ["internal", "v1", "agents", agent, "reserve"]) => {
            let wait_ms: u64 = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("wait_ms=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let wait = Duration::from_millis(wait_ms).min(state.local.tunnel_wait);
            if !state.local.holds(agent) {
                cluster.registry.forget_field_of_earlier_process(agent);
                return text(
                    StatusCode::NOT_FOUND,
                    format!("agent {agent:?} is not connected here\n"),
                );
            }
            // 404 only for "not here": the caller then waits for the agent to show up
            // elsewhere (it is moving); connected without a ready tunnel is 503.
            match state.local.take(agent, wait, None).await {
                Ok(t) => text(StatusCode::OK, cluster.reserve(agent, t).to_string()),
                Err(e @ ForwardError::NotConnected { .. }) => {
                    text(StatusCode::NOT_FOUND, format!("{e}\n"))
                }
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            }
        }
        (http::Method::POST, ["internal", "v1", "reservations", id, "release"]) => {
            let res = id
                .parse()
                .ok()
                .and_then(|id: u64| cluster.reservations.lock().unwrap().remove(&id));
            if let Some(r) = res {
                state.local.parking.park(&r.agent, r.tunnel);
            }
            text(StatusCode::NO_CONTENT, "")
        }
        (_, ["internal", "v1", "reservations", id, "request"]) => {
            let res = id
                .parse()
                .ok()
                .and_then(|id: u64| cluster.reservations.lock().unwrap().remove(&id));
            // Reservation ids are counters: a token signed for one agent must not claim
            // another agent's reserved tunnel.
            let res = match res {
                Some(r) if r.agent != verified.agent => {
                    state.local.parking.park(&r.agent, r.tunnel);
                    state.metrics.internal_rejected.inc(&["wrong_route"]);
                    tracing::warn!(%peer, issuer = %verified.issuer, "internal API call refused: the token names another agent than the reservation");
                    return text(
                        StatusCode::UNAUTHORIZED,
                        "agentgate internal API: the token names another agent than the reservation\n",
                    );
                }
                other => other,
            };
            let Some(res) = res else {
                let gone = ForwardError::TunnelBroken {
                    // The replica that forwarded the request fills in the agent's name.
                    agent: String::new(),
                    message: "the tunnel reservation expired or is unknown".into(),
                };
                let mut r = text(StatusCode::GONE, gone.to_wire());
                r.headers_mut()
                    .insert(ERROR_HEADER, HeaderValue::from_static("tunnel_broken"));
                return r;
            };
            let (head, body) = forwarded_request(req, verified.body_key, &state.metrics);
            answer(
                state
                    .local
                    .forward_on(&res.agent, res.tunnel, head, body, &ServedOver::default())
                    .await,
            )
        }
        // One round trip: take a tunnel here and forward at once (a request without a body,
        // for an agent that Redis lists at this replica only).
        (_, ["internal", "v1", "agents", agent, "request"]) => {
            let mut r = if *agent != verified.agent {
                state.metrics.internal_rejected.inc(&["wrong_route"]);
                tracing::warn!(%peer, issuer = %verified.issuer, "internal API call refused: the token names another agent than the path");
                text(
                    StatusCode::UNAUTHORIZED,
                    "agentgate internal API: the token names another agent than the path\n",
                )
            } else {
                let agent = agent.to_string();
                let (head, body) = forwarded_request(req, verified.body_key, &state.metrics);
                // This route carries no body: its MAC trailer is read and checked before the
                // request goes on, so the answer never comes before the request is whole (an
                // early answer resets the stream, and the trailer arriving after the reset
                // was a connection error to HTTP/2; see h2 patch 9).
                if let Err(why) = bodiless(body).await {
                    let mut r = text(
                        StatusCode::BAD_REQUEST,
                        format!("agentgate internal API: {why}\n"),
                    );
                    r.headers_mut()
                        .insert(ROUTE_HEADER, HeaderValue::from_static("agent-request"));
                    return r;
                }
                let body = http_body_util::Empty::<bytes::Bytes>::new();
                // Not connected here is an error the sender waits on (the agent is moving),
                // answered at once rather than after `tunnel_wait`.
                let tunnel = if state.local.holds(&agent) {
                    state
                        .local
                        .take(&agent, state.local.tunnel_wait, None)
                        .await
                } else {
                    cluster.registry.forget_field_of_earlier_process(&agent);
                    Err(ForwardError::NotConnected {
                        agent: agent.clone(),
                    })
                };
                answer(match tunnel {
                    Ok(t) => {
                        let served = ServedOver::default();
                        state.local.forward_on(&agent, t, head, body, &served).await
                    }
                    Err(e) => Err(e),
                })
            };
            r.headers_mut()
                .insert(ROUTE_HEADER, HeaderValue::from_static("agent-request"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "no such internal route\n"),
    }
}

/// Reads the whole body of a request on the one-call route, which has none: its MAC trailer.
async fn bodiless(body: super::signing::VerifiedBody<Incoming>) -> Result<(), String> {
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) if f.data_ref().is_some_and(|d| !d.is_empty()) => {
                return Err("the one-call route carries requests without a body".into())
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// The tunnel request a peer forwarded: its head, carried as headers, and its MAC-checked body.
fn forwarded_request(
    req: Request<Incoming>,
    body_key: super::signing::BodyKeyHandle,
    metrics: &Arc<Metrics>,
) -> (RequestHead, super::signing::VerifiedBody<Incoming>) {
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    let take = |h: &mut http::HeaderMap, k: &str| -> String {
        h.remove(k)
            .and_then(|v| v.to_str().ok().map(str::to_string))
            .unwrap_or_default()
    };
    let kind: i32 = take(&mut headers, KIND_HEADER).parse().unwrap_or(0);
    let upstream = take(&mut headers, UPSTREAM_HEADER);
    let path_and_query = take(&mut headers, PATH_HEADER);
    let timeout_millis: u64 = take(&mut headers, TIMEOUT_HEADER).parse().unwrap_or(0);
    headers.remove(INTERNAL_TOKEN_HEADER);
    headers.remove(http::header::HOST);
    let head = RequestHead {
        kind,
        upstream,
        method: parts.method.as_str().to_string(),
        path_and_query,
        headers: to_proto(&headers),
        timeout_millis,
        ..Default::default()
    };
    let declared_length = headers.contains_key(http::header::CONTENT_LENGTH);
    let body = super::signing::VerifiedBody::new(body, body_key, metrics.clone(), declared_length);
    (head, body)
}

/// The answer to a forwarded request: the upstream's response, or the error as the sender
/// reads it (`ERROR_HEADER` and the error's JSON).
fn answer(result: Result<ForwardResponse, ForwardError>) -> Response<ResponseBody> {
    match result {
        Ok(fwd) => {
            let mut r = Response::new(fwd.body);
            *r.status_mut() = StatusCode::from_u16(fwd.status).unwrap_or(StatusCode::BAD_GATEWAY);
            *r.headers_mut() = fwd.headers;
            r
        }
        Err(e) => {
            let mut r = text(StatusCode::OK, e.to_wire());
            if let Ok(v) = HeaderValue::from_str(e.outcome()) {
                r.headers_mut().insert(ERROR_HEADER, v);
            }
            r
        }
    }
}

/// Serves the internal API until `stop`.
pub async fn serve_internal(
    state: Arc<InternalState>,
    listener: TcpListener,
    settings: HttpListenerSettings,
    stop: CancellationToken,
) {
    let tls = state.cluster.server_tls.clone();
    let make = move |peer: SocketAddr| {
        let state = state.clone();
        tower::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(state, peer, req).await) }
        })
    };
    crate::http_listener::serve_http(listener, tls, settings, make, stop).await;
}
