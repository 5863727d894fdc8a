//! A relayed gRPC answer that breaks off ends with a status, not a reset.
//!
//! A proxy hop (the tunnel API, the agent's local listener) passes a gRPC answer's bytes on as
//! they come. When its own source breaks mid-answer (the agent's connection is cut, the
//! upstream dies), the server under it resets the caller's stream with INTERNAL_ERROR, which
//! gRPC clients report as INTERNAL, "RST_STREAM with error code 2", and do not retry. Where the
//! break falls between two messages, the answer can still end properly: trailers with the
//! status the hop chooses (UNAVAILABLE and a sentence, which clients may retry). Inside a
//! message nothing can mend it (a client would read the trailers as a truncated message), so
//! the break stays a reset there.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// Where a stream of gRPC messages stands: how much of the current message's 5-byte prefix
/// and body has passed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MessageBoundary {
    /// Prefix bytes seen of the message under way (0 to 5).
    prefix_seen: usize,
    /// The length field as far as it has been seen.
    length: u32,
    /// Body bytes of the message under way still to pass.
    body_left: u64,
}

impl MessageBoundary {
    /// Takes the next bytes of the stream into account.
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = (data.len() as u64).min(self.body_left);
                self.body_left -= n;
                data = &data[n as usize..];
                continue;
            }
            // Byte 0 is the compression flag; bytes 1-4 the big-endian length.
            if self.prefix_seen > 0 {
                self.length = (self.length << 8) | u32::from(data[0]);
            }
            self.prefix_seen += 1;
            data = &data[1..];
            if self.prefix_seen == 5 {
                self.body_left = u64::from(self.length);
                self.prefix_seen = 0;
                self.length = 0;
            }
        }
    }

    /// Whether the stream stands between two messages.
    pub fn between_messages(&self) -> bool {
        self.prefix_seen == 0 && self.body_left == 0
    }
}

/// Trailers carrying `status`, as gRPC servers end a call.
pub fn status_trailers(status: &tonic::Status) -> HeaderMap {
    let mut map = HeaderMap::new();
    let _ = status.add_header(&mut map);
    map
}

/// A gRPC answer's body that ends with `on_break`'s status when it breaks between messages.
pub struct StatusOnBreak<B, F> {
    inner: B,
    on_break: Option<F>,
    boundary: MessageBoundary,
    ended: bool,
}

impl<B, F> StatusOnBreak<B, F>
where
    F: FnOnce(&(dyn std::error::Error + 'static)) -> tonic::Status,
{
    /// `on_break` words the status from the source's error.
    pub fn new(inner: B, on_break: F) -> Self {
        Self {
            inner,
            on_break: Some(on_break),
            boundary: MessageBoundary::default(),
            ended: false,
        }
    }
}

/// The error of a relayed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B, F> Body for StatusOnBreak<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FnOnce(&(dyn std::error::Error + 'static)) -> tonic::Status + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.boundary.advance(d.chunk());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                match this.on_break.take() {
                    Some(word) if this.boundary.between_messages() => {
                        this.ended = true;
                        let status = word(&*e);
                        Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))))
                    }
                    _ => Poll::Ready(Some(Err(e))),
                }
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn boundaries_are_found_however_the_bytes_are_cut() {
        let mut stream = message(3);
        stream.extend(message(0));
        stream.extend(message(300));
        // The boundaries: after each whole message.
        let ends = [8, 13, stream.len()];
        for cut in 1..stream.len() {
            let mut b = MessageBoundary::default();
            b.advance(&stream[..cut]);
            assert_eq!(b.between_messages(), ends.contains(&cut), "cut at {cut}");
            b.advance(&stream[cut..]);
            assert!(b.between_messages());
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("connection reset")]
    struct Broke;

    /// A body of `chunks`, then an error.
    fn breaking(chunks: Vec<Vec<u8>>) -> impl Body<Data = Bytes, Error = Broke> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, Broke>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from(c))))
            .chain([Err(Broke)])
            .collect();
        http_body_util::StreamBody::new(tokio_stream::iter(frames))
    }

    fn unavailable(e: &(dyn std::error::Error + 'static)) -> tonic::Status {
        tonic::Status::unavailable(format!("broke off: {e}"))
    }

    #[tokio::test]
    async fn a_break_between_messages_ends_with_the_status_and_inside_one_stays_an_error() {
        let whole = StatusOnBreak::new(breaking(vec![message(4), message(2)]), unavailable);
        let got = whole.collect().await.expect("ended with a status");
        let trailers = got.trailers().expect("trailers").clone();
        assert_eq!(trailers["grpc-status"], "14");
        assert_eq!(
            trailers["grpc-message"],
            "broke%20off:%20connection%20reset"
        );
        assert_eq!(got.to_bytes().len(), 9 + 7);

        let mut cut = message(10);
        cut.truncate(8);
        let partial = StatusOnBreak::new(breaking(vec![message(1), cut]), unavailable);
        assert!(
            partial.collect().await.is_err(),
            "a truncated message must not look whole"
        );
    }
}
