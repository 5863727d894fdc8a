//! The future of the agent port's tower layers: the inner service's future, and what the
//! layer does to the response once it is there, without boxing either.
//!
//! Each layer used to return `Box::pin(async move { ... })`: one allocation and one free per
//! layer per call, three per call on the agent port's stack. Runners make unary calls by the
//! hundred thousand, and the bare tonic server they are measured against has none of these
//! (`bench unary`, docs/BENCHMARKS.md, thirteenth session).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

/// What a layer does to the inner service's response, once, when it is ready. A mapper that
/// is dropped unused (the inner service failed, or the call was dropped) does nothing more
/// than its own `Drop`.
pub trait ResponseMapper<B> {
    type Output;
    fn map(self, response: http::Response<B>) -> Self::Output;
}

pin_project! {
    /// `inner`, with `mapper` applied to its response.
    pub struct MapResponse<F, M> {
        #[pin]
        inner: F,
        mapper: Option<M>,
    }
}

impl<F, M> MapResponse<F, M> {
    pub fn new(inner: F, mapper: M) -> Self {
        Self {
            inner,
            mapper: Some(mapper),
        }
    }
}

impl<F, M, B, E> Future for MapResponse<F, M>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    M: ResponseMapper<B>,
{
    type Output = Result<M::Output, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let mapper = this
            .mapper
            .take()
            .expect("MapResponse polled after it completed");
        Poll::Ready(Ok(mapper.map(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct AddHeader(&'static str);

    impl ResponseMapper<()> for AddHeader {
        type Output = http::Response<()>;
        fn map(self, mut response: http::Response<()>) -> Self::Output {
            response
                .headers_mut()
                .insert("x-mapped", http::HeaderValue::from_static(self.0));
            response
        }
    }

    #[tokio::test]
    async fn the_mapper_sees_the_response_and_an_error_passes_unmapped() {
        let ok = async { Ok::<_, &str>(http::Response::new(())) };
        let mapped = MapResponse::new(ok, AddHeader("yes")).await.unwrap();
        assert_eq!(mapped.headers()["x-mapped"], "yes");

        let failed = async { Err::<http::Response<()>, _>("inner failed") };
        let err = MapResponse::new(failed, AddHeader("never"))
            .await
            .unwrap_err();
        assert_eq!(err, "inner failed");
    }
}
