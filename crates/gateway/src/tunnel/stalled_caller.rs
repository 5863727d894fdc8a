//! An answer whose caller stops reading must not hold its agent's connection.
//!
//! A streaming answer's unread bytes wait in the agent connection's HTTP/2 windows: up to
//! `http2_stream_window` each, out of one `http2_connection_window` that all of the agent's
//! streams share. Callers that stop reading (a suspended `kubectl logs -f`, a client stuck
//! behind its own full socket, a peer replica relaying for one) would, about 32 of them, freeze
//! every other request to that agent. So each streaming answer gets a watchdog: once the
//! caller's connection has not asked for the next piece for `stalled_caller_timeout`, the
//! watchdog drops the answer's tunnel stream (the agent reads it as cancellation, and HTTP/2
//! hands the unread bytes' window back), and a caller that reads again gets an error instead of
//! the rest. An answer that is merely slow to come from the agent (a watch, a long poll) is
//! never cut: only time spent waiting on the caller counts.
//!
//! Answers that arrive whole with their head (most small ones) hold nothing at the agent and
//! get no watchdog; nor does anything when the setting is `0s`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use super::BoxError;

/// Lines a second about cancelled answers: a client that opens many downloads and stops
/// reading them all would otherwise write one line each. The rest are counted in the next
/// line's `suppressed`.
static STALLED_LOG: agentgate_transport::LogBudget = agentgate_transport::LogBudget::new(5);

/// The error a caller that reads again after its answer was cancelled gets, and that the
/// access log knows the outcome `caller_stalled` by.
#[derive(Debug, thiserror::Error)]
#[error(
    "the caller read nothing of the answer for {}s, so the gateway cancelled the request \
     at the agent (stalled_caller_timeout); read the answer as it comes, or raise the setting",
    .0.as_secs()
)]
pub struct CallerStalled(pub Duration);

/// What the body and its watchdog share.
struct Shared<B> {
    /// The answer; the watchdog takes it out (and drops it) when the caller stalls.
    body: Mutex<Option<B>>,
    /// The clock of `handed_at` (tokio's, which tests can pause).
    since: Instant,
    /// Milliseconds after `since`, plus one, at which the last frame went to the caller's
    /// connection with no poll for the next since: the time the answer waits on the caller.
    /// 0 while the body waits on the agent (or was never polled: a caller's connection asks
    /// for the first frame as soon as the head is out).
    handed_at: AtomicU64,
}

impl<B> Shared<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<B>> {
        self.body.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long the answer has been waiting on the caller, if it is.
    fn waiting_on_caller(&self) -> Option<Duration> {
        match self.handed_at.load(Ordering::Acquire) {
            0 => None,
            at => Some(
                self.since
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at - 1)),
            ),
        }
    }
}

/// A streaming answer with its watchdog; see the module docs.
pub struct WatchedBody<B> {
    shared: Arc<Shared<B>>,
    timeout: Duration,
    /// Dropped with the body, which ends the watchdog at once.
    _alive: oneshot::Sender<()>,
}

/// Who the answer is for, named in the line written when it is cancelled.
pub struct StalledAnswer {
    pub agent: Arc<str>,
    /// The agent connection's transport.
    pub transport: &'static str,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl<B> WatchedBody<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    /// Watches `body` on the current runtime: it is dropped once its caller has waited
    /// `timeout` without asking for more.
    pub fn new(body: B, timeout: Duration, about: StalledAnswer) -> Self {
        let shared = Arc::new(Shared {
            body: Mutex::new(Some(body)),
            since: Instant::now(),
            handed_at: AtomicU64::new(0),
        });
        let (alive, ended) = oneshot::channel();
        tokio::spawn(watch(shared.clone(), timeout, ended, about));
        Self {
            shared,
            timeout,
            _alive: alive,
        }
    }
}

/// Sleeps until the answer could have waited `timeout` on its caller, and cancels it if it
/// has; ends when the body is dropped.
async fn watch<B>(
    shared: Arc<Shared<B>>,
    timeout: Duration,
    mut ended: oneshot::Receiver<()>,
    about: StalledAnswer,
) {
    let mut wait = timeout;
    loop {
        tokio::select! {
            _ = &mut ended => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = match shared.waiting_on_caller() {
            Some(waited) if waited >= timeout => break,
            Some(waited) => timeout - waited,
            None => timeout,
        };
    }
    // Dropped outside the lock: dropping a tunnel body may spawn or log.
    let body = shared.lock().take();
    if body.is_none() {
        return;
    }
    drop(body);
    about
        .metrics
        .tunnel_answers_cancelled
        .inc(&["caller_stalled", about.transport]);
    if let Some(suppressed) = STALLED_LOG.allow() {
        tracing::warn!(
            agent = %about.agent,
            transport = about.transport,
            suppressed,
            "cancelled a tunnelled request at the agent: its caller read nothing of the answer \
             for {}s, and unread answers hold the agent connection's window for its other \
             requests (stalled_caller_timeout)",
            timeout.as_secs()
        );
    }
}

impl<B> Drop for WatchedBody<B> {
    /// The body goes with its caller's side, here and not later on the watchdog's task.
    fn drop(&mut self) {
        let body = self.shared.lock().take();
        drop(body);
    }
}

impl<B> Body for WatchedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let shared = &self.shared;
        let mut body = shared.lock();
        let Some(inner) = body.as_mut() else {
            return Poll::Ready(Some(Err(CallerStalled(self.timeout).into())));
        };
        shared.handed_at.store(0, Ordering::Release);
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            let now = shared.since.elapsed().as_millis() as u64 + 1;
            shared.handed_at.store(now, Ordering::Release);
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.shared.lock().as_ref().is_some_and(B::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.shared
            .lock()
            .as_ref()
            .map_or_else(SizeHint::default, B::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed by the test: the sender sees it dropped (`is_closed`).
    type Fed = http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<FedFrame>>;
    type FedFrame = Result<Frame<Bytes>, BoxError>;

    fn watched(
        timeout: Duration,
    ) -> (
        WatchedBody<Fed>,
        mpsc::Sender<FedFrame>,
        Arc<crate::metrics::Metrics>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let body = WatchedBody::new(
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            timeout,
            StalledAnswer {
                agent: "a1".into(),
                transport: "grpc",
                metrics: metrics.clone(),
            },
        );
        (body, tx, metrics)
    }

    fn data(d: &[u8]) -> FedFrame {
        Ok(Frame::data(Bytes::copy_from_slice(d)))
    }

    fn cancelled(metrics: &crate::metrics::Metrics) -> bool {
        metrics
            .render()
            .contains("agentgate_tunnel_answers_cancelled_total{reason=\"caller_stalled\",transport=\"grpc\"} 1")
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_its_caller_stops_reading_is_dropped_after_the_timeout() {
        let (mut body, tx, metrics) = watched(Duration::from_secs(60));
        tx.send(data(b"one")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "one");
        // The caller reads nothing more: just before the timeout the answer is still held.
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!tx.is_closed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(tx.is_closed(), "the answer was dropped");
        assert!(cancelled(&metrics));
        // The caller reads again: an error that says what happened, not the rest.
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<CallerStalled>(), "{err}");
        assert!(err.to_string().contains("stalled_caller_timeout"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_slow_to_come_from_the_agent_is_never_cut() {
        let (mut body, tx, metrics) = watched(Duration::from_secs(60));
        // A watch: the caller waits for the next event for five minutes at a time.
        for event in 0..3u8 {
            let next = tokio::spawn(async move {
                let f = body.frame().await;
                (body, f)
            });
            tokio::time::sleep(Duration::from_secs(300)).await;
            tx.send(data(&[event])).await.unwrap();
            let (b, f) = next.await.unwrap();
            body = b;
            assert_eq!(f.unwrap().unwrap().into_data().unwrap()[..], [event]);
            // And the caller reads the next piece within the timeout each time.
            tokio::time::sleep(Duration::from_secs(59)).await;
        }
        assert!(!tx.is_closed());
        assert!(!cancelled(&metrics));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_body_ends_its_watchdog_and_the_answer_at_once() {
        let (body, tx, metrics) = watched(Duration::from_secs(60));
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 1, "the watchdog runs");
        drop(body);
        assert!(tx.is_closed(), "the answer went with its body");
        tokio::task::yield_now().await;
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 0, "the watchdog ended with its body");
        assert!(!cancelled(&metrics));
    }
}
