//! Egress through an HTTP proxy with CONNECT, for agents in networks that only allow that.
//!
//! TLS to the gateway runs end to end inside the CONNECT tunnel: the proxy sees only the
//! target host and port, never the plaintext.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP proxy to dial through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `host:port` of the proxy.
    pub authority: String,
    /// `user:password` for Basic proxy authentication, if the URL carried credentials.
    pub credentials: Option<String>,
    /// The proxy URL without credentials, for messages.
    pub display: String,
}

/// Why the proxy did not give us a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy URL {0:?}: expected http://[user:password@]host:port")]
    InvalidUrl(String),
    #[error("cannot connect to proxy {proxy}: {source}")]
    Connect {
        proxy: String,
        source: std::io::Error,
    },
    #[error("proxy {proxy} refused CONNECT to {target}: {status_line}")]
    Refused {
        proxy: String,
        target: String,
        status_line: String,
    },
    #[error("proxy {proxy} sent an invalid answer to CONNECT: {detail}")]
    BadResponse { proxy: String, detail: String },
}

impl ProxyConfig {
    /// Parses `http://[user:password@]host[:port]`; the port defaults to 80.
    pub fn parse(input: &str) -> Result<Self, ProxyError> {
        let with_scheme = if input.contains("://") {
            input.to_string()
        } else {
            format!("http://{input}")
        };
        let url =
            url::Url::parse(&with_scheme).map_err(|_| ProxyError::InvalidUrl(input.into()))?;
        if url.scheme() != "http" {
            return Err(ProxyError::InvalidUrl(input.into()));
        }
        let host = url
            .host_str()
            .ok_or_else(|| ProxyError::InvalidUrl(input.into()))?;
        let port = url.port().unwrap_or(80);
        let authority = format!("{host}:{port}");
        let credentials = if url.username().is_empty() {
            None
        } else {
            let user = percent_decode(url.username());
            let pass = percent_decode(url.password().unwrap_or(""));
            Some(format!("{user}:{pass}"))
        };
        Ok(Self {
            display: format!("http://{authority}"),
            authority,
            credentials,
        })
    }

    /// The proxy to use for `host` according to `--proxy`, then `HTTPS_PROXY` (TLS schemes)
    /// or `HTTP_PROXY` (cleartext schemes), honouring `NO_PROXY`. Lowercase forms count too.
    pub fn from_env(host: &str, tls: bool) -> Result<Option<Self>, ProxyError> {
        let get = |name: &str| {
            std::env::var(name)
                .or_else(|_| std::env::var(name.to_lowercase()))
                .ok()
                .filter(|v| !v.is_empty())
        };
        if let Some(no_proxy) = get("NO_PROXY") {
            if no_proxy_matches(&no_proxy, host) {
                return Ok(None);
            }
        }
        let var = if tls { "HTTPS_PROXY" } else { "HTTP_PROXY" };
        get(var).map(|v| Self::parse(&v)).transpose()
    }

    /// Opens a TCP connection to the proxy and asks it for a tunnel to `target` (`host:port`).
    pub async fn connect(&self, target: &str, deadline: Duration) -> Result<TcpStream, ProxyError> {
        let fut = self.connect_inner(target);
        match tokio::time::timeout(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Connect {
                proxy: self.display.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            }),
        }
    }

    async fn connect_inner(&self, target: &str) -> Result<TcpStream, ProxyError> {
        let io_err = |source| ProxyError::Connect {
            proxy: self.display.clone(),
            source,
        };
        let mut stream = TcpStream::connect(&self.authority).await.map_err(io_err)?;
        crate::set_nodelay(&stream);
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = &self.credentials {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c);
            req.push_str(&format!("Proxy-Authorization: Basic {b64}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.map_err(io_err)?;
        read_connect_reply(&mut stream, &self.display, target).await?;
        Ok(stream)
    }
}

/// Reads the proxy's answer to CONNECT: a response head of at most 16 KiB, byte by byte so
/// that no tunnel bytes are consumed; `Ok` for a 2xx status. The answer is remote input.
pub(crate) async fn read_connect_reply<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    proxy: &str,
    target: &str,
) -> Result<(), ProxyError> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(ProxyError::BadResponse {
                proxy: proxy.to_string(),
                detail: "response head larger than 16 KiB".into(),
            });
        }
        let b = stream
            .read_u8()
            .await
            .map_err(|e| ProxyError::BadResponse {
                proxy: proxy.to_string(),
                detail: format!("connection ended during the response: {e}"),
            })?;
        head.push(b);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line: String = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(200)
        .collect();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if !code.starts_with('2') {
        return Err(ProxyError::Refused {
            proxy: proxy.to_string(),
            target: target.to_string(),
            status_line,
        });
    }
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `NO_PROXY` (comma-separated hosts, domain suffixes with or without a leading dot,
/// or `*`) covers `host`.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let entry = entry.to_ascii_lowercase();
            let entry = entry.split(':').next().unwrap_or("");
            if entry == "*" {
                return true;
            }
            let suffix = entry.trim_start_matches('.');
            host == suffix || host.ends_with(&format!(".{suffix}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls() {
        let p = ProxyConfig::parse("http://u%40x:p%3Aw@proxy:3128").unwrap();
        assert_eq!(p.authority, "proxy:3128");
        assert_eq!(p.credentials.as_deref(), Some("u@x:p:w"));
        assert_eq!(p.display, "http://proxy:3128");
        assert_eq!(
            ProxyConfig::parse("proxy:8080").unwrap().authority,
            "proxy:8080"
        );
        assert!(ProxyConfig::parse("socks5://proxy:1080").is_err());
    }

    #[test]
    fn no_proxy_rules() {
        assert!(no_proxy_matches("localhost,127.0.0.1", "127.0.0.1"));
        assert!(no_proxy_matches(".example.com", "gw.example.com"));
        assert!(no_proxy_matches("example.com", "gw.example.com"));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("", "x"));
    }
}
