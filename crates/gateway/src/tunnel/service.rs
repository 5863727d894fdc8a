//! `Tunnel.Connect`: accepts a tunnel stream from an agent and parks it.

use std::sync::Arc;

use agentgate_proto::v1::tunnel_server::Tunnel;
use agentgate_proto::v1::{agent_message, AgentMessage};
use tonic::{Request, Response, Status, Streaming};

use super::{to_agent, ParkedTunnel, ToAgentStream};
use crate::Gateway;

pub struct TunnelService {
    pub gw: Arc<Gateway>,
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
        let wait = self.gw.config.tunnel_descriptor_timeout;
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
        self.gw.metrics.tunnel_streams_opened.inc(&[]);
        let (tx, out) = to_agent::channel();
        tracing::debug!(agent = %id.name, conn = id.conn.id, "tunnel parked");
        self.gw.tunnels.park(
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
