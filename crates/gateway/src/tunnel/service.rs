//! `Tunnel.Connect`: accepts a tunnel stream from an agent and parks it.

use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::tunnel_server::Tunnel;
use agentgate_proto::v1::{agent_message, AgentMessage};
use tonic::{Request, Response, Status, Streaming};

use super::{to_agent, ParkedTunnel, ToAgentStream, TunnelParking};
use crate::metrics::Metrics;

pub struct TunnelService {
    pub parking: Arc<TunnelParking>,
    pub metrics: Arc<Metrics>,
    /// `tunnel_descriptor_timeout`: how long a new stream may take to describe itself.
    pub descriptor_timeout: Duration,
}

#[tonic::async_trait]
impl Tunnel for TunnelService {
    type ConnectStream = ToAgentStream;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let id = crate::auth::identity_of(&req)?;
        let mut rx = req.into_inner();
        let wait = self.descriptor_timeout;
        let first = tokio::time::timeout(wait, rx.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded("agentgate: no tunnel descriptor within the deadline")
            })??;
        let descriptor = match first {
            Some(AgentMessage {
                msg: Some(agent_message::Msg::Descriptor(d)),
            }) => d,
            _ => {
                return Err(Status::invalid_argument(
                    "agentgate: the first message on a tunnel must be a descriptor",
                ))
            }
        };
        self.metrics.tunnel_streams_opened.inc(&[]);
        let (tx, out) = to_agent::channel();
        tracing::debug!(agent = %id.name, conn = id.conn.id, "tunnel parked");
        self.parking.park(
            &id.name,
            ParkedTunnel {
                tx,
                rx,
                descriptor,
                conn: id.conn,
                agent: Arc::from(id.name.as_str()),
            },
        );
        Ok(Response::new(out))
    }
}
