//! Cluster mode: several replicas behind one load balancer, sharing Redis.
//!
//! A request may land on any replica while the agent's connection lives on exactly one. The
//! replica that gets the request tries itself first; otherwise it looks the agent up in the
//! registry ([`registry`]) and asks the replicas listed there, concurrently, to reserve a
//! ready tunnel over the internal API ([`internal_api`]). The first reservation wins, the
//! others are released (their tunnels go back to the pool), and the whole request then streams
//! through the winner with the same flow control and cancellation as a local one. Calls
//! between replicas carry a short-lived HS256 token signed with a shared secret ([`jwt`]).

pub mod internal_api;
pub mod jwt;
pub mod registry;

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate_proto::v1::RequestHead;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::directory::Directory;
use crate::headers::from_proto;
use crate::metrics::Metrics;
use crate::tunnel::{
    BoxError, ForwardError, ForwardResponse, ParkedTunnel, ResponseBody, TunnelParking,
};
use registry::Registry;

/// Header carrying the signed token on internal calls.
pub const INTERNAL_TOKEN_HEADER: &str = "agentgate-internal-token";
/// Headers describing the tunnel request on a forwarded call.
pub const KIND_HEADER: &str = "agentgate-request-kind";
pub const UPSTREAM_HEADER: &str = "agentgate-upstream";
pub const PATH_HEADER: &str = "agentgate-path";
pub const TIMEOUT_HEADER: &str = "agentgate-timeout-ms";
/// Set on a forwarded call's response when the peer could not forward it: the outcome label.
pub const ERROR_HEADER: &str = "agentgate-forward-error";
/// How long a reserved tunnel waits for its request before it goes back to the pool.
const RESERVATION_TTL: Duration = Duration::from_secs(30);

type InternalBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A tunnel reserved for a request that another replica is about to send.
pub struct Reservation {
    pub agent: String,
    pub tunnel: ParkedTunnel,
    pub at: Instant,
}

pub struct Cluster {
    pub registry: Arc<Registry>,
    pub self_url: String,
    secret: Vec<u8>,
    token_validity: Duration,
    client: Client<HttpConnector, InternalBody>,
    pub reservations: Mutex<HashMap<u64, Reservation>>,
    next_reservation: AtomicU64,
    metrics: Arc<Metrics>,
}

fn empty() -> InternalBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

impl Cluster {
    pub fn new(
        registry: Arc<Registry>,
        self_url: String,
        secret: Vec<u8>,
        token_validity: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            // Below the peers' `http_idle_timeout` (default 120 s), so this side lets an idle
            // connection go before the peer closes it under a request.
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_initial_stream_window_size(2 * 1024 * 1024)
            .http2_initial_connection_window_size(4 * 1024 * 1024)
            .build(http);
        Self {
            registry,
            self_url,
            secret,
            token_validity,
            client,
            reservations: Mutex::default(),
            next_reservation: AtomicU64::new(1),
            metrics,
        }
    }

    fn token(&self) -> String {
        jwt::sign(&self.secret, &self.self_url, self.token_validity)
    }

    /// Verifies an internal call's token.
    pub fn verify(&self, token: Option<&str>) -> Result<String, jwt::JwtError> {
        jwt::verify(&self.secret, token.ok_or(jwt::JwtError::Malformed)?)
    }

    fn request(
        &self,
        method: http::Method,
        url: String,
        body: InternalBody,
    ) -> http::Request<InternalBody> {
        let mut req = http::Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = url.parse().unwrap_or_default();
        req.headers_mut().insert(
            INTERNAL_TOKEN_HEADER,
            http::HeaderValue::from_str(&self.token()).expect("JWT is ASCII"),
        );
        req
    }

    /// A signed internal call without a body; returns the status and the whole (small) body.
    async fn call(
        &self,
        method: http::Method,
        url: String,
    ) -> Result<(http::StatusCode, Bytes), String> {
        let resp = self
            .client
            .request(self.request(method, url, empty()))
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
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
    async fn reserve_at(&self, peer: &str, agent: &str, wait: Duration) -> Result<u64, String> {
        let url = format!(
            "{peer}/internal/v1/agents/{agent}/reserve?wait_ms={}",
            wait.as_millis()
        );
        let (status, body) = self
            .call(http::Method::POST, url)
            .await
            .map_err(|e| format!("{peer}: {e}"))?;
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if status.is_success() {
            text.parse()
                .map_err(|_| format!("{peer}: bad reservation id {text:?}"))
        } else {
            Err(format!("{peer}: {status}: {text}"))
        }
    }

    async fn release_at(&self, peer: &str, id: u64) {
        let url = format!("{peer}/internal/v1/reservations/{id}/release");
        if let Err(e) = self.call(http::Method::POST, url).await {
            tracing::debug!(peer, id, error = %e, "could not release a reservation; it will expire");
        }
    }

    /// Forwards a request for an agent that is not connected here.
    pub async fn forward_remote<B>(
        self: &Arc<Self>,
        wait: Duration,
        agent: &str,
        head: RequestHead,
        body: B,
    ) -> Result<ForwardResponse, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Display + Send,
    {
        let peers = match self.registry.replicas_for(agent).await {
            Ok(p) => p,
            Err(e) => {
                self.metrics.forwards.inc(&["registry_unavailable"]);
                return Err(ForwardError::ClusterUnavailable {
                    agent: agent.into(),
                    message: e.to_string(),
                });
            }
        };
        let peers: Vec<String> = peers.into_iter().filter(|p| *p != self.self_url).collect();
        if peers.is_empty() {
            return Err(ForwardError::NotConnected {
                agent: agent.into(),
            });
        }
        let mut attempts: FuturesUnordered<_> = peers
            .iter()
            .map(|p| {
                let p = p.clone();
                async move { (self.reserve_at(&p, agent, wait).await, p) }
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
        // Late reservations from the losers go back to their pools.
        let rest: Vec<_> = attempts.collect().await;
        for (r, peer) in rest {
            if let Ok(id) = r {
                let this = self.clone();
                tokio::spawn(async move { this.release_at(&peer, id).await });
            }
        }
        let Some((peer, id)) = winner else {
            self.metrics.forwards.inc(&["no_tunnel"]);
            tracing::info!(agent, tried = ?failures, "no replica had a ready tunnel");
            return Err(ForwardError::NoIdleTunnel {
                agent: agent.into(),
                waited: wait,
            });
        };
        let url = format!("{peer}/internal/v1/reservations/{id}/request");
        let method = http::Method::from_bytes(head.method.as_bytes()).unwrap_or(http::Method::GET);
        let boxed = body
            .map_err(|e| BoxError::from(e.to_string()))
            .boxed_unsync();
        let mut req = self.request(method, url, boxed);
        let h = req.headers_mut();
        for (k, v) in from_proto(&head.headers).iter() {
            h.append(k, v.clone());
        }
        let set = |h: &mut http::HeaderMap, k: &'static str, v: String| {
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        set(h, KIND_HEADER, head.kind.to_string());
        set(h, UPSTREAM_HEADER, head.upstream.clone());
        set(h, PATH_HEADER, head.path_and_query.clone());
        set(h, TIMEOUT_HEADER, head.timeout_millis.to_string());
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.forwards.inc(&["peer_failed"]);
                return Err(ForwardError::TunnelBroken {
                    agent: agent.into(),
                    message: format!("forwarding through replica {peer} failed: {e}"),
                });
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        if parts.headers.remove(ERROR_HEADER).is_some() {
            // Bounded: a peer's error is a small JSON document.
            let body = http_body_util::Limited::new(incoming, 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            self.metrics.forwards.inc(&["peer_error"]);
            return Err(ForwardError::from_wire(agent, &peer, &body));
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
        for peer in peers.into_iter().filter(|p| *p != self.self_url) {
            let url = format!("{peer}/internal/v1/agents");
            let fetched = async {
                let (_, body) = self.call(http::Method::GET, url).await?;
                serde_json::from_slice::<Vec<serde_json::Value>>(&body).map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(3), fetched).await {
                Ok(Ok(list)) => {
                    for mut v in list {
                        v["replica"] = peer.clone().into();
                        out.push(v);
                    }
                }
                Ok(Err(e)) => tracing::warn!(peer, error = %e, "could not list a replica's agents"),
                Err(_) => tracing::warn!(peer, "listing a replica's agents timed out"),
            }
        }
        Ok(out)
    }
}
