//! The `control` of the benchmarks: the same reverse tunnel built from bare tonic and hyper,
//! with none of agentgate's layers.
//!
//! It answers "what does a reverse tunnel over tonic cost at the least?", so that the bench can
//! say how much of agentgate's cost is its own (authentication, the tunnel registry and its
//! heartbeats, metrics, logs, the one-port sniffing, connection limits, the agent's pool
//! policy) and how much is the floor of the building blocks. It speaks the same
//! `Tunnel.Connect` messages over one cleartext HTTP/2 connection (`tonic::transport::Server`
//! and `Channel` with their defaults), and its HTTP front and upstream client are plain hyper.
//! What it leaves out: authentication, TLS, heartbeats, error reporting, retries, limits.
//! Two processes, like the real thing: `bench-control gateway` and `bench-control agent`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use agentgate_proto::headers::{from_proto, to_proto};
use agentgate_proto::pump::{pump_body, PumpEnd};
use agentgate_proto::v1::tunnel_client::TunnelClient;
use agentgate_proto::v1::tunnel_server::{Tunnel, TunnelServer};
use agentgate_proto::v1::{
    agent_message, gateway_message, AgentMessage, Descriptor, GatewayMessage, Header, RequestHead,
    RequestKind, ResponseHead,
};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Largest body piece per `Chunk` message, as in the agent.
const CHUNK: usize = 64 * 1024;
/// Idle tunnel streams the control agent keeps open, as the agent's default pool.
const PARKED: usize = 2;

#[derive(clap::Args)]
pub struct ControlArgs {
    #[command(subcommand)]
    role: Role,
}

#[derive(clap::Subcommand)]
enum Role {
    /// The gateway side: a tonic server for tunnels and an HTTP/1.1 front.
    Gateway {
        #[arg(long)]
        agent_listen: SocketAddr,
        #[arg(long)]
        api_listen: SocketAddr,
    },
    /// The agent side: a tonic channel to the gateway and a hyper client to the upstream.
    Agent {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// A bare tonic server with only `grpc.health.v1.Health`, the reference of `bench unary`.
    Health {
        #[arg(long)]
        listen: SocketAddr,
    },
}

pub async fn run(a: ControlArgs) -> anyhow::Result<()> {
    match a.role {
        Role::Gateway {
            agent_listen,
            api_listen,
        } => gateway(agent_listen, api_listen).await,
        Role::Agent { server, upstream } => agent(server, upstream).await,
        Role::Health { listen } => {
            let (_, health) = tonic_health::server::health_reporter();
            tonic::transport::Server::builder()
                .add_service(health)
                .serve(listen)
                .await?;
            Ok(())
        }
    }
}

/// One parked stream at the control gateway.
struct Parked {
    tx: mpsc::Sender<Result<GatewayMessage, Status>>,
    rx: Streaming<AgentMessage>,
}

#[derive(Default)]
struct Parking {
    idle: Mutex<VecDeque<Parked>>,
    parked: Notify,
}

impl Parking {
    async fn take(&self) -> Parked {
        loop {
            let notified = self.parked.notified();
            if let Some(p) = self.idle.lock().unwrap().pop_front() {
                return p;
            }
            notified.await;
        }
    }
}

struct ControlTunnel(Arc<Parking>);

#[tonic::async_trait]
impl Tunnel for ControlTunnel {
    type ConnectStream = ReceiverStream<Result<GatewayMessage, Status>>;

    async fn connect(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut rx = req.into_inner();
        rx.message().await?; // the descriptor
        let (tx, out) = mpsc::channel(4);
        self.0.idle.lock().unwrap().push_back(Parked { tx, rx });
        self.0.parked.notify_one();
        Ok(Response::new(ReceiverStream::new(out)))
    }
}

/// The headers that cross the tunnel: all but the hop-by-hop ones and Host.
fn end_to_end(mut h: http::HeaderMap) -> Vec<Header> {
    for hop in [
        http::header::CONNECTION,
        http::header::HOST,
        http::header::TRANSFER_ENCODING,
    ] {
        h.remove(hop);
    }
    to_proto(&h)
}

type FrontBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Status>;

async fn gateway(agent_listen: SocketAddr, api_listen: SocketAddr) -> anyhow::Result<()> {
    let parking = Arc::new(Parking::default());
    let tunnels = tonic::transport::Server::builder()
        .add_service(TunnelServer::new(ControlTunnel(parking.clone())))
        .serve(agent_listen);
    let front = tokio::net::TcpListener::bind(api_listen).await?;
    let api = async move {
        loop {
            let (tcp, _) = front.accept().await?;
            tcp.set_nodelay(true)?;
            let parking = parking.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let parking = parking.clone();
                    async move { Ok::<_, Infallible>(forward(&parking, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        r = tunnels => r?,
        r = api => r?,
    }
    Ok(())
}

/// Sends one request down a parked stream and streams the answer back.
async fn forward(
    parking: &Parking,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<FrontBody> {
    let Parked { tx, mut rx } = parking.take().await;
    let (parts, body) = req.into_parts();
    let head = RequestHead {
        kind: RequestKind::Http as i32,
        upstream: "default".into(),
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.to_string()),
        headers: end_to_end(parts.headers),
        timeout_millis: 0,
        ..Default::default()
    };
    let msg = |m| Ok(GatewayMessage { msg: Some(m) });
    let _ = tx.send(msg(gateway_message::Msg::RequestHead(head))).await;
    // Our side of the stream stays open until the response body is done (its end is what
    // drops `done`): the agent reads an early end as a cancel.
    let (done, response_done) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let end = pump_body(body, None, CHUNK, OkSink(&tx), |_| {}).await;
        if end == PumpEnd::Complete {
            let _ = response_done.await;
        }
    });
    let mut status = 502;
    let mut headers = http::HeaderMap::new();
    while let Ok(Some(m)) = rx.message().await {
        if let Some(agent_message::Msg::ResponseHead(h)) = m.msg {
            status = h.status as u16;
            headers = from_proto(&h.headers, |_| {});
            break;
        }
    }
    let frames = futures_util::stream::unfold((rx, done), |(mut rx, done)| async move {
        match rx.message().await {
            Ok(Some(AgentMessage {
                msg: Some(agent_message::Msg::Chunk(c)),
            })) => Some((Ok(Frame::data(c.data)), (rx, done))),
            Ok(_) => None,
            Err(e) => Some((Err(e), (rx, done))),
        }
    });
    let mut resp = http::Response::new(StreamBody::new(frames).boxed_unsync());
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    *resp.headers_mut() = headers;
    resp
}

type UpstreamBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

async fn agent(server: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))?
        .connect()
        .await?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<_, UpstreamBody> = Client::builder(TokioExecutor::new()).build(http);
    // Each stream that gets a request asks for a replacement through `busy`.
    let (busy_tx, mut busy_rx) = mpsc::unbounded_channel::<()>();
    for _ in 0..PARKED {
        busy_tx.send(())?;
    }
    while busy_rx.recv().await.is_some() {
        tokio::spawn(serve_one(
            TunnelClient::new(channel.clone()),
            client.clone(),
            upstream,
            busy_tx.clone(),
        ));
    }
    Ok(())
}

/// One tunnel stream: park, take one request, run it against the upstream, answer.
async fn serve_one(
    mut tunnels: TunnelClient<tonic::transport::Channel>,
    client: Client<HttpConnector, UpstreamBody>,
    upstream: SocketAddr,
    busy: mpsc::UnboundedSender<()>,
) {
    let (tx, rx) = mpsc::channel(8);
    let descriptor = Descriptor {
        instance_id: "control".into(),
        http_upstreams: vec!["default".into()],
        grpc_upstream: false,
        ..Default::default()
    };
    let msg = |m| AgentMessage { msg: Some(m) };
    let _ = tx.try_send(msg(agent_message::Msg::Descriptor(descriptor)));
    let Ok(resp) = tunnels.connect(ReceiverStream::new(rx)).await else {
        // The gateway is gone or refusing: retry, but not in a tight loop.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let _ = busy.send(());
        return;
    };
    let mut inbound = resp.into_inner();
    let head = loop {
        match inbound.message().await {
            Ok(Some(GatewayMessage {
                msg: Some(gateway_message::Msg::RequestHead(h)),
            })) => break h,
            Ok(Some(_)) => continue,
            _ => {
                let _ = busy.send(());
                return;
            }
        }
    };
    let _ = busy.send(());
    let (body_tx, body_rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            match m.msg {
                Some(gateway_message::Msg::Chunk(c)) => {
                    let _ = body_tx.send(Ok(Frame::data(c.data))).await;
                }
                Some(gateway_message::Msg::EndOfRequest(_)) => break,
                _ => {}
            }
        }
        drop(body_tx);
        // Drain to the end of the gateway's side.
        while let Ok(Some(_)) = inbound.message().await {}
    });
    let mut req = http::Request::new(StreamBody::new(ReceiverStream::new(body_rx)));
    *req.method_mut() = http::Method::from_bytes(head.method.as_bytes()).unwrap_or_default();
    *req.uri_mut() = match format!("http://{upstream}{}", head.path_and_query).parse() {
        Ok(u) => u,
        Err(_) => return,
    };
    *req.headers_mut() = from_proto(&head.headers, |_| {});
    let Ok(resp) = client.request(req).await else {
        return;
    };
    let (parts, body) = resp.into_parts();
    let head = ResponseHead {
        status: parts.status.as_u16() as u32,
        headers: end_to_end(parts.headers),
        ..Default::default()
    };
    if tx
        .send(msg(agent_message::Msg::ResponseHead(head)))
        .await
        .is_err()
    {
        return;
    }
    let _ = pump_body(body, None, CHUNK, &tx, |_| {}).await;
}

/// The control gateway's response stream carries `Result`s (tonic's item type).
struct OkSink<'a>(&'a mpsc::Sender<Result<GatewayMessage, Status>>);

impl agentgate_proto::pump::MessageSink<GatewayMessage> for OkSink<'_> {
    fn send(&mut self, m: GatewayMessage) -> impl std::future::Future<Output = bool> + Send {
        let tx = self.0;
        async move { tx.send(Ok(m)).await.is_ok() }
    }
}
