//! Where a tunnelled request goes: down a tunnel parked at this replica (`tunnel::forward`),
//! or, in cluster mode, through the replica that holds the agent (`cluster`). The tunnel API's
//! HTTP and gRPC fronts (`api/`) and the internal API (`cluster::internal_api`) all start here.

use std::fmt::Display;
use std::time::Duration;

use agentgate_proto::v1::RequestHead;
use bytes::Bytes;
use http_body::Body;

use crate::tunnel::{ForwardError, ForwardResponse, ParkedTunnel};
use crate::Gateway;

impl Gateway {
    /// Forwards one request to `agent`: through a local tunnel if the agent is connected
    /// here, otherwise (in cluster mode) through the replica that holds it.
    pub async fn forward<B>(
        &self,
        agent: &str,
        head: RequestHead,
        body: B,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let local = self.directory.is_connected(agent) || self.tunnels.idle_count(agent) > 0;
        if !local && !self.tokens.agent_known(agent) {
            return Err(ForwardError::UnknownAgent {
                agent: agent.into(),
            });
        }
        if local {
            let tunnel = self
                .take_local(agent, self.config.tunnel_wait, None)
                .await?;
            return self.forward_on(agent, tunnel, head, body).await;
        }
        match &self.cluster {
            Some(cluster) => {
                cluster
                    .forward_remote(self.config.tunnel_wait, agent, head, body)
                    .await
            }
            None => Err(ForwardError::NotConnected {
                agent: agent.into(),
            }),
        }
    }

    /// Takes a live parked tunnel of `agent`, waiting up to `wait`, preferring connections
    /// other than `avoid`.
    pub async fn take_local(
        &self,
        agent: &str,
        wait: Duration,
        avoid: Option<u64>,
    ) -> Result<ParkedTunnel, ForwardError> {
        self.tunnels.take(agent, wait, avoid).await.ok_or_else(|| {
            if self.directory.is_connected(agent) {
                ForwardError::NoIdleTunnel {
                    agent: agent.into(),
                    waited: wait,
                }
            } else {
                ForwardError::NotConnected {
                    agent: agent.into(),
                }
            }
        })
    }
}
