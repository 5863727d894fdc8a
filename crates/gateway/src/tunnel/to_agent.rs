//! The queue of messages from the gateway to the agent on one tunnel stream: the response
//! stream of the agent's `Tunnel.Connect` call.
//!
//! Every parked tunnel holds one, and an idle agent parks two, so its fixed cost is per-agent
//! memory. A bounded tokio channel allocates about 800 bytes up front (a 32-slot block and two
//! cache-padded halves); `futures-channel`'s bounded channel about 220 and one node per queued
//! message (DHAT, 300 idle agents, seventh session: docs/BENCHMARKS.md). Nothing here needs
//! tokio's extras (`closed()` futures, permits), so the tunnels use `futures-channel`. Messages
//! are boxed: the channel keeps its last node allocated, so a node holds a pointer, not a
//! message.

use std::pin::Pin;
use std::task::{Context, Poll};

use agentgate_proto::v1::GatewayMessage;
use futures_channel::mpsc;
use futures_util::Stream;
use tonic::Status;

/// Messages queued per tunnel beyond one per sender. Small: h2 flow control does the real
/// buffering.
const QUEUE: usize = 3;

/// A new queue: the sending half for the gateway, the stream half for tonic.
pub fn channel() -> (ToAgentSender, ToAgentStream) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (ToAgentSender(tx), ToAgentStream(rx))
}

/// The gateway's end. Dropping every clone ends the stream, which the agent reads as the end
/// of the request (or, mid-request, as its cancellation).
#[derive(Clone)]
pub struct ToAgentSender(mpsc::Sender<Box<GatewayMessage>>);

impl ToAgentSender {
    /// Queues `msg`, waiting for room; gives it back if the stream is gone.
    pub async fn send(&mut self, msg: GatewayMessage) -> Result<(), GatewayMessage> {
        if std::future::poll_fn(|cx| self.0.poll_ready(cx))
            .await
            .is_err()
        {
            return Err(msg);
        }
        self.0.try_send(Box::new(msg)).map_err(|e| *e.into_inner())
    }

    /// Queues `msg` if there is room now. `Err(true)` if the stream is gone, `Err(false)` if
    /// the queue is full.
    pub fn try_send(&mut self, msg: GatewayMessage) -> Result<(), bool> {
        self.0
            .try_send(Box::new(msg))
            .map_err(|e| e.is_disconnected())
    }

    /// True once tonic dropped the stream half: the call ended.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl agentgate_proto::pump::MessageSink<GatewayMessage> for &mut ToAgentSender {
    async fn send(&mut self, m: GatewayMessage) -> bool {
        ToAgentSender::send(self, m).await.is_ok()
    }
}

/// The response stream of `Tunnel.Connect`.
pub struct ToAgentStream(mpsc::Receiver<Box<GatewayMessage>>);

impl Stream for ToAgentStream {
    type Item = Result<GatewayMessage, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|m| m.map(|m| Ok(*m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_proto::v1::{gateway_message, Heartbeat};
    use futures_util::StreamExt;

    fn heartbeat(n: i64) -> GatewayMessage {
        GatewayMessage {
            msg: Some(gateway_message::Msg::Heartbeat(Heartbeat {
                unix_millis: n,
            })),
        }
    }

    #[tokio::test]
    async fn keeps_order_bounds_the_queue_and_gives_back_what_it_could_not_send() {
        let (mut tx, mut rx) = channel();
        let mut queued = 0;
        while tx.try_send(heartbeat(queued)).is_ok() {
            queued += 1;
        }
        assert_eq!(queued as usize, QUEUE + 1, "the queue plus one per sender");
        assert_eq!(tx.try_send(heartbeat(99)), Err(false), "full, not gone");
        for n in 0..queued {
            assert_eq!(rx.next().await.unwrap().unwrap(), heartbeat(n));
        }
        tx.send(heartbeat(7)).await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap(), heartbeat(7));
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(heartbeat(8)).await, Err(heartbeat(8)));
        assert_eq!(tx.try_send(heartbeat(9)), Err(true));
    }

    #[tokio::test]
    async fn the_stream_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = channel();
        let mut second = tx.clone();
        drop(tx);
        second.send(heartbeat(1)).await.unwrap();
        drop(second);
        assert_eq!(rx.next().await.unwrap().unwrap(), heartbeat(1));
        assert!(rx.next().await.is_none());
    }
}
