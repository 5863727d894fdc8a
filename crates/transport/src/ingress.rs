//! The agent port: one listener, four transports.
//!
//! Each accepted connection is classified in its own task under a deadline:
//! - with TLS, ALPN `h2` is direct gRPC (`grpcs`); anything else, including no ALPN, must be an
//!   HTTP/1.1 WebSocket upgrade (`wss`);
//! - without TLS, the first bytes decide: the HTTP/2 preface is h2c (`grpc`), an HTTP/1.x
//!   request line must be a WebSocket upgrade (`ws`), anything else is refused. The bytes read
//!   are replayed.
//!
//! Every classified connection becomes a [`ServerConn`] on one stream, which the gateway feeds
//! to ONE gRPC server. The TLS handshake, the sniff and the WebSocket upgrade each have a
//! deadline, so a client that connects and says nothing is closed rather than held forever.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_util::sync::CancellationToken;

use crate::log_budget::PRE_AUTH_LOG;
use crate::ping_policy::PingPolicy;
use crate::pre_auth_budget::{BudgetExceeded, PreAuthBudget, PreAuthPool};
use crate::sniff::{read_prefix, PrefixClass, PrefixedIo};
use crate::upgrade_request;
use crate::websocket::{WsByteStream, WsSettings, WS_SUBPROTOCOL};
use crate::{set_nodelay, BoxedIo, Io, TransportKind};

/// Limits and deadlines of the agent port.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    /// Deadline for each of: the TLS handshake, the 24-byte sniff, the WebSocket upgrade.
    pub handshake_timeout: Duration,
    /// Listen backlog; the OS default of 128 overflows in reconnect storms.
    pub listen_backlog: u32,
    /// Clients that PING more often than this (more than a couple of times in a row, with no
    /// DATA or HEADERS sent to them between, grpc-go's rule) are disconnected. `None` disables the check.
    pub min_client_ping_interval: Option<Duration>,
    /// A connection on which no call authenticated within this time is closed (reason
    /// `auth_timeout`): it covers a client that finishes TLS or the WebSocket upgrade and then
    /// sends nothing, or only unauthenticated calls. `None` disables.
    pub auth_timeout: Option<Duration>,
    /// Connections open at once from one source address (agents behind one NAT share one).
    pub max_connections_per_source: usize,
    /// TLS handshakes, sniffs and WebSocket upgrades in progress at once from one source address.
    pub max_handshakes_per_source: usize,
    /// Bytes a connection may send before one of its calls authenticated (TLS, upgrade and
    /// HTTP/2 included); past it the connection is closed (reason `pre_auth_bytes`). `None`
    /// disables.
    pub max_bytes_before_auth: Option<usize>,
    /// Streams (HEADERS frames, counted as they are read, before HTTP/2 decodes them) a
    /// connection may open before one of its calls authenticated; past it the client gets a
    /// GOAWAY, and the connection is closed if it goes on ([`AfterDrain`]; reason
    /// `streams_before_auth`). `None` disables.
    pub max_streams_before_auth: Option<u32>,
    /// Load balancers (TCP mode) whose connections start with a PROXY protocol header naming
    /// the client (crate::proxy_header); from any other address none is looked for. Empty:
    /// the PROXY protocol is off.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    pub ws: WsSettings,
}

impl Default for IngressSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            listen_backlog: 4096,
            min_client_ping_interval: Some(Duration::from_secs(20)),
            auth_timeout: Some(Duration::from_secs(10)),
            max_connections_per_source: 5_000,
            max_handshakes_per_source: 64,
            max_bytes_before_auth: Some(1024 * 1024),
            max_streams_before_auth: Some(100),
            proxy_protocol_from: Vec::new(),
            ws: WsSettings::default(),
        }
    }
}

/// Why a connection was refused before it reached the gRPC server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Cleartext client sent nothing conclusive within the deadline.
    SniffTimeout,
    /// Cleartext client's first bytes were neither the HTTP/2 preface nor an HTTP/1.x request.
    BadPreface,
    /// The connection closed before anything could be classified.
    EarlyEof,
    TlsTimeout,
    TlsError,
    /// WebSocket upgrade without the `ws-tunnel` subprotocol.
    BadSubprotocol,
    WsUpgradeTimeout,
    /// An HTTP/1.1 request meant as a WebSocket upgrade but malformed (a header missing, a
    /// wrong version, an oversized head).
    WsUpgradeError,
    /// An HTTP/1.1 request that is no WebSocket upgrade at all (curl, a browser, a health
    /// check on the wrong port); answered 426.
    NotAnUpgrade,
    /// A gRPC call over HTTP/1.1: a proxy in between downgraded HTTP/2; answered 505.
    GrpcOverHttp1,
    /// `max_connections` reached.
    OverLimit,
    /// The client sent HTTP/2 PINGs more often than `min_client_ping_interval` allows.
    TooManyPings,
    /// No call on the connection authenticated within `auth_timeout`.
    AuthTimeout,
    /// `max_connections_per_source` reached for the client's address.
    SourceOverLimit,
    /// `max_handshakes_per_source` reached for the client's address.
    SourceHandshakesOverLimit,
    /// More than `max_bytes_before_auth` bytes before any call authenticated.
    PreAuthBytes,
    /// The unauthenticated connections together hold `max_bytes_before_auth_total`, and this
    /// one got no room (nor authenticated) in time.
    PreAuthBytesTotal,
    /// More SETTINGS frames than any client needs (`ping_policy::MAX_CLIENT_SETTINGS`).
    TooManySettings,
    /// More than `max_streams_before_auth` streams opened before any call authenticated.
    StreamsBeforeAuth,
    /// A connection from a `proxy_protocol_from` address without a valid PROXY protocol
    /// header within the handshake deadline.
    ProxyHeader,
    /// The gateway's HTTP/2 server ended the connection for a protocol error by the client
    /// (a GOAWAY with PROTOCOL_ERROR, COMPRESSION_ERROR, FLOW_CONTROL_ERROR, ...).
    Http2ProtocolError,
    /// The gateway's HTTP/2 server ended the connection for a flood (GOAWAY
    /// ENHANCE_YOUR_CALM: too many resets, CONTINUATION frames, ...).
    Http2Flood,
    /// A WebSocket protocol violation (a text message, an unmasked frame, reserved bits, a
    /// message over `ws_max_message_size`): closed with 1002 or 1009.
    WsProtocolError,
}

impl RejectReason {
    pub const ALL: [RejectReason; 23] = [
        Self::SniffTimeout,
        Self::BadPreface,
        Self::EarlyEof,
        Self::TlsTimeout,
        Self::TlsError,
        Self::BadSubprotocol,
        Self::WsUpgradeTimeout,
        Self::WsUpgradeError,
        Self::OverLimit,
        Self::TooManyPings,
        Self::AuthTimeout,
        Self::SourceOverLimit,
        Self::SourceHandshakesOverLimit,
        Self::PreAuthBytes,
        Self::PreAuthBytesTotal,
        Self::TooManySettings,
        Self::StreamsBeforeAuth,
        Self::ProxyHeader,
        Self::NotAnUpgrade,
        Self::GrpcOverHttp1,
        Self::Http2ProtocolError,
        Self::Http2Flood,
        Self::WsProtocolError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SniffTimeout => "sniff_timeout",
            Self::BadPreface => "bad_preface",
            Self::EarlyEof => "early_eof",
            Self::TlsTimeout => "tls_timeout",
            Self::TlsError => "tls_error",
            Self::BadSubprotocol => "bad_subprotocol",
            Self::WsUpgradeTimeout => "ws_upgrade_timeout",
            Self::WsUpgradeError => "ws_upgrade_error",
            Self::OverLimit => "over_limit",
            Self::TooManyPings => "too_many_pings",
            Self::AuthTimeout => "auth_timeout",
            Self::SourceOverLimit => "source_over_limit",
            Self::SourceHandshakesOverLimit => "source_handshakes_over_limit",
            Self::PreAuthBytes => "pre_auth_bytes",
            Self::PreAuthBytesTotal => "pre_auth_bytes_total",
            Self::TooManySettings => "too_many_settings",
            Self::StreamsBeforeAuth => "streams_before_auth",
            Self::ProxyHeader => "proxy_header",
            Self::NotAnUpgrade => "not_an_upgrade",
            Self::GrpcOverHttp1 => "grpc_over_http1",
            Self::Http2ProtocolError => "http2_protocol_error",
            Self::Http2Flood => "http2_flood",
            Self::WsProtocolError => "ws_protocol_error",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Hooks for the gateway's metrics. Logging happens here, in the transport layer, because
/// only it has the details.
pub trait IngressObserver: Send + Sync + 'static {
    fn rejected(&self, reason: RejectReason);
    fn opened(&self, meta: &ConnMeta);
    fn closed(&self, meta: &ConnMeta);
}

/// What is known about one accepted connection.
#[derive(Debug)]
pub struct ConnMeta {
    pub id: u64,
    pub kind: TransportKind,
    pub peer: SocketAddr,
    pub opened_at: Instant,
    pub opened_at_wall: SystemTime,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// The agent name, once a call on this connection authenticated (for the close log line,
    /// the auth deadline and the pre-authentication byte budget).
    pub agent: Arc<OnceLock<String>>,
    /// The agent name and instance id of the first agent session registered on this
    /// connection: the gateway names the instance to its backends when that agent's own
    /// process calls them over this connection.
    pub registered: OnceLock<(String, String)>,
    /// Calls without a token (health, reflection) open right now, for the gateway's
    /// per-connection limit on them.
    pub unauthenticated_calls: AtomicU32,
    /// Calls the gateway refused while the connection had not authenticated.
    pub refused_calls: AtomicU32,
    /// Set by the gateway when the connection is to be closed (for example after too many
    /// refused calls before authenticating); the next read ends it.
    pub close_requested: std::sync::atomic::AtomicBool,
    /// Set (to the reason) when the client should stop opening streams here: a GOAWAY
    /// (NO_ERROR, last stream 2^31-1) goes out before the server's next frame, and the client
    /// closes the connection once its calls are answered. See [`ConnMeta::request_drain`].
    pub drain: OnceLock<&'static str>,
    /// Set by the gateway when the agent retired this connection (it ended its session to
    /// move to another): the connection's tunnels take no new requests.
    pub retired: std::sync::atomic::AtomicBool,
    /// Set once the gateway wrote a GOAWAY on the connection (seen by the PING policy's frame
    /// scanner, so only while that policy is on).
    pub goaway_sent: std::sync::atomic::AtomicBool,
}

impl ConnMeta {
    /// A connection opened now. `agent` is shared with the connection's pre-authentication
    /// byte budget, which watches for the first authenticated call.
    pub fn new(
        id: u64,
        kind: TransportKind,
        peer: SocketAddr,
        agent: Arc<OnceLock<String>>,
    ) -> Self {
        Self {
            id,
            kind,
            peer,
            opened_at: Instant::now(),
            opened_at_wall: SystemTime::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            agent,
            registered: OnceLock::new(),
            unauthenticated_calls: AtomicU32::new(0),
            refused_calls: AtomicU32::new(0),
            close_requested: Default::default(),
            drain: OnceLock::new(),
            retired: Default::default(),
            goaway_sent: Default::default(),
        }
    }

    /// Asks for the connection to be closed at its next read. Used for clients that keep
    /// sending what is refused: a flooding client reads again at once.
    pub fn request_close(&self) {
        self.close_requested.store(true, Ordering::Relaxed);
    }

    /// Asks the client to move its next calls to a new connection, without breaking the calls
    /// it has in flight here. A proxy carries many clients' calls on one upstream connection
    /// and may be sending the next one as this one is refused: closing at once would fail
    /// that call (nginx answers 502), so the gateway says GOAWAY first and nginx and HAProxy
    /// stop reusing the connection.
    /// `reason` goes into the GOAWAY's debug data. Only the first request counts: true when
    /// this one was it (the caller then counts and logs the drain; a second reason for the
    /// same GOAWAY is not another rejection).
    pub fn request_drain(&self, reason: &'static str) -> bool {
        self.drain.set(reason).is_ok()
    }

    /// Whether the agent retired the connection (see `retired`).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

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
        let reason = if code == ENHANCE_YOUR_CALM {
            RejectReason::Http2Flood
        } else {
            RejectReason::Http2ProtocolError
        };
        self.observer.rejected(reason);
        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
            let detail = if debug.is_empty() {
                String::new()
            } else {
                format!(" ({debug})")
            };
            tracing::warn!(
                conn = self.meta.id,
                peer = %self.meta.peer,
                transport = %self.meta.kind,
                agent = self.meta.agent.get().map(String::as_str).unwrap_or("-"),
                %reason,
                suppressed,
                "the gateway closed the connection with GOAWAY {}{detail} for what the client \
                 sent",
                http2_error_name(code)
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

/// Failed accepts across the process's listeners: a full file table (EMFILE) must show in
/// readiness and metrics, not only as a log line 20 times a second.
pub struct AcceptHealth {
    failures: std::sync::atomic::AtomicU64,
    /// When the last accept failed, and why; when it was last logged.
    last: Mutex<Option<(Instant, String, Instant)>>,
}

/// The process's accept health (see [`AcceptHealth`]).
pub static ACCEPT_HEALTH: AcceptHealth = AcceptHealth {
    failures: std::sync::atomic::AtomicU64::new(0),
    last: Mutex::new(None),
};

impl AcceptHealth {
    /// Records a failure; true when it should be logged (at most once a second).
    fn failed(&self, e: &io::Error) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self.last.lock().unwrap();
        let log = last
            .as_ref()
            .is_none_or(|(_, _, logged)| now.duration_since(*logged) >= Duration::from_secs(1));
        let logged = match (&*last, log) {
            (Some((_, _, logged)), false) => *logged,
            _ => now,
        };
        *last = Some((now, e.to_string(), logged));
        log
    }

    /// Failed accepts since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Why accepting failed, if it did within `within`.
    pub fn failing_within(&self, within: Duration) -> Option<String> {
        let last = self.last.lock().unwrap();
        let (at, why, _) = last.as_ref()?;
        (at.elapsed() < within).then(|| why.clone())
    }
}

/// Accepts the next connection (with TCP_NODELAY set), or `None` once `shutdown` is
/// cancelled. A failed accept (EMFILE, say) is counted in [`ACCEPT_HEALTH`], logged at most
/// once a second, and retried after a short pause, so a full file table never ends a
/// listener.
pub async fn accept_until(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    set_nodelay(&stream);
                    return Some((stream, peer));
                }
                Err(e) => {
                    if ACCEPT_HEALTH.failed(&e) {
                        tracing::warn!(
                            error = %e,
                            listener = what,
                            failures = ACCEPT_HEALTH.failures(),
                            "accept failed; retrying (readiness reports not ready while this lasts; \
                             for 'Too many open files' raise the open-file limit or lower \
                             max_connections)"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Binds a TCP listener with the given backlog and SO_REUSEADDR.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}

/// The connection limit and connection ids, shared by every agent listener of a process so
/// that `max_connections` bounds the process and ids are unique in its logs.
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    next_id: AtomicU64,
    /// What the connections not yet authenticated may hold together
    /// (`max_bytes_before_auth_total`), on every agent listener.
    pre_auth: Option<Arc<PreAuthPool>>,
    /// Per source address: connections open and handshakes in progress. An entry exists only
    /// while its address holds a connection, so the map is bounded by `max`.
    sources: Mutex<HashMap<IpAddr, SourceCounts>>,
}

#[derive(Default)]
struct SourceCounts {
    conns: usize,
    handshakes: usize,
}

impl ConnectionLimit {
    /// `max` connections open at once on the listeners that share this; `pre_auth_total`
    /// bytes held by those not yet authenticated (`None`: no shared cap; see
    /// `pre_auth_budget`, which applies it to connections with a budget of their own).
    pub fn new(max: usize, pre_auth_total: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            next_id: AtomicU64::new(1),
            pre_auth: pre_auth_total.map(PreAuthPool::new),
            sources: Mutex::default(),
        })
    }

    /// Admits one more connection from `ip`, in its handshake, or says which limit it hit.
    fn admit_source(
        self: &Arc<Self>,
        ip: IpAddr,
        settings: &IngressSettings,
    ) -> Result<SourceSlot, RejectReason> {
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let c = map.entry(ip).or_default();
        if c.conns >= settings.max_connections_per_source {
            return Err(RejectReason::SourceOverLimit);
        }
        if c.handshakes >= settings.max_handshakes_per_source {
            return Err(RejectReason::SourceHandshakesOverLimit);
        }
        c.conns += 1;
        c.handshakes += 1;
        Ok(SourceSlot {
            limit: self.clone(),
            ip,
            handshaking: true,
        })
    }

    fn release_source(&self, ip: IpAddr, handshaking: bool) {
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get_mut(&ip) {
            c.conns = c.conns.saturating_sub(1);
            if handshaking {
                c.handshakes = c.handshakes.saturating_sub(1);
            }
            if c.conns == 0 {
                map.remove(&ip);
            }
        }
    }
}

/// One connection's place in its source address's counts; released on drop.
struct SourceSlot {
    limit: Arc<ConnectionLimit>,
    ip: IpAddr,
    handshaking: bool,
}

impl SourceSlot {
    fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut map = self.limit.sources.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get_mut(&self.ip) {
                c.handshakes = c.handshakes.saturating_sub(1);
            }
        }
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.limit.release_source(self.ip, self.handshaking);
    }
}

/// Accepts connections on `listener` until `shutdown`, classifies each, and yields the
/// classified ones. Errors never end the stream: a failed accept (EMFILE, say) is logged and
/// retried after a short pause.
pub fn serve_ingress(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    settings: IngressSettings,
    observer: Arc<dyn IngressObserver>,
    limit: Arc<ConnectionLimit>,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerConn>> {
    let (tx, rx) = mpsc::channel(256);
    let settings = Arc::new(settings);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        while let Some((stream, peer)) = accept_until(&listener, &shutdown, "agent").await {
            let Ok(permit) = limit.permits.clone().try_acquire_owned() else {
                observer.rejected(RejectReason::OverLimit);
                if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                    tracing::warn!(
                        %peer,
                        reason = "over_limit",
                        max_connections = limit.max,
                        suppressed,
                        "connection refused: too many open connections"
                    );
                }
                drop(stream);
                continue;
            };
            // Behind a balancer the client is known only once its header is read, in the
            // connection's task; everyone else is counted against their address right here.
            let balancer =
                crate::proxy_header::from_balancer(&settings.proxy_protocol_from, peer.ip());
            let early_source = if balancer {
                None
            } else {
                match limit.admit_source(peer.ip(), &settings) {
                    Ok(slot) => Some(slot),
                    Err(reason) => {
                        refuse_source(&*observer, peer, reason, &settings);
                        continue;
                    }
                }
            };
            let id = limit.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, observer, settings, acceptor, limit) = (
                tx.clone(),
                observer.clone(),
                settings.clone(),
                acceptor.clone(),
                limit.clone(),
            );
            tokio::spawn(async move {
                let mut stream = stream;
                let (peer, mut source, via) = match early_source {
                    Some(slot) => (peer, slot, None),
                    None => {
                        let Some(client) =
                            client_behind(&mut stream, peer, id, &*observer, &settings).await
                        else {
                            return;
                        };
                        match limit.admit_source(client.ip(), &settings) {
                            Ok(slot) => (client, slot, Some(peer)),
                            Err(reason) => {
                                refuse_source(&*observer, client, reason, &settings);
                                return;
                            }
                        }
                    }
                };
                let agent = Arc::new(OnceLock::new());
                let tripped = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let report = {
                    let (observer, tripped) = (observer.clone(), tripped.clone());
                    Box::new(move |exceeded: BudgetExceeded| {
                        tripped.store(true, Ordering::Relaxed);
                        let (reason, limit, what) = match exceeded {
                            BudgetExceeded::Connection { limit } => (
                                RejectReason::PreAuthBytes,
                                limit,
                                "it sent more than max_bytes_before_auth before any call \
                                 authenticated",
                            ),
                            BudgetExceeded::Total { limit } => (
                                RejectReason::PreAuthBytesTotal,
                                limit,
                                "the connections without an authenticated call hold \
                                 max_bytes_before_auth_total between them (many clients \
                                 sending without a token?), and this one got no room in time",
                            ),
                        };
                        observer.rejected(reason);
                        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                            tracing::warn!(
                                conn = id,
                                %peer,
                                %reason,
                                limit,
                                suppressed,
                                "closing connection: {what}"
                            );
                        }
                    })
                };
                let stream = PreAuthBudget::new(
                    stream,
                    agent.clone(),
                    settings.max_bytes_before_auth,
                    limit.pre_auth.clone(),
                    report,
                );
                let classified = classify(stream, acceptor, &settings).await;
                source.handshake_done();
                match classified {
                    Ok((io, kind)) => {
                        let meta = Arc::new(ConnMeta::new(id, kind, peer, agent));
                        observer.opened(&meta);
                        // Debug: anyone can open a connection; "agent registered" and
                        // "connection closed" carry the connection's id and peer.
                        match via {
                            None => {
                                tracing::debug!(conn = id, transport = %kind, %peer, "connection opened")
                            }
                            Some(balancer) => {
                                tracing::debug!(conn = id, transport = %kind, %peer, %balancer, "connection opened")
                            }
                        }
                        let conn = ServerConn {
                            io,
                            meta,
                            observer,
                            // Always on: it also counts the streams opened before
                            // authentication; without a minimum no PING is early.
                            ping_policy: Some(PingPolicy::new(
                                settings.min_client_ping_interval.unwrap_or(Duration::ZERO),
                            )),
                            max_streams_before_auth: settings.max_streams_before_auth,
                            auth_deadline: settings
                                .auth_timeout
                                .map(|t| Box::pin(tokio::time::sleep(t))),
                            auth_timeout: settings.auth_timeout.unwrap_or_default(),
                            injected: Vec::new(),
                            after_drain: None,
                            preface_checked: 0,
                            _permit: permit,
                            _source: source,
                        };
                        // If the server is gone we are shutting down; the conn is dropped.
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(_) if tripped.load(Ordering::Relaxed) => {} // reported by the budget
                    Err((reason, detail)) => {
                        observer.rejected(reason);
                        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                            tracing::warn!(conn = id, %peer, %reason, suppressed, "connection refused: {detail}");
                        }
                    }
                }
            });
        }
        tracing::info!("agent listener stopped accepting");
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

type Rejection = (RejectReason, String);

/// A connection over its source address's limits: counted, logged (within the log budget)
/// and dropped by the caller.
fn refuse_source(
    observer: &dyn IngressObserver,
    peer: SocketAddr,
    reason: RejectReason,
    settings: &IngressSettings,
) {
    observer.rejected(reason);
    if let Some(suppressed) = PRE_AUTH_LOG.allow() {
        tracing::warn!(
            %peer,
            %reason,
            max_connections_per_source = settings.max_connections_per_source,
            max_handshakes_per_source = settings.max_handshakes_per_source,
            suppressed,
            "connection refused: too many connections or handshakes from this address"
        );
    }
}

/// The client a balancer's connection carries, from its PROXY protocol header (the
/// balancer's own address when the header names none), or `None` after refusing it.
async fn client_behind(
    stream: &mut TcpStream,
    balancer: SocketAddr,
    id: u64,
    observer: &dyn IngressObserver,
    settings: &IngressSettings,
) -> Option<SocketAddr> {
    let deadline = settings.handshake_timeout;
    let why = match crate::proxy_header::read_proxy_header_within(stream, deadline).await {
        Ok(client) => return Some(client.unwrap_or(balancer)),
        Err(e) => e,
    };
    observer.rejected(RejectReason::ProxyHeader);
    if let Some(suppressed) = PRE_AUTH_LOG.allow() {
        tracing::warn!(
            conn = id,
            %balancer,
            reason = "proxy_header",
            suppressed,
            "connection from a proxy_protocol_from address refused: {why}"
        );
    }
    None
}

async fn classify(
    mut stream: PreAuthBudget<TcpStream>,
    acceptor: Option<TlsAcceptor>,
    settings: &IngressSettings,
) -> Result<(BoxedIo, TransportKind), Rejection> {
    let deadline = settings.handshake_timeout;
    if let Some(acceptor) = acceptor {
        let tls = timeout(deadline, acceptor.accept(stream))
            .await
            .map_err(|_| {
                (
                    RejectReason::TlsTimeout,
                    format!("TLS handshake not finished within {deadline:?}"),
                )
            })?
            .map_err(|e| {
                (
                    RejectReason::TlsError,
                    crate::tls::describe_handshake_failure(&e),
                )
            })?;
        if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
            return Ok((Box::new(tls), TransportKind::Grpcs));
        }
        let ws = websocket_upgrade(tls, settings).await?;
        return Ok((ws, TransportKind::Wss));
    }
    let (class, prefix) = match timeout(deadline, read_prefix(&mut stream)).await {
        Err(_) => {
            return Err((
                RejectReason::SniffTimeout,
                format!("no HTTP/2 preface or HTTP/1.1 request within {deadline:?}"),
            ))
        }
        Ok(Err(e)) => return Err((RejectReason::EarlyEof, e.to_string())),
        Ok(Ok(x)) => x,
    };
    match class {
        PrefixClass::Http2 => Ok((
            Box::new(PrefixedIo::new(prefix, stream)),
            TransportKind::Grpc,
        )),
        PrefixClass::Http1 => {
            let ws = websocket_upgrade(PrefixedIo::new(prefix, stream), settings).await?;
            Ok((ws, TransportKind::Ws))
        }
        PrefixClass::Garbage | PrefixClass::NeedMore => Err((
            RejectReason::BadPreface,
            format!(
                "first bytes {} are neither the HTTP/2 preface nor an HTTP/1.1 request \
                 (TLS sent to a cleartext port?)",
                crate::sniff::hex_bytes(&prefix[..prefix.len().min(8)])
            ),
        )),
    }
}

/// Whether a `Sec-WebSocket-Protocol` header value offers `ws-tunnel`.
fn offers_ws_tunnel(value: Option<&http::HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').any(|p| p.trim() == WS_SUBPROTOCOL))
        .unwrap_or(false)
}

pub(crate) async fn websocket_upgrade<S: Io>(
    mut io: S,
    settings: &IngressSettings,
) -> Result<BoxedIo, Rejection> {
    let deadline = settings.handshake_timeout;
    let started = tokio::time::Instant::now();
    let head = match timeout(deadline, upgrade_request::read_upgrade(&mut io)).await {
        Err(_) => {
            return Err((
                RejectReason::WsUpgradeTimeout,
                format!("no complete HTTP/1.1 request within {deadline:?}"),
            ))
        }
        Ok(Err(e)) => return Err((RejectReason::EarlyEof, e.to_string())),
        Ok(Ok(Err(refusal))) => {
            // Answered within what is left of the same deadline: a client that does not
            // read is not waited for.
            let _ = tokio::time::timeout_at(started + deadline, refusal.send(&mut io)).await;
            return Err((refusal.reason, refusal.sentence));
        }
        Ok(Ok(Ok(head))) => head,
    };
    let io = PrefixedIo::new(head.into(), io);
    let bad_subprotocol: Arc<Mutex<Option<String>>> = Arc::default();
    let seen = bad_subprotocol.clone();
    #[allow(clippy::result_large_err)] // the error type is tungstenite's, not ours
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let offered = req.headers().get(http::header::SEC_WEBSOCKET_PROTOCOL);
        if !offers_ws_tunnel(offered) {
            let got = offered
                .and_then(|v| v.to_str().ok())
                .map(|v| format!("{v:?}"))
                .unwrap_or_else(|| "none".into());
            let msg = format!(
                "agentgate: WebSocket subprotocol \"{WS_SUBPROTOCOL}\" is required (offered: {got})\n"
            );
            *seen.lock().unwrap() = Some(format!(
                "subprotocol {WS_SUBPROTOCOL:?} not offered (offered: {got})"
            ));
            let mut err = ErrorResponse::new(Some(msg));
            *err.status_mut() = http::StatusCode::BAD_REQUEST;
            return Err(err);
        }
        resp.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static(WS_SUBPROTOCOL),
        );
        Ok(resp)
    };
    let cfg = settings.ws.tungstenite_config();
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(cfg));
    match tokio::time::timeout_at(started + deadline, upgrade).await {
        Err(_) => Err((
            RejectReason::WsUpgradeTimeout,
            format!("WebSocket upgrade not finished within {deadline:?}"),
        )),
        Ok(Err(e)) => match bad_subprotocol.lock().unwrap().take() {
            Some(detail) => Err((RejectReason::BadSubprotocol, detail)),
            None => Err((
                RejectReason::WsUpgradeError,
                format!("not a valid WebSocket upgrade: {e}"),
            )),
        },
        Ok(Ok(ws)) => Ok(Box::new(WsByteStream::new(ws, &settings.ws))),
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

    #[test]
    fn subprotocol_offer_parsing() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        assert!(offers_ws_tunnel(Some(&v("ws-tunnel"))));
        assert!(offers_ws_tunnel(Some(&v("chat, ws-tunnel"))));
        assert!(!offers_ws_tunnel(Some(&v("ws-tunnel2"))));
        assert!(!offers_ws_tunnel(None));
    }
}
