//! What kind of connection this is: TLS and its ALPN, the cleartext sniff, and the
//! WebSocket upgrade, each under the handshake deadline.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

use super::{IngressSettings, RejectReason};
use crate::pre_auth_budget::PreAuthBudget;
use crate::sniff::{read_prefix, PrefixClass, PrefixedIo};
use crate::upgrade_request;
use crate::websocket::{RawBytesIn, WsByteStream, WS_SUBPROTOCOL};
use crate::{BoxedIo, Io, TransportKind};

/// A connection refused before classification ended, and the sentence saying why.
type Rejection = (RejectReason, String);

/// Classifies one accepted connection (see the module docs of `ingress`).
pub(super) async fn classify(
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
    let raw_in = Arc::new(AtomicU64::new(0));
    let io = RawBytesIn::new(PrefixedIo::new(head.into(), io), raw_in.clone());
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
        Ok(Ok(ws)) => Ok(Box::new(
            WsByteStream::new(ws, &settings.ws).watching_overhead(raw_in),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocol_offer_parsing() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        assert!(offers_ws_tunnel(Some(&v("ws-tunnel"))));
        assert!(offers_ws_tunnel(Some(&v("chat, ws-tunnel"))));
        assert!(!offers_ws_tunnel(Some(&v("ws-tunnel2"))));
        assert!(!offers_ws_tunnel(None));
    }
}
