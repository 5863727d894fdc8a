//! The tunnel pool of one connection: idle `Tunnel.Connect` streams, kept ready for requests.
//!
//! At least `min_idle` streams are idle at any time. When a stream gets a request it stops
//! being idle, and the pool opens replacements plus headroom in proportion to the demand (one
//! per busy stream, at most `scale_step` at once), up to `max` per connection. Streams idle
//! past `idle_lifetime` close while more than `min_idle` are idle. Each stream carries exactly
//! one request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentgate_proto::v1::tunnel_client::TunnelClient;
use agentgate_proto::v1::{
    agent_message, gateway_message, AgentMessage, Descriptor, GatewayMessage, Heartbeat,
};
use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::PoolSettings;
use crate::connection::Authed;
use crate::upstream::Upstreams;

#[derive(Default)]
struct PoolState {
    idle: AtomicUsize,
    total: AtomicUsize,
    changed: Notify,
}

/// Decrements a counter (and wakes the pool manager) when dropped.
struct CountGuard<'a> {
    state: &'a PoolState,
    idle: bool,
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        if self.idle {
            self.state.idle.fetch_sub(1, Ordering::SeqCst);
        } else {
            self.state.total.fetch_sub(1, Ordering::SeqCst);
        }
        self.state.changed.notify_one();
    }
}

/// How many streams to open now, given the counts.
pub fn to_open(s: &PoolSettings, idle: usize, total: usize) -> usize {
    if idle >= s.min_idle || total >= s.max {
        return 0;
    }
    // Restore the minimum, plus headroom in proportion to the demand just seen (one more per
    // busy stream, at most `scale_step` at once): a single request does not leave ten idle
    // streams parked at the gateway, while a burst still grows the pool quickly.
    let deficit = s.min_idle - idle;
    let busy = total - idle;
    (deficit + busy.min(s.scale_step)).min(s.max - total)
}

/// Runs the pool until `stop`. Busy streams outlive it: they finish their request. `broken`
/// is cancelled when the connection can no longer open streams.
pub async fn run_pool(
    channel: Channel,
    auth: Arc<Authed>,
    settings: PoolSettings,
    upstreams: Arc<Upstreams>,
    stop: CancellationToken,
    broken: CancellationToken,
) {
    let state = Arc::new(PoolState::default());
    let descriptor = Descriptor {
        instance_id: auth.instance_id.clone(),
        http_upstreams: upstreams.http_names(),
        grpc_upstream: upstreams.has_grpc(),
    };
    // Consecutive failures to open a stream slow the manager down instead of spinning.
    let failures = Arc::new(AtomicUsize::new(0));
    loop {
        let n = to_open(
            &settings,
            state.idle.load(Ordering::SeqCst),
            state.total.load(Ordering::SeqCst),
        );
        for _ in 0..n {
            state.idle.fetch_add(1, Ordering::SeqCst);
            state.total.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(tunnel(
                TunnelClient::new(channel.clone()),
                auth.clone(),
                descriptor.clone(),
                settings.clone(),
                upstreams.clone(),
                state.clone(),
                failures.clone(),
                stop.clone(),
                broken.clone(),
            ));
        }
        let pause = match failures.load(Ordering::SeqCst) {
            0 => Duration::ZERO,
            f => Duration::from_millis(100 * (f as u64).min(50)),
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = state.changed.notified() => {}
        }
        if !pause.is_zero() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn tunnel(
    mut client: TunnelClient<Channel>,
    auth: Arc<Authed>,
    descriptor: Descriptor,
    settings: PoolSettings,
    upstreams: Arc<Upstreams>,
    state: Arc<PoolState>,
    failures: Arc<AtomicUsize>,
    stop: CancellationToken,
    broken: CancellationToken,
) {
    let _total = CountGuard {
        state: &state,
        idle: false,
    };
    let mut idle = Some(CountGuard {
        state: &state,
        idle: true,
    });
    let (tx, rx) = mpsc::channel(8);
    let first = AgentMessage {
        msg: Some(agent_message::Msg::Descriptor(descriptor)),
    };
    tx.try_send(first).expect("fresh channel has room");
    let mut inbound = match client.connect(auth.request(ReceiverStream::new(rx))).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            failures.fetch_add(1, Ordering::SeqCst);
            if !stop.is_cancelled() {
                // The connection takes no new streams (a GOAWAY from the gateway or from a
                // proxy in between, say on reload): tell the manager to move to a new one.
                tracing::warn!(code = ?status.code(), "cannot open a tunnel stream: {}", status.message());
                broken.cancel();
            }
            return;
        }
    };
    failures.store(0, Ordering::SeqCst);
    let head = loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(settings.idle_lifetime) => {
                if state.idle.load(Ordering::SeqCst) > settings.min_idle {
                    // Last look, so a request that just arrived is not dropped.
                    match inbound.message().now_or_never() {
                        None => return,
                        Some(m) => m,
                    }
                } else {
                    continue;
                }
            }
        };
        match msg {
            Ok(Some(GatewayMessage {
                msg: Some(gateway_message::Msg::RequestHead(h)),
            })) => break h,
            Ok(Some(GatewayMessage {
                msg: Some(gateway_message::Msg::Heartbeat(h)),
            })) => {
                let reply = AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                        unix_millis: h.unix_millis,
                    })),
                };
                let _ = tx.try_send(reply);
            }
            Ok(Some(_)) => continue,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(code = ?status.code(), "tunnel stream ended: {}", status.message());
                return;
            }
        }
    };
    // Busy now: let the manager open a replacement while this request runs.
    drop(idle.take());
    upstreams.execute(head, inbound, tx).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_policy() {
        let s = PoolSettings {
            min_idle: 2,
            scale_step: 10,
            max: 15,
            idle_lifetime: Duration::from_secs(60),
        };
        assert_eq!(to_open(&s, 0, 0), 2, "start with min_idle");
        assert_eq!(to_open(&s, 2, 2), 0);
        assert_eq!(
            to_open(&s, 1, 2),
            2,
            "one busy: replace it, plus one of headroom"
        );
        assert_eq!(to_open(&s, 0, 12), 3, "capped at max");
        assert_eq!(to_open(&s, 1, 14), 1, "capped at max");
        let wide = PoolSettings {
            max: 500,
            ..s.clone()
        };
        assert_eq!(to_open(&wide, 0, 40), 12, "demand scales by step at most");
        assert_eq!(to_open(&s, 0, 15), 0);
    }
}
