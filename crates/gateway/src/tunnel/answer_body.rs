//! The agent's answer as an HTTP body: read from the tunnel only as fast as the caller reads
//! it, and the tunnel parked again (version 2) once the answer is over.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agentgate_proto::v1::{agent_message, AgentMessage, Descriptor};
use agentgate_transport::ConnMeta;
use bytes::Bytes;
use futures_util::Stream;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tonic::Streaming;

use super::request_pump::RequestPump;
use super::{BoxError, ParkedTunnel, ToAgentSender, TunnelParking};
use crate::headers::from_proto;
use crate::metrics::Metrics;
/// A body that arrived whole with the response head (version 2).
pub(super) struct CompleteBody {
    pub(super) data: Option<Bytes>,
    pub(super) trailers: Option<http::HeaderMap>,
}

impl Body for CompleteBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A tunnel message's kind, for error messages (never its contents: they are remote input).
pub(super) fn message_kind(m: &agent_message::Msg) -> &'static str {
    match m {
        agent_message::Msg::Descriptor(_) => "descriptor",
        agent_message::Msg::ResponseHead(_) => "second response head",
        agent_message::Msg::Chunk(_) => "body chunk",
        agent_message::Msg::Trailer(_) => "trailer",
        agent_message::Msg::Error(_) => "error",
        agent_message::Msg::Heartbeat(_) => "heartbeat",
    }
}

/// What a version-2 tunnel needs to be parked again once its request is over.
pub(super) struct Reuse {
    pub(super) parking: Arc<TunnelParking>,
    pub(super) descriptor: Descriptor,
    pub(super) conn: Arc<ConnMeta>,
    pub(super) agent: Arc<str>,
}

/// The response body, read from the tunnel as the client consumes it.
pub struct TunnelBody {
    /// None once the tunnel was parked again.
    rx: Option<Streaming<AgentMessage>>,
    /// Kept until the agent's trailer: dropping it ends our side of the stream, which the agent
    /// reads as cancellation.
    tx: Option<ToAgentSender>,
    /// The request body still streaming to the agent, if it had one.
    pump: Option<RequestPump>,
    /// Version 2: how to park the tunnel again after the request.
    pub(super) reuse: Option<Reuse>,
    /// Body bytes that came with the response head.
    pub(super) first: Option<Bytes>,
    /// Body bytes still to come by the response's Content-Length, if it has one.
    pub(super) remaining: Option<u64>,
    finished: bool,
    metrics: Arc<Metrics>,
    transport: &'static str,
}

impl TunnelBody {
    /// The answer to the request on the tunnel `rx`/`tx`, whose body (if any) `pump` still
    /// streams; `reuse` says how to park the tunnel again (version 2).
    pub(super) fn new(
        rx: Streaming<AgentMessage>,
        tx: ToAgentSender,
        pump: Option<RequestPump>,
        reuse: Option<Reuse>,
        metrics: Arc<Metrics>,
        transport: &'static str,
    ) -> Self {
        Self {
            rx: Some(rx),
            tx: Some(tx),
            pump,
            reuse,
            first: None,
            remaining: None,
            finished: false,
            metrics,
            transport,
        }
    }

    /// The agent's answer is complete. A version-2 tunnel whose request went out whole is
    /// parked again for the next request; otherwise our side ends here, which closes the stream.
    pub(super) fn end(&mut self) {
        self.finished = true;
        let tx = self.tx.take();
        let request_done = match self.pump.take() {
            None => true,
            Some(p) if p.sent.load(Ordering::Acquire) => true,
            Some(p) => {
                // The upstream answered before reading the whole request body: the rest is not
                // wanted, and the stream cannot carry another request.
                p.task.abort();
                false
            }
        };
        if let (Some(tx), Some(reuse), true) = (tx, self.reuse.take(), request_done) {
            let Some(rx) = self.rx.take() else { return };
            reuse.parking.park(
                &reuse.agent.clone(),
                ParkedTunnel {
                    tx,
                    rx,
                    descriptor: reuse.descriptor,
                    conn: reuse.conn,
                    agent: reuse.agent,
                },
            );
        }
    }
}

/// How long a response body whose last byte (by Content-Length) went out waits for the
/// agent's trailer after the client stopped reading, so that its tunnel can be parked again.
const TRAILER_AFTER_LAST_BYTE: Duration = Duration::from_secs(1);

impl Drop for TunnelBody {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // HTTP/1.1 and HTTP/2 servers stop reading a body once its Content-Length is reached,
        // before the agent's trailer is read: finish that read in the background so that a
        // version-2 tunnel goes back to the parking lot instead of being cancelled.
        let complete_by_length = self.remaining == Some(0);
        if let (true, Some(_), Ok(rt)) = (
            complete_by_length && self.rx.is_some(),
            &self.reuse,
            tokio::runtime::Handle::try_current(),
        ) {
            let mut rest = TunnelBody {
                rx: self.rx.take(),
                tx: self.tx.take(),
                pump: self.pump.take(),
                reuse: self.reuse.take(),
                first: None,
                remaining: None,
                finished: false,
                metrics: self.metrics.clone(),
                transport: self.transport,
            };
            rt.spawn(async move {
                let drain = async { while let Some(Ok(_)) = rest.frame().await {} };
                let _ = tokio::time::timeout(TRAILER_AFTER_LAST_BYTE, drain).await;
            });
            return;
        }
        // Dropped before the end: the client went away. Stop sending its body; dropping our
        // side tells the agent to cancel.
        if let Some(p) = self.pump.take() {
            p.task.abort();
        }
    }
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
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        loop {
            let Some(rx) = this.rx.as_mut().filter(|_| !this.finished) else {
                return Poll::Ready(None);
            };
            let msg = match Pin::new(rx).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(m) => m,
            };
            match msg {
                Some(Ok(AgentMessage { msg: Some(m) })) => match m {
                    agent_message::Msg::Chunk(c) => {
                        this.metrics
                            .tunnel_request_bytes
                            .add(&["from_agent", this.transport], c.data.len() as f64);
                        if let Some(r) = &mut this.remaining {
                            *r = r.saturating_sub(c.data.len() as u64);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(c.data))));
                    }
                    agent_message::Msg::Trailer(t) => {
                        this.end();
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
        self.finished && self.first.is_none()
    }
}

#[cfg(test)]
mod tests {
    //! Generated input: random sequences of agent messages after the response head, as a
    //! real `Streaming` decodes them from gRPC frames, against what `TunnelBody` must make of
    //! them. `AGENTGATE_GENERATED_CASES` sets the count (CI: 2,000; long run: 1,000,000).
    use super::*;
    use agentgate_proto::v1::GatewayMessage;
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
                                name: format!("x-t{i}").into(),
                                value: bytes::Bytes::from_static(b"v"),
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
            let (tx, _keep) = crate::tunnel::to_agent_channel();
            let mut tb = TunnelBody {
                rx: Some(rx),
                tx: Some(tx),
                pump: None,
                reuse: None,
                first: None,
                remaining: None,
                finished: false,
                metrics: metrics.clone(),
                transport: "grpc",
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
