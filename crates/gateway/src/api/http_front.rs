//! HTTP through the tunnel: `/agents/{agent}/proxy/...` and `/agents/{agent}/upstreams/{name}/...`.

use std::net::SocketAddr;
use std::sync::Arc;

use agentgate_proto::v1::{RequestHead, RequestKind};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::access_log::{EndedBy, RequestLog};
use super::{full_body, ApiBody, TokenSource, TOKEN_HEADER};
use crate::headers::{
    strip_hop_by_hop, to_proto, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};

/// Where a request path points: agent, upstream name, and the path left for the upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub agent: &'a str,
    pub upstream: &'a str,
    pub rest: &'a str,
}

/// Parses `/agents/{agent}/proxy/{rest}` and `/agents/{agent}/upstreams/{name}/{rest}`.
pub fn parse_target(path: &str) -> Option<Target<'_>> {
    let after = path.strip_prefix("/agents/")?;
    let (agent, after) = after.split_once('/')?;
    if agent.is_empty() {
        return None;
    }
    if let Some(rest) = after.strip_prefix("proxy") {
        if rest.is_empty() || rest.starts_with('/') {
            return Some(Target {
                agent,
                upstream: "default",
                rest,
            });
        }
        return None;
    }
    let after = after.strip_prefix("upstreams/")?;
    let (upstream, rest) = match after.split_once('/') {
        Some((u, _)) => (u, &after[u.len()..]),
        None => (after, ""),
    };
    (!upstream.is_empty()).then_some(Target {
        agent,
        upstream,
        rest,
    })
}

fn error_response(status: StatusCode, message: &str) -> Response<ApiBody> {
    let mut resp = Response::new(full_body(format!("agentgate: {message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"agentgate\""),
        );
    }
    resp
}

pub async fn handle(
    api: Arc<super::ApiState>,
    peer: SocketAddr,
    tls: bool,
    req: Request<Incoming>,
) -> Response<ApiBody> {
    // A clone of the URI shares its bytes (no copy) and outlives `req`, which is taken apart.
    let uri = req.uri().clone();
    let Some(target) = parse_target(uri.path()) else {
        let upgrade = req.headers().get(http::header::UPGRADE);
        if upgrade.is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket")) {
            return error_response(StatusCode::NOT_FOUND, super::grpc_front::AGENT_AT_API_PORT);
        }
        return error_response(
            StatusCode::NOT_FOUND,
            "no such route; use /agents/{agent}/proxy/{path} or \
             /agents/{agent}/upstreams/{name}/{path}",
        );
    };
    // An upgrade (WebSocket, h2c) is a protocol switch the tunnel does not carry: forwarded
    // without its Upgrade header it reached the upstream as a plain GET.
    if req.headers().contains_key(http::header::UPGRADE) {
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "the tunnel does not carry protocol upgrades (WebSocket, h2c); make plain HTTP or \
             gRPC requests through it",
        );
    }
    let (agent, upstream) = (target.agent.to_string(), target.upstream.to_string());
    let (token, source) = match api.authenticate(req.headers(), &agent) {
        Ok(found) => found,
        Err(e) => {
            let status = match e {
                super::ApiAuthError::Forbidden(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            api.metrics
                .tunnel_requests
                .inc(&["http", "unauthenticated", "none"]);
            if let Some(suppressed) = agentgate_transport::PRE_AUTH_LOG.allow() {
                tracing::warn!(%peer, agent, suppressed, "API request refused: {}", e.message());
            }
            return error_response(status, &e.message());
        }
    };
    let rest = if target.rest.is_empty() {
        "/"
    } else {
        target.rest
    };
    let query = uri.query();
    let mut path_and_query = String::with_capacity(rest.len() + query.map_or(0, |q| q.len() + 1));
    path_and_query.push_str(rest);
    if let Some(q) = query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let log = RequestLog::new(
        api.metrics.clone(),
        "http",
        &token,
        peer,
        &agent,
        &upstream,
        req.method().as_str(),
        &path_and_query,
    );
    let revoked = api.tokens.revocation(&token);
    let (parts, body) = req.into_parts();
    let body = log.count_request(body);
    let mut headers = parts.headers;
    let original_host = headers.get(http::header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut headers, false);
    match source {
        TokenSource::Authorization => {
            headers.remove(http::header::AUTHORIZATION);
        }
        TokenSource::TokenHeader => {
            headers.remove(TOKEN_HEADER);
        }
    }
    headers.remove(http::header::HOST);
    // Every X-Forwarded-For line the caller sent, in order (proxies may add a line each
    // instead of appending to one), then the caller's address.
    let mut xff = String::new();
    for prev in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(prev) = prev.to_str() {
            xff.push_str(prev.trim());
            xff.push_str(", ");
        }
    }
    xff.push_str(&peer.ip().to_string());
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if let (false, Some(h)) = (headers.contains_key(&X_FORWARDED_HOST), original_host) {
        headers.insert(X_FORWARDED_HOST, h);
    }
    let head = RequestHead {
        kind: RequestKind::Http as i32,
        upstream,
        method: parts.method.as_str().to_string(),
        path_and_query,
        headers: to_proto(&headers),
        timeout_millis: 0,
        ..Default::default()
    };
    let result = tokio::select! {
        r = api.router.forward(&agent, head, body, log.served()) => r,
        _ = revoked.cancelled() => {
            log.finish(401, "revoked", EndedBy::Gateway);
            return error_response(StatusCode::UNAUTHORIZED, "the API token of this request was revoked");
        }
    };
    match result {
        Ok(fwd) => {
            let mut resp = Response::new(fwd.body);
            *resp.status_mut() =
                StatusCode::from_u16(fwd.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut h = fwd.headers;
            strip_hop_by_hop(&mut h, false);
            *resp.headers_mut() = h;
            log.answer(resp, revoked, api.grace_over.clone())
        }
        Err(e) => {
            log.finish(e.http_status().as_u16(), e.outcome(), EndedBy::of(&e));
            if let Some(suppressed) = super::FAILED_REQUEST_LOG.allow() {
                tracing::warn!(%peer, agent, outcome = e.outcome(), suppressed, "tunnel request failed: {e}");
            }
            error_response(e.http_status(), &e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            parse_target("/agents/a1/proxy/x/y"),
            Some(Target {
                agent: "a1",
                upstream: "default",
                rest: "/x/y"
            })
        );
        assert_eq!(
            parse_target("/agents/a1/proxy"),
            Some(Target {
                agent: "a1",
                upstream: "default",
                rest: ""
            })
        );
        assert_eq!(
            parse_target("/agents/a1/upstreams/metrics/m"),
            Some(Target {
                agent: "a1",
                upstream: "metrics",
                rest: "/m"
            })
        );
        assert_eq!(
            parse_target("/agents/a1/upstreams/metrics"),
            Some(Target {
                agent: "a1",
                upstream: "metrics",
                rest: ""
            })
        );
        assert_eq!(parse_target("/agents/a1/proxyx"), None);
        assert_eq!(parse_target("/agents//proxy/"), None);
        assert_eq!(parse_target("/other"), None);
    }
}
