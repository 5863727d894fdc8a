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
//!
//! Files: `serve.rs` (the accept loop and each connection's task), `classify.rs` (TLS, the
//! sniff and the WebSocket upgrade), `server_conn.rs` (the classified connection and the
//! policies it enforces on what the client sends), `limit.rs` (connection and per-source
//! limits), `accept.rs` (accepting and binding).

mod accept;
mod classify;
mod limit;
mod serve;
mod server_conn;

pub use accept::{accept_until, bind_listener, AcceptHealth, ACCEPT_HEALTH};
#[cfg(test)]
pub(crate) use classify::websocket_upgrade;
pub use limit::ConnectionLimit;
pub use serve::serve_ingress;
pub use server_conn::{goaway_error_refusal, ServerConn};

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::websocket::WsSettings;
use crate::TransportKind;

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
    /// `max_connection_age`: every connection is told to move (a GOAWAY, see
    /// [`ConnMeta::request_drain`]) at its [`drain_point`], whether or not an agent session
    /// runs on it: a runner that only calls backends, or a proxy carrying many clients' calls,
    /// must learn of the end before `max_connection_age_grace` cuts what is in flight. `None`:
    /// connections never age.
    pub max_connection_age: Option<Duration>,
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
            max_connection_age: None,
            ws: WsSettings::default(),
        }
    }
}

/// The drain reason (GOAWAY debug data) of a connection that reached `max_connection_age`.
pub const DRAIN_MAX_AGE: &str = "max_connection_age";

/// When a connection with `max_connection_age` = `age` is told to move (its GOAWAY; its agent
/// session, if any, is asked to reconnect and its tunnels stop being used), ahead of the
/// forced close at the full age plus grace. Jittered per connection between 80% and 95% of
/// the age, so connections made together (after a restart, say) do not all rebalance at the
/// same moment.
pub fn drain_point(age: Duration, conn_id: u64) -> Duration {
    // A multiplicative hash spreads consecutive ids over [0, 1).
    let spread = (conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    age.mul_f64(0.80 + 0.15 * spread)
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
    /// More HTTP/2 frames that carry no request (PRIORITY, WINDOW_UPDATE, ...) than the
    /// allowance (`ping_policy::CONTROL_FRAMES_BASE`).
    TooManyControlFrames,
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
    pub const ALL: [RejectReason; 24] = [
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
        Self::TooManyControlFrames,
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
            Self::TooManyControlFrames => "too_many_control_frames",
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
