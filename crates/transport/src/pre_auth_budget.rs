//! A cap on the bytes a connection may send before any of its calls authenticated.
//!
//! Everything an agent says before its first token is checked is small: a TLS handshake, a
//! WebSocket upgrade, the HTTP/2 preface and SETTINGS, and the HEADERS of its first calls.
//! A client without a token has no reason to send more, and what it sends can cost memory
//! before anything can refuse it: a WebSocket message is buffered whole before the bytes in it
//! reach HTTP/2 (up to `ws_max_message_size`, 10 MiB as in kas), and DATA on token-less streams
//! fills windows. This wrapper sits right above the TCP socket, under TLS and WebSocket, so one
//! budget bounds every transport. Once a call authenticated, it only passes bytes through.
//!
//! At the budget the wrapper stops reading instead of failing at once, and waits up to
//! [`STALL_FOR_AUTH`] for a call to authenticate: a legitimate client's first call may carry a
//! message larger than the budget (a runner's first request), and its HEADERS, read before
//! its DATA, are being checked while the DATA arrives. Once that call authenticated, reading
//! goes on; if none does in time, the connection is refused as before. The client's bytes wait
//! in the kernel's socket buffers meanwhile, not in the gateway's memory.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long reading stays stopped at the budget for a call to authenticate.
pub const STALL_FOR_AUTH: std::time::Duration = std::time::Duration::from_millis(500);
/// How often a stalled connection looks whether a call authenticated.
const STALL_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

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
    /// While reading is stopped at the budget: until when, and the next look.
    stall: Option<(Instant, Pin<Box<Sleep>>)>,
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
            stall: None,
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
        loop {
            if this.left.is_some() && this.agent.get().is_some() {
                this.left = None;
                this.stall = None;
            }
            let Some(left) = this.left else {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            };
            if this.on_exceeded.is_none() {
                return Poll::Ready(Err(budget_error()));
            }
            if left > 0 {
                // Never more than the budget: the rest stays in the socket until it is known
                // whom it belongs to.
                let mut limited = buf.take(left);
                let res = Pin::new(&mut this.io).poll_read(cx, &mut limited);
                let n = limited.filled().len();
                // SAFETY: `limited` is the start of `buf`'s unfilled part, and the inner read
                // initialised and filled its first `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                this.left = Some(left - n);
                return res;
            }
            // At the budget: wait for a call to authenticate, looking every few milliseconds.
            let now = Instant::now();
            let (until, tick) = this.stall.get_or_insert_with(|| {
                (
                    now + STALL_FOR_AUTH,
                    Box::pin(tokio::time::sleep(STALL_CHECK)),
                )
            });
            if now >= *until {
                if let Some(report) = this.on_exceeded.take() {
                    report(this.limit);
                }
                return Poll::Ready(Err(budget_error()));
            }
            match tick.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let next = (now + STALL_CHECK).min(*until);
                    tick.as_mut().reset(next);
                }
            }
        }
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
        // Up to the budget, not a byte more; then reading stops, and with no call
        // authenticated the connection is refused once the stall is over.
        assert_eq!(b.read(&mut buf).await.unwrap(), 400);
        let t = std::time::Instant::now();
        assert!(b.read(&mut buf).await.is_err());
        assert!(t.elapsed() >= STALL_FOR_AUTH);
        assert!(b.exceeded());
        assert_eq!(reported.load(Ordering::SeqCst), 1000);

        // A call authenticates while reading is stopped at the budget: the rest comes through.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let agent = Arc::new(OnceLock::new());
        let mut b = PreAuthBudget::new(server, agent.clone(), Some(1000), Box::new(|_| {}));
        client.write_all(&[4; 3000]).await.unwrap();
        assert_eq!(b.read(&mut buf).await.unwrap(), 1000);
        let a = agent.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            a.set("runner-1".to_string()).unwrap();
        });
        let mut rest = 0;
        while rest < 2000 {
            rest += b.read(&mut buf).await.unwrap();
        }
        assert!(!b.exceeded());

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
