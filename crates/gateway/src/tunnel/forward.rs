//! Forwarding one request down a parked tunnel and streaming the answer back.
//!
//! Memory is bounded on every hop: the request body is read from the client only as fast as
//! the tunnel's small queue and HTTP/2 flow control allow, and the response body is read from
//! the tunnel only as fast as the client consumes it. Dropping the response body before the
//! agent's trailer ends the gateway's side of the stream, which the agent takes as cancellation.

use std::fmt::Display;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use agentgate_proto::v1::{
    agent_message, gateway_message, tunnel_error, AgentMessage, Chunk, EndOfRequest,
    GatewayMessage, RequestHead, RequestKind, TunnelError,
};
use bytes::Bytes;
use futures_util::Stream;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::{ParkedTunnel, ToAgent};
use crate::headers::{from_proto, to_proto};
use crate::Gateway;

/// Why a request did not get a response from the agent's upstream. Each maps to one row of
/// the error table (HTTP status, gRPC code) in the front ends.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("unknown agent {0:?}: no agent token carries this name")]
    UnknownAgent(String),
    #[error("agent {0:?} is not connected")]
    NotConnected(String),
    #[error("agent {agent:?} is connected but had no idle tunnel within {waited:?}")]
    NoIdleTunnel { agent: String, waited: Duration },
    #[error("agent {agent:?}: {message}")]
    UnknownUpstream { agent: String, message: String },
    #[error("upstream unavailable at agent {agent:?}: {message}")]
    UpstreamUnavailable { agent: String, message: String },
    #[error("upstream timed out at agent {agent:?}: {message}")]
    UpstreamTimeout { agent: String, message: String },
    #[error("bad request for agent {agent:?}: {message}")]
    BadRequest { agent: String, message: String },
    #[error("tunnel to agent {agent:?} broke: {message}")]
    TunnelBroken { agent: String, message: String },
    #[error(
        "agent {agent:?} is not connected here and the cluster registry is unavailable: {message}"
    )]
    ClusterUnavailable { agent: String, message: String },
}

impl ForwardError {
    /// The `outcome` label of `agentgate_tunnel_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::UnknownAgent(_) => "unknown_agent",
            Self::NotConnected(_) => "not_connected",
            Self::NoIdleTunnel { .. } => "no_idle_tunnel",
            Self::UnknownUpstream { .. } => "unknown_upstream",
            Self::UpstreamUnavailable { .. } => "upstream_unavailable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::BadRequest { .. } => "bad_request",
            Self::TunnelBroken { .. } => "tunnel_broken",
            Self::ClusterUnavailable { .. } => "cluster_unavailable",
        }
    }

    /// Rebuilds an error from its outcome label and message (as a peer replica reports it).
    pub fn from_outcome(outcome: &str, agent: &str, message: String) -> Self {
        let agent = agent.to_string();
        match outcome {
            "unknown_agent" => Self::UnknownAgent(agent),
            "not_connected" => Self::NotConnected(agent),
            "no_idle_tunnel" => Self::NoIdleTunnel {
                agent,
                waited: Duration::ZERO,
            },
            "unknown_upstream" => Self::UnknownUpstream { agent, message },
            "upstream_timeout" => Self::UpstreamTimeout { agent, message },
            "bad_request" => Self::BadRequest { agent, message },
            "upstream_unavailable" => Self::UpstreamUnavailable { agent, message },
            "cluster_unavailable" => Self::ClusterUnavailable { agent, message },
            _ => Self::TunnelBroken { agent, message },
        }
    }

    /// The message without the agent prefix (what a peer replica sends back).
    pub fn detail(&self) -> String {
        match self {
            Self::UnknownUpstream { message, .. }
            | Self::UpstreamUnavailable { message, .. }
            | Self::UpstreamTimeout { message, .. }
            | Self::BadRequest { message, .. }
            | Self::TunnelBroken { message, .. }
            | Self::ClusterUnavailable { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    fn from_agent(agent: &str, e: TunnelError) -> Self {
        let agent = agent.to_string();
        let message = e.message;
        match tunnel_error::Code::try_from(e.code).unwrap_or(tunnel_error::Code::Unspecified) {
            tunnel_error::Code::UnknownUpstream => Self::UnknownUpstream { agent, message },
            tunnel_error::Code::UpstreamTimeout => Self::UpstreamTimeout { agent, message },
            tunnel_error::Code::BadRequest => Self::BadRequest { agent, message },
            _ => Self::UpstreamUnavailable { agent, message },
        }
    }
}

/// A boxed response body: from a local tunnel, or streamed from a peer replica.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response head from the agent, and its body still streaming.
pub struct ForwardResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: ResponseBody,
}

/// How many times a request is retried on another tunnel when the one it took turned out to
/// be dead before anything was sent on it.
const DEAD_TUNNEL_RETRIES: usize = 3;

impl Gateway {
    /// Forwards one request to `agent`: through a local tunnel if the agent is connected
    /// here, otherwise (in cluster mode) through the replica that holds it.
    pub async fn forward<B>(
        &self,
        agent: &str,
        head: RequestHead,
        body: B,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let local = self.directory.is_connected(agent) || self.tunnels.idle_count(agent) > 0;
        if !local && !self.tokens.agent_known(agent) {
            return Err(ForwardError::UnknownAgent(agent.into()));
        }
        if local {
            let tunnel = self.take_local(agent, self.config.tunnel_wait).await?;
            return self.forward_on(agent, tunnel, head, body).await;
        }
        match &self.cluster {
            Some(cluster) => cluster.forward_remote(self, agent, head, body).await,
            None => Err(ForwardError::NotConnected(agent.into())),
        }
    }

    /// Takes a live parked tunnel of `agent`, waiting up to `wait`.
    pub async fn take_local(
        &self,
        agent: &str,
        wait: Duration,
    ) -> Result<ParkedTunnel, ForwardError> {
        self.tunnels.take(agent, wait).await.ok_or_else(|| {
            if self.directory.is_connected(agent) {
                ForwardError::NoIdleTunnel {
                    agent: agent.into(),
                    waited: wait,
                }
            } else {
                ForwardError::NotConnected(agent.into())
            }
        })
    }

    /// Sends the request down `tunnel` and returns the agent's response head with the body
    /// still streaming. A request without a body and with an idempotent method is retried on
    /// another tunnel if the tunnel breaks before the response head (as proxies retry
    /// idempotent requests): an agent may drop an idle tunnel at the moment it is taken.
    pub async fn forward_on<B>(
        &self,
        agent: &str,
        tunnel: ParkedTunnel,
        head: RequestHead,
        body: B,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let idempotent = matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS");
        if !(idempotent && body.is_end_stream()) {
            return self.exchange(agent, tunnel, head, body).await;
        }
        let mut tunnel = Some(tunnel);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let t = match tunnel.take() {
                Some(t) => t,
                None => self.take_local(agent, self.config.tunnel_wait).await?,
            };
            let empty = http_body_util::Empty::<Bytes>::new();
            match self.exchange(agent, t, head.clone(), empty).await {
                Err(e @ ForwardError::TunnelBroken { .. }) if attempt < DEAD_TUNNEL_RETRIES => {
                    tracing::info!(
                        agent,
                        attempt,
                        "retrying an idempotent request on another tunnel: {e}"
                    );
                }
                r => return r,
            }
        }
    }

    /// One attempt: the request down `tunnel` (or, if it turns out dead before anything was
    /// sent, down another local one).
    async fn exchange<B>(
        &self,
        agent: &str,
        tunnel: ParkedTunnel,
        head: RequestHead,
        body: B,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let mut next = Some(tunnel);
        let mut sent = None;
        for _ in 0..DEAD_TUNNEL_RETRIES {
            let t = match next.take() {
                Some(t) => t,
                None => self.take_local(agent, self.config.tunnel_wait).await?,
            };
            check_descriptor(agent, &t, &head)?;
            let msg = GatewayMessage {
                msg: Some(gateway_message::Msg::RequestHead(head.clone())),
            };
            if t.tx.send(Box::new(msg)).await.is_ok() {
                sent = Some(t);
                break;
            }
            tracing::debug!(agent, "parked tunnel was dead; taking another");
        }
        let Some(ParkedTunnel { tx, mut rx, .. }) = sent else {
            return Err(ForwardError::TunnelBroken {
                agent: agent.into(),
                message: "every tunnel tried was closed".into(),
            });
        };
        tokio::spawn(pump_request_body(
            body,
            tx.clone(),
            self.config.tunnel_chunk_size,
            self.metrics.clone(),
        ));
        loop {
            let msg = rx.message().await.map_err(|s| ForwardError::TunnelBroken {
                agent: agent.into(),
                message: s.message().to_string(),
            })?;
            match msg.and_then(|m| m.msg) {
                Some(agent_message::Msg::Heartbeat(_)) => continue,
                Some(agent_message::Msg::ResponseHead(h)) => {
                    let body = TunnelBody {
                        rx,
                        tx: Some(tx),
                        finished: false,
                        metrics: self.metrics.clone(),
                    };
                    return Ok(ForwardResponse {
                        status: h.status as u16,
                        headers: from_proto(&h.headers),
                        body: body.map_err(BoxError::from).boxed_unsync(),
                    });
                }
                Some(agent_message::Msg::Error(e)) => {
                    return Err(ForwardError::from_agent(agent, e))
                }
                None => {
                    return Err(ForwardError::TunnelBroken {
                        agent: agent.into(),
                        message: "the agent closed the tunnel before answering".into(),
                    })
                }
                Some(other) => {
                    return Err(ForwardError::TunnelBroken {
                        agent: agent.into(),
                        message: format!(
                            "the agent sent a {} before the response head",
                            message_kind(&other)
                        ),
                    })
                }
            }
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

/// Streams the client's request body into the tunnel in chunks of at most `chunk_size`.
async fn pump_request_body<B>(
    body: B,
    tx: mpsc::Sender<ToAgent>,
    chunk_size: usize,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Display + Send,
{
    let mut body = std::pin::pin!(body);
    let mut trailers = vec![];
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "client request body failed; abandoning the request");
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    metrics
                        .tunnel_request_bytes
                        .add(&["to_agent"], data.len() as f64);
                    while !data.is_empty() {
                        let piece = data.split_to(data.len().min(chunk_size));
                        let msg = GatewayMessage {
                            msg: Some(gateway_message::Msg::Chunk(Chunk { data: piece })),
                        };
                        if tx.send(Box::new(msg)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = to_proto(&t);
                    }
                }
            },
        }
    }
    let end = GatewayMessage {
        msg: Some(gateway_message::Msg::EndOfRequest(EndOfRequest {
            trailers,
        })),
    };
    let _ = tx.send(Box::new(end)).await;
}

/// A tunnel message's kind, for error messages (never its contents: they are remote input).
fn message_kind(m: &agent_message::Msg) -> &'static str {
    match m {
        agent_message::Msg::Descriptor(_) => "descriptor",
        agent_message::Msg::ResponseHead(_) => "second response head",
        agent_message::Msg::Chunk(_) => "body chunk",
        agent_message::Msg::Trailer(_) => "trailer",
        agent_message::Msg::Error(_) => "error",
        agent_message::Msg::Heartbeat(_) => "heartbeat",
    }
}

/// The response body, read from the tunnel as the client consumes it.
pub struct TunnelBody {
    rx: Streaming<AgentMessage>,
    /// Kept until the agent's trailer: dropping it ends our side of the stream, which the agent
    /// reads as cancellation.
    tx: Option<mpsc::Sender<ToAgent>>,
    finished: bool,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// A response body that ended abnormally.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TunnelBodyError(pub String);

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = TunnelBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            let msg = match Pin::new(&mut this.rx).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(m) => m,
            };
            match msg {
                Some(Ok(AgentMessage { msg: Some(m) })) => match m {
                    agent_message::Msg::Chunk(c) => {
                        this.metrics
                            .tunnel_request_bytes
                            .add(&["from_agent"], c.data.len() as f64);
                        return Poll::Ready(Some(Ok(Frame::data(c.data))));
                    }
                    agent_message::Msg::Trailer(t) => {
                        this.finished = true;
                        this.tx = None;
                        if t.trailers.is_empty() {
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Ok(Frame::trailers(from_proto(&t.trailers)))));
                    }
                    agent_message::Msg::Heartbeat(_) => continue,
                    agent_message::Msg::Error(e) => {
                        this.finished = true;
                        return Poll::Ready(Some(Err(TunnelBodyError(format!(
                            "agent reported an error mid-response: {}",
                            e.message
                        )))));
                    }
                    other => {
                        this.finished = true;
                        return Poll::Ready(Some(Err(TunnelBodyError(format!(
                            "the agent sent a {} in the middle of a response",
                            message_kind(&other)
                        )))));
                    }
                },
                Some(Ok(AgentMessage { msg: None })) => continue,
                Some(Err(s)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(TunnelBodyError(format!(
                        "tunnel failed mid-response: {}",
                        s.message()
                    )))));
                }
                None => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(TunnelBodyError(
                        "tunnel closed mid-response".into(),
                    ))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    //! Generated input: random sequences of agent messages after the response head, as a
    //! real `Streaming` decodes them from gRPC frames, against what `TunnelBody` must make of
    //! them. `AGENTGATE_GENERATED_CASES` sets the count (CI: 2,000; long run: 1,000,000).
    use super::*;
    use agentgate_proto::v1::{Descriptor, Heartbeat, ResponseHead, Trailer, TunnelError};
    use prost::Message;
    use rand::{Rng, SeedableRng};
    use tonic::codec::Codec;

    #[derive(Debug, PartialEq)]
    enum End {
        Clean { trailers: usize },
        Error,
    }

    #[test]
    fn generated_message_sequences_end_the_body_as_they_should() {
        let cases: u64 = std::env::var("AGENTGATE_GENERATED_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for _ in 0..cases {
            let mut frames = Vec::new();
            for _ in 0..rng.random_range(0..10) {
                let msg = match rng.random_range(0..12) {
                    0 => agent_message::Msg::Heartbeat(Heartbeat { unix_millis: 1 }),
                    1 => agent_message::Msg::Trailer(Trailer {
                        trailers: (0..rng.random_range(0..3))
                            .map(|i| agentgate_proto::v1::Header {
                                name: format!("x-t{i}"),
                                value: b"v".to_vec(),
                            })
                            .collect(),
                    }),
                    2 => agent_message::Msg::Error(TunnelError {
                        code: 2,
                        message: "upstream broke".into(),
                    }),
                    3 => agent_message::Msg::Descriptor(Descriptor::default()),
                    4 => agent_message::Msg::ResponseHead(ResponseHead::default()),
                    _ => {
                        let mut d = vec![0u8; rng.random_range(0..200)];
                        rng.fill(&mut d[..]);
                        agent_message::Msg::Chunk(agentgate_proto::v1::Chunk { data: d.into() })
                    }
                };
                frames.push(msg);
            }
            let mut wire = Vec::new();
            let mut ends = Vec::new();
            for msg in &frames {
                let bytes = AgentMessage {
                    msg: Some(msg.clone()),
                }
                .encode_to_vec();
                wire.push(0u8);
                wire.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                wire.extend_from_slice(&bytes);
                ends.push(wire.len());
            }
            // Sometimes the stream ends in the middle of a frame.
            if rng.random_bool(0.1) && !wire.is_empty() {
                wire.truncate(rng.random_range(0..wire.len()));
            }
            // What the body must make of the frames that arrived whole.
            let mut data = Vec::new();
            let mut expected = None;
            for (msg, end) in frames.iter().zip(&ends) {
                if *end > wire.len() || expected.is_some() {
                    break;
                }
                match msg {
                    agent_message::Msg::Chunk(c) => data.extend_from_slice(&c.data),
                    agent_message::Msg::Heartbeat(_) => {}
                    agent_message::Msg::Trailer(t) => {
                        expected = Some(End::Clean {
                            trailers: t.trailers.len(),
                        })
                    }
                    _ => expected = Some(End::Error),
                }
            }
            let expected = expected.unwrap_or(End::Error);
            let body = http_body_util::Full::new(Bytes::from(wire));
            let decoder =
                agentgate_proto::codec::SmallBufferCodec::<GatewayMessage, AgentMessage>::default()
                    .decoder();
            let rx = Streaming::new_request(decoder, body, None, None);
            let (tx, _keep) = mpsc::channel(1);
            let mut tb = TunnelBody {
                rx,
                tx: Some(tx),
                finished: false,
                metrics: metrics.clone(),
            };
            let (got, end) = rt.block_on(async {
                let mut got = Vec::new();
                let end = loop {
                    match tb.frame().await {
                        None => break End::Clean { trailers: 0 },
                        Some(Err(_)) => break End::Error,
                        Some(Ok(f)) => match f.into_data() {
                            Ok(d) => got.extend_from_slice(&d),
                            Err(f) => {
                                let n = f.into_trailers().map(|t| t.len()).unwrap_or(0);
                                assert!(tb.frame().await.is_none(), "nothing after trailers");
                                break End::Clean { trailers: n };
                            }
                        },
                    }
                };
                assert!(tb.frame().await.is_none(), "the body stays ended");
                (got, end)
            });
            assert!(data.starts_with(&got));
            assert_eq!(end, expected);
            if matches!(end, End::Clean { .. }) {
                assert_eq!(got, data);
                assert!(
                    tb.tx.is_none(),
                    "our side ends only after the agent's trailer"
                );
            }
        }
    }
}
