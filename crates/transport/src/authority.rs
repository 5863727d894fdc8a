//! Which `:authority` values each listener takes.
//!
//! Our patched h2 (`third_party/h2`, see its AGENTGATE-PATCHES.md) no longer resets a stream
//! whose `:authority` is not a URI authority: grpc-go dialed with a `passthrough:` URL target,
//! as GitLab's agentk dials ws:// and wss://, sends the whole URL there
//! (`wss://kas.example.com/-/kubernetes-agent/`), and kas accepts it. h2 hands the raw value
//! over as the `h2::ext::NonUriAuthority` request extension instead. The agent port accepts
//! such requests; the API and internal ports refuse them with [`refuse_non_uri_authority`],
//! which keeps their old strictness in one place.

/// The raw `:authority` of a request whose value is not a URI authority, made printable and
/// cut to 128 characters (it is remote input and goes into logs and answers).
pub fn non_uri_authority(extensions: &http::Extensions) -> Option<String> {
    let raw = extensions.get::<h2::ext::NonUriAuthority>()?;
    Some(
        String::from_utf8_lossy(raw.as_bytes())
            .chars()
            .take(128)
            .collect(),
    )
}

/// For the strict listeners: the one-sentence refusal of a request whose `:authority`
/// (HTTP/2) or `Host` header (HTTP/1.1) is not a host or host:port, or `None` when the
/// request is fine. The value is passed on to upstreams (`x-forwarded-host`), so both
/// versions are held to the same rule.
pub fn refuse_non_uri_authority<B>(req: &http::Request<B>) -> Option<String> {
    let (what, raw) = match non_uri_authority(req.extensions()) {
        Some(raw) => (":authority", raw),
        None => {
            let host = req.headers().get(http::header::HOST)?;
            // An empty Host is allowed for a request without an authority (RFC 9112).
            let valid = host.is_empty()
                || host
                    .to_str()
                    .ok()
                    .and_then(|h| h.parse::<http::uri::Authority>().ok())
                    .is_some_and(|a| !a.as_str().contains('@'));
            if valid {
                return None;
            }
            let raw = String::from_utf8_lossy(host.as_bytes())
                .chars()
                .take(128)
                .collect();
            ("Host header", raw)
        }
    };
    Some(format!(
        "the request's {what} {raw:?} is not a host or host:port; send the server's host name \
         (this port does not accept URLs there)"
    ))
}

#[cfg(test)]
mod tests {
    //! These fail without the `third_party/h2` patch: unpatched h2 resets the stream and the
    //! server never sees the request.
    use super::*;
    use crate::raw_frames::{frame, hpack_literal as literal};
    use tokio::io::AsyncWriteExt;

    /// Sends one GET with this `:authority` to a real h2 server and returns what it made of
    /// the request: its URI authority and the raw value kept aside.
    async fn serve_one(authority: &str) -> (Option<String>, Option<String>) {
        let (uri_authority, raw, refusal) = serve_one_refusal(authority).await;
        assert_eq!(raw.is_some(), refusal.is_some());
        (uri_authority, raw)
    }

    async fn serve_one_refusal(
        authority: &str,
    ) -> (Option<String>, Option<String>, Option<String>) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut block = Vec::new();
        literal(&mut block, ":method", "GET");
        literal(&mut block, ":scheme", "http");
        literal(&mut block, ":path", "/grpc.health.v1.Health/Check");
        literal(&mut block, ":authority", authority);
        let mut bytes = crate::HTTP2_PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        bytes.extend(frame(0x1, 0x4 | 0x1, 1, &block)); // HEADERS, END_HEADERS|END_STREAM
        client.write_all(&bytes).await.unwrap();
        let mut conn = h2::server::handshake(server).await.unwrap();
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(2), conn.accept())
            .await
            .expect("the server saw the request")
            .expect("a request, not the end of the connection")
            .expect("no connection error");
        let (req, _respond) = accepted;
        (
            req.uri().authority().map(|a| a.to_string()),
            non_uri_authority(req.extensions()),
            refuse_non_uri_authority(&req),
        )
    }

    #[test]
    fn an_http1_host_header_is_held_to_the_same_rule() {
        let with_host = |host: &str| {
            http::Request::builder()
                .header(http::header::HOST, host)
                .body(())
                .unwrap()
        };
        assert_eq!(
            refuse_non_uri_authority(&with_host("api.example.com:8443")),
            None
        );
        assert_eq!(refuse_non_uri_authority(&with_host("[::1]:80")), None);
        for bad in ["a b/c@d", "user@host", "http://x/", "/path"] {
            let why = refuse_non_uri_authority(&with_host(bad)).expect(bad);
            assert!(why.contains("Host header"), "{why}");
        }
        let without = http::Request::builder().body(()).unwrap();
        assert_eq!(refuse_non_uri_authority(&without), None);
    }

    #[tokio::test]
    async fn a_url_or_empty_authority_reaches_the_server_aside_from_the_uri() {
        let url = "wss://kas.example.com/-/kubernetes-agent/";
        assert_eq!(serve_one(url).await, (None, Some(url.to_string())));
        assert_eq!(serve_one("").await, (None, Some(String::new())));
    }

    #[tokio::test]
    async fn a_host_authority_is_unchanged() {
        assert_eq!(
            serve_one("kas.example.com:443").await,
            (Some("kas.example.com:443".into()), None)
        );
    }
}
