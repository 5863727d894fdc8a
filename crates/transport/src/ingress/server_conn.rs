//! A classified connection, and what it enforces on the client's bytes before and while the
//! gRPC server reads them: the HTTP/2 preface, the PING and SETTINGS policy, the streams
//! opened before authentication, the authentication deadline and the drain's GOAWAY.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use super::limit::SourceSlot;
use super::{ConnMeta, IngressObserver, IngressSettings, RejectReason};
use crate::log_budget::PRE_AUTH_LOG;
use crate::ping_policy::PingPolicy;
use crate::{BoxedIo, TransportKind};

/// A classified connection, ready for the gRPC server. Dropping it logs the close line.
pub struct ServerConn {
    io: BoxedIo,
    meta: Arc<ConnMeta>,
    observer: Arc<dyn IngressObserver>,
    ping_policy: Option<PingPolicy>,
    /// Streams (HEADERS frames) the client may open before a call authenticated.
    max_streams_before_auth: Option<u32>,
    /// Fires `auth_timeout` after the connection was classified, unless a call authenticated;
    /// on a connection that opened streams, again `auth_timeout` after its GOAWAY.
    auth_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    auth_timeout: Duration,
    /// Fires at the connection's [`super::drain_point`] of `max_connection_age`: the client is
    /// then told to move (GOAWAY), session or not.
    age_drain: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes of a frame of the gateway's own (the drain's GOAWAY) still to be written before
    /// the server's next bytes; empty when there is none.
    injected: Vec<u8>,
    /// Once the drain's GOAWAY was queued (once per connection): what the client did since.
    after_drain: Option<AfterDrain>,
    /// Bytes of the HTTP/2 client preface checked so far: the cleartext port's sniffing saw
    /// it on direct connections, but inside a WebSocket or after TLS nothing else looks.
    preface_checked: usize,
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
}

impl ServerConn {
    /// A connection classified just now, holding its place in the connection limit and in its
    /// source address's counts until it is dropped.
    pub(super) fn new(
        io: BoxedIo,
        meta: Arc<ConnMeta>,
        observer: Arc<dyn IngressObserver>,
        settings: &IngressSettings,
        permit: OwnedSemaphorePermit,
        source: SourceSlot,
    ) -> Self {
        let age_drain = settings.max_connection_age.map(|age| {
            let at = meta.opened_at + super::drain_point(age, meta.id);
            Box::pin(tokio::time::sleep_until(at.into()))
        });
        Self {
            io,
            meta,
            observer,
            // Always on: it also counts the streams opened before authentication; without a
            // minimum no PING is early.
            ping_policy: Some(PingPolicy::new(
                settings.min_client_ping_interval.unwrap_or(Duration::ZERO),
            )),
            max_streams_before_auth: settings.max_streams_before_auth,
            auth_deadline: settings
                .auth_timeout
                .map(|t| Box::pin(tokio::time::sleep(t))),
            auth_timeout: settings.auth_timeout.unwrap_or_default(),
            age_drain,
            injected: Vec::new(),
            after_drain: None,
            preface_checked: 0,
            _permit: permit,
            _source: source,
        }
    }

    pub fn meta(&self) -> &Arc<ConnMeta> {
        &self.meta
    }
}

/// The name of an HTTP/2 error code (RFC 9113, section 7).
fn http2_error_name(code: u32) -> &'static str {
    match code {
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "an unknown error code",
    }
}

/// HTTP/2 error codes: ENHANCE_YOUR_CALM, and the debug texts grpc-go acts on.
const ENHANCE_YOUR_CALM: u32 = 0xb;
const NO_ERROR: u32 = 0x0;

/// Why an HTTP/2 server closed a connection with a GOAWAY carrying error `code` and debug
/// text `debug`, and the sentence that says so: ENHANCE_YOUR_CALM is a flood it caught (too
/// many resets, CONTINUATION frames, ...), any other error a protocol error by the client.
/// For every listener's refusal metric and log line.
pub fn goaway_error_refusal(code: u32, debug: &str) -> (RejectReason, String) {
    let reason = if code == ENHANCE_YOUR_CALM {
        RejectReason::Http2Flood
    } else {
        RejectReason::Http2ProtocolError
    };
    let detail = if debug.is_empty() {
        String::new()
    } else {
        format!(" ({debug})")
    };
    let sentence = format!(
        "the gateway closed the connection with GOAWAY {}{detail} for what the client sent",
        http2_error_name(code)
    );
    (reason, sentence)
}

impl ServerConn {
    /// The HTTP/2 server ended the connection with an error GOAWAY: counted and logged (its
    /// library says nothing, and the client may be anyone).
    fn report_goaway_error(&self) {
        let Some((code, debug)) = self.ping_policy.as_ref().and_then(PingPolicy::goaway_sent)
        else {
            return;
        };
        if code == NO_ERROR {
            return;
        }
        let (reason, sentence) = goaway_error_refusal(code, &debug);
        self.observer.rejected(reason);
        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
            tracing::warn!(
                conn = self.meta.id,
                peer = %self.meta.peer,
                transport = %self.meta.kind,
                agent = self.meta.agent.get().map(String::as_str).unwrap_or("-"),
                %reason,
                suppressed,
                "{sentence}"
            );
        }
    }

    /// A WebSocket protocol violation ending the connection: counted and logged.
    fn report_ws_violation(&self, e: &io::Error) {
        let Some(violation) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<crate::websocket::WsProtocolError>())
        else {
            return;
        };
        self.reject_with_line(RejectReason::WsProtocolError, violation);
    }

    /// Counts `reason` and writes the `closing connection` line (within the pre-auth budget)
    /// for a connection closed for what its client sent.
    fn reject_with_line(&self, reason: RejectReason, what: &dyn std::fmt::Display) {
        self.observer.rejected(reason);
        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
            tracing::warn!(
                conn = self.meta.id,
                peer = %self.meta.peer,
                transport = %self.meta.kind,
                agent = self.meta.agent.get().map(String::as_str).unwrap_or("-"),
                %reason,
                suppressed,
                "closing connection: {what}"
            );
        }
    }

    /// Before a connection is closed for breaking a policy: a GOAWAY naming why, written
    /// straight to the client when the server's output sits between two frames (so a gRPC
    /// client learns the reason, and grpc-go backs off its keepalive on "too_many_pings").
    /// Best effort: a client that does not read is not waited for.
    fn send_goaway(&mut self, cx: &mut Context<'_>, code: u32, debug: &str) {
        if !self
            .ping_policy
            .as_ref()
            .is_some_and(PingPolicy::outbound_at_frame_boundary)
        {
            return;
        }
        let frame = goaway_frame(code, debug);
        if let Poll::Ready(Ok(n)) = Pin::new(&mut self.io).poll_write(cx, &frame) {
            self.meta.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            let _ = Pin::new(&mut self.io).poll_flush(cx);
        }
    }

    /// Checks the first bytes the server reads against the HTTP/2 client preface; on a
    /// mismatch, counts (`bad_preface`), logs what was sent instead, and returns the error that
    /// closes the connection. hyper would close it without a word.
    fn check_preface(&mut self, data: &[u8]) -> Option<io::Error> {
        let preface = crate::sniff::HTTP2_PREFACE;
        if self.preface_checked >= preface.len() {
            return None;
        }
        let n = data.len().min(preface.len() - self.preface_checked);
        if data[..n] == preface[self.preface_checked..self.preface_checked + n] {
            self.preface_checked += n;
            return None;
        }
        self.preface_checked = preface.len();
        let first = crate::sniff::hex_bytes(&data[..data.len().min(8)]);
        let guess = if data.first() == Some(&0x16) {
            "a TLS handshake: TLS inside the WebSocket? wss:// brings its own"
        } else if data.first().is_some_and(u8::is_ascii_uppercase) {
            "an HTTP/1.1 request? this connection carries gRPC"
        } else {
            "not HTTP/2"
        };
        let place = match self.meta.kind {
            TransportKind::Ws | TransportKind::Wss => "inside the WebSocket",
            TransportKind::Grpcs => "after TLS that agreed on HTTP/2 (ALPN h2)",
            TransportKind::Grpc => "on the cleartext port",
        };
        let what = format!(
            "{place}, the client's first bytes ({first}) are not the HTTP/2 preface ({guess})"
        );
        self.reject_with_line(RejectReason::BadPreface, &what);
        Some(io::Error::new(io::ErrorKind::InvalidData, what))
    }

    /// Ends the connection for breaking a policy on what the client sends: a GOAWAY
    /// ENHANCE_YOUR_CALM naming `reason` (grpc-go doubles its keepalive time on exactly this
    /// GOAWAY after too many PINGs), a log line within the pre-authentication budget saying
    /// `what`, and the read error that closes the connection.
    fn close_for_policy(
        &mut self,
        cx: &mut Context<'_>,
        reason: RejectReason,
        what: &'static str,
    ) -> io::Error {
        self.send_goaway(cx, ENHANCE_YOUR_CALM, reason.as_str());
        self.ping_policy = None;
        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
            tracing::warn!(
                conn = self.meta.id,
                peer = %self.meta.peer,
                %reason,
                suppressed,
                "closing connection: {what}"
            );
        }
        io::Error::new(io::ErrorKind::InvalidData, what)
    }

    /// The connection reached its drain point of `max_connection_age`: the client is told to
    /// open its next calls elsewhere (GOAWAY, written now if the server's output allows), and
    /// its calls in flight go on until the age and its grace are over. A connection with an
    /// agent session gets the same from the session, which also tells the agent (and logs it).
    fn drain_for_age(&mut self, cx: &mut Context<'_>) {
        if self.meta.request_drain(super::DRAIN_MAX_AGE) && self.meta.registered.get().is_none() {
            tracing::info!(
                conn = self.meta.id,
                peer = %self.meta.peer,
                transport = %self.meta.kind,
                agent = self.meta.agent.get().map(String::as_str).unwrap_or("-"),
                "connection draining: it reached max_connection_age; GOAWAY sent, its calls in \
                 flight get max_connection_age_grace"
            );
        }
        let _ = self.poll_injected(cx);
    }

    /// Before the server's next bytes: queues the drain's GOAWAY once the gateway asked for
    /// it and the output sits between two frames, then writes whatever is queued. `Pending`
    /// until all of it is out, so the server's bytes never split a frame of ours.
    fn poll_injected(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(reason) = self.meta.drain.get().filter(|_| {
            self.after_drain.is_none()
                && self
                    .ping_policy
                    .as_ref()
                    .is_some_and(PingPolicy::outbound_at_frame_boundary)
        }) {
            self.injected = goaway_frame(NO_ERROR, &format!("{reason}: open a new connection"));
            // Its acknowledgement tells when the client has read the GOAWAY (h2 ignores an
            // acknowledgement of a PING it did not send).
            self.injected.extend_from_slice(&crate::raw_frames::frame(
                crate::ping_policy::FRAME_PING,
                0,
                0,
                DRAIN_PING_PAYLOAD,
            ));
            if let Some(policy) = &mut self.ping_policy {
                policy.feed_outbound(&self.injected);
                self.after_drain = Some(AfterDrain {
                    at: Instant::now(),
                    acks_before: policy.client_ping_acks(),
                    streams_at_ack: None,
                });
            }
        }
        while !self.injected.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.injected))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.meta.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            self.injected.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

/// The payload of the PING sent after the drain's GOAWAY.
const DRAIN_PING_PAYLOAD: &[u8; 8] = b"agdrain\0";

/// How long a client that does not acknowledge the drain's PING has before streams past twice
/// `max_streams_before_auth` close its connection.
const DRAIN_ACK_GRACE: Duration = Duration::from_secs(1);

/// Streams before any call authenticated, as a multiple of `max_streams_before_auth`, that
/// close a connection whatever else holds: the most HTTP/2 decodes for a client that is not
/// an agent.
const STREAMS_BEFORE_AUTH_CEILING: u32 = 10;

/// What a client did after the drain's GOAWAY and the PING behind it were queued.
struct AfterDrain {
    at: Instant,
    /// PING acknowledgements it had sent before.
    acks_before: u32,
    /// Streams it had opened when it acknowledged the PING, so had read the GOAWAY.
    streams_at_ack: Option<u32>,
}

impl AfterDrain {
    /// Whether a client that has opened `opened` streams, none of them authenticated, did not
    /// listen to the GOAWAY. A GOAWAY for too many streams before auth is often the answer to
    /// a burst: an agent's first calls, all read before the first of them authenticated, or a
    /// proxy's health checks. Those streams were on their way when the GOAWAY went out and are
    /// answered. Only a client that opens more than `limit` streams after it read the GOAWAY
    /// (or after [`DRAIN_ACK_GRACE`], if it never acknowledges the PING) goes on. (Past
    /// [`STREAMS_BEFORE_AUTH_CEILING`] times `limit` the connection is closed regardless.)
    fn went_on(&self, opened: u32, limit: u32) -> bool {
        match self.streams_at_ack {
            Some(at_ack) => opened.saturating_sub(at_ack) > limit,
            None => self.at.elapsed() >= DRAIN_ACK_GRACE && opened > limit.saturating_mul(2),
        }
    }
}

/// A GOAWAY frame with last stream 2^31-1: the client may open no new stream, and those it
/// opened are still answered (RFC 9113, section 6.8).
fn goaway_frame(code: u32, debug: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + debug.len());
    payload.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(debug.as_bytes());
    crate::raw_frames::frame(crate::ping_policy::FRAME_GOAWAY, 0, 0, &payload)
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        self.report_goaway_error();
        let m = &self.meta;
        self.observer.closed(m);
        macro_rules! closed {
            ($($suppressed:tt)*) => {
                tracing::info!(
                    conn = m.id,
                    transport = %m.kind,
                    peer = %m.peer,
                    agent = m.agent.get().map(String::as_str).unwrap_or("-"),
                    duration_ms = m.opened_at.elapsed().as_millis() as u64,
                    bytes_in = m.bytes_in.load(Ordering::Relaxed),
                    bytes_out = m.bytes_out.load(Ordering::Relaxed),
                    $($suppressed)*
                    "connection closed"
                )
            };
        }
        // A connection that never authenticated is anyone's: its line comes out of the
        // shared pre-authentication budget, so connect-and-close loops cannot flood the log.
        if m.agent.get().is_some() {
            closed!();
        } else if let Some(suppressed) = PRE_AUTH_LOG.allow() {
            closed!(suppressed,);
        }
    }
}

impl tonic::transport::server::Connected for ServerConn {
    type ConnectInfo = Arc<ConnMeta>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.meta.clone()
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.meta.close_requested.load(Ordering::Relaxed) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed by the gateway",
            )));
        }
        if this
            .age_drain
            .as_mut()
            .is_some_and(|at| at.as_mut().poll(cx).is_ready())
        {
            this.age_drain = None;
            this.drain_for_age(cx);
        }
        if let Some(deadline) = &mut this.auth_deadline {
            let reason = RejectReason::AuthTimeout;
            let opened_streams = this
                .ping_policy
                .as_ref()
                .map_or(0, PingPolicy::client_headers);
            if this.meta.agent.get().is_some() {
                this.auth_deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready()
                && opened_streams > 0
                && this.meta.drain.get().is_none()
            {
                // Streams were opened: a proxy's connection, say, carrying load balancers'
                // health checks, which may have the next one in flight. GOAWAY now, and the
                // close one `auth_timeout` later.
                let _ = this.meta.request_drain(reason.as_str());
                this.observer.rejected(reason);
                if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                    tracing::warn!(
                        conn = this.meta.id,
                        peer = %this.meta.peer,
                        transport = %this.meta.kind,
                        %reason,
                        suppressed,
                        "sending GOAWAY: no call authenticated in time (agents send their token \
                         on their first calls); the connection is closed in {:?}",
                        this.auth_timeout
                    );
                }
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + this.auth_timeout);
                let _ = deadline.as_mut().poll(cx);
                // Written now if the server's output allows; else before its next bytes.
                let _ = this.poll_injected(cx);
            } else if deadline.is_elapsed() {
                this.auth_deadline = None;
                if this.meta.drain.get() != Some(&reason.as_str()) {
                    self.observer.rejected(reason);
                }
                if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                    tracing::warn!(
                        conn = self.meta.id,
                        peer = %self.meta.peer,
                        transport = %self.meta.kind,
                        reason = "auth_timeout",
                        suppressed,
                        "closing connection: no call authenticated in time; agents must send \
                         their token on their first calls"
                    );
                }
                self.send_goaway(cx, NO_ERROR, "auth_timeout: no call authenticated in time");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no authenticated call in time",
                )));
            }
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &res {
            self.report_ws_violation(e);
        }
        let n = buf.filled().len() - before;
        if n > 0 {
            self.meta.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            let this = &mut *self;
            if let Some(e) = this.check_preface(&buf.filled()[before..]) {
                return Poll::Ready(Err(e));
            }
            if let Some(policy) = &mut this.ping_policy {
                if let Err(e) = policy.feed(&buf.filled()[before..], Instant::now()) {
                    let (reason, what) = match e {
                        crate::ping_policy::TooManyPings::Pings { .. } => (
                            RejectReason::TooManyPings,
                            "the client sends HTTP/2 PINGs more often than allowed",
                        ),
                        crate::ping_policy::TooManyPings::Settings { .. } => (
                            RejectReason::TooManySettings,
                            "the client keeps sending HTTP/2 SETTINGS frames",
                        ),
                        crate::ping_policy::TooManyPings::ControlFrames { .. } => (
                            RejectReason::TooManyControlFrames,
                            "the client keeps sending HTTP/2 frames that carry no request \
                             (PRIORITY, WINDOW_UPDATE, ...)",
                        ),
                    };
                    this.observer.rejected(reason);
                    return Poll::Ready(Err(this.close_for_policy(cx, reason, what)));
                }
                // Past the limit the client is told to go (GOAWAY): a proxy may carry other
                // clients' calls on this connection (load balancers' health checks, an
                // agent's first call). One that did not listen ([`AfterDrain::went_on`]) is
                // cut off before HTTP/2 decodes more.
                if let Some(after) = &mut this.after_drain {
                    if after.streams_at_ack.is_none()
                        && policy.client_ping_acks() > after.acks_before
                    {
                        after.streams_at_ack = Some(policy.client_headers());
                    }
                }
                if let Some(limit) = this.max_streams_before_auth {
                    let opened = policy.client_headers();
                    let reason = RejectReason::StreamsBeforeAuth;
                    if opened > limit && this.meta.agent.get().is_none() {
                        if opened > limit.saturating_mul(STREAMS_BEFORE_AUTH_CEILING)
                            || this
                                .after_drain
                                .as_ref()
                                .is_some_and(|a| a.went_on(opened, limit))
                        {
                            let what = "it went on opening streams after GOAWAY";
                            return Poll::Ready(Err(this.close_for_policy(cx, reason, what)));
                        }
                        if this.meta.request_drain(reason.as_str()) {
                            this.observer.rejected(reason);
                            if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                                tracing::warn!(
                                    conn = this.meta.id,
                                    peer = %this.meta.peer,
                                    %reason,
                                    limit,
                                    suppressed,
                                    "sending GOAWAY: the client opened more streams than allowed \
                                     before any call authenticated; the connection is closed if \
                                     it goes on"
                                );
                            }
                        }
                    }
                }
            }
        }
        res
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_injected(cx))?;
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.meta.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(policy) = &mut self.ping_policy {
                if policy.feed_outbound(&buf[..n]) {
                    self.meta.goaway_sent.store(true, Ordering::Relaxed);
                }
            }
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_injected(cx))?;
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.meta.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            let this = &mut *self;
            if let Some(policy) = &mut this.ping_policy {
                let mut left = n;
                for b in bufs {
                    let take = left.min(b.len());
                    if policy.feed_outbound(&b[..take]) {
                        this.meta.goaway_sent.store(true, Ordering::Relaxed);
                    }
                    left -= take;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A frame of ours that did not fit before the server's last bytes goes out now.
        ready!(self.poll_injected(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_drain_only_streams_opened_once_the_client_read_it_count() {
        let limit = 100;
        let fresh = |streams_at_ack| AfterDrain {
            at: Instant::now(),
            acks_before: 0,
            streams_at_ack,
        };
        // A burst of 450 on its way when the GOAWAY went out, acknowledged at 450: the client
        // listened.
        assert!(!fresh(Some(450)).went_on(450, limit));
        assert!(!fresh(Some(450)).went_on(550, limit));
        assert!(fresh(Some(450)).went_on(551, limit));
        // Not acknowledged yet: twice the limit only once the grace is over.
        assert!(!fresh(None).went_on(450, limit));
        let late = AfterDrain {
            at: Instant::now() - DRAIN_ACK_GRACE,
            ..fresh(None)
        };
        assert!(!late.went_on(200, limit));
        assert!(late.went_on(201, limit));
    }
}
