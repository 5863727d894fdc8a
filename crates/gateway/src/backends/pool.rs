//! HTTP/2 connections from the gateway to one backend.
//!
//! Written here rather than taken from hyper-util's pooled client, because that client keeps
//! ONE HTTP/2 connection per host: with thousands of long polls open, calls would queue
//! behind the backend's stream limit (commonly 100) forever. This pool opens another
//! connection when every open one carries `max_calls_per_connection` calls.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_transport::tls::{client_config, ServerVerification};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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

/// The request body type every backend connection carries: the agent-port server's own.
pub type CallBody = tonic::body::Body;

struct PooledConn {
    sender: SendRequest<CallBody>,
    in_flight: AtomicU32,
}

/// One call's place on a connection; released when the call's response ends or is dropped.
pub struct ConnLease(Arc<PooledConn>);

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
    pub async fn lease(&self) -> Result<(SendRequest<CallBody>, ConnLease), DialError> {
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
            Ok(sender) => {
                let conn = Arc::new(PooledConn {
                    sender: sender.clone(),
                    in_flight: AtomicU32::new(1),
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
    fn take_room(&self) -> Option<(SendRequest<CallBody>, ConnLease)> {
        let mut conns = self.conns.lock().unwrap();
        conns.retain(|c| !c.sender.is_closed());
        let conn = conns
            .iter()
            .filter(|c| c.in_flight.load(Ordering::Relaxed) < self.max_calls_per_connection)
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))?
            .clone();
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((conn.sender.clone(), ConnLease(conn)))
    }

    async fn dial(&self) -> Result<SendRequest<CallBody>, DialError> {
        let timeout = self.connect_timeout;
        match tokio::time::timeout(timeout, self.dial_inner()).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Timeout(timeout)),
        }
    }

    async fn dial_inner(&self) -> Result<SendRequest<CallBody>, DialError> {
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
                        None => handshake(tcp).await,
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
                            handshake(tls).await
                        }
                    };
                }
                Err(e) => last = DialError::Connect(e.to_string()),
            }
        }
        Err(last)
    }
}

async fn handshake<IO>(io: IO) -> Result<SendRequest<CallBody>, DialError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(BACKEND_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(BACKEND_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| DialError::Http2(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "backend connection ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    async fn open_call(pool: &BackendPool) -> (http::Response<Incoming>, ConnLease) {
        let (mut sender, lease) = pool.lease().await.unwrap();
        let req = http::Request::post(format!("http://{}/t.S/M", pool.address()))
            .body(CallBody::empty())
            .unwrap();
        (sender.send_request(req).await.unwrap(), lease)
    }

    use hyper::body::Incoming;

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
            assert!(!http_body::Body::is_end_stream(resp.body()));
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
