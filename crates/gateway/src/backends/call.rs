//! One agent-initiated call, forwarded to its backend.
//!
//! The call streams both ways as HTTP/2 frames: messages are never decoded, so every call
//! kind, compression and message size passes as the client sent it. What the gateway changes
//! is the metadata: credentials go, verified identity comes in (and anything that merely
//! claims to be identity goes first). What it adds is bounds: calls in flight per agent, an
//! optional maximum duration, the caller's own deadline, and a sentence for every failure.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tonic::{Code, Status};

use super::pool::{CallBody, ConnLease, SendFailure};
use super::Backend;
use crate::auth::AgentIdentity;
use crate::headers::{GRPC_STATUS, GRPC_TIMEOUT};
use crate::metrics::Metrics;

/// Metadata names the gateway sets; any a caller sends is removed first. `HeaderName`s: a
/// `&str` that is not a standard header is copied into a new name on every insert.
pub const AGENT_NAME_HEADER: HeaderName = HeaderName::from_static("agentgate-agent-name");
pub const AGENT_INSTANCE_HEADER: HeaderName = HeaderName::from_static("agentgate-agent-instance");
pub const TRANSPORT_HEADER: HeaderName = HeaderName::from_static("agentgate-transport");
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("agentgate-identity-signature");
pub const SIGNATURE_TIME_HEADER: HeaderName =
    HeaderName::from_static("agentgate-identity-timestamp");
/// Sent by our agent's local listener: which of the agent's instances makes the call. The
/// gateway believes it only if that instance of the same agent has a session here (instance
/// ids are the agent's own choice at registration; the token is the identity), and never
/// forwards it.
pub const INSTANCE_CLAIM_HEADER: HeaderName =
    HeaderName::from_static(agentgate_proto::gateway_methods::INSTANCE_CLAIM_HEADER);
/// Every metadata name with this prefix is the gateway's to set.
pub const RESERVED_PREFIX: &str = "agentgate-";

/// Lines a second for backend calls the gateway ended or that failed; the rest are counted in
/// the next line's `suppressed` (and every call in `agentgate_backend_calls_total`).
static CALL_END_LOG: agentgate_transport::LogBudget = agentgate_transport::LogBudget::new(10);

/// The most metadata (headers, or trailers) of a backend's answer the gateway passes on, as
/// HTTP/2 counts a header list (each name and value, plus 32 per field). gRPC clients
/// refuse far less by default (C-core at 16 KiB, grpc-go at 16 MiB).
pub const MAX_ANSWER_METADATA: usize = 64 * 1024;

/// The status for an answer whose `part` ("headers" or "trailers") is over
/// [`MAX_ANSWER_METADATA`], or `None`. The call ran at the backend: not a status to retry on.
fn oversized_answer(headers: &HeaderMap, part: &str, backend: &str) -> Option<Status> {
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    (size > MAX_ANSWER_METADATA).then(|| {
        Status::internal(format!(
            "agentgate: backend {backend:?} answered with {} KiB of {part}, more than the {} KiB \
             the gateway passes on; the call ran at the backend, but its answer is lost; the \
             backend should send less metadata",
            size.div_ceil(1024),
            MAX_ANSWER_METADATA / 1024
        ))
    })
}

/// Calls in flight per agent name to one backend.
pub struct AgentCallLimits {
    max: u32,
    counts: Mutex<HashMap<String, u32>>,
}

impl AgentCallLimits {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a place for `agent`, or `None` at the limit. Only authenticated names reach
    /// here, and a name's entry goes when its last call ends, so the map is bounded by the
    /// agents with calls open.
    fn try_take(backend: &Arc<Backend>, agent: &str, metrics: &Arc<Metrics>) -> Option<AgentSlot> {
        let limits = &backend.limits;
        if limits.max > 0 {
            let mut counts = limits.counts.lock().unwrap();
            let n = counts.entry(agent.to_string()).or_insert(0);
            if *n >= limits.max {
                return None;
            }
            *n += 1;
        }
        metrics.backend_calls_open.add(&[&backend.name], 1.0);
        Some(AgentSlot {
            backend: backend.clone(),
            agent: agent.to_string(),
            metrics: metrics.clone(),
        })
    }

    /// Calls `agent` has in flight now.
    pub fn in_flight(&self, agent: &str) -> u32 {
        self.counts.lock().unwrap().get(agent).copied().unwrap_or(0)
    }
}

/// One call's place in its agent's count (and in the open-calls gauge).
struct AgentSlot {
    backend: Arc<Backend>,
    agent: String,
    metrics: Arc<Metrics>,
}

impl Drop for AgentSlot {
    fn drop(&mut self) {
        self.metrics
            .backend_calls_open
            .add(&[&self.backend.name], -1.0);
        let limits = &self.backend.limits;
        if limits.max == 0 {
            return;
        }
        let mut counts = limits.counts.lock().unwrap();
        if let Some(n) = counts.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.agent);
            }
        }
    }
}

/// How a call ended, from the gateway's side: the `outcome` label of
/// `agentgate_backend_calls_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The backend answered with a status (any status: the backend's business).
    Answered,
    /// The agent had `max_calls_per_agent` calls open.
    Limited,
    /// No connection to the backend, or it failed before answering.
    Unavailable,
    /// The backend answered with an HTTP status instead of a gRPC one.
    HttpError,
    /// The backend reset the call mid-answer.
    Broken,
    /// The backend cancelled the call.
    CancelledByBackend,
    /// The caller went away (cancelled, or its connection ended).
    CancelledByCaller,
    /// The caller's deadline (`grpc-timeout`) passed.
    Deadline,
    /// `max_call_duration` passed.
    MaxDuration,
    /// The gateway shut down with the call still open after `shutdown_grace`.
    Shutdown,
    /// The caller's agent token was revoked.
    Revoked,
    /// The call's metadata was malformed (see `grpc_metadata::check_metadata`); it was not sent.
    InvalidMetadata,
    /// The backend answered with more metadata than [`MAX_ANSWER_METADATA`].
    OversizedAnswer,
}

impl Outcome {
    /// The caller's status when something outside the call ended it.
    fn outside_status(self) -> Status {
        match self {
            Outcome::Revoked => Status::unauthenticated(
                "agentgate: the agent token of this call was revoked; the call is ended",
            ),
            _ => shutdown_status(),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Limited => "limited",
            Outcome::Unavailable => "unavailable",
            Outcome::HttpError => "http_error",
            Outcome::Broken => "broken",
            Outcome::CancelledByBackend => "cancelled_by_backend",
            Outcome::CancelledByCaller => "cancelled_by_caller",
            Outcome::Deadline => "deadline",
            Outcome::MaxDuration => "max_duration",
            Outcome::Shutdown => "shutdown",
            Outcome::Revoked => "revoked",
            Outcome::InvalidMetadata => "invalid_metadata",
            Outcome::OversizedAnswer => "oversized_answer",
        }
    }
}

/// What is recorded when the call ends: one metric sample, and a log line when the gateway
/// (not the backend) decided the outcome. Dropped unfinished (the caller went away, before the
/// answer began or during it), it records the call as cancelled by the caller.
struct CallRecord {
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
    agent: String,
    method: String,
    started: tokio::time::Instant,
    recorded: bool,
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.record(
            Outcome::CancelledByCaller,
            Code::Cancelled,
            "the caller went away; the call is cancelled at the backend",
        );
    }
}

impl CallRecord {
    fn finish(mut self, outcome: Outcome, code: Code, detail: &str) {
        self.record(outcome, code, detail);
    }

    fn record(&mut self, outcome: Outcome, code: Code, detail: &str) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let code_label = crate::rpc_layer::code_label(code);
        self.metrics
            .backend_calls
            .inc(&[&self.backend.name, outcome.label(), code_label]);
        let duration = self.started.elapsed();
        self.metrics
            .backend_call_duration
            .observe(&[&self.backend.name], duration);
        let duration_ms = duration.as_millis() as u64;
        let b = &self.backend;
        if outcome == Outcome::Answered {
            tracing::debug!(
                backend = %b.name, agent = %self.agent, method = %self.method, code = code_label,
                duration_ms, "backend call finished"
            );
            return;
        }
        // One agent calling in a loop (over its limit, against a backend that is down) would
        // otherwise write a line per call.
        let Some(suppressed) = CALL_END_LOG.allow() else {
            return;
        };
        match outcome {
            Outcome::CancelledByCaller
            | Outcome::Deadline
            | Outcome::MaxDuration
            | Outcome::Shutdown
            | Outcome::Revoked => {
                tracing::info!(
                    backend = %b.name, agent = %self.agent, method = %self.method,
                    outcome = outcome.label(), duration_ms, suppressed,
                    "backend call ended: {detail}"
                )
            }
            _ => tracing::warn!(
                backend = %b.name, address = %b.pool.address(), agent = %self.agent,
                method = %self.method, outcome = outcome.label(), duration_ms, suppressed,
                "backend call failed: {detail}"
            ),
        }
    }

    /// Ends the call before it reached the backend, with `status` for the caller.
    fn refuse(self, outcome: Outcome, status: Status) -> http::Response<CallBody> {
        self.finish(outcome, status.code(), status.message());
        status.into_http()
    }
}

/// Why the gateway's timer would end the call.
#[derive(Clone, Copy)]
enum TimerReason {
    Deadline,
    MaxDuration(Duration),
}

struct CallTimer {
    at: tokio::time::Instant,
    reason: TimerReason,
}

impl CallTimer {
    /// The earlier of the caller's deadline and the backend's maximum call duration.
    fn of(headers: &HeaderMap, max_duration: Duration) -> Option<Self> {
        let now = tokio::time::Instant::now();
        let deadline = headers
            .get(&GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::headers::parse_grpc_timeout)
            .map(|d| CallTimer {
                at: now + d,
                reason: TimerReason::Deadline,
            });
        let max = (!max_duration.is_zero()).then(|| CallTimer {
            at: now + max_duration,
            reason: TimerReason::MaxDuration(max_duration),
        });
        match (deadline, max) {
            (Some(d), Some(m)) => Some(if d.at <= m.at { d } else { m }),
            (d, m) => d.or(m),
        }
    }

    fn status(&self, backend: &str) -> (Outcome, Status) {
        match self.reason {
            TimerReason::Deadline => (
                Outcome::Deadline,
                Status::deadline_exceeded(format!(
                    "agentgate: the call's deadline passed before backend {backend:?} finished"
                )),
            ),
            TimerReason::MaxDuration(d) => (
                Outcome::MaxDuration,
                Status::unavailable(format!(
                    "agentgate: the call reached backend {backend:?}'s max_call_duration of {}; \
                     call again",
                    humantime::format_duration(d)
                )),
            ),
        }
    }
}

/// The instance a call's identity names: the one its agent's local listener claims, if that
/// instance of the same agent has a session here; otherwise the one the same agent registered
/// on the call's connection (a client that registers and calls on one connection); otherwise
/// none.
pub fn verified_instance(
    headers: &HeaderMap,
    id: &AgentIdentity,
    directory: &crate::directory::Directory,
) -> Option<String> {
    if let Some(claim) = headers
        .get(&INSTANCE_CLAIM_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        if directory.has_instance(&id.name, claim) {
            return Some(claim.to_string());
        }
    }
    id.conn
        .registered
        .get()
        .filter(|(name, _)| *name == id.name)
        .map(|(_, instance)| instance.clone())
}

/// The metadata the backend receives: the caller's, without credentials, hop headers or
/// anything in the reserved prefix, plus verified identity.
fn prepare_headers(
    headers: &mut HeaderMap,
    id: &AgentIdentity,
    instance: Option<&str>,
    backend: &Backend,
    path: &str,
) {
    crate::headers::strip_hop_by_hop(headers, true);
    headers.remove(http::header::HOST);
    headers.remove(http::header::AUTHORIZATION);
    let reserved: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(RESERVED_PREFIX))
        .cloned()
        .collect();
    for name in reserved {
        headers.remove(&name);
    }
    let transport = id.conn.kind.as_str();
    let set = |headers: &mut HeaderMap, name: HeaderName, value: &str| {
        // Names and instance ids come from our token store and our own registration
        // checks; a value that is not a valid header is left out rather than mangled.
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(headers, AGENT_NAME_HEADER, &id.name);
    if let Some(instance) = instance {
        set(headers, AGENT_INSTANCE_HEADER, instance);
    }
    set(headers, TRANSPORT_HEADER, transport);
    if let Some(secret) = &backend.signing_secret {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let sig = identity_signature(
            secret,
            &now,
            path,
            &id.name,
            instance.unwrap_or(""),
            transport,
        );
        set(headers, SIGNATURE_TIME_HEADER, &now);
        set(headers, SIGNATURE_HEADER, &sig);
    }
}

/// `v1=` and the hex HMAC-SHA256 of the identity as docs/backends.md spells it: the lines
/// `v1`, timestamp, method path, agent name, instance (empty if none), transport, joined by
/// `\n`.
pub fn identity_signature(
    secret: &[u8],
    timestamp: &str,
    path: &str,
    agent: &str,
    instance: &str,
    transport: &str,
) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key size");
    mac.update(format!("v1\n{timestamp}\n{path}\n{agent}\n{instance}\n{transport}").as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The gRPC status for a backend that answered with an HTTP status and no gRPC status, as
/// gRPC's own HTTP-to-status table maps it.
fn status_for_http(backend: &str, status: http::StatusCode) -> Status {
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(
        code,
        format!("agentgate: backend {backend:?} answered HTTP {status} instead of a gRPC status"),
    )
}

/// What a call still open when the gateway ends it at shutdown gets.
fn shutdown_status() -> Status {
    Status::unavailable(
        "agentgate: the gateway is shutting down and its grace period is over; call again \
         (another replica, or this one once restarted, will answer)",
    )
}

/// Forwards one authenticated call to `backend` and returns the answer to stream back. Never
/// fails: every failure is a gRPC status with a sentence for the caller. Cancelling
/// `backends_ending` ends the call with UNAVAILABLE (shutdown, once the grace is over).
pub async fn forward(
    backend: Arc<Backend>,
    id: AgentIdentity,
    instance: Option<String>,
    metrics: Arc<Metrics>,
    backends_ending: tokio_util::sync::CancellationToken,
    mut req: http::Request<CallBody>,
) -> http::Response<CallBody> {
    let path = req.uri().path().to_string();
    let record = CallRecord {
        backend: backend.clone(),
        metrics,
        agent: id.name.clone(),
        method: path.clone(),
        started: tokio::time::Instant::now(),
        recorded: false,
    };
    let name = backend.name.as_str();
    let Some(slot) = AgentCallLimits::try_take(&backend, &id.name, &record.metrics) else {
        let max = backend.config.max_calls_per_agent;
        return record.refuse(
            Outcome::Limited,
            Status::resource_exhausted(format!(
                "agentgate: agent {:?} already has {max} calls open to backend {name:?} (its \
                 max_calls_per_agent); wait for one to end",
                id.name
            )),
        );
    };
    if let Err(why) = crate::grpc_metadata::check_metadata(req.headers_mut()) {
        let status = Status::invalid_argument(format!("agentgate: {why}"));
        return record.refuse(Outcome::InvalidMetadata, status);
    }
    let timer = CallTimer::of(req.headers(), backend.config.max_call_duration);
    let (mut parts, body) = req.into_parts();
    prepare_headers(
        &mut parts.headers,
        &id,
        instance.as_deref(),
        &backend,
        &path,
    );
    let mut uri = http::Uri::builder()
        .scheme(backend.pool.scheme().clone())
        .authority(backend.pool.address().clone());
    if let Some(pq) = parts.uri.path_and_query() {
        uri = uri.path_and_query(pq.clone());
    }
    parts.uri = match uri.build() {
        Ok(u) => u,
        Err(_) => {
            return record.refuse(
                Outcome::Unavailable,
                Status::internal("agentgate: the method path is not a valid URI"),
            )
        }
    };
    parts.version = http::Version::HTTP_2;
    parts.extensions = http::Extensions::new();
    let request = http::Request::from_parts(parts, body);

    // The request body goes out while the answer is awaited; a body still streaming once
    // the answer begins gets a task of its own (returned with the answer).
    let sent = async {
        backend.pool.send(request).await.map_err(|e| match e {
            SendFailure::CallerGone => caller_broke_off(),
            SendFailure::NoAnswer(e) => stream_failure(&e, name, false),
            e => unavailable(name, &e.to_string()),
        })
    };
    let timer_fired = async {
        match &timer {
            Some(t) => tokio::time::sleep_until(t.at).await,
            None => std::future::pending().await,
        }
    };
    // Ends the call from outside: shutdown once the grace is over, or the token revoked.
    let revoked = id.revoked.clone();
    let mut ended_from_outside = Box::pin(async move {
        tokio::select! {
            _ = backends_ending.cancelled_owned() => Outcome::Shutdown,
            _ = revoked.cancelled_owned() => Outcome::Revoked,
        }
    });
    let answered = tokio::select! {
        r = sent => r,
        _ = timer_fired => {
            let (outcome, status) = timer.as_ref().expect("fired").status(name);
            return record.refuse(outcome, status);
        }
        outcome = &mut ended_from_outside => {
            return record.refuse(outcome, outcome.outside_status());
        }
    };
    let (resp, pump, lease) = match answered {
        Ok(r) => r,
        Err((outcome, status)) => return record.refuse(outcome, status),
    };
    let (mut head, body) = resp.into_parts();
    if head.status != http::StatusCode::OK && !head.headers.contains_key(&GRPC_STATUS) {
        let status = status_for_http(name, head.status);
        return record.refuse(Outcome::HttpError, status);
    }
    // A head with the status is a trailers-only answer.
    let part = if head.headers.contains_key(&GRPC_STATUS) {
        "trailers"
    } else {
        "headers"
    };
    if let Some(status) = oversized_answer(&head.headers, part, name) {
        return record.refuse(Outcome::OversizedAnswer, status);
    }
    crate::headers::strip_hop_by_hop(&mut head.headers, false);
    // A trailers-only answer: the status is in the head and the call is over.
    if let Some(code) = head.headers.get(&GRPC_STATUS) {
        let code = grpc_code(code);
        record.finish(Outcome::Answered, code, "");
        return http::Response::from_parts(head, CallBody::empty());
    }
    let stop_pump = pump.map(super::stream::RequestPump::spawn);
    let body = AnswerBody {
        inner: Some(body),
        stop_pump,
        backend: backend.clone(),
        timer: timer.map(|t| (Box::pin(tokio::time::sleep_until(t.at)), t)),
        ending: ended_from_outside,
        record: Some(record),
        _slot: slot,
        _lease: lease,
    };
    http::Response::from_parts(head, CallBody::new(body))
}

/// The outcome and the caller's status for an error on the call's stream to the backend,
/// before the answer began or while it was `answering`.
fn stream_failure(e: &h2::Error, name: &str, answering: bool) -> (Outcome, Status) {
    if e.reason() == Some(h2::Reason::CANCEL) && !e.is_go_away() {
        return if e.is_remote() {
            (
                Outcome::CancelledByBackend,
                Status::cancelled(format!("agentgate: backend {name:?} cancelled the call")),
            )
        } else {
            // The gateway's own reset: the caller's request broke off (`RequestPump`).
            caller_broke_off()
        };
    }
    let what = super::stream::describe(e);
    if answering {
        (
            Outcome::Broken,
            Status::unavailable(format!(
                "agentgate: backend {name:?} broke off the call: {what}; call again"
            )),
        )
    } else {
        unavailable(name, &what)
    }
}

/// No answer could be had from the backend; `why` says what happened.
fn unavailable(name: &str, why: &str) -> (Outcome, Status) {
    (
        Outcome::Unavailable,
        Status::unavailable(format!(
            "agentgate: backend {name:?} is unavailable: {why}; try again later"
        )),
    )
}

/// The caller's request broke off before its answer: nobody is left to read the status.
fn caller_broke_off() -> (Outcome, Status) {
    (
        Outcome::CancelledByCaller,
        Status::cancelled(format!("agentgate: {}", SendFailure::CallerGone)),
    )
}

fn grpc_code(v: &HeaderValue) -> Code {
    v.to_str()
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(Code::Unknown, Code::from_i32)
}

fn trailers(status: &Status) -> Frame<Bytes> {
    Frame::trailers(agentgate_proto::status_on_break::status_trailers(status))
}

pin_project! {
    /// The backend's answer on its way to the caller. It ends the call with a status when
    /// the timer fires or the backend breaks the stream, and records the outcome once.
    struct AnswerBody {
        inner: Option<h2::RecvStream>,
        // Dropped with the answer: stops the request's pump, if one still runs.
        stop_pump: Option<super::stream::StopPumpOnDrop>,
        backend: Arc<Backend>,
        timer: Option<(Pin<Box<tokio::time::Sleep>>, CallTimer)>,
        ending: Pin<Box<dyn Future<Output = Outcome> + Send>>,
        record: Option<CallRecord>,
        _slot: AgentSlot,
        _lease: ConnLease,
    }
}

impl AnswerBody {
    /// Ends the call on the gateway's terms: the backend's stream is reset (dropped), the
    /// caller gets `status` as trailers.
    fn end(
        self: Pin<&mut Self>,
        outcome: Outcome,
        status: Status,
    ) -> Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        let this = self.project();
        // Both halves go, so the backend's stream is reset now, not when the caller lets go.
        *this.inner = None;
        *this.stop_pump = None;
        *this.timer = None;
        if let Some(record) = this.record.take() {
            record.finish(outcome, status.code(), status.message());
        }
        Poll::Ready(Some(Ok(trailers(&status))))
    }
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.as_mut().project();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let name = this.backend.name.as_str();
        match super::stream::poll_answer_frame(inner, cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(status) = oversized_answer(t, "trailers", name) {
                        return self.end(Outcome::OversizedAnswer, status);
                    }
                    let code = t.get(&GRPC_STATUS).map_or(Code::Unknown, grpc_code);
                    if let Some(record) = this.record.take() {
                        record.finish(Outcome::Answered, code, "");
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                let (outcome, status) = stream_failure(&e, name, true);
                return self.end(outcome, status);
            }
            Poll::Ready(None) => {
                *this.inner = None;
                *this.stop_pump = None;
                if let Some(record) = this.record.take() {
                    // An answer without trailers: the backend broke gRPC's framing.
                    record.finish(
                        Outcome::Broken,
                        Code::Unknown,
                        "the answer ended without a status",
                    );
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if let Some((sleep, timer)) = this.timer.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                let (outcome, status) = timer.status(name);
                return self.end(outcome, status);
            }
        }
        if let Poll::Ready(outcome) = this.ending.as_mut().poll(cx) {
            return self.end(outcome, outcome.outside_status());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_every_identity_field() {
        let s = |t, p, a, i, tr| {
            identity_signature(b"0123456789abcdef0123456789abcdef", t, p, a, i, tr)
        };
        let base = s("1", "/a.B/C", "edge", "i1", "grpc");
        assert!(base.starts_with("v1=") && base.len() == 3 + 64);
        for other in [
            s("2", "/a.B/C", "edge", "i1", "grpc"),
            s("1", "/a.B/D", "edge", "i1", "grpc"),
            s("1", "/a.B/C", "edgf", "i1", "grpc"),
            s("1", "/a.B/C", "edge", "i2", "grpc"),
            s("1", "/a.B/C", "edge", "i1", "wss"),
        ] {
            assert_ne!(other, base);
        }
    }

    #[test]
    fn http_statuses_map_as_grpc_does() {
        let code = |s: u16| status_for_http("b", http::StatusCode::from_u16(s).unwrap()).code();
        assert_eq!(code(404), Code::Unimplemented);
        assert_eq!(code(503), Code::Unavailable);
        assert_eq!(code(401), Code::Unauthenticated);
        assert_eq!(code(500), Code::Unknown);
    }
}
