//! Short-lived HS256 JSON Web Tokens for calls between replicas.
//!
//! Each internal call carries a token signed with the secret all replicas share, valid for a
//! few seconds; anything unsigned, wrongly signed, expired or for another audience is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const AUDIENCE: &str = "agentgate-internal";
/// Clock skew tolerated between replicas.
const LEEWAY_SECS: u64 = 5;

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("bad signature (is the shared secret the same on every replica?)")]
    BadSignature,
    #[error("token expired or not yet valid (clock skew between replicas?)")]
    Expired,
    #[error("token is for another audience")]
    Audience,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length")
}

/// Signs a token for `issuer`, valid for `validity`.
pub fn sign(secret: &[u8], issuer: &str, validity: Duration) -> String {
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let iat = now();
    let claims = Claims {
        iss: issuer.to_string(),
        aud: AUDIENCE.into(),
        iat,
        exp: iat + validity.as_secs().max(1),
    };
    let payload = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
    let signing_input = format!("{header}.{payload}");
    let mut m = mac(secret);
    m.update(signing_input.as_bytes());
    let sig = B64.encode(m.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Verifies a token; returns its issuer.
pub fn verify(secret: &[u8], token: &str) -> Result<String, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = B64.decode(h).map_err(|_| JwtError::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
    if header.get("alg").and_then(|v| v.as_str()) != Some("HS256") {
        return Err(JwtError::Malformed);
    }
    let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
    let mut m = mac(secret);
    m.update(format!("{h}.{p}").as_bytes());
    m.verify_slice(&sig).map_err(|_| JwtError::BadSignature)?;
    let claims: Claims = serde_json::from_slice(&B64.decode(p).map_err(|_| JwtError::Malformed)?)
        .map_err(|_| JwtError::Malformed)?;
    if claims.aud != AUDIENCE {
        return Err(JwtError::Audience);
    }
    let t = now();
    if claims.exp + LEEWAY_SECS < t || claims.iat > t + LEEWAY_SECS {
        return Err(JwtError::Expired);
    }
    Ok(claims.iss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let t = sign(b"secret", "http://a:8155", Duration::from_secs(5));
        assert_eq!(verify(b"secret", &t).unwrap(), "http://a:8155");
        assert_eq!(verify(b"other", &t), Err(JwtError::BadSignature));
        assert_eq!(verify(b"secret", "x.y"), Err(JwtError::Malformed));
        let mut tampered = t.clone();
        tampered.insert(t.find('.').unwrap() + 2, 'A');
        assert!(verify(b"secret", &tampered).is_err());
    }

    #[test]
    fn expired_tokens_fail() {
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = Claims {
            iss: "x".into(),
            aud: AUDIENCE.into(),
            iat: now() - 100,
            exp: now() - 60,
        };
        let payload = B64.encode(serde_json::to_vec(&claims).unwrap());
        let mut m = mac(b"k");
        m.update(format!("{header}.{payload}").as_bytes());
        let t = format!(
            "{header}.{payload}.{}",
            B64.encode(m.finalize().into_bytes())
        );
        assert_eq!(verify(b"k", &t), Err(JwtError::Expired));
    }
}
