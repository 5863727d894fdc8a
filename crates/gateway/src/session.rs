//! `AgentSession.Register`: the long-lived call that makes an agent instance "connected".

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use agentgate_proto::v1::agent_session_server::AgentSession;
use agentgate_proto::v1::{
    session_event, Draining, Heartbeat, RegisterRequest, Registered, SessionEvent,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::boxed_stream::BoxedMessageStream;
use crate::directory::{rfc3339, AgentRecord};
use crate::Gateway;

pub struct SessionService {
    pub gw: Arc<Gateway>,
}

const MAX_FIELD: usize = 256;

/// Reason label when a session ends because its token was revoked.
pub const REJECT_REVOKED: &str = "token_revoked";

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl AgentSession for SessionService {
    type RegisterStream = BoxedMessageStream<SessionEvent>;

    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let id = crate::auth::identity_of(&req)?;
        let r = req.into_inner();
        if r.instance_id.is_empty() || r.instance_id.len() > MAX_FIELD {
            return Err(Status::invalid_argument(
                "agentgate: instance_id must be 1-256 characters",
            ));
        }
        if !self.gw.allow_connect(&id.token_id).await {
            self.gw.metrics.connect_rate_limited.inc(&[]);
            tracing::warn!(agent = %id.name, peer = %id.conn.peer, "registration refused: connect rate limit");
            return Err(Status::resource_exhausted(format!(
                "agentgate: too many connections for this token in the last minute (limit {})",
                self.gw.config.connect_rate_limit_per_minute
            )));
        }
        let trim = |s: String| s.chars().take(MAX_FIELD).collect::<String>();
        let record = AgentRecord {
            name: id.name.clone(),
            instance_id: trim(r.instance_id),
            version: trim(r.version),
            hostname: trim(r.hostname),
            transport: id.conn.kind.as_str().to_string(),
            peer: id.conn.peer.to_string(),
            connected_since: rfc3339(id.conn.opened_at_wall),
            connection_id: id.conn.id,
        };
        let _ = id
            .conn
            .registered
            .set((record.name.clone(), record.instance_id.clone()));
        // From the TCP accept to this point: TLS, the sniff, the WebSocket upgrade, HTTP/2
        // and the agent's own time to call Register.
        self.gw
            .metrics
            .registration_duration
            .observe(&[id.conn.kind.as_str()], id.conn.opened_at.elapsed());
        tracing::info!(
            agent = %record.name,
            instance = %record.instance_id,
            version = %record.version,
            hostname = %record.hostname,
            transport = %record.transport,
            peer = %record.peer,
            conn = record.connection_id,
            "agent registered"
        );
        let guard = self.gw.directory.register(&self.gw.metrics, record);
        let heartbeat = self.gw.config.stream_heartbeat_interval;
        let (tx, rx) = mpsc::channel::<Box<SessionEvent>>(2);
        let first = SessionEvent {
            event: Some(session_event::Event::Registered(Registered {
                agent_name: id.name.clone(),
                connection_id: id.conn.id.to_string(),
                transport: id.conn.kind.as_str().into(),
                heartbeat_interval_seconds: heartbeat.as_secs() as u32,
            })),
        };
        tx.try_send(Box::new(first))
            .expect("fresh channel has room");
        let gw = self.gw.clone();
        let conn = id.conn.clone();
        let revoked = id.revoked.clone();
        let (agent_name, token_id) = (id.name.clone(), id.token_id.clone());
        let end: Arc<std::sync::OnceLock<Status>> = Arc::default();
        let end_with = end.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let mut tick = tokio::time::interval(heartbeat);
            tick.tick().await;
            // The session ends a little after the connection's GOAWAY for max age, so that the
            // agent dials a fresh connection only once no new streams can land on this one.
            let end_at = gw.session_deadline(&conn);
            let mut drain_at = gw.drain_deadline(&conn);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(drain_at.unwrap_or(end_at)), if drain_at.is_some() => {
                        drain_at = None;
                        let ev = SessionEvent {
                            event: Some(session_event::Event::Draining(Draining {
                                reason: "connection reached max_connection_age".into(),
                            })),
                        };
                        tracing::info!(conn = conn.id, "connection draining: asking the agent to reconnect");
                        if tx.send(Box::new(ev)).await.is_err() {
                            break;
                        }
                    }
                    _ = tx.closed() => {
                        // The agent ended its session: it is moving to another connection
                        // (make before break). This connection's tunnels take no new requests;
                        // the parked ones end now, so the agent need not race us to close them.
                        conn.retired.store(true, std::sync::atomic::Ordering::Relaxed);
                        let ended = gw.tunnels.end_connection(conn.id);
                        tracing::info!(conn = conn.id, parked_tunnels_ended = ended, "agent retired the connection");
                        break;
                    }
                    _ = gw.stopping.cancelled() => {
                        // Shutdown: end once this connection's GOAWAY is written, so that the
                        // agent reads the session's end as planned; at most a second (the
                        // GOAWAY is only seen while the PING policy is on).
                        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
                        while !conn.goaway_sent.load(std::sync::atomic::Ordering::Relaxed)
                            && tokio::time::Instant::now() < deadline
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                        break;
                    }
                    _ = gw.shutdown.cancelled() => break,
                    _ = revoked.cancelled() => {
                        // The token is gone: the session ends with a sentence, the connection
                        // takes no new requests and its parked tunnels end, and the agent's
                        // next registration is refused.
                        let _ = end_with.set(Status::unauthenticated(
                            "agentgate: this agent's token was revoked; give the agent a new token",
                        ));
                        conn.retired.store(true, std::sync::atomic::Ordering::Relaxed);
                        let ended = gw.tunnels.end_connection(conn.id);
                        gw.metrics.connections_rejected.inc(&[REJECT_REVOKED]);
                        tracing::warn!(
                            conn = conn.id,
                            agent = %agent_name,
                            token_id = %token_id,
                            parked_tunnels_ended = ended,
                            reason = REJECT_REVOKED,
                            "ending session: its token was revoked"
                        );
                        conn.request_close();
                        break;
                    }
                    _ = tokio::time::sleep_until(end_at) => {
                        tracing::info!(conn = conn.id, "ending session: connection reached max age");
                        break;
                    }
                    _ = tick.tick() => {
                        let hb = SessionEvent {
                            event: Some(session_event::Event::Heartbeat(Heartbeat { unix_millis: unix_millis() })),
                        };
                        if tx.send(Box::new(hb)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(BoxedMessageStream::ending_with(rx, end)))
    }
}
