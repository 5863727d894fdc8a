//! Cluster mode from the configuration: every check that can fail at start does, with a
//! sentence (a wrong internal URL scheme, a missing or short secret, TLS settings that do not
//! fit together, an allowlist entry that does not parse, Redis required but not answering).

use std::path::Path;
use std::sync::Arc;

use agentgate_transport::cert_reload::ReloadableCert;
use agentgate_transport::tls::{client_config_presenting, ServerVerification, ALPN_H2, ALPN_HTTP1};
use anyhow::Context;

use super::peers::PeerPolicy;
use super::redis_target::RedisOptions;
use super::registry::Registry;
use super::signing::{CallSigner, Secrets};
use super::{Cluster, ClusterSettings};
use crate::config::GatewayConfig;
use crate::metrics::Metrics;

/// Reads the shared secret file (one secret per line).
pub fn read_secrets(path: &Path) -> anyhow::Result<Secrets> {
    let text = std::fs::read(path)
        .with_context(|| format!("cannot read the internal secret file {}", path.display()))?;
    Secrets::parse(&text).with_context(|| format!("internal secret file {}", path.display()))
}

/// This replica's internal URL: `internal_url`, or the listener with the scheme TLS implies.
fn self_url(config: &GatewayConfig, tls: bool) -> anyhow::Result<String> {
    let scheme = if tls { "https" } else { "http" };
    let Some(u) = &config.internal_url else {
        if config.internal_listen.ip().is_unspecified() {
            tracing::warn!(
                listen = %config.internal_listen,
                "internal_listen is a wildcard address and internal_url is not set: other \
                 replicas would be told to call {scheme}://{}; set internal_url to an address \
                 they can reach",
                config.internal_listen
            );
        }
        return Ok(format!("{scheme}://{}", config.internal_listen));
    };
    let parsed = url::Url::parse(u).with_context(|| {
        format!("internal_url {u:?} is not a URL (http://host:port or https://host:port)")
    })?;
    match (parsed.scheme(), tls) {
        ("http", false) | ("https", true) => {}
        ("https", false) => anyhow::bail!(
            "internal_url {u:?} is https:// but the internal API has no certificate: set \
             internal_tls_cert and internal_tls_key, or use http://"
        ),
        ("http", true) => anyhow::bail!(
            "internal_url {u:?} is http:// but the internal API listens with TLS \
             (internal_tls_cert): use https://"
        ),
        (other, _) => anyhow::bail!(
            "internal_url {u:?} has scheme {other}://: other replicas call the internal API \
             over HTTP/2, so it must be {scheme}://host:port"
        ),
    }
    Ok(u.trim_end_matches('/').to_string())
}

/// Builds the cluster side of the gateway when `redis` is set.
pub fn cluster_from_config(
    config: &GatewayConfig,
    redis_url: &str,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<Cluster>> {
    let secret_file = config.internal_secret_file.as_ref().context(
        "cluster mode (--redis) needs --internal-secret-file with a secret shared by all replicas \
         (openssl rand -hex 32 > FILE)",
    )?;
    let secrets = read_secrets(secret_file)?;
    let cert = match (&config.internal_tls_cert, &config.internal_tls_key) {
        (Some(c), Some(k)) => Some(ReloadableCert::load(c, k).context("internal API TLS")?),
        (None, None) => None,
        _ => anyhow::bail!(
            "internal API TLS: give both internal_tls_cert and internal_tls_key, or neither"
        ),
    };
    if config.internal_require_client_cert && (cert.is_none() || config.internal_ca_cert.is_none())
    {
        anyhow::bail!(
            "internal_require_client_cert needs internal_tls_cert, internal_tls_key and \
             internal_ca_cert (the CA that signs every replica's certificate)"
        );
    }
    let self_url = self_url(config, cert.is_some())?;
    let policy = PeerPolicy::parse(&config.internal_peers)?;
    if policy.allows_all() {
        tracing::warn!(
            "internal_peers is empty: this replica sends requests and tokens to any replica URL \
             found in Redis; list the replicas' addresses (CIDRs, hosts or URL patterns) to \
             refuse URLs that something else wrote there"
        );
    }
    let verify = match &config.internal_ca_cert {
        Some(ca) => ServerVerification::CaFile(ca.clone()),
        None => ServerVerification::SystemRoots,
    };
    let client_cert = cert
        .clone()
        .map(|c| c as Arc<dyn rustls::client::ResolvesClientCert>);
    let client_tls = client_config_presenting(&verify, client_cert).context("internal API TLS")?;
    let server_tls = match &cert {
        None => None,
        Some(c) if config.internal_require_client_cert => Some(
            c.server_config_requiring_clients(
                &[ALPN_H2, ALPN_HTTP1],
                config.internal_ca_cert.as_deref().expect("checked above"),
            )
            .context("internal API TLS")?,
        ),
        Some(c) => Some(c.server_config(&[ALPN_H2, ALPN_HTTP1])?),
    };
    let redis_ca = match &config.redis_ca_cert {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("cannot read redis_ca_cert {}", p.display()))?,
        ),
        None => None,
    };
    let sentinel_password = match &config.redis_sentinel_password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| {
                    format!("cannot read redis_sentinel_password_file {}", p.display())
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        None => None,
    };
    let registry = Registry::new(
        redis_url,
        RedisOptions {
            ca_cert: redis_ca,
            sentinel_username: config.redis_sentinel_username.clone(),
            sentinel_password,
        },
        self_url.clone(),
        config.registry_ttl,
        config.registry_refresh_interval,
        config.redis_timeout,
        metrics.clone(),
    )?;
    let signer = Arc::new(CallSigner::new(
        secrets,
        self_url,
        config.internal_token_validity,
    ));
    let settings = ClusterSettings {
        connect_timeout: config.internal_connect_timeout,
        call_timeout: config.internal_call_timeout,
        first_byte_timeout: config.internal_first_byte_timeout,
        peer_down_for: config.internal_peer_down_for,
        tls: client_tls,
    };
    let mut cluster = Cluster::new(registry, signer, policy, settings, metrics);
    cluster.secret_file = secret_file.clone();
    cluster.server_tls = server_tls;
    cluster.internal_cert = cert;
    Ok(Arc::new(cluster))
}
