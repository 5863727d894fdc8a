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
//!
//! One connection's budget does not bound them all: 1,000 connections that each sent most of
//! a WebSocket message and then waited for `auth_timeout` held 1 GiB (and `max_connections`
//! is 18,000). So the connections not yet authenticated also share one [`PreAuthPool`]
//! (`max_bytes_before_auth_total`): what one of them has read past its first
//! [`UNPOOLED_BYTES`] counts there until it authenticates or closes. When the pool is spent,
//! reading stops as at a connection's own budget, and the connection is refused if neither a
//! call authenticates nor room comes free within [`STALL_FOR_AUTH`]. An agent sends a few KiB
//! (TLS, the upgrade, the preface, its first HEADERS) before its first call authenticates,
//! all of it within the unpooled bytes: clients that fill the pool cannot keep agents out.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long reading stays stopped at the budget for a call to authenticate.
pub const STALL_FOR_AUTH: std::time::Duration = std::time::Duration::from_millis(500);
/// How often a stalled connection looks whether a call authenticated.
const STALL_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// What each connection reads before it draws on the shared pool: more than an agent sends
/// before its first call authenticates (a TLS ClientHello with a post-quantum key share is
/// about 1.5 KiB). At `max_connections` (18,000) they add up to 288 MiB at most.
pub const UNPOOLED_BYTES: usize = 16 * 1024;

/// Which budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetExceeded {
    /// The connection's own (`max_bytes_before_auth`).
    Connection { limit: usize },
    /// The one all unauthenticated connections share (`max_bytes_before_auth_total`).
    Total { limit: usize },
}

/// What the budget reports when it runs out, once.
pub type OnBudgetExceeded = Box<dyn FnOnce(BudgetExceeded) + Send>;

/// The bytes all connections not yet authenticated have read, and their cap.
#[derive(Debug)]
pub struct PreAuthPool {
    used: AtomicUsize,
    limit: usize,
}

impl PreAuthPool {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Takes up to `want` bytes of room; how many it got.
    fn reserve(&self, want: usize) -> usize {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let got = want.min(self.limit.saturating_sub(used));
            if got == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + got,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return got,
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Bytes held now by connections not yet authenticated.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

pub struct PreAuthBudget<T> {
    io: T,
    /// Set by the gateway when a call on this connection authenticated.
    agent: Arc<OnceLock<String>>,
    /// Bytes still allowed; `None` once authenticated or when there is no budget.
    left: Option<usize>,
    limit: usize,
    /// Shared by every connection not yet authenticated; `None`: no shared cap.
    pool: Option<Arc<PreAuthPool>>,
    /// What this connection holds of `pool`, given back once it authenticates or closes.
    held: usize,
    on_exceeded: Option<OnBudgetExceeded>,
    /// While reading is stopped at a budget: until when, and the next look.
    stall: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl<T> PreAuthBudget<T> {
    /// `limit` of `None` disables the connection's own budget; `pool` of `None`, the shared
    /// one (without its own budget a connection draws nothing from the pool either).
    pub fn new(
        io: T,
        agent: Arc<OnceLock<String>>,
        limit: Option<usize>,
        pool: Option<Arc<PreAuthPool>>,
        on_exceeded: OnBudgetExceeded,
    ) -> Self {
        Self {
            io,
            agent,
            left: limit,
            limit: limit.unwrap_or(0),
            pool,
            held: 0,
            on_exceeded: Some(on_exceeded),
            stall: None,
        }
    }

    /// Gives what this connection holds back to the pool.
    fn release_held(&mut self) {
        if let Some(pool) = &self.pool {
            pool.release(std::mem::take(&mut self.held));
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
                this.release_held();
            }
            let Some(left) = this.left else {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            };
            if this.on_exceeded.is_none() {
                return Poll::Ready(Err(budget_error()));
            }
            // Never more than the budgets allow: the rest stays in the socket until it is
            // known whom it belongs to.
            let want = left.min(buf.remaining());
            let unpooled = want.min(UNPOOLED_BYTES.saturating_sub(this.limit - left));
            let granted = match &this.pool {
                Some(pool) if want > unpooled => unpooled + pool.reserve(want - unpooled),
                _ => want,
            };
            if granted > 0 || buf.remaining() == 0 {
                let mut limited = buf.take(granted);
                let res = Pin::new(&mut this.io).poll_read(cx, &mut limited);
                let n = limited.filled().len();
                // SAFETY: `limited` is the start of `buf`'s unfilled part, and the inner read
                // initialised and filled its first `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                this.left = Some(left - n);
                if let Some(pool) = &this.pool {
                    let drawn = n.saturating_sub(unpooled);
                    pool.release(granted - unpooled - drawn);
                    this.held += drawn;
                }
                if n > 0 {
                    this.stall = None;
                }
                return res;
            }
            // At a budget: wait for a call to authenticate (or, at the shared one, for room),
            // looking every few milliseconds.
            let now = Instant::now();
            let (until, tick) = this.stall.get_or_insert_with(|| {
                (
                    now + STALL_FOR_AUTH,
                    Box::pin(tokio::time::sleep(STALL_CHECK)),
                )
            });
            if now >= *until {
                let which = match (&this.pool, left) {
                    (Some(pool), 1..) => BudgetExceeded::Total { limit: pool.limit },
                    _ => BudgetExceeded::Connection { limit: this.limit },
                };
                if let Some(report) = this.on_exceeded.take() {
                    report(which);
                }
                this.release_held();
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

impl<T> Drop for PreAuthBudget<T> {
    fn drop(&mut self) {
        self.release_held();
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
            None,
            Box::new(move |e| {
                if let BudgetExceeded::Connection { limit } = e {
                    r.store(limit, Ordering::SeqCst)
                }
            }),
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
        let mut b = PreAuthBudget::new(server, agent.clone(), Some(1000), None, Box::new(|_| {}));
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
        let mut b = PreAuthBudget::new(server, agent.clone(), Some(1000), None, Box::new(|_| {}));
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

    #[tokio::test]
    async fn connections_not_yet_authenticated_share_one_pool() {
        const K: usize = 1024;
        assert_eq!(UNPOOLED_BYTES, 16 * K, "the sizes below assume it");
        let pool = PreAuthPool::new(20 * K);
        let exceeded = Arc::new(std::sync::Mutex::new(None));
        let conn = |agent: &Arc<OnceLock<String>>| {
            let (client, server) = tokio::io::duplex(1 << 20);
            let e = exceeded.clone();
            let b = PreAuthBudget::new(
                server,
                agent.clone(),
                Some(100 * K),
                Some(pool.clone()),
                Box::new(move |which| *e.lock().unwrap() = Some(which)),
            );
            (client, b)
        };
        let mut buf = vec![0; 64 * K];
        let (a_agent, b_agent) = (Arc::new(OnceLock::new()), Arc::new(OnceLock::new()));
        let (mut a_client, mut a) = conn(&a_agent);
        let (mut b_client, mut b) = conn(&b_agent);
        a_client.write_all(&[1; 30 * K]).await.unwrap();
        b_client.write_all(&[2; 30 * K]).await.unwrap();
        // 16 KiB of each come free; the rest from the pool, which has 20 KiB.
        assert_eq!(a.read(&mut buf).await.unwrap(), 30 * K);
        assert_eq!(pool.in_use(), 14 * K);
        assert_eq!(b.read(&mut buf).await.unwrap(), 22 * K);
        assert_eq!(pool.in_use(), 20 * K);
        // The pool is spent: b waits; when a authenticates its bytes come free and b reads on.
        let freed = {
            let a_agent = a_agent.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                a_agent.set("edge-1".to_string()).unwrap();
            })
        };
        let reading_a = tokio::spawn(async move {
            a_client.write_all(&[1; 10]).await.unwrap();
            let mut buf = [0; 64];
            a.read(&mut buf).await.unwrap()
        });
        assert_eq!(reading_a.await.unwrap(), 10, "authenticated: no budget");
        freed.await.unwrap();
        assert_eq!(b.read(&mut buf).await.unwrap(), 8 * K);
        assert_eq!(pool.in_use(), 14 * K);
        // A third connection reads its free 16 KiB and the 6 KiB left, and is refused when no
        // room comes; an agent's few KiB would have passed.
        let (mut c_client, mut c) = conn(&Arc::new(OnceLock::new()));
        c_client.write_all(&[3; 30 * K]).await.unwrap();
        assert_eq!(c.read(&mut buf).await.unwrap(), 22 * K);
        assert!(c.read(&mut buf).await.is_err());
        assert_eq!(
            *exceeded.lock().unwrap(),
            Some(BudgetExceeded::Total { limit: 20 * K })
        );
        assert_eq!(
            pool.in_use(),
            14 * K,
            "the refused connection gave its bytes back"
        );
        let (mut d_client, mut d) = conn(&Arc::new(OnceLock::new()));
        d_client.write_all(&[4; 3 * K]).await.unwrap();
        assert_eq!(d.read(&mut buf).await.unwrap(), 3 * K, "unpooled");
        drop(b);
        assert_eq!(pool.in_use(), 0, "a closed connection gives its bytes back");
    }
}
