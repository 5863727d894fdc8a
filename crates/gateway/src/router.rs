//! Where a tunnelled request goes: down a tunnel parked at this replica (`tunnel::forward`),
//! or, in cluster mode, through the replica that holds the agent (`cluster`): in one round
//! trip when the request has no body and one replica holds the agent, otherwise by reserving
//! a tunnel there first, so that a body goes only where a tunnel waits for it. The tunnel API's
//! HTTP and gRPC fronts (`api/`) and the internal API (`cluster::internal_api`) all start here.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::RequestHead;
use bytes::Bytes;
use http_body::Body;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, DirectForward};
use crate::tokens::TokenStore;
use crate::tunnel::{ForwardError, ForwardResponse, LocalTunnels, ServedOver, NO_AGENT, REPLICA};

/// How often a request waiting for a disconnected agent looks again (locally, and in Redis).
const RECONNECT_POLL: Duration = Duration::from_millis(100);

/// Decides where a tunnelled request goes, and sends it there.
pub struct Router {
    pub local: Arc<LocalTunnels>,
    /// Cluster mode: the replicas that hold agents not connected here.
    pub cluster: Option<Arc<Cluster>>,
    /// To tell an agent no token names (refused at once) from one that is away (waited for).
    pub tokens: Arc<TokenStore>,
    /// The gateway began to drain: a request that found no tunnel here looks for its agent at
    /// the other replicas.
    pub stopping: CancellationToken,
    /// `agent_reconnect_wait`.
    pub reconnect_wait: Duration,
}

impl Router {
    /// Forwards one request to `agent`: through a local tunnel if the agent is connected
    /// here, otherwise (in cluster mode) through the replica that holds it. A known agent
    /// that is connected nowhere is waited for up to `agent_reconnect_wait`: during a rolling
    /// restart or a proxy reload its agents are between two connections for a moment, and a
    /// request should wait for them rather than fail.
    pub async fn forward<B>(
        &self,
        agent: &str,
        head: RequestHead,
        body: B,
        served: &ServedOver,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let tunnel_wait = self.local.tunnel_wait;
        let mut deadline = tokio::time::Instant::now() + self.reconnect_wait;
        let mut checked_token = false;
        loop {
            if self.local.holds(agent) {
                match self.local.take(agent, tunnel_wait, None).await {
                    Ok(tunnel) => {
                        return self
                            .local
                            .forward_on(agent, tunnel, head, body, served)
                            .await
                    }
                    // This replica began to drain while the request waited: its agents are
                    // moving to other replicas, so look for them there (the body is untouched).
                    Err(_) if self.stopping.is_cancelled() && self.cluster.is_some() => {
                        deadline = tokio::time::Instant::now() + self.reconnect_wait;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !checked_token {
                if !self.tokens.agent_known(agent) {
                    return Err(ForwardError::UnknownAgent {
                        agent: agent.into(),
                    });
                }
                checked_token = true;
            }
            let nowhere = match &self.cluster {
                Some(cluster) => 'remote: {
                    let peers = match cluster.peers_for(agent).await {
                        Ok(peers) => peers,
                        Err(e @ ForwardError::NotConnected { .. }) => break 'remote e,
                        Err(e) => return Err(e),
                    };
                    if let ([peer], true) = (peers.as_slice(), body.is_end_stream()) {
                        // On its way to the peer, which takes a tunnel there at once: labelled
                        // so from now, in case the caller goes before the answer.
                        served.set(REPLICA);
                        match cluster
                            .forward_direct(peer, agent, &head, tunnel_wait)
                            .await
                        {
                            // The agent left that replica: wait for it to be listed
                            // elsewhere.
                            DirectForward::Done(Err(e @ ForwardError::NotConnected { .. })) => {
                                served.set(NO_AGENT);
                                break 'remote e;
                            }
                            // The replica is unreachable (nothing was sent; it is marked
                            // down): its agents are moving, so the same.
                            DirectForward::NotSent => {
                                served.set(NO_AGENT);
                                break 'remote ForwardError::NotConnected {
                                    agent: agent.into(),
                                };
                            }
                            // The peer refused this replica's call: no agent got it.
                            DirectForward::Done(
                                refused @ Err(ForwardError::ClusterUnavailable { .. }),
                            ) => {
                                served.set(NO_AGENT);
                                return refused;
                            }
                            DirectForward::Done(answered) => return answered,
                            DirectForward::Unsupported => served.set(NO_AGENT),
                        }
                    }
                    match cluster.reserve_remote(&peers, tunnel_wait, agent).await {
                        Ok(reserved) => {
                            served.set(REPLICA);
                            return cluster.forward_reserved(reserved, agent, head, body).await;
                        }
                        // Every replica listed for it says it left, or is gone: it is
                        // moving to another one, so wait for it as for an agent connected
                        // nowhere.
                        Err(e @ ForwardError::NotConnected { .. }) => e,
                        Err(e) => return Err(e),
                    }
                }
                None => ForwardError::NotConnected {
                    agent: agent.into(),
                },
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(nowhere);
            }
            tokio::time::sleep(RECONNECT_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The router in-process: a real `Gateway`, a token store on disk, and tunnels whose agent
    //! side is scripted (`tunnel::scripted_agent`).
    use std::sync::Arc;

    use crate::tunnel::scripted_agent::{self, within_limit};
    use crate::Gateway;
    use agentgate_proto::v1::{
        agent_message, gateway_message, AgentMessage, RequestKind, ResponseHead,
    };
    use http_body_util::BodyExt;

    use super::*;
    use crate::config::GatewayConfig;
    use crate::tokens::{create_token, TokenKind};

    fn gateway(dir: &std::path::Path) -> Arc<Gateway> {
        let tokens = dir.join("tokens.json");
        create_token(&tokens, TokenKind::Agent, "known", &[]).unwrap();
        let config = GatewayConfig {
            tokens,
            tunnel_wait: Duration::from_millis(50),
            agent_reconnect_wait: Duration::from_millis(200),
            ..GatewayConfig::default()
        };
        Gateway::new(config).unwrap()
    }

    fn head() -> RequestHead {
        RequestHead {
            kind: RequestKind::Http as i32,
            upstream: "default".into(),
            method: "GET".into(),
            path_and_query: "/x".into(),
            ..Default::default()
        }
    }

    /// A bodiless request to `agent` that the router must refuse; its error.
    async fn refused(gw: &Gateway, agent: &str) -> ForwardError {
        let empty = http_body_util::Empty::<Bytes>::new();
        gw.router
            .forward(agent, head(), empty, &ServedOver::default())
            .await
            .err()
            .unwrap()
    }

    #[tokio::test]
    async fn an_agent_no_token_names_is_unknown_and_a_known_one_not_connected() {
        within_limit(async {
            let dir = tempfile::tempdir().unwrap();
            let gw = gateway(dir.path());
            assert_eq!(refused(&gw, "nobody").await.outcome(), "unknown_agent");
            let e = refused(&gw, "known").await;
            assert_eq!(e.outcome(), "not_connected");
            assert_eq!(e.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_waits_for_an_agent_that_connects_within_the_reconnect_wait() {
        within_limit(async {
            let dir = tempfile::tempdir().unwrap();
            let gw = gateway(dir.path());
            let (t, mut agent) = scripted_agent::tunnel("known");
            let answer_msg = AgentMessage {
                msg: Some(agent_message::Msg::ResponseHead(ResponseHead {
                    status: 200,
                    end_of_response: true,
                    ..Default::default()
                })),
            };
            // The agent comes back 120 ms after the request arrived (the wait is 200 ms).
            let late = {
                let gw = gw.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(120)).await;
                    gw.tunnels.parking.park("known", t);
                    let _head = agent.recv().await.unwrap();
                    agent.send(answer_msg).await;
                    agent
                })
            };
            let started = std::time::Instant::now();
            let resp = gw
                .router
                .forward(
                    "known",
                    head(),
                    http_body_util::Empty::<Bytes>::new(),
                    &ServedOver::default(),
                )
                .await
                .expect("served once the agent is back");
            assert_eq!(resp.status, 200);
            assert!(started.elapsed() >= Duration::from_millis(100));
            let _keep = late.await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn a_local_tunnel_serves_a_whole_answer_in_one_message_and_is_parked_again() {
        within_limit(async {
            let dir = tempfile::tempdir().unwrap();
            let gw = gateway(dir.path());
            let answer_msg = AgentMessage {
                msg: Some(agent_message::Msg::ResponseHead(ResponseHead {
                    status: 201,
                    body: Bytes::from_static(b"whole"),
                    end_of_response: true,
                    ..Default::default()
                })),
            };
            let (t, mut agent) = scripted_agent::tunnel("known");
            gw.tunnels.parking.park("known", t);
            // The agent: reads the request head, answers it whole in one message.
            let agent = tokio::spawn(async move {
                let head = agent.recv().await.unwrap();
                agent.send(answer_msg).await;
                (head, agent)
            });
            let empty = http_body_util::Empty::<Bytes>::new();
            let resp = gw
                .router
                .forward("known", head(), empty, &ServedOver::default())
                .await
                .unwrap();
            assert_eq!(resp.status, 201);
            let body = resp.body.collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"whole");
            // One message went to the agent: the head, saying that no body follows.
            let (sent, mut agent) = agent.await.unwrap();
            match sent.msg {
                Some(gateway_message::Msg::RequestHead(h)) => {
                    assert_eq!((h.protocol_version, h.end_of_request), (2, true));
                }
                other => panic!("expected the request head, got {other:?}"),
            }
            assert!(!agent.has_message(), "no EndOfRequest in version 2");
            assert_eq!(gw.parked_tunnels("known"), 1, "the tunnel is parked again");
        })
        .await;
    }

    #[tokio::test]
    async fn a_tunnel_that_closes_before_answering_is_retried_for_a_get_and_then_gives_up() {
        within_limit(async {
            let dir = tempfile::tempdir().unwrap();
            let gw = gateway(dir.path());
            // Three tunnels whose agent reads the request and then ends its side without a word.
            let mut agents = vec![];
            for _ in 0..3 {
                let (t, mut agent) = scripted_agent::tunnel("known");
                gw.tunnels.parking.park("known", t);
                agents.push(tokio::spawn(async move { agent.recv().await.is_some() }));
            }
            assert_eq!(refused(&gw, "known").await.outcome(), "tunnel_broken");
            for a in agents {
                assert!(
                    a.await.unwrap(),
                    "each of the three tunnels got the request"
                );
            }
        })
        .await;
    }
}
