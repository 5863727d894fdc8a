//! How bytes reach agentgate.
//!
//! This crate knows about TCP, TLS and ALPN, the 24-byte HTTP/2 preface sniff, WebSocket
//! framing as a plain byte stream, the four agent URL schemes, and HTTP CONNECT proxies. It
//! knows nothing of gRPC services, agents or tokens: the gateway receives a stream of
//! [`ServerConn`]s, each an `AsyncRead + AsyncWrite` labelled with its [`TransportKind`], and the
//! agent receives a [`BoxedIo`] from [`dial`].

mod authority;
pub mod cert_reload;
mod connect_proxy;
mod dial;
pub mod error_chain;
#[cfg(test)]
mod generated_tests;
mod goaway_watch;
mod ingress;
mod kind;
mod log_budget;
mod ping_policy;
mod pre_auth_budget;
pub mod proxy_header;
pub mod raw_frames;
mod scheme;
mod sniff;
pub mod tls;
mod upgrade_request;
mod websocket;

pub use authority::{non_uri_authority, refuse_non_uri_authority};
pub use connect_proxy::{ProxyConfig, ProxyError};
pub use dial::{
    dial, explain_tls_failure, refusal_hint, DialError, DialSettings, TlsPeer, GATEWAY_TLS_PEER,
};
pub use goaway_watch::GoawayWatch;
pub use ingress::{
    accept_until, bind_listener, serve_ingress, ConnMeta, ConnectionLimit, IngressObserver,
    IngressSettings, RejectReason, ServerConn,
};
pub use ingress::{drain_point, goaway_error_refusal, AcceptHealth, ACCEPT_HEALTH, DRAIN_MAX_AGE};
pub use kind::TransportKind;
pub use log_budget::{LogBudget, PRE_AUTH_LINES_PER_SECOND, PRE_AUTH_LOG};
pub use ping_policy::{PingPolicy, TooManyPings};
pub use scheme::{SchemeError, ServerUrl};
pub use sniff::{classify_prefix, PrefixClass, PrefixedIo, HTTP2_PREFACE};
pub use websocket::{WsByteStream, WsSettings, WS_SUBPROTOCOL};

use tokio::io::{AsyncRead, AsyncWrite};

/// Implements `AsyncWrite` for a wrapper by handing every call to its field `$field`, for
/// wrappers that only care about the read side (`PrefixedIo`, `PreAuthBudget`).
macro_rules! delegate_async_write {
    ($ty:ident, $field:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use delegate_async_write;

/// Any bidirectional byte stream: TCP, TLS, or a WebSocket seen as bytes.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A type-erased [`Io`].
pub type BoxedIo = Box<dyn Io>;

/// Sets TCP_NODELAY. Both tonic's `serve_with_incoming` and custom connectors bypass tonic's
/// own setting, and without it small RPCs wait for Nagle's algorithm (p50 of 44 ms instead of
/// ~140 µs measured here).
pub fn set_nodelay(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
}
