//! The agent port's accept loop: limits first, then each connection classified in its own
//! task and handed to the gRPC server.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::accept::accept_until;
use super::classify::classify;
use super::limit::ConnectionLimit;
use super::server_conn::ServerConn;
use super::{ConnMeta, IngressObserver, IngressSettings, RejectReason};
use crate::log_budget::PRE_AUTH_LOG;
use crate::pre_auth_budget::{BudgetExceeded, PreAuthBudget};

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
                let tripped = Arc::new(AtomicBool::new(false));
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
                        let conn = ServerConn::new(io, meta, observer, &settings, permit, source);
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
