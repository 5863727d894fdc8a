//! Signed calls between replicas: every internal call carries an HS256 JWT (the maintained
//! `jsonwebtoken` crate, not our own signing) that binds it to one use.
//!
//! The token names the caller (`iss`) and the one replica it is for (`aud`), lives a few
//! seconds (`exp`), carries a unique id (`jti`) that the callee accepts once (a replay
//! cache), and binds the method (`htm`), the path and query (`htu`), the target agent and a
//! digest of the forwarded request's head (`hd`). A forwarded request's body is bound by a
//! trailer, `agentgate-body-mac`: an HMAC over the token id and the body's SHA-256, checked
//! before the body's last bytes go on (see [`VerifiedBody`]). docs/cluster.md has the wire
//! format, so another implementation can speak it.
//!
//! The shared secret file holds one secret per line: the first signs, every one verifies, so
//! a new secret is rolled out by adding it, then moving it first, then removing the old one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use http_body::{Body, Frame};
use jsonwebtoken::{
    decode, encode, errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::metrics::Metrics;

/// The trailer that binds a forwarded request's body to its token.
pub const BODY_MAC_TRAILER: &str = "agentgate-body-mac";
/// Shortest secret accepted: 256 bits, as HS256 asks.
pub const MIN_SECRET_LEN: usize = 32;
/// Clock skew tolerated between replicas.
const LEEWAY_SECS: u64 = 5;
/// Token ids remembered at most; only validly signed tokens are remembered, so this bounds
/// what replicas (not strangers) can make a peer hold.
const REPLAY_CACHE_CAP: usize = 1_000_000;
/// Headers of a forwarded request that the hop between replicas may add or drop.
const UNBOUND_HEADERS: [&str; 8] = [
    super::INTERNAL_TOKEN_HEADER,
    "host",
    "te",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

#[derive(Debug, Serialize, Deserialize)]
struct CallClaims {
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
    jti: String,
    htm: String,
    htu: String,
    agent: String,
    hd: String,
}

/// Why an internal call was refused. Each has a fixed metric label ([`Self::reason`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallAuthError {
    #[error("no signed token on the call")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("bad signature: is the shared secret the same on every replica?")]
    BadSignature,
    #[error("the token expired or is not yet valid (clock skew between replicas?)")]
    Expired,
    #[error("the token is for another replica")]
    WrongAudience,
    #[error("the token was signed for another method or path")]
    WrongRoute,
    #[error("the token was signed for another request head")]
    WrongHead,
    #[error("the token was already used (a replayed call)")]
    Replayed,
    #[error("too many live tokens to remember; refused rather than risk a replay")]
    ReplayCacheFull,
}

impl CallAuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::WrongAudience => "wrong_audience",
            Self::WrongRoute => "wrong_route",
            Self::WrongHead => "wrong_head",
            Self::Replayed => "replayed",
            Self::ReplayCacheFull => "replay_cache_full",
        }
    }
}

/// The secrets from the shared file: one per line, the first signs.
#[derive(Clone)]
pub struct Secrets(Vec<Arc<[u8]>>);

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("the internal secret file has no secret in it")]
    Empty,
    #[error("line {line} of the internal secret file is {len} bytes; each secret needs at least {MIN_SECRET_LEN} (openssl rand -hex 32 makes one)")]
    Short { line: usize, len: usize },
}

impl Secrets {
    pub fn parse(text: &[u8]) -> Result<Self, SecretsError> {
        let mut out = vec![];
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            let s = line.trim_ascii();
            if s.is_empty() || s.starts_with(b"#") {
                continue;
            }
            if s.len() < MIN_SECRET_LEN {
                return Err(SecretsError::Short {
                    line: i + 1,
                    len: s.len(),
                });
            }
            out.push(Arc::from(s));
        }
        if out.is_empty() {
            return Err(SecretsError::Empty);
        }
        Ok(Self(out))
    }

    /// How many secrets verify (at least one: [`Self::parse`] refuses an empty file).
    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// A signed call: the header value, and what the body MAC needs.
pub struct SignedCall {
    pub token: String,
    pub body_key: BodyKey,
}

/// What binds a body to its call: the key that signed the token, and the token's id.
#[derive(Clone)]
pub struct BodyKey {
    key: Arc<[u8]>,
    jti: String,
}

/// A call that passed every check.
#[derive(Debug)]
pub struct VerifiedCall {
    pub issuer: String,
    pub agent: String,
    pub body_key: BodyKeyHandle,
}

/// [`BodyKey`] without Debug noise.
pub struct BodyKeyHandle(pub BodyKey);

impl std::fmt::Debug for BodyKeyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyKey")
    }
}

/// Signs this replica's calls and verifies its peers'.
pub struct CallSigner {
    secrets: RwLock<Secrets>,
    self_url: String,
    validity: Duration,
    seen: Mutex<HashMap<String, u64>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl CallSigner {
    pub fn new(secrets: Secrets, self_url: String, validity: Duration) -> Self {
        Self {
            secrets: RwLock::new(secrets),
            self_url,
            validity,
            seen: Mutex::default(),
        }
    }

    /// Uses `secrets` from the next call on (SIGHUP re-reads the file).
    pub fn replace_secrets(&self, secrets: Secrets) {
        *self.secrets.write().unwrap() = secrets;
    }

    /// A token for one call to `peer`.
    pub fn sign(
        &self,
        peer: &str,
        method: &http::Method,
        path_and_query: &str,
        agent: &str,
        head_digest: &str,
    ) -> SignedCall {
        let key = self.secrets.read().unwrap().0[0].clone();
        let iat = now();
        let jti = hex::encode(rand::random::<[u8; 16]>());
        let claims = CallClaims {
            iss: self.self_url.clone(),
            aud: peer.to_string(),
            iat,
            exp: iat + self.validity.as_secs().max(1),
            jti: jti.clone(),
            htm: method.as_str().to_string(),
            htu: path_and_query.to_string(),
            agent: agent.to_string(),
            hd: head_digest.to_string(),
        };
        let token = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&key),
        )
        .expect("HS256 signing cannot fail");
        SignedCall {
            token,
            body_key: BodyKey { key, jti },
        }
    }

    /// Checks a call's token against the call itself, and remembers its id.
    pub fn verify(
        &self,
        token: Option<&str>,
        method: &http::Method,
        path_and_query: &str,
        head_digest: &str,
    ) -> Result<VerifiedCall, CallAuthError> {
        let token = token.ok_or(CallAuthError::Missing)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[&self.self_url]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = false;
        let secrets = self.secrets.read().unwrap().clone();
        let mut verified = None;
        for key in &secrets.0 {
            match decode::<CallClaims>(token, &DecodingKey::from_secret(key), &validation) {
                Ok(data) => {
                    verified = Some((data.claims, key.clone()));
                    break;
                }
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => continue,
                    ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => {
                        return Err(CallAuthError::Expired)
                    }
                    ErrorKind::InvalidAudience => return Err(CallAuthError::WrongAudience),
                    _ => return Err(CallAuthError::Malformed),
                },
            }
        }
        let (claims, key) = verified.ok_or(CallAuthError::BadSignature)?;
        if claims.iat > now() + LEEWAY_SECS {
            return Err(CallAuthError::Expired);
        }
        if claims.htm != method.as_str() || claims.htu != path_and_query {
            return Err(CallAuthError::WrongRoute);
        }
        if claims.hd != head_digest {
            return Err(CallAuthError::WrongHead);
        }
        self.remember(&claims.jti, claims.exp + LEEWAY_SECS)?;
        Ok(VerifiedCall {
            issuer: claims.iss,
            agent: claims.agent,
            body_key: BodyKeyHandle(BodyKey {
                key,
                jti: claims.jti,
            }),
        })
    }

    /// Accepts a token id once while it can still verify.
    fn remember(&self, jti: &str, until: u64) -> Result<(), CallAuthError> {
        let mut seen = self.seen.lock().unwrap();
        if seen.contains_key(jti) {
            return Err(CallAuthError::Replayed);
        }
        if seen.len() >= REPLAY_CACHE_CAP {
            let t = now();
            seen.retain(|_, exp| *exp >= t);
            if seen.len() >= REPLAY_CACHE_CAP {
                return Err(CallAuthError::ReplayCacheFull);
            }
        }
        seen.insert(jti.to_string(), until);
        Ok(())
    }

    /// Forgets token ids that can no longer verify (called every few seconds).
    pub fn forget_expired(&self) {
        let t = now();
        self.seen.lock().unwrap().retain(|_, exp| *exp >= t);
    }
}

/// The digest a forwarded request's head is signed with: the tunnel fields and every header
/// the hop does not touch, in a canonical order.
pub fn head_digest(fields: &[&str], headers: &HeaderMap) -> String {
    let mut h = Sha256::new();
    for f in fields {
        h.update(f.as_bytes());
        h.update(b"\n");
    }
    let mut names: Vec<&str> = headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| !UNBOUND_HEADERS.contains(k))
        .collect();
    names.sort_unstable();
    for name in names {
        for v in headers.get_all(name) {
            h.update(name.as_bytes());
            h.update(b":");
            h.update(v.as_bytes());
            h.update(b"\n");
        }
    }
    hex::encode(h.finalize())
}

impl BodyKey {
    fn mac(&self, body_sha256: &[u8]) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        m.update(b"agentgate-body-v1\n");
        m.update(self.jti.as_bytes());
        m.update(b"\n");
        m.update(body_sha256);
        hex::encode(m.finalize().into_bytes())
    }
}

pin_project! {
    /// The sending side: the body as it is, then its MAC in a trailer (merged into the
    /// body's own trailers when it has some).
    pub struct SigningBody<B> {
        #[pin]
        inner: B,
        key: BodyKey,
        hash: Sha256,
        done: bool,
    }
}

impl<B> SigningBody<B> {
    pub fn new(inner: B, key: BodyKey) -> Self {
        Self {
            inner,
            key,
            hash: Sha256::new(),
            done: false,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for SigningBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let mac_trailers = |hash: &Sha256, key: &BodyKey, mut t: HeaderMap| {
            let mac = key.mac(&hash.clone().finalize());
            t.insert(
                BODY_MAC_TRAILER,
                http::HeaderValue::from_str(&mac).expect("hex"),
            );
            t
        };
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    this.hash.update(&d);
                    Poll::Ready(Some(Ok(Frame::data(d))))
                }
                Err(frame) => {
                    let t = frame.into_trailers().unwrap_or_default();
                    *this.done = true;
                    Poll::Ready(Some(Ok(Frame::trailers(mac_trailers(
                        this.hash, this.key, t,
                    )))))
                }
            },
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => {
                *this.done = true;
                let t = mac_trailers(this.hash, this.key, HeaderMap::new());
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A forwarded body whose MAC did not check out; the request is aborted.
#[derive(Debug, thiserror::Error)]
pub enum BodyMacError {
    #[error("the forwarded body has no agentgate-body-mac trailer")]
    Missing,
    #[error("the forwarded body does not match its signature (changed between replicas?)")]
    Mismatch,
    #[error("reading the forwarded body failed: {0}")]
    Read(String),
}

pin_project! {
    /// The receiving side: the body's end goes on only once the MAC trailer has checked out,
    /// so a body that does not match never reaches the agent's upstream whole, and the
    /// request is aborted with [`BodyMacError`]. A body with a declared length is whole with
    /// its last byte, so it is passed on one frame late (that length stays unmet); any other
    /// (chunked, gRPC) is whole only with its end, and goes on frame by frame: held back, an
    /// interactive stream's last message waited for a frame the client sends only after the
    /// answer (a bidi call across replicas hung until its deadline).
    pub struct VerifiedBody<B> {
        #[pin]
        inner: B,
        key: BodyKey,
        hash: Sha256,
        hold_last: bool,
        held: Option<Bytes>,
        trailers: Option<HeaderMap>,
        finished: bool,
        metrics: Arc<Metrics>,
    }
}

impl<B> VerifiedBody<B> {
    /// `declared_length`: the request carries a content-length.
    pub fn new(inner: B, key: BodyKeyHandle, metrics: Arc<Metrics>, declared_length: bool) -> Self {
        Self {
            inner,
            key: key.0,
            hash: Sha256::new(),
            hold_last: declared_length,
            held: None,
            trailers: None,
            finished: false,
            metrics,
        }
    }
}

/// A refused body: counted and logged where it is found.
fn refuse_body(metrics: &Metrics, e: BodyMacError) -> BodyMacError {
    metrics.internal_rejected.inc(&["body_mac"]);
    tracing::warn!("forwarded request aborted: {e}");
    e
}

impl<B> Body for VerifiedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BodyMacError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyMacError>>> {
        let mut this = self.project();
        loop {
            if *this.finished {
                // The MAC checked out: the held bytes, then the body's own trailers.
                if let Some(d) = this.held.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => {
                        this.hash.update(&d);
                        if !*this.hold_last {
                            return Poll::Ready(Some(Ok(Frame::data(d))));
                        }
                        if let Some(prev) = this.held.replace(d) {
                            return Poll::Ready(Some(Ok(Frame::data(prev))));
                        }
                    }
                    Err(frame) => {
                        let mut t = frame.into_trailers().unwrap_or_default();
                        let got = t.remove(BODY_MAC_TRAILER).ok_or(BodyMacError::Missing);
                        let want = this.key.mac(&this.hash.clone().finalize());
                        match got {
                            Ok(v) if v.as_bytes() == want.as_bytes() => {
                                *this.finished = true;
                                *this.trailers = (!t.is_empty()).then_some(t);
                            }
                            Ok(_) => {
                                return Poll::Ready(Some(Err(refuse_body(
                                    this.metrics,
                                    BodyMacError::Mismatch,
                                ))))
                            }
                            Err(e) => return Poll::Ready(Some(Err(refuse_body(this.metrics, e)))),
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(BodyMacError::Read(e.to_string())))),
                None => {
                    return Poll::Ready(Some(Err(refuse_body(this.metrics, BodyMacError::Missing))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.held.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    const A: &str = "http://10.0.0.1:8155";
    const B: &str = "http://10.0.0.2:8155";

    fn secrets(lines: &str) -> Secrets {
        Secrets::parse(lines.as_bytes()).unwrap()
    }

    fn pair() -> (CallSigner, CallSigner) {
        let s = "0123456789abcdef0123456789abcdef";
        (
            CallSigner::new(secrets(s), A.into(), Duration::from_secs(5)),
            CallSigner::new(secrets(s), B.into(), Duration::from_secs(5)),
        )
    }

    #[test]
    fn a_call_verifies_once_and_only_as_signed() {
        let (a, b) = pair();
        let post = http::Method::POST;
        let t = a
            .sign(B, &post, "/internal/v1/agents/x/reserve?wait_ms=5", "x", "")
            .token;
        let ok = b
            .verify(
                Some(&t),
                &post,
                "/internal/v1/agents/x/reserve?wait_ms=5",
                "",
            )
            .unwrap();
        assert_eq!((ok.issuer.as_str(), ok.agent.as_str()), (A, "x"));
        assert_eq!(
            b.verify(
                Some(&t),
                &post,
                "/internal/v1/agents/x/reserve?wait_ms=5",
                ""
            )
            .unwrap_err(),
            CallAuthError::Replayed
        );
        let t = a
            .sign(B, &post, "/internal/v1/agents/x/reserve", "x", "")
            .token;
        assert_eq!(
            b.verify(Some(&t), &post, "/internal/v1/agents/y/reserve", "")
                .unwrap_err(),
            CallAuthError::WrongRoute
        );
        let t = a.sign(B, &post, "/p", "x", "aaaa").token;
        assert_eq!(
            b.verify(Some(&t), &post, "/p", "bbbb").unwrap_err(),
            CallAuthError::WrongHead
        );
        // A token for A presented to B (a re-targeted call).
        let t = b.sign(A, &post, "/p", "x", "").token;
        assert_eq!(
            b.verify(Some(&t), &post, "/p", "").unwrap_err(),
            CallAuthError::WrongAudience
        );
        assert_eq!(
            b.verify(None, &post, "/p", "").unwrap_err(),
            CallAuthError::Missing
        );
    }

    #[test]
    fn a_second_secret_verifies_during_a_rollout_and_a_stranger_does_not() {
        let old = "old-secret-old-secret-old-secret";
        let new = "new-secret-new-secret-new-secret";
        let signer_new = CallSigner::new(secrets(new), A.into(), Duration::from_secs(5));
        let verifier = CallSigner::new(
            secrets(&format!("{old}\n{new}\n")),
            B.into(),
            Duration::from_secs(5),
        );
        let t = signer_new.sign(B, &http::Method::GET, "/l", "", "").token;
        assert!(verifier
            .verify(Some(&t), &http::Method::GET, "/l", "")
            .is_ok());
        let stranger = CallSigner::new(
            secrets("not-the-secret-not-the-secret-xx"),
            A.into(),
            Duration::from_secs(5),
        );
        let t = stranger.sign(B, &http::Method::GET, "/l", "", "").token;
        assert_eq!(
            verifier
                .verify(Some(&t), &http::Method::GET, "/l", "")
                .unwrap_err(),
            CallAuthError::BadSignature
        );
        assert!(matches!(
            Secrets::parse(b"short\n"),
            Err(SecretsError::Short { line: 1, len: 5 })
        ));
        assert!(matches!(
            Secrets::parse(b"\n# only a comment\n"),
            Err(SecretsError::Empty)
        ));
    }

    fn stream_of(
        chunks: Vec<Result<Frame<Bytes>, std::io::Error>>,
    ) -> impl Body<Data = Bytes, Error = std::io::Error> {
        StreamBody::new(futures_util::stream::iter(chunks))
    }

    async fn verified_bytes(
        sent: Vec<&'static str>,
        tamper: Option<usize>,
        declared_length: bool,
    ) -> (Vec<Bytes>, Option<BodyMacError>) {
        let (a, b) = pair();
        let call = a.sign(B, &http::Method::POST, "/r", "x", "");
        let frames = sent
            .iter()
            .map(|s| Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
            .collect();
        let mut signing = Box::pin(SigningBody::new(stream_of(frames), call.body_key));
        let mut on_wire = vec![];
        while let Some(f) = signing.frame().await {
            on_wire.push(f.unwrap());
        }
        if let Some(i) = tamper {
            on_wire[i] = Frame::data(Bytes::from_static(b"EVIL"));
        }
        let v = b
            .verify(Some(&call.token), &http::Method::POST, "/r", "")
            .unwrap();
        let mut body = Box::pin(VerifiedBody::new(
            stream_of(on_wire.into_iter().map(Ok).collect()),
            v.body_key,
            Arc::new(Metrics::default()),
            declared_length,
        ));
        let mut passed = vec![];
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => {
                    if let Ok(d) = f.into_data() {
                        passed.push(d)
                    }
                }
                Err(e) => return (passed, Some(e)),
            }
        }
        (passed, None)
    }

    #[tokio::test]
    async fn a_body_passes_whole_only_when_its_mac_checks_out() {
        for declared_length in [true, false] {
            let (passed, err) =
                verified_bytes(vec!["one ", "two ", "three"], None, declared_length).await;
            assert!(err.is_none());
            assert_eq!(passed.concat(), b"one two three");
        }
        // A swapped chunk in a body of declared length: the last chunk is never passed on,
        // and the body ends in an error.
        let (passed, err) = verified_bytes(vec!["one ", "two ", "three"], Some(1), true).await;
        assert!(matches!(err, Some(BodyMacError::Mismatch)), "{err:?}");
        assert_eq!(
            passed.concat(),
            b"one EVIL",
            "the held-back last chunk stays back"
        );
        // Without a declared length every chunk goes on as it comes (an interactive stream
        // must not wait for the next), and the body's end becomes the error.
        let (passed, err) = verified_bytes(vec!["one ", "two ", "three"], Some(1), false).await;
        assert!(matches!(err, Some(BodyMacError::Mismatch)), "{err:?}");
        assert_eq!(passed.concat(), b"one EVILthree");
    }

    #[tokio::test]
    async fn a_chunk_without_a_declared_length_goes_on_before_the_next_arrives() {
        let (a, b) = pair();
        let call = a.sign(B, &http::Method::POST, "/r", "x", "");
        let v = b
            .verify(Some(&call.token), &http::Method::POST, "/r", "")
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let mut body = Box::pin(VerifiedBody::new(
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            v.body_key,
            Arc::new(Metrics::default()),
            false,
        ));
        tx.send(Ok(Frame::data(Bytes::from_static(b"ping"))))
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the first message went on while the sender waits for its answer");
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "ping");
    }
}
