//! The one pump from an HTTP body to tunnel messages.
//!
//! The gateway streams request bodies to the agent with it, the agent streams response bodies
//! back with it, and the bench's bare control tunnel uses it too, so that all three cut bodies
//! the same way: data in `Chunk` messages of at most `chunk_size` bytes, read from the body
//! only as fast as the sink takes them (a bounded queue in front of HTTP/2 flow control), then
//! one end message that carries the body's trailers.

use std::fmt::Display;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

use crate::headers::to_proto;
use crate::v1::{
    agent_message, gateway_message, AgentMessage, Chunk, EndOfRequest, GatewayMessage, Header,
    Trailer,
};

/// The messages a body turns into, in one direction of the tunnel.
pub trait BodyMessage: Sized {
    /// A piece of the body.
    fn chunk(data: Bytes) -> Self;
    /// The end of the body, with its trailers.
    fn end(trailers: Vec<Header>) -> Self;
}

impl BodyMessage for GatewayMessage {
    fn chunk(data: Bytes) -> Self {
        Self {
            msg: Some(gateway_message::Msg::Chunk(Chunk { data })),
        }
    }
    fn end(trailers: Vec<Header>) -> Self {
        Self {
            msg: Some(gateway_message::Msg::EndOfRequest(EndOfRequest {
                trailers,
            })),
        }
    }
}

impl BodyMessage for AgentMessage {
    fn chunk(data: Bytes) -> Self {
        Self {
            msg: Some(agent_message::Msg::Chunk(Chunk { data })),
        }
    }
    fn end(trailers: Vec<Header>) -> Self {
        Self {
            msg: Some(agent_message::Msg::Trailer(Trailer { trailers })),
        }
    }
}

/// Where a pump queues its messages. The gateway's tunnels and the agent use different
/// channel types (see `gateway::tunnel::to_agent`); both are bounded, so `send` waits for room.
pub trait MessageSink<M> {
    /// Queues `m`, waiting for room; false if the other side is gone.
    fn send(&mut self, m: M) -> impl std::future::Future<Output = bool> + Send;
}

impl<M: Send> MessageSink<M> for &tokio::sync::mpsc::Sender<M> {
    fn send(&mut self, m: M) -> impl std::future::Future<Output = bool> + Send {
        let tx = *self;
        async move { tx.send(m).await.is_ok() }
    }
}

/// How a pump ended.
#[derive(Debug, PartialEq)]
pub enum PumpEnd {
    /// The whole body and its end message went out.
    Complete,
    /// Reading the body failed (the caller's or the upstream's connection broke); nothing more
    /// was sent.
    BodyFailed(String),
    /// The queue is closed: the other side is gone.
    ReceiverGone,
}

/// Streams `first` (bytes already read from the body, if any) and then `body` into `sink`;
/// `on_data` sees the length of every data frame read.
pub async fn pump_body<B, M>(
    body: B,
    first: Option<Bytes>,
    chunk_size: usize,
    mut sink: impl MessageSink<M>,
    mut on_data: impl FnMut(usize),
) -> PumpEnd
where
    B: Body<Data = Bytes>,
    B::Error: Display,
    M: BodyMessage,
{
    let mut body = std::pin::pin!(body);
    let mut trailers = vec![];
    let mut pending = first.map(http_body::Frame::data);
    loop {
        let frame = match pending.take() {
            Some(f) => f,
            None => match body.frame().await {
                None => break,
                Some(Err(e)) => return PumpEnd::BodyFailed(e.to_string()),
                Some(Ok(f)) => f,
            },
        };
        match frame.into_data() {
            Ok(mut data) => {
                on_data(data.len());
                while !data.is_empty() {
                    let piece = data.split_to(data.len().min(chunk_size.max(1)));
                    if !sink.send(M::chunk(piece)).await {
                        return PumpEnd::ReceiverGone;
                    }
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = to_proto(&t);
                }
            }
        }
    }
    if sink.send(M::end(trailers)).await {
        PumpEnd::Complete
    } else {
        PumpEnd::ReceiverGone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;

    type Frames = Vec<Result<http_body::Frame<Bytes>, std::io::Error>>;

    fn body(frames: Frames) -> impl Body<Data = Bytes, Error = std::io::Error> {
        StreamBody::new(tokio_stream::iter(frames))
    }

    fn data(m: &GatewayMessage) -> Option<&[u8]> {
        match &m.msg {
            Some(gateway_message::Msg::Chunk(c)) => Some(&c.data),
            _ => None,
        }
    }

    #[tokio::test]
    async fn cuts_into_chunks_and_ends_with_the_trailers() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", "7".parse().unwrap());
        let frames = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"abcdefg"))),
            Ok(http_body::Frame::data(Bytes::from_static(b"hi"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let (tx, mut rx) = mpsc::channel(100);
        let mut seen = 0;
        let end = pump_body(
            body(frames),
            Some(Bytes::from_static(b"012")),
            3,
            &tx,
            |n| seen += n,
        )
        .await;
        assert_eq!(end, PumpEnd::Complete);
        let mut sent = vec![];
        while let Ok(m) = rx.try_recv() {
            sent.push(m);
        }
        assert_eq!(seen, 12);
        let pieces: Vec<&[u8]> = sent.iter().filter_map(data).collect();
        assert_eq!(pieces, [&b"012"[..], b"abc", b"def", b"g", b"hi"]);
        match &sent.last().unwrap().msg {
            Some(gateway_message::Msg::EndOfRequest(e)) => {
                assert_eq!(e.trailers.len(), 1);
                assert_eq!(e.trailers[0].name, "x-sum");
            }
            other => panic!("the last message is the end, not {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failed_body_sends_no_end() {
        let frames = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("peer reset")),
        ];
        let (tx, mut rx) = mpsc::channel::<AgentMessage>(100);
        let end = pump_body(body(frames), None, 64, &tx, |_| {}).await;
        assert_eq!(end, PumpEnd::BodyFailed("peer reset".into()));
        assert!(rx.try_recv().is_ok(), "the chunk went out");
        assert!(rx.try_recv().is_err(), "and no trailer");
    }

    #[tokio::test]
    async fn a_gone_receiver_stops_the_pump_at_once() {
        let frames = vec![
            Ok(http_body::Frame::data(Bytes::from(vec![0u8; 100]))),
            Ok(http_body::Frame::data(Bytes::from(vec![0u8; 100]))),
        ];
        let (tx, mut rx) = mpsc::channel::<AgentMessage>(2);
        let reader = tokio::spawn(async move {
            // Takes two pieces, then goes away.
            let a = rx.recv().await.is_some();
            let b = rx.recv().await.is_some();
            a && b
        });
        let end = pump_body(body(frames), None, 10, &tx, |_| {}).await;
        assert_eq!(end, PumpEnd::ReceiverGone);
        assert!(reader.await.unwrap());
    }
}
