//! The tunnel API's access log: one structured line per request once it is over (target
//! `agentgate::access`), naming the caller's token, the agent, the upstream, method, path,
//! status, bytes each way, duration, the outcome and who ended it; the same outcome labels
//! `agentgate_tunnel_requests_total`. A caller that goes away mid-answer is `caller_aborted`,
//! not `ok`.
//!
//! The answer's body is also where a revoked API token bites: the request in flight ends
//! (gRPC: UNAUTHENTICATED trailers; HTTP: the stream is reset, since the head is already sent).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use agentgate_proto::status_on_break::{status_trailers, MessageBoundary};

use super::{ApiBody, BoxError};
use crate::headers::GRPC_STATUS;
use crate::metrics::Metrics;
use crate::tokens::TokenEntry;
use crate::tunnel::ServedOver;

/// Who ended a request.
#[derive(Clone, Copy)]
pub enum EndedBy {
    /// The answer arrived whole: the upstream finished it.
    Upstream,
    /// The caller went away before the answer was whole.
    Caller,
    /// The agent's side broke off, or refused before answering.
    Agent,
    /// The gateway ended it (the token was revoked, a deadline passed, the request was refused).
    Gateway,
}

impl EndedBy {
    /// Who ended a request that failed with `e`.
    pub fn of(e: &crate::tunnel::ForwardError) -> Self {
        match e {
            crate::tunnel::ForwardError::CallerAborted { .. } => EndedBy::Caller,
            e if e.decided_by_gateway() => EndedBy::Gateway,
            _ => EndedBy::Agent,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            EndedBy::Upstream => "upstream",
            EndedBy::Caller => "caller",
            EndedBy::Agent => "agent",
            EndedBy::Gateway => "gateway",
        }
    }
}

/// One request's line, written once when it is over.
pub struct RequestLog {
    metrics: Arc<Metrics>,
    /// `http` or `grpc`.
    kind: &'static str,
    /// The caller's token (its id and name go in the line), shared with the token store.
    token: Arc<TokenEntry>,
    /// The caller's address (from the PROXY header when a listed balancer sent one).
    caller: std::net::SocketAddr,
    agent: String,
    upstream: String,
    method: String,
    path: String,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    /// The agent connection the request went down (`none` until it did; see [`ServedOver`]).
    served: ServedOver,
    /// Set once the line is written.
    written: bool,
}

/// The status an access line shows for a request whose caller went away before any answer
/// began (nobody got a status; nginx logs the same case as 499).
pub const CALLER_WENT_AWAY: u16 = 499;

impl Drop for RequestLog {
    /// A request dropped before its line was written: the caller went away (or the gateway
    /// stopped) before the answer began.
    fn drop(&mut self) {
        self.write(CALLER_WENT_AWAY, None, "caller_aborted", EndedBy::Caller, 0);
    }
}

impl RequestLog {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        metrics: Arc<Metrics>,
        kind: &'static str,
        token: &Arc<TokenEntry>,
        caller: std::net::SocketAddr,
        agent: &str,
        upstream: &str,
        method: &str,
        path: &str,
    ) -> Self {
        Self {
            metrics,
            kind,
            token: token.clone(),
            caller,
            agent: agent.to_string(),
            upstream: upstream.to_string(),
            method: method.to_string(),
            path: path.chars().take(512).collect(),
            started: Instant::now(),
            bytes_in: Arc::default(),
            served: ServedOver::default(),
            written: false,
        }
    }

    /// The request body, counted as it goes to the agent.
    pub fn count_request<B>(&self, body: B) -> CountedBody<B> {
        CountedBody {
            inner: body,
            count: self.bytes_in.clone(),
        }
    }

    /// Where the request goes, for the forwarding to fill in (the `transport` label).
    pub fn served(&self) -> &ServedOver {
        &self.served
    }

    /// Writes the line and counts the outcome, for a request that got no answer body.
    pub fn finish(self, status: u16, outcome: &str, ended_by: EndedBy) {
        self.finish_with(status, None, outcome, ended_by, 0);
    }

    /// Writes the line for a gRPC call the gateway answered with `code` itself (HTTP 200,
    /// or `http_status` 499 when the caller went away first).
    pub fn finish_grpc(
        self,
        http_status: u16,
        code: tonic::Code,
        outcome: &str,
        ended_by: EndedBy,
    ) {
        let code = (code as i32).to_string();
        self.finish_with(http_status, Some(&code), outcome, ended_by, 0);
    }

    fn finish_with(
        mut self,
        status: u16,
        grpc_status: Option<&str>,
        outcome: &str,
        ended_by: EndedBy,
        bytes_out: u64,
    ) {
        self.write(status, grpc_status, outcome, ended_by, bytes_out);
    }

    fn write(
        &mut self,
        status: u16,
        grpc_status: Option<&str>,
        outcome: &str,
        ended_by: EndedBy,
        bytes_out: u64,
    ) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        self.metrics
            .tunnel_requests
            .inc(&[self.kind, outcome, self.served.get()]);
        self.metrics
            .tunnel_request_duration
            .observe(&[self.kind, outcome], self.started.elapsed());
        tracing::info!(
            target: "agentgate::access",
            kind = self.kind,
            token_id = %self.token.id,
            token_name = %self.token.name,
            caller = %self.caller,
            agent = %self.agent,
            transport = self.served.get(),
            upstream = %self.upstream,
            method = %self.method,
            path = %self.path,
            status,
            grpc_status = grpc_status.unwrap_or("-"),
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome,
            ended_by = ended_by.as_str(),
            "tunnel request"
        );
    }

    /// The answer, logged when it ends, and ended early if the token is revoked or the
    /// shutdown grace ends first (`grace_over`).
    pub fn answer(
        self,
        resp: http::Response<ApiBody>,
        revoked: CancellationToken,
        grace_over: CancellationToken,
    ) -> http::Response<ApiBody> {
        let status = resp.status().as_u16();
        // An answer that has no body by definition: servers send none and never poll for it,
        // so a body wrapper would be dropped unread and the request logged as cut short.
        if self.method == "HEAD" || matches!(status, 204 | 304) {
            self.finish_with(status, None, "ok", EndedBy::Upstream, 0);
            return resp;
        }
        let declared = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let grpc = self.kind == "grpc";
        // A trailers-only gRPC answer carries its status in the head.
        let grpc_status = resp
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        resp.map(|inner| {
            LoggedBody {
                inner,
                log: Some(self),
                status,
                declared,
                sent: 0,
                grpc,
                messages: MessageBoundary::default(),
                grpc_status,
                revoked: Box::pin(revoked.cancelled_owned()),
                grace_over: Box::pin(grace_over.cancelled_owned()),
            }
            .boxed_unsync()
        })
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes of a request body as they pass.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        count: Arc<AtomicU64>,
    }
}

impl<B: Body<Data = Bytes>> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res {
            if let Some(d) = frame.data_ref() {
                this.count
                    .fetch_add(d.remaining() as u64, Ordering::Relaxed);
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer on its way to the caller; see the module docs.
struct LoggedBody {
    inner: ApiBody,
    log: Option<RequestLog>,
    status: u16,
    /// Content-Length of the answer, if it had one.
    declared: Option<u64>,
    sent: u64,
    grpc: bool,
    /// For a gRPC answer: where its messages stand, should it break.
    messages: MessageBoundary,
    grpc_status: Option<String>,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    grace_over: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl LoggedBody {
    fn finish(&mut self, outcome: &str, ended_by: EndedBy) {
        if let Some(log) = self.log.take() {
            log.finish_with(
                self.status,
                self.grpc_status.as_deref(),
                outcome,
                ended_by,
                self.sent,
            );
        }
    }
}

impl LoggedBody {
    /// The shutdown grace ended with the answer still streaming: it ends now, logged as
    /// `shutdown`. A gRPC answer between two messages ends with UNAVAILABLE (the caller may
    /// retry it at another replica); any other answer is cut, as the process's exit would.
    fn end_at_grace_over(&mut self) -> Result<Frame<Bytes>, BoxError> {
        self.inner = super::full_body(Bytes::new());
        self.finish("shutdown", EndedBy::Gateway);
        let why = "agentgate: the gateway is shutting down and its grace period ended before \
                   the answer did; retry the request (another replica, or this one once \
                   restarted, answers it)";
        if self.grpc && self.messages.between_messages() {
            return Ok(Frame::trailers(status_trailers(
                &tonic::Status::unavailable(why),
            )));
        }
        Err(why.into())
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if self.log.is_some() {
            // hyper stops reading a body once its Content-Length is sent: that is whole.
            if self.declared == Some(self.sent) {
                self.finish("ok", EndedBy::Upstream);
            } else {
                self.finish("caller_aborted", EndedBy::Caller);
            }
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.log.is_none() {
            return Poll::Ready(None);
        }
        if self.revoked.as_mut().poll(cx).is_ready() {
            self.inner = super::full_body(Bytes::new());
            tracing::warn!(
                agent = %self.log.as_ref().map_or("-", |l| l.agent.as_str()),
                token_id = %self.log.as_ref().map_or("-", |l| l.token.id.as_str()),
                "ending a tunnelled request: its API token was revoked"
            );
            self.finish("revoked", EndedBy::Gateway);
            if self.grpc {
                return Poll::Ready(Some(Ok(Frame::trailers(
                    super::grpc_front::status_headers(
                        tonic::Code::Unauthenticated,
                        "the API token of this call was revoked",
                    ),
                ))));
            }
            return Poll::Ready(Some(Err("agentgate: the API token was revoked".into())));
        }
        if self.grace_over.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(self.end_at_grace_over()));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.sent += d.len() as u64;
                    if self.grpc {
                        self.messages.advance(d);
                    }
                }
                if let Some(t) = frame.trailers_ref() {
                    self.grpc_status = t
                        .get(&GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    // Trailers end an answer: the server does not poll for more, and drops
                    // the body (which, unfinished, would read as the caller gone).
                    self.finish("ok", EndedBy::Upstream);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if e.is::<crate::tunnel::CallerStalled>() {
                    self.finish("caller_stalled", EndedBy::Gateway);
                } else {
                    self.finish("broken", EndedBy::Agent);
                    // A gRPC answer cut between two messages can still end properly, with a
                    // status clients may retry; a reset reads as INTERNAL to them.
                    if self.grpc && self.messages.between_messages() {
                        let status = tonic::Status::unavailable(format!(
                            "agentgate: the tunnel broke off the call mid-answer ({e}); it may or \
                             may not have finished at the upstream"
                        ));
                        return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))));
                    }
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.finish("ok", EndedBy::Upstream);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.log.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
