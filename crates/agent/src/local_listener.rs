//! Sidecar mode (`--local-listen`): processes next to the agent (a runner, an admission
//! controller, a script) make gRPC calls to the gateway's backends through the agent's own
//! connection, without a token or a connection of their own.
//!
//! The listener speaks HTTP/2 without TLS and hands each call, frames untouched, to the
//! agent's current connection with the agent's credentials in place of anything the local
//! caller sent. The gateway authenticates it as the agent's call and names the agent to the
//! backend. When the agent moves to a new connection, new calls take the new one; calls in
//! flight finish on the old.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::status_on_break::StatusOnBreak;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use agentgate_proto::gateway_methods::{
    is_gateway_method, local_caller_refusal, INSTANCE_CLAIM_HEADER,
};
use agentgate_transport::LogBudget;

use crate::connection::CallCredentials;

/// How long a local call waits for the agent to be connected (it may be reconnecting)
/// before it is answered UNAVAILABLE.
pub const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(10);
/// HTTP/2 streams one local connection may open.
const LOCAL_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Local calls in flight after the agent stops get this long to finish.
const LOCAL_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Metadata names the gateway reserves for identity: a local caller's are removed here too,
/// so that what it sends never even reaches the gateway.
const RESERVED_PREFIX: &str = "agentgate-";

/// Lines per second for local calls that fail here: a local process in a loop must not fill
/// the agent's log.
static LOCAL_CALL_LOG: LogBudget = LogBudget::new(5);

/// The agent's current connection to the gateway, for local calls: `None` while it has none.
pub type CurrentChannel = watch::Receiver<Option<Channel>>;

/// Calls the gateway's backends over the agent's current connection, as the agent.
#[derive(Clone)]
pub struct BackendCaller {
    current: CurrentChannel,
    auth: Arc<CallCredentials>,
}

/// Binds `addr`; refuses to start if it cannot, and warns when it is not loopback.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for local gRPC calls on {addr}: {e}"))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the local listener is not on a loopback address: any process that reaches it \
             calls the gateway's backends as this agent. Bind it to 127.0.0.1 unless that is \
             what you want"
        );
    }
    Ok(listener)
}

/// Serves local calls until `stop`, then lets calls in flight finish (within a grace).
pub async fn serve(listener: TcpListener, caller: BackendCaller, stop: CancellationToken) {
    let local = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    tracing::info!(addr = %local, "local listener ready: gRPC calls here go to the gateway's backends as this agent");
    let tasks = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("local listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        agentgate_transport::set_nodelay(&tcp);
        let caller = caller.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut tcp = tcp;
            if !speaks_http2(&mut tcp, peer).await {
                return;
            }
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let caller = caller.clone();
                async move { Ok::<_, Infallible>(caller.call(req.map(Body::new)).await) }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(LOCAL_MAX_CONCURRENT_STREAMS)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "local connection ended: {e}");
                    }
                    return;
                }
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(LOCAL_SHUTDOWN_GRACE, conn).await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// How long a new local connection has to send its first bytes before it is served anyway.
const FIRST_BYTES_WAIT: Duration = Duration::from_secs(5);

/// What a local client that does not speak HTTP/2 is told (curl, a browser, an HTTP/1.1 gRPC
/// client): the HTTP/2 server would answer it with a SETTINGS frame and a reset.
const NOT_HTTP2_ANSWER: &str = "agentgate agent: the local listener takes gRPC calls over \
HTTP/2 without TLS (h2c, prior knowledge), and this client spoke something else (HTTP/1.1?)\n";

/// Whether the client's first bytes begin the HTTP/2 preface; one that sends something else
/// gets [`NOT_HTTP2_ANSWER`] and a line in the log (within [`LOCAL_CALL_LOG`]).
async fn speaks_http2(tcp: &mut tokio::net::TcpStream, peer: SocketAddr) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 3];
    let n = match tokio::time::timeout(FIRST_BYTES_WAIT, tcp.peek(&mut first)).await {
        Ok(Ok(n)) => n,
        // Silent, or gone: the HTTP/2 server deals with it as it would.
        _ => return true,
    };
    if n == 0 || agentgate_transport::HTTP2_PREFACE.starts_with(&first[..n]) {
        return true;
    }
    if let Some(suppressed) = LOCAL_CALL_LOG.allow() {
        tracing::warn!(%peer, suppressed, "local connection refused: it did not speak HTTP/2 (gRPC without TLS)");
    }
    let answer = format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{NOT_HTTP2_ANSWER}",
        NOT_HTTP2_ANSWER.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
    false
}

impl BackendCaller {
    pub(crate) fn new(current: CurrentChannel, auth: Arc<CallCredentials>) -> Self {
        Self { current, auth }
    }

    /// Sends one call (a gRPC request with a path such as `/runner.jobs.v1.JobRouter/GetJob`)
    /// on the agent's current connection, waiting up to [`WAIT_FOR_CONNECTION`] for one.
    /// Never fails: a call that cannot be sent is answered UNAVAILABLE with a sentence.
    pub async fn call(&self, req: http::Request<Body>) -> http::Response<Body> {
        forward(req, self.current.clone(), &self.auth).await
    }
}

/// One call, sent on the agent's current connection.
async fn forward(
    req: http::Request<Body>,
    mut current: CurrentChannel,
    auth: &CallCredentials,
) -> http::Response<Body> {
    let path = req.uri().path().to_string();
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        // Not a gRPC call (curl, a browser, a health checker): an HTTP answer it can read.
        let mut resp = http::Response::new(Body::new(http_body_util::Full::new(
            bytes::Bytes::from_static(
                b"agentgate agent: the local listener takes gRPC calls (content-type \
                  application/grpc) to the gateway's backends only\n",
            ),
        )));
        *resp.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return resp;
    }
    if is_gateway_method(&path) {
        // The agent's own session (registration, tunnels) is the agent's alone: a local
        // process calling Register on the agent's connection would end the agent's session.
        return refuse(&path, local_caller_refusal(&path, "agentgate agent"));
    }
    // The caller's deadline bounds the wait for a connection, too.
    let deadline = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(agentgate_proto::headers::parse_grpc_timeout);
    let wait = deadline.map_or(WAIT_FOR_CONNECTION, |d| d.min(WAIT_FOR_CONNECTION));
    let started = tokio::time::Instant::now();
    let (timed_out, channel) =
        match tokio::time::timeout(wait, current.wait_for(Option::is_some)).await {
            Err(_) => (true, None),
            // The watch's guard goes at the end of this arm: it must not live across an await.
            Ok(r) => (false, r.ok().and_then(|c| c.clone())),
        };
    let Some(mut channel) = channel else {
        let status = if timed_out && deadline.is_some_and(|d| d <= WAIT_FOR_CONNECTION) {
            tonic::Status::deadline_exceeded(
                "agentgate agent: the call's deadline passed while the agent was not \
                 connected to the gateway",
            )
        } else {
            tonic::Status::unavailable(format!(
                "agentgate agent: not connected to the gateway (waited {}s); try again",
                WAIT_FOR_CONNECTION.as_secs()
            ))
        };
        return refuse(&path, status);
    };
    let (mut parts, body) = req.into_parts();
    // What is left of the caller's deadline after the wait goes on with the call.
    if let Some(d) = deadline {
        let left = d.saturating_sub(started.elapsed());
        let left = agentgate_proto::headers::format_grpc_timeout(left);
        if let Ok(v) = http::HeaderValue::from_str(&left) {
            parts.headers.insert("grpc-timeout", v);
        }
    }
    let reserved: Vec<_> = parts
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with(RESERVED_PREFIX))
        .cloned()
        .collect();
    for name in reserved {
        parts.headers.remove(&name);
    }
    auth.apply(&mut parts.headers);
    // Which instance of the agent calls: the gateway checks it against the sessions it holds.
    if let Ok(v) = http::HeaderValue::from_str(&auth.instance_id) {
        parts.headers.insert(INSTANCE_CLAIM_HEADER, v);
    }
    let req = http::Request::from_parts(parts, body);
    let sent = match channel.ready().await {
        Ok(ready) => ready.call(req).await,
        Err(e) => Err(e),
    };
    match sent {
        // A stream cut after its answer began (the connection to the gateway broke) ends with
        // UNAVAILABLE where it can, not with a reset the caller reads as INTERNAL.
        Ok(resp) => resp.map(|body| {
            Body::new(StatusOnBreak::new(body, |e| {
                tonic::Status::unavailable(format!(
                    "agentgate agent: the connection to the gateway broke off the call \
                     mid-answer ({e}); it may or may not have finished at the backend"
                ))
            }))
        }),
        Err(e) if agentgate_transport::error_chain::find::<tonic::TimeoutExpired>(&e).is_some() => {
            refuse(
                &path,
                tonic::Status::deadline_exceeded(
                    "agentgate agent: the call's deadline passed before the gateway answered",
                ),
            )
        }
        // The call may have reached the gateway, and the backend, before the break: the
        // caller decides whether it is safe to call again.
        Err(e) => refuse(
            &path,
            tonic::Status::unavailable(format!(
                "agentgate agent: the connection to the gateway broke off the call ({e}); \
                 it may or may not have reached the backend"
            )),
        ),
    }
}

/// Answers a local call with `status`, and says so in the log (within [`LOCAL_CALL_LOG`]).
fn refuse(path: &str, status: tonic::Status) -> http::Response<Body> {
    if let Some(suppressed) = LOCAL_CALL_LOG.allow() {
        tracing::warn!(
            method = path,
            code = agentgate_proto::status_code::code_name(status.code()),
            suppressed,
            "local call not passed on: {}",
            status.message()
        );
    }
    status.into_http()
}
