//! One accept-and-serve loop for the gateway's HTTP listeners: the tunnel API, admin, and the
//! internal API between replicas. HTTP/1.1 and HTTP/2 (h2c or TLS) on each.
//!
//! Every listener gets the same protections, each a named setting: a cap on open connections,
//! a deadline for the TLS handshake, a deadline for reading a request's headers, and an idle
//! timeout that closes a connection with no request in flight and no bytes moving.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agentgate_transport::PRE_AUTH_LOG;

use crate::guarded_body::GuardedBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Limits and deadlines of one HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpListenerSettings {
    /// For logs: `api`, `admin` or `internal`.
    pub name: &'static str,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// HTTP/2 windows (the internal API streams tunnelled bodies between replicas).
    pub http2_stream_window: u32,
    pub http2_connection_window: u32,
    /// After shutdown starts, how long open requests may take.
    pub shutdown_grace: Duration,
    /// Balancers whose connections start with a PROXY protocol header naming the caller
    /// (`proxy_protocol_from`; the API listener only). Empty: none is read.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

impl HttpListenerSettings {
    /// The settings of the listener `name` from the gateway's configuration, with no PROXY
    /// header read (the API listener sets its balancers itself).
    pub fn from_config(
        name: &'static str,
        max_connections: usize,
        c: &crate::GatewayConfig,
    ) -> Self {
        Self {
            name,
            max_connections,
            handshake_timeout: c.handshake_timeout,
            header_read_timeout: c.http_header_read_timeout,
            idle_timeout: c.http_idle_timeout,
            http2_stream_window: c.http2_stream_window,
            http2_connection_window: c.http2_connection_window,
            shutdown_grace: c.shutdown_grace,
            proxy_protocol_from: Vec::new(),
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
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let settings = Arc::new(settings);
    let make_service = Arc::new(make_service);
    while let Some((mut stream, peer)) =
        agentgate_transport::accept_until(&listener, &stop, settings.name).await
    {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                tracing::warn!(
                    listener = settings.name,
                    %peer,
                    max_connections = settings.max_connections,
                    suppressed,
                    "connection refused: this listener has too many open connections"
                );
            }
            continue;
        };
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let make_service = make_service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            use agentgate_transport::proxy_header::{from_balancer, read_proxy_header_within};
            let peer = if from_balancer(&settings.proxy_protocol_from, peer.ip()) {
                match read_proxy_header_within(&mut stream, settings.handshake_timeout).await {
                    Ok(client) => client.unwrap_or(peer),
                    Err(e) => {
                        if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                            tracing::warn!(listener = settings.name, balancer = %peer, suppressed, "connection from a proxy_protocol_from address refused: {e}");
                        }
                        return;
                    }
                }
            } else {
                peer
            };
            let activity = Arc::new(Activity::default());
            let svc = CountInFlight {
                inner: make_service(peer),
                activity: activity.clone(),
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .initial_stream_window_size(settings.http2_stream_window)
                .initial_connection_window_size(settings.http2_connection_window);
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let idle = settings.idle_timeout;
            let result = match acceptor {
                None => {
                    let io = IdleIo::new(stream, activity, idle);
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), svc).into_owned())
                        .await
                }
                Some(acceptor) => {
                    let deadline = settings.handshake_timeout;
                    let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(listener = settings.name, error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = settings.name, %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let io = IdleIo::new(tls, activity, idle);
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), svc).into_owned())
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(listener = settings.name, error = %e, %peer, "connection ended with error");
            }
        });
    }
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

/// What the idle timeout looks at: requests in flight on the connection, and when bytes last
/// moved.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Option<Instant>>,
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

/// Closes the connection once it has had no request in flight and no bytes in either
/// direction for `idle`.
struct IdleIo<T> {
    io: T,
    activity: Arc<Activity>,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(io: T, activity: Arc<Activity>, idle: Duration) -> Self {
        activity.touch();
        Self {
            io,
            activity,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// `Err` once the connection has been idle for too long; otherwise re-arms the timer.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
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
            let next = if busy {
                self.idle
            } else {
                self.idle - quiet_for
            };
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + next);
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
            self.activity.touch();
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
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
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
