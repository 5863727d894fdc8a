//! The directory of registered agent sessions, for `/api/v1/agents` and routing decisions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::metrics::Metrics;

/// One registered agent instance, as `/api/v1/agents` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRecord {
    /// The name bound to the agent's token.
    pub name: String,
    pub instance_id: String,
    pub version: String,
    pub hostname: String,
    /// `grpc`, `grpcs`, `ws` or `wss`.
    pub transport: String,
    pub peer: String,
    /// RFC 3339, UTC.
    pub connected_since: String,
    pub connection_id: u64,
}

/// Registered sessions, keyed by a session id (an instance may briefly hold two sessions while
/// a dead connection is being noticed).
/// Told whenever a session of an agent starts (`true`) or ends (`false`).
pub type PresenceHook = Arc<dyn Fn(&str, bool) + Send + Sync>;

#[derive(Default)]
pub struct Directory {
    sessions: Mutex<HashMap<u64, AgentRecord>>,
    /// Sessions per (agent name, instance id), so that a backend call's instance claim is
    /// checked without a scan of every session.
    instances: Mutex<HashMap<(String, String), u32>>,
    next_id: AtomicU64,
    /// In cluster mode, the registry keeps Redis in step through this.
    pub presence: std::sync::OnceLock<PresenceHook>,
}

/// Removes its session from the directory when dropped.
pub struct SessionGuard {
    directory: Arc<Directory>,
    metrics: Arc<Metrics>,
    id: u64,
    transport: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let removed = self.directory.sessions.lock().unwrap().remove(&self.id);
        if let Some(r) = removed {
            let mut instances = self.directory.instances.lock().unwrap();
            let key = (r.name.clone(), r.instance_id.clone());
            if let Some(n) = instances.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    instances.remove(&key);
                }
            }
            drop(instances);
            self.metrics.agents_connected.add(&[&self.transport], -1.0);
            if let Some(hook) = self.directory.presence.get() {
                hook(&r.name, false);
            }
            tracing::info!(
                agent = %r.name,
                instance = %r.instance_id,
                transport = %r.transport,
                conn = r.connection_id,
                "agent session ended"
            );
        }
    }
}

impl Directory {
    pub fn register(self: &Arc<Self>, metrics: &Arc<Metrics>, record: AgentRecord) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let transport = record.transport.clone();
        metrics.agents_connected.add(&[&transport], 1.0);
        if let Some(hook) = self.presence.get() {
            hook(&record.name, true);
        }
        *self
            .instances
            .lock()
            .unwrap()
            .entry((record.name.clone(), record.instance_id.clone()))
            .or_insert(0) += 1;
        self.sessions.lock().unwrap().insert(id, record);
        SessionGuard {
            directory: self.clone(),
            metrics: metrics.clone(),
            id,
            transport,
        }
    }

    /// All sessions, sorted by name then instance.
    pub fn list(&self) -> Vec<AgentRecord> {
        let mut v: Vec<_> = self.sessions.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| (&a.name, &a.instance_id).cmp(&(&b.name, &b.instance_id)));
        v
    }

    /// Sessions open right now.
    pub fn len(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `name` has a session registered here as `instance`.
    pub fn has_instance(&self, name: &str, instance: &str) -> bool {
        self.instances
            .lock()
            .unwrap()
            .contains_key(&(name.to_string(), instance.to_string()))
    }

    pub fn is_connected(&self, name: &str) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .values()
            .any(|r| r.name == name)
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
