//! For in-process tests: the agent's side of one tunnel stream, scripted by the test. What the
//! gateway sends arrives as messages; what the test answers goes into the gateway's
//! `Streaming` as gRPC-framed bytes, decoded as on a real connection, and a reset is an error
//! on that byte stream, as h2 reports one.

use std::sync::Arc;

use agentgate_proto::v1::{AgentMessage, Descriptor, GatewayMessage};
use agentgate_transport::{ConnMeta, TransportKind};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tonic::codec::Codec;

use super::{ParkedTunnel, ToAgentStream};

type Wire = Result<Frame<Bytes>, std::io::Error>;

pub struct ScriptedAgent {
    from_gateway: ToAgentStream,
    to_gateway: mpsc::Sender<Wire>,
}

impl ScriptedAgent {
    /// The gateway's next message; `None` once the gateway ended its side of the stream.
    pub async fn recv(&mut self) -> Option<GatewayMessage> {
        self.from_gateway
            .next()
            .await
            .map(|m| m.expect("a message"))
    }

    /// Whether a message is waiting (without waiting for one; the stream's end is none).
    pub fn has_message(&mut self) -> bool {
        matches!(
            futures_util::FutureExt::now_or_never(self.from_gateway.next()),
            Some(Some(_))
        )
    }

    /// Sends one message, framed as gRPC frames it.
    pub async fn send(&self, m: AgentMessage) {
        let bytes = m.encode_to_vec();
        let mut wire = vec![0u8];
        wire.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        wire.extend_from_slice(&bytes);
        let _ = self
            .to_gateway
            .send(Ok(Frame::data(Bytes::from(wire))))
            .await;
    }

    /// Resets the stream: the gateway's next read fails.
    pub async fn reset(&self) {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "stream reset");
        let _ = self.to_gateway.send(Err(reset)).await;
    }
}

/// Runs a test's body, failing the test instead of hanging it if the body has not finished
/// within 10 s (a scripted agent that waits for what never comes waits forever).
pub async fn within_limit<T>(body: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), body)
        .await
        .expect("the test's exchange did not finish within 10 s")
}

/// A version-2 tunnel of `agent` with the `default` HTTP upstream, ready to park, and its
/// scripted agent.
pub fn tunnel(agent: &str) -> (ParkedTunnel, ScriptedAgent) {
    let (to_gateway, from_agent) = mpsc::channel::<Wire>(8);
    let body =
        http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(from_agent));
    let decoder =
        agentgate_proto::codec::SmallBufferCodec::<GatewayMessage, AgentMessage>::default()
            .decoder();
    let rx = tonic::Streaming::new_request(decoder, body, None, None);
    let (tx, from_gateway) = super::to_agent_channel();
    let conn = Arc::new(ConnMeta::new(
        7,
        TransportKind::Grpc,
        "127.0.0.1:1".parse().unwrap(),
        Arc::default(),
    ));
    let descriptor = Descriptor {
        http_upstreams: vec!["default".into()],
        protocol_version: 2,
        ..Default::default()
    };
    let parked = ParkedTunnel {
        tx,
        rx,
        descriptor,
        conn,
        agent: Arc::from(agent),
    };
    (
        parked,
        ScriptedAgent {
            from_gateway,
            to_gateway,
        },
    )
}
