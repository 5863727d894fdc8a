//! Where the registry's Redis is: one address (`redis://`, `rediss://`), or whichever master
//! a set of Redis Sentinels names (`redis+sentinel://`), so that a Redis failover moves the
//! cluster to the new master without a restart.
//!
//! The Sentinel URL is `redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]`:
//! the Sentinels to ask, the name they monitor the master under, and the database. The user
//! and password are the master's (Sentinels commonly run without one). The connection to the
//! master is resolved again after any failed call, so a master that went away or came back as
//! a replica (and answers writes with READONLY) is left for the one the Sentinels name now.

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, IntoConnectionInfo, RedisResult};

pub const SENTINEL_SCHEME: &str = "redis+sentinel://";

pub enum RedisTarget {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

#[derive(Debug, thiserror::Error)]
pub enum SentinelUrlError {
    #[error(
        "a Sentinel URL is redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER[/db]: {0}"
    )]
    Shape(&'static str),
    #[error("the database in the Sentinel URL is not a number")]
    Database,
    #[error("Sentinel address {0:?}: {1}")]
    Address(String, String),
}

impl RedisTarget {
    /// For a `redis+sentinel://` URL, the Sentinels and the master they name; `None` for any
    /// other URL. Errors never repeat the URL: it may carry a password.
    pub fn sentinel(url: &str) -> Option<Result<Self, SentinelUrlError>> {
        let rest = url.strip_prefix(SENTINEL_SCHEME)?;
        Some(parse_sentinel(rest).map(|c| Self::Sentinel(tokio::sync::Mutex::new(c))))
    }

    /// A client for the master as known right now.
    pub async fn client(&self) -> RedisResult<Client> {
        match self {
            Self::Direct(c) => Ok(c.clone()),
            Self::Sentinel(s) => s.lock().await.async_get_client().await,
        }
    }

    /// Whether the master can move, so that a failed call should ask where it is again.
    pub fn follows_failover(&self) -> bool {
        matches!(self, Self::Sentinel(_))
    }
}

fn parse_sentinel(rest: &str) -> Result<SentinelClient, SentinelUrlError> {
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((c, r)) => (Some(c), r),
        None => (None, rest),
    };
    let (hosts, path) = rest.split_once('/').ok_or(SentinelUrlError::Shape(
        "no /MASTER after the Sentinel addresses",
    ))?;
    let (master, db) = match path.split_once('/') {
        Some((m, d)) => (
            m,
            d.trim_end_matches('/')
                .parse::<i64>()
                .map_err(|_| SentinelUrlError::Database)?,
        ),
        None => (path, 0),
    };
    if master.is_empty() {
        return Err(SentinelUrlError::Shape("the master's name is empty"));
    }
    let sentinels: Vec<redis::ConnectionInfo> = hosts
        .split(',')
        .filter(|h| !h.trim().is_empty())
        .map(|h| {
            format!("redis://{}", h.trim())
                .into_connection_info()
                .map_err(|e| SentinelUrlError::Address(h.to_string(), e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    if sentinels.is_empty() {
        return Err(SentinelUrlError::Shape("no Sentinel address"));
    }
    // The master's handshake settings, read the way redis:// URLs are read.
    let master_url = match credentials {
        Some(c) => format!("redis://{c}@sentinel-master/{db}"),
        None => format!("redis://sentinel-master/{db}"),
    };
    let master_settings = master_url
        .into_connection_info()
        .map_err(|_| SentinelUrlError::Shape("the user or password does not parse"))?
        .redis_settings()
        .clone();
    SentinelClient::build(
        sentinels,
        master,
        Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(master_settings)),
        SentinelServerType::Master,
    )
    .map_err(|e| SentinelUrlError::Address(hosts.to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_and_others_are_not_sentinel_urls() {
        assert!(RedisTarget::sentinel("redis://127.0.0.1:6379/0").is_none());
        let ok =
            RedisTarget::sentinel("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/2");
        assert!(matches!(ok, Some(Ok(RedisTarget::Sentinel(_)))));
        assert!(matches!(
            RedisTarget::sentinel("redis+sentinel://10.0.0.1:26379/mymaster"),
            Some(Ok(_))
        ));
        for bad in [
            "redis+sentinel://10.0.0.1:26379",
            "redis+sentinel://10.0.0.1:26379/",
            "redis+sentinel:///mymaster",
            "redis+sentinel://10.0.0.1:26379/mymaster/x",
        ] {
            let err = RedisTarget::sentinel(bad)
                .unwrap()
                .err()
                .expect(bad)
                .to_string();
            assert!(!err.contains("pw"), "{err}");
        }
        let err = RedisTarget::sentinel("redis+sentinel://:secret@h:1/m/x")
            .unwrap()
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
