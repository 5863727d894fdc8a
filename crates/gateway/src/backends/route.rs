//! The tower layer on the agent-port gRPC server that sends calls for a backend's services
//! to [`super::call::forward`] and every other call on to the gateway's own services.
//!
//! It sits inside `rpc_guard`, so a call reaching it has passed the method and encoding
//! checks and carries the caller's verified [`AgentIdentity`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tonic::Status;

use super::pool::CallBody;
use super::Backends;
use crate::auth::AgentIdentity;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct BackendRouteLayer {
    pub backends: Arc<Backends>,
    pub metrics: Arc<Metrics>,
    /// For the instance a call claims (`call::verified_instance`).
    pub directory: Arc<crate::directory::Directory>,
}

impl<S> tower::Layer<S> for BackendRouteLayer {
    type Service = BackendRoute<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BackendRoute {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BackendRoute<S> {
    inner: S,
    layer: BackendRouteLayer,
}

impl<S> tower::Service<http::Request<CallBody>> for BackendRoute<S>
where
    S: tower::Service<http::Request<CallBody>, Response = http::Response<CallBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CallBody>;
    type Error = S::Error;
    type Future =
        Either<S::Future, Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<CallBody>) -> Self::Future {
        let Some(backend) = self.layer.backends.find(req.uri().path()).cloned() else {
            return Either::Left(self.inner.call(req));
        };
        let metrics = self.layer.metrics.clone();
        let ending = self.layer.backends.ending.clone();
        let directory = self.layer.directory.clone();
        Either::Right(Box::pin(async move {
            let Some(id) = req.extensions().get::<AgentIdentity>().cloned() else {
                // rpc_guard authenticates every backend call; reaching here without an
                // identity is a wiring bug, and the call must not go out unauthenticated.
                return Ok(Status::internal(
                    "agentgate: backend call reached routing without authentication",
                )
                .into_http());
            };
            let instance = super::call::verified_instance(req.headers(), &id, &directory);
            Ok(super::call::forward(backend, id, instance, metrics, ending, req).await)
        }))
    }
}
