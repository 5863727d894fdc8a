//! A tower layer on the agent-port gRPC server that looks at each call's headers before any
//! body is read, and answers what it can refuse at once with a trailers-only gRPC status.
//!
//! It authenticates the calls that need an agent token (answering UNAUTHENTICATED at once,
//! trailers-only, never after reading a body), bounds the token-less calls (health,
//! reflection) a connection that never authenticated may hold open, and checks the method (one of [`KNOWN_METHODS`], so an unknown one gets a sentence naming
//! what this port serves instead of tonic's bare UNIMPLEMENTED) and, for the gateway's own
//! services, the message encoding (tonic would refuse an unknown `grpc-encoding` only once it starts decoding, with a message that
//! does not say what to send instead).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use agentgate_transport::{ConnMeta, PRE_AUTH_LOG};
use futures_util::future::{Either, Ready};
use tonic::Status;

use crate::auth::AgentAuth;
use crate::backends::Backends;
use crate::guarded_body::GuardedBody;
use crate::map_response::{MapResponse, ResponseMapper};
use crate::metrics::Metrics;

/// Every method the agent port serves. Metrics label RPCs with these names and nothing else
/// (see [`method_label`]), so remote input never becomes a label value.
pub use agentgate_proto::gateway_methods::GATEWAY_METHODS as KNOWN_METHODS;

/// The method label of calls to gateway-side backends (their own metric names the backend).
pub const BACKEND_METHOD_LABEL: &str = "backend";

/// The metric label of a request path: the method itself when the port serves it, `backend`
/// for a backend's service, `other` for anything else.
pub fn method_label(path: &str, backends: &Backends) -> &'static str {
    if let Some(m) = KNOWN_METHODS.iter().find(|m| **m == path) {
        return m;
    }
    if backends.find(path).is_some() {
        return BACKEND_METHOD_LABEL;
    }
    "other"
}

/// Reason label when a call from an agent's local listener names one of the gateway's own
/// methods.
pub const REJECT_LOCAL_CALLER_OWN_METHOD: &str = "local_caller_own_method";

/// Reason label when a call names a method the agent port does not serve.
pub const REJECT_UNKNOWN_METHOD: &str = "unknown_method";

/// The refusal for a method the agent port does not serve, naming what it serves. Backends'
/// service prefixes are named only to a caller holding an agent token (`authenticated`): to
/// anyone else they would map the services behind the gateway.
fn refuse_method(path: &str, backends: &Backends, authenticated: bool) -> Status {
    let shown: String = match crate::backends::service_of(path) {
        Some(service) => format!("service {service:?}"),
        None => format!("method {path:?}"),
    };
    let shown: String = shown.chars().take(160).collect();
    let mut served = String::new();
    if authenticated {
        for prefix in backends.prefixes() {
            served.push_str(&format!(", {prefix}"));
        }
    } else if !backends.is_empty() {
        served.push_str(", and backends' services, which it names to callers with an agent token");
    }
    let no_backend = if backends.is_empty() {
        "no backend is configured"
    } else {
        "no backend matches"
    };
    Status::unimplemented(format!(
        "agentgate: the agent port does not serve {shown}: it is none of the gateway's own \
         services and {no_backend}; it serves agentgate.v1.AgentSession, agentgate.v1.Tunnel, \
         grpc.health.v1.Health, server reflection{served}"
    ))
}

/// Request encodings every agent-port service accepts (`grpc-accept-encoding` lists them).
pub const ACCEPTED_ENCODINGS: &str = "gzip,identity";
/// Reason label when a call names an encoding the gateway cannot decode.
pub const REJECT_UNSUPPORTED_ENCODING: &str = "unsupported_encoding";

/// The refusal for a call whose `grpc-encoding` is not one the gateway decodes, or `None`.
pub fn check_encoding(headers: &http::HeaderMap) -> Option<Status> {
    let value = headers.get("grpc-encoding")?;
    if matches!(value.as_bytes(), b"gzip" | b"identity") {
        return None;
    }
    let shown = String::from_utf8_lossy(value.as_bytes());
    let shown: String = shown.chars().take(64).collect();
    let mut status = Status::unimplemented(format!(
        "agentgate: request messages are compressed with {shown:?}, which this gateway cannot \
         decode; send them uncompressed or with gzip (grpc-accept-encoding: {ACCEPTED_ENCODINGS})"
    ));
    status.metadata_mut().insert(
        "grpc-accept-encoding",
        tonic::metadata::MetadataValue::from_static(ACCEPTED_ENCODINGS),
    );
    Some(status)
}

/// Whether a call needs an agent token, by its [`method_label`]: the gateway's agent services
/// and every backend's do; everything else the port serves (health, reflection) is open to
/// anyone, within [`REJECT_UNAUTHENTICATED_CALLS`]'s limit.
fn needs_token(method: &str) -> bool {
    method.starts_with("/agentgate.v1.") || method == BACKEND_METHOD_LABEL
}

/// Reason label when a connection is closed for too many refused calls before authenticating.
pub const REJECT_REFUSED_CALLS: &str = "refused_calls";

/// Reason label when a connection that never authenticated opens too many token-less calls.
pub const REJECT_UNAUTHENTICATED_CALLS: &str = "unauthenticated_calls";

/// What the guard needs: the agent tokens, the backends' services (they need a token too),
/// the refusal metrics and the two limits on connections that have not authenticated.
pub struct GuardState {
    pub auth: AgentAuth,
    pub backends: Arc<Backends>,
    pub metrics: Arc<Metrics>,
    /// `max_refused_calls_before_auth`.
    pub max_refused_calls: u32,
    /// `max_unauthenticated_calls_per_connection`.
    pub max_unauthenticated_calls: u32,
}

#[derive(Clone)]
pub struct RpcGuardLayer {
    pub state: Arc<GuardState>,
}

impl<S> tower::Layer<S> for RpcGuardLayer {
    type Service = RpcGuard<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcGuard {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcGuard<S> {
    inner: S,
    state: Arc<GuardState>,
}

/// One token-less call's place in its connection's count; released when the call's response
/// ends or is dropped.
pub struct UnauthenticatedSlot(Arc<ConnMeta>);

impl Drop for UnauthenticatedSlot {
    fn drop(&mut self) {
        self.0.unauthenticated_calls.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S> RpcGuard<S> {
    fn refuse<B: Default>(
        &self,
        conn: &ConnMeta,
        reason: &'static str,
        method: &'static str,
        status: Status,
    ) -> http::Response<B> {
        self.state.metrics.connections_rejected.inc(&[reason]);
        self.count_refusal(conn);
        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
            tracing::warn!(
                method,
                reason,
                suppressed,
                "agent call refused: {}",
                status.message()
            );
        }
        status.into_http()
    }

    /// Counts a refusal on a connection that has not authenticated: a client that keeps
    /// sending what is refused is not an agent, and each refused stream still costs HTTP/2
    /// work. At `max_refused_calls_before_auth` the client is told to go (GOAWAY; a proxy in
    /// front then puts no other client's call on this connection, and its calls in flight
    /// are answered); at twice as many, a client that did not listen is cut off.
    fn count_refusal(&self, conn: &ConnMeta) {
        if conn.agent.get().is_some() {
            return;
        }
        let limit = self.state.max_refused_calls;
        let refused = conn.refused_calls.fetch_add(1, Ordering::Relaxed) + 1;
        if refused == limit {
            if !conn.request_drain(REJECT_REFUSED_CALLS) {
                // Already told to go (too many streams before auth): one GOAWAY, one count.
                return;
            }
            self.state
                .metrics
                .connections_rejected
                .inc(&[REJECT_REFUSED_CALLS]);
            if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                tracing::warn!(
                    conn = conn.id,
                    peer = %conn.peer,
                    reason = REJECT_REFUSED_CALLS,
                    limit,
                    suppressed,
                    "sending GOAWAY: too many refused calls before any authenticated; the \
                     connection is closed if the client goes on"
                );
            }
        } else if refused == limit.saturating_mul(2) {
            conn.request_close();
            if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                tracing::warn!(
                    conn = conn.id,
                    peer = %conn.peer,
                    reason = REJECT_REFUSED_CALLS,
                    suppressed,
                    "closing connection: it went on making refused calls after GOAWAY"
                );
            }
        }
    }

    /// Checks the call's agent token (counted and logged inside); the identity rides along on
    /// the request for the service.
    #[allow(clippy::result_large_err)] // the error is the response itself
    fn authenticate<B: Default, T>(
        &self,
        req: &mut http::Request<T>,
        conn: &Arc<ConnMeta>,
        method: &'static str,
    ) -> Result<(), http::Response<B>> {
        let id = self
            .state
            .auth
            .authenticate_agent(req.headers(), conn, method)
            .map_err(|status| {
                self.count_refusal(conn);
                status.into_http()
            })?;
        if let Some(call_agent) = req.extensions().get::<crate::rpc_layer::CallAgent>() {
            call_agent.set(&id.name);
        }
        req.extensions_mut().insert(id);
        Ok(())
    }

    /// Checks one call from its headers. `Ok` carries the slot a token-less call holds.
    #[allow(clippy::result_large_err)] // the error is the response itself
    fn admit<B: Default, T>(
        &self,
        req: &mut http::Request<T>,
    ) -> Result<Option<UnauthenticatedSlot>, http::Response<B>> {
        let Some(conn) = req.extensions().get::<Arc<ConnMeta>>().cloned() else {
            return Err(Status::internal("agentgate: connection metadata missing").into_http());
        };
        let path = req.uri().path();
        let method = method_label(path, &self.state.backends);
        if method == "other" {
            // The call's own token: a proxy may carry several clients' calls on one connection.
            let authenticated = self
                .state
                .auth
                .recognize_agent(req.headers(), &conn)
                .is_some();
            let status = refuse_method(req.uri().path(), &self.state.backends, authenticated);
            return Err(self.refuse(&conn, REJECT_UNKNOWN_METHOD, method, status));
        }
        if method != crate::rpc_guard::BACKEND_METHOD_LABEL
            && req
                .headers()
                .contains_key(&crate::backends::call::INSTANCE_CLAIM_HEADER)
        {
            // A local process's call through an agent's `--local-listen` (older agents pass
            // any method): it may reach backends, never the agent's own session.
            let status = agentgate_proto::gateway_methods::local_caller_refusal(
                req.uri().path(),
                "agentgate",
            );
            return Err(self.refuse(&conn, REJECT_LOCAL_CALLER_OWN_METHOD, method, status));
        }
        // A backend's messages pass as sent (the gateway never decodes them), whatever their
        // encoding: the backend answers for what it accepts.
        if method == BACKEND_METHOD_LABEL {
        } else if let Some(status) = check_encoding(req.headers()) {
            return Err(self.refuse(&conn, REJECT_UNSUPPORTED_ENCODING, method, status));
        }
        if needs_token(method) {
            return self.authenticate(req, &conn, method).map(|()| None);
        }
        if conn.agent.get().is_some() {
            return Ok(None);
        }
        // A caller that sends a valid agent token on a public call (a runner checking health
        // before it asks for work) authenticates its connection as with any agent call, so the
        // limits on unauthenticated connections no longer apply. Any other token (an API
        // token, say) is not this port's business: the call stays token-less.
        if let Some(id) = self.state.auth.recognize_agent(req.headers(), &conn) {
            if let Some(call_agent) = req.extensions().get::<crate::rpc_layer::CallAgent>() {
                call_agent.set(&id.name);
            }
            req.extensions_mut().insert(id);
            return Ok(None);
        }
        let limit = self.state.max_unauthenticated_calls;
        if conn.unauthenticated_calls.fetch_add(1, Ordering::Relaxed) >= limit {
            conn.unauthenticated_calls.fetch_sub(1, Ordering::Relaxed);
            let status = Status::resource_exhausted(format!(
                "agentgate: this connection already has {limit} calls open without an agent \
                 token; finish them first, or authenticate"
            ));
            return Err(self.refuse(&conn, REJECT_UNAUTHENTICATED_CALLS, method, status));
        }
        Ok(Some(UnauthenticatedSlot(conn)))
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcGuard<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<GuardedBody<ResBody, Option<UnauthenticatedSlot>>>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, MapResponse<S::Future, HoldSlot>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let slot = match self.admit(&mut req) {
            Ok(slot) => slot,
            Err(refusal) => return Either::Left(futures_util::future::ready(Ok(refusal))),
        };
        Either::Right(MapResponse::new(self.inner.call(req), HoldSlot(slot)))
    }
}

/// The response mapper of an admitted call: its body holds the call's token-less slot, if it
/// took one, until the body ends.
pub struct HoldSlot(Option<UnauthenticatedSlot>);

impl<B> ResponseMapper<B> for HoldSlot {
    type Output = http::Response<GuardedBody<B, Option<UnauthenticatedSlot>>>;
    fn map(self, response: http::Response<B>) -> Self::Output {
        response.map(|inner| GuardedBody::new(inner, self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(enc: &'static str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-encoding", http::HeaderValue::from_static(enc));
        h
    }

    #[test]
    fn only_served_methods_pass_and_others_are_labelled_other() {
        let none = Backends::default();
        for m in KNOWN_METHODS {
            assert_eq!(method_label(m, &none), m);
        }
        let long = format!("/x.Y/{}", "z".repeat(10_000));
        for path in [
            "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect",
            "/agentgate.v1.Tunnel/Other",
            "/",
            long.as_str(),
        ] {
            assert_eq!(method_label(path, &none), "other");
            let s = refuse_method(path, &none, true);
            assert_eq!(s.code(), tonic::Code::Unimplemented);
            assert!(s.message().len() < 400, "remote input is cut short");
        }
    }

    #[test]
    fn backends_are_named_only_to_callers_with_a_token() {
        let backends = Backends::new(&[crate::config::BackendConfig {
            services: vec!["runner.jobs.v1.".into()],
            url: "http://127.0.0.1:1".into(),
            ..Default::default()
        }])
        .unwrap();
        let told = refuse_method("/other.v1.X/Y", &backends, true);
        assert!(
            told.message().contains(", runner.jobs.v1."),
            "{}",
            told.message()
        );
        let stranger = refuse_method("/other.v1.X/Y", &backends, false);
        assert!(
            !stranger.message().contains("runner"),
            "{}",
            stranger.message()
        );
        assert!(
            stranger.message().contains("agent token"),
            "{}",
            stranger.message()
        );
    }

    #[test]
    fn gzip_and_identity_pass_others_are_refused_with_the_accepted_list() {
        assert!(check_encoding(&http::HeaderMap::new()).is_none());
        assert!(check_encoding(&headers("gzip")).is_none());
        assert!(check_encoding(&headers("identity")).is_none());
        let s = check_encoding(&headers("br")).expect("br is refused");
        assert_eq!(s.code(), tonic::Code::Unimplemented);
        assert!(s.message().contains("gzip"), "{}", s.message());
        assert_eq!(
            s.metadata().get("grpc-accept-encoding").unwrap(),
            ACCEPTED_ENCODINGS
        );
    }
}
