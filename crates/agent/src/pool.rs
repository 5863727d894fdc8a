//! The tunnel pool of one connection: idle `Tunnel.Connect` streams, kept ready for requests.
//!
//! At least `min_idle` streams are idle at any time. When a stream gets a request it stops
//! being idle, and the pool opens replacements, plus headroom in proportion to the demand (one
//! per busy stream, at most `scale_step` at once) when none is idle, up to `max` per
//! connection. Streams idle past `idle_lifetime` close while more than `min_idle` are idle. A
//! stream carries one request at a time: one in all for a version-1 gateway, one after another
//! for a version-2 gateway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::tunnel_client::TunnelClient;
use agentgate_proto::v1::{
    agent_message, gateway_message, AgentMessage, Descriptor, GatewayMessage, Heartbeat,
    RequestHead,
};
use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::PoolSettings;
use crate::connection::CallCredentials;
use crate::upstream::{After, Upstreams, LINGER_FOR_GATEWAY_CLOSE};

struct PoolState {
    idle: AtomicUsize,
    total: AtomicUsize,
    /// Wakes the pool manager: only when it may have streams to open (a stream ended, or the
    /// idle ones fell below the minimum), not on every request a stream starts or finishes.
    changed: Notify,
    min_idle: usize,
}

impl PoolState {
    fn new(min_idle: usize) -> Self {
        Self {
            idle: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            changed: Notify::new(),
            min_idle,
        }
    }
}

/// Decrements a counter when dropped, and wakes the pool manager if that may call for a new
/// stream.
struct CountGuard<'a> {
    state: &'a PoolState,
    idle: bool,
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        let wake = if self.idle {
            // A stream went busy (or an idle one closed): only a pool left below its minimum
            // needs another.
            self.state.idle.fetch_sub(1, Ordering::SeqCst) - 1 < self.state.min_idle
        } else {
            self.state.total.fetch_sub(1, Ordering::SeqCst);
            true
        };
        if wake {
            self.state.changed.notify_one();
        }
    }
}

/// How many streams to open now, given the counts.
pub fn to_open(s: &PoolSettings, idle: usize, total: usize) -> usize {
    if idle >= s.min_idle || total >= s.max {
        return 0;
    }
    // Restore the minimum. Only when no stream at all is idle, add headroom in proportion to
    // the demand just seen (one more per busy stream, at most `scale_step` at once), so that a
    // burst grows the pool quickly, while a request after another (whose stream comes back
    // when it is done, protocol version 2) does not open streams at all once the pool has
    // settled.
    let deficit = s.min_idle - idle;
    let busy = total - idle;
    let headroom = if idle == 0 { busy.min(s.scale_step) } else { 0 };
    (deficit + headroom).min(s.max - total)
}

/// What every tunnel task of one pool shares.
struct TunnelContext {
    client: TunnelClient<Channel>,
    auth: Arc<CallCredentials>,
    descriptor: Descriptor,
    settings: PoolSettings,
    upstreams: Arc<Upstreams>,
    state: PoolState,
    /// Consecutive failures to open a stream: they slow the manager down instead of spinning.
    failures: AtomicUsize,
    stop: CancellationToken,
    /// Cancelled when the connection can no longer open streams.
    broken: CancellationToken,
}

/// Runs the pool until `stop`. Busy streams outlive it: they finish their request. `broken`
/// is cancelled when the connection can no longer open streams.
pub async fn run_pool(
    channel: Channel,
    auth: Arc<CallCredentials>,
    settings: PoolSettings,
    upstreams: Arc<Upstreams>,
    stop: CancellationToken,
    broken: CancellationToken,
) {
    let descriptor = Descriptor {
        instance_id: auth.instance_id.clone(),
        http_upstreams: upstreams.http_names(),
        grpc_upstream: upstreams.has_grpc(),
        protocol_version: settings.protocol_version,
    };
    let state = PoolState::new(settings.min_idle);
    let ctx = Arc::new(TunnelContext {
        client: TunnelClient::new(channel),
        auth,
        descriptor,
        settings,
        upstreams,
        state,
        failures: AtomicUsize::new(0),
        stop,
        broken,
    });
    loop {
        let state = &ctx.state;
        let n = to_open(
            &ctx.settings,
            state.idle.load(Ordering::SeqCst),
            state.total.load(Ordering::SeqCst),
        );
        for _ in 0..n {
            state.idle.fetch_add(1, Ordering::SeqCst);
            state.total.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(tunnel(ctx.clone()));
        }
        let pause = match ctx.failures.load(Ordering::SeqCst) {
            0 => Duration::ZERO,
            f => Duration::from_millis(100 * (f as u64).min(50)),
        };
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = state.changed.notified() => {}
        }
        if !pause.is_zero() {
            tokio::select! {
                _ = ctx.stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// One tunnel stream: opened, then idle and busy in turns. Version 1 gateways use it for one
/// request; version 2 gateways park it again after each one (see `tunnel.proto`).
async fn tunnel(ctx: Arc<TunnelContext>) {
    let state = &ctx.state;
    let _total = CountGuard { state, idle: false };
    let mut idle = Some(CountGuard { state, idle: true });
    let (tx, rx) = mpsc::channel(8);
    let first = AgentMessage {
        msg: Some(agent_message::Msg::Descriptor(ctx.descriptor.clone())),
    };
    tx.try_send(first).expect("fresh channel has room");
    let mut client = ctx.client.clone();
    let mut inbound = match client
        .connect(ctx.auth.request(ReceiverStream::new(rx)))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            ctx.failures.fetch_add(1, Ordering::SeqCst);
            if !ctx.stop.is_cancelled() {
                // The connection takes no new streams (a GOAWAY from the gateway or from a
                // proxy in between, say on reload): tell the manager to move to a new one.
                // Once: every tunnel the pool tries on a closed connection fails the same way.
                if !ctx.broken.is_cancelled() {
                    tracing::warn!(code = %agentgate_proto::status_code::code_name(status.code()), "cannot open a tunnel stream: {}", status.message());
                }
                ctx.broken.cancel();
            }
            return;
        }
    };
    ctx.failures.store(0, Ordering::SeqCst);
    let mut pending = None;
    loop {
        let surplus = || state.idle.load(Ordering::SeqCst) > ctx.settings.min_idle;
        let head = match wait_for_request(
            &mut inbound,
            &tx,
            pending.take(),
            ctx.settings.idle_lifetime,
            surplus,
            &ctx.stop,
        )
        .await
        {
            Idle::Request(h) => h,
            Idle::Ended(why) => {
                tracing::debug!("tunnel stream ended while idle: {why}");
                return;
            }
            Idle::Close(why) => {
                tracing::debug!("closing an idle tunnel stream: {why}");
                close_gently(tx, inbound).await;
                return;
            }
        };
        // Busy now: let the manager open a replacement while this request runs.
        drop(idle.take());
        match ctx.upstreams.execute(head, &mut inbound, &tx).await {
            After::Idle { next } => {
                // Idle again: one more idle stream never calls for opening one, so the
                // manager is not woken.
                pending = next;
                state.idle.fetch_add(1, Ordering::SeqCst);
                idle = Some(CountGuard { state, idle: true });
            }
            After::CloseGently => {
                close_gently(tx, inbound).await;
                return;
            }
            After::Close => return,
        }
    }
}

/// How an idle stream's wait ended.
#[derive(Debug)]
enum Idle {
    Request(RequestHead),
    /// We close it (stopping, or idle past its lifetime).
    Close(&'static str),
    /// The gateway ended it, or it failed.
    Ended(&'static str),
}

/// How long an idle stream of a retired connection waits for the gateway to end it (it does
/// at once when it learns of the retirement) before closing it itself.
const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// Ends our side of an idle stream, then waits (a while) for the gateway to end its side. Just
/// dropping the stream would reset it, and a reset throws away answer bytes that HTTP/2 flow
/// control still holds back on our side: the gateway may not have read all of the last
/// answer yet. The gateway drops a parked stream whose agent side ended at its next look.
async fn close_gently<S>(tx: mpsc::Sender<AgentMessage>, mut inbound: S)
where
    S: futures_util::Stream<Item = Result<GatewayMessage, tonic::Status>> + Unpin,
{
    use futures_util::StreamExt;
    drop(tx);
    let _ = tokio::time::timeout(LINGER_FOR_GATEWAY_CLOSE, async {
        while let Some(Ok(_)) = inbound.next().await {}
    })
    .await;
}

/// Waits on an idle stream for the gateway's next request, answering heartbeats. The stream
/// closes once it has been idle for `lifetime` while `surplus()` says more than the minimum
/// are idle; the lifetime counts from the moment the stream became idle, and the gateway's
/// heartbeats do not restart it. `pending` is a message already read from the stream.
async fn wait_for_request<S>(
    inbound: &mut S,
    tx: &mpsc::Sender<AgentMessage>,
    mut pending: Option<GatewayMessage>,
    lifetime: Duration,
    surplus: impl Fn() -> bool,
    stop: &CancellationToken,
) -> Idle
where
    S: futures_util::Stream<Item = Result<GatewayMessage, tonic::Status>> + Unpin,
{
    use futures_util::StreamExt;
    let mut expires = tokio::time::Instant::now() + lifetime;
    let mut retiring = false;
    loop {
        let msg = match pending.take() {
            Some(m) => Some(Ok(m)),
            None => tokio::select! {
                m = inbound.next() => m,
                _ = stop.cancelled(), if !retiring => {
                    // The connection is being retired (the session, ended just before, tells
                    // the gateway): the gateway ends its parked streams, and one it took a
                    // moment ago still gets its request served here.
                    retiring = true;
                    expires = tokio::time::Instant::now() + RETIRE_GRACE;
                    continue;
                }
                _ = tokio::time::sleep_until(expires) => {
                    if retiring {
                        return Idle::Close("the connection was retired");
                    }
                    if !surplus() {
                        expires = tokio::time::Instant::now() + lifetime;
                        continue;
                    }
                    // Last look, so a request that just arrived is not dropped.
                    match inbound.next().now_or_never() {
                        None => return Idle::Close("idle past its lifetime"),
                        Some(m) => m,
                    }
                }
            },
        };
        match msg {
            Some(Ok(GatewayMessage {
                msg: Some(gateway_message::Msg::RequestHead(h)),
            })) => return Idle::Request(h),
            Some(Ok(GatewayMessage {
                msg: Some(gateway_message::Msg::Heartbeat(h)),
            })) => {
                let reply = AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                        unix_millis: h.unix_millis,
                    })),
                };
                let _ = tx.try_send(reply);
            }
            Some(Ok(_)) => continue,
            None => return Idle::Ended("the gateway ended it"),
            Some(Err(status)) => {
                tracing::debug!(code = %agentgate_proto::status_code::code_name(status.code()), "tunnel stream failed: {}", status.message());
                return Idle::Ended("the stream failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_is_woken_only_when_a_stream_may_be_needed() {
        use futures_util::FutureExt;
        let state = PoolState::new(2);
        state.idle.store(3, Ordering::SeqCst);
        state.total.store(5, Ordering::SeqCst);
        let woken = |state: &PoolState| state.changed.notified().now_or_never().is_some();
        drop(CountGuard {
            state: &state,
            idle: true,
        });
        assert!(!woken(&state), "3 -> 2 idle: still at the minimum");
        drop(CountGuard {
            state: &state,
            idle: true,
        });
        assert!(woken(&state), "2 -> 1 idle: below the minimum");
        drop(CountGuard {
            state: &state,
            idle: false,
        });
        assert!(woken(&state), "a stream ended");
        assert_eq!(state.idle.load(Ordering::SeqCst), 1);
        assert_eq!(state.total.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn opening_policy() {
        let s = PoolSettings {
            min_idle: 2,
            scale_step: 10,
            max: 15,
            idle_lifetime: Duration::from_secs(60),
            ..PoolSettings::default()
        };
        assert_eq!(to_open(&s, 0, 0), 2, "start with min_idle");
        assert_eq!(to_open(&s, 2, 2), 0);
        assert_eq!(to_open(&s, 1, 2), 1, "one busy: restore the minimum only");
        assert_eq!(
            to_open(&s, 1, 3),
            1,
            "a settled pool of three opens nothing more"
        );
        assert_eq!(
            to_open(&s, 0, 2),
            4,
            "all busy: the minimum plus one per busy stream"
        );
        assert_eq!(to_open(&s, 0, 12), 3, "capped at max");
        assert_eq!(to_open(&s, 1, 14), 1, "capped at max");
        let wide = PoolSettings {
            max: 500,
            ..s.clone()
        };
        assert_eq!(to_open(&wide, 0, 40), 12, "demand scales by step at most");
        assert_eq!(to_open(&wide, 1, 40), 1, "one idle left: no headroom");
        assert_eq!(to_open(&s, 0, 15), 0);
    }

    fn heartbeat() -> Result<GatewayMessage, tonic::Status> {
        Ok(GatewayMessage {
            msg: Some(gateway_message::Msg::Heartbeat(Heartbeat {
                unix_millis: 1,
            })),
        })
    }

    /// The gateway's heartbeats every 20 s must not keep a surplus idle stream alive past its
    /// 60 s lifetime (they used to restart the timer on every pass).
    #[tokio::test(start_paused = true)]
    async fn heartbeats_do_not_extend_the_idle_lifetime() {
        let (gw_tx, gw_rx) = mpsc::channel(4);
        let (tx, mut replies) = mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                if gw_tx.send(heartbeat()).await.is_err() {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        let mut inbound = ReceiverStream::new(gw_rx);
        let end = tokio::time::timeout(
            Duration::from_secs(600),
            wait_for_request(
                &mut inbound,
                &tx,
                None,
                Duration::from_secs(60),
                || true,
                &CancellationToken::new(),
            ),
        )
        .await
        .expect("a surplus idle stream closes");
        assert!(
            matches!(end, Idle::Close("idle past its lifetime")),
            "{end:?}"
        );
        assert_eq!(started.elapsed().as_secs(), 60);
        let mut answered = 0;
        while replies.try_recv().is_ok() {
            answered += 1;
        }
        assert_eq!(answered, 2, "the heartbeats at 20 s and 40 s were answered");
    }

    /// While the stream is one of the minimum, the lifetime passes without closing it; once it
    /// is surplus it closes one lifetime after the last check.
    #[tokio::test(start_paused = true)]
    async fn a_needed_idle_stream_stays_open() {
        let (gw_tx, gw_rx) = mpsc::channel(4);
        let (tx, _replies) = mpsc::channel(8);
        let surplus = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = surplus.clone();
        let started = tokio::time::Instant::now();
        let mut inbound = ReceiverStream::new(gw_rx);
        let stop = CancellationToken::new();
        let wait = wait_for_request(
            &mut inbound,
            &tx,
            None,
            Duration::from_secs(60),
            move || flag.load(Ordering::SeqCst),
            &stop,
        );
        let flip = async {
            tokio::time::sleep(Duration::from_secs(150)).await;
            surplus.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await
        };
        let end = tokio::select! { e = wait => e, _ = flip => unreachable!() };
        drop(gw_tx);
        assert!(matches!(end, Idle::Close("idle past its lifetime")));
        assert_eq!(
            started.elapsed().as_secs(),
            180,
            "checked at 60, 120, closed at 180"
        );
    }

    /// A retired connection's idle stream still takes a request that arrives within the grace,
    /// and closes itself after it if the gateway never ends it.
    #[tokio::test(start_paused = true)]
    async fn a_retired_stream_serves_what_arrives_then_closes() {
        let (gw_tx, gw_rx) = mpsc::channel(4);
        let (tx, _replies) = mpsc::channel(8);
        let stop = CancellationToken::new();
        stop.cancel();
        let mut inbound = ReceiverStream::new(gw_rx);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let head = GatewayMessage {
                msg: Some(gateway_message::Msg::RequestHead(RequestHead::default())),
            };
            gw_tx.send(Ok(head)).await.unwrap();
            gw_tx
        });
        let first = wait_for_request(
            &mut inbound,
            &tx,
            None,
            Duration::from_secs(60),
            || false,
            &stop,
        )
        .await;
        assert!(matches!(first, Idle::Request(_)), "{first:?}");
        let _keep = late.await.unwrap();
        let started = tokio::time::Instant::now();
        let second = wait_for_request(
            &mut inbound,
            &tx,
            None,
            Duration::from_secs(60),
            || false,
            &stop,
        )
        .await;
        assert!(
            matches!(second, Idle::Close("the connection was retired")),
            "{second:?}"
        );
        assert_eq!(started.elapsed(), RETIRE_GRACE);
    }

    /// A request is answered at once, and a message read earlier is handled first.
    #[tokio::test(start_paused = true)]
    async fn a_request_ends_the_wait() {
        let (gw_tx, gw_rx) = mpsc::channel(4);
        let (tx, _replies) = mpsc::channel(8);
        let head = GatewayMessage {
            msg: Some(gateway_message::Msg::RequestHead(RequestHead {
                method: "GET".into(),
                ..Default::default()
            })),
        };
        gw_tx.send(heartbeat()).await.unwrap();
        let mut inbound = ReceiverStream::new(gw_rx);
        let end = wait_for_request(
            &mut inbound,
            &tx,
            Some(head),
            Duration::from_secs(60),
            || true,
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(end, Idle::Request(h) if h.method == "GET"));
    }
}
