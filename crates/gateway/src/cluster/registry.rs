//! The cluster registry in Redis: which replicas hold which agents.
//!
//! One hash per agent (`agentgate:agent:{name}`), one field per replica (its internal URL),
//! and the entry's expiry time (Unix ms) as the value, as kas does it. A replica writes its
//! field when the first session of an agent arrives, refreshes every `registry_refresh_interval`
//! in one pipeline for all its agents, and removes it when the last session goes or the
//! replica shuts down. Readers ignore and delete expired fields. There is never a write per
//! tunnel or per request: at kas's scale that saturated Redis.
//!
//! While Redis is unreachable, writes are remembered as "dirty" and the whole local state is
//! rewritten once it returns, so the registry rebuilds itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::redis_target::{RedisOptions, RedisTarget};
use crate::metrics::Metrics;

/// Lines a second for failed Redis calls; the rest are counted in the next line's
/// `suppressed` (and every call in `agentgate_redis_ops_total`).
static REDIS_FAILURE_LOG: agentgate_transport::LogBudget = agentgate_transport::LogBudget::new(2);

const REPLICAS_KEY: &str = "agentgate:replicas";
/// How often a replica looks whether Redis still lists it (one HEXISTS).
const LISTED_CHECK_INTERVAL: Duration = Duration::from_secs(5);

fn agent_key(agent: &str) -> String {
    format!("agentgate:agent:{agent}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Redis round trip timed out after {0:?}")]
    Timeout(Duration),
    #[error("{}", describe_redis(.0))]
    Redis(#[from] redis::RedisError),
}

impl RegistryError {
    /// Redis answered and refused the credentials: waiting will not change that.
    pub fn is_refused_password(&self) -> bool {
        let Self::Redis(e) = self else { return false };
        e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
    }
}

/// A Redis failure in one sentence. The library's own text lists every command of a failed
/// pipeline (a refresh line grew to 23 KB with 207 agents) and names its error kinds
/// (`MasterNameNotFoundBySentinel`, `- AuthenticationFailed`).
fn describe_redis(e: &redis::RedisError) -> String {
    use redis::ErrorKind as K;
    if let Some(errors) = e.clone().into_server_errors() {
        if let Some((_, first)) = errors.first() {
            let code = first.code();
            let hint = match code {
                "NOAUTH" | "WRONGPASS" => "; check the password (and ACL user) in the redis URL",
                "READONLY" => {
                    "; it is a replica: point the URL at the master, or follow it with \
                     redis+sentinel://"
                }
                "LOADING" => "; it is loading its data set",
                "OOM" => "; it is out of memory (maxmemory)",
                _ => "",
            };
            let more = match errors.len() {
                1 => String::new(),
                n => format!(" (and {} more commands)", n - 1),
            };
            let detail = first.details().unwrap_or_default();
            return format!("Redis refused the call: {code} {detail}{hint}{more}");
        }
    }
    match e.kind() {
        K::AuthenticationFailed => "Redis refused the password; check the password (and ACL \
                                    user) in the redis URL"
            .into(),
        K::MasterNameNotFoundBySentinel => "the Sentinels know no master by the name in the \
                                            redis+sentinel:// URL; check that name"
            .into(),
        K::NoValidReplicasFoundBySentinel => "the Sentinels name no master that answers \
                                              (a failover under way?)"
            .into(),
        K::Io => format!(
            "cannot reach Redis: {}",
            e.detail().unwrap_or(&e.to_string())
        ),
        _ => format!("Redis: {e}"),
    }
}

pub struct Registry {
    target: RedisTarget,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    self_url: String,
    ttl: Duration,
    refresh: Duration,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// Local session count per agent name.
    local: Mutex<HashMap<String, usize>>,
    /// A write failed; rewrite everything as soon as Redis answers.
    dirty: AtomicBool,
    wake: Notify,
    /// Every field this process writes expires at or after this (its start plus `ttl`); an
    /// earlier one under our URL was written by an earlier process at the same URL.
    own_fields_expire_after: u64,
}

impl Registry {
    /// This replica's own internal URL, as written into Redis.
    pub fn self_url(&self) -> &str {
        &self.self_url
    }

    pub fn new(
        url: &str,
        options: RedisOptions,
        self_url: String,
        ttl: Duration,
        refresh: Duration,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        // The error never repeats the URL: it may carry a password.
        let target = match RedisTarget::sentinel(url, &options) {
            Some(sentinel) => sentinel.map_err(|e| anyhow::anyhow!("invalid --redis URL: {e}"))?,
            None => RedisTarget::Direct(
                match options.ca_cert {
                    None => redis::Client::open(url),
                    Some(root_cert) => redis::Client::build_with_tls(
                        url,
                        redis::TlsCertificates {
                            client_tls: None,
                            root_cert: Some(root_cert),
                        },
                    ),
                }
                .map_err(|e| {
                    // redis's own text for a URL that does not parse is its debug name.
                    let why = if e.kind() == redis::ErrorKind::InvalidClientConfig {
                        "it does not parse".to_string()
                    } else {
                        e.to_string()
                    };
                    anyhow::anyhow!(
                        "invalid --redis URL (redis:// or rediss://[user:password@]host:port/db, \
                         or redis[s]+sentinel://host:port[,host:port]/MASTER[/db]): {why}"
                    )
                })?,
            ),
        };
        Ok(Arc::new(Self {
            target,
            conn: tokio::sync::Mutex::new(None),
            self_url,
            ttl,
            refresh,
            timeout,
            metrics,
            local: Mutex::default(),
            dirty: AtomicBool::new(true),
            wake: Notify::new(),
            own_fields_expire_after: now_ms() + ttl.as_millis() as u64,
        }))
    }

    /// Whether Redis answers a PING within `within` (retrying until then).
    pub async fn reachable_within(&self, within: std::time::Duration) -> Result<(), RegistryError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r: Result<String, RegistryError> = self
                .run("ping", || {
                    let mut p = redis::pipe();
                    p.cmd("PING");
                    p
                })
                .await
                .map(|(pong,): (String,)| pong);
            match r {
                Ok(_) => return Ok(()),
                // Redis answered, and refuses the password: that will not change by waiting.
                Err(e) if e.is_refused_password() => return Err(e),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    *self.conn.lock().await = None;
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// A connection, created on first use (Redis may be down at start-up).
    async fn connection(&self) -> Result<ConnectionManager, RegistryError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(self.timeout * 2, async {
            let client = self.target.client().await?;
            ConnectionManager::new_with_config(client, cfg).await
        })
        .await
        .map_err(|_| RegistryError::Timeout(self.timeout))??;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs one command or pipeline with the deadline, counting it.
    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: impl FnOnce() -> redis::Pipeline,
    ) -> Result<T, RegistryError> {
        let result = async {
            let mut c = self.connection().await?;
            let pipe = cmd();
            tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut c))
                .await
                .map_err(|_| RegistryError::Timeout(self.timeout))?
                .map_err(|e| {
                    // The client's own response timeout is the same deadline: one wording.
                    if e.is_timeout() {
                        RegistryError::Timeout(self.timeout)
                    } else {
                        RegistryError::from(e)
                    }
                })
        }
        .await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.redis_ops.inc(&[op, outcome]);
        if let Err(e) = &result {
            // While Redis is down every lookup fails: a line per request would flood the log.
            if let Some(suppressed) = REDIS_FAILURE_LOG.allow() {
                tracing::warn!(op, error = %e, suppressed, "Redis call failed");
            }
            if self.target.follows_failover() {
                // The master may have moved: ask the Sentinels again on the next call.
                *self.conn.lock().await = None;
            }
            // Redis may come back empty (restarted without persistence): rewrite everything
            // as soon as it answers again.
            self.dirty.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        }
        result
    }

    fn expiry(&self) -> u64 {
        now_ms() + self.ttl.as_millis() as u64
    }

    /// The first session of `agent` arrived here, or its last one left.
    pub fn set_present(self: &Arc<Self>, agent: &str, present: bool) {
        {
            let mut local = self.local.lock().unwrap();
            let n = local.entry(agent.to_string()).or_insert(0);
            if present {
                *n += 1;
                if *n > 1 {
                    return;
                }
            } else {
                *n = n.saturating_sub(1);
                if *n > 0 {
                    return;
                }
                local.remove(agent);
            }
        }
        let this = self.clone();
        let agent = agent.to_string();
        tokio::spawn(async move {
            let key = agent_key(&agent);
            let r: Result<(), _> = if present {
                let (exp, ttl_ms) = (this.expiry(), this.ttl.as_millis() as u64);
                this.run("register", || {
                    let mut p = redis::pipe();
                    p.cmd("HSET")
                        .arg(&key)
                        .arg(&this.self_url)
                        .arg(exp)
                        .ignore();
                    p.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
                    p
                })
                .await
            } else {
                this.run("unregister", || {
                    let mut p = redis::pipe();
                    p.cmd("HDEL").arg(&key).arg(&this.self_url).ignore();
                    p
                })
                .await
            };
            match r {
                Ok(()) => this.metrics.registry_writes.inc(&[]),
                Err(_) => {
                    this.dirty.store(true, Ordering::Relaxed);
                    this.wake.notify_one();
                }
            }
        });
    }

    /// A peer asked us for `agent`, which is not connected here: if Redis lists it here with an
    /// expiry older than this process, that field is left over from an earlier process at our
    /// URL (a crash, then a restart) and we remove it, so lookups stop asking us until the
    /// TTL. The comparison runs in Redis, in one step: a field this process wrote meanwhile
    /// (the agent arriving now) is newer and stays.
    pub fn forget_field_of_earlier_process(self: &Arc<Self>, agent: &str) {
        const DELETE_IF_OLDER: &str = "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
            if v and tonumber(v) < tonumber(ARGV[2]) then return redis.call('HDEL', KEYS[1], ARGV[1]) end \
            return 0";
        let this = self.clone();
        let key = agent_key(agent);
        tokio::spawn(async move {
            let removed: Result<(u64,), _> = this
                .run("forget_stale", || {
                    let mut p = redis::pipe();
                    p.cmd("EVAL")
                        .arg(DELETE_IF_OLDER)
                        .arg(1)
                        .arg(&key)
                        .arg(&this.self_url)
                        .arg(this.own_fields_expire_after);
                    p
                })
                .await;
            if let Ok((1,)) = removed {
                tracing::info!(
                    key,
                    "removed this URL's registry entry left by an earlier process (a restart)"
                );
            }
        });
    }

    /// Rewrites every local entry (and this replica's own entry) in one pipeline.
    async fn refresh_all(&self) -> Result<(), RegistryError> {
        let agents: Vec<String> = self.local.lock().unwrap().keys().cloned().collect();
        let exp = self.expiry();
        let ttl_ms = self.ttl.as_millis() as u64;
        self.run::<()>("refresh", || {
            let mut p = redis::pipe();
            p.cmd("HSET")
                .arg(REPLICAS_KEY)
                .arg(&self.self_url)
                .arg(exp)
                .ignore();
            for a in &agents {
                let key = agent_key(a);
                p.cmd("HSET")
                    .arg(&key)
                    .arg(&self.self_url)
                    .arg(exp)
                    .ignore();
                p.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
            }
            p
        })
        .await?;
        self.metrics
            .registry_writes
            .add(&[], (agents.len() + 1) as f64);
        // The list of replicas never expires as a whole (every live replica refreshes it):
        // the fields of replicas that crashed are removed here, or a fleet of pods that crash
        // on ever new addresses would grow it by one field a crash.
        let _ = self.replicas().await;
        Ok(())
    }

    /// Whether Redis still lists this replica. A registry emptied without a broken connection
    /// (FLUSHALL, eviction, a proxy in front of Redis that switched it) left every other
    /// replica's requests for this one's agents answered "not connected" until the next
    /// refresh, up to 4 minutes, without a word. A failed check counts as listed: failures
    /// mark the registry for rewriting themselves.
    async fn still_listed(&self) -> bool {
        let listed: Result<(bool,), RegistryError> = self
            .run("check", || {
                let mut p = redis::pipe();
                p.cmd("HEXISTS").arg(REPLICAS_KEY).arg(&self.self_url);
                p
            })
            .await;
        match listed {
            Ok((false,)) => {
                tracing::warn!(
                    "the cluster registry no longer lists this replica (Redis flushed, evicted \
                     or replaced?); writing its entries again"
                );
                false
            }
            _ => true,
        }
    }

    /// Replicas (internal URLs) that hold `agent`, expired entries removed.
    pub async fn replicas_for(&self, agent: &str) -> Result<Vec<String>, RegistryError> {
        self.live_fields("lookup", &agent_key(agent)).await
    }

    /// Every live replica.
    pub async fn replicas(&self) -> Result<Vec<String>, RegistryError> {
        self.live_fields("replicas", REPLICAS_KEY).await
    }

    async fn live_fields(&self, op: &'static str, key: &str) -> Result<Vec<String>, RegistryError> {
        let hgetall = || {
            let mut p = redis::pipe();
            p.cmd("HGETALL").arg(key);
            p
        };
        // One retry: after an outage the first call may still fail on the old connection.
        // Not after a timeout: a Redis that does not answer would cost every lookup twice the
        // deadline.
        let (fields,): (HashMap<String, u64>,) = match self.run(op, hgetall).await {
            Ok(f) => f,
            Err(e @ RegistryError::Timeout(_)) => return Err(e),
            Err(_) => self.run(op, hgetall).await?,
        };
        let now = now_ms();
        let (live, expired): (Vec<_>, Vec<_>) = fields.into_iter().partition(|(_, exp)| *exp > now);
        if !expired.is_empty() {
            let stale: Vec<String> = expired.into_iter().map(|(f, _)| f).collect();
            let _ = self
                .run::<()>("expire", || {
                    let mut p = redis::pipe();
                    p.cmd("HDEL").arg(key).arg(&stale).ignore();
                    p
                })
                .await;
        }
        let mut live: Vec<String> = live.into_iter().map(|(f, _)| f).collect();
        live.sort();
        Ok(live)
    }

    /// Counts one new connection of `token_id` in this minute; false if over `limit`.
    pub async fn allow_connect(&self, token_id: &str, limit: u32) -> Result<bool, RegistryError> {
        let minute = now_ms() / 60_000;
        let key = format!("agentgate:connects:{token_id}:{minute}");
        let (n,): (u64,) = self
            .run("rate_limit", || {
                let mut p = redis::pipe();
                p.cmd("INCR").arg(&key);
                p.cmd("EXPIRE").arg(&key).arg(120).ignore();
                p
            })
            .await?;
        Ok(n <= limit as u64)
    }

    /// Keeps the entries fresh until `stop`, then removes this replica's entries.
    pub async fn run_refresher(self: Arc<Self>, stop: CancellationToken) {
        let mut next_refresh = tokio::time::Instant::now() + self.refresh;
        loop {
            let mut failed = false;
            if self.dirty.load(Ordering::Relaxed) {
                if self.refresh_all().await.is_ok() {
                    self.dirty.store(false, Ordering::Relaxed);
                    next_refresh = tokio::time::Instant::now() + self.refresh;
                    tracing::debug!("cluster registry written");
                } else {
                    failed = true;
                }
            }
            let wait = if self.dirty.load(Ordering::Relaxed) {
                Duration::from_secs(1)
            } else {
                next_refresh
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(LISTED_CHECK_INTERVAL)
            };
            if failed {
                // Retried after `wait`, whatever wakes this loop meanwhile: every failed Redis
                // call wakes it, its own among them, so it spun (11,000 failed calls a second
                // while the Sentinels still named a master that had died).
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {
                    if tokio::time::Instant::now() >= next_refresh || !self.still_listed().await {
                        self.dirty.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        let agents: Vec<String> = self.local.lock().unwrap().keys().cloned().collect();
        let _ = self
            .run::<()>("unregister", || {
                let mut p = redis::pipe();
                p.cmd("HDEL").arg(REPLICAS_KEY).arg(&self.self_url).ignore();
                for a in &agents {
                    p.cmd("HDEL").arg(agent_key(a)).arg(&self.self_url).ignore();
                }
                p
            })
            .await;
        tracing::info!(
            agents = agents.len(),
            "removed this replica from the cluster registry"
        );
    }
}
