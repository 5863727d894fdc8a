//! A response body that keeps a guard alive until the body is done or dropped: how a call's
//! share of a limit (a token-less call slot, a request in flight) ends exactly when its
//! response does, streaming responses included.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame};

pin_project_lite::pin_project! {
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> GuardedBody<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self { inner, guard }
    }
}

/// An empty body with no guard, for answers made before the call reached its service.
impl<B: Default, G: Default> Default for GuardedBody<B, G> {
    fn default() -> Self {
        Self::new(B::default(), G::default())
    }
}

impl<B: Body, G> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
