//! gRPC through the tunnel: any method, raw, to the agent's gRPC upstream.
//!
//! The call is forwarded as HTTP/2 with trailers, so status, details, headers and trailers
//! arrive untouched, and all four call shapes work. The caller's deadline (`grpc-timeout`)
//! travels with the request and is also enforced here: when it passes, the caller gets
//! DEADLINE_EXCEEDED and the tunnel stream is dropped, which cancels the call at the agent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use agentgate_proto::v1::{RequestHead, RequestKind};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::access_log::{EndedBy, RequestLog};
use super::{ApiAuthError, ApiBody, BoxError, TokenSource, AGENT_HEADER, TOKEN_HEADER};
use crate::headers::{strip_hop_by_hop, to_proto};
use crate::headers::{GRPC_MESSAGE, GRPC_STATUS, GRPC_TIMEOUT};

/// Percent-encodes a `grpc-message` value as the gRPC spec asks.
fn encode_grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) fn status_headers(code: tonic::Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(GRPC_STATUS, HeaderValue::from(code as i32));
    if let Ok(v) = HeaderValue::from_str(&encode_grpc_message(&format!("agentgate: {message}"))) {
        h.insert(GRPC_MESSAGE, v);
    }
    h
}

/// A trailers-only gRPC response carrying an error status.
fn status_response(code: tonic::Code, message: &str) -> Response<ApiBody> {
    let mut resp = Response::new(super::full_body(Bytes::new()));
    let mut h = status_headers(code, message);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    *resp.headers_mut() = h;
    resp
}

/// What an agent pointed at this port is told (an agent's own calls carry no
/// `agentgate-agent`, so it would otherwise read that it lacks that metadata).
pub(super) const AGENT_AT_API_PORT: &str =
    "this is the gateway's tunnel API port (api_listen), for API callers; agents connect to the \
     agent port (listen, 8150 by default): point the agent's --server there";

/// Whether `method` is one of the agent port's own services (ours, or agentk's).
fn is_agent_call(method: &str) -> bool {
    method.starts_with("/agentgate.v1.") || method.starts_with("/gitlab.agent.")
}

/// The answer to a gRPC call that arrived over HTTP/1.1 (a proxy in between downgraded it).
pub(super) fn over_http1() -> Response<ApiBody> {
    let mut resp = Response::new(super::full_body(
        "agentgate: this gRPC call arrived over HTTP/1.1, but gRPC needs HTTP/2 (its status \
         comes back in trailers): something in between downgraded it; let HTTP/2 through (h2c, \
         or TLS with ALPN h2)\n",
    ));
    *resp.status_mut() = http::StatusCode::HTTP_VERSION_NOT_SUPPORTED;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub async fn handle(
    api: Arc<super::ApiState>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Response<ApiBody> {
    let method = req.uri().path().to_string();
    let Some(agent) = req
        .headers()
        .get(AGENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        api.metrics
            .tunnel_requests
            .inc(&["grpc", "bad_request", "none"]);
        if is_agent_call(&method) {
            return status_response(tonic::Code::Unimplemented, AGENT_AT_API_PORT);
        }
        return status_response(
            tonic::Code::InvalidArgument,
            &format!("missing '{AGENT_HEADER}: <agent name>' metadata"),
        );
    };
    let (token, source) = match api.authenticate(req.headers(), &agent) {
        Ok(found) => found,
        Err(e) => {
            api.metrics
                .tunnel_requests
                .inc(&["grpc", "unauthenticated", "none"]);
            if let Some(suppressed) = agentgate_transport::PRE_AUTH_LOG.allow() {
                tracing::warn!(%peer, agent, method, suppressed, "API call refused: {}", e.message());
            }
            let code = match e {
                ApiAuthError::Forbidden(_) => tonic::Code::PermissionDenied,
                _ => tonic::Code::Unauthenticated,
            };
            return status_response(code, &e.message());
        }
    };
    let timeout = req
        .headers()
        .get(&GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::headers::parse_grpc_timeout);
    let deadline = timeout.map(|t| Instant::now() + t);
    let log = RequestLog::new(
        api.metrics.clone(),
        "grpc",
        &token,
        peer,
        &agent,
        "grpc",
        "POST",
        &method,
    );
    let revoked = api.tokens.revocation(&token);
    let (parts, body) = req.into_parts();
    let body = log.count_request(body);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, true);
    headers.remove(AGENT_HEADER);
    match source {
        TokenSource::Authorization => headers.remove(http::header::AUTHORIZATION),
        TokenSource::TokenHeader => headers.remove(TOKEN_HEADER),
    };
    headers.remove(http::header::HOST);
    // The agent's gRPC upstream serves every caller's calls over one connection.
    if let Err(why) = crate::grpc_metadata::check_metadata(&mut headers) {
        log.finish_grpc(
            200,
            tonic::Code::InvalidArgument,
            "invalid_metadata",
            EndedBy::Gateway,
        );
        return status_response(tonic::Code::InvalidArgument, &why);
    }
    let head = RequestHead {
        kind: RequestKind::Grpc as i32,
        upstream: String::new(),
        method: parts.method.as_str().to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or(method.clone(), |p| p.as_str().to_string()),
        headers: to_proto(&headers),
        timeout_millis: timeout.map_or(0, |t| t.as_millis().max(1) as u64),
        ..Default::default()
    };
    let forward = api.router.forward(&agent, head, body, log.served());
    let deadline_passed = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = forward => r,
        _ = deadline_passed => {
            log.finish(200, "deadline_exceeded", EndedBy::Gateway);
            return status_response(
                tonic::Code::DeadlineExceeded,
                "deadline exceeded before the agent answered",
            );
        }
        _ = revoked.cancelled() => {
            log.finish_grpc(200, tonic::Code::Unauthenticated, "revoked", EndedBy::Gateway);
            return status_response(
                tonic::Code::Unauthenticated,
                "the API token of this call was revoked",
            );
        }
    };
    match result {
        Ok(fwd) => {
            // A "trailers-only" answer (an error status straight away) carries grpc-status in
            // its headers and must end the stream on them: relaying the empty body as a DATA
            // frame would make clients read the status as plain headers and see UNKNOWN.
            let body = if fwd.headers.contains_key(&GRPC_STATUS) {
                super::full_body(Bytes::new())
            } else {
                DeadlineBody {
                    inner: fwd.body,
                    sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                    done: false,
                }
                .boxed_unsync()
            };
            let mut resp = Response::new(body);
            *resp.status_mut() =
                http::StatusCode::from_u16(fwd.status).unwrap_or(http::StatusCode::OK);
            let mut h = fwd.headers;
            strip_hop_by_hop(&mut h, false);
            *resp.headers_mut() = h;
            log.answer(resp, revoked, api.grace_over.clone())
        }
        Err(e) => {
            // The gRPC status is in the answer; nobody reads one the caller left (499).
            let status = if e.outcome() == "caller_aborted" {
                crate::api::access_log::CALLER_WENT_AWAY
            } else {
                200
            };
            log.finish_grpc(status, e.grpc_code(), e.outcome(), EndedBy::of(&e));
            if let Some(suppressed) = super::FAILED_REQUEST_LOG.allow() {
                tracing::warn!(
                    agent,
                    method,
                    outcome = e.outcome(),
                    suppressed,
                    "tunnel call failed: {e}"
                );
            }
            status_response(e.grpc_code(), &e.to_string())
        }
    }
}

/// A response body that ends with DEADLINE_EXCEEDED trailers when the caller's deadline
/// passes mid-stream, dropping the tunnel (which cancels the call at the agent).
struct DeadlineBody {
    inner: ApiBody,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                self.done = true;
                self.inner = super::full_body(Bytes::new());
                return Poll::Ready(Some(Ok(Frame::trailers(status_headers(
                    tonic::Code::DeadlineExceeded,
                    "deadline exceeded",
                )))));
            }
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(encode_grpc_message("a b%é"), "a b%25%C3%A9");
    }
}
