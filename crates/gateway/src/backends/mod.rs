//! Gateway-side gRPC backends: services behind the gateway that agents call OUT to over their
//! connection (a runner asking a job router for work), routed by service-name prefix.
//!
//! A call's path on the agent port: `rpc_guard` authenticates the agent token from the
//! headers; [`route::BackendRouteLayer`] sees that the method's service matches a backend
//! ([`Backends::find`]) and hands the call to [`call::forward`], which replaces credentials
//! with verified identity and streams the call to a connection of the backend's
//! [`pool::BackendPool`]. Every other call goes on to the gateway's own services.

pub mod call;
pub mod pool;
pub mod route;
mod stream;

use std::sync::Arc;

use thiserror::Error;

use crate::config::BackendConfig;

/// Service-name prefixes the gateway serves itself; no backend may claim them.
const OWN_SERVICES: [&str; 3] = ["agentgate.", "grpc.health.", "grpc.reflection."];
/// The shortest `keepalive_interval` other than 0: below it PINGs would only measure the
/// backend's PING policy (every gRPC server's default closes the connection).
const MIN_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A backend configuration the gateway cannot start with. Each says which backend and what
/// to change.
#[derive(Debug, Error)]
pub enum BackendConfigError {
    #[error(
        "backend {name:?}: set at least one service prefix (services = [\"runner.jobs.v1.\"])"
    )]
    NoServices { name: String },
    #[error("backend {name:?}: url {url:?} must be http://host:port (HTTP/2 without TLS) or https://host:port")]
    BadUrl { name: String, url: String },
    #[error("backend {name:?}: service prefix {prefix:?} is one the gateway serves itself")]
    OwnService { name: String, prefix: String },
    #[error("backends {first:?} and {second:?} both claim service prefix {prefix:?}")]
    DuplicatePrefix {
        first: String,
        second: String,
        prefix: String,
    },
    #[error("two backends are named {name:?}; names label metrics and must differ")]
    DuplicateName { name: String },
    #[error("backend {name:?}: {what}")]
    Tls { name: String, what: String },
    // `error`, not `source`: the text is whole here, and a source would print it twice.
    #[error("backend {name:?}: cannot read signing_secret_file {path}: {error}")]
    Secret {
        name: String,
        path: String,
        error: std::io::Error,
    },
    #[error("backend {name:?}: {what}")]
    Setting { name: String, what: String },
    #[error("backend {name:?}: signing_secret_file {path} holds fewer than 32 bytes")]
    ShortSecret { name: String, path: String },
}

/// One configured backend: its name, its prefixes, and the connections to it.
pub struct Backend {
    pub name: String,
    pub config: BackendConfig,
    pub pool: pool::BackendPool,
    pub(crate) limits: call::AgentCallLimits,
    pub(crate) signing_secret: Option<Vec<u8>>,
}

/// Every configured backend, and the routing table from service prefixes to them.
#[derive(Default)]
pub struct Backends {
    /// (prefix, backend), longest prefix first, so the first match is the best one.
    routes: Vec<(String, Arc<Backend>)>,
    all: Vec<Arc<Backend>>,
    /// Cancelled at shutdown once `shutdown_grace` is over: calls still open (long polls) end
    /// with UNAVAILABLE and a sentence rather than a reset when the process exits.
    ending: tokio_util::sync::CancellationToken,
}

impl Backends {
    /// Checks the configuration and prepares each backend (no connection is made yet: a
    /// backend may start after the gateway).
    pub fn new(configs: &[BackendConfig]) -> Result<Self, BackendConfigError> {
        let mut routes: Vec<(String, Arc<Backend>)> = Vec::new();
        let mut all: Vec<Arc<Backend>> = Vec::new();
        for cfg in configs {
            let mut cfg = cfg.clone();
            cfg.name = cfg.effective_name();
            let name = cfg.name.clone();
            if cfg.services.is_empty() || cfg.services.iter().any(|p| p.is_empty()) {
                return Err(BackendConfigError::NoServices { name });
            }
            for prefix in &cfg.services {
                if OWN_SERVICES
                    .iter()
                    .any(|own| prefix.starts_with(own) || own.starts_with(prefix.as_str()))
                {
                    return Err(BackendConfigError::OwnService {
                        name,
                        prefix: prefix.clone(),
                    });
                }
                if let Some((_, other)) = routes.iter().find(|(p, _)| p == prefix) {
                    return Err(BackendConfigError::DuplicatePrefix {
                        first: other.name.clone(),
                        second: name,
                        prefix: prefix.clone(),
                    });
                }
            }
            // After the prefixes: two backends given the same prefix and no names are
            // told about the prefix, not about the names derived from it.
            if all.iter().any(|b| b.name == name) {
                return Err(BackendConfigError::DuplicateName { name });
            }
            if cfg.max_calls_per_connection == 0 {
                return Err(BackendConfigError::Setting {
                    name,
                    what: "max_calls_per_connection must be at least 1".into(),
                });
            }
            if !cfg.keepalive_interval.is_zero() && cfg.keepalive_interval < MIN_KEEPALIVE_INTERVAL
            {
                return Err(BackendConfigError::Setting {
                    name,
                    what: "keepalive_interval must be 0s (never) or at least 1s".into(),
                });
            }
            let signing_secret = match &cfg.signing_secret_file {
                None => None,
                Some(path) => {
                    let secret =
                        std::fs::read(path).map_err(|error| BackendConfigError::Secret {
                            name: name.clone(),
                            path: path.display().to_string(),
                            error,
                        })?;
                    let secret = secret.trim_ascii().to_vec();
                    if secret.len() < 32 {
                        return Err(BackendConfigError::ShortSecret {
                            name,
                            path: path.display().to_string(),
                        });
                    }
                    Some(secret)
                }
            };
            let backend = Arc::new(Backend {
                pool: pool::BackendPool::new(&cfg)?,
                limits: call::AgentCallLimits::new(cfg.max_calls_per_agent),
                name,
                signing_secret,
                config: cfg,
            });
            for prefix in &backend.config.services {
                routes.push((prefix.clone(), backend.clone()));
            }
            all.push(backend);
        }
        routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Self {
            routes,
            all,
            ending: Default::default(),
        })
    }

    /// The backend for a request path `/package.Service/Method`, if any claims its service.
    pub fn find(&self, path: &str) -> Option<&Arc<Backend>> {
        let service = service_of(path)?;
        self.routes
            .iter()
            .find(|(prefix, _)| claims(prefix, service))
            .map(|(_, b)| b)
    }

    /// Ends every call still open (see `ending`).
    pub fn end_open_calls(&self) {
        self.ending.cancel();
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The configured prefixes, for the sentence that tells a caller what is served.
    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(p, _)| p.as_str())
    }
}

/// Whether a configured prefix claims `service`: prefixes end at a name's boundary, so
/// `runner.jobs.v1.` and `runner.jobs` claim `runner.jobs.v1.JobRouter`, and
/// `runner.jobs.v1.JobRouter` claims that service but not `runner.jobs.v1.JobRouterAdmin`.
fn claims(prefix: &str, service: &str) -> bool {
    service
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || prefix.ends_with('.') || rest.starts_with('.'))
}

/// The service part of `/package.Service/Method`.
pub fn service_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_claim_services_at_name_boundaries() {
        assert!(claims("runner.jobs.v1.", "runner.jobs.v1.JobRouter"));
        assert!(claims("runner.jobs", "runner.jobs.v1.JobRouter"));
        assert!(claims(
            "runner.jobs.v1.JobRouter",
            "runner.jobs.v1.JobRouter"
        ));
        assert!(!claims(
            "runner.jobs.v1.JobRouter",
            "runner.jobs.v1.JobRouterAdmin"
        ));
        assert!(!claims("runner.job", "runner.jobs.v1.JobRouter"));
        assert!(!claims("runner.jobs.v1.", "runner.jobs.v2.JobRouter"));
    }

    fn backend(services: &[&str], url: &str) -> BackendConfig {
        BackendConfig {
            services: services.iter().map(|s| s.to_string()).collect(),
            url: url.into(),
            ..BackendConfig::default()
        }
    }

    #[test]
    fn the_longest_prefix_wins_and_other_services_match_nothing() {
        let b = Backends::new(&[
            backend(&["runner."], "http://127.0.0.1:1"),
            backend(&["runner.jobs.v1."], "http://127.0.0.1:2"),
        ])
        .unwrap();
        let name = |p: &str| b.find(p).map(|b| b.name.clone());
        assert_eq!(
            name("/runner.jobs.v1.JobRouter/GetJob").as_deref(),
            Some("runner.jobs.v1")
        );
        assert_eq!(name("/runner.cache.v1.C/Get").as_deref(), Some("runner"));
        assert_eq!(name("/other.v1.X/Y"), None);
        assert_eq!(name("/runner.jobs.v1.JobRouter"), None, "no method");
        assert_eq!(name("runner.jobs.v1.JobRouter/GetJob"), None);
    }

    #[test]
    fn bad_configurations_are_refused_with_a_sentence() {
        let cases = [
            (vec![backend(&[], "http://h:1")], "at least one service"),
            (vec![backend(&["a."], "grpc://h:1")], "must be http://"),
            (vec![backend(&["a."], "http://")], "must be http://"),
            (
                vec![backend(&["agentgate.v1."], "http://h:1")],
                "serves itself",
            ),
            (vec![backend(&["grpc."], "http://h:1")], "serves itself"),
            (
                vec![
                    backend(&["a."], "http://h:1"),
                    BackendConfig {
                        name: "other".into(),
                        ..backend(&["a."], "http://h:2")
                    },
                ],
                "both claim",
            ),
            (
                vec![
                    backend(&["a."], "http://h:1"),
                    backend(&["a."], "http://h:2"),
                ],
                "both claim service prefix \"a.\"",
            ),
            (
                vec![
                    backend(&["a."], "http://h:1"),
                    BackendConfig {
                        name: "a".into(),
                        ..backend(&["b."], "http://h:2")
                    },
                ],
                "two backends are named \"a\"",
            ),
            (
                vec![BackendConfig {
                    ca_cert: Some("/ca.pem".into()),
                    ..backend(&["a."], "http://h:1")
                }],
                "https:// backends only",
            ),
            (
                vec![BackendConfig {
                    tls_server_name: Some("h".into()),
                    ..backend(&["a."], "http://h:1")
                }],
                "https:// backends only",
            ),
            (
                vec![BackendConfig {
                    max_calls_per_connection: 0,
                    ..backend(&["a."], "http://h:1")
                }],
                "max_calls_per_connection must be at least 1",
            ),
            (
                vec![BackendConfig {
                    keepalive_interval: std::time::Duration::from_millis(999),
                    ..backend(&["a."], "http://h:1")
                }],
                "keepalive_interval must be 0s (never) or at least 1s",
            ),
            (
                vec![BackendConfig {
                    signing_secret_file: Some("/nonexistent/secret".into()),
                    ..backend(&["a."], "http://h:1")
                }],
                "cannot read signing_secret_file /nonexistent/secret: No such file",
            ),
        ];
        for (configs, want) in cases {
            let err = Backends::new(&configs).err().expect("refused");
            let chain = format!("{:#}", anyhow::Error::from(err));
            assert!(chain.contains(want), "{chain:?} should say {want:?}");
            assert_eq!(
                chain.matches("No such file").count(),
                usize::from(want.contains("No such file")),
                "{chain:?} says it once"
            );
        }
        let accepted = Backends::new(&[BackendConfig {
            keepalive_interval: std::time::Duration::ZERO,
            ..backend(&["a."], "http://h")
        }])
        .unwrap();
        assert_eq!(
            accepted.all[0].pool.address().as_str(),
            "h:80",
            "port 80 by default"
        );
    }
}
