//! HTTP/2 connections from the gateway to one backend.
//!
//! Written here rather than taken from hyper-util's pooled client, because that client keeps
//! ONE HTTP/2 connection per host: with thousands of long polls open, calls would queue
//! behind the backend's stream limit (commonly 100) forever. This pool opens another
//! connection when every open one carries `max_calls_per_connection` calls. Connections are
//! `h2` client connections, not hyper's: `stream.rs` says why.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_transport::tls::{client_config, ServerVerification};
use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::stream::{self, RequestPump, SendError};
use super::BackendConfigError;
use crate::config::BackendConfig;

/// How long the answer to a keepalive PING may take (the interval is the backend's
/// `keepalive_interval`): a backend that vanished without a FIN is noticed instead of
/// swallowing calls.
const BACKEND_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keepalive on backend connections (`set_tcp_keepalive`): probes after this long
/// without traffic, then every [`TCP_KEEPALIVE_INTERVAL`].
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// `in_flight` of a connection closed for idleness: above any cap, so no call takes it.
const RETIRED: u32 = u32::MAX;
/// The flow-control window the gateway offers a backend for each call's answer: what an
/// answer may hold unread in the gateway while its caller does not read. Four round trips'
/// worth of a fast stream to a backend next to the gateway (at 1 ms, 256 MB/s a call).
const ANSWER_STREAM_WINDOW: u32 = 256 * 1024;

/// The connection's window for answers: room for every call it may carry to hold its whole
/// stream window unread. A smaller one (it was 5 MiB, with 2 MiB per call) let four callers
/// that stopped reading a streamed answer freeze every other agent's calls on the
/// connection; this way a stalled answer holds only its own window.
fn answer_connection_window(max_calls_per_connection: u32) -> u32 {
    const H2_MAX_WINDOW: u32 = (1 << 31) - 1;
    ANSWER_STREAM_WINDOW
        .saturating_mul(max_calls_per_connection)
        .min(H2_MAX_WINDOW)
}
/// The largest header block (head or trailers) the gateway's HTTP/2 client reads from a
/// backend. Far above what it passes on (`call::MAX_ANSWER_METADATA`), so that an answer
/// between the two ends its own call with a sentence; past four times this, h2 closes the
/// whole connection (its guard against a peer that never stops sending headers).
const MAX_ANSWER_HEADER_LIST: u32 = 1024 * 1024;
/// A backend, as the gateway's TLS client words its failures.
const BACKEND_TLS_PEER: agentgate_transport::TlsPeer = agentgate_transport::TlsPeer {
    name: "the backend",
    truster: "the gateway",
    trust: "set the backend's ca_cert to the CA that signed it",
    server_name: "set the backend's tls_server_name to a name it carries",
    cleartext: "use an http:// URL for a cleartext (h2c) backend",
    renew: "renew it",
};
/// Streams a new connection opens before the backend's SETTINGS say how many it allows.
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Request bytes h2 may hold per call beyond the backend's window.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Callers that waited while a dial failed get that failure instead of dialing again, if it
/// is this recent: a backend that is down costs one connect attempt at a time, not one per
/// waiting call.
const SHARE_DIAL_FAILURE_FOR: Duration = Duration::from_millis(500);

/// Why no connection to the backend could be made. The text never names the address: it
/// reaches callers (the gateway's log line adds the address).
#[derive(Debug, Error, Clone)]
pub enum DialError {
    #[error("cannot resolve its host: {0}")]
    Resolve(String),
    #[error("connection refused or failed: {0}")]
    Connect(String),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(String),
    #[error(
        "it accepted the connection but sent no HTTP/2 answer within connect_timeout; is it a \
         gRPC server, and is it overloaded?"
    )]
    NoHttp2Answer,
}

/// New connections a call tries before it fails: this bounds only a backend that refuses
/// every new connection's first stream (pooled connections found unusable do not count).
const SEND_ATTEMPTS: u32 = 3;

/// A call the backend began to answer: the answer's head, the request body's pump (if the
/// body still streams), and the call's place on its connection.
pub type Answered = (
    http::Response<h2::RecvStream>,
    Option<RequestPump>,
    ConnLease,
);

/// Why a call got no answer.
#[derive(Debug, Error)]
pub enum SendFailure {
    #[error("cannot reach it ({0})")]
    Dial(DialError),
    #[error("the call could not be sent: {}", stream::describe(.0))]
    Refused(h2::Error),
    /// The call went out; its stream failed before the answer began.
    #[error("{}", stream::describe(.0))]
    NoAnswer(h2::Error),
    #[error("the caller's request broke off")]
    CallerGone,
}

/// The request body type every backend call carries: the agent-port server's own.
pub type CallBody = tonic::body::Body;

struct PooledConn {
    sender: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

/// What the pool and a connection's driving task (`drive`) both see.
#[derive(Default)]
struct ConnState {
    /// Calls on the connection now; [`RETIRED`] once `drive` closed it for idleness.
    in_flight: AtomicU32,
    /// Calls ever started on it, so that `drive` can tell a connection that carried calls
    /// since its last look from one that stayed idle.
    started: AtomicU64,
    /// Set when the connection ended, or a call found it unusable (the backend sent GOAWAY):
    /// the pool forgets it on the next lease.
    closed: AtomicBool,
}

/// One call's place on a connection; released when the call's response ends or is dropped.
pub struct ConnLease(Arc<PooledConn>);

impl ConnLease {
    /// No further call is sent on this connection (a call could not open a stream on it).
    fn retire(&self) {
        self.0.state.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for ConnLease {
    fn drop(&mut self) {
        self.0.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where and how to connect.
struct Target {
    /// `host:port`, for dialing and for `:authority`.
    authority: http::uri::Authority,
    scheme: http::uri::Scheme,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

pub struct BackendPool {
    target: Target,
    connect_timeout: Duration,
    keepalive_interval: Duration,
    max_calls_per_connection: u32,
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// Held while a connection is being dialed, so that a burst of calls opens one
    /// connection, not one each.
    dialing: tokio::sync::Mutex<()>,
    last_dial_failure: Mutex<Option<(Instant, DialError)>>,
}

impl BackendPool {
    pub fn new(cfg: &BackendConfig) -> Result<Self, BackendConfigError> {
        let bad_url = || BackendConfigError::BadUrl {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
        };
        let uri: http::Uri = cfg.url.parse().map_err(|_| bad_url())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad_url)?;
        let mut authority = uri.authority().cloned().ok_or_else(bad_url)?;
        let tls = match scheme.as_str() {
            "http" => None,
            "https" => Some(()),
            _ => return Err(bad_url()),
        };
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad_url());
        }
        if authority.port_u16().is_none() {
            let port = if tls.is_some() { 443 } else { 80 };
            authority = format!("{}:{port}", authority.host())
                .parse()
                .map_err(|_| bad_url())?;
        }
        let tls = match tls {
            None => {
                if cfg.ca_cert.is_some() || cfg.tls_server_name.is_some() {
                    return Err(BackendConfigError::Tls {
                        name: cfg.name.clone(),
                        what: "ca_cert and tls_server_name apply to https:// backends only; \
                               this url is http:// (no TLS)"
                            .into(),
                    });
                }
                None
            }
            Some(()) => {
                let tls_err = |what: String| BackendConfigError::Tls {
                    name: cfg.name.clone(),
                    what,
                };
                let verify = match &cfg.ca_cert {
                    Some(path) => ServerVerification::CaFile(path.clone()),
                    None => ServerVerification::SystemRoots,
                };
                let mut client = client_config(&verify).map_err(|e| tls_err(e.to_string()))?;
                client.alpn_protocols = vec![b"h2".to_vec()];
                let host = cfg
                    .tls_server_name
                    .clone()
                    .unwrap_or_else(|| authority.host().trim_matches(['[', ']']).to_string());
                let server_name = ServerName::try_from(host.clone())
                    .map_err(|_| tls_err(format!("{host:?} is not a valid TLS server name")))?;
                Some((TlsConnector::from(Arc::new(client)), server_name))
            }
        };
        Ok(Self {
            target: Target {
                authority,
                scheme,
                tls,
            },
            connect_timeout: cfg.connect_timeout,
            keepalive_interval: cfg.keepalive_interval,
            max_calls_per_connection: cfg.max_calls_per_connection.clamp(1, RETIRED - 1),
            conns: Mutex::new(Vec::new()),
            dialing: tokio::sync::Mutex::new(()),
            last_dial_failure: Mutex::new(None),
        })
    }

    /// `host:port` of the backend, for log lines (never for callers).
    pub fn address(&self) -> &http::uri::Authority {
        &self.target.authority
    }

    pub fn scheme(&self) -> &http::uri::Scheme {
        &self.target.scheme
    }

    /// HTTP/2 connections open now.
    pub fn connections(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|c| !c.state.closed.load(Ordering::Relaxed))
            .count()
    }

    /// Sends `request` on a connection with room for it and waits for the answer's head.
    /// A call goes again, to another connection or the same one, when it was not processed:
    /// - the connection is found unusable (GOAWAY) before the call is sent: it is dropped from
    ///   the pool. Pooled connections found so do not count (each is dropped once, so a
    ///   backend that restarted costs no call); new connections count up to
    ///   [`SEND_ATTEMPTS`];
    /// - the backend refused the call's stream or went away below it, and the call went out
    ///   whole (`stream::Replay`): up to [`SEND_ATTEMPTS`] times. A backend that restarts
    ///   (grpc-go's GracefulStop, say) costs no call.
    pub async fn send(
        &self,
        mut request: http::Request<CallBody>,
    ) -> Result<Answered, SendFailure> {
        let mut dialed = 0;
        let mut resent = 0;
        loop {
            let (mut sender, lease, new) = self.lease().await.map_err(SendFailure::Dial)?;
            dialed += u32::from(new);
            match stream::send(&mut sender, request).await {
                Ok(sending) => match stream::answer_head(sending.answer, sending.pump).await {
                    Ok((head, pump)) => return Ok((head, pump, lease)),
                    Err(e) => match sending.replay {
                        Some(replay) if stream::never_processed(&e) && resent < SEND_ATTEMPTS => {
                            if e.is_go_away() {
                                lease.retire();
                            }
                            resent += 1;
                            request = replay.request();
                        }
                        _ => return Err(SendFailure::NoAnswer(e)),
                    },
                },
                Err(SendError::Unusable(e, back)) => {
                    lease.retire();
                    if dialed >= SEND_ATTEMPTS {
                        return Err(SendFailure::Refused(e));
                    }
                    request = *back;
                }
                Err(SendError::Refused(e)) => {
                    lease.retire();
                    return Err(SendFailure::Refused(e));
                }
                Err(SendError::CallerGone) => return Err(SendFailure::CallerGone),
            }
        }
    }

    /// A connection with room for one more call, dialed if none has room (then `true`).
    async fn lease(&self) -> Result<(SendRequest<Bytes>, ConnLease, bool), DialError> {
        if let Some((sender, lease)) = self.take_room() {
            return Ok((sender, lease, false));
        }
        let asked = Instant::now();
        let _dialing = self.dialing.lock().await;
        if let Some((sender, lease)) = self.take_room() {
            return Ok((sender, lease, false));
        }
        if let Some((at, e)) = &*self.last_dial_failure.lock().unwrap() {
            if *at >= asked || at.elapsed() < SHARE_DIAL_FAILURE_FOR {
                return Err(e.clone());
            }
        }
        match self.dial().await {
            Ok((sender, state)) => {
                let conn = Arc::new(PooledConn {
                    sender: sender.clone(),
                    state,
                });
                self.conns.lock().unwrap().push(conn.clone());
                *self.last_dial_failure.lock().unwrap() = None;
                Ok((sender, ConnLease(conn), true))
            }
            Err(e) => {
                *self.last_dial_failure.lock().unwrap() = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The least busy open connection below the per-connection cap, with its count raised.
    /// Closed connections are forgotten on the way.
    fn take_room(&self) -> Option<(SendRequest<Bytes>, ConnLease)> {
        let max = self.max_calls_per_connection;
        let mut conns = self.conns.lock().unwrap();
        loop {
            conns.retain(|c| !c.state.closed.load(Ordering::Relaxed));
            let conn = conns
                .iter()
                .filter(|c| c.state.in_flight.load(Ordering::Relaxed) < max)
                .min_by_key(|c| c.state.in_flight.load(Ordering::Relaxed))?
                .clone();
            // `drive` may have closed it for idleness since the look above; then it is
            // marked closed, and the next round looks again without it.
            let taken =
                conn.state
                    .in_flight
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n < max).then_some(n + 1)
                    });
            if let Err(n) = taken {
                if n == RETIRED {
                    conn.state.closed.store(true, Ordering::Relaxed);
                }
                continue;
            }
            conn.state.started.fetch_add(1, Ordering::Relaxed);
            return Some((conn.sender.clone(), ConnLease(conn)));
        }
    }

    async fn dial(&self) -> Result<Dialed, DialError> {
        let timeout = self.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.dial_inner(deadline)).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout(timeout)),
        }
    }

    fn handshake_settings(&self) -> HandshakeSettings {
        HandshakeSettings {
            address: self.target.authority.clone(),
            keepalive_interval: self.keepalive_interval,
            max_calls_per_connection: self.max_calls_per_connection,
        }
    }

    /// Everything a dial does, the HTTP/2 handshake done by `deadline` (`dial` bounds the rest).
    async fn dial_inner(&self, deadline: tokio::time::Instant) -> Result<Dialed, DialError> {
        let t = &self.target;
        let port = t.authority.port_u16().unwrap_or(80);
        let host = t.authority.host().trim_matches(['[', ']']);
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| DialError::Resolve(e.to_string()))?
            .collect();
        let mut last = DialError::Resolve("no addresses".into());
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    agentgate_transport::set_nodelay(&tcp);
                    set_tcp_keepalive(&tcp);
                    return match &t.tls {
                        None => handshake(tcp, self.handshake_settings(), deadline).await,
                        Some((connector, name)) => {
                            let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                                DialError::Tls(agentgate_transport::explain_tls_failure(
                                    &e,
                                    &BACKEND_TLS_PEER,
                                ))
                            })?;
                            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                                return Err(DialError::Tls(
                                    "the backend did not agree to HTTP/2 (ALPN h2); a gRPC \
                                     server over TLS must"
                                        .into(),
                                ));
                            }
                            handshake(tls, self.handshake_settings(), deadline).await
                        }
                    };
                }
                Err(e) => last = DialError::Connect(e.to_string()),
            }
        }
        Err(last)
    }
}

/// TCP keepalive on a backend connection: a backend host that vanished without a FIN is
/// noticed within about [`TCP_KEEPALIVE_IDLE`] + 3 x [`TCP_KEEPALIVE_INTERVAL`] even on a
/// connection whose calls are silent long polls, without the HTTP/2 PINGs that gRPC servers
/// limit to one per 5 minutes (`drive`).
fn set_tcp_keepalive(tcp: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on a backend connection");
    }
}

/// What a new connection's handshake and driving task need to know of their backend.
struct HandshakeSettings {
    address: http::uri::Authority,
    keepalive_interval: Duration,
    max_calls_per_connection: u32,
}

/// A new connection's request handle, and the state its driving task shares.
type Dialed = (SendRequest<Bytes>, Arc<ConnState>);

/// The HTTP/2 handshake. h2's own ends once our preface is written, so a first PING is sent
/// too and its answer awaited until `deadline`: a server answers it only after its SETTINGS,
/// so a socket that accepts and stays silent (a frozen backend, or not an HTTP/2 server) fails
/// the dial instead of holding every call sent on it until the call's deadline. gRPC servers
/// do not count a first PING against their PING policy (see `drive`).
async fn handshake<IO>(
    io: IO,
    settings: HandshakeSettings,
    deadline: tokio::time::Instant,
) -> Result<Dialed, DialError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let HandshakeSettings {
        address,
        keepalive_interval,
        max_calls_per_connection,
    } = settings;
    let (sender, conn) = h2::client::Builder::new()
        // Until the backend's SETTINGS arrive, open no more streams than servers commonly
        // allow; h2's default is unlimited, and a burst of calls on a new connection would
        // then meet REFUSED_STREAM from a backend with a lower limit.
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(ANSWER_STREAM_WINDOW)
        .initial_connection_window_size(answer_connection_window(max_calls_per_connection))
        .max_header_list_size(MAX_ANSWER_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake(io)
        .await
        .map_err(|e| DialError::Http2(e.to_string()))?;
    // The dialing call holds the first place: counted before `drive` first looks.
    let state = Arc::new(ConnState {
        in_flight: AtomicU32::new(1),
        started: AtomicU64::new(1),
        closed: AtomicBool::new(false),
    });
    let (answered_tx, answered) = tokio::sync::oneshot::channel();
    tokio::spawn(drive(
        conn,
        address,
        keepalive_interval,
        state.clone(),
        answered_tx,
    ));
    match tokio::time::timeout_at(deadline, answered).await {
        Ok(Ok(Ok(()))) => Ok((sender, state)),
        Ok(Ok(Err(why))) => Err(DialError::Http2(why)),
        Ok(Err(_)) => Err(DialError::Http2("the connection ended".into())),
        Err(_) => Err(DialError::NoHttp2Answer),
    }
}

/// Runs one backend connection until it ends. Every `keepalive_interval` it looks at the
/// connection's calls:
/// - calls in flight: a PING, and a backend that does not answer within
///   [`BACKEND_KEEPALIVE_TIMEOUT`] loses the connection (its calls fail with UNAVAILABLE);
/// - no call in flight and none started since the last look: the connection is closed, and
///   the next call dials a new one.
///
/// An idle connection is closed rather than PINGed because gRPC servers count PINGs on a
/// connection without calls as abuse (grpc-go, grpc-java and gRPC C-core close it with
/// `ENHANCE_YOUR_CALM` "too_many_pings" after the third), and the same servers allow one
/// PING per 5 minutes on a connection with calls: hence the 5-minute default.
async fn drive<IO>(
    mut conn: h2::client::Connection<IO, Bytes>,
    address: http::uri::Authority,
    keepalive_interval: Duration,
    state: Arc<ConnState>,
    answered: tokio::sync::oneshot::Sender<Result<(), String>>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut pings = conn.ping_pong();
    if !greet(&mut conn, pings.as_mut(), answered).await {
        state.closed.store(true, Ordering::Relaxed);
        return;
    }
    let watch = state.clone();
    let keepalive = async move {
        let (Some(mut pings), false) = (pings, keepalive_interval.is_zero()) else {
            return std::future::pending().await;
        };
        let mut started_before = watch.started.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(keepalive_interval).await;
            let started = watch.started.load(Ordering::Relaxed);
            let idle = started == started_before;
            started_before = started;
            if idle
                && watch
                    .in_flight
                    .compare_exchange(0, RETIRED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return None;
            }
            if watch.in_flight.load(Ordering::Relaxed) == 0 {
                continue;
            }
            match tokio::time::timeout(BACKEND_KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque()))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Some(stream::describe(&e)),
                Err(_) => {
                    return Some(format!(
                        "no PING answer within {BACKEND_KEEPALIVE_TIMEOUT:?}"
                    ));
                }
            }
        }
    };
    tokio::select! {
        ended = &mut conn => {
            if let Err(e) = ended {
                tracing::debug!(%address, error = %e, "backend connection ended");
            }
        }
        why = keepalive => match why {
            None => tracing::debug!(%address, "backend connection idle; closed"),
            Some(why) => tracing::warn!(%address, "backend connection closed: {why}"),
        },
    }
    state.closed.store(true, Ordering::Relaxed);
}

/// The first PING of `handshake`, answered on `answered`; false when the connection is no use
/// (it ended, or the dialer stopped waiting).
async fn greet<IO>(
    conn: &mut h2::client::Connection<IO, Bytes>,
    pings: Option<&mut h2::PingPong>,
    answered: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> bool
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(pings) = pings else {
        return answered.send(Ok(())).is_ok();
    };
    let mut answered = answered;
    // Before its first answer, a connection h2 gives up itself got bytes that are not
    // HTTP/2 at all (an HTTP/1.1 server's "400 Bad Request", read as a frame).
    // An HTTP/1.1 server may also close at once after its answer, so that the reset comes
    // before the bytes are read: the same hint then.
    let first_failure = |e: h2::Error| {
        if e.is_go_away() && !e.is_remote() {
            "the backend did not answer in HTTP/2 (an HTTP/1.1 server?); a gRPC backend \
             serves HTTP/2: h2c behind an http:// URL, TLS with ALPN h2 behind https://"
                .to_string()
        } else if e.is_io() {
            "the connection broke before the backend answered in HTTP/2 (an HTTP/1.1 server? \
             one that closes new connections?); a gRPC backend serves HTTP/2: h2c behind an \
             http:// URL, TLS with ALPN h2 behind https://"
                .to_string()
        } else {
            stream::describe(&e)
        }
    };
    let outcome = tokio::select! {
        pong = pings.ping(h2::Ping::opaque()) => pong.map(drop).map_err(first_failure),
        ended = &mut *conn => Err(match ended {
            Ok(()) => "the backend closed the connection".to_string(),
            Err(e) => first_failure(e),
        }),
        () = answered.closed() => return false,
    };
    let usable = outcome.is_ok();
    answered.send(outcome).is_ok() && usable
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_stream::StreamExt;

    /// An HTTP/2 server that answers every request with headers and then a body that never
    /// ends (a long poll), until the test ends. Notifying `leave` makes every connection open
    /// at that moment shut down gracefully (GOAWAY, calls in flight go on).
    async fn long_poll_server(leave: Arc<tokio::sync::Notify>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let leave = leave.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        let body =
                            http_body_util::StreamBody::new(futures_util::stream::pending::<
                                Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
                            >());
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = leave.notified() => conn.as_mut().graceful_shutdown(),
                    }
                    let _ = conn.await;
                });
            }
        });
        addr
    }

    /// An HTTP/2 server that echoes each request DATA frame as it arrives, and reports on
    /// `ended` how the request body ended: `true` cleanly, `false` reset.
    async fn echo_server(ended: tokio::sync::mpsc::UnboundedSender<bool>) -> std::net::SocketAddr {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let ended = ended.clone();
                async move {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        loop {
                            match body.frame().await {
                                Some(Ok(f)) => {
                                    if let Ok(data) = f.into_data() {
                                        let _ = tx.send(Ok(http_body::Frame::data(data)));
                                    }
                                }
                                Some(Err(_)) => break ended.send(false),
                                None => break ended.send(true),
                            }
                        }
                    });
                    let body = http_body_util::StreamBody::new(
                        tokio_stream::wrappers::UnboundedReceiverStream::<
                            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
                        >::new(rx),
                    );
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        addr
    }

    use hyper::body::Incoming;

    fn pool(url: String, per_connection: u32) -> BackendPool {
        pool_with(
            url,
            per_connection,
            BackendConfig::default().keepalive_interval,
        )
    }

    fn pool_with(url: String, per_connection: u32, keepalive_interval: Duration) -> BackendPool {
        BackendPool::new(&BackendConfig {
            name: "t".into(),
            services: vec!["t.".into()],
            url,
            max_calls_per_connection: per_connection,
            connect_timeout: Duration::from_secs(2),
            keepalive_interval,
            ..BackendConfig::default()
        })
        .unwrap()
    }

    async fn open_call(pool: &BackendPool) -> (http::Response<h2::RecvStream>, ConnLease) {
        let req = http::Request::post(format!("http://{}/t.S/M", pool.address()))
            .body(CallBody::empty())
            .unwrap();
        let Ok((answer, None, lease)) = pool.send(req).await else {
            panic!("an empty body goes with the head");
        };
        (answer, lease)
    }

    #[tokio::test]
    async fn a_backend_that_accepts_and_stays_silent_fails_the_dial_within_connect_timeout() {
        // The kernel completes the TCP handshake for the listener's backlog; nothing answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = BackendPool::new(&BackendConfig {
            name: "silent".into(),
            services: vec!["t.".into()],
            url: format!("http://{}", listener.local_addr().unwrap()),
            connect_timeout: Duration::from_millis(300),
            ..BackendConfig::default()
        })
        .unwrap();
        let req = http::Request::post(format!("http://{}/t.S/M", pool.address()))
            .body(CallBody::empty())
            .unwrap();
        let started = Instant::now();
        let failed = tokio::time::timeout(Duration::from_secs(5), pool.send(req))
            .await
            .expect("the dial is bounded by connect_timeout");
        assert!(
            matches!(failed, Err(SendFailure::Dial(DialError::NoHttp2Answer))),
            "{:?}",
            failed.err()
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            pool.connections(),
            0,
            "nothing kept of the silent connection"
        );
    }

    #[tokio::test]
    async fn a_full_connection_makes_the_pool_open_another_and_a_freed_place_is_reused() {
        let addr = long_poll_server(Default::default()).await;
        let pool = pool(format!("http://{addr}"), 2);
        let a = open_call(&pool).await;
        let b = open_call(&pool).await;
        assert_eq!(pool.connections(), 1, "two calls fit on one connection");
        let c = open_call(&pool).await;
        assert_eq!(
            pool.connections(),
            2,
            "the third call needs a second connection"
        );
        drop(a);
        let d = open_call(&pool).await;
        assert_eq!(
            pool.connections(),
            2,
            "a freed place is taken before dialing again"
        );
        for (resp, _) in [b, c, d] {
            assert!(!resp.body().is_end_stream());
        }
    }

    #[tokio::test]
    async fn a_refused_dial_says_so_without_the_address_and_is_shared_by_those_waiting() {
        // A port that was free a moment ago: nothing listens there.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = pool(format!("http://{addr}"), 100);
        let started = Instant::now();
        let results = futures_util::future::join_all((0..20).map(|_| pool.lease())).await;
        for r in &results {
            let e = r.as_ref().err().expect("nothing listens");
            let text = e.to_string();
            assert!(text.contains("refused"), "{text}");
            assert!(!text.contains(&addr.port().to_string()), "{text}");
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(pool.connections(), 0);
    }

    #[tokio::test]
    async fn a_connection_the_backend_leaves_is_dropped_and_the_next_call_goes_to_a_new_one() {
        let leave = Arc::new(tokio::sync::Notify::new());
        let addr = long_poll_server(leave.clone()).await;
        let pool = pool(format!("http://{addr}"), 100);
        let (first, _lease) = open_call(&pool).await;
        leave.notify_waiters();
        // The GOAWAY reaches the gateway's side of the connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (second, _lease2) = tokio::time::timeout(Duration::from_secs(5), open_call(&pool))
            .await
            .expect("the second call is answered on a new connection");
        assert_eq!(
            pool.connections(),
            1,
            "the connection left behind is forgotten"
        );
        assert!(!first.body().is_end_stream(), "the call in flight goes on");
        assert!(!second.body().is_end_stream());
    }

    #[tokio::test]
    async fn a_request_streams_on_after_the_answer_began_and_stops_when_the_answer_is_dropped() {
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        let addr = echo_server(ended_tx).await;
        let pool = pool(format!("http://{addr}"), 100);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let body = http_body_util::StreamBody::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                .map(|b| Ok::<_, tonic::Status>(http_body::Frame::data(b))),
        );
        let req = http::Request::post(format!("http://{addr}/t.S/M"))
            .body(CallBody::new(body))
            .unwrap();
        // The pump runs while the head is awaited, and comes back with it.
        let Ok((head, pump, _lease)) = pool.send(req).await else {
            panic!("the call is sent");
        };
        let stop = pump.expect("the body is still open").spawn();
        let mut answer_body = head.into_body();
        for message in ["one", "two", "three"] {
            tx.send(Bytes::from(message)).unwrap();
            let mut got = Vec::new();
            while got.len() < message.len() {
                let frame = tokio::time::timeout(
                    Duration::from_secs(5),
                    std::future::poll_fn(|cx| stream::poll_answer_frame(&mut answer_body, cx)),
                )
                .await
                .expect("the echo arrives")
                .expect("the answer goes on")
                .unwrap();
                got.extend_from_slice(&frame.into_data().unwrap());
            }
            assert_eq!(got, message.as_bytes());
        }
        drop(answer_body);
        drop(stop);
        let clean = tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("the backend sees the request end once the answer is dropped")
            .unwrap();
        assert!(!clean, "the request is reset, not ended as if complete");
        drop(tx);
    }

    /// An HTTP/2 server (h2's own) that refuses the first `refuse` streams it gets with
    /// REFUSED_STREAM and answers each later one with its request body; `seen` counts streams.
    async fn refusing_server(refuse: usize, seen: Arc<AtomicU32>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                if (seen.fetch_add(1, Ordering::SeqCst) as usize) < refuse {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut got = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        got.extend_from_slice(&chunk);
                    }
                    let mut out = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    out.send_data(Bytes::from(got), true).unwrap();
                });
            }
        });
        addr
    }

    async fn call_with_message(pool: &BackendPool, message: &'static str) -> Result<Bytes, String> {
        let req = http::Request::post(format!("http://{}/t.S/M", pool.address()))
            .body(CallBody::new(http_body_util::Full::new(Bytes::from(
                message,
            ))))
            .unwrap();
        let (head, _, _lease) = pool.send(req).await.map_err(|e| e.to_string())?;
        let mut body = head.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        Ok(Bytes::from(got))
    }

    #[tokio::test]
    async fn a_refused_stream_is_sent_again_with_its_message_up_to_the_attempts() {
        let seen = Arc::new(AtomicU32::new(0));
        let addr = refusing_server(2, seen.clone()).await;
        let patient = pool(format!("http://{addr}"), 100);
        let got = call_with_message(&patient, "the job, please")
            .await
            .unwrap();
        assert_eq!(got, "the job, please", "the message went again, whole");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            3,
            "two refusals, then the answer"
        );
        assert_eq!(
            patient.connections(),
            1,
            "a refusal does not retire the connection"
        );

        let seen = Arc::new(AtomicU32::new(0));
        let addr = refusing_server(100, seen.clone()).await;
        let refused = pool(format!("http://{addr}"), 100);
        let failed = call_with_message(&refused, "x").await.unwrap_err();
        assert!(failed.contains("refused stream"), "{failed}");
        assert_eq!(seen.load(Ordering::SeqCst), 1 + SEND_ATTEMPTS);
    }

    #[tokio::test]
    async fn a_connection_with_calls_is_kept_and_one_left_idle_is_closed() {
        let addr = long_poll_server(Default::default()).await;
        let tick = Duration::from_millis(150);
        let pool = pool_with(format!("http://{addr}"), 100, tick);
        let (call, lease) = open_call(&pool).await;
        // Several looks with a call in flight: PINGed, answered, kept.
        tokio::time::sleep(tick * 5).await;
        assert_eq!(
            pool.connections(),
            1,
            "a connection carrying a call stays open"
        );
        assert!(!call.body().is_end_stream(), "the call goes on");
        drop((call, lease));
        // The first look after the call sees it started since the last; the next closes it.
        tokio::time::sleep(tick * 4).await;
        assert_eq!(pool.connections(), 0, "an idle connection is closed");
        let (again, _lease) = tokio::time::timeout(Duration::from_secs(5), open_call(&pool))
            .await
            .expect("the next call dials a new connection");
        assert!(!again.body().is_end_stream());
        assert_eq!(pool.connections(), 1);
    }
}
