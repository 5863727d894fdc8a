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
    sessions: Mutex<Sessions>,
    next_id: AtomicU64,
    /// In cluster mode, the registry keeps Redis in step through this.
    pub presence: std::sync::OnceLock<PresenceHook>,
    /// Told when the last session ends (shutdown waits for it).
    emptied: tokio::sync::Notify,
}

/// The sessions, and two counts kept beside them so that every question the request path
/// asks is one lookup, whatever the number of agents.
#[derive(Default)]
struct Sessions {
    by_id: HashMap<u64, AgentRecord>,
    /// Sessions per agent name: whether an agent is connected here (asked per tunnelled
    /// request).
    names: HashMap<String, u32>,
    /// Sessions per (agent name, instance id): a backend call's instance claim.
    instances: HashMap<(String, String), u32>,
}

/// Adds one to `key`'s count.
fn count_up<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K) {
    *counts.entry(key).or_insert(0) += 1;
}

/// Takes one from `key`'s count, and the key once it reaches zero.
fn count_down<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K) {
    if let std::collections::hash_map::Entry::Occupied(mut n) = counts.entry(key) {
        *n.get_mut() -= 1;
        if *n.get() == 0 {
            n.remove();
        }
    }
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
        let mut sessions = self.directory.sessions.lock().unwrap();
        let removed = sessions.by_id.remove(&self.id);
        if let Some(r) = &removed {
            count_down(&mut sessions.names, r.name.clone());
            count_down(
                &mut sessions.instances,
                (r.name.clone(), r.instance_id.clone()),
            );
        }
        let now_empty = sessions.by_id.is_empty();
        drop(sessions);
        if let Some(r) = removed {
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
        // Last, so that whoever waits for the end sees the metric and the registry told.
        if now_empty {
            self.directory.emptied.notify_waiters();
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
        let mut sessions = self.sessions.lock().unwrap();
        count_up(&mut sessions.names, record.name.clone());
        count_up(
            &mut sessions.instances,
            (record.name.clone(), record.instance_id.clone()),
        );
        sessions.by_id.insert(id, record);
        drop(sessions);
        SessionGuard {
            directory: self.clone(),
            metrics: metrics.clone(),
            id,
            transport,
        }
    }

    /// All sessions, sorted by name then instance.
    pub fn list(&self) -> Vec<AgentRecord> {
        let mut v: Vec<_> = self
            .sessions
            .lock()
            .unwrap()
            .by_id
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.name, &a.instance_id).cmp(&(&b.name, &b.instance_id)));
        v
    }

    /// Sessions open right now.
    pub fn len(&self) -> usize {
        self.sessions.lock().unwrap().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `name` has a session registered here as `instance`.
    pub fn has_instance(&self, name: &str, instance: &str) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .instances
            .contains_key(&(name.to_string(), instance.to_string()))
    }

    /// Whether `name` has a session here: one lookup, asked for every tunnelled request.
    pub fn is_connected(&self, name: &str) -> bool {
        self.sessions.lock().unwrap().names.contains_key(name)
    }

    /// Waits until no session is left.
    pub async fn emptied(&self) {
        loop {
            let emptied = self.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            emptied.as_mut().enable();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, instance: &str) -> AgentRecord {
        AgentRecord {
            name: name.into(),
            instance_id: instance.into(),
            version: String::new(),
            hostname: String::new(),
            transport: "grpc".into(),
            peer: "127.0.0.1:1".into(),
            connected_since: String::new(),
            connection_id: 1,
        }
    }

    #[tokio::test]
    async fn an_agent_is_connected_while_any_of_its_sessions_is_and_the_last_end_is_told() {
        let dir = Arc::new(Directory::default());
        let metrics = Arc::new(Metrics::default());
        let a1 = dir.register(&metrics, record("a", "i-1"));
        let a1_again = dir.register(&metrics, record("a", "i-1"));
        let a2 = dir.register(&metrics, record("a", "i-2"));
        let b = dir.register(&metrics, record("b", "i-1"));
        assert!(dir.is_connected("a") && dir.is_connected("b"));
        assert!(!dir.is_connected("c") && !dir.is_connected(""));
        drop(a1);
        assert!(
            dir.has_instance("a", "i-1"),
            "its second session is still there"
        );
        drop(a1_again);
        assert!(!dir.has_instance("a", "i-1"));
        assert!(dir.is_connected("a"), "instance i-2 still is");
        drop(a2);
        assert!(!dir.is_connected("a"));
        assert_eq!(dir.len(), 1);
        let waiting = tokio::spawn({
            let dir = dir.clone();
            async move { dir.emptied().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "b is still connected");
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("told when the last session ended")
            .unwrap();
        assert!(dir.is_empty());
        dir.emptied().await; // already empty: returns at once
    }
}
