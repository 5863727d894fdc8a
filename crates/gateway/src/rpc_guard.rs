//! A tower layer on the agent-port gRPC server that looks at each call's headers before any
//! body is read, and answers what it can refuse at once with a trailers-only gRPC status.
//!
//! It checks the method (one of [`KNOWN_METHODS`], so an unknown one gets a sentence naming
//! what this port serves instead of tonic's bare UNIMPLEMENTED) and the message encoding (tonic
//! would refuse an unknown `grpc-encoding` only once it starts decoding, with a message that
//! does not say what to send instead).

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready};
use tonic::Status;

use crate::metrics::Metrics;
use std::sync::Arc;

/// Every method the agent port serves. Metrics label RPCs with these names and nothing else
/// (see [`method_label`]), so remote input never becomes a label value.
pub const KNOWN_METHODS: [&str; 6] = [
    "/agentgate.v1.AgentSession/Register",
    "/agentgate.v1.Tunnel/Connect",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The metric label of a request path: the method itself when the port serves it, `other`
/// for anything else.
pub fn method_label(path: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| **m == path)
        .copied()
        .unwrap_or("other")
}

/// Reason label when a call names a method the agent port does not serve.
pub const REJECT_UNKNOWN_METHOD: &str = "unknown_method";

/// The refusal for a method the agent port does not serve, or `None`.
pub fn check_method(path: &str) -> Option<Status> {
    if method_label(path) != "other" {
        return None;
    }
    let shown: String = path.chars().take(128).collect();
    Some(Status::unimplemented(format!(
        "agentgate: the agent port has no method {shown:?}; it serves agentgate.v1.AgentSession, \
         agentgate.v1.Tunnel, grpc.health.v1.Health and server reflection"
    )))
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

#[derive(Clone)]
pub struct RpcGuardLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for RpcGuardLayer {
    type Service = RpcGuard<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcGuard {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcGuard<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcGuard<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let refusal = check_method(req.uri().path())
            .map(|s| (REJECT_UNKNOWN_METHOD, s))
            .or_else(|| check_encoding(req.headers()).map(|s| (REJECT_UNSUPPORTED_ENCODING, s)));
        if let Some((reason, status)) = refusal {
            self.metrics.connections_rejected.inc(&[reason]);
            tracing::warn!(
                method = %method_label(req.uri().path()),
                reason,
                "agent call refused: {}",
                status.message()
            );
            return Either::Left(futures_util::future::ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(req))
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
        for m in KNOWN_METHODS {
            assert!(check_method(m).is_none());
            assert_eq!(method_label(m), m);
        }
        let long = format!("/x.Y/{}", "z".repeat(10_000));
        for path in [
            "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect",
            "/agentgate.v1.Tunnel/Other",
            "/",
            long.as_str(),
        ] {
            assert_eq!(method_label(path), "other");
            let s = check_method(path).expect("refused");
            assert_eq!(s.code(), tonic::Code::Unimplemented);
            assert!(s.message().len() < 400, "remote input is cut short");
        }
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
