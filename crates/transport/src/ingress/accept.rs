//! Accepting connections: binding with a real backlog, and an accept loop that survives a
//! full file table.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::set_nodelay;

/// Failed accepts across the process's listeners: a full file table (EMFILE) must show in
/// readiness and metrics, not only as a log line 20 times a second.
pub struct AcceptHealth {
    failures: std::sync::atomic::AtomicU64,
    /// When the last accept failed, and why; when it was last logged.
    last: Mutex<Option<(Instant, String, Instant)>>,
}

/// The process's accept health (see [`AcceptHealth`]).
pub static ACCEPT_HEALTH: AcceptHealth = AcceptHealth {
    failures: std::sync::atomic::AtomicU64::new(0),
    last: Mutex::new(None),
};

impl AcceptHealth {
    /// Records a failure; true when it should be logged (at most once a second).
    fn failed(&self, e: &io::Error) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self.last.lock().unwrap();
        let log = last
            .as_ref()
            .is_none_or(|(_, _, logged)| now.duration_since(*logged) >= Duration::from_secs(1));
        let logged = match (&*last, log) {
            (Some((_, _, logged)), false) => *logged,
            _ => now,
        };
        *last = Some((now, e.to_string(), logged));
        log
    }

    /// Failed accepts since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Why accepting failed, if it did within `within`.
    pub fn failing_within(&self, within: Duration) -> Option<String> {
        let last = self.last.lock().unwrap();
        let (at, why, _) = last.as_ref()?;
        (at.elapsed() < within).then(|| why.clone())
    }
}

/// Accepts the next connection (with TCP_NODELAY set), or `None` once `shutdown` is
/// cancelled. A failed accept (EMFILE, say) is counted in [`ACCEPT_HEALTH`], logged at most
/// once a second, and retried after a short pause, so a full file table never ends a
/// listener.
pub async fn accept_until(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    set_nodelay(&stream);
                    return Some((stream, peer));
                }
                Err(e) => {
                    if ACCEPT_HEALTH.failed(&e) {
                        tracing::warn!(
                            error = %e,
                            listener = what,
                            failures = ACCEPT_HEALTH.failures(),
                            "accept failed; retrying (readiness reports not ready while this lasts; \
                             for 'Too many open files' raise the open-file limit or lower \
                             max_connections)"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Binds a TCP listener with the given backlog and SO_REUSEADDR.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}
