//! Executing one tunnelled request against a local upstream, streaming both ways.
//!
//! The request body arrives as Chunk messages and is fed to the upstream through a small
//! bounded channel; the response body goes back as Chunk messages through the tunnel's small
//! queue. Nothing buffers a whole body. If the gateway's side of the tunnel ends before we
//! sent our trailer, the request was cancelled: the upstream request is dropped, which closes
//! its connection. With a version-2 gateway the body bytes already there when the response
//! head arrives travel with the head, and for a small answer that is the whole exchange.

use std::collections::HashMap;
use std::time::Duration;

use agentgate_proto::headers::to_proto;
use agentgate_proto::pump::{pump_body, PumpEnd};
use agentgate_proto::v1::{
    agent_message, gateway_message, tunnel_error, AgentMessage, GatewayMessage, Header,
    RequestHead, RequestKind, ResponseHead, TunnelError,
};
use bytes::Bytes;
use futures_util::FutureExt;
use http::header::HeaderMap;
use http_body::Body as _;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Empty, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::config::AgentConfig;

/// After our answer, how long we wait for the gateway to end its side of the stream (or, in
/// version 2, to end a request the upstream did not read whole).
pub(crate) const LINGER_FOR_GATEWAY_CLOSE: Duration = Duration::from_secs(30);

/// A request without a body is `Empty` (known to be empty: nothing to poll, no channel);
/// one with a body streams it from the tunnel through a small channel.
type RequestBody = Either<Empty<Bytes>, StreamBody<BodyStream>>;
type BodyStream = ReceiverStream<Result<Frame<Bytes>, std::io::Error>>;
type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, RequestBody>;

/// The agent's upstreams and the HTTP clients that reach them.
pub struct Upstreams {
    http: HashMap<String, url::Url>,
    grpc: Option<url::Url>,
    http_client: HttpsClient,
    grpc_client: HttpsClient,
    response_timeout: Duration,
    chunk_size: usize,
}

impl Upstreams {
    pub fn new(cfg: &AgentConfig) -> anyhow::Result<Self> {
        /// Headers an upstream's HTTP/1.1 answer may carry.
        const UPSTREAM_MAX_HEADERS: usize = 256;
        use agentgate_transport::tls::{client_config, ServerVerification};
        let verify = match &cfg.upstream_ca {
            Some(p) => ServerVerification::CaFile(p.clone()),
            None => ServerVerification::SystemRoots,
        };
        let tls = client_config(&verify)?;
        let build = |http2_only: bool| {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(cfg.upstream_connect_timeout));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            Client::builder(TokioExecutor::new())
                .http2_only(http2_only)
                // hyper's default of 100 made an answer with more headers fail inside the
                // agent ("message head is too large"): the caller got 502 "failed before
                // answering" for an upstream that had answered.
                .http1_max_headers(UPSTREAM_MAX_HEADERS)
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https)
        };
        Ok(Self {
            http: cfg.http_upstreams.iter().cloned().collect(),
            grpc: cfg.grpc_upstream.clone(),
            http_client: build(false),
            grpc_client: build(true),
            response_timeout: cfg.upstream_response_timeout,
            chunk_size: cfg.chunk_size,
        })
    }

    pub fn http_names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.http.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn has_grpc(&self) -> bool {
        self.grpc.is_some()
    }

    /// Runs one request: `head` was just received on the tunnel, `inbound` carries the rest
    /// of the request, and `tx` sends the response back. Says whether the stream can carry
    /// another request (version 2) or must close.
    pub async fn execute(
        &self,
        head: RequestHead,
        inbound: &mut Streaming<GatewayMessage>,
        tx: &mpsc::Sender<AgentMessage>,
    ) -> After {
        let started = std::time::Instant::now();
        let v2 = head.protocol_version >= 2;
        let mut request_ended = v2 && head.end_of_request;
        let (mut body_tx, body) = if request_ended {
            (None, Either::Left(Empty::new()))
        } else {
            let (body_tx, body_rx) = mpsc::channel(4);
            let body = StreamBody::new(ReceiverStream::new(body_rx));
            (Some(body_tx), Either::Right(body))
        };
        let mut next = None;
        let outcome = {
            let exchange = self.exchange(&head, body, tx, v2);
            tokio::pin!(exchange);
            loop {
                tokio::select! {
                    r = &mut exchange => break r,
                    e = next_event(inbound, &mut body_tx, request_ended, v2), if next.is_none() => {
                        match e {
                            Event::EndOfRequest => request_ended = true,
                            Event::Next(m) => next = Some(m),
                            Event::Cancelled => {
                                break Err(ExchangeError::Broken("cancelled by the gateway".into()));
                            }
                        }
                    }
                }
            }
        };
        // A served request is a `debug` line: the gateway's access log (`agentgate::access`)
        // already has one line per request with the caller, status and duration, and a second
        // line here cost the agent about a tenth of its CPU per small request at the default
        // level (docs/BENCHMARKS.md, thirteenth session). What failed stays a warning.
        match &outcome {
            Ok(status) => tracing::debug!(
                method = %head.method,
                path = %head.path_and_query,
                upstream = %upstream_label(&head),
                status,
                duration_ms = started.elapsed().as_millis() as u64,
                "tunnel request served"
            ),
            Err(ExchangeError::Reported(why) | ExchangeError::Broken(why)) => tracing::warn!(
                method = %head.method,
                path = %head.path_and_query,
                upstream = %upstream_label(&head),
                duration_ms = started.elapsed().as_millis() as u64,
                "tunnel request not completed: {why}"
            ),
        }
        if let Err(ExchangeError::Broken(_)) = outcome {
            // Cancelled, or our answer was cut short: this stream carries nothing more.
            return After::Close;
        }
        if v2 {
            // Our answer is complete; the stream is idle again once the gateway's request is
            // (the upstream may have answered before reading all of it).
            if !request_ended {
                let mut discard = None;
                let rest = next_event(inbound, &mut discard, false, true);
                match tokio::time::timeout(LINGER_FOR_GATEWAY_CLOSE, rest).await {
                    Ok(Event::EndOfRequest) => {}
                    _ => return After::Close,
                }
            }
            return After::Idle { next };
        }
        // Version 1: one request per stream; the gateway ends its side after our answer.
        After::CloseGently
    }

    /// Sends the request upstream and streams the answer into `tx`. Returns the upstream
    /// status, or why it failed.
    async fn exchange(
        &self,
        head: &RequestHead,
        body: RequestBody,
        tx: &mpsc::Sender<AgentMessage>,
        v2: bool,
    ) -> Result<u16, ExchangeError> {
        let kind = RequestKind::try_from(head.kind).unwrap_or(RequestKind::Unspecified);
        let (base, client) = match kind {
            RequestKind::Grpc => match &self.grpc {
                Some(u) => (u, &self.grpc_client),
                None => {
                    return fail(
                        tx,
                        tunnel_error::Code::UnknownUpstream,
                        "no gRPC upstream configured".into(),
                    )
                    .await
                }
            },
            RequestKind::Http => match self.http.get(&head.upstream) {
                Some(u) => (u, &self.http_client),
                None => {
                    let msg = format!("no HTTP upstream named {:?}", head.upstream);
                    return fail(tx, tunnel_error::Code::UnknownUpstream, msg).await;
                }
            },
            RequestKind::Unspecified => {
                return fail(
                    tx,
                    tunnel_error::Code::BadRequest,
                    "request kind missing".into(),
                )
                .await
            }
        };
        let uri = match join_uri(base, &head.path_and_query) {
            Ok(u) => u,
            Err(e) => return fail(tx, tunnel_error::Code::BadRequest, e).await,
        };
        let mut req = http::Request::new(body);
        *req.uri_mut() = uri;
        *req.method_mut() = match http::Method::from_bytes(head.method.as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                return fail(
                    tx,
                    tunnel_error::Code::BadRequest,
                    format!("invalid method {:?}", head.method),
                )
                .await
            }
        };
        *req.headers_mut() = headers_from(&head.headers);
        if kind == RequestKind::Grpc {
            *req.version_mut() = http::Version::HTTP_2;
        }
        let timeout = match (kind, head.timeout_millis) {
            (_, ms) if ms > 0 => Duration::from_millis(ms),
            (RequestKind::Grpc, _) => Duration::MAX,
            _ => self.response_timeout,
        };
        // What goes back to the caller names the upstream, never its address: that stays in
        // this agent's log.
        let target = || format!("{} upstream", upstream_label(head));
        let resp = match tokio::time::timeout(timeout, client.request(req)).await {
            Err(_) => {
                let target = target();
                let msg = format!(
                    "the {target} did not answer within {}",
                    humantime_secs(timeout)
                );
                tracing::warn!(address = %base, "{msg}");
                return fail(tx, tunnel_error::Code::UpstreamTimeout, msg).await;
            }
            Ok(Err(e)) => {
                let target = target();
                let code = if is_timeout(&e) {
                    tunnel_error::Code::UpstreamTimeout
                } else {
                    tunnel_error::Code::UpstreamUnavailable
                };
                tracing::warn!(address = %base, "the {target} failed: {}", error_chain(&e));
                let msg = format!("the {target} {}", public_reason(&e));
                return fail(tx, code, msg).await;
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let headers = to_proto(resp.headers());
        let mut body = resp.into_body();
        let mut first = ReadyBody::default();
        if v2 {
            if let Err(e) = first.take_ready(&mut body, self.chunk_size) {
                return fail(tx, tunnel_error::Code::UpstreamUnavailable, e).await;
            }
        }
        let head_msg = AgentMessage {
            msg: Some(agent_message::Msg::ResponseHead(ResponseHead {
                status: status as u32,
                headers,
                body: first.data.take().unwrap_or_default(),
                end_of_response: first.complete,
                trailers: std::mem::take(&mut first.trailers),
            })),
        };
        tx.send(head_msg)
            .await
            .map_err(|_| ExchangeError::Broken("gateway went away".into()))?;
        if first.complete {
            return Ok(status);
        }
        let end = pump_body(body, first.overflow.take(), self.chunk_size, tx, |_| {}).await;
        match end {
            PumpEnd::Complete => Ok(status),
            PumpEnd::BodyFailed(e) => {
                // An error ends the answer; the gateway fails the caller's body.
                let message = format!("upstream body failed: {e}");
                fail(tx, tunnel_error::Code::UpstreamUnavailable, message).await
            }
            PumpEnd::ReceiverGone => Err(ExchangeError::Broken("gateway went away".into())),
        }
    }
}

/// Why an answer is not a normal one.
enum ExchangeError {
    /// An Error message went out: the answer is over (version 2: the stream can carry the next
    /// request).
    Reported(String),
    /// The answer was cut short, or the request cancelled: the stream must close.
    Broken(String),
}

/// How a stream goes on after a request.
pub enum After {
    /// Version 2: idle again; `next` is a message the gateway already sent for what follows.
    Idle { next: Option<GatewayMessage> },
    /// Version 1: the answer is out; close the stream gently (`pool::close_gently`), since a
    /// reset could overtake the answer's last messages that the gateway has not read yet.
    CloseGently,
    /// A cancelled request, or a request body that never ended: the gateway's side is over.
    Close,
}

/// The part of an upstream response body that is already there when its head arrives
/// (version 2 sends it with the head; for a small answer that is all of it).
#[derive(Default)]
struct ReadyBody {
    data: Option<Bytes>,
    /// A frame that did not fit in `chunk_size`, to be sent as the first Chunk.
    overflow: Option<Bytes>,
    trailers: Vec<Header>,
    complete: bool,
}

impl ReadyBody {
    fn take_ready(
        &mut self,
        body: &mut hyper::body::Incoming,
        chunk_size: usize,
    ) -> Result<(), String> {
        let mut buf = bytes::BytesMut::new();
        loop {
            if body.is_end_stream() {
                self.complete = true;
                break;
            }
            let frame = match body.frame().now_or_never() {
                None => break,
                Some(None) => {
                    self.complete = true;
                    break;
                }
                Some(Some(f)) => f.map_err(|e| format!("upstream body failed: {e}"))?,
            };
            match frame.into_data() {
                Ok(data) if buf.len() + data.len() <= chunk_size => {
                    if buf.is_empty() && self.data.is_none() {
                        self.data = Some(data);
                    } else {
                        if let Some(d) = self.data.take() {
                            buf.extend_from_slice(&d);
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                Ok(data) => {
                    self.overflow = Some(data);
                    break;
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        self.trailers = to_proto(&t);
                    }
                    self.complete = true;
                    break;
                }
            }
        }
        if !buf.is_empty() {
            self.data = Some(buf.freeze());
        }
        Ok(())
    }
}

fn upstream_label(head: &RequestHead) -> &str {
    if head.kind == RequestKind::Grpc as i32 {
        "grpc"
    } else {
        &head.upstream
    }
}

async fn fail(
    tx: &mpsc::Sender<AgentMessage>,
    code: tunnel_error::Code,
    message: String,
) -> Result<u16, ExchangeError> {
    let msg = AgentMessage {
        msg: Some(agent_message::Msg::Error(TunnelError {
            code: code as i32,
            message: message.clone(),
        })),
    };
    match tx.send(msg).await {
        Ok(()) => Err(ExchangeError::Reported(message)),
        Err(_) => Err(ExchangeError::Broken(message)),
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        if err.to_string().contains("timed out") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// "outer: inner: innermost", the way operators want to read it.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// `base` (scheme, authority and optional path prefix) joined with `path_and_query`.
pub fn join_uri(base: &url::Url, path_and_query: &str) -> Result<http::Uri, String> {
    let prefix = base.path().trim_end_matches('/');
    let host = base.host_str().ok_or("upstream URL has no host")?;
    let bracket = host.contains(':') && !host.starts_with('[');
    let port = base
        .port()
        .map(|p| (p, p.checked_ilog10().unwrap_or(0) as usize + 1));
    let slash = !path_and_query.starts_with('/');
    // One string of exactly its length, handed to `Uri` without a copy: this runs for every
    // request (it was six allocations with `format!`).
    let len = base.scheme().len()
        + "://".len()
        + host.len()
        + 2 * usize::from(bracket)
        + port.map_or(0, |(_, digits)| 1 + digits)
        + prefix.len()
        + usize::from(slash)
        + path_and_query.len();
    let mut uri = String::with_capacity(len);
    uri.push_str(base.scheme());
    uri.push_str("://");
    if bracket {
        uri.push('[');
    }
    uri.push_str(host);
    if bracket {
        uri.push(']');
    }
    if let Some((p, _)) = port {
        use std::fmt::Write;
        let _ = write!(uri, ":{p}");
    }
    uri.push_str(prefix);
    if slash {
        uri.push('/');
    }
    uri.push_str(path_and_query);
    debug_assert_eq!(uri.len(), len, "join_uri sized its string wrong");
    http::Uri::try_from(uri).map_err(|e| format!("invalid upstream URI: {e}"))
}

/// Tunnel headers as an HTTP header map; invalid ones (the gateway never sends them) are dropped.
fn headers_from(h: &[Header]) -> HeaderMap {
    agentgate_proto::headers::from_proto(h, |_| {})
}

/// What the gateway's side of a busy stream did next.
enum Event {
    /// The request is complete (its body went to the upstream).
    EndOfRequest,
    /// Version 2, after the end of the request: a message for what follows.
    Next(GatewayMessage),
    /// The stream ended or failed before our answer was complete: the request is cancelled.
    Cancelled,
}

/// Reads the gateway's side of a busy stream: body chunks into `body_tx` until the end of the
/// request, and after it, whatever comes next. Cancel-safe between messages; a chunk being
/// handed to the upstream is lost if dropped, which only happens once the answer is complete.
async fn next_event(
    inbound: &mut Streaming<GatewayMessage>,
    body_tx: &mut Option<mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>>,
    request_ended: bool,
    v2: bool,
) -> Event {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(GatewayMessage { msg: Some(m) })) => m,
            Ok(Some(GatewayMessage { msg: None })) => continue,
            Ok(None) | Err(_) => {
                if let Some(tx) = body_tx.take() {
                    let _ = tx.try_send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "request cancelled by the gateway",
                    )));
                }
                return Event::Cancelled;
            }
        };
        match msg {
            gateway_message::Msg::Chunk(c) if !request_ended => {
                if let Some(tx) = body_tx {
                    if tx.send(Ok(Frame::data(c.data))).await.is_err() {
                        // The upstream stopped reading the body; the rest is dropped.
                        *body_tx = None;
                    }
                }
            }
            gateway_message::Msg::EndOfRequest(end) if !request_ended => {
                if let Some(tx) = body_tx.take() {
                    if !end.trailers.is_empty() {
                        let _ = tx
                            .send(Ok(Frame::trailers(headers_from(&end.trailers))))
                            .await;
                    }
                }
                return Event::EndOfRequest;
            }
            m if request_ended && v2 => return Event::Next(GatewayMessage { msg: Some(m) }),
            _ => {}
        }
    }
}

/// A whole number of seconds, or milliseconds below one second.
fn humantime_secs(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Why an upstream request failed, in words that reveal nothing about where the upstream is.
fn public_reason(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        "refused the connection or could not be reached"
    } else if is_timeout(e) {
        "timed out"
    } else {
        "failed before answering"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_uris() {
        let b = url::Url::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!(
            join_uri(&b, "/a?b=1").unwrap(),
            "http://127.0.0.1:9000/a?b=1"
        );
        let b = url::Url::parse("https://svc.local/prefix/").unwrap();
        assert_eq!(join_uri(&b, "/x").unwrap(), "https://svc.local/prefix/x");
        let b = url::Url::parse("http://[::1]:80/").unwrap();
        assert_eq!(join_uri(&b, "/").unwrap(), "http://[::1]/");
        let b = url::Url::parse("http://[fe80::1]:65535/p").unwrap();
        assert_eq!(
            join_uri(&b, "x?y=1").unwrap(),
            "http://[fe80::1]:65535/p/x?y=1"
        );
        let b = url::Url::parse("http://up:8/").unwrap();
        assert_eq!(join_uri(&b, "/").unwrap(), "http://up:8/");
        assert!(join_uri(&b, "/a b").is_err(), "a space is no URI");
    }
}
