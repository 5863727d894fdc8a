//! A tower layer on the agent-port gRPC server: one metric sample and one log line per RPC
//! (`info` unless it ended OK, see [`Observation::finish`]), labelled with the transport that
//! carried it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use agentgate_transport::ConnMeta;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;

use crate::backends::Backends;
use crate::headers::GRPC_STATUS;
use crate::map_response::{MapResponse, ResponseMapper};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct RpcObserveLayer {
    pub metrics: Arc<Metrics>,
    pub backends: Arc<Backends>,
}

impl<S> tower::Layer<S> for RpcObserveLayer {
    type Service = RpcObserve<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcObserve {
            inner,
            metrics: self.metrics.clone(),
            backends: self.backends.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcObserve<S> {
    inner: S,
    metrics: Arc<Metrics>,
    backends: Arc<Backends>,
}

/// The agent a call's own token named, filled in by the guard (`rpc_guard`) once the token is
/// checked. A proxy (HAProxy, nginx) carries many clients' calls on one upstream connection,
/// so the connection's agent says nothing about who made a given call.
#[derive(Clone, Default)]
pub struct CallAgent(Arc<std::sync::OnceLock<String>>);

impl CallAgent {
    /// Records the agent the call's token named.
    pub fn set(&self, name: &str) {
        let _ = self.0.set(name.to_string());
    }
}

/// `rpc finished` lines a second for failed calls of authenticated agents; the rest are
/// counted in the next line's `suppressed` (and every call in `agentgate_rpcs_total`).
static FAILED_RPC_LOG: agentgate_transport::LogBudget = agentgate_transport::LogBudget::new(50);

/// What is recorded when the RPC ends.
pub struct Observation {
    metrics: Arc<Metrics>,
    method: &'static str,
    conn: Option<Arc<ConnMeta>>,
    started: Instant,
    call_agent: CallAgent,
    /// The call carried credentials of its own (checked or not).
    with_token: bool,
}

impl Observation {
    /// The metric sample, and the log line: at `info` for a call that did not end OK, at
    /// `debug` for one that did. Runners and health checks make OK calls by the hundred
    /// thousand; at the default log level a line for each cost the gateway about a quarter of
    /// its CPU per unary call (h2load Health/Check A/B, docs/BENCHMARKS.md, ninth session) and
    /// would flood the log. To see every call:
    /// `--log info,agentgate_gateway::rpc_layer=debug`.
    fn finish(self, status: &str) {
        let transport = self.conn.as_ref().map_or("unknown", |c| c.kind.as_str());
        self.metrics.rpcs.inc(&[self.method, status, transport]);
        // Who made the call: the agent its own token named; for a call without a token (an
        // agent's health check), the agent its connection authenticated as. A call whose token
        // failed, or a token-less call on a connection no agent holds, is nobody's.
        let agent = match self.call_agent.0.get() {
            Some(name) => Some(name.as_str()),
            None if !self.with_token => self
                .conn
                .as_ref()
                .and_then(|c| c.agent.get())
                .map(String::as_str),
            None => None,
        };
        macro_rules! rpc_finished {
            ($level:expr, $suppressed:expr) => {
                tracing::event!(
                    $level,
                    method = %self.method,
                    status,
                    transport,
                    agent = agent.unwrap_or("-"),
                    conn = self.conn.as_ref().map_or(0, |c| c.id),
                    duration_ms = self.started.elapsed().as_millis() as u64,
                    suppressed = $suppressed,
                    "rpc finished"
                )
            };
        }
        // A call its own caller cancelled, with no identity to name, is not an event: a reset
        // flood would otherwise spend the shared log budget on these lines and crowd out the
        // one that says why the connection was closed.
        if status == "OK" || (status == "CANCELLED" && agent.is_none()) {
            rpc_finished!(tracing::Level::DEBUG, 0);
            return;
        }
        // A caller without a valid token can make calls fail as fast as it likes, also through
        // a proxy's connection that a real agent authenticated: its lines come out of the
        // shared pre-authentication budget. An agent with a valid token looping on a call that
        // fails (2,300 lines a second seen) has a budget of its own.
        let budget = match agent {
            Some(_) => &FAILED_RPC_LOG,
            None => &agentgate_transport::PRE_AUTH_LOG,
        };
        if let Some(suppressed) = budget.allow() {
            rpc_finished!(tracing::Level::INFO, suppressed);
        }
    }
}

/// The gRPC status code name for a `grpc-status` value.
pub fn code_name(value: Option<&http::HeaderValue>) -> &'static str {
    let code = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    match code {
        Some(c) => code_label(tonic::Code::from_i32(c)),
        None => "UNKNOWN",
    }
}

/// The name of a gRPC status code, as gRPC spells it (the `status` label of metrics).
pub use agentgate_proto::status_code::code_name as code_label;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcObserve<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Body,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = MapResponse<S::Future, Observation>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let call_agent = CallAgent::default();
        req.extensions_mut().insert(call_agent.clone());
        let obs = Observation {
            metrics: self.metrics.clone(),
            method: crate::rpc_guard::method_label(req.uri().path(), &self.backends),
            conn: req.extensions().get::<Arc<ConnMeta>>().cloned(),
            started: Instant::now(),
            call_agent,
            with_token: crate::auth::carries_credentials(req.headers()),
        };
        MapResponse::new(self.inner.call(req), obs)
    }
}

impl<B> ResponseMapper<B> for Observation {
    type Output = http::Response<ObservedBody<B>>;

    /// A trailers-only response carries the status in the headers: the RPC is over. Otherwise
    /// the body records it when its trailers pass.
    fn map(self, response: http::Response<B>) -> Self::Output {
        let (parts, body) = response.into_parts();
        let obs = match parts.headers.get(&GRPC_STATUS) {
            Some(v) => {
                self.finish(code_name(Some(v)));
                None
            }
            None => Some(self),
        };
        http::Response::from_parts(parts, ObservedBody { inner: body, obs })
    }
}

pin_project! {
    /// Records the RPC when the trailers pass, or as CANCELLED if dropped before that.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        obs: Option<Observation>,
    }
    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(obs) = this.project().obs.take() {
                obs.finish("CANCELLED");
            }
        }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(obs) = this.obs.take() {
                        obs.finish(code_name(t.get(&GRPC_STATUS)));
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(obs) = this.obs.take() {
                    obs.finish("INTERNAL");
                }
            }
            Poll::Ready(None) => {
                if let Some(obs) = this.obs.take() {
                    obs.finish("UNKNOWN");
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
