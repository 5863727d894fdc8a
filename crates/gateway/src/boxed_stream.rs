//! A response stream fed by a bounded channel of boxed messages.
//!
//! A bounded tokio channel allocates room for 32 items up front. Every idle agent holds three
//! such channels on the gateway (its session and two parked tunnels), so the items are boxed:
//! 32 pointers instead of 32 `Result<Message, Status>` values, which is per-agent memory.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Yields `Ok(*item)` for every boxed item received.
pub struct BoxedMessageStream<T>(pub ReceiverStream<Box<T>>);

impl<T> tokio_stream::Stream for BoxedMessageStream<T> {
    type Item = Result<T, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|m| m.map(|m| Ok(*m)))
    }
}
