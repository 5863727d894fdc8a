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
use std::time::Duration;

use agentgate_proto::v1::{session_event, Draining, Heartbeat, SessionEvent};
use agentgate_transport::{ConnMeta, DRAIN_MAX_AGE};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use crate::directory::SessionGuard;
use crate::session::Sessions;

/// Reason label when a session ends because its token was revoked.
pub const REJECT_REVOKED: &str = "token_revoked";
/// Reason label when a session ends because its token's expiry passed.
pub const REJECT_EXPIRED: &str = "token_expired";

/// How long after a revoked agent's session ended with the reason its connection is told to go
/// (GOAWAY): time for the status to reach the agent first (a GOAWAY first made it reconnect
/// before it read why).
const REVOKED_GOAWAY_AFTER: Duration = Duration::from_secs(1);

/// How long the tunnelled requests in flight on a revoked agent's connection get to finish
/// after its GOAWAY (the agent closes the connection once they have): then it is cut.
const REVOKED_IN_FLIGHT_GRACE: Duration = Duration::from_secs(30);

/// At shutdown, how long a session waits for its connection's GOAWAY before it ends anyway,
/// and how often it looks.
const GOAWAY_WAIT: Duration = Duration::from_secs(1);
const GOAWAY_POLL: Duration = Duration::from_millis(5);

/// Who the session is, for its log lines.
pub struct SessionOwner {
    pub agent: String,
    pub token_id: String,
    /// When the token expires (Unix seconds), if it does.
    pub token_expires_at: Option<u64>,
}

pub struct SessionEvents {
    sessions: Arc<Sessions>,
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
    /// The gateway's `stopping` until it fires, then its `shutdown` (one future at a time:
    /// `shutdown` implies `stopping`, and an idle session holds one fewer allocation).
    stopping_then_shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    /// True once the stream ended by itself; dropped before that, the agent ended it.
    ended: bool,
}

impl SessionEvents {
    pub fn new(
        sessions: Arc<Sessions>,
        conn: Arc<ConnMeta>,
        owner: SessionOwner,
        listed: SessionGuard,
        revoked: CancellationToken,
        first: SessionEvent,
    ) -> Self {
        let heartbeat = sessions.heartbeat;
        let next_heartbeat = Instant::now() + heartbeat;
        // The session ends a little after the connection's GOAWAY for max age, so that the
        // agent dials a fresh connection only once no new streams can land on this one.
        let end_at = sessions.session_deadline(&conn);
        // A session that begins on a connection already past its drain point (a proxy that
        // put a new agent's Register on its old connection to the gateway) is not told to move
        // at once: moved, it came back on the same connection, hundreds of times a second. It
        // stays until the connection's end.
        let drain_at = sessions
            .drain_deadline(&conn)
            .filter(|d| *d > Instant::now());
        Self {
            stopping_then_shutdown: Box::pin(sessions.stopping.clone().cancelled_owned()),
            revoked: Box::pin(revoked.cancelled_owned()),
            timer: Box::pin(tokio::time::sleep_until(next_heartbeat)),
            sessions,
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

    /// The connection takes no new requests and its parked tunnels end now. Returns how many
    /// parked tunnels ended.
    fn retire_connection(&self) -> usize {
        self.conn.retired.store(true, Ordering::Relaxed);
        self.sessions.parking.end_connection(self.conn.id)
    }

    /// The token is gone: the session ends with a sentence, the connection takes no new
    /// requests and its parked tunnels end, and the agent's next registration is refused.
    fn revoke(&mut self) -> Poll<Option<Result<SessionEvent, Status>>> {
        let ended = self.retire_connection();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let expired = self.owner.token_expires_at.is_some_and(|at| now >= at);
        let (what, reason) = if expired {
            ("expired", REJECT_EXPIRED)
        } else {
            ("was revoked", REJECT_REVOKED)
        };
        self.sessions.metrics.connections_rejected.inc(&[reason]);
        tracing::warn!(
            conn = self.conn.id,
            agent = %self.owner.agent,
            token_id = %self.owner.token_id,
            parked_tunnels_ended = ended,
            reason,
            "ending session: its token {what}"
        );
        // The status below must reach the agent first (closing at once cut it off: the agent
        // saw a broken connection, not why; a GOAWAY first made it reconnect before reading
        // the status). Then a GOAWAY: requests in flight finish (closing a second later cut
        // them, and a rotation re-sent or lost them), and the agent closes the connection;
        // one that keeps it is cut after the grace.
        let conn = self.conn.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REVOKED_GOAWAY_AFTER).await;
            let _ = conn.request_drain(reason);
            tokio::time::sleep(REVOKED_IN_FLIGHT_GRACE).await;
            conn.request_close();
        });
        self.end(Some(Status::unauthenticated(format!(
            "agentgate: this agent's token {what}; give the agent a new token (an agent that \
             already has one reconnects with it)"
        ))))
    }
}

fn event(e: session_event::Event) -> Poll<Option<Result<SessionEvent, Status>>> {
    Poll::Ready(Some(Ok(SessionEvent { event: Some(e) })))
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
        if this.stop_by.is_none() && this.stopping_then_shutdown.as_mut().poll(cx).is_ready() {
            // Shutdown: end once this connection's GOAWAY is written, so that the agent reads
            // the session's end as planned (the GOAWAY is only seen while the PING policy is
            // on, hence the time limit), or at `shutdown`, whichever comes first.
            this.stop_by = Some(Instant::now() + GOAWAY_WAIT);
            this.stopping_then_shutdown =
                Box::pin(this.sessions.shutdown.clone().cancelled_owned());
        }
        if this.stop_by.is_some() && this.stopping_then_shutdown.as_mut().poll(cx).is_ready() {
            return this.end(None);
        }
        if this.revoked.as_mut().poll(cx).is_ready() {
            return this.revoke();
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
                // And the connection's client: a proxy carrying many agents' calls on it opens
                // no new streams here (the agent's new Register among them) once it reads the
                // GOAWAY; calls in flight go on until the connection's max age and grace.
                let _ = this.conn.request_drain(DRAIN_MAX_AGE);
                return event(session_event::Event::Draining(Draining {
                    reason: "connection reached max_connection_age".into(),
                }));
            }
            if now >= this.next_heartbeat {
                // One heartbeat however late we are: an agent that did not read for a while
                // gets one, not a backlog.
                this.next_heartbeat = now + this.heartbeat;
                return event(session_event::Event::Heartbeat(Heartbeat::now()));
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
        let ended = self.retire_connection();
        tracing::info!(
            conn = self.conn.id,
            parked_tunnels_ended = ended,
            "agent retired the connection"
        );
    }
}

#[cfg(test)]
mod tests {
    //! The session's events in-process, on paused time: a real `Gateway` (token store on
    //! disk), a connection's metadata, and the stream polled as tonic would.
    use agentgate_transport::TransportKind;
    use futures_util::StreamExt;

    use super::*;
    use crate::config::GatewayConfig;
    use crate::directory::AgentRecord;
    use crate::tokens::{create_token, TokenKind};
    use crate::Gateway;

    const HEARTBEAT: Duration = Duration::from_secs(20);

    fn gateway(dir: &std::path::Path, max_age: Duration) -> Arc<Gateway> {
        let tokens = dir.join("tokens.json");
        create_token(&tokens, TokenKind::Agent, "known", &[]).unwrap();
        let config = GatewayConfig {
            tokens,
            stream_heartbeat_interval: HEARTBEAT,
            max_connection_age: max_age,
            ..GatewayConfig::default()
        };
        Gateway::new(config).unwrap()
    }

    fn session(gw: &Arc<Gateway>, revoked: &CancellationToken) -> (SessionEvents, Arc<ConnMeta>) {
        let conn = Arc::new(ConnMeta::new(
            3,
            TransportKind::Grpc,
            "127.0.0.1:1".parse().unwrap(),
            Arc::default(),
        ));
        let record = AgentRecord {
            name: "known".into(),
            instance_id: "i-1".into(),
            version: String::new(),
            hostname: String::new(),
            transport: "grpc".into(),
            peer: conn.peer.to_string(),
            connected_since: String::new(),
            connection_id: conn.id,
        };
        let listed = gw.directory.register(&gw.metrics, record);
        let owner = SessionOwner {
            agent: "known".into(),
            token_id: "t-1".into(),
            token_expires_at: None,
        };
        let first = SessionEvent {
            event: Some(session_event::Event::Heartbeat(Heartbeat {
                unix_millis: 1,
            })),
        };
        let events = SessionEvents::new(
            gw.sessions.clone(),
            conn.clone(),
            owner,
            listed,
            revoked.clone(),
            first,
        );
        (events, conn)
    }

    /// The next event's kind and when it came, in whole seconds since `start`.
    async fn next(events: &mut SessionEvents, start: Instant) -> (Option<&'static str>, u64) {
        let kind = match events.next().await {
            None => None,
            Some(Err(_)) => Some("error"),
            Some(Ok(SessionEvent { event })) => Some(match event {
                Some(session_event::Event::Heartbeat(_)) => "heartbeat",
                Some(session_event::Event::Draining(_)) => "draining",
                _ => "other",
            }),
        };
        (kind, start.elapsed().as_secs())
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_then_draining_then_the_end_a_little_after_max_age() {
        let dir = tempfile::tempdir().unwrap();
        let age = Duration::from_secs(100);
        let gw = gateway(dir.path(), age);
        let (mut events, conn) = session(&gw, &CancellationToken::new());
        let start = Instant::now();
        let drain_at = crate::drain_point(age, conn.id).as_secs();
        assert_eq!(
            next(&mut events, start).await,
            (Some("heartbeat"), 0),
            "the first"
        );
        let mut seen = vec![];
        loop {
            let (kind, at) = next(&mut events, start).await;
            seen.push((kind, at));
            if kind.is_none() {
                break;
            }
        }
        let mut expected: Vec<_> = (1..=age.as_secs() / 20)
            .map(|n| (Some("heartbeat"), n * 20))
            .collect();
        expected.push((Some("draining"), drain_at));
        expected.sort_by_key(|e| e.1);
        expected.push((None, age.as_secs() + 2));
        assert_eq!(seen, expected);
        assert!(events.next().await.is_none(), "it stays ended");
        drop(events);
        assert!(!conn.is_retired(), "the gateway ended it: not a retirement");
        assert_eq!(gw.directory.len(), 0, "no longer listed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_token_ends_the_session_with_unauthenticated_then_drains_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(dir.path(), Duration::ZERO);
        let revoked = CancellationToken::new();
        let (mut events, conn) = session(&gw, &revoked);
        let start = Instant::now();
        assert_eq!(next(&mut events, start).await.0, Some("heartbeat"));
        assert_eq!(next(&mut events, start).await, (Some("heartbeat"), 20));
        tokio::spawn({
            let revoked = revoked.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                revoked.cancel();
            }
        });
        match events.next().await {
            Some(Err(status)) => {
                assert_eq!(status.code(), tonic::Code::Unauthenticated);
                assert!(status.message().contains("revoked"), "{}", status.message());
            }
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
        assert_eq!(start.elapsed().as_secs(), 25, "at once");
        assert!(events.next().await.is_none());
        assert!(conn.is_retired());
        // The status goes out first; the GOAWAY a moment later, so that requests in flight
        // finish; the connection is cut only after their grace.
        assert!(conn.drain.get().is_none());
        tokio::time::sleep(REVOKED_GOAWAY_AFTER + Duration::from_millis(10)).await;
        assert_eq!(conn.drain.get(), Some(&REJECT_REVOKED));
        assert!(!conn.close_requested.load(Ordering::Relaxed));
        tokio::time::sleep(REVOKED_IN_FLIGHT_GRACE).await;
        assert!(conn.close_requested.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn the_agent_ending_its_session_retires_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(dir.path(), Duration::ZERO);
        let (mut events, conn) = session(&gw, &CancellationToken::new());
        assert!(events.next().await.is_some());
        assert_eq!(gw.directory.len(), 1);
        drop(events);
        assert!(conn.is_retired());
        assert_eq!(gw.directory.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_the_session_ends_once_the_goaway_is_out_or_after_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(dir.path(), Duration::ZERO);
        let (mut events, conn) = session(&gw, &CancellationToken::new());
        let (mut late, _late_conn) = session(&gw, &CancellationToken::new());
        let start = Instant::now();
        assert!(events.next().await.is_some());
        assert!(late.next().await.is_some());
        gw.stopping.cancel();
        tokio::spawn({
            let conn = conn.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                conn.goaway_sent.store(true, Ordering::Relaxed);
            }
        });
        assert!(events.next().await.is_none());
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(400),
            "ended at the GOAWAY: {took:?}"
        );
        assert!(late.next().await.is_none(), "no GOAWAY seen: ends anyway");
        assert_eq!(start.elapsed().as_secs(), 1);
        assert!(!conn.is_retired());
    }
}
