//! Forwarding one request down a parked tunnel and streaming the answer back.
//!
//! Memory is bounded on every hop: the request body is read from the client only as fast as
//! the tunnel's small queue and HTTP/2 flow control allow, and the response body is read from
//! the tunnel only as fast as the client consumes it. Dropping the response body before the
//! agent's trailer ends the gateway's side of the stream, which the agent takes as cancellation.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::{
    agent_message, gateway_message, GatewayMessage, RequestHead, RequestKind,
};
use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

use super::answer_body::{message_kind, CompleteBody, Reuse, TunnelBody};
use super::request_pump::RequestPump;
use super::stalled_caller::{StalledAnswer, WatchedBody};
use super::{ForwardError, ParkedTunnel, TunnelParking};
use crate::directory::Directory;
use crate::headers::from_proto;
use crate::metrics::Metrics;

/// A boxed response body: from a local tunnel, or streamed from a peer replica.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response head from the agent, and its body still streaming.
pub struct ForwardResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: ResponseBody,
}

/// The `transport` label of a request another replica's agent served.
pub const REPLICA: &str = "replica";
/// The `transport` label of a request no agent got.
pub const NO_AGENT: &str = "none";

/// Which agent connection a request went down (`grpc`, `grpcs`, `ws`, `wss`, or `replica`
/// when another replica was asked), set as soon as the request went out: the access log and
/// `agentgate_tunnel_requests_total` name it even when no answer came back (the caller went
/// away first, the tunnel broke). `none` while no agent has the request.
#[derive(Clone)]
pub struct ServedOver(Arc<std::sync::Mutex<&'static str>>);

impl Default for ServedOver {
    fn default() -> Self {
        Self(Arc::new(std::sync::Mutex::new(NO_AGENT)))
    }
}

impl ServedOver {
    pub fn set(&self, transport: &'static str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = transport;
    }

    pub fn get(&self) -> &'static str {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How often a request waiting for a tunnel looks whether its agent is still connected.
const PRESENCE_RECHECK: Duration = Duration::from_millis(250);

/// How many tunnels one request may try: a parked tunnel found dead before anything was sent
/// on it is always replaced, and a tunnel that broke before the response head is replaced only
/// for a request that is safe to send twice.
const TUNNEL_ATTEMPTS: usize = 3;

/// The tunnel protocol version this gateway speaks (see `tunnel.proto`).
pub const PROTOCOL_VERSION: u32 = 2;

/// How one attempt on one tunnel went wrong.
enum AttemptError {
    /// The tunnel was dead before the head went out: the head comes back, the body was not
    /// touched, and any other tunnel may be tried.
    NotSent(RequestHead),
    /// The tunnel broke before the response head, after the head went out.
    Broken(ForwardError),
    /// A final answer (the agent's error, or a broken tunnel for a request that is not safe
    /// to repeat).
    Final(ForwardError),
}

/// The tunnels of agents connected to this replica, and how a request goes down one: what
/// the router and the internal API (a peer replica's requests) share.
pub struct LocalTunnels {
    /// The parked streams, per agent.
    pub parking: Arc<TunnelParking>,
    /// The agents with a session here (a connected agent with no idle tunnel is "busy", not
    /// "not connected").
    directory: Arc<Directory>,
    metrics: Arc<Metrics>,
    /// `tunnel_wait`: how long a request waits for an idle tunnel of a connected agent.
    pub tunnel_wait: Duration,
    /// `agent_reconnect_wait`: how long a request waits for an agent that went away while it
    /// waited (its tunnel broke with its connection; see [`LocalTunnels::take`]).
    reconnect_wait: Duration,
    /// `tunnel_chunk_size`: the largest body chunk sent to an agent.
    chunk_size: usize,
    /// `stalled_caller_timeout`: how long a streaming answer may wait on its caller before it
    /// is cancelled at the agent (`stalled_caller.rs`); zero: never.
    stalled_caller_timeout: Duration,
    /// Cancelled when the shutdown grace is over: a request still waiting for its agent's
    /// answer then gets 503 `shutdown` with a sentence, instead of an empty reply when the
    /// process exits.
    ending: tokio_util::sync::CancellationToken,
}

impl LocalTunnels {
    /// The shutdown grace is over: requests still waiting for an answer end (see `ending`).
    pub fn end_open_requests(&self) {
        self.ending.cancel();
    }

    /// Cancelled when the shutdown grace is over: the tunnel API ends the answers still
    /// streaming then (`api::access_log`), as this ends those still awaited.
    pub fn grace_over(&self) -> tokio_util::sync::CancellationToken {
        self.ending.clone()
    }

    pub fn new(
        parking: Arc<TunnelParking>,
        directory: Arc<Directory>,
        metrics: Arc<Metrics>,
        (tunnel_wait, reconnect_wait): (Duration, Duration),
        chunk_size: usize,
        stalled_caller_timeout: Duration,
    ) -> Self {
        Self {
            parking,
            directory,
            metrics,
            tunnel_wait,
            reconnect_wait,
            chunk_size,
            stalled_caller_timeout,
            ending: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Whether `agent` is connected here or has a tunnel parked here.
    pub fn holds(&self, agent: &str) -> bool {
        self.directory.is_connected(agent) || self.parking.idle_count(agent) > 0
    }

    /// Takes a live parked tunnel of `agent`, waiting up to `wait`, preferring connections
    /// other than `avoid`. An agent that is connected nowhere here (any more) is waited for
    /// only `agent_reconnect_wait` from the start, as the router waits for an agent connected
    /// nowhere: a request retried after its tunnel broke because the agent died waited the
    /// whole `tunnel_wait` (10 s) whenever the retry began before the agent's session ended.
    pub async fn take(
        &self,
        agent: &str,
        wait: Duration,
        avoid: Option<u64>,
    ) -> Result<ParkedTunnel, ForwardError> {
        // The timer's clock, as the waits below use it (paused in tests).
        let started = tokio::time::Instant::now();
        let taken = loop {
            let limit = if self.directory.is_connected(agent) {
                wait
            } else {
                wait.min(self.reconnect_wait)
            };
            let left = limit.saturating_sub(started.elapsed());
            let slice = left.min(PRESENCE_RECHECK);
            match self.parking.take(agent, slice, avoid).await {
                Some(t) => break Some(t),
                None if slice == left => break None,
                None => {}
            }
        };
        self.metrics.tunnel_wait.observe(
            &[if taken.is_some() { "got" } else { "none" }],
            started.elapsed(),
        );
        taken.ok_or_else(|| {
            if self.directory.is_connected(agent) {
                ForwardError::NoIdleTunnel {
                    agent: agent.into(),
                    waited: wait,
                }
            } else {
                ForwardError::NotConnected {
                    agent: agent.into(),
                }
            }
        })
    }

    /// Sends the request down `tunnel` and returns the agent's response head with the body
    /// still streaming. At most [`TUNNEL_ATTEMPTS`] tunnels are tried in all: a dead parked
    /// tunnel is replaced before anything was sent, and a request without a body and with an
    /// idempotent method is also retried if the tunnel breaks before the response head (as
    /// proxies retry idempotent requests): an agent may drop an idle tunnel at the moment it
    /// is taken.
    pub async fn forward_on<B>(
        &self,
        agent: &str,
        tunnel: ParkedTunnel,
        mut head: RequestHead,
        body: B,
        served: &ServedOver,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let repeatable =
            matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS") && body.is_end_stream();
        let mut body = Some(body);
        let mut next = Some(tunnel);
        let mut broke_on = None;
        for attempt in 1..=TUNNEL_ATTEMPTS {
            let t = match next.take() {
                Some(t) => t,
                None => self.take(agent, self.tunnel_wait, broke_on).await?,
            };
            check_descriptor(agent, &t, &head)?;
            let conn = t.conn.id;
            let again = (repeatable && attempt < TUNNEL_ATTEMPTS).then(|| head.clone());
            match self.attempt(agent, t, head, &mut body, served).await {
                Ok(r) => return Ok(r),
                Err(AttemptError::NotSent(h)) => {
                    tracing::debug!(agent, "parked tunnel was dead; taking another");
                    broke_on = Some(conn);
                    head = h;
                }
                Err(AttemptError::Broken(e)) => match again {
                    Some(h) => {
                        broke_on = Some(conn);
                        tracing::info!(
                            agent,
                            attempt,
                            "retrying an idempotent request on another tunnel: {e}"
                        );
                        head = h;
                    }
                    None => return Err(e),
                },
                Err(AttemptError::Final(e)) => return Err(e),
            }
        }
        Err(ForwardError::TunnelBroken {
            agent: agent.into(),
            message: format!("{TUNNEL_ATTEMPTS} tunnels tried, each closed"),
        })
    }

    /// One request on one tunnel. The body is taken out of `body` only once the head went
    /// out, so a tunnel found dead leaves it for the next attempt.
    async fn attempt<B>(
        &self,
        agent: &str,
        tunnel: ParkedTunnel,
        mut head: RequestHead,
        body: &mut Option<B>,
        served: &ServedOver,
    ) -> Result<ForwardResponse, AttemptError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let ParkedTunnel {
            mut tx,
            mut rx,
            descriptor,
            conn,
            agent: name,
        } = tunnel;
        let reusable = descriptor.protocol_version >= PROTOCOL_VERSION;
        let transport = conn.kind.as_str();
        // A response to HEAD has no body, whatever its Content-Length says.
        let bodiless = head.method == "HEAD";
        let no_body = body.as_ref().is_none_or(|b| b.is_end_stream());
        if reusable {
            head.protocol_version = PROTOCOL_VERSION;
            head.end_of_request = no_body;
        }
        let msg = GatewayMessage {
            msg: Some(gateway_message::Msg::RequestHead(head)),
        };
        if let Err(m) = tx.send(msg).await {
            let Some(gateway_message::Msg::RequestHead(h)) = m.msg else {
                unreachable!("the message sent is a request head")
            };
            return Err(AttemptError::NotSent(h));
        }
        served.set(transport);
        // Version 1 sends EndOfRequest even without a body; version 2 said so in the head.
        let pump = match body.take() {
            Some(b) if !(reusable && no_body) => Some(RequestPump::spawn(
                b,
                tx.clone(),
                self.chunk_size,
                self.metrics.clone(),
                transport,
            )),
            _ => None,
        };
        let broken = |message: String| ForwardError::TunnelBroken {
            agent: agent.into(),
            message,
        };
        let mut pump = pump;
        loop {
            // A request body that breaks off (the caller went away mid-upload) ends the
            // request now: the agent would otherwise wait for the rest until its upstream's
            // timeout, holding the tunnel.
            let msg = tokio::select! {
                biased;
                msg = rx.message() => msg,
                why = RequestPump::broke_off(&mut pump) => {
                    return Err(AttemptError::Final(ForwardError::CallerAborted {
                        agent: agent.into(),
                        message: why,
                    }));
                }
                () = self.ending.cancelled() => {
                    return Err(AttemptError::Final(ForwardError::Shutdown {
                        agent: agent.into(),
                    }));
                }
            };
            let msg = msg.map_err(|s| AttemptError::Broken(broken(s.message().to_string())))?;
            let m = match msg.and_then(|m| m.msg) {
                Some(agent_message::Msg::Heartbeat(_)) => continue,
                Some(m) => m,
                None => {
                    return Err(AttemptError::Broken(broken(
                        "the agent closed the tunnel before answering".into(),
                    )))
                }
            };
            let reuse = reusable.then_some(Reuse {
                parking: self.parking.clone(),
                descriptor,
                conn,
                agent: name,
            });
            let mut rest = TunnelBody::new(rx, tx, pump, reuse, self.metrics.clone(), transport);
            return match m {
                agent_message::Msg::ResponseHead(h) => {
                    let headers = from_proto(&h.headers);
                    if !h.body.is_empty() {
                        self.metrics
                            .tunnel_request_bytes
                            .add(&["from_agent", transport], h.body.len() as f64);
                    }
                    if reusable && h.end_of_response {
                        rest.end();
                        let trailers = (!h.trailers.is_empty()).then(|| from_proto(&h.trailers));
                        let body = CompleteBody {
                            data: (!h.body.is_empty()).then_some(h.body),
                            trailers,
                        };
                        return Ok(ForwardResponse {
                            status: h.status as u16,
                            headers,
                            body: body.boxed_unsync(),
                        });
                    }
                    let length = if bodiless || matches!(h.status, 204 | 304) {
                        Some(0)
                    } else {
                        headers
                            .get(http::header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    };
                    rest.remaining = length.map(|n| n.saturating_sub(h.body.len() as u64));
                    rest.first = (!h.body.is_empty()).then_some(h.body);
                    let body = if self.stalled_caller_timeout.is_zero() {
                        rest.map_err(BoxError::from).boxed_unsync()
                    } else {
                        let about = StalledAnswer {
                            agent: rest
                                .reuse
                                .as_ref()
                                .map_or_else(|| Arc::from(agent), |r| r.agent.clone()),
                            transport,
                            metrics: self.metrics.clone(),
                        };
                        WatchedBody::new(rest, self.stalled_caller_timeout, about).boxed_unsync()
                    };
                    Ok(ForwardResponse {
                        status: h.status as u16,
                        headers,
                        body,
                    })
                }
                agent_message::Msg::Error(e) => {
                    rest.end();
                    Err(AttemptError::Final(ForwardError::from_agent(agent, e)))
                }
                other => Err(AttemptError::Broken(broken(format!(
                    "the agent sent a {} before the response head",
                    message_kind(&other)
                )))),
            };
        }
    }
}

fn check_descriptor(agent: &str, t: &ParkedTunnel, head: &RequestHead) -> Result<(), ForwardError> {
    let d = &t.descriptor;
    let missing = match RequestKind::try_from(head.kind) {
        Ok(RequestKind::Grpc) if !d.grpc_upstream => {
            Some("the agent has no gRPC upstream (start it with --grpc-upstream)".to_string())
        }
        Ok(RequestKind::Http) if !d.http_upstreams.contains(&head.upstream) => Some(format!(
            "the agent has no HTTP upstream named {:?} (it has: {})",
            head.upstream,
            if d.http_upstreams.is_empty() {
                "none".to_string()
            } else {
                d.http_upstreams.join(", ")
            }
        )),
        _ => None,
    };
    match missing {
        Some(message) => Err(ForwardError::UnknownUpstream {
            agent: agent.into(),
            message,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod stream_ends {
    //! How a tunnelled request ends, in-process: `LocalTunnels` with tunnels whose agent side
    //! is scripted. Half-close in either direction, cancellation by the caller, and a reset by
    //! the agent's side, each with what happens to the tunnel afterwards.
    use agentgate_proto::v1::{AgentMessage, Chunk, EndOfRequest, Header, ResponseHead, Trailer};
    use http_body::Frame;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;

    use super::*;
    use crate::tunnel::scripted_agent::{self, within_limit, ScriptedAgent};

    type CallerBody = StreamBody<tokio_stream::wrappers::ReceiverStream<CallerFrame>>;
    type CallerFrame = Result<Frame<Bytes>, std::io::Error>;

    fn local() -> LocalTunnels {
        let metrics = Arc::new(Metrics::default());
        LocalTunnels::new(
            Arc::new(TunnelParking::new(metrics.clone(), None)),
            Arc::default(),
            metrics,
            (Duration::from_millis(50), Duration::from_millis(50)),
            64 * 1024,
            Duration::from_secs(60),
        )
    }

    /// A request waits for a tunnel of a connected agent up to `tunnel_wait`; when the agent's
    /// session ends meanwhile (its process was killed), it waits `agent_reconnect_wait` from
    /// its start instead. Paused time: the waits are exact.
    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_an_agent_that_goes_away_waits_the_reconnect_wait() {
        let metrics = Arc::new(Metrics::default());
        let directory: Arc<Directory> = Arc::default();
        let local = LocalTunnels::new(
            Arc::new(TunnelParking::new(metrics.clone(), None)),
            directory.clone(),
            metrics.clone(),
            (Duration::from_secs(10), Duration::from_secs(2)),
            64 * 1024,
            Duration::from_secs(60),
        );
        let record = crate::directory::AgentRecord {
            name: "a".into(),
            instance_id: "i-1".into(),
            version: String::new(),
            hostname: String::new(),
            transport: "grpc".into(),
            peer: "127.0.0.1:1".into(),
            connected_since: String::new(),
            connection_id: 1,
        };
        // Connected all along: the whole tunnel_wait, then "no idle tunnel".
        let session = directory.register(&metrics, record.clone());
        let t0 = tokio::time::Instant::now();
        let e = local
            .take("a", local.tunnel_wait, None)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ForwardError::NoIdleTunnel { .. }), "{e}");
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        // Gone 100 ms into the wait: 2 s from the start, then "not connected".
        let t0 = tokio::time::Instant::now();
        let leave = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(session);
        };
        let (taken, ()) = tokio::join!(local.take("a", local.tunnel_wait, None), leave);
        let e = taken.err().unwrap();
        assert!(matches!(e, ForwardError::NotConnected { .. }), "{e}");
        assert!(
            t0.elapsed() >= Duration::from_secs(2) && t0.elapsed() < Duration::from_millis(2300),
            "{:?}",
            t0.elapsed()
        );
    }

    /// A request body the test writes as the caller sends it; dropping the sender ends it.
    fn caller_body() -> (mpsc::Sender<CallerFrame>, CallerBody) {
        let (tx, rx) = mpsc::channel(4);
        (
            tx,
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
    }

    fn post() -> RequestHead {
        RequestHead {
            kind: RequestKind::Http as i32,
            upstream: "default".into(),
            method: "POST".into(),
            path_and_query: "/jobs".into(),
            ..Default::default()
        }
    }

    fn agent_msg(m: agent_message::Msg) -> AgentMessage {
        AgentMessage { msg: Some(m) }
    }

    fn response_head(status: u32, end_of_response: bool) -> AgentMessage {
        agent_msg(agent_message::Msg::ResponseHead(ResponseHead {
            status,
            end_of_response,
            ..Default::default()
        }))
    }

    fn chunk(data: &'static [u8]) -> AgentMessage {
        agent_msg(agent_message::Msg::Chunk(Chunk {
            data: Bytes::from_static(data),
        }))
    }

    /// What the agent read: the head's `end_of_request`, then the body and whether its
    /// `EndOfRequest` came.
    async fn read_request(agent: &mut ScriptedAgent) -> (bool, Vec<u8>, bool) {
        let Some(gateway_message::Msg::RequestHead(h)) = agent.recv().await.unwrap().msg else {
            panic!("the request head comes first")
        };
        let mut body = vec![];
        if h.end_of_request {
            return (true, body, true);
        }
        while let Some(m) = agent.recv().await {
            match m.msg {
                Some(gateway_message::Msg::Chunk(c)) => body.extend_from_slice(&c.data),
                Some(gateway_message::Msg::EndOfRequest(EndOfRequest { .. })) => {
                    return (false, body, true)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (false, body, false)
    }

    #[tokio::test]
    async fn the_caller_half_closes_then_the_answer_streams_and_the_tunnel_is_parked_again() {
        within_limit(async {
            let local = local();
            let (tunnel, mut agent) = scripted_agent::tunnel("a");
            let (caller, body) = caller_body();
            caller
                .send(Ok(Frame::data(Bytes::from_static(b"job"))))
                .await
                .unwrap();
            drop(caller); // the request body ends: the caller's half-close
            let agent = tokio::spawn(async move {
                let request = read_request(&mut agent).await;
                agent.send(response_head(200, false)).await;
                agent.send(chunk(b"re")).await;
                agent.send(chunk(b"sult")).await;
                agent
                    .send(agent_msg(agent_message::Msg::Trailer(Trailer {
                        trailers: vec![Header {
                            name: Bytes::from_static(b"x-done"),
                            value: Bytes::from_static(b"yes"),
                        }],
                    })))
                    .await;
                (request, agent)
            });
            let resp = local
                .forward_on("a", tunnel, post(), body, &ServedOver::default())
                .await
                .unwrap();
            let collected = resp.body.collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("the agent's trailers");
            assert_eq!(&collected.to_bytes()[..], b"result");
            assert_eq!(trailers["x-done"], "yes");
            let ((head_ended, sent, end_came), _agent) = agent.await.unwrap();
            assert_eq!(
                (head_ended, &sent[..], end_came),
                (false, &b"job"[..], true)
            );
            assert_eq!(
                local.parking.idle_count("a"),
                1,
                "parked again for the next request"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn an_answer_that_ends_before_the_request_body_ends_the_stream() {
        within_limit(async {
            let local = local();
            let (tunnel, mut agent) = scripted_agent::tunnel("a");
            let (caller, body) = caller_body();
            caller
                .send(Ok(Frame::data(Bytes::from_static(b"part"))))
                .await
                .unwrap();
            // The upstream answers at once (a 413, say) while the caller is still sending.
            let agent = tokio::spawn(async move {
                let Some(gateway_message::Msg::RequestHead(_)) = agent.recv().await.unwrap().msg
                else {
                    panic!("the request head comes first")
                };
                agent.send(response_head(413, true)).await;
                // Whatever the gateway still sends, its side then ends.
                while agent.recv().await.is_some() {}
            });
            let resp = local
                .forward_on("a", tunnel, post(), body, &ServedOver::default())
                .await
                .unwrap();
            assert_eq!(resp.status, 413);
            assert!(resp.body.collect().await.is_ok());
            tokio::time::timeout(Duration::from_secs(5), agent)
                .await
                .expect("the gateway ends its side of the stream")
                .unwrap();
            assert_eq!(
                local.parking.idle_count("a"),
                0,
                "a stream with an unfinished request is not reused"
            );
            assert!(
                caller.is_closed(),
                "the rest of the caller's body is not read"
            );
        })
        .await;
    }

    /// A GET on a fresh tunnel whose agent answers a head and the chunk `first`, then does
    /// `then`; returns the tunnels, the caller's body with `first` read from it, and the
    /// agent's task.
    async fn answer_begun<T, F>(
        first: &'static [u8],
        then: impl FnOnce(ScriptedAgent) -> F + Send + 'static,
    ) -> (LocalTunnels, ResponseBody, tokio::task::JoinHandle<T>)
    where
        F: std::future::Future<Output = T> + Send,
        T: Send + 'static,
    {
        let local = local();
        let (tunnel, mut agent) = scripted_agent::tunnel("a");
        let head = RequestHead {
            method: "GET".into(),
            ..post()
        };
        let agent = tokio::spawn(async move {
            read_request(&mut agent).await;
            agent.send(response_head(200, false)).await;
            agent.send(chunk(first)).await;
            then(agent).await
        });
        let empty = http_body_util::Empty::<Bytes>::new();
        let mut body = local
            .forward_on("a", tunnel, head, empty, &ServedOver::default())
            .await
            .unwrap()
            .body;
        let got = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&got[..], first);
        (local, body, agent)
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_mid_answer_ends_the_stream_which_the_agent_reads_as_cancel() {
        within_limit(async {
            // The caller's side ends: the agent reads no further message, then the end.
            let (local, body, agent) =
                answer_begun(b"first", |mut agent| async move { agent.recv().await }).await;
            drop(body);
            let after = tokio::time::timeout(Duration::from_secs(5), agent)
                .await
                .expect("the agent sees the stream end")
                .unwrap();
            assert!(after.is_none(), "nothing but the end: {after:?}");
            assert_eq!(local.parking.idle_count("a"), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn a_reset_mid_answer_fails_the_callers_body_and_the_tunnel_is_not_reused() {
        within_limit(async {
            let (local, mut body, agent) = answer_begun(b"partial", |agent| async move {
                agent.reset().await;
                agent
            })
            .await;
            let err = body
                .frame()
                .await
                .unwrap()
                .expect_err("the reset reaches the caller");
            assert!(err.to_string().contains("mid-response"), "{err}");
            assert!(body.frame().await.is_none(), "and the body ends there");
            let _agent = agent.await.unwrap();
            assert_eq!(local.parking.idle_count("a"), 0);
        })
        .await;
    }

    /// A POST, with `body` or without one, on a tunnel that resets after reading it, with a
    /// second tunnel parked: the answer is the broken tunnel, and the second is not touched.
    async fn post_on_a_resetting_tunnel(body: Option<&'static [u8]>) {
        let local = local();
        let (first, mut resetting) = scripted_agent::tunnel("a");
        let (second, mut spare) = scripted_agent::tunnel("a");
        local.parking.park("a", second);
        let resetting = tokio::spawn(async move {
            let request = read_request(&mut resetting).await;
            resetting.reset().await;
            request
        });
        let (caller, caller_body) = caller_body();
        if let Some(data) = body {
            caller
                .send(Ok(Frame::data(Bytes::from_static(data))))
                .await
                .unwrap();
        }
        drop(caller);
        let e = match body {
            Some(_) => {
                local
                    .forward_on("a", first, post(), caller_body, &ServedOver::default())
                    .await
            }
            None => {
                let empty = http_body_util::Empty::<Bytes>::new();
                local
                    .forward_on("a", first, post(), empty, &ServedOver::default())
                    .await
            }
        }
        .err()
        .expect("the broken tunnel is the answer");
        assert_eq!(e.outcome(), "tunnel_broken");
        assert_eq!(resetting.await.unwrap().1, body.unwrap_or_default());
        assert_eq!(
            local.parking.idle_count("a"),
            1,
            "the spare tunnel was not taken"
        );
        assert!(!spare.has_message(), "and got nothing");
    }

    #[tokio::test]
    async fn a_post_whose_tunnel_resets_before_the_answer_is_not_sent_again() {
        // With a body (which cannot be sent twice anyway) and without one (where only the
        // method says so); the spare tunnel never answers, so a second try would hang here.
        within_limit(post_on_a_resetting_tunnel(Some(b"once"))).await;
        within_limit(post_on_a_resetting_tunnel(None)).await;
    }
}
