//! A cap on the bytes a connection may send before any of its calls authenticated.
//!
//! Everything an agent says before its first token is checked is small: a TLS handshake, a
//! WebSocket upgrade, the HTTP/2 preface and SETTINGS, and the HEADERS of its first calls.
//! A client without a token has no reason to send more, and what it sends can cost memory
//! before anything can refuse it: a WebSocket message is buffered whole before the bytes in it
//! reach HTTP/2 (up to `ws_max_message_size`, 10 MiB as in kas), and DATA on token-less streams
//! fills windows. This wrapper sits right above the TCP socket, under TLS and WebSocket, so one
//! budget bounds every transport. Once a call authenticated, it only passes bytes through.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// What the budget reports when it runs out, once.
pub type OnBudgetExceeded = Box<dyn FnOnce(usize) + Send>;

pub struct PreAuthBudget<T> {
    io: T,
    /// Set by the gateway when a call on this connection authenticated.
    agent: Arc<OnceLock<String>>,
    /// Bytes still allowed; `None` once authenticated or when there is no budget.
    left: Option<usize>,
    limit: usize,
    on_exceeded: Option<OnBudgetExceeded>,
}

impl<T> PreAuthBudget<T> {
    /// `limit` of `None` disables the budget.
    pub fn new(
        io: T,
        agent: Arc<OnceLock<String>>,
        limit: Option<usize>,
        on_exceeded: OnBudgetExceeded,
    ) -> Self {
        Self {
            io,
            agent,
            left: limit,
            limit: limit.unwrap_or(0),
            on_exceeded: Some(on_exceeded),
        }
    }

    /// Whether the budget ran out (the connection was refused for it).
    #[cfg(test)]
    fn exceeded(&self) -> bool {
        self.on_exceeded.is_none()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PreAuthBudget<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.left.is_some() && this.agent.get().is_some() {
            this.left = None;
        }
        let Some(left) = this.left else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        if this.on_exceeded.is_none() {
            return Poll::Ready(Err(budget_error()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > left {
            if let Some(report) = this.on_exceeded.take() {
                report(this.limit);
            }
            return Poll::Ready(Err(budget_error()));
        }
        this.left = Some(left - n);
        res
    }
}

fn budget_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "too many bytes before the first authenticated call",
    )
}

crate::delegate_async_write!(PreAuthBudget, io);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn cuts_at_the_limit_until_authenticated_then_passes_everything() {
        let reported = Arc::new(AtomicUsize::new(0));
        let r = reported.clone();
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let agent = Arc::new(OnceLock::new());
        let mut b = PreAuthBudget::new(
            server,
            agent.clone(),
            Some(1000),
            Box::new(move |limit| r.store(limit, Ordering::SeqCst)),
        );
        client.write_all(&[1; 600]).await.unwrap();
        let mut buf = vec![0; 4096];
        assert_eq!(b.read(&mut buf).await.unwrap(), 600);
        client.write_all(&[2; 600]).await.unwrap();
        assert!(b.read(&mut buf).await.is_err());
        assert!(b.exceeded());
        assert_eq!(reported.load(Ordering::SeqCst), 1000);

        // Authenticated before the limit: no limit afterwards.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let agent = Arc::new(OnceLock::new());
        let mut b = PreAuthBudget::new(server, agent.clone(), Some(1000), Box::new(|_| {}));
        client.write_all(&[1; 900]).await.unwrap();
        assert_eq!(b.read(&mut buf).await.unwrap(), 900);
        agent.set("edge-1".to_string()).unwrap();
        client.write_all(&[3; 4000]).await.unwrap();
        let mut total = 0;
        while total < 4000 {
            total += b.read(&mut buf).await.unwrap();
        }
        assert!(!b.exceeded());
    }
}
