//! Parked tunnel streams, per agent name.
//!
//! A request takes the most recently parked stream of its agent, so that under steady load the
//! same few streams carry the requests and the agent's surplus ones stay idle long enough to
//! expire; if there is none, it waits (up to
//! the `tunnel_wait` setting) in a FIFO of waiters that newly parked streams are handed to
//! directly. A periodic sweep sends heartbeats on parked streams (so proxies with per-stream
//! idle timeouts see traffic), drains the agent's heartbeat replies, and drops dead streams.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentgate_proto::v1::{
    agent_message, gateway_message, AgentMessage, Descriptor, GatewayMessage, Heartbeat,
};
use agentgate_transport::ConnMeta;
use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Streaming;

use super::ToAgentSender;
use crate::metrics::Metrics;

/// One idle tunnel stream, ready for a request (version 1: exactly one).
pub struct ParkedTunnel {
    /// Messages to the agent (the response stream of its `Tunnel.Connect` call).
    pub tx: ToAgentSender,
    /// Messages from the agent.
    pub rx: Streaming<AgentMessage>,
    pub descriptor: Descriptor,
    pub conn: Arc<ConnMeta>,
    /// The agent's name (to park the tunnel again after a request, version 2).
    pub agent: Arc<str>,
}

impl ParkedTunnel {
    /// Consumes messages that are already there (heartbeat replies) without waiting. Returns
    /// false if the stream is dead: ended, failed, or sent something it should not have.
    fn drain_ready(&mut self) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        loop {
            match self.rx.message().now_or_never() {
                None => return true,
                Some(Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(_)),
                }))) => continue,
                Some(_) => return false,
            }
        }
    }
}

#[derive(Default)]
struct AgentTunnels {
    /// Boxed: a tunnel is about 500 bytes, and a queue of two keeps room for four.
    idle: VecDeque<Box<ParkedTunnel>>,
    waiters: VecDeque<oneshot::Sender<ParkedTunnel>>,
}

pub struct TunnelParking {
    agents: Mutex<HashMap<String, AgentTunnels>>,
    metrics: Arc<Metrics>,
    /// Tunnels on connections past their drain point (see [`crate::drain_point`]) are not
    /// used for new requests: the connection is about to get GOAWAY for max age.
    max_age: Option<Duration>,
    /// Set by [`Self::clear`] at shutdown: a tunnel that finishes its request afterwards is
    /// ended instead of parked again, so a draining replica takes no new requests on it (it
    /// did, from callers and other replicas, for as long as the agents kept the connection).
    closed: std::sync::atomic::AtomicBool,
}

impl TunnelParking {
    pub fn new(metrics: Arc<Metrics>, max_age: Option<Duration>) -> Self {
        Self {
            agents: Mutex::default(),
            metrics,
            closed: std::sync::atomic::AtomicBool::new(false),
            max_age,
        }
    }

    fn usable(&self, t: &ParkedTunnel) -> bool {
        !t.conn.is_retired()
            && self
                .max_age
                .is_none_or(|age| t.conn.opened_at.elapsed() < crate::drain_point(age, t.conn.id))
    }

    /// Ends the parked tunnels of one connection (its agent retired it); returns how many.
    pub fn end_connection(&self, conn: u64) -> usize {
        let mut agents = self.agents.lock().unwrap();
        let mut ended = 0;
        for a in agents.values_mut() {
            let before = a.idle.len();
            a.idle.retain(|t| t.conn.id != conn);
            ended += before - a.idle.len();
        }
        self.metrics.tunnels_parked.add(&[], -(ended as f64));
        ended
    }

    /// Parks a tunnel, or hands it straight to a waiting request.
    pub fn park(&self, agent: &str, mut tunnel: ParkedTunnel) {
        let mut agents = self.agents.lock().unwrap();
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            drop(agents);
            drop(tunnel); // its stream ends: the agent closes its side
            return;
        }
        // Looked up first, so that parking again after a request allocates nothing.
        let entry = match agents.get_mut(agent) {
            Some(e) => e,
            None => agents.entry(agent.to_string()).or_default(),
        };
        while let Some(w) = entry.waiters.pop_front() {
            match w.send(tunnel) {
                Ok(()) => return,
                Err(t) => tunnel = t,
            }
        }
        // Idle from now on: its decode buffer, grown to the largest message of its last
        // request (a 64 KiB chunk), goes back (third_party/tonic, patch 1).
        tunnel.rx.release_buffer();
        entry.idle.push_back(Box::new(tunnel));
        self.metrics.tunnels_parked.add(&[], 1.0);
    }

    /// Number of parked tunnels of `agent`.
    pub fn idle_count(&self, agent: &str) -> usize {
        self.agents
            .lock()
            .unwrap()
            .get(agent)
            .map_or(0, |a| a.idle.len())
    }

    /// Takes a live parked tunnel of `agent`, waiting up to `wait` for one. A tunnel on the
    /// connection `avoid` (where the previous attempt of this request broke: its agent may be
    /// leaving it) is taken only when no other is parked.
    pub async fn take(
        &self,
        agent: &str,
        wait: Duration,
        avoid: Option<u64>,
    ) -> Option<ParkedTunnel> {
        let deadline = Instant::now() + wait;
        loop {
            let rx = {
                let mut agents = self.agents.lock().unwrap();
                let entry = match agents.get_mut(agent) {
                    Some(e) => e,
                    None => agents.entry(agent.to_string()).or_default(),
                };
                if let Some(avoid) = avoid {
                    // Move the avoided connection's tunnels to the front, keeping their order.
                    let (mut other, same): (VecDeque<_>, VecDeque<_>) =
                        entry.idle.drain(..).partition(|t| t.conn.id != avoid);
                    let mut idle = same;
                    idle.append(&mut other);
                    entry.idle = idle;
                }
                while let Some(mut t) = entry.idle.pop_back() {
                    self.metrics.tunnels_parked.add(&[], -1.0);
                    if self.usable(&t) && t.drain_ready() {
                        return Some(*t);
                    }
                }
                let (tx, rx) = oneshot::channel();
                entry.waiters.push_back(tx);
                rx
            };
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(mut t)) => {
                    if self.usable(&t) && t.drain_ready() {
                        return Some(t);
                    }
                }
                Ok(Err(_)) => {}
                Err(_) => return None,
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Sends a heartbeat on every parked tunnel and drops the dead ones. Run periodically.
    pub fn sweep(&self) {
        let heartbeat = Heartbeat::now();
        let mut agents = self.agents.lock().unwrap();
        let mut dropped = 0usize;
        agents.retain(|_, a| {
            let before = a.idle.len();
            a.idle.retain_mut(|t| {
                if !(self.usable(t) && t.drain_ready()) {
                    return false;
                }
                let hb = GatewayMessage {
                    msg: Some(gateway_message::Msg::Heartbeat(heartbeat)),
                };
                // A full queue means the previous heartbeat is still queued: fine.
                t.tx.try_send(hb) != Err(true)
            });
            dropped += before - a.idle.len();
            a.waiters.retain(|w| !w.is_closed());
            !(a.idle.is_empty() && a.waiters.is_empty())
        });
        if dropped > 0 {
            self.metrics.tunnels_parked.add(&[], -(dropped as f64));
            tracing::debug!(dropped, "dropped dead parked tunnels");
        }
    }

    /// Ends every parked tunnel (on shutdown), so agents see their streams close cleanly.
    pub fn clear(&self) {
        let mut agents = self.agents.lock().unwrap();
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let n: usize = agents.values().map(|a| a.idle.len()).sum();
        agents.clear();
        self.metrics.tunnels_parked.add(&[], -(n as f64));
    }
}
