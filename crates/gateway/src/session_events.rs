//! The events of one agent session, made as the agent reads them: the response stream of
//! `AgentSession.Register`.
//!
//! `registered` first, then a heartbeat every `stream_heartbeat_interval`, `draining` at the
//! connection's drain point, and the end: at max connection age, at shutdown (once the
//! connection's GOAWAY is out), or with `UNAUTHENTICATED` when the token is revoked.
//!
//! The stream makes its events itself when tonic polls it, instead of a task per session
//! feeding a channel: an idle agent then costs no task and no channel (about 1.8 KiB of
//! gateway memory per agent, DHAT, seventh session). Polling happens on the stream's own
//! HTTP/2 task, which exists anyway, and an agent that stops reading simply stops being sent
//! heartbeats (HTTP/2 flow control) instead of filling a queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentgate_proto::v1::{session_event, Draining, Heartbeat, SessionEvent};
use agentgate_transport::ConnMeta;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use crate::directory::SessionGuard;
use crate::Gateway;

/// Reason label when a session ends because its token was revoked.
pub const REJECT_REVOKED: &str = "token_revoked";

/// At shutdown, how long a session waits for its connection's GOAWAY before it ends anyway,
/// and how often it looks.
const GOAWAY_WAIT: Duration = Duration::from_secs(1);
const GOAWAY_POLL: Duration = Duration::from_millis(5);

/// Who the session is, for its log lines.
pub struct SessionOwner {
    pub agent: String,
    pub token_id: String,
}

pub struct SessionEvents {
    gw: Arc<Gateway>,
    conn: Arc<ConnMeta>,
    owner: SessionOwner,
    /// Listed in the directory until this is dropped.
    _listed: SessionGuard,
    first: Option<SessionEvent>,
    heartbeat: Duration,
    next_heartbeat: Instant,
    drain_at: Option<Instant>,
    end_at: Instant,
    /// Set once shutdown began: the session ends at the connection's GOAWAY or at this time.
    stop_by: Option<Instant>,
    /// One timer, set to whichever of the times above comes first.
    timer: Pin<Box<Sleep>>,
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    /// True once the stream ended by itself; dropped before that, the agent ended it.
    ended: bool,
}

impl SessionEvents {
    pub fn new(
        gw: Arc<Gateway>,
        conn: Arc<ConnMeta>,
        owner: SessionOwner,
        listed: SessionGuard,
        revoked: CancellationToken,
        first: SessionEvent,
    ) -> Self {
        let heartbeat = gw.config.stream_heartbeat_interval;
        let next_heartbeat = Instant::now() + heartbeat;
        // The session ends a little after the connection's GOAWAY for max age, so that the
        // agent dials a fresh connection only once no new streams can land on this one.
        let end_at = gw.session_deadline(&conn);
        let drain_at = gw.drain_deadline(&conn);
        Self {
            stopping: Box::pin(gw.stopping.clone().cancelled_owned()),
            shutdown: Box::pin(gw.shutdown.clone().cancelled_owned()),
            revoked: Box::pin(revoked.cancelled_owned()),
            timer: Box::pin(tokio::time::sleep_until(next_heartbeat)),
            gw,
            conn,
            owner,
            _listed: listed,
            first: Some(first),
            heartbeat,
            next_heartbeat,
            drain_at,
            end_at,
            stop_by: None,
            ended: false,
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut at = self.end_at.min(self.next_heartbeat);
        if let Some(d) = self.drain_at {
            at = at.min(d);
        }
        if self.stop_by.is_some() {
            at = at.min(Instant::now() + GOAWAY_POLL);
        }
        at
    }

    fn end(&mut self, with: Option<Status>) -> Poll<Option<Result<SessionEvent, Status>>> {
        self.ended = true;
        Poll::Ready(with.map(Err))
    }

    /// The token is gone: the session ends with a sentence, the connection takes no new
    /// requests and its parked tunnels end, and the agent's next registration is refused.
    fn revoke(&mut self) -> Poll<Option<Result<SessionEvent, Status>>> {
        self.conn.retired.store(true, Ordering::Relaxed);
        let ended = self.gw.tunnels.end_connection(self.conn.id);
        self.gw.metrics.connections_rejected.inc(&[REJECT_REVOKED]);
        tracing::warn!(
            conn = self.conn.id,
            agent = %self.owner.agent,
            token_id = %self.owner.token_id,
            parked_tunnels_ended = ended,
            reason = REJECT_REVOKED,
            "ending session: its token was revoked"
        );
        self.conn.request_close();
        self.end(Some(Status::unauthenticated(
            "agentgate: this agent's token was revoked; give the agent a new token",
        )))
    }
}

fn event(e: session_event::Event) -> Poll<Option<Result<SessionEvent, Status>>> {
    Poll::Ready(Some(Ok(SessionEvent { event: Some(e) })))
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Stream for SessionEvents {
    type Item = Result<SessionEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            return this.end(None);
        }
        if this.revoked.as_mut().poll(cx).is_ready() {
            return this.revoke();
        }
        if this.stop_by.is_none() && this.stopping.as_mut().poll(cx).is_ready() {
            // Shutdown: end once this connection's GOAWAY is written, so that the agent reads
            // the session's end as planned (the GOAWAY is only seen while the PING policy is
            // on, hence the time limit).
            this.stop_by = Some(Instant::now() + GOAWAY_WAIT);
        }
        loop {
            let now = Instant::now();
            if let Some(by) = this.stop_by {
                if this.conn.goaway_sent.load(Ordering::Relaxed) || now >= by {
                    return this.end(None);
                }
            }
            if now >= this.end_at {
                tracing::info!(
                    conn = this.conn.id,
                    "ending session: connection reached max age"
                );
                return this.end(None);
            }
            if this.drain_at.is_some_and(|d| now >= d) {
                this.drain_at = None;
                tracing::info!(
                    conn = this.conn.id,
                    "connection draining: asking the agent to reconnect"
                );
                return event(session_event::Event::Draining(Draining {
                    reason: "connection reached max_connection_age".into(),
                }));
            }
            if now >= this.next_heartbeat {
                // One heartbeat however late we are: an agent that did not read for a while
                // gets one, not a backlog.
                this.next_heartbeat = now + this.heartbeat;
                return event(session_event::Event::Heartbeat(Heartbeat {
                    unix_millis: unix_millis(),
                }));
            }
            let at = this.next_deadline();
            this.timer.as_mut().reset(at);
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for SessionEvents {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // The agent ended its session: it is moving to another connection (make before
        // break), or the connection is gone. This connection's tunnels take no new requests;
        // the parked ones end now, so the agent need not race us to close them.
        self.conn.retired.store(true, Ordering::Relaxed);
        let ended = self.gw.tunnels.end_connection(self.conn.id);
        tracing::info!(
            conn = self.conn.id,
            parked_tunnels_ended = ended,
            "agent retired the connection"
        );
    }
}
