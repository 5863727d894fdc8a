//! The agent's own health and metrics endpoint (`--metrics-listen`): `/healthz` (the process
//! runs), `/readyz` (registered with the gateway right now), `/metrics` (Prometheus text).
//! What a Kubernetes probe or a scrape of a fleet of agents needs, and no more.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use agentgate_proto::exposition::{self, Kind, Scrape};
use agentgate_transport::TransportKind;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the connection manager reports as it goes.
#[derive(Default)]
pub struct AgentStatus {
    /// 1 + the index in `TransportKind::ALL` of the current connection's transport; 0: none.
    current: AtomicUsize,
    connects: AtomicU64,
    disconnects: AtomicU64,
}

impl AgentStatus {
    pub fn connected(&self, transport: TransportKind) {
        let i = TransportKind::ALL
            .iter()
            .position(|t| *t == transport)
            .map_or(0, |i| i + 1);
        self.current.store(i, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn disconnected(&self) {
        self.current.store(0, Ordering::Relaxed);
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }

    fn transport(&self) -> Option<TransportKind> {
        let i = self.current.load(Ordering::Relaxed);
        (i > 0).then(|| TransportKind::ALL[i - 1])
    }

    fn render(&self) -> String {
        let mut scrape = Scrape::default();
        let now = self.transport();
        let connected = scrape.family(
            "agentgate_agent_connected",
            "Whether the agent is registered with the gateway now, by transport.",
            Kind::Gauge,
        );
        for t in TransportKind::ALL {
            let v = u8::from(now == Some(t));
            connected.number(vec![("transport", t.to_string())], v.into());
        }
        scrape
            .family(
                "agentgate_agent_connections_total",
                "Connections the agent registered.",
                Kind::Counter,
            )
            .number(vec![], self.connects.load(Ordering::Relaxed) as f64);
        scrape
            .family(
                "agentgate_agent_disconnects_total",
                "Times the agent was left with no registered connection.",
                Kind::Counter,
            )
            .number(vec![], self.disconnects.load(Ordering::Relaxed) as f64);
        agentgate_proto::build_info::add_metric(&mut scrape);
        scrape.render()
    }
}

/// Binds the endpoint; a failure stops the agent at start with a sentence.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for health and metrics on {addr}: {e}"))
}

/// Serves the endpoint until `stop`.
pub async fn serve(listener: TcpListener, status: Arc<AgentStatus>, stop: CancellationToken) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "health and metrics endpoint ready"),
        Err(_) => tracing::info!("health and metrics endpoint ready"),
    }
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let status = status.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let status = status.clone();
                    async move { Ok::<_, Infallible>(answer(req.uri().path(), &status)) }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn answer(path: &str, status: &AgentStatus) -> http::Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (code, content_type, body) = match path {
        "/healthz" => (200, TEXT, "ok\n".to_string()),
        "/readyz" => match status.transport() {
            Some(t) => (200, TEXT, format!("registered over {t}\n")),
            None => (503, TEXT, "not registered with the gateway\n".to_string()),
        },
        "/metrics" => (200, exposition::CONTENT_TYPE, status.render()),
        _ => (404, TEXT, "try /healthz, /readyz or /metrics\n".to_string()),
    };
    http::Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
