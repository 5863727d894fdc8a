//! What can change under a running gateway without a restart: the token store, the TLS
//! certificates of the agent, API and internal ports, and the replicas' shared secrets. Both are re-read on SIGHUP (`systemctl reload`, a
//! certificate-renewal hook), and certificates also when their files change (checked every
//! `certificate_check_interval`; the token store has its own `token_check_interval`).
//! Established connections keep their session and certificate; new handshakes get the new one.

use std::sync::Arc;
use std::time::Duration;

use agentgate_transport::cert_reload::ReloadableCert;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::tokens::TokenStore;

/// A certificate the gateway serves, with the listener it is for (for log lines).
pub struct ServedCert {
    pub listener: &'static str,
    pub cert: Arc<ReloadableCert>,
}

/// What a reload re-reads, and where it counts the outcome.
pub struct Reloadables {
    pub tokens: Arc<TokenStore>,
    /// Cluster mode: the replicas' shared secrets.
    pub cluster: Option<Arc<Cluster>>,
    pub certs: Vec<ServedCert>,
    pub metrics: Arc<Metrics>,
    /// `certificate_check_interval` (zero: only on SIGHUP).
    pub certificate_check_interval: Duration,
}

/// Reloads on SIGHUP and when certificate files change, until `stop`.
pub async fn watch(what: Reloadables, stop: CancellationToken) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP ({e}); reload by restarting");
            None
        }
    };
    let period = what.certificate_check_interval;
    let mut tick = (!period.is_zero()).then(|| tokio::time::interval(period));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!(
                    "SIGHUP received: reloading the token store and certificates (other \
                     settings, backends included, are read at start only: restart to apply them)"
                );
                what.tokens.check_now();
                if let Some(c) = &what.cluster {
                    c.reload_secrets();
                }
                reload_certs(&what, true);
            }
            _ = async { tick.as_mut().expect("guarded").tick().await }, if tick.is_some() => {
                reload_certs(&what, false);
            }
        }
    }
}

fn reload_certs(what: &Reloadables, asked: bool) {
    for c in &what.certs {
        match c.cert.reload_if_changed() {
            Ok(true) => {
                what.metrics.reloads.inc(&[c.listener, "ok"]);
                tracing::info!(
                    listener = c.listener,
                    cert = %c.cert.cert_path().display(),
                    "certificate reloaded: new handshakes get it, open connections keep theirs"
                );
            }
            Ok(false) => {
                if asked {
                    tracing::info!(listener = c.listener, "certificate unchanged");
                }
            }
            Err(e) => {
                what.metrics.reloads.inc(&[c.listener, "failed"]);
                tracing::error!(
                    listener = c.listener,
                    "certificate reload failed, still serving the previous one: {e}"
                );
            }
        }
    }
}
