//! Authentication of agent calls: `authorization: Bearer <agent token>` on every RPC.

use std::sync::Arc;

use agentgate_transport::ConnMeta;
use agentgate_transport::PRE_AUTH_LOG;
use tonic::Status;

use crate::metrics::{Metrics, REJECT_UNAUTHENTICATED};
use crate::tokens::{TokenKind, TokenStore};

/// Who made an authenticated agent call, and over which connection.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub name: String,
    /// The id of the token used (for per-token limits).
    pub token_id: String,
    pub conn: Arc<ConnMeta>,
    /// Cancelled when the token is revoked (or expires): what it authenticated ends.
    pub revoked: tokio_util::sync::CancellationToken,
    /// When the token expires (Unix seconds), if it does: tells an expiry from a revocation.
    pub expires_at: Option<u64>,
}

/// Whether a call carries credentials of its own (an `authorization` header), valid or not.
pub fn carries_credentials(headers: &http::HeaderMap) -> bool {
    headers.contains_key(http::header::AUTHORIZATION)
}

/// The token from an `authorization: Bearer <token>` value, if well-formed.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Checks agent tokens: what `rpc_guard` needs to admit a call, and nothing else.
pub struct AgentAuth {
    tokens: Arc<TokenStore>,
    metrics: Arc<Metrics>,
}

impl AgentAuth {
    pub fn new(tokens: Arc<TokenStore>, metrics: Arc<Metrics>) -> Self {
        Self { tokens, metrics }
    }

    /// Authenticates an agent call from its headers alone, before any body is read, or
    /// returns `Unauthenticated` with a message that says what is wrong. Every refusal is
    /// counted and logged (without the token; log lines are rate-limited, because anyone can
    /// cause them).
    pub fn authenticate_agent(
        &self,
        headers: &http::HeaderMap,
        conn: &Arc<ConnMeta>,
        method: &str,
    ) -> Result<AgentIdentity, Status> {
        let refuse = |why: &'static str| {
            self.metrics
                .connections_rejected
                .inc(&[REJECT_UNAUTHENTICATED]);
            if let Some(suppressed) = PRE_AUTH_LOG.allow() {
                tracing::warn!(
                    conn = conn.id,
                    peer = %conn.peer,
                    transport = %conn.kind,
                    method,
                    reason = REJECT_UNAUTHENTICATED,
                    suppressed,
                    "agent call refused: {why}"
                );
            }
            Status::unauthenticated(format!("agentgate: {why}"))
        };
        match self.agent_token(headers.get(http::header::AUTHORIZATION)) {
            Ok(entry) => Ok(bind(&self.tokens, entry, conn)),
            Err(why) => Err(refuse(why)),
        }
    }

    /// The identity of a call that carries a valid agent token, without refusing (or counting,
    /// or logging) anything: for public calls, where a token is welcome but not required.
    pub fn recognize_agent(
        &self,
        headers: &http::HeaderMap,
        conn: &Arc<ConnMeta>,
    ) -> Option<AgentIdentity> {
        self.agent_token(headers.get(http::header::AUTHORIZATION))
            .ok()
            .map(|e| bind(&self.tokens, e, conn))
    }

    /// The token entry of an `authorization` value, or why there is none.
    fn agent_token(
        &self,
        header: Option<&http::HeaderValue>,
    ) -> Result<Arc<crate::tokens::TokenEntry>, &'static str> {
        let header = header
            .ok_or("missing agent token: send metadata 'authorization: Bearer <agent token>'")?
            .to_str()
            .map_err(|_| {
                "malformed authorization metadata: it is not ASCII text; agent tokens are \
                 'Bearer ' and letters, digits, '_' and '-'"
            })?;
        let token = bearer_token(header)
            .ok_or("malformed authorization metadata: expected 'Bearer <agent token>'")?;
        self.tokens.verify(TokenKind::Agent, token).ok_or_else(|| {
            if self.tokens.verify(TokenKind::Api, token).is_some() {
                "this is an API token (for the tunnel API), not an agent token; give the agent \
                 one made with `agentgate token create --kind agent`"
            } else {
                "invalid agent token (unknown, revoked or expired)"
            }
        })
    }
}

/// Marks the connection as authenticated and names the caller.
fn bind(
    tokens: &crate::tokens::TokenStore,
    entry: Arc<crate::tokens::TokenEntry>,
    conn: &Arc<ConnMeta>,
) -> AgentIdentity {
    let _ = conn.agent.set(entry.name.clone());
    AgentIdentity {
        revoked: tokens.revocation(&entry),
        expires_at: entry.expires_at,
        token_id: entry.id.clone(),
        name: entry.name.clone(),
        conn: conn.clone(),
    }
}

/// The identity `rpc_guard` attached to an authenticated call. Services that need a token
/// are only reached through the guard, so a missing identity is a wiring bug.
pub fn identity_of<T>(req: &tonic::Request<T>) -> Result<AgentIdentity, Status> {
    req.extensions()
        .get::<AgentIdentity>()
        .cloned()
        .ok_or_else(|| Status::internal("agentgate: call reached a service without authentication"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
