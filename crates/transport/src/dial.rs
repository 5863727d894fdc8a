//! The agent's side: dialing the gateway over one of the four schemes.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::connect_proxy::{ProxyConfig, ProxyError};
use crate::kind::TransportKind;
use crate::scheme::ServerUrl;
use crate::tls::{ALPN_H2, ALPN_HTTP1};
use crate::websocket::{WsByteStream, WsSettings, WS_SUBPROTOCOL};
use crate::{set_nodelay, BoxedIo, Io};

/// Everything needed to dial the gateway, except the URL (which auto-upgrade varies).
#[derive(Clone)]
pub struct DialSettings {
    /// Base TLS client configuration; ALPN is set per dial.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Name to verify the certificate against, instead of the URL's host.
    pub server_name: Option<String>,
    /// Extra headers for the WebSocket upgrade request (Authorization among them).
    pub upgrade_headers: http::HeaderMap,
    pub ws: WsSettings,
    /// Deadline for TCP connect, proxy CONNECT, TLS handshake and WebSocket upgrade, each.
    pub connect_timeout: Duration,
    /// Explicit proxy (`--proxy`); `None` means: consult the environment.
    pub proxy: Option<ProxyConfig>,
    /// Whether to read `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` when `proxy` is `None`.
    pub proxy_from_env: bool,
    /// Source address for direct TCP connections (`None`: the OS chooses).
    pub local_ip: Option<std::net::IpAddr>,
}

/// Why a dial failed. Each variant says which step broke.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{step} to {addr} timed out after {after:?}")]
    Timeout {
        step: &'static str,
        addr: String,
        after: Duration,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("{0} needs TLS settings")]
    NoTls(String),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error(
        "{addr} did not negotiate HTTP/2 (ALPN {negotiated}); something in between does not \
         pass HTTP/2 through: use a ws:// or wss:// URL for this path"
    )]
    NoHttp2 { addr: String, negotiated: String },
    #[error("WebSocket upgrade to {url} refused with HTTP {status}: {body}{}", refusal_hint(*.status))]
    WsRejected {
        url: String,
        status: u16,
        body: String,
    },
    #[error("WebSocket upgrade to {url} failed: {detail}")]
    WsHandshake { url: String, detail: String },
}

/// Dials `url` and returns a byte stream that carries the agent's HTTP/2 connection: raw for
/// `grpc`/`grpcs`, inside a WebSocket for `ws`/`wss`.
pub async fn dial(url: &ServerUrl, s: &DialSettings) -> Result<BoxedIo, DialError> {
    let addr = url.authority();
    let tcp = connect_tcp(url, s).await?;
    let io: BoxedIo = if url.scheme.is_tls() {
        let alpn = if url.scheme.is_websocket() {
            ALPN_HTTP1
        } else {
            ALPN_H2
        };
        let base = s
            .tls
            .clone()
            .ok_or_else(|| DialError::NoTls(url.to_string()))?;
        let mut cfg = (*base).clone();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let name = s.server_name.clone().unwrap_or_else(|| url.host.clone());
        let server_name = rustls_pki_types::ServerName::try_from(name.clone())
            .map_err(|_| DialError::ServerName(name))?;
        let connector = TlsConnector::from(Arc::new(cfg));
        let tls = step(
            s.connect_timeout,
            "TLS handshake",
            &addr,
            connector.connect(server_name, tcp),
        )
        .await?
        .map_err(|source| {
            if url.scheme == TransportKind::Grpcs && refused_alpn(&source) {
                DialError::NoHttp2 {
                    addr: addr.clone(),
                    negotiated: "refused by the server (no_application_protocol alert)".into(),
                }
            } else {
                DialError::Tls {
                    addr: addr.clone(),
                    reason: explain_tls_failure(&source, &GATEWAY_TLS_PEER),
                }
            }
        })?;
        if url.scheme == TransportKind::Grpcs {
            let negotiated = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            if negotiated.as_deref() != Some(ALPN_H2) {
                return Err(DialError::NoHttp2 {
                    addr,
                    negotiated: negotiated
                        .map(|p| String::from_utf8_lossy(&p).into_owned())
                        .unwrap_or_else(|| "none".into()),
                });
            }
            Box::new(tls)
        } else {
            websocket(url, tls, s).await?
        }
    } else if url.scheme.is_websocket() {
        websocket(url, tcp, s).await?
    } else {
        Box::new(tcp)
    };
    Ok(io)
}

/// Whether the server aborted the handshake because it speaks none of our ALPN protocols
/// (nginx without `http2` does this when offered only `h2`).
/// Who a TLS client is talking to, and how its operator mends each failure: the words of
/// [`explain_tls_failure`]'s sentences, so the agent dialing the gateway and the gateway
/// dialing a backend share one table of TLS failures.
pub struct TlsPeer {
    /// Who presents the certificate: "the gateway".
    pub name: &'static str,
    /// Who checks it: "this agent".
    pub truster: &'static str,
    /// How to trust the CA that signed it: "give that CA's certificate with --ca-cert".
    pub trust: &'static str,
    /// How to pick a name its certificate carries.
    pub server_name: &'static str,
    /// What to do when the port is cleartext: "use grpc:// or ws://".
    pub cleartext: &'static str,
    /// What to do when the certificate expired.
    pub renew: &'static str,
}

/// The gateway, as the agent sees it.
pub const GATEWAY_TLS_PEER: TlsPeer = TlsPeer {
    name: "the gateway",
    truster: "this agent",
    trust: "give that CA's certificate with --ca-cert",
    server_name: "connect with a name it carries, or set --tls-server-name",
    cleartext: "use grpc:// or ws://",
    renew: "renew it (the gateway reloads it without a restart)",
};

/// A TLS failure in plain words, with what to do: rustls's own names (`CaUsedAsEndEntity`,
/// `BadSignature`) say nothing to someone who made a certificate with openssl.
pub fn explain_tls_failure(e: &std::io::Error, peer: &TlsPeer) -> String {
    use rustls::CertificateError as C;
    let TlsPeer {
        name,
        truster,
        trust,
        server_name,
        cleartext,
        renew,
    } = peer;
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => format!(
                "the server closed the connection during the TLS handshake ({e}); if this \
                 port is cleartext, {cleartext}"
            ),
            _ => e.to_string(),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => format!(
                "{name} presents a CA certificate as its own (what `openssl req -x509` makes); \
                 make a CA, sign a server certificate with it, serve that one, and {trust}"
            ),
            C::UnknownIssuer | C::BadSignature => {
                format!("{name}'s certificate is not signed by a CA {truster} trusts; {trust}")
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("{name}'s certificate does not carry the name in the URL; {server_name}")
            }
            C::Expired | C::ExpiredContext { .. } => {
                format!("{name}'s certificate has expired; {renew}")
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("{name}'s certificate is not valid yet; check this machine's clock")
            }
            other => format!("{name}'s certificate was refused ({other:?})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("the server did not answer TLS; if this port is cleartext, {cleartext}")
        }
        other => other.to_string(),
    }
}

/// A refusal's body as one short line: a proxy's HTML error page becomes its title (or its
/// text without tags), white space and control characters fold into single spaces.
fn refusal_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let lower = text.to_ascii_lowercase();
    let inner = match (lower.find("<title>"), lower.find("</title>")) {
        (Some(a), Some(b)) if a + 7 <= b => text[a + 7..b].to_string(),
        _ => {
            let mut out = String::new();
            let mut in_tag = false;
            for c in text.chars() {
                match c {
                    '<' => in_tag = true,
                    '>' if in_tag => {
                        in_tag = false;
                        out.push(' ');
                    }
                    c if !in_tag => out.push(c),
                    _ => {}
                }
            }
            out
        }
    };
    let words: Vec<&str> = inner
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let line = words.join(" ");
    if line.chars().count() <= 400 {
        return line;
    }
    let mut cut: String = line.chars().take(400).collect();
    if let Some(space) = cut.rfind(' ') {
        cut.truncate(space);
    }
    cut + " ..."
}

/// What to check after a proxy (or the gateway) answered an agent's WebSocket upgrade or gRPC
/// call with HTTP `status` instead of taking it.
pub fn refusal_hint(status: u16) -> &'static str {
    match status {
        404 => "; check the URL's path: a proxy in front routes only some paths to the gateway",
        401 | 403 => "; a proxy in front refused the agent: check its access rules",
        426 => {
            "; the request reached the gateway without its upgrade: a proxy in between dropped \
             the Upgrade and Connection headers (nginx: proxy_http_version 1.1; proxy_set_header \
             Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\")"
        }
        502..=504 => "; the proxy in front could not reach the gateway (is it running?)",
        505 => {
            "; something in between speaks HTTP/1.1 to the gateway: let HTTP/2 through (nginx: \
             grpc_pass, not proxy_pass), or use a ws:// or wss:// URL"
        }
        _ => "",
    }
}

fn refused_alpn(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

async fn step<F: std::future::Future>(
    after: Duration,
    step: &'static str,
    addr: &str,
    fut: F,
) -> Result<F::Output, DialError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| DialError::Timeout {
            step,
            addr: addr.to_string(),
            after,
        })
}

/// Connects to `addr`, from `local_ip` if given (load generators spread many connections over
/// 127.0.0.x source addresses to get past one address's ephemeral ports).
async fn connect_from(
    addr: &str,
    local_ip: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(ip) = local_ip else {
        return TcpStream::connect(addr).await;
    };
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
        match socket.connect(target).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
}

async fn connect_tcp(url: &ServerUrl, s: &DialSettings) -> Result<TcpStream, DialError> {
    let addr = url.authority();
    let proxy = match &s.proxy {
        Some(p) => Some(p.clone()),
        None if s.proxy_from_env => ProxyConfig::from_env(&url.host, url.scheme.is_tls())?,
        None => None,
    };
    if let Some(proxy) = proxy {
        tracing::debug!(proxy = %proxy.display, target = %addr, "dialing through HTTP proxy");
        return Ok(proxy.connect(&addr, s.connect_timeout).await?);
    }
    let tcp = step(
        s.connect_timeout,
        "TCP connect",
        &addr,
        connect_from(&addr, s.local_ip),
    )
    .await?
    .map_err(|source| DialError::Connect {
        addr: addr.clone(),
        source,
    })?;
    set_nodelay(&tcp);
    Ok(tcp)
}

async fn websocket<S: Io>(url: &ServerUrl, io: S, s: &DialSettings) -> Result<BoxedIo, DialError> {
    let ws_url = url.to_string();
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| DialError::WsHandshake {
            url: ws_url.clone(),
            detail: e.to_string(),
        })?;
    for (k, v) in &s.upgrade_headers {
        req.headers_mut().append(k, v.clone());
    }
    req.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(WS_SUBPROTOCOL),
    );
    let cfg = s.ws.tungstenite_config();
    let fut = tokio_tungstenite::client_async_with_config(req, io, Some(cfg));
    let (ws, resp) = step(
        s.connect_timeout,
        "WebSocket upgrade",
        &url.authority(),
        fut,
    )
    .await?
    .map_err(|e| match e {
        WsError::Http(resp) => DialError::WsRejected {
            url: ws_url.clone(),
            status: resp.status().as_u16(),
            body: resp
                .body()
                .as_ref()
                .map(|b| refusal_text(b))
                .unwrap_or_default(),
        },
        WsError::Protocol(tokio_tungstenite::tungstenite::error::ProtocolError::HttparseError(
            _,
        )) if !ws_url.starts_with("wss:") => DialError::WsHandshake {
            url: ws_url.clone(),
            detail: "the server did not answer plain HTTP; if it speaks TLS on this port, \
                         use wss:// (or grpcs://)"
                .into(),
        },
        other => DialError::WsHandshake {
            url: ws_url.clone(),
            detail: other.to_string(),
        },
    })?;
    let agreed = resp
        .headers()
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    if agreed != Some(WS_SUBPROTOCOL) {
        return Err(DialError::WsHandshake {
            url: ws_url,
            detail: format!(
                "server did not agree to subprotocol {WS_SUBPROTOCOL:?} (got {agreed:?})"
            ),
        });
    }
    Ok(Box::new(WsByteStream::new(ws, &s.ws)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxys_html_page_becomes_one_line() {
        let page = b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center>\
            <h1>404 Not Found</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n\
            </html>\r\n";
        assert_eq!(refusal_text(page), "404 Not Found");
        assert_eq!(refusal_text(b"<h1>Bad</h1>\n<p>no\tway</p>"), "Bad no way");
        assert_eq!(
            refusal_text(b"agentgate: offer ws-tunnel\n"),
            "agentgate: offer ws-tunnel"
        );
    }
}
