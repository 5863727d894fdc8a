//! Cluster mode: several replicas behind one load balancer, sharing Redis.
//!
//! A request may land on any replica while the agent's connection lives on exactly one. The
//! replica that gets the request tries itself first; otherwise it looks the agent up in the
//! registry ([`registry`]) and asks the replicas listed there, concurrently, to reserve a
//! ready tunnel over the internal API ([`internal_api`]). The first reservation wins, the
//! others are released (their tunnels go back to the pool), and the whole request then streams
//! through the winner with the same flow control and cancellation as a local one.
//!
//! Trust between replicas ([`signing`], [`peers`]): every call carries a token bound to its
//! method, path, target replica, agent and request head, accepted once; a forwarded body is
//! bound by a MAC trailer; peer URLs from Redis are used only if they match the allowlist;
//! the internal API can run over TLS, with client certificates required.

pub mod internal_api;
pub mod peers;
mod redis_target;
pub mod registry;
pub mod setup;
pub mod signing;

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use agentgate_proto::v1::RequestHead;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::directory::Directory;
use crate::headers::from_proto;
use crate::metrics::Metrics;
use crate::tunnel::{
    BoxError, ForwardError, ForwardResponse, ParkedTunnel, ResponseBody, TunnelParking,
};
use peers::{PeerHealth, PeerPolicy};
use registry::Registry;
use signing::{CallSigner, SigningBody};

/// Header carrying the signed token on internal calls.
pub const INTERNAL_TOKEN_HEADER: &str = "agentgate-internal-token";
/// Headers describing the tunnel request on a forwarded call.
pub const KIND_HEADER: &str = "agentgate-request-kind";
pub const UPSTREAM_HEADER: &str = "agentgate-upstream";
pub const PATH_HEADER: &str = "agentgate-path";
pub const TIMEOUT_HEADER: &str = "agentgate-timeout-ms";
/// Set on a forwarded call's response when the peer could not forward it: the outcome label.
pub const ERROR_HEADER: &str = "agentgate-forward-error";
/// Set on every response of the internal API's direct request route, so that the replica
/// that sent the request can tell a peer with the route from one of an older version.
pub const ROUTE_HEADER: &str = "agentgate-internal-route";
/// How long a reserved tunnel waits for its request before it goes back to the pool.
const RESERVATION_TTL: Duration = Duration::from_secs(30);
/// Lines a second about peers refusing this replica's calls (one per request otherwise).
static PEER_REFUSED_LOG: agentgate_transport::LogBudget = agentgate_transport::LogBudget::new(2);
/// Lines a second for forwarded requests that failed between the replicas: a broken peer link
/// fails every request in flight on it at once.
static PEER_FAILED_LOG: agentgate_transport::LogBudget = agentgate_transport::LogBudget::new(5);
/// What one answer from a peer may hold unread here: a peer is near (at 1 ms, 1 GB/s).
const PEER_ANSWER_STREAM_WINDOW: u32 = 1024 * 1024;

type InternalBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A tunnel reserved for a request that another replica is about to send.
pub struct Reservation {
    pub agent: String,
    pub tunnel: ParkedTunnel,
    pub at: Instant,
}

/// How this replica calls its peers: each a named setting (docs/configuration.md).
pub struct ClusterSettings {
    pub connect_timeout: Duration,
    pub call_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub peer_down_for: Duration,
    /// TLS towards peers (`https://` URLs): whom to trust and what to present.
    pub tls: rustls::ClientConfig,
}

pub struct Cluster {
    pub registry: Arc<Registry>,
    pub self_url: String,
    pub signer: Arc<CallSigner>,
    policy: PeerPolicy,
    health: PeerHealth,
    settings: ClusterSettings,
    client: Client<HttpsConnector<HttpConnector>, InternalBody>,
    pub reservations: Mutex<HashMap<u64, Reservation>>,
    next_reservation: AtomicU64,
    metrics: Arc<Metrics>,
    /// The shared secret file, re-read on SIGHUP.
    pub secret_file: std::path::PathBuf,
    /// TLS for the internal listener, when it has a certificate.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// That certificate, reloaded with the others (and presented to peers).
    pub internal_cert: Option<Arc<agentgate_transport::cert_reload::ReloadableCert>>,
}

fn empty() -> InternalBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why a peer call failed; the kinds that say the peer is gone mark it down.
enum PeerCallError {
    Unreachable(String),
    Timeout(Duration),
    Other(String),
}

impl Display for PeerCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) => f.write_str(e),
            Self::Timeout(d) => write!(f, "no answer within {d:?}"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

impl Cluster {
    pub fn new(
        registry: Arc<Registry>,
        signer: Arc<CallSigner>,
        policy: PeerPolicy,
        settings: ClusterSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.connect_timeout));
        // hyper-rustls sets ALPN itself (h2, from enable_http2).
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(settings.tls.clone())
            .https_or_http()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            // Below the peers' `http_idle_timeout` (default 120 s), so this side lets an idle
            // connection go before the peer closes it under a request.
            .pool_idle_timeout(Duration::from_secs(60))
            // One connection to a peer carries every request this replica sends it, so an
            // answer whose caller stopped reading must not hold the others up: each may hold
            // its stream window unread, and the connection has room for the peer's 200
            // concurrent streams (hyper's default) to do so at once (it was 4 MiB: two
            // stalled downloads froze every request to the peer's agents until the peer's
            // stalled_caller_timeout). Nothing is allocated until data waits.
            .http2_initial_stream_window_size(PEER_ANSWER_STREAM_WINDOW)
            .http2_initial_connection_window_size(PEER_ANSWER_STREAM_WINDOW * 256)
            // A peer that accepts and then hangs (a stopped process, a blackholed link) is
            // found by its unanswered PINGs within about a second plus internal_call_timeout,
            // even while a reservation legitimately waits up to tunnel_wait for an answer.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .http2_keep_alive_timeout(settings.call_timeout)
            .http2_keep_alive_while_idle(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Self {
            self_url: registry.self_url().to_string(),
            registry,
            signer,
            policy,
            health: PeerHealth::default(),
            settings,
            client,
            reservations: Mutex::default(),
            next_reservation: AtomicU64::new(1),
            metrics,
            secret_file: Default::default(),
            server_tls: None,
            internal_cert: None,
        }
    }

    /// Re-reads the shared secret file (SIGHUP): a rolled-out secret signs from the next call.
    pub fn reload_secrets(&self) {
        match setup::read_secrets(&self.secret_file) {
            Ok(s) => {
                let n = s.count();
                self.signer.replace_secrets(s);
                tracing::info!(
                    secrets = n,
                    "internal secrets reloaded: the first signs, all verify"
                );
            }
            Err(e) => tracing::warn!(
                "internal secrets not reloaded, the old ones stay: {}",
                agentgate_transport::error_chain::describe(e.as_ref())
            ),
        }
    }

    /// A request to `peer`, signed for exactly this method, path, agent and head.
    fn request(
        &self,
        peer: &str,
        method: http::Method,
        path_and_query: &str,
        agent: &str,
        head_digest: &str,
        body: InternalBody,
    ) -> (http::Request<InternalBody>, signing::BodyKey) {
        let signed = self
            .signer
            .sign(peer, &method, path_and_query, agent, head_digest);
        let mut req = http::Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = format!("{peer}{path_and_query}")
            .parse()
            .unwrap_or_default();
        req.headers_mut().insert(
            INTERNAL_TOKEN_HEADER,
            http::HeaderValue::from_str(&signed.token).expect("JWT is ASCII"),
        );
        (req, signed.body_key)
    }

    /// Peers that may be called, from a list out of Redis: the allowlist first (a URL that
    /// matches nothing is counted and logged, and gets nothing), then those not marked down.
    fn callable(&self, urls: Vec<String>) -> Vec<String> {
        let mut allowed = vec![];
        for url in urls {
            if url == self.self_url {
                continue;
            }
            if self.policy.allows(&url) {
                allowed.push(url);
            } else {
                self.metrics.peers_refused.inc(&[]);
                if self.health.should_log_refused(&url) {
                    tracing::warn!(
                        peer = %url,
                        "a replica URL in Redis matches no internal_peers entry: ignored, and no \
                         request or token goes to it (something other than a replica may be \
                         writing to Redis)"
                    );
                }
            }
        }
        self.health.usable(allowed)
    }

    /// A signed internal call without a body, bounded by `internal_call_timeout` plus
    /// `extra`; returns the status and the whole (small) body.
    async fn call(
        &self,
        peer: &str,
        method: http::Method,
        path_and_query: &str,
        agent: &str,
        extra: Duration,
    ) -> Result<(http::StatusCode, Bytes), PeerCallError> {
        let deadline = self.settings.call_timeout + extra;
        let (req, _) = self.request(peer, method, path_and_query, agent, "", empty());
        let exchange = async {
            // No answer head at all (refused, reset, unanswered PINGs): the peer is gone.
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| PeerCallError::Unreachable(peer_client_error(&e)))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), 4 * 1024 * 1024)
                .collect()
                .await
                .map_err(|e| PeerCallError::Other(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        let result = match tokio::time::timeout(deadline, exchange).await {
            Ok(r) => r,
            Err(_) => Err(PeerCallError::Timeout(deadline)),
        };
        match &result {
            Err(PeerCallError::Unreachable(_) | PeerCallError::Timeout(_)) => {
                self.metrics.peer_failures.inc(&[]);
                self.health.mark_down(peer, self.settings.peer_down_for);
            }
            _ => self.health.mark_up(peer),
        }
        result
    }

    /// Stores a reserved tunnel; returns its id.
    pub fn reserve(&self, agent: &str, tunnel: ParkedTunnel) -> u64 {
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        self.reservations.lock().unwrap().insert(
            id,
            Reservation {
                agent: agent.to_string(),
                tunnel,
                at: Instant::now(),
            },
        );
        id
    }

    /// Returns reservations nobody claimed to the pool.
    pub fn expire_reservations(&self, parking: &TunnelParking) {
        let expired: Vec<Reservation> = {
            let mut r = self.reservations.lock().unwrap();
            let ids: Vec<u64> = r
                .iter()
                .filter(|(_, v)| v.at.elapsed() > RESERVATION_TTL)
                .map(|(k, _)| *k)
                .collect();
            ids.into_iter().filter_map(|id| r.remove(&id)).collect()
        };
        for res in expired {
            parking.park(&res.agent, res.tunnel);
        }
    }

    /// Asks `peer` to reserve a tunnel of `agent`, waiting up to `wait` there.
    async fn reserve_at(
        &self,
        peer: &str,
        agent: &str,
        wait: Duration,
    ) -> Result<u64, ReserveFailure> {
        let path = format!(
            "/internal/v1/agents/{agent}/reserve?wait_ms={}",
            wait.as_millis()
        );
        let (status, body) = self
            .call(peer, http::Method::POST, &path, agent, wait)
            .await
            .map_err(|e| match e {
                PeerCallError::Unreachable(_) | PeerCallError::Timeout(_) => {
                    ReserveFailure::Gone(format!("{peer}: {e}"))
                }
                PeerCallError::Other(_) => ReserveFailure::Failed(format!("{peer}: {e}")),
            })?;
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if status.is_success() {
            text.parse()
                .map_err(|_| ReserveFailure::Failed(format!("{peer}: bad reservation id {text:?}")))
        } else if status == http::StatusCode::NOT_FOUND {
            Err(ReserveFailure::NotThere(format!("{peer}: {text}")))
        } else if status == http::StatusCode::UNAUTHORIZED {
            Err(ReserveFailure::Refused(format!("{peer}: {text}")))
        } else {
            Err(ReserveFailure::Failed(format!("{peer}: {status}: {text}")))
        }
    }

    async fn release_at(&self, peer: &str, id: u64) {
        let path = format!("/internal/v1/reservations/{id}/release");
        if let Err(e) = self
            .call(peer, http::Method::POST, &path, "", Duration::ZERO)
            .await
        {
            tracing::debug!(peer, id, error = %e, "could not release a reservation; it will expire");
        }
    }

    /// The replicas that hold `agent` and may be called; `NotConnected` when none does.
    pub async fn peers_for(&self, agent: &str) -> Result<Vec<String>, ForwardError> {
        let peers = match self.registry.replicas_for(agent).await {
            Ok(p) => p,
            Err(e) => {
                self.metrics.forwards.inc(&["registry_unavailable"]);
                return Err(ForwardError::ClusterUnavailable {
                    agent: agent.into(),
                    message: format!("the cluster registry is unavailable: {e}"),
                });
            }
        };
        let peers = self.callable(peers);
        if peers.is_empty() {
            return Err(ForwardError::NotConnected {
                agent: agent.into(),
            });
        }
        Ok(peers)
    }

    /// Reserves a ready tunnel of `agent` at the first of `peers` (from [`Self::peers_for`])
    /// that has one. `NotConnected` when every one of them says the agent is not there (any
    /// more): Redis still lists a replica the agent just left, and the caller may wait for
    /// the agent to register elsewhere.
    pub async fn reserve_remote(
        self: &Arc<Self>,
        peers: &[String],
        wait: Duration,
        agent: &str,
    ) -> Result<PeerReservation, ForwardError> {
        let mut attempts: FuturesUnordered<_> = peers
            .iter()
            .map(|p| {
                let (this, p, agent) = (self.clone(), p.clone(), agent.to_string());
                async move { (this.reserve_at(&p, &agent, wait).await, p) }
            })
            .collect();
        let mut winner = None;
        let mut failures = vec![];
        while let Some((r, peer)) = attempts.next().await {
            match r {
                Ok(id) => {
                    winner = Some((peer, id));
                    break;
                }
                Err(e) => failures.push(e),
            }
        }
        // The request goes on at once; late reservations from the others are released in
        // the background instead of holding it up until the slowest peer answers.
        if !attempts.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                while let Some((r, peer)) = attempts.next().await {
                    if let Ok(id) = r {
                        this.release_at(&peer, id).await;
                    }
                }
            });
        }
        let Some((peer, id)) = winner else {
            let tried: Vec<String> = failures.iter().map(ToString::to_string).collect();
            if failures
                .iter()
                .all(|f| matches!(f, ReserveFailure::NotThere(_) | ReserveFailure::Gone(_)))
            {
                tracing::debug!(
                    agent,
                    ?tried,
                    "the agent left every replica listed for it, or they are gone"
                );
                return Err(ForwardError::NotConnected {
                    agent: agent.into(),
                });
            }
            // A replica that refuses our calls is a misconfiguration the caller should hear
            // of, not an agent that was busy.
            if let Some(refused) = failures
                .iter()
                .find(|f| matches!(f, ReserveFailure::Refused(_)))
            {
                self.metrics.forwards.inc(&["refused"]);
                if let Some(suppressed) = PEER_REFUSED_LOG.allow() {
                    tracing::warn!(agent, ?tried, suppressed, "a replica holding the agent refused this replica's call; check that every replica has the same internal_secret_file and synchronised clocks");
                }
                return Err(ForwardError::ClusterUnavailable {
                    agent: agent.into(),
                    message: format!(
                        "the agent's replica refused this replica's call ({refused}); check \
                         that every replica has the same internal secret and a synchronised \
                         clock"
                    ),
                });
            }
            self.metrics.forwards.inc(&["no_tunnel"]);
            tracing::info!(agent, ?tried, "no replica had a ready tunnel");
            return Err(ForwardError::NoIdleTunnel {
                agent: agent.into(),
                waited: wait,
            });
        };
        Ok(PeerReservation { peer, id })
    }

    /// Sends a request through a tunnel reserved at a peer by [`Self::reserve_remote`].
    pub async fn forward_reserved<B>(
        self: &Arc<Self>,
        reservation: PeerReservation,
        agent: &str,
        head: RequestHead,
        body: B,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let PeerReservation { peer, id } = reservation;
        self.metrics.forwards_sent.inc(&["reserved"]);
        let path = format!("/internal/v1/reservations/{id}/request");
        // Why the caller's body broke off, if it did: then the request failed because the
        // caller went away, not because the link between the replicas broke.
        let broke_off: Arc<OnceLock<String>> = Arc::default();
        let seen = broke_off.clone();
        let body = body.map_err(move |e| {
            let why = e.to_string();
            let _ = seen.set(why.clone());
            BoxError::from(why)
        });
        let resp = self
            .send_forwarded(
                &peer,
                &path,
                agent,
                &head,
                body,
                self.settings.first_byte_timeout,
                &broke_off,
            )
            .await
            .map_err(|e| e.into_error(agent))?;
        self.read_forwarded(&peer, agent, resp).await
    }

    /// Sends a request that has no body straight to `peer`, the one replica listed for
    /// `agent`, which takes a tunnel and forwards the request in the same call: one round trip
    /// between the replicas instead of two (reserve, then request). A request with a body
    /// reserves first, so that its body goes only to a replica that has a tunnel for it.
    pub async fn forward_direct(
        self: &Arc<Self>,
        peer: &str,
        agent: &str,
        head: &RequestHead,
        tunnel_wait: Duration,
    ) -> DirectForward {
        let path = format!("/internal/v1/agents/{agent}/request");
        // The peer may wait up to `tunnel_wait` for a tunnel before the upstream's head.
        let first_byte = match self.settings.first_byte_timeout {
            d if d.is_zero() => d,
            d => d + tunnel_wait,
        };
        self.metrics.forwards_sent.inc(&["direct"]);
        let resp = match self
            .send_forwarded(
                peer,
                &path,
                agent,
                head,
                empty(),
                first_byte,
                &OnceLock::new(),
            )
            .await
        {
            Ok(r) => r,
            Err(SendFailure::Connect(_)) => {
                // Nothing reached the peer: mark it down, and let the request wait for
                // the agent to be listed elsewhere, as for an agent connected nowhere.
                self.metrics.peer_failures.inc(&[]);
                self.health.mark_down(peer, self.settings.peer_down_for);
                return DirectForward::NotSent;
            }
            Err(e) => return DirectForward::Done(Err(e.into_error(agent))),
        };
        self.health.mark_up(peer);
        if resp.headers().get(ROUTE_HEADER).is_none() {
            // A replica of an older version: no such route there (its 404 says so).
            tracing::debug!(peer, "peer has no direct request route; reserving first");
            return DirectForward::Unsupported;
        }
        DirectForward::Done(self.read_forwarded(peer, agent, resp).await)
    }

    /// Signs and sends one forwarded request to `peer`, the tunnel request's head travelling
    /// as headers; waits up to `first_byte` (zero: no limit) for the response head.
    /// `caller_broke_off` holds why the caller's body failed, if it did (set by the body).
    #[allow(clippy::too_many_arguments)]
    async fn send_forwarded(
        &self,
        peer: &str,
        path: &str,
        agent: &str,
        head: &RequestHead,
        body: impl Body<Data = Bytes, Error = BoxError> + Send + 'static,
        first_byte: Duration,
        caller_broke_off: &OnceLock<String>,
    ) -> Result<http::Response<hyper::body::Incoming>, SendFailure> {
        let method = http::Method::from_bytes(head.method.as_bytes()).unwrap_or(http::Method::GET);
        let mut headers = from_proto(&head.headers);
        let set = |h: &mut http::HeaderMap, k: &'static str, v: &str| {
            if let Ok(v) = http::HeaderValue::from_str(v) {
                h.insert(k, v);
            }
        };
        set(&mut headers, KIND_HEADER, &head.kind.to_string());
        set(&mut headers, UPSTREAM_HEADER, &head.upstream);
        set(&mut headers, PATH_HEADER, &head.path_and_query);
        set(
            &mut headers,
            TIMEOUT_HEADER,
            &head.timeout_millis.to_string(),
        );
        let digest = signing::head_digest(&[], &headers);
        let (mut req, body_key) = self.request(peer, method, path, agent, &digest, empty());
        *req.body_mut() = SigningBody::new(body, body_key).boxed_unsync();
        for (k, v) in headers.iter() {
            req.headers_mut().append(k, v.clone());
        }
        let sent = self.client.request(req);
        let resp = if first_byte.is_zero() {
            sent.await
        } else {
            match tokio::time::timeout(first_byte, sent).await {
                Ok(r) => r,
                Err(_) => {
                    self.metrics.forwards.inc(&["peer_timeout"]);
                    tracing::warn!(peer, agent, "a peer replica sent no response head in time");
                    return Err(SendFailure::NoHead(format!(
                        "the agent's replica sent no response head within {first_byte:?} \
                         (internal_first_byte_timeout)"
                    )));
                }
            }
        };
        resp.map_err(|e| {
            if let Some(why) = caller_broke_off.get() {
                self.metrics.forwards.inc(&["caller_aborted"]);
                return SendFailure::CallerAborted(why.clone());
            }
            self.metrics.forwards.inc(&["peer_failed"]);
            let message = peer_client_error(&e);
            // The peer's address goes to the log only; the caller's answer names no address.
            if let Some(suppressed) = PEER_FAILED_LOG.allow() {
                tracing::warn!(peer, agent, error = %message, suppressed, "forwarding to a peer replica failed");
            }
            if e.is_connect() {
                SendFailure::Connect(message)
            } else {
                SendFailure::Broken(message)
            }
        })
    }

    /// A forwarded request's response: the upstream's, or the error the peer reported.
    async fn read_forwarded(
        &self,
        peer: &str,
        agent: &str,
        resp: http::Response<hyper::body::Incoming>,
    ) -> Result<ForwardResponse, ForwardError> {
        let (mut parts, incoming) = resp.into_parts();
        parts.headers.remove(ROUTE_HEADER);
        if parts.headers.remove(ERROR_HEADER).is_some() {
            // Bounded: a peer's error is a small JSON document.
            let body = http_body_util::Limited::new(incoming, 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            self.metrics.forwards.inc(&["peer_error"]);
            return Err(ForwardError::from_wire(agent, peer, &body));
        }
        self.metrics.forwards.inc(&["ok"]);
        let body: ResponseBody = incoming.map_err(BoxError::from).boxed_unsync();
        Ok(ForwardResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// Every replica's agents, each record carrying its replica.
    pub async fn cluster_agents(
        &self,
        directory: &Directory,
    ) -> Result<Vec<serde_json::Value>, String> {
        let peers = self.registry.replicas().await.map_err(|e| e.to_string())?;
        let mut out = vec![];
        for r in directory.list() {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["replica"] = self.self_url.clone().into();
            out.push(v);
        }
        for peer in self.callable(peers) {
            let fetched = async {
                let (_, body) = self
                    .call(
                        &peer,
                        http::Method::GET,
                        "/internal/v1/agents",
                        "",
                        Duration::ZERO,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::from_slice::<Vec<serde_json::Value>>(&body).map_err(|e| e.to_string())
            };
            match fetched.await {
                Ok(list) => {
                    for mut v in list {
                        v["replica"] = peer.clone().into();
                        out.push(v);
                    }
                }
                Err(e) => tracing::warn!(peer, error = %e, "could not list a replica's agents"),
            }
        }
        Ok(out)
    }
}

/// A tunnel held for one request at a peer replica, named by the peer's reservation id.
pub struct PeerReservation {
    peer: String,
    id: u64,
}

/// What became of a request sent by [`Cluster::forward_direct`].
pub enum DirectForward {
    /// The peer took it: the upstream's response, or the error the peer reported.
    Done(Result<ForwardResponse, ForwardError>),
    /// The peer could not be reached, so nothing was sent; it is marked down (its log line
    /// says why) and the agent counts as connected nowhere.
    NotSent,
    /// The peer is of a version without the direct route: reserve, then request.
    Unsupported,
}

/// A peer call's failure in words: what happened, then its causes (the client's own text,
/// "client error (Connect)", names a Rust type, not a reason).
fn peer_client_error(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    let what = if e.is_connect() {
        "could not connect to the agent's replica"
    } else {
        "the connection to the agent's replica broke off the request"
    };
    match e.source() {
        Some(cause) => format!(
            "{what}: {}",
            agentgate_transport::error_chain::describe(cause)
        ),
        None => what.to_string(),
    }
}

/// Why a forwarded request got no response head from the peer.
enum SendFailure {
    /// No connection to the peer: nothing was sent.
    Connect(String),
    /// No head within the first-byte timeout.
    NoHead(String),
    /// The connection or the stream broke once the request was on its way.
    Broken(String),
    /// The caller's request body broke off (it went away mid-upload), which ended the
    /// forwarded request.
    CallerAborted(String),
}

impl SendFailure {
    fn into_error(self, agent: &str) -> ForwardError {
        let agent = agent.into();
        match self {
            Self::NoHead(message) => ForwardError::UpstreamTimeout { agent, message },
            Self::Connect(message) | Self::Broken(message) => {
                ForwardError::TunnelBroken { agent, message }
            }
            Self::CallerAborted(message) => ForwardError::CallerAborted { agent, message },
        }
    }
}

/// Why a peer did not reserve a tunnel.
#[derive(Debug, thiserror::Error)]
enum ReserveFailure {
    /// The peer does not hold the agent (any more).
    #[error("{0}")]
    NotThere(String),
    /// The peer is unreachable or silent (now marked down): its agents are moving.
    #[error("{0}")]
    Gone(String),
    /// The peer refused this replica's signed call (401: another shared secret, clocks apart,
    /// another URL): a misconfiguration, not a busy agent.
    #[error("{0}")]
    Refused(String),
    /// Anything else: no ready tunnel there, or the peer failed.
    #[error("{0}")]
    Failed(String),
}
