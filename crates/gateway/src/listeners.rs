//! Binding the gateway's listeners, all before anything is served, so that a port in use is
//! an error at start and not a task that fails later.

use std::net::SocketAddr;

use agentgate_transport::bind_listener;
use anyhow::Context;
use tokio::net::TcpListener;

use crate::GatewayConfig;

/// Addresses the gateway listens on.
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub agent: SocketAddr,
    pub cleartext_agent: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub api: SocketAddr,
}

/// The bound listeners, before they are served. The internal API's is bound later, once
/// Redis has been asked (cluster mode only).
pub struct Listeners {
    pub agent: TcpListener,
    /// `cleartext_listen`: a second agent port without TLS.
    pub cleartext_agent: Option<TcpListener>,
    pub admin: TcpListener,
    pub api: TcpListener,
    pub addrs: BoundAddrs,
}

impl Listeners {
    pub fn bind(cfg: &GatewayConfig) -> anyhow::Result<Self> {
        let agent = bind_listener(cfg.listen, cfg.listen_backlog)
            .with_context(|| format!("cannot listen for agents on {}", cfg.listen))?;
        let admin = bind_listener(cfg.admin_listen, 1024)
            .with_context(|| format!("cannot listen for admin on {}", cfg.admin_listen))?;
        let api = bind_listener(cfg.api_listen, 1024)
            .with_context(|| format!("cannot listen for the API on {}", cfg.api_listen))?;
        let cleartext_agent = cfg
            .cleartext_listen
            .map(|a| {
                bind_listener(a, cfg.listen_backlog)
                    .with_context(|| format!("cannot listen for cleartext agents on {a}"))
            })
            .transpose()?;
        let addrs = BoundAddrs {
            cleartext_agent: cleartext_agent
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?,
            agent: agent.local_addr()?,
            admin: admin.local_addr()?,
            api: api.local_addr()?,
        };
        Ok(Self {
            agent,
            cleartext_agent,
            admin,
            api,
            addrs,
        })
    }
}

/// Says so when a listener faces more than this host without TLS, or the admin port (which has
/// no authentication) does at all.
pub fn warn_exposed(addrs: &BoundAddrs, agent_tls: bool, api_tls: bool) {
    let exposed = |a: &SocketAddr| !a.ip().is_loopback();
    if exposed(&addrs.admin) {
        tracing::warn!(
            admin = %addrs.admin,
            "the admin port has no authentication and listens beyond this host: anyone who \
             reaches it reads the agent list and metrics; bind it to 127.0.0.1 or a private \
             address"
        );
    }
    let cleartext = [
        ("agent port", (!agent_tls).then_some(addrs.agent)),
        ("cleartext agent port", addrs.cleartext_agent),
        ("tunnel API", (!api_tls).then_some(addrs.api)),
    ];
    for (what, addr) in cleartext {
        if let Some(a) = addr.filter(exposed) {
            tracing::warn!(
                addr = %a,
                "the {what} listens beyond this host without TLS: tokens cross the network in \
                 the clear unless a TLS proxy in front terminates it"
            );
        }
    }
}
