//! The label every connection carries.

use std::fmt;

/// How an agent's HTTP/2 connection reached the gateway. Above the transport layer this is a
/// label for logs and metrics, nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Cleartext HTTP/2 with prior knowledge (h2c).
    Grpc,
    /// HTTP/2 over TLS, negotiated with ALPN `h2`.
    Grpcs,
    /// HTTP/2 as a byte stream inside a cleartext WebSocket.
    Ws,
    /// HTTP/2 as a byte stream inside a WebSocket inside TLS.
    Wss,
}

impl TransportKind {
    /// All kinds, in a fixed order (for pre-declaring metric series).
    pub const ALL: [TransportKind; 4] = [Self::Grpc, Self::Grpcs, Self::Ws, Self::Wss];

    /// The lower-case label: `grpc`, `grpcs`, `ws` or `wss`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Grpcs => "grpcs",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }

    /// Whether the HTTP/2 connection is wrapped in a WebSocket.
    pub fn is_websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }

    /// Whether TLS protects the connection.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Grpcs | Self::Wss)
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
