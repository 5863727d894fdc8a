//! Authentication of agent calls: `authorization: Bearer <agent token>` on every RPC.

use std::sync::Arc;

use agentgate_transport::ConnMeta;
use tonic::{Request, Status};

use crate::metrics::REJECT_UNAUTHENTICATED;
use crate::tokens::TokenKind;
use crate::Gateway;

/// Who made an authenticated agent call, and over which connection.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub name: String,
    /// The id of the token used (for per-token limits).
    pub token_id: String,
    pub conn: Arc<ConnMeta>,
}

/// The token from an `authorization: Bearer <token>` value, if well-formed.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Gateway {
    /// Authenticates an agent call, or returns `Unauthenticated` with a message that says what
    /// is wrong. Every refusal is counted and logged (without the token).
    pub fn authenticate_agent<T>(
        &self,
        req: &Request<T>,
        method: &str,
    ) -> Result<AgentIdentity, Status> {
        let conn = req
            .extensions()
            .get::<Arc<ConnMeta>>()
            .cloned()
            .ok_or_else(|| Status::internal("connection metadata missing"))?;
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let refuse = |why: &'static str| {
            self.metrics
                .connections_rejected
                .inc(&[REJECT_UNAUTHENTICATED]);
            tracing::warn!(
                conn = conn.id,
                peer = %conn.peer,
                transport = %conn.kind,
                method,
                reason = REJECT_UNAUTHENTICATED,
                "agent call refused: {why}"
            );
            Status::unauthenticated(format!("agentgate: {why}"))
        };
        let Some(header) = header else {
            return Err(refuse(
                "missing agent token: send metadata 'authorization: Bearer <agent token>'",
            ));
        };
        let Some(token) = bearer_token(header) else {
            return Err(refuse(
                "malformed authorization metadata: expected 'Bearer <agent token>'",
            ));
        };
        let Some(entry) = self.tokens.verify(TokenKind::Agent, token) else {
            return Err(refuse("invalid agent token (unknown or revoked)"));
        };
        let _ = conn.agent.set(entry.name.clone());
        Ok(AgentIdentity {
            token_id: entry.id,
            name: entry.name,
            conn,
        })
    }
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
