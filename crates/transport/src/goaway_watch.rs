//! Noticing the server's GOAWAY on an agent's own connection.
//!
//! An HTTP/2 client learns of a GOAWAY only when it next tries to open a stream. An agent whose
//! tunnel streams carry requests one after another (protocol version 2) opens none for as
//! long as its pool suffices, so a proxy's GOAWAY (nginx on reload or after
//! `keepalive_requests`, HAProxy on reload) would go unnoticed until the proxy's old process
//! gives up on the connection. This wrapper reads the frame headers the server sends (the same
//! scanner as the PING policy; payloads are never copied) and cancels a token on the first
//! GOAWAY, so the agent moves to a new connection at once (make before break).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::ping_policy::{FrameScanner, FRAME_GOAWAY};

/// A client's byte stream that cancels `goaway` when the server sends GOAWAY.
pub struct GoawayWatch<T> {
    inner: T,
    scanner: FrameScanner,
    goaway: CancellationToken,
}

impl<T> GoawayWatch<T> {
    pub fn new(inner: T, goaway: CancellationToken) -> Self {
        Self {
            inner,
            // The server's side of HTTP/2 starts with frames (its SETTINGS), no preface.
            scanner: FrameScanner::new(0),
            goaway,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GoawayWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let this = &mut *self;
            let _ = this.scanner.scan(&buf.filled()[before..], |kind, _| {
                if kind == FRAME_GOAWAY {
                    this.goaway.cancel();
                }
                Ok::<(), ()>(())
            });
        }
        r
    }
}

crate::delegate_async_write!(GoawayWatch, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        crate::raw_frames::frame(kind, 0, 0, payload)
    }

    #[tokio::test]
    async fn a_goaway_split_over_reads_cancels_the_token() {
        let mut wire = frame(0x4, &[]); // SETTINGS
        wire.extend(frame(0x0, b"data that mentions \x07 is not a frame header"));
        let goaway = frame(FRAME_GOAWAY, &[0; 8]);
        let (mut tx, rx) = tokio::io::duplex(64);
        let token = CancellationToken::new();
        let mut watch = GoawayWatch::new(rx, token.clone());
        use tokio::io::AsyncWriteExt;
        tx.write_all(&wire).await.unwrap();
        tx.write_all(&goaway[..4]).await.unwrap();
        let mut buf = vec![0u8; wire.len() + 4];
        watch.read_exact(&mut buf).await.unwrap();
        assert!(!token.is_cancelled(), "no GOAWAY yet");
        tx.write_all(&goaway[4..]).await.unwrap();
        let mut rest = vec![0u8; goaway.len() - 4];
        watch.read_exact(&mut rest).await.unwrap();
        assert!(token.is_cancelled());
    }
}
