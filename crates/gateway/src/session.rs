//! `AgentSession.Register`: the long-lived call that makes an agent instance "connected".

use std::sync::Arc;

use agentgate_proto::v1::agent_session_server::AgentSession;
use agentgate_proto::v1::{session_event, RegisterRequest, Registered, SessionEvent};
use tonic::{Request, Response, Status};

use crate::directory::{rfc3339, AgentRecord};
use crate::session_events::{SessionEvents, SessionOwner};
use crate::Gateway;

pub struct SessionService {
    pub gw: Arc<Gateway>,
}

const MAX_FIELD: usize = 256;

#[tonic::async_trait]
impl AgentSession for SessionService {
    type RegisterStream = SessionEvents;

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
        let listed = self.gw.directory.register(&self.gw.metrics, record);
        let first = SessionEvent {
            event: Some(session_event::Event::Registered(Registered {
                agent_name: id.name.clone(),
                connection_id: id.conn.id.to_string(),
                transport: id.conn.kind.as_str().into(),
                heartbeat_interval_seconds: self.gw.config.stream_heartbeat_interval.as_secs()
                    as u32,
            })),
        };
        let owner = SessionOwner {
            agent: id.name.clone(),
            token_id: id.token_id.clone(),
        };
        Ok(Response::new(SessionEvents::new(
            self.gw.clone(),
            id.conn.clone(),
            owner,
            listed,
            id.revoked.clone(),
            first,
        )))
    }
}
