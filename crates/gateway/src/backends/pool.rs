//! HTTP/2 connections from the gateway to one backend.
//!
//! Written here rather than taken from hyper-util's pooled client, because that client keeps
//! ONE HTTP/2 connection per host: with thousands of long polls open, calls would queue
//! behind the backend's stream limit (commonly 100) forever. This pool opens another
//! connection when every open one carries `max_calls_per_connection` calls. Connections are
//! `h2` client connections, not hyper's: `stream.rs` says why.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_transport::tls::{client_config, ServerVerification};
use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::BackendConfigError;
use crate::config::BackendConfig;

/// How often an idle backend connection is PINGed, and how long the answer may take: a
/// backend that vanished without a FIN is noticed instead of swallowing calls.
const BACKEND_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const BACKEND_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Flow-control windows the gateway offers a backend for its answers (per call, and per
/// connection): large enough that a streamed answer is not held to one round trip per 64 KiB.
const ANSWER_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const ANSWER_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// The largest header block (head or trailers) a backend's answer may carry.
const MAX_ANSWER_HEADER_LIST: u32 = 64 * 1024;
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
}

/// The request body type every backend call carries: the agent-port server's own.
pub type CallBody = tonic::body::Body;

struct PooledConn {
    sender: SendRequest<Bytes>,
    in_flight: AtomicU32,
    /// Set when the connection ended, or a call found it unusable (the backend sent GOAWAY):
    /// the pool forgets it on the next lease.
    closed: Arc<AtomicBool>,
}

/// One call's place on a connection; released when the call's response ends or is dropped.
pub struct ConnLease(Arc<PooledConn>);

impl ConnLease {
    /// No further call is sent on this connection (a call could not open a stream on it).
    pub fn retire(&self) {
        self.0.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for ConnLease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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
            None => None,
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
            max_calls_per_connection: cfg.max_calls_per_connection.max(1),
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
        self.conns.lock().unwrap().len()
    }

    /// A connection with room for one more call, dialed if none has room.
    pub async fn lease(&self) -> Result<(SendRequest<Bytes>, ConnLease), DialError> {
        if let Some(found) = self.take_room() {
            return Ok(found);
        }
        let asked = Instant::now();
        let _dialing = self.dialing.lock().await;
        if let Some(found) = self.take_room() {
            return Ok(found);
        }
        if let Some((at, e)) = &*self.last_dial_failure.lock().unwrap() {
            if *at >= asked || at.elapsed() < SHARE_DIAL_FAILURE_FOR {
                return Err(e.clone());
            }
        }
        match self.dial().await {
            Ok((sender, closed)) => {
                let conn = Arc::new(PooledConn {
                    sender: sender.clone(),
                    in_flight: AtomicU32::new(1),
                    closed,
                });
                self.conns.lock().unwrap().push(conn.clone());
                *self.last_dial_failure.lock().unwrap() = None;
                Ok((sender, ConnLease(conn)))
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
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        let conn = conns
            .iter()
            .filter(|c| c.in_flight.load(Ordering::Relaxed) < self.max_calls_per_connection)
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))?
            .clone();
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((conn.sender.clone(), ConnLease(conn)))
    }

    async fn dial(&self) -> Result<Dialed, DialError> {
        let timeout = self.connect_timeout;
        match tokio::time::timeout(timeout, self.dial_inner()).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout(timeout)),
        }
    }

    async fn dial_inner(&self) -> Result<Dialed, DialError> {
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
                    return match &t.tls {
                        None => handshake(tcp, &t.authority).await,
                        Some((connector, name)) => {
                            let tls = connector
                                .connect(name.clone(), tcp)
                                .await
                                .map_err(|e| DialError::Tls(e.to_string()))?;
                            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                                return Err(DialError::Tls(
                                    "the backend did not agree to HTTP/2 (ALPN h2); a gRPC \
                                     server over TLS must"
                                        .into(),
                                ));
                            }
                            handshake(tls, &t.authority).await
                        }
                    };
                }
                Err(e) => last = DialError::Connect(e.to_string()),
            }
        }
        Err(last)
    }
}

/// A new connection's request handle, and the flag its driving task sets when it ends.
type Dialed = (SendRequest<Bytes>, Arc<AtomicBool>);

async fn handshake<IO>(io: IO, address: &http::uri::Authority) -> Result<Dialed, DialError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = h2::client::Builder::new()
        .initial_window_size(ANSWER_STREAM_WINDOW)
        .initial_connection_window_size(ANSWER_CONNECTION_WINDOW)
        .max_header_list_size(MAX_ANSWER_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake(io)
        .await
        .map_err(|e| DialError::Http2(e.to_string()))?;
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn(drive(conn, address.clone(), closed.clone()));
    Ok((sender, closed))
}

/// Runs one backend connection until it ends, PINGing it every
/// [`BACKEND_KEEPALIVE_INTERVAL`]; a backend that does not answer within
/// [`BACKEND_KEEPALIVE_TIMEOUT`] loses the connection (and its calls fail with UNAVAILABLE).
async fn drive<IO>(
    mut conn: h2::client::Connection<IO, Bytes>,
    address: http::uri::Authority,
    closed: Arc<AtomicBool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let pings = conn.ping_pong();
    let keepalive = async move {
        let Some(mut pings) = pings else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(BACKEND_KEEPALIVE_INTERVAL).await;
            match tokio::time::timeout(BACKEND_KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque()))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return e.to_string(),
                Err(_) => {
                    return format!("no PING answer within {BACKEND_KEEPALIVE_TIMEOUT:?}");
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
        why = keepalive => tracing::warn!(%address, "backend connection closed: {why}"),
    }
    closed.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// An HTTP/2 server that answers every request with headers and then a body that never
    /// ends (a long poll), until the test ends.
    async fn long_poll_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        let body =
                            http_body_util::StreamBody::new(futures_util::stream::pending::<
                                Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
                            >());
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn pool(url: String, per_connection: u32) -> BackendPool {
        BackendPool::new(&BackendConfig {
            name: "t".into(),
            services: vec!["t.".into()],
            url,
            max_calls_per_connection: per_connection,
            connect_timeout: Duration::from_secs(2),
            ..BackendConfig::default()
        })
        .unwrap()
    }

    async fn open_call(pool: &BackendPool) -> (http::Response<h2::RecvStream>, ConnLease) {
        let (mut sender, lease) = pool.lease().await.unwrap();
        let req = http::Request::post(format!("http://{}/t.S/M", pool.address()))
            .body(CallBody::empty())
            .unwrap();
        let Ok((answer, None)) = super::super::stream::send(&mut sender, req).await else {
            panic!("an empty body goes with the head");
        };
        (answer.await.unwrap(), lease)
    }

    #[tokio::test]
    async fn a_full_connection_makes_the_pool_open_another_and_a_freed_place_is_reused() {
        let addr = long_poll_server().await;
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
}
