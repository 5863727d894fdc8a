//! Parsing of the gateway URL an agent is given.

use std::fmt;

use crate::TransportKind;

/// The four URL schemes an agent accepts.
/// The default port of a scheme.
fn default_port(kind: TransportKind) -> u16 {
    if kind.is_tls() {
        443
    } else {
        80
    }
}

/// Why a gateway URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemeError {
    #[error("invalid gateway URL {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    #[error(
        "unsupported or missing URL scheme {scheme:?} in {url:?}; use one of grpc://host:port, \
         grpcs://host:port, ws://host:port/path or wss://host:port/path"
    )]
    UnknownScheme { url: String, scheme: String },
}

/// A parsed gateway URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// The URL scheme is the transport: `grpc`, `grpcs`, `ws` or `wss`.
    pub scheme: TransportKind,
    pub host: String,
    pub port: u16,
    /// Request path for WebSocket schemes (always starts with `/`); `/` for gRPC schemes.
    pub path: String,
}

impl ServerUrl {
    pub fn parse(input: &str) -> Result<Self, SchemeError> {
        let parsed = url::Url::parse(input).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => SchemeError::UnknownScheme {
                url: input.to_string(),
                scheme: String::new(),
            },
            e => SchemeError::Invalid {
                url: input.to_string(),
                reason: e.to_string(),
            },
        })?;
        let scheme = match parsed.scheme() {
            "grpc" => TransportKind::Grpc,
            "grpcs" => TransportKind::Grpcs,
            "ws" => TransportKind::Ws,
            "wss" => TransportKind::Wss,
            other => {
                return Err(SchemeError::UnknownScheme {
                    url: input.to_string(),
                    scheme: other.to_string(),
                })
            }
        };
        let host = match parsed.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => {
                return Err(SchemeError::Invalid {
                    url: input.to_string(),
                    reason: "missing host".into(),
                })
            }
        };
        let port = parsed.port().unwrap_or(default_port(scheme));
        let mut path = parsed.path().to_string();
        if path.is_empty() {
            path.push('/');
        }
        if let Some(q) = parsed.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Self {
            scheme,
            host,
            port,
            path,
        })
    }

    /// `host:port`, with brackets around IPv6 literals.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The same host and port with another scheme (used when an agent probes direct gRPC for a
    /// WebSocket URL).
    pub fn with_scheme(&self, scheme: TransportKind) -> Self {
        Self {
            scheme,
            path: if scheme.is_websocket() {
                self.path.clone()
            } else {
                "/".into()
            },
            ..self.clone()
        }
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.scheme {
            TransportKind::Grpc => "grpc",
            TransportKind::Grpcs => "grpcs",
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
        };
        if self.scheme.is_websocket() {
            write!(f, "{s}://{}{}", self.authority(), self.path)
        } else {
            write!(f, "{s}://{}", self.authority())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_schemes() {
        let u = ServerUrl::parse("grpc://127.0.0.1:8150").unwrap();
        assert_eq!(
            (u.scheme, u.port, u.path.as_str()),
            (TransportKind::Grpc, 8150, "/")
        );
        let u = ServerUrl::parse("grpcs://gw.example.com").unwrap();
        assert_eq!((u.scheme, u.port), (TransportKind::Grpcs, 443));
        let u = ServerUrl::parse("ws://h:1/-/agent/").unwrap();
        assert_eq!(
            (u.scheme, u.path.as_str()),
            (TransportKind::Ws, "/-/agent/")
        );
        let u = ServerUrl::parse("wss://[::1]:9/x?y=1").unwrap();
        assert_eq!(u.authority(), "[::1]:9");
        assert_eq!(u.path, "/x?y=1");
        assert_eq!(u.to_string(), "wss://[::1]:9/x?y=1");
    }

    #[test]
    fn unknown_scheme_lists_the_four() {
        let err = ServerUrl::parse("https://gw:443").unwrap_err();
        let msg = err.to_string();
        for s in ["grpc://", "grpcs://", "ws://", "wss://", "\"https\""] {
            assert!(msg.contains(s), "{msg} lacks {s}");
        }
        let msg = ServerUrl::parse("127.0.0.1:8150").unwrap_err().to_string();
        assert!(msg.contains("wss://"), "{msg}");
        assert!(matches!(
            ServerUrl::parse("grpc://"),
            Err(SchemeError::Invalid { .. })
        ));
    }

    #[test]
    fn with_scheme_drops_path_for_grpc() {
        let u = ServerUrl::parse("wss://gw:8443/-/agent/").unwrap();
        let g = u.with_scheme(TransportKind::Grpcs);
        assert_eq!(g.to_string(), "grpcs://gw:8443");
    }
}
