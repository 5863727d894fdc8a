//! Where the registry's Redis is: one address (`redis://`, `rediss://`), or whichever master
//! a set of Redis Sentinels names (`redis+sentinel://`, `rediss+sentinel://`), so that a Redis
//! failover moves the cluster to the new master without a restart.
//!
//! The Sentinel URL is
//! `redis[s]+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]`: the Sentinels
//! to ask, the name they monitor the master under, and the database. The user and password
//! are the master's; the Sentinels' own (`requirepass` in sentinel.conf) come from
//! [`RedisOptions`]. `rediss+sentinel://` speaks TLS to the Sentinels and to the master, both
//! verified against the same CA. The connection to the master is resolved again after any
//! failed call, so a master that went away or came back as a replica (and answers writes with
//! READONLY) is left for the one the Sentinels name now.

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisResult, TlsCertificates, TlsMode};

pub const SENTINEL_SCHEME: &str = "redis+sentinel://";
pub const SENTINEL_TLS_SCHEME: &str = "rediss+sentinel://";

/// How to reach Redis beyond its URL.
#[derive(Default)]
pub struct RedisOptions {
    /// PEM CA certificates for TLS (`rediss://`, `rediss+sentinel://`); none: the system's.
    pub ca_cert: Option<Vec<u8>>,
    /// The Sentinels' ACL user and password, when they require them.
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

pub enum RedisTarget {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

#[derive(Debug, thiserror::Error)]
pub enum SentinelUrlError {
    #[error(
        "a Sentinel URL is redis+sentinel:// (or rediss+sentinel:// for TLS) \
         [[user]:password@]host:port[,host:port...]/MASTER[/db]: {0}"
    )]
    Shape(&'static str),
    #[error("the database in the Sentinel URL is not a number")]
    Database,
    #[error("Sentinel address {0:?}: {1}")]
    Address(String, String),
    #[error("the Sentinel settings do not fit together: {0}")]
    Settings(String),
}

impl RedisTarget {
    /// For a `redis+sentinel://` or `rediss+sentinel://` URL, the Sentinels and the master they
    /// name; `None` for any other URL. Errors never repeat the URL: it may carry a password.
    pub fn sentinel(url: &str, options: &RedisOptions) -> Option<Result<Self, SentinelUrlError>> {
        let (rest, tls) = match url.strip_prefix(SENTINEL_SCHEME) {
            Some(rest) => (rest, false),
            None => (url.strip_prefix(SENTINEL_TLS_SCHEME)?, true),
        };
        Some(parse_sentinel(rest, tls, options).map(|c| Self::Sentinel(tokio::sync::Mutex::new(c))))
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

/// The master's `user:password` from the URL, read (and percent-decoded) the way a
/// `redis://` URL's are.
fn credentials(c: &str) -> Result<(Option<String>, Option<String>), SentinelUrlError> {
    let info = format!("redis://{c}@sentinel-master/0")
        .into_connection_info()
        .map_err(|_| SentinelUrlError::Shape("the user or password does not parse"))?;
    let settings = info.redis_settings();
    Ok((
        settings.username().map(str::to_string),
        settings.password().map(str::to_string),
    ))
}

fn parse_sentinel(
    rest: &str,
    tls: bool,
    options: &RedisOptions,
) -> Result<SentinelClient, SentinelUrlError> {
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((c, r)) => (Some(credentials(c)?), r),
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
    let sentinels: Vec<ConnectionAddr> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| sentinel_addr(h, tls))
        .collect::<Result<_, _>>()?;
    if sentinels.is_empty() {
        return Err(SentinelUrlError::Shape("no Sentinel address"));
    }
    let settings = |e: redis::RedisError| SentinelUrlError::Settings(e.to_string());
    let mut b = SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)
        .map_err(settings)?
        .set_client_to_redis_db(db);
    if let Some((user, password)) = credentials {
        if let Some(u) = user {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = password {
            b = b.set_client_to_redis_password(p);
        }
    }
    if let Some(u) = &options.sentinel_username {
        b = b.set_client_to_sentinel_username(u);
    }
    if let Some(p) = &options.sentinel_password {
        b = b.set_client_to_sentinel_password(p);
    }
    if tls {
        b = b.set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(ca) = &options.ca_cert {
            let certs = || TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            };
            b = b
                .set_client_to_redis_certificates(certs())
                .set_client_to_sentinel_certificates(certs());
        }
    }
    b.build().map_err(settings)
}

/// One Sentinel's `host:port`, read by redis-rs the way a `redis://` (or, with TLS,
/// `rediss://`) URL's address is.
fn sentinel_addr(h: &str, tls: bool) -> Result<ConnectionAddr, SentinelUrlError> {
    let scheme = if tls { "rediss" } else { "redis" };
    format!("{scheme}://{h}")
        .into_connection_info()
        .map(|info| info.addr().clone())
        .map_err(|e| SentinelUrlError::Address(h.to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_and_others_are_not_sentinel_urls() {
        let none = RedisOptions::default();
        assert!(RedisTarget::sentinel("redis://127.0.0.1:6379/0", &none).is_none());
        let ok = RedisTarget::sentinel(
            "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/2",
            &none,
        );
        assert!(matches!(ok, Some(Ok(RedisTarget::Sentinel(_)))));
        assert!(matches!(
            RedisTarget::sentinel("redis+sentinel://10.0.0.1:26379/mymaster", &none),
            Some(Ok(_))
        ));
        for bad in [
            "redis+sentinel://10.0.0.1:26379",
            "redis+sentinel://10.0.0.1:26379/",
            "redis+sentinel:///mymaster",
            "redis+sentinel://10.0.0.1:26379/mymaster/x",
        ] {
            let err = RedisTarget::sentinel(bad, &none)
                .unwrap()
                .err()
                .expect(bad)
                .to_string();
            assert!(!err.contains("pw"), "{err}");
        }
        let err = RedisTarget::sentinel("redis+sentinel://:secret@h:1/m/x", &none)
            .unwrap()
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
