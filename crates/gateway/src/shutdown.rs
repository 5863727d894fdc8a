//! The gateway's tasks once started, and their graceful shutdown in ordered phases, each
//! awaited (docs/ARCHITECTURE.md, "Connection lifecycle").

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::Gateway;

/// At most how long the agent port's sessions get to end by themselves (each once its
/// connection wrote the GOAWAY) before the rest are ended.
const SESSIONS_END_WITHIN: Duration = Duration::from_secs(2);
/// After the grace period, how long calls to backends and tunnelled requests that were ended
/// get to send their status.
const ENDED_CALLS_GO_OUT_WITHIN: Duration = Duration::from_secs(1);
const INTERNAL_API_STOPS_WITHIN: Duration = Duration::from_secs(2);
/// The periodic tasks, the registry's last write (this replica's entries removed) included.
const PERIODIC_STOP_WITHIN: Duration = Duration::from_secs(3);
const ADMIN_STOPS_WITHIN: Duration = Duration::from_secs(1);

/// A task and the token that asks it to stop.
pub struct Task {
    pub handle: JoinHandle<()>,
    pub stop: CancellationToken,
}

impl Task {
    /// Asks the task to stop and waits for it at most `limit`.
    async fn stop_within(self, limit: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(limit, self.handle).await;
    }
}

/// Everything `run_with` started.
pub struct Running {
    /// Cancelled first: the agent ports stop accepting.
    pub accept_stop: CancellationToken,
    /// The agent port's server: stopping it sends GOAWAY to every connection; it ends once
    /// every connection closed.
    pub agent_port: Task,
    pub api: Task,
    /// Cluster mode: the internal API.
    pub internal: Option<Task>,
    /// Periodic work, in one set. The cluster's (the registry's refresher, reservation
    /// expiry) stops with the internal API; the rest (heartbeat sweep, memory trim, token
    /// checks) with `periodic_stop`.
    pub periodic: JoinSet<()>,
    pub periodic_stop: CancellationToken,
    pub admin: Task,
}

impl Running {
    /// Shuts down in phases, each awaited.
    pub async fn shut_down(mut self, gw: &Gateway) {
        let grace = gw.config.shutdown_grace;
        tracing::info!(
            ?grace,
            "shutting down: no new connections, GOAWAY to every agent"
        );
        // 1. Take no new work: readiness fails, accepting stops, every connection gets GOAWAY.
        gw.admin.ready.store(false, Ordering::Relaxed);
        self.accept_stop.cancel();
        self.agent_port.stop.cancel();
        self.api.stop.cancel();
        gw.stopping.cancel();
        // 2. Sessions end, each once its GOAWAY is written (agents then read the end as planned
        //    and reconnect elsewhere); then every other long-lived handler and parked tunnel.
        let sessions_ended =
            tokio::time::timeout(SESSIONS_END_WITHIN, gw.directory.emptied()).await;
        if sessions_ended.is_err() {
            tracing::info!(
                sessions = gw.directory.len(),
                "ending the sessions that are still open"
            );
        }
        gw.shutdown.cancel();
        gw.tunnels.parking.clear();
        // 3. Requests in flight finish, within the grace period. Calls to backends still open
        //    then (long polls) end with a status their clients retry, given a moment to go out.
        let drain_started = std::time::Instant::now();
        let (agent_port, api) = (self.agent_port.handle, self.api.handle);
        let mut in_flight = std::pin::pin!(async {
            let _ = agent_port.await;
            tracing::info!(
                after_ms = drain_started.elapsed().as_millis() as u64,
                "agent port: every connection closed"
            );
            let _ = api.await;
            tracing::info!(
                after_ms = drain_started.elapsed().as_millis() as u64,
                "tunnel API: every request finished"
            );
        });
        if tokio::time::timeout(grace, &mut in_flight).await.is_err() {
            gw.backends.end_open_calls();
            gw.tunnels.end_open_requests();
            if tokio::time::timeout(ENDED_CALLS_GO_OUT_WITHIN, &mut in_flight)
                .await
                .is_err()
            {
                tracing::warn!(
                    ?grace,
                    "requests still in flight after the grace period; exiting anyway"
                );
            }
        }
        // 4. Leave the cluster: the internal API stops and the registry removes this replica.
        if let Some(internal) = self.internal {
            internal.stop_within(INTERNAL_API_STOPS_WITHIN).await;
        }
        // 5. Periodic work stops; the registry's last write is awaited here.
        self.periodic_stop.cancel();
        let joined = tokio::time::timeout(PERIODIC_STOP_WITHIN, async {
            while self.periodic.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!(
                "background tasks did not stop in time (Redis unreachable?); exiting anyway"
            );
        }
        // 6. Admin last, so that /metrics and /readyz answer until the end.
        self.admin.stop_within(ADMIN_STOPS_WITHIN).await;
        tracing::info!("gateway stopped");
    }
}
