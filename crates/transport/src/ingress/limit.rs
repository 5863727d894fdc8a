//! The process-wide connection limit, and the per-source-address counts of open
//! connections and handshakes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::{IngressSettings, RejectReason};
use crate::pre_auth_budget::PreAuthPool;

/// The connection limit and connection ids, shared by every agent listener of a process so
/// that `max_connections` bounds the process and ids are unique in its logs.
pub struct ConnectionLimit {
    pub(super) permits: Arc<Semaphore>,
    pub(super) max: usize,
    pub(super) next_id: AtomicU64,
    /// What the connections not yet authenticated may hold together
    /// (`max_bytes_before_auth_total`), on every agent listener.
    pub(super) pre_auth: Option<Arc<PreAuthPool>>,
    /// Per source address: connections open and handshakes in progress. An entry exists only
    /// while its address holds a connection, so the map is bounded by `max`.
    sources: Mutex<HashMap<IpAddr, SourceCounts>>,
}

#[derive(Default)]
struct SourceCounts {
    conns: usize,
    handshakes: usize,
}

impl ConnectionLimit {
    /// `max` connections open at once on the listeners that share this; `pre_auth_total`
    /// bytes held by those not yet authenticated (`None`: no shared cap; see
    /// `pre_auth_budget`, which applies it to connections with a budget of their own).
    pub fn new(max: usize, pre_auth_total: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            next_id: AtomicU64::new(1),
            pre_auth: pre_auth_total.map(PreAuthPool::new),
            sources: Mutex::default(),
        })
    }

    /// Admits one more connection from `ip`, in its handshake, or says which limit it hit.
    pub(super) fn admit_source(
        self: &Arc<Self>,
        ip: IpAddr,
        settings: &IngressSettings,
    ) -> Result<SourceSlot, RejectReason> {
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let c = map.entry(ip).or_default();
        if c.conns >= settings.max_connections_per_source {
            return Err(RejectReason::SourceOverLimit);
        }
        if c.handshakes >= settings.max_handshakes_per_source {
            return Err(RejectReason::SourceHandshakesOverLimit);
        }
        c.conns += 1;
        c.handshakes += 1;
        Ok(SourceSlot {
            limit: self.clone(),
            ip,
            handshaking: true,
        })
    }

    fn release_source(&self, ip: IpAddr, handshaking: bool) {
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get_mut(&ip) {
            c.conns = c.conns.saturating_sub(1);
            if handshaking {
                c.handshakes = c.handshakes.saturating_sub(1);
            }
            if c.conns == 0 {
                map.remove(&ip);
            }
        }
    }
}

/// One connection's place in its source address's counts; released on drop.
pub(super) struct SourceSlot {
    limit: Arc<ConnectionLimit>,
    ip: IpAddr,
    handshaking: bool,
}

impl SourceSlot {
    pub(super) fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut map = self.limit.sources.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get_mut(&self.ip) {
                c.handshakes = c.handshakes.saturating_sub(1);
            }
        }
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.limit.release_source(self.ip, self.handshaking);
    }
}
