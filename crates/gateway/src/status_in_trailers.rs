//! Every gRPC answer the gateway sends carries its status in a trailers frame, never as a
//! Trailers-Only answer (status in the headers, stream ended on them).
//!
//! Trailers-Only is allowed by the gRPC spec, but proxies that flush response headers at
//! once and end the stream with an empty DATA frame (Caddy 2.6 with `flush_interval -1`,
//! nghttpx, Jetty) turn it into headers followed by an end with no trailers: the client then
//! reads the status as plain headers and reports `UNKNOWN: Stream removed` instead of, say,
//! UNAUTHENTICATED with the gateway's sentence. Headers followed by trailers survive every
//! proxy, for the price of one more HEADERS frame on an error answer, as long as the headers do
//! not say `content-length: 0`: nginx then takes the answer as complete and drops the trailers.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::headers::GRPC_STATUS;
use crate::map_response::{MapResponse, ResponseMapper};

/// Headers of a Trailers-Only answer that describe the stream and stay in the headers; the
/// rest (the status and any trailing metadata) move to the trailers.
const STREAM_HEADERS: [&str; 4] = [
    "content-type",
    "grpc-encoding",
    "grpc-accept-encoding",
    "date",
];

/// `resp` with a Trailers-Only status moved into a trailers frame; anything else unchanged.
/// For the gateway's own methods (`own`), tonic's codec errors get a sentence
/// (`codec_error_text`).
pub fn move_status_to_trailers<B: Body>(
    resp: Response<B>,
    own: bool,
) -> Response<StatusTrailersBody<B>> {
    let (mut parts, body) = resp.into_parts();
    let trailers_only = body.is_end_stream()
        && parts.headers.contains_key(&GRPC_STATUS)
        && parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    if !trailers_only {
        return Response::from_parts(
            parts,
            StatusTrailersBody {
                inner: body,
                trailers: None,
                own,
            },
        );
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    // In a Trailers-Only answer every header is trailing metadata (the status and whatever the
    // server added, such as x-error-reason), except what describes the stream itself.
    let mut trailers = HeaderMap::new();
    let mut headers = HeaderMap::new();
    let mut last = None;
    for (name, value) in std::mem::take(&mut parts.headers) {
        let name = name.or(last.clone()).expect("the first header has a name");
        last = Some(name.clone());
        if STREAM_HEADERS.contains(&name.as_str()) {
            headers.append(name, value);
        } else {
            trailers.append(name, value);
        }
    }
    parts.headers = headers;
    if own {
        crate::codec_error_text::explain_in(&mut trailers);
    }
    Response::from_parts(
        parts,
        StatusTrailersBody {
            inner: body,
            trailers: Some(trailers),
            own,
        },
    )
}

pin_project! {
    /// The answer's own body, then (for a former Trailers-Only answer) its status as trailers.
    pub struct StatusTrailersBody<B> {
        #[pin]
        inner: B,
        trailers: Option<HeaderMap>,
        // The answer is from one of the gateway's own methods, not a backend.
        own: bool,
    }
}

impl<B: Body> Body for StatusTrailersBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t)))),
            Poll::Ready(Some(Ok(frame))) if *this.own && frame.is_trailers() => {
                let mut trailers = frame.into_trailers().unwrap_or_default();
                crate::codec_error_text::explain_in(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.trailers.is_some() {
            // Unknown, not "exactly 0": hyper would add `content-length: 0`, and nginx takes a
            // response of known length 0 as complete and drops the trailers after it.
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// The tower layer form, for the agent port's tonic server.
#[derive(Clone, Copy, Default)]
pub struct StatusInTrailersLayer;

impl<S> tower::Layer<S> for StatusInTrailersLayer {
    type Service = StatusInTrailers<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StatusInTrailers { inner }
    }
}

#[derive(Clone)]
pub struct StatusInTrailers<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for StatusInTrailers<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<StatusTrailersBody<ResBody>>;
    type Error = S::Error;
    type Future = MapResponse<S::Future, MoveStatusToTrailers>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let own = crate::rpc_guard::KNOWN_METHODS.contains(&req.uri().path());
        MapResponse::new(self.inner.call(req), MoveStatusToTrailers { own })
    }
}

/// [`move_status_to_trailers`] as the layer's response mapper.
pub struct MoveStatusToTrailers {
    own: bool,
}

impl<B: Body> ResponseMapper<B> for MoveStatusToTrailers {
    type Output = Response<StatusTrailersBody<B>>;
    fn map(self, response: Response<B>) -> Self::Output {
        move_status_to_trailers(response, self.own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};

    fn grpc_response<B>(body: B, status: Option<&str>) -> Response<B> {
        let mut r = Response::new(body);
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        if let Some(s) = status {
            r.headers_mut().insert("grpc-status", s.parse().unwrap());
            r.headers_mut()
                .insert("grpc-message", "agentgate: no".parse().unwrap());
            r.headers_mut()
                .insert("x-error-reason", "widget-missing".parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn a_trailers_only_answer_gets_headers_then_trailers() {
        let resp = move_status_to_trailers(grpc_response(Empty::<Bytes>::new(), Some("16")), true);
        assert!(!resp.headers().contains_key("grpc-status"));
        assert!(!resp.headers().contains_key("grpc-message"));
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert!(!resp.body().is_end_stream());
        assert_eq!(
            resp.body().size_hint().exact(),
            None,
            "no content-length: 0 for hyper to add"
        );
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "16");
        assert_eq!(trailers["grpc-message"], "agentgate: no");
        assert_eq!(
            trailers["x-error-reason"], "widget-missing",
            "trailing metadata moves too"
        );
    }

    #[tokio::test]
    async fn answers_with_a_body_and_plain_http_pass_unchanged() {
        let resp = move_status_to_trailers(grpc_response(Full::new(Bytes::from("x")), None), true);
        let collected = resp.into_body().collect().await.unwrap();
        assert!(collected.trailers().is_none());
        assert_eq!(collected.to_bytes(), "x");

        let mut plain = Response::new(Empty::<Bytes>::new());
        plain
            .headers_mut()
            .insert("grpc-status", "0".parse().unwrap());
        let plain = move_status_to_trailers(plain, true);
        assert!(
            plain.headers().contains_key("grpc-status"),
            "not gRPC: untouched"
        );
        assert!(plain.body().is_end_stream());
    }
}
