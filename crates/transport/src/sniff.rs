//! Telling h2c from HTTP/1.1 on a cleartext connection by its first bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Bytes as spaced hex (`16 03 01 02`), for naming what an unexpected client sent.
pub(crate) fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a cleartext connection say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixClass {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// The full HTTP/2 preface: h2c with prior knowledge.
    Http2,
    /// Starts like an HTTP/1.x request line (`TOKEN SP`): should be a WebSocket upgrade.
    Http1,
    /// Neither: garbage, TLS sent to a cleartext port, and so on.
    Garbage,
}

/// Classifies the bytes read so far. Decides as early as possible, so that an HTTP/1.1
/// request shorter than 24 bytes is not kept waiting for bytes that never come.
pub fn classify_prefix(buf: &[u8]) -> PrefixClass {
    let n = buf.len().min(HTTP2_PREFACE.len());
    if buf[..n] == HTTP2_PREFACE[..n] {
        return if n == HTTP2_PREFACE.len() {
            PrefixClass::Http2
        } else {
            PrefixClass::NeedMore
        };
    }
    // An HTTP/1.x request line starts with a method token of upper-case letters then a space.
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'A'..=b'Z' if i < 16 => continue,
            b' ' if i > 0 => return PrefixClass::Http1,
            _ => return PrefixClass::Garbage,
        }
    }
    if buf.len() >= 16 {
        PrefixClass::Garbage
    } else {
        PrefixClass::NeedMore
    }
}

/// Reads from `io` until [`classify_prefix`] decides. Returns the class and the bytes read,
/// which the caller must replay (see [`PrefixedIo`]). The caller applies the deadline.
pub async fn read_prefix<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(PrefixClass, Bytes)> {
    let mut buf = Vec::with_capacity(HTTP2_PREFACE.len());
    let mut chunk = [0u8; 24];
    loop {
        let want = HTTP2_PREFACE.len() - buf.len().min(HTTP2_PREFACE.len());
        let n = io.read(&mut chunk[..want.max(1)]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {} bytes, before a request",
                    buf.len()
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        match classify_prefix(&buf) {
            PrefixClass::NeedMore => continue,
            class => return Ok((class, Bytes::from(buf))),
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`. Writes go straight through.
pub struct PrefixedIo<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> PrefixedIo<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::delegate_async_write!(PrefixedIo, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify_prefix(HTTP2_PREFACE), PrefixClass::Http2);
        assert_eq!(classify_prefix(&HTTP2_PREFACE[..10]), PrefixClass::NeedMore);
        assert_eq!(classify_prefix(b"GET / HTTP/1.1\r\n"), PrefixClass::Http1);
        assert_eq!(classify_prefix(b"GE"), PrefixClass::NeedMore);
        // "PRI " diverges from the preface only at byte 4: it is an HTTP/1 method token.
        assert_eq!(classify_prefix(b"PRI / HTTP/1.1"), PrefixClass::Http1);
        assert_eq!(
            classify_prefix(b"\x16\x03\x01\x02\x00"),
            PrefixClass::Garbage
        );
        assert_eq!(classify_prefix(b"get / HTTP/1.1"), PrefixClass::Garbage);
        assert_eq!(
            classify_prefix(b"AAAAAAAAAAAAAAAAAAAAAAAA"),
            PrefixClass::Garbage
        );
    }

    #[tokio::test]
    async fn replays_the_prefix() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"GET /x HTTP/1.1\r\nHost: y\r\n\r\n")
            .await
            .unwrap();
        drop(a);
        let (class, prefix) = read_prefix(&mut b).await.unwrap();
        assert_eq!(class, PrefixClass::Http1);
        let mut replay = PrefixedIo::new(prefix, b);
        let mut all = String::new();
        replay.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET /x HTTP/1.1\r\nHost: y\r\n\r\n");
    }

    #[tokio::test]
    async fn early_eof_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"PRI * HT").await.unwrap();
        drop(a);
        assert!(read_prefix(&mut b).await.is_err());
    }
}
