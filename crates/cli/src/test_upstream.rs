//! A small HTTP/1.1 upstream used by `agentgate demo` and `agentgate bench`: `/` says hello,
//! `/bytes/N` streams N bytes, `/echo` streams the request body back, `/sink` counts it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let resp: hyper::Response<
                        http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>,
                    > = if let Some(n) = path.strip_prefix("/bytes/") {
                        let n: u64 = n.parse().unwrap_or(0);
                        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                        let frames = futures_util::stream::unfold(n, move |left| {
                            let chunk = chunk.clone();
                            async move {
                                (left > 0).then(|| {
                                    let take = left.min(chunk.len() as u64) as usize;
                                    (
                                        Ok(hyper::body::Frame::data(chunk.slice(..take))),
                                        left - take as u64,
                                    )
                                })
                            }
                        });
                        hyper::Response::new(StreamBody::new(frames).boxed_unsync())
                    } else if path == "/echo" {
                        hyper::Response::new(req.into_body().boxed_unsync())
                    } else if path == "/sink" {
                        let mut body = req.into_body();
                        let mut n = 0u64;
                        while let Some(Ok(f)) = body.frame().await {
                            n += f.data_ref().map_or(0, |d| d.len() as u64);
                        }
                        hyper::Response::new(
                            Full::new(Bytes::from(format!("{n}\n")))
                                .map_err(|never| match never {})
                                .boxed_unsync(),
                        )
                    } else {
                        hyper::Response::new(
                            Full::new(Bytes::from_static(
                                b"hello from the upstream behind the agent\n",
                            ))
                            .map_err(|never| match never {})
                            .boxed_unsync(),
                        )
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
