//! Why a tunnelled request got no answer from the agent's upstream: one type, one table.
//!
//! Every consumer reads the same table: the `outcome` label of the metrics and logs, the HTTP
//! status of the tunnel API, the gRPC code of its gRPC front. Between replicas the error
//! travels whole, as JSON (`to_wire` / `from_wire`), so the replica that answers the caller
//! reports what the replica holding the agent saw, data included.

use std::time::Duration;

use agentgate_proto::v1::{tunnel_error, TunnelError};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tonic::Code;

#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ForwardError {
    #[error("unknown agent {agent:?}: no agent token carries this name")]
    UnknownAgent { agent: String },
    #[error("agent {agent:?} is not connected")]
    NotConnected { agent: String },
    #[error("agent {agent:?} is connected but had no idle tunnel within {}", humantime::format_duration(*waited))]
    NoIdleTunnel {
        agent: String,
        #[serde(with = "humantime_serde")]
        waited: Duration,
    },
    #[error("agent {agent:?}: {message}")]
    UnknownUpstream { agent: String, message: String },
    #[error("upstream unavailable at agent {agent:?}: {message}")]
    UpstreamUnavailable { agent: String, message: String },
    #[error("upstream timed out at agent {agent:?}: {message}")]
    UpstreamTimeout { agent: String, message: String },
    #[error("bad request for agent {agent:?}: {message}")]
    BadRequest { agent: String, message: String },
    #[error("tunnel to agent {agent:?} broke: {message}")]
    TunnelBroken { agent: String, message: String },
    /// The agent is not connected here and no other replica can be asked: `message` says
    /// why (the registry is down, the agent's replica refused this one's call).
    #[error("agent {agent:?} is not connected here, and {message}")]
    ClusterUnavailable { agent: String, message: String },
    /// The caller's request body broke off (it went away mid-upload): the agent is told to
    /// cancel at once rather than wait for the rest of the body.
    #[error("the caller's request to agent {agent:?} broke off: {message}")]
    CallerAborted { agent: String, message: String },
    /// The gateway's shutdown grace ended before the agent answered.
    #[error(
        "the gateway is shutting down and its grace period ended before agent {agent:?} \
         answered; retry the request (another replica, or this one once restarted, answers it)"
    )]
    Shutdown { agent: String },
}

impl ForwardError {
    /// The error table: outcome label, HTTP status, gRPC code.
    fn row(&self) -> (&'static str, StatusCode, Code) {
        match self {
            Self::UnknownAgent { .. } => ("unknown_agent", StatusCode::NOT_FOUND, Code::NotFound),
            Self::NotConnected { .. } => (
                "not_connected",
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
            ),
            Self::NoIdleTunnel { .. } => (
                "no_idle_tunnel",
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
            ),
            Self::UnknownUpstream { .. } => (
                "unknown_upstream",
                StatusCode::NOT_FOUND,
                Code::Unimplemented,
            ),
            Self::UpstreamUnavailable { .. } => (
                "upstream_unavailable",
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
            ),
            Self::UpstreamTimeout { .. } => (
                "upstream_timeout",
                StatusCode::GATEWAY_TIMEOUT,
                Code::DeadlineExceeded,
            ),
            Self::BadRequest { .. } => (
                "bad_request",
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
            ),
            Self::TunnelBroken { .. } => {
                ("tunnel_broken", StatusCode::BAD_GATEWAY, Code::Unavailable)
            }
            Self::ClusterUnavailable { .. } => (
                "cluster_unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
            ),
            Self::Shutdown { .. } => (
                "shutdown",
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
            ),
            // Nobody reads the answer; 499 is what the access line shows (as nginx logs it).
            Self::CallerAborted { .. } => (
                "caller_aborted",
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                Code::Cancelled,
            ),
        }
    }

    /// Whether the gateway decided this before any agent had the request (no such agent,
    /// none connected, no idle tunnel, no registry), rather than the agent's side.
    pub fn decided_by_gateway(&self) -> bool {
        matches!(
            self,
            Self::UnknownAgent { .. }
                | Self::NotConnected { .. }
                | Self::NoIdleTunnel { .. }
                | Self::ClusterUnavailable { .. }
        )
    }

    /// The `outcome` label of `agentgate_tunnel_requests_total` and of log lines.
    pub fn outcome(&self) -> &'static str {
        self.row().0
    }

    /// The status the tunnel API answers with.
    pub fn http_status(&self) -> StatusCode {
        self.row().1
    }

    /// The code the tunnel API's gRPC front answers with.
    pub fn grpc_code(&self) -> Code {
        self.row().2
    }

    /// The error as a replica sends it to the replica that forwarded the request.
    pub fn to_wire(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The error a peer replica sent; anything unreadable (a replica of another version, say)
    /// becomes a broken tunnel that quotes it. The caller's answer names no replica address:
    /// `peer` goes to a warn line only.
    pub fn from_wire(agent: &str, peer: &str, bytes: &[u8]) -> Self {
        let parsed = serde_json::from_slice::<serde_json::Value>(bytes).and_then(|mut v| {
            if v.get("agent")
                .and_then(|a| a.as_str())
                .is_none_or(str::is_empty)
            {
                v["agent"] = agent.into();
            }
            serde_json::from_value(v)
        });
        parsed.unwrap_or_else(|_| {
            let quoted = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]);
            tracing::warn!(
                peer,
                agent,
                error = %quoted,
                "a peer replica reported an error this replica cannot read; are the replicas \
                 of versions far apart?"
            );
            Self::TunnelBroken {
                agent: agent.into(),
                message: format!(
                    "the agent's replica reported an error this replica cannot read: {quoted}"
                ),
            }
        })
    }

    /// The error the agent reported on the tunnel.
    pub(crate) fn from_agent(agent: &str, e: TunnelError) -> Self {
        let agent = agent.to_string();
        let message = e.message;
        match tunnel_error::Code::try_from(e.code).unwrap_or(tunnel_error::Code::Unspecified) {
            tunnel_error::Code::UnknownUpstream => Self::UnknownUpstream { agent, message },
            tunnel_error::Code::UpstreamTimeout => Self::UpstreamTimeout { agent, message },
            tunnel_error::Code::BadRequest => Self::BadRequest { agent, message },
            _ => Self::UpstreamUnavailable { agent, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every() -> Vec<ForwardError> {
        let (agent, message) = ("a".to_string(), "m".to_string());
        vec![
            ForwardError::UnknownAgent {
                agent: agent.clone(),
            },
            ForwardError::NotConnected {
                agent: agent.clone(),
            },
            ForwardError::NoIdleTunnel {
                agent: agent.clone(),
                waited: Duration::from_millis(1500),
            },
            ForwardError::UnknownUpstream {
                agent: agent.clone(),
                message: message.clone(),
            },
            ForwardError::UpstreamUnavailable {
                agent: agent.clone(),
                message: message.clone(),
            },
            ForwardError::UpstreamTimeout {
                agent: agent.clone(),
                message: message.clone(),
            },
            ForwardError::BadRequest {
                agent: agent.clone(),
                message: message.clone(),
            },
            ForwardError::TunnelBroken {
                agent: agent.clone(),
                message: message.clone(),
            },
            ForwardError::ClusterUnavailable {
                agent: agent.clone(),
                message: message.clone(),
            },
            ForwardError::CallerAborted { agent, message },
        ]
    }

    #[test]
    fn errors_cross_replicas_whole() {
        for e in every() {
            let back = ForwardError::from_wire("a", "peer", &e.to_wire());
            assert_eq!(back, e);
            assert_eq!(back.to_string(), e.to_string());
        }
        let waited = ForwardError::from_wire("a", "peer", &every()[2].to_wire());
        assert!(waited.to_string().ends_with("within 1s 500ms"), "{waited}");
    }

    #[test]
    fn a_peer_error_without_the_agent_gets_it() {
        let e = ForwardError::from_wire(
            "a",
            "peer",
            br#"{"outcome":"tunnel_broken","agent":"","message":"expired"}"#,
        );
        assert_eq!(
            e,
            ForwardError::TunnelBroken {
                agent: "a".into(),
                message: "expired".into()
            }
        );
    }

    #[test]
    fn unreadable_peer_errors_become_broken_tunnels() {
        let e = ForwardError::from_wire("a", "http://peer:9", b"upstream said no");
        assert_eq!(e.outcome(), "tunnel_broken");
        assert!(e.to_string().contains("upstream said no"), "{e}");
        assert!(!e.to_string().contains("peer:9"), "the address leaked: {e}");
    }

    #[test]
    fn the_outcome_label_is_the_wire_tag() {
        let mut seen = std::collections::HashSet::new();
        for e in every() {
            let v: serde_json::Value = serde_json::from_slice(&e.to_wire()).unwrap();
            assert_eq!(v["outcome"], e.outcome());
            assert!(seen.insert(e.outcome()), "outcome {} twice", e.outcome());
        }
    }
}
