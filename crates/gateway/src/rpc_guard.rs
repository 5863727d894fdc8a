//! A tower layer on the agent-port gRPC server that looks at each call's headers before any
//! body is read, and answers what it can refuse at once with a trailers-only gRPC status.
//!
//! Today it checks the message encoding: tonic would refuse an unknown `grpc-encoding` only
//! once it starts decoding, with a message that does not say what to send instead.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready};
use tonic::Status;

use crate::metrics::Metrics;
use std::sync::Arc;

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
        if let Some(status) = check_encoding(req.headers()) {
            self.metrics
                .connections_rejected
                .inc(&[REJECT_UNSUPPORTED_ENCODING]);
            tracing::warn!(
                method = %req.uri().path(),
                reason = REJECT_UNSUPPORTED_ENCODING,
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
