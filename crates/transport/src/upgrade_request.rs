//! The HTTP/1.1 request that opens a `ws`/`wss` connection, read and checked before the
//! WebSocket library sees it.
//!
//! tungstenite closes the connection without a byte for most requests that are not a
//! WebSocket upgrade, so a person with curl, a health checker pointed at the wrong port, or a
//! gRPC client behind a proxy that turned HTTP/2 into HTTP/1.1 saw only "empty reply". Here
//! each of them gets an HTTP answer with one sentence saying what the port expects, and the
//! gateway a reject reason of its own.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ingress::RejectReason;
use crate::websocket::WS_SUBPROTOCOL;

/// The largest request head read (request line and headers), as the HTTP/2 side's header
/// list limit; past it the answer is 431.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Headers parsed at most; more is answered 431 too.
const MAX_HEADERS: usize = 64;

/// An HTTP answer refusing the request, and what the gateway logs and counts.
#[derive(Debug)]
pub struct Refusal {
    pub status: http::StatusCode,
    pub reason: RejectReason,
    /// The sentence for the client (the answer's body) and the log line.
    pub sentence: String,
    /// Extra response header lines (`Name: value`).
    headers: Vec<&'static str>,
}

impl Refusal {
    fn new(status: http::StatusCode, reason: RejectReason, sentence: String) -> Self {
        Self {
            status,
            reason,
            sentence,
            headers: Vec::new(),
        }
    }

    /// Writes the answer (the caller bounds the time it may take).
    pub async fn send<S: AsyncWrite + Unpin>(&self, io: &mut S) -> io::Result<()> {
        let body = format!("{}\n", self.sentence);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        );
        for h in &self.headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head.push_str(&body);
        io.write_all(head.as_bytes()).await?;
        io.flush().await?;
        io.shutdown().await
    }
}

/// Reads the request head (and whatever bytes came with it, which the caller replays) and
/// checks it is a WebSocket upgrade. The caller applies the deadline.
pub async fn read_upgrade<S: AsyncRead + Unpin>(
    io: &mut S,
) -> io::Result<Result<Vec<u8>, Refusal>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {} bytes, inside the HTTP/1.1 request head",
                    buf.len()
                ),
            ));
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        // Parse only once the head can be whole (a blank line arrived), so a client that
        // trickles bytes costs one scan of them, not one per byte.
        let ended = buf[searched_from..].windows(2).any(|w| w == b"\n\n")
            || buf[searched_from..].windows(3).any(|w| w == b"\n\r\n");
        if !ended && buf.len() <= MAX_REQUEST_HEAD {
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => return Ok(check(&req).map(|()| buf)),
            Ok(httparse::Status::Partial) if buf.len() <= MAX_REQUEST_HEAD => continue,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Ok(Err(Refusal::new(
                    http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    RejectReason::WsUpgradeError,
                    format!(
                        "agentgate: the request head is over {} KiB or {MAX_HEADERS} headers; \
                         a WebSocket upgrade needs only a few small headers",
                        MAX_REQUEST_HEAD / 1024
                    ),
                )))
            }
            // HTTP/2 after TLS that did not agree on it: the client (or a proxy re-encrypting
            // towards the gateway) did not offer h2 in ALPN.
            Err(_) if buf.starts_with(b"PRI * HTTP/2.0") => {
                return Ok(Err(Refusal::new(
                    http::StatusCode::BAD_REQUEST,
                    RejectReason::BadPreface,
                    "agentgate: the client sent HTTP/2 but did not offer it in TLS (ALPN h2); \
                     configure the client, or the proxy in front, to offer h2 (for example \
                     nginx's grpc_pass grpcs://, not proxy_pass)"
                        .to_string(),
                )))
            }
            Err(e) => {
                return Ok(Err(Refusal::new(
                    http::StatusCode::BAD_REQUEST,
                    RejectReason::WsUpgradeError,
                    format!("agentgate: this is not a well-formed HTTP/1.1 request ({e})"),
                )))
            }
        }
    }
}

/// The value of header `name` (case-insensitive), if present and text.
fn header<'a>(req: &'a httparse::Request<'_, '_>, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn lists(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether a request path names a gRPC method (`/package.Service/Method`).
fn looks_like_grpc_method(path: &str) -> bool {
    let mut parts = path.trim_start_matches('/').split('/');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(service), Some(method), None) if service.contains('.') && !method.is_empty()
    )
}

fn check(req: &httparse::Request<'_, '_>) -> Result<(), Refusal> {
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("");
    let grpc = header(req, "content-type").is_some_and(|v| v.starts_with("application/grpc"))
        || (method == "POST" && looks_like_grpc_method(path));
    if grpc {
        return Err(Refusal::new(
            http::StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            RejectReason::GrpcOverHttp1,
            "agentgate: this gRPC call arrived over HTTP/1.1, but gRPC needs HTTP/2: something \
             in between (a proxy or load balancer) downgraded it. Let HTTP/2 through (h2c, or \
             TLS with ALPN h2), or give the agent a ws:// or wss:// URL, which works over \
             HTTP/1.1"
                .into(),
        ));
    }
    if method == "GET"
        && header(req, "upgrade").is_none()
        && (header(req, "sec-websocket-key").is_some()
            || header(req, "sec-websocket-protocol").is_some())
    {
        let mut refusal = Refusal::new(
            http::StatusCode::UPGRADE_REQUIRED,
            RejectReason::NotAnUpgrade,
            "agentgate: this WebSocket upgrade arrived without its Upgrade header: a proxy in \
             between removed it (Upgrade and Connection are hop-by-hop). nginx needs \
             proxy_http_version 1.1 and proxy_set_header Upgrade/Connection; through a forward \
             proxy use wss://, which goes through CONNECT"
                .into(),
        );
        refusal.headers = vec!["Upgrade: websocket"];
        return Err(refusal);
    }
    if method != "GET" || !lists(header(req, "upgrade"), "websocket") {
        let mut refusal = Refusal::new(
            http::StatusCode::UPGRADE_REQUIRED,
            RejectReason::NotAnUpgrade,
            format!(
                "agentgate: this is an agent port: it serves gRPC over HTTP/2 (grpc://, \
                 grpcs://) and gRPC inside a WebSocket (ws://, wss://, subprotocol \
                 {WS_SUBPROTOCOL}), and this {} request is neither. Health checks belong on \
                 the admin port (/healthz)",
                method.chars().take(16).collect::<String>()
            ),
        );
        refusal.headers = vec!["Upgrade: websocket"];
        return Err(refusal);
    }
    // tungstenite refuses these later, and the connection closed without an answer.
    if req.version != Some(1) {
        return Err(Refusal::new(
            http::StatusCode::BAD_REQUEST,
            RejectReason::WsUpgradeError,
            "agentgate: a WebSocket upgrade needs HTTP/1.1 (RFC 6455) and this request is \
             HTTP/1.0; a proxy in between may speak HTTP/1.0 to the gateway (nginx: \
             proxy_http_version 1.1)"
                .into(),
        ));
    }
    let has_body = header(req, "transfer-encoding").is_some()
        || header(req, "content-length").is_some_and(|n| n.trim() != "0");
    if has_body {
        return Err(Refusal::new(
            http::StatusCode::BAD_REQUEST,
            RejectReason::WsUpgradeError,
            "agentgate: a WebSocket upgrade has no body, and this one announces one \
             (Content-Length or Transfer-Encoding)"
                .into(),
        ));
    }
    if !lists(header(req, "connection"), "upgrade") {
        return Err(Refusal::new(
            http::StatusCode::BAD_REQUEST,
            RejectReason::WsUpgradeError,
            "agentgate: a WebSocket upgrade needs \"Connection: Upgrade\"; a proxy in between \
             may have dropped it (nginx: proxy_set_header Connection \"upgrade\")"
                .into(),
        ));
    }
    if header(req, "sec-websocket-key").is_none_or(|k| k.trim().is_empty()) {
        return Err(Refusal::new(
            http::StatusCode::BAD_REQUEST,
            RejectReason::WsUpgradeError,
            "agentgate: a WebSocket upgrade needs a Sec-WebSocket-Key header".into(),
        ));
    }
    if header(req, "sec-websocket-version").map(str::trim) != Some("13") {
        let mut refusal = Refusal::new(
            http::StatusCode::UPGRADE_REQUIRED,
            RejectReason::WsUpgradeError,
            "agentgate: only WebSocket version 13 (RFC 6455) is spoken here".into(),
        );
        refusal.headers = vec!["Sec-WebSocket-Version: 13"];
        return Err(refusal);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer_to(request: &[u8]) -> Result<Vec<u8>, Refusal> {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(request).await.unwrap();
        read_upgrade(&mut server).await.unwrap()
    }

    const UPGRADE: &[u8] = b"GET /agentgate HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n";

    #[tokio::test]
    async fn an_upgrade_passes_with_every_byte_read_kept_for_replay() {
        let mut sent = UPGRADE.to_vec();
        sent.extend_from_slice(b"\x82\x00");
        let kept = answer_to(&sent).await.expect("an upgrade passes");
        assert_eq!(kept, sent);
    }

    #[tokio::test]
    async fn other_requests_are_answered_with_what_the_port_serves() {
        let cases: [(&[u8], u16, RejectReason, &str); 10] = [
            (
                b"GET / HTTP/1.1\r\nHost: g\r\n\r\n",
                426,
                RejectReason::NotAnUpgrade,
                "agent port",
            ),
            (
                b"POST /agentgate.v1.Tunnel/Connect HTTP/1.1\r\nHost: g\r\n\r\n",
                505,
                RejectReason::GrpcOverHttp1,
                "needs HTTP/2",
            ),
            (
                b"POST /x HTTP/1.1\r\ncontent-type: application/grpc+proto\r\n\r\n",
                505,
                RejectReason::GrpcOverHttp1,
                "downgraded",
            ),
            (
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: a\r\n\r\n",
                400,
                RejectReason::WsUpgradeError,
                "Connection: Upgrade",
            ),
            (
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                400,
                RejectReason::WsUpgradeError,
                "Sec-WebSocket-Key",
            ),
            (
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                  Sec-WebSocket-Key: a\r\nSec-WebSocket-Version: 8\r\n\r\n",
                426,
                RejectReason::WsUpgradeError,
                "version 13",
            ),
            (
                b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                  Sec-WebSocket-Key: a\r\nSec-WebSocket-Version: 13\r\n\r\n",
                400,
                RejectReason::WsUpgradeError,
                "proxy_http_version 1.1",
            ),
            (
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                  Sec-WebSocket-Key: a\r\nSec-WebSocket-Version: 13\r\n\
                  Content-Length: 5\r\n\r\nhello",
                400,
                RejectReason::WsUpgradeError,
                "has no body",
            ),
            (
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                  Sec-WebSocket-Key: a\r\nSec-WebSocket-Version: 13\r\n\
                  Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                400,
                RejectReason::WsUpgradeError,
                "has no body",
            ),
            (
                b"GET / HTTP/9\r\n\r\n",
                400,
                RejectReason::WsUpgradeError,
                "well-formed",
            ),
        ];
        for (request, status, reason, says) in cases {
            let refusal = answer_to(request).await.expect_err("refused");
            assert_eq!(refusal.status.as_u16(), status, "{refusal:?}");
            assert_eq!(refusal.reason, reason, "{refusal:?}");
            assert!(refusal.sentence.contains(says), "{refusal:?}");
        }
    }

    #[tokio::test]
    async fn an_oversized_head_is_431_without_reading_on() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD + 10));
        let refusal = answer_to(&big).await.expect_err("refused");
        assert_eq!(
            refusal.status,
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[tokio::test]
    async fn the_answer_is_http_with_the_sentence_as_its_body() {
        let refusal = answer_to(b"GET / HTTP/1.1\r\n\r\n").await.unwrap_err();
        let (mut client, mut server) = tokio::io::duplex(4096);
        refusal.send(&mut server).await.unwrap();
        drop(server);
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert!(
            got.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{got}"
        );
        assert!(got.contains("\r\nUpgrade: websocket\r\n"), "{got}");
        let body = got.split("\r\n\r\n").nth(1).unwrap();
        assert!(
            got.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{got}"
        );
        assert!(
            body.starts_with("agentgate: this is an agent port"),
            "{body}"
        );
    }
}
