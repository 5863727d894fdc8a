//! `AgentSession.Register`: the long-lived call that makes an agent instance "connected".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentgate_proto::v1::agent_session_server::AgentSession;
use agentgate_proto::v1::{session_event, RegisterRequest, Registered, SessionEvent};
use agentgate_transport::ConnMeta;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::cluster::registry::Registry;
use crate::directory::{rfc3339, AgentRecord, Directory};
use crate::metrics::Metrics;
use crate::session_events::{SessionEvents, SessionOwner};
use crate::tunnel::TunnelParking;

/// What agent sessions need, from registration to their end.
pub struct Sessions {
    /// Lists each session while it is open.
    pub directory: Arc<Directory>,
    /// A connection its agent retired ends its parked tunnels here at once.
    pub parking: Arc<TunnelParking>,
    pub metrics: Arc<Metrics>,
    pub connects: ConnectLimit,
    /// `stream_heartbeat_interval`.
    pub heartbeat: Duration,
    /// `max_connection_age` (zero: off).
    pub max_connection_age: Duration,
    /// Cancelled when shutdown begins: each session ends once its connection's GOAWAY is out.
    pub stopping: CancellationToken,
    /// Cancelled once sessions had their chance to end: the rest end now.
    pub shutdown: CancellationToken,
}

impl Sessions {
    /// When the agent on `conn` is asked to move to a new connection (the moment its parked
    /// tunnels stop being used), or `None` when max age is off.
    pub fn drain_deadline(&self, conn: &ConnMeta) -> Option<tokio::time::Instant> {
        let age = self.max_connection_age;
        (!age.is_zero()).then(|| {
            tokio::time::Instant::from_std(conn.opened_at + crate::drain_point(age, conn.id))
        })
    }

    /// When the session on `conn` should end: a little after the connection's GOAWAY for max
    /// age, or never (far future) when max age is off.
    pub fn session_deadline(&self, conn: &ConnMeta) -> tokio::time::Instant {
        let age = self.max_connection_age;
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        let at = if age.is_zero() {
            conn.opened_at + far
        } else {
            conn.opened_at + age + LONG_POLL_END_DELAY
        };
        tokio::time::Instant::from_std(at)
    }
}

/// How long after GOAWAY long-lived handlers on an aged connection end.
const LONG_POLL_END_DELAY: Duration = Duration::from_secs(2);

/// `connect_rate_limit_per_minute`: registrations per token and minute, shared through Redis
/// in cluster mode and counted here otherwise.
pub struct ConnectLimit {
    per_minute: u32,
    /// Cluster mode: the shared count. If Redis is down the limit fails open (counted here)
    /// rather than lock agents out.
    registry: Option<Arc<Registry>>,
    /// This minute's counts: (minute, token id -> registrations).
    counts: Mutex<(u64, HashMap<String, u32>)>,
}

impl ConnectLimit {
    pub fn new(per_minute: u32, registry: Option<Arc<Registry>>) -> Self {
        Self {
            per_minute,
            registry,
            counts: Mutex::default(),
        }
    }

    /// Counts a new registration of `token_id`; false when over the per-minute limit.
    pub async fn allow(&self, token_id: &str) -> bool {
        let limit = self.per_minute;
        if limit == 0 {
            return true;
        }
        if let Some(registry) = &self.registry {
            if let Ok(allowed) = registry.allow_connect(token_id, limit).await {
                return allowed;
            }
        }
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / 60;
        let mut g = self.counts.lock().unwrap();
        if g.0 != minute {
            *g = (minute, Default::default());
        }
        let n = g.1.entry(token_id.to_string()).or_insert(0);
        *n += 1;
        *n <= limit
    }
}

pub struct SessionService {
    pub sessions: Arc<Sessions>,
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
        if r.instance_id.is_empty()
            || r.instance_id.len() > MAX_FIELD
            || r.instance_id.chars().any(char::is_control)
        {
            return Err(Status::invalid_argument(
                "agentgate: instance_id must be 1-256 characters, none of them control characters",
            ));
        }
        let sessions = &self.sessions;
        if !sessions.connects.allow(&id.token_id).await {
            sessions.metrics.connect_rate_limited.inc(&[]);
            tracing::warn!(agent = %id.name, peer = %id.conn.peer, "registration refused: connect rate limit");
            return Err(Status::resource_exhausted(format!(
                "agentgate: too many connections for this token in the last minute (limit {})",
                sessions.connects.per_minute
            )));
        }
        // Version and hostname are only shown (logs, the agents list): cut to length, and
        // control characters (a newline forging a log line, terminal escapes) replaced.
        let trim = |s: String| {
            s.chars()
                .take(MAX_FIELD)
                .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                .collect::<String>()
        };
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
        sessions
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
        let listed = sessions.directory.register(&sessions.metrics, record);
        let first = SessionEvent {
            event: Some(session_event::Event::Registered(Registered {
                agent_name: id.name.clone(),
                connection_id: id.conn.id.to_string(),
                transport: id.conn.kind.as_str().into(),
                heartbeat_interval_seconds: sessions.heartbeat.as_secs() as u32,
            })),
        };
        let owner = SessionOwner {
            agent: id.name.clone(),
            token_id: id.token_id.clone(),
            token_expires_at: id.expires_at,
        };
        Ok(Response::new(SessionEvents::new(
            sessions.clone(),
            id.conn.clone(),
            owner,
            listed,
            id.revoked.clone(),
            first,
        )))
    }
}
