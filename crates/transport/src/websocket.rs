//! A WebSocket seen as a plain byte stream, the way kas wraps gRPC (`ws-tunnel`).
//!
//! Message boundaries mean nothing: the payload is one continuous byte stream carrying a whole
//! HTTP/2 connection. Binary messages only; a text message is a protocol error. Writes are
//! coalesced until flush, so one HTTP/2 write burst becomes one binary message.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The subprotocol kas uses, offered by the client and required by the server.
pub const WS_SUBPROTOCOL: &str = "ws-tunnel";

/// WebSocket buffer and limit settings.
///
/// tungstenite 0.25+ allocates (and zero-fills) a 128 KiB read buffer per connection by
/// default. Measured here: 168 KiB of server RSS per idle WebSocket connection with the default
/// against 41 KiB with an 8 KiB buffer, so the default is 8 KiB. Our tungstenite
/// (`third_party/tungstenite`) starts a server connection's buffer at 512 bytes and grows it to
/// this size only while the connection is busy.
#[derive(Debug, Clone, Copy)]
pub struct WsSettings {
    /// Most bytes tungstenite reads from the socket at a time.
    pub read_buffer_size: usize,
    /// Largest incoming message accepted (kas: 10 MiB).
    pub max_message_size: usize,
    /// Largest binary message we send; bigger write bursts are split.
    pub max_write_message_size: usize,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            read_buffer_size: 8 * 1024,
            max_message_size: 10 * 1024 * 1024,
            max_write_message_size: 64 * 1024,
        }
    }
}

impl WsSettings {
    /// The tungstenite configuration these settings mean. Writes go out as soon as they are
    /// flushed (`write_buffer_size` 0): coalescing happens in [`WsByteStream`] already.
    pub fn tungstenite_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(0)
            // tungstenite queues its pongs there too: a peer that pings and never reads would
            // grow it without end (measured: 1 GiB in 5 s). Past this, the write fails.
            .max_write_buffer_size(
                MAX_WRITE_BUFFER_MESSAGES * self.max_write_message_size.max(1024),
            )
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_message_size))
    }
}

/// Our largest messages tungstenite may hold unwritten (see `tungstenite_config`).
const MAX_WRITE_BUFFER_MESSAGES: usize = 16;

/// WebSocket PINGs a peer may send in one second. Each costs a pong; an agent needs none
/// (HTTP/2 inside has its own keepalive), a proxy's keepalive sends one every few seconds.
pub const MAX_WS_PINGS_PER_SECOND: u32 = 10;

/// Bytes a peer may send in WebSocket frames beyond what they carry for us, on the server
/// side: empty binary messages, unanswered PONGs, or a message fragmented into empty pieces
/// each cost a read and deliver nothing (a flood of them cost the gateway 15 to 31 times the
/// client's CPU). Allowed: [`WS_OVERHEAD_BASE`] (the upgrade request included), one whole
/// message of `max_message_size` (a message still arriving has delivered nothing yet), as much
/// again as the payload delivered (a frame's header is at most 14 bytes, and the smallest
/// HTTP/2 frame inside one is 9), and [`WS_OVERHEAD_PER_SECOND`] for keepalive PINGs and
/// PONGs.
pub const WS_OVERHEAD_BASE: u64 = 256 * 1024;
pub const WS_OVERHEAD_PER_SECOND: u64 = 4 * 1024;

/// Counts the bytes read from the socket under a server's WebSocket, for
/// [`WsByteStream::watching_overhead`].
pub struct RawBytesIn<S> {
    inner: S,
    count: Arc<AtomicU64>,
}

impl<S> RawBytesIn<S> {
    pub fn new(inner: S, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RawBytesIn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.count.fetch_add(n, Ordering::Relaxed);
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RawBytesIn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An `AsyncRead + AsyncWrite` over a WebSocket that carries binary messages.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    read_buf: Bytes,
    write_buf: BytesMut,
    max_write_message: usize,
    /// Set when the peer broke the protocol: we still owe it a close frame, then an error.
    violation: Option<(CloseCode, String)>,
    /// The current second's start and the PINGs received in it.
    pings: (Option<Instant>, u32),
    /// Server side: the bytes read under the WebSocket (see [`RawBytesIn`]) and since when,
    /// against [`WS_OVERHEAD_BASE`].
    raw_in: Option<(Arc<AtomicU64>, Instant)>,
    /// Payload bytes of the binary messages received.
    payload_in: u64,
    /// `max_message_size`: a message that large may be on its way, read but not delivered.
    max_message: u64,
}

impl<S> WsByteStream<S> {
    pub fn new(ws: WebSocketStream<S>, settings: &WsSettings) -> Self {
        Self {
            ws,
            read_buf: Bytes::new(),
            write_buf: BytesMut::new(),
            max_write_message: settings.max_write_message_size.max(1024),
            violation: None,
            pings: (None, 0),
            raw_in: None,
            payload_in: 0,
            max_message: settings.max_message_size as u64,
        }
    }

    /// Holds the peer to [`WS_OVERHEAD_BASE`]: `raw_in` counts what was read from the socket
    /// under the WebSocket (a [`RawBytesIn`]).
    pub fn watching_overhead(mut self, raw_in: Arc<AtomicU64>) -> Self {
        self.raw_in = Some((raw_in, Instant::now()));
        self
    }

    /// Whether the peer's frames carried more overhead than allowed.
    fn overhead_exceeded(&self) -> bool {
        let Some((raw, since)) = &self.raw_in else {
            return false;
        };
        let raw = raw.load(Ordering::Relaxed);
        let allowed = WS_OVERHEAD_BASE + self.max_message + 2 * self.payload_in;
        // The clock is read only past the rest of the allowance: this runs on every read.
        raw > allowed && raw > allowed + WS_OVERHEAD_PER_SECOND * since.elapsed().as_secs()
    }
}

/// A WebSocket protocol violation by the peer (a text message, an unmasked frame, reserved
/// bits, a message over the size limit): the read error carries it, so the connection's owner
/// can count and log it apart from a plain disconnect.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WsProtocolError(pub String);

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(e) => e,
        Error::ConnectionClosed | Error::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// Sends the buffered bytes as one binary message (without flushing the socket).
    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        let msg = Message::Binary(self.write_buf.split().freeze());
        Pin::new(&mut self.ws).start_send(msg).map_err(to_io)?;
        Poll::Ready(Ok(()))
    }

    /// Sends the close frame owed for a protocol violation, then reports the violation.
    fn poll_violation(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (code, reason) = self
            .violation
            .clone()
            .expect("called only with a violation");
        // A close reason is at most 123 bytes (RFC 6455, 5.5): cut at a char boundary.
        let mut short = reason.clone();
        while short.len() > 120 {
            short.pop();
        }
        let frame = CloseFrame {
            code,
            reason: short.into(),
        };
        // Best effort: if the socket is broken we still report the violation. The close may
        // not be ours to send: when the peer's own close frame was the violation, tungstenite
        // refuses a second one and has queued its reply (1002) itself; the flush sends that.
        match Pin::new(&mut self.ws).poll_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {
                let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)));
            }
            Poll::Ready(Err(_)) => {}
        }
        let _ = ready!(Pin::new(&mut self.ws).poll_flush(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            WsProtocolError(reason),
        )))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.violation.is_some() {
                return this.poll_violation(cx);
            }
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                if this.read_buf.is_empty() {
                    // Let go of the message at once: it shares tungstenite's read buffer, which
                    // can then be reused in place instead of allocated anew.
                    this.read_buf = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            let next = Pin::new(&mut this.ws).poll_next(cx);
            if this.overhead_exceeded() {
                this.violation = Some((
                    CloseCode::Policy,
                    "WebSocket frames that carry no data (empty messages or fragments, PONGs) \
                     far beyond what the data needs"
                        .into(),
                ));
                continue;
            }
            match ready!(next) {
                // tungstenite hands a close frame whose status code RFC 6455 does not allow
                // (999, 1005, 2000, ...) up as its own 1002 "Protocol violation", and queues that
                // as the reply; it was taken for a clean end, without a counter or a line.
                Some(Ok(Message::Close(Some(f))))
                    if f.code == CloseCode::Protocol && f.reason.as_str() == "Protocol violation" =>
                {
                    this.violation = Some((
                        CloseCode::Protocol,
                        "a close frame with a status code RFC 6455 does not allow (1000-1003, \
                         1007-1014 and 3000-4999 are)"
                            .into(),
                    ));
                }
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => {
                    this.payload_in += data.len() as u64;
                    this.read_buf = data;
                }
                Some(Ok(Message::Text(_))) => {
                    this.violation = Some((
                        CloseCode::Protocol,
                        "text message on ws-tunnel: only binary messages are allowed".into(),
                    ));
                }
                Some(Ok(Message::Ping(_))) => {
                    let now = Instant::now();
                    let (start, n) = &mut this.pings;
                    if start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
                        *start = Some(now);
                        *n = 0;
                    }
                    *n += 1;
                    if *n > MAX_WS_PINGS_PER_SECOND {
                        this.violation = Some((
                            CloseCode::Policy,
                            format!(
                                "WebSocket PING flood: more than {MAX_WS_PINGS_PER_SECOND} in \
                                 one second"
                            ),
                        ));
                    }
                }
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
                // The peer went away without a close frame (a killed agent, a proxy closing an
                // idle connection): an end, not a violation.
                Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(
                    tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ))) => return Poll::Ready(Ok(())),
                Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(e))) => {
                    this.violation = Some((
                        CloseCode::Protocol,
                        format!("WebSocket protocol error: {e}"),
                    ));
                }
                // A text message (or a close reason) that is not UTF-8: as for any text
                // message, a violation with a close frame, counted and logged; it used to drop
                // the connection without a word.
                Some(Err(tokio_tungstenite::tungstenite::Error::Utf8(_))) => {
                    this.violation = Some((
                        CloseCode::Invalid,
                        "a text message or close reason that is not UTF-8 on ws-tunnel: only \
                         binary messages are allowed"
                            .into(),
                    ));
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::WriteBufferFull(_))) => {
                    this.violation = Some((
                        CloseCode::Policy,
                        "the peer reads nothing while its messages (PINGs) keep asking for \
                         answers"
                            .into(),
                    ));
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                    this.violation =
                        Some((CloseCode::Size, format!("WebSocket message too big: {e}")));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_buf.len() >= this.max_write_message {
            ready!(this.poll_send_buffered(cx))?;
        }
        let mut written = 0;
        for b in bufs {
            let room = this.max_write_message - this.write_buf.len();
            if room == 0 {
                break;
            }
            let n = b.len().min(room);
            this.write_buf.extend_from_slice(&b[..n]);
            written += n;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_buffered(cx))?;
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_buffered(cx))?;
        Pin::new(&mut self.ws).poll_close(cx).map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WsByteStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let s = WsSettings::default();
        let client =
            WebSocketStream::from_raw_socket(a, Role::Client, Some(s.tungstenite_config())).await;
        let server =
            WebSocketStream::from_raw_socket(b, Role::Server, Some(s.tungstenite_config())).await;
        (client, WsByteStream::new(server, &s))
    }

    /// A server that watches its peer's frame overhead, and the client talking to it.
    async fn watched_pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WsByteStream<RawBytesIn<tokio::io::DuplexStream>>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        // Messages up to 64 KiB: the allowance holds one whole message that may be on its way.
        let s = WsSettings {
            max_message_size: 64 * 1024,
            ..WsSettings::default()
        };
        let client =
            WebSocketStream::from_raw_socket(a, Role::Client, Some(s.tungstenite_config())).await;
        let raw = Arc::new(AtomicU64::new(0));
        let server = WebSocketStream::from_raw_socket(
            RawBytesIn::new(b, raw.clone()),
            Role::Server,
            Some(s.tungstenite_config()),
        )
        .await;
        (client, WsByteStream::new(server, &s).watching_overhead(raw))
    }

    #[tokio::test]
    async fn frames_that_carry_nothing_end_the_connection_and_small_ones_do_not() {
        // The smallest HTTP/2 frames, one per message, as a chatty peer might send them.
        let (mut client, mut server) = watched_pair().await;
        let sender = tokio::spawn(async move {
            for _ in 0..50_000 {
                client
                    .send(Message::Binary(Bytes::from_static(&[0; 9])))
                    .await
                    .unwrap();
            }
            client
        });
        let mut got = vec![0; 9 * 50_000];
        server.read_exact(&mut got).await.unwrap();
        drop(sender.await.unwrap());

        for flood in [Message::Binary(Bytes::new()), Message::Pong(Bytes::new())] {
            let (mut client, mut server) = watched_pair().await;
            let sender = tokio::spawn(async move {
                for _ in 0..200_000 {
                    if client.send(flood.clone()).await.is_err() {
                        break;
                    }
                }
            });
            let mut buf = [0; 16];
            let read = tokio::time::timeout(Duration::from_secs(20), server.read(&mut buf));
            let e = read
                .await
                .expect("200,000 empty frames read without an end")
                .unwrap_err();
            let inner = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<WsProtocolError>());
            assert!(inner.is_some_and(|v| v.0.contains("carry no data")), "{e}");
            sender.abort();
        }
    }

    #[tokio::test]
    async fn bytes_round_trip_across_message_boundaries() {
        let (mut client, mut server) = pair().await;
        client
            .send(Message::Binary(Bytes::from_static(b"hel")))
            .await
            .unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"lo")))
            .await
            .unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        // Writes are coalesced until flush into one binary message.
        server.write_all(b"ab").await.unwrap();
        server.write_all(b"cd").await.unwrap();
        server.flush().await.unwrap();
        match client.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert_eq!(&b[..], b"abcd"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn large_writes_are_split_into_bounded_messages() {
        let (mut client, mut server) = pair().await;
        let data = vec![7u8; 200 * 1024];
        let writer = tokio::spawn(async move {
            server.write_all(&data).await.unwrap();
            server.flush().await.unwrap();
            server
        });
        let mut total = 0;
        while total < 200 * 1024 {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(b) => {
                    assert!(b.len() <= 64 * 1024);
                    total += b.len();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn text_message_is_a_protocol_error_with_close_frame() {
        let (mut client, mut server) = pair().await;
        client.send(Message::text("hi")).await.unwrap();
        let mut buf = [0u8; 4];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Protocol),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_close_code_rfc_6455_does_not_allow_is_a_violation_answered_with_1002() {
        let (mut client, mut server) = pair().await;
        client
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::from(999),
                reason: "bye".into(),
            })))
            .await
            .unwrap();
        let mut buf = [0u8; 4];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("RFC 6455 does not allow"), "{err}");
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Protocol),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn close_is_eof() {
        let (mut client, mut server) = pair().await;
        client.close(None).await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(server.read_to_end(&mut buf).await.unwrap(), 0);
    }
}
