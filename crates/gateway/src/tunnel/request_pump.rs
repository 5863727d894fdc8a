//! The caller's request body on its way down a tunnel, in its own task, so that the answer
//! can start (and end) while the body still streams.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use agentgate_proto::pump::{pump_body, PumpEnd};
use bytes::Bytes;
use http_body::Body;

use super::ToAgentSender;
use crate::metrics::Metrics;
/// The request body on its way to the agent.
pub(super) struct RequestPump {
    /// Ends with why the client's body broke off, if it did.
    pub(super) task: tokio::task::JoinHandle<Option<String>>,
    /// The task has ended and was awaited.
    ended: bool,
    /// Set once EndOfRequest is queued: the tunnel may then carry another request (the queue
    /// keeps the order), even before the task itself has ended.
    pub(super) sent: Arc<AtomicBool>,
}

impl RequestPump {
    /// Starts streaming `body` down the tunnel (`tx`) in chunks of at most `chunk_size`.
    pub(super) fn spawn<B>(
        body: B,
        tx: ToAgentSender,
        chunk_size: usize,
        metrics: Arc<Metrics>,
        transport: &'static str,
    ) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let sent = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(pump_request_body(
            body,
            tx,
            chunk_size,
            metrics,
            transport,
            sent.clone(),
        ));
        Self {
            task,
            sent,
            ended: false,
        }
    }

    /// Resolves, with why, once the client's request body broke off; pends otherwise (no
    /// body, a body sent whole, or a tunnel that went away first).
    pub(super) async fn broke_off(pump: &mut Option<RequestPump>) -> String {
        if let Some(p) = pump.as_mut().filter(|p| !p.ended) {
            let why = (&mut p.task).await.ok().flatten();
            p.ended = true;
            if let Some(why) = why {
                return why;
            }
        }
        std::future::pending().await
    }
}

/// Streams the client's request body into the tunnel (`agentgate_proto::pump`), then sets
/// `sent`. Returns why the body broke off, if it did.
async fn pump_request_body<B>(
    body: B,
    mut tx: ToAgentSender,
    chunk_size: usize,
    metrics: Arc<Metrics>,
    transport: &'static str,
    sent: Arc<AtomicBool>,
) -> Option<String>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Display + Send,
{
    let end = pump_body(body, None, chunk_size, &mut tx, |n| {
        metrics
            .tunnel_request_bytes
            .add(&["to_agent", transport], n as f64)
    })
    .await;
    match end {
        PumpEnd::Complete => {
            sent.store(true, Ordering::Release);
            None
        }
        PumpEnd::BodyFailed(e) => Some(e),
        PumpEnd::ReceiverGone => None,
    }
}
