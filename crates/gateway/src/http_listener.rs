//! One accept-and-serve loop for the gateway's HTTP listeners: the tunnel API, admin, and the
//! internal API between replicas. HTTP/1.1 and HTTP/2 (h2c or TLS) on each.
//!
//! Every listener gets the same protections, each a named setting: a cap on open connections,
//! a cap per source address on connections that have not begun a request (once the listener
//! is half full), a deadline for the
//! TLS handshake, a deadline for the first request (and for each request's headers), and an
//! idle timeout that closes a connection with no request in flight since the last one ended
//! (frames that carry no request, PINGs or WINDOW_UPDATEs, do not hold it open). Each
//! refusal is counted in `agentgate_http_connections_refused_total` and logged within the
//! shared pre-authentication log budget.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agentgate_transport::PRE_AUTH_LOG;

use crate::guarded_body::GuardedBody;
use crate::metrics::Metrics;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Why an HTTP listener refused or cut a connection before its first request (the `reason`
/// label of `agentgate_http_connections_refused_total`).
pub const REFUSAL_REASONS: [&str; 11] = [
    "over_limit",
    "source_over_limit",
    "tls",
    "proxy_header",
    "no_request",
    "malformed_request",
    "too_many_pings",
    "too_many_settings",
    "too_many_control_frames",
    "http2_flood",
    "http2_protocol_error",
];

/// The listeners' names (the `listener` label).
pub const LISTENERS: [&str; 3] = ["api", "admin", "internal"];

/// Limits and deadlines of one HTTP listener.
#[derive(Clone)]
pub struct HttpListenerSettings {
    /// For logs and metrics: one of [`LISTENERS`].
    pub name: &'static str,
    pub max_connections: usize,
    /// Connections from one source address that have not begun a request yet
    /// (`max_handshakes_per_source`), enforced once half of `max_connections` is taken: one
    /// address cannot fill the listener with silent sockets.
    pub max_waiting_per_source: usize,
    pub handshake_timeout: Duration,
    /// For each request's headers, and for the first request to begin at all.
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Whether bytes moving (PINGs) keep a connection with no request open past
    /// `idle_timeout`. Only between replicas: their clients PING every second to find a hung
    /// peer and reuse pooled connections, which must not be closed under them. Elsewhere only
    /// requests count, or one PRIORITY frame every few seconds holds a place for ever.
    pub idle_counts_bytes: bool,
    /// HTTP/2 windows (the internal API streams tunnelled bodies between replicas).
    pub http2_stream_window: u32,
    pub http2_connection_window: u32,
    /// After shutdown starts, how long open requests may take.
    pub shutdown_grace: Duration,
    /// HTTP/2 clients' PINGs closer than this (with nothing sent back between) close the
    /// connection, as on the agent port; SETTINGS floods too. `None`: no policy (the internal
    /// listener: replicas PING each other every second to find a hung peer, and every caller
    /// there is a signed replica).
    pub min_client_ping_interval: Option<Duration>,
    /// Balancers whose connections start with a PROXY protocol header naming the caller
    /// (`proxy_protocol_from`; the API listener only). Empty: none is read.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    pub metrics: Arc<Metrics>,
}

/// The PING policy's minimum interval on the tunnel API and admin listeners. Far below the
/// agent port's `min_client_ping_interval` (20 s): a tunnel API client (grpc-go with a
/// keepalive of its own, say) is not held to the agents' rule; this only stops floods (one
/// client had 36 million PINGs answered in 10 s).
const MIN_CLIENT_PING_INTERVAL: Duration = Duration::from_secs(1);

impl HttpListenerSettings {
    /// The settings of the listener `name` from the gateway's configuration, with no PROXY
    /// header read (the API listener sets its balancers itself).
    pub fn from_config(
        name: &'static str,
        max_connections: usize,
        c: &crate::GatewayConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name,
            max_connections,
            max_waiting_per_source: c.max_handshakes_per_source,
            handshake_timeout: c.handshake_timeout,
            header_read_timeout: c.http_header_read_timeout,
            idle_timeout: c.http_idle_timeout,
            idle_counts_bytes: name == "internal",
            http2_stream_window: c.http2_stream_window,
            http2_connection_window: c.http2_connection_window,
            shutdown_grace: c.shutdown_grace,
            min_client_ping_interval: (name != "internal").then_some(MIN_CLIENT_PING_INTERVAL),
            proxy_protocol_from: Vec::new(),
            metrics,
        }
    }

    /// Counts a refusal and logs it within the shared budget (the client has shown no
    /// credentials yet, so its lines must not be unbounded).
    fn refused(&self, reason: &'static str, peer: SocketAddr, why: &str) {
        self.metrics
            .http_connections_refused
            .inc(&[self.name, reason]);
        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
            tracing::warn!(listener = %self.name, %peer, reason = %reason, suppressed, "connection refused: {why}");
        }
    }
}

/// Whether a connection ended because its bytes were not an HTTP request hyper could parse.
/// Headers an HTTP/1.1 request may carry (hyper's default is 100; HTTP/2 requests with more
/// passed, so the two protocols disagreed).
const HTTP1_MAX_HEADERS: usize = 256;

fn is_parse_error(e: &(dyn std::error::Error + 'static)) -> bool {
    agentgate_transport::error_chain::find::<hyper::Error>(e)
        .is_some_and(|h| h.is_parse() || h.is_parse_too_large())
}

/// Connections per source address that have not begun a request.
#[derive(Default)]
struct WaitingSources {
    /// Entries exist only while their address has such a connection: bounded by
    /// `max_connections`.
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl WaitingSources {
    /// A place for one more connection from `ip`; `None` when the address has `max` already
    /// and `enforce` is set.
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize, enforce: bool) -> Option<WaitingSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up before inserting: a refused address leaves no entry behind.
        if enforce && counts.get(&ip).copied().unwrap_or(0) >= max {
            return None;
        }
        *counts.entry(ip).or_default() += 1;
        Some(WaitingSlot {
            sources: self.clone(),
            ip,
        })
    }
}

/// One connection's place among its address's connections without a request; released when
/// its first request begins, or when it closes.
struct WaitingSlot {
    sources: Arc<WaitingSources>,
    ip: IpAddr,
}

impl Drop for WaitingSlot {
    fn drop(&mut self) {
        let mut counts = self
            .sources
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Serves `listener` until `stop`, then lets open requests finish within the grace period.
/// `make_service(peer)` builds the service for one connection.
pub async fn serve_http<F, S, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    settings: HttpListenerSettings,
    make_service: F,
    stop: CancellationToken,
) where
    F: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: tower_service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let waiting = Arc::new(WaitingSources::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let settings = Arc::new(settings);
    let make_service = Arc::new(make_service);
    while let Some((mut stream, peer)) =
        agentgate_transport::accept_until(&listener, &stop, settings.name).await
    {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            settings.refused(
                "over_limit",
                peer,
                &format!(
                    "this listener has {} connections open, its maximum",
                    settings.max_connections
                ),
            );
            continue;
        };
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let make_service = make_service.clone();
        let waiting = waiting.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let _slot = slot;
            use agentgate_transport::proxy_header::{from_balancer, read_proxy_header_within};
            let peer = if from_balancer(&settings.proxy_protocol_from, peer.ip()) {
                match read_proxy_header_within(&mut stream, settings.handshake_timeout).await {
                    Ok(client) => client.unwrap_or(peer),
                    Err(e) => {
                        let why = format!("from a proxy_protocol_from address: {e}");
                        return settings.refused("proxy_header", peer, &why);
                    }
                }
            } else {
                peer
            };
            // Enforced only once the listener is half full: a client that opens hundreds of
            // connections at once from one host (a CI system calling agents in parallel) is
            // not refused while there is room for everyone.
            let crowded = slots.available_permits() < settings.max_connections / 2;
            let Some(waiting) = waiting.admit(peer.ip(), settings.max_waiting_per_source, crowded)
            else {
                let why = format!(
                    "this address already has {} connections that have not begun a request \
                     (max_handshakes_per_source)",
                    settings.max_waiting_per_source
                );
                return settings.refused("source_over_limit", peer, &why);
            };
            let activity = Arc::new(Activity {
                waiting: Mutex::new(Some(waiting)),
                ..Activity::default()
            });
            let svc = CountInFlight {
                inner: make_service(peer),
                activity: activity.clone(),
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .max_headers(HTTP1_MAX_HEADERS)
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .initial_stream_window_size(settings.http2_stream_window)
                .initial_connection_window_size(settings.http2_connection_window);
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let limits = IdleLimits {
                idle: settings.idle_timeout,
                first_request: settings.header_read_timeout,
                min_ping_interval: settings.min_client_ping_interval,
                counts_bytes: settings.idle_counts_bytes,
            };
            let result = match acceptor {
                None => {
                    let io = IdleIo::new(stream, activity.clone(), limits);
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), svc).into_owned())
                        .await
                }
                Some(acceptor) => {
                    let deadline = settings.handshake_timeout;
                    let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            let why = agentgate_transport::tls::describe_handshake_failure(&e);
                            return settings.refused("tls", peer, &why);
                        }
                        Err(_) => {
                            let why = format!("TLS handshake not finished within {deadline:?}");
                            return settings.refused("tls", peer, &why);
                        }
                    };
                    let io = IdleIo::new(tls, activity.clone(), limits);
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), svc).into_owned())
                        .await
                }
            };
            let flood = *activity.flood.lock().unwrap_or_else(|e| e.into_inner());
            let goaway_error = activity
                .goaway_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some((reason, why)) = flood {
                settings.refused(reason, peer, why);
            } else if let Some((code, debug)) = goaway_error {
                let (reason, why) = agentgate_transport::goaway_error_refusal(code, &debug);
                settings.refused(reason.as_str(), peer, &why);
            } else if activity.no_request.load(Ordering::Relaxed) {
                let why = if activity.is_http2_client() {
                    format!(
                        "no request began within {:?} of the HTTP/2 connection's set-up \
                         (http_idle_timeout)",
                        settings.idle_timeout.max(settings.header_read_timeout)
                    )
                } else {
                    format!(
                        "no request began within {:?} (http_header_read_timeout)",
                        settings.header_read_timeout
                    )
                };
                settings.refused("no_request", peer, &why);
            } else if let Err(e) = result {
                if is_parse_error(e.as_ref()) {
                    // hyper has answered 400 or 431 (HTTP/1.1) or closed (HTTP/2), without a
                    // word.
                    let too_large =
                        agentgate_transport::error_chain::find::<hyper::Error>(e.as_ref())
                            .is_some_and(hyper::Error::is_parse_too_large);
                    let why = if too_large {
                        format!(
                            "the request's head was over the limit (more than \
                             {HTTP1_MAX_HEADERS} headers, or over 400 KiB); it got 431"
                        )
                    } else {
                        format!(
                            "the request was not valid HTTP ({}); this port serves HTTP/1.1 \
                             and HTTP/2 requests",
                            agentgate_transport::error_chain::describe(e.as_ref())
                        )
                    };
                    settings.refused("malformed_request", peer, &why);
                } else {
                    tracing::debug!(listener = settings.name, error = %e, %peer, "connection ended with error");
                }
            }
        });
    }
    // Closed now, not when the grace is over: a new connection is refused at once (a proxy
    // then tries another replica) instead of waiting unanswered in the backlog.
    drop(listener);
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = settings.name,
            grace = ?settings.shutdown_grace,
            "requests still open after the shutdown grace period"
        );
    }
}

/// What the idle timeout looks at: requests in flight on the connection, and when the last
/// one began or ended. Bytes alone do not count: a client that keeps a connection busy with
/// frames that carry no request (one PRIORITY frame every few seconds) held a place on the
/// listener for ever, and 4,096 of them filled the tunnel API.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Option<Instant>>,
    /// Whether a request has begun on the connection.
    started: AtomicBool,
    /// The connection's place among its address's connections without a request.
    waiting: Mutex<Option<WaitingSlot>>,
    /// Set when the connection was closed for beginning no request in time.
    no_request: AtomicBool,
    /// Set (reason, sentence) when the connection was closed for a flood of HTTP/2 control
    /// frames.
    flood: Mutex<Option<(&'static str, &'static str)>>,
    /// The error code and debug text of a GOAWAY with an error that the HTTP/2 server sent
    /// (a flood it caught itself, or a protocol error by the client), once the connection is
    /// over: hyper says nothing of it.
    goaway_error: Mutex<Option<(u32, String)>>,
    /// Bytes of the HTTP/2 client preface the connection began with, so far; at its whole
    /// length the client is an HTTP/2 client that may connect ahead of its first call
    /// (tonic's `Endpoint::connect`, grpc-go's `WithBlock`), and only the idle timeout applies.
    preface_seen: AtomicUsize,
}

impl Activity {
    fn is_http2_client(&self) -> bool {
        self.preface_seen.load(Ordering::Relaxed) == agentgate_transport::HTTP2_PREFACE.len()
    }

    /// Follows the first bytes read against the HTTP/2 preface.
    fn saw(&self, bytes: &[u8]) {
        let preface = agentgate_transport::HTTP2_PREFACE;
        let seen = self.preface_seen.load(Ordering::Relaxed);
        if seen >= preface.len() || seen == usize::MAX {
            return;
        }
        let n = bytes.len().min(preface.len() - seen);
        let next = if bytes[..n] == preface[seen..seen + n] {
            seen + n
        } else {
            usize::MAX // not HTTP/2 with prior knowledge
        };
        self.preface_seen.store(next, Ordering::Relaxed);
    }
}

impl Activity {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
}

/// Counts the connection's requests in flight, until each response body is done.
#[derive(Clone)]
struct CountInFlight<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// Ends one request's share of `in_flight` when dropped (with its response body).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl<S, R, B> tower_service::Service<R> for CountInFlight<S>
where
    S: tower_service::Service<R, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<GuardedBody<B, InFlight>>;
    type Error = S::Error;
    type Future = CountedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        self.activity.touch();
        if !self.activity.started.swap(true, Ordering::Relaxed) {
            drop(
                self.activity
                    .waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(),
            );
        }
        CountedResponse {
            inner: self.inner.call(req),
            guard: Some(InFlight(self.activity.clone())),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's response, its body holding the request's [`InFlight`]. A future of
    /// its own rather than a boxed `async` block: one allocation fewer per request.
    pub struct CountedResponse<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for CountedResponse<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<GuardedBody<B, InFlight>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let guard = this
            .guard
            .take()
            .expect("a CountedResponse is not polled after it is ready");
        Poll::Ready(Ok(resp.map(|inner| GuardedBody::new(inner, guard))))
    }
}

/// The deadlines [`IdleIo`] keeps.
#[derive(Clone, Copy)]
struct IdleLimits {
    /// No request in flight for this long since the last one began or ended: closed.
    idle: Duration,
    /// No request begun this long after the connection was set up (TLS included): closed,
    /// whether or not bytes trickle in; for a client that sent the whole HTTP/2 preface (it
    /// may connect ahead of its first call), the idle timeout after set-up instead. Silent or
    /// slow sockets cannot hold a place longer.
    first_request: Duration,
    /// `min_client_ping_interval` for HTTP/2 connections, if any.
    min_ping_interval: Option<Duration>,
    /// `idle_counts_bytes`.
    counts_bytes: bool,
}

/// Closes the connection once it has had no request in flight for `idle` since its last
/// request began or ended, or once it has begun no request within `first_request`.
struct IdleIo<T> {
    io: T,
    activity: Arc<Activity>,
    idle: Duration,
    first_request_by: tokio::time::Instant,
    /// The same for a client that sent the whole HTTP/2 preface (it may connect ahead of its
    /// first call): the idle timeout after the connection was set up, bytes or not, so that
    /// PINGs alone cannot hold a place for ever.
    http2_first_request_by: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// `idle_counts_bytes`: bytes in either direction count as activity.
    counts_bytes: bool,
    /// The PING, SETTINGS and control-frame policy of an HTTP/2 connection (dropped once the
    /// first bytes show HTTP/1.1): hyper answers every PING and SETTINGS frame and reads every
    /// other frame, as fast as they come.
    frames: Option<agentgate_transport::PingPolicy>,
}

impl<T> Drop for IdleIo<T> {
    fn drop(&mut self) {
        let sent = self.frames.as_ref().and_then(|f| f.goaway_sent());
        if let Some(goaway) = sent.filter(|(code, _)| *code != 0) {
            *self
                .activity
                .goaway_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(goaway);
        }
    }
}

impl<T> IdleIo<T> {
    fn new(io: T, activity: Arc<Activity>, limits: IdleLimits) -> Self {
        activity.touch();
        let now = tokio::time::Instant::now();
        Self {
            io,
            activity,
            idle: limits.idle,
            first_request_by: now + limits.first_request,
            http2_first_request_by: now + limits.idle.max(limits.first_request),
            timer: Box::pin(tokio::time::sleep(limits.idle.min(limits.first_request))),
            counts_bytes: limits.counts_bytes,
            // Every listener reads its HTTP/2 clients' frames (SETTINGS and control-frame
            // floods); the PING minimum applies where one is set (not between replicas).
            frames: Some(agentgate_transport::PingPolicy::new(
                limits.min_ping_interval.unwrap_or(Duration::ZERO),
            )),
        }
    }

    /// Feeds what the client sent to the frame policy; `Err` closes a flooding connection.
    fn watch_frames(&mut self, data: &[u8]) -> io::Result<()> {
        if self.activity.preface_seen.load(Ordering::Relaxed) == usize::MAX {
            self.frames = None;
        }
        let Some(policy) = &mut self.frames else {
            return Ok(());
        };
        let Err(e) = policy.feed(data, Instant::now()) else {
            return Ok(());
        };
        let flood = match e {
            agentgate_transport::TooManyPings::Pings { .. } => (
                "too_many_pings",
                "the client sends HTTP/2 PINGs more often than allowed (min_client_ping_interval)",
            ),
            agentgate_transport::TooManyPings::Settings { .. } => (
                "too_many_settings",
                "the client keeps sending HTTP/2 SETTINGS frames",
            ),
            agentgate_transport::TooManyPings::ControlFrames { .. } => (
                "too_many_control_frames",
                "the client keeps sending HTTP/2 frames that carry no request (PRIORITY, \
                 WINDOW_UPDATE, ...)",
            ),
        };
        *self
            .activity
            .flood
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(flood);
        self.frames = None;
        Err(io::Error::new(io::ErrorKind::InvalidData, flood.1))
    }

    /// `Err` once the connection has been idle for too long, or began no request in time;
    /// otherwise re-arms the timer.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let first_request_by = if self.activity.started.load(Ordering::Relaxed) {
                None
            } else if self.activity.is_http2_client() {
                Some(self.http2_first_request_by)
            } else {
                Some(self.first_request_by)
            };
            if first_request_by.is_some_and(|by| now >= by) {
                self.activity.no_request.store(true, Ordering::Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request began within the header read timeout",
                ));
            }
            let last = self
                .activity
                .last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(Instant::now);
            let busy = self.activity.in_flight.load(Ordering::Relaxed) > 0;
            let quiet_for = last.elapsed();
            if !busy && quiet_for >= self.idle {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for longer than the idle timeout",
                ));
            }
            let mut next = if busy {
                self.idle
            } else {
                self.idle - quiet_for
            };
            if let Some(by) = first_request_by {
                next = next.min(by - now);
            }
            self.timer.as_mut().reset(now + next);
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if self.counts_bytes {
                self.activity.touch();
            }
            self.activity.saw(&buf.filled()[before..]);
            self.watch_frames(&buf.filled()[before..])?;
        }
        if res.is_pending() {
            self.check_idle(cx)?;
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            if self.counts_bytes && n > 0 {
                self.activity.touch();
            }
            if let Some(policy) = self.frames.as_mut().filter(|_| n > 0) {
                policy.feed_outbound(&buf[..n]);
            }
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            if self.counts_bytes && n > 0 {
                self.activity.touch();
            }
            if let Some(policy) = self.frames.as_mut().filter(|_| n > 0) {
                let mut left = n;
                for b in bufs {
                    let take = left.min(b.len());
                    policy.feed_outbound(&b[..take]);
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
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
