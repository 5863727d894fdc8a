//! `agentgate bench-backend`: the gateway-side gRPC backend of `bench backends`, a stand-in
//! for a runner's job router written straight on hyper, so that what it costs per call is
//! small and the same whether a call comes straight from h2load or through the gateway.
//!
//! - `/bench.jobs.v1.Jobs/Get`: unary; answers the request's message back.
//! - `/bench.jobs.v1.Jobs/Wait`: a long poll that never finds a job; it stays open until the
//!   caller cancels it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The prefix `bench backends` routes to this backend.
pub const SERVICE_PREFIX: &str = "bench.jobs.v1.";
pub const GET: &str = "/bench.jobs.v1.Jobs/Get";
pub const WAIT: &str = "/bench.jobs.v1.Jobs/Wait";

#[derive(clap::Args)]
pub struct JobBackendArgs {
    #[arg(long)]
    pub listen: SocketAddr,
}

type Answer = UnsyncBoxBody<Bytes, Infallible>;

pub async fn run(a: JobBackendArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        agentgate_transport::set_nodelay(&tcp);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(answer);
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                // The gateway opens more connections past its max_calls_per_connection (100);
                // h2load sends at most a few streams per connection.
                .max_concurrent_streams(1000)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn status_trailers(code: u8) -> Frame<Bytes> {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from(u16::from(code)));
    Frame::trailers(t)
}

async fn answer(req: http::Request<Incoming>) -> Result<http::Response<Answer>, Infallible> {
    let grpc = |body: Answer| {
        http::Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .expect("static response parts")
    };
    Ok(match req.uri().path() {
        GET => {
            // The request is one gRPC frame; the answer is the same frame.
            let message = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let frames = stream::iter([Ok(Frame::data(message)), Ok(status_trailers(0))]);
            grpc(StreamBody::new(frames).boxed_unsync())
        }
        WAIT => grpc(StreamBody::new(stream::pending()).boxed_unsync()),
        _ => grpc(StreamBody::new(stream::iter([Ok(status_trailers(12))])).boxed_unsync()),
    })
}
