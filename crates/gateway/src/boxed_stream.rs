//! A response stream fed by a bounded channel of boxed messages.
//!
//! A bounded tokio channel allocates room for 32 items up front. Every idle agent holds one
//! such channel on the gateway (its session; the tunnels use `tunnel::to_agent`), so the items
//! are boxed: 32 pointers instead of 32 `Result<Message, Status>` values, which is per-agent
//! memory. The session keeps tokio's channel for `Sender::closed()`: it notices at once that the
//! agent ended its session.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Yields `Ok(*item)` for every boxed item received; when the channel closes, the status left
/// in the end slot (if any) ends the call, else the call ends OK.
pub struct BoxedMessageStream<T> {
    rx: ReceiverStream<Box<T>>,
    end: Option<Arc<OnceLock<Status>>>,
}

impl<T> BoxedMessageStream<T> {
    /// A stream whose call ends with the status put in `end` before the sender is dropped.
    pub fn ending_with(
        rx: tokio::sync::mpsc::Receiver<Box<T>>,
        end: Arc<OnceLock<Status>>,
    ) -> Self {
        Self {
            rx: ReceiverStream::new(rx),
            end: Some(end),
        }
    }
}

impl<T> tokio_stream::Stream for BoxedMessageStream<T> {
    type Item = Result<T, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.rx).poll_next(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some(Ok(*m))),
            Poll::Ready(None) => {
                let status = self.end.take().and_then(|end| end.get().cloned());
                Poll::Ready(status.map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
