//! Header handling shared by the HTTP and gRPC front ends: conversion to and from the tunnel
//! protocol, and the hop-by-hop rules of an HTTP proxy (RFC 9110, section 7.6.1).

use agentgate_proto::v1::Header;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop, never forwarded. `HeaderName`s, not strings: a string key
/// is parsed into a name on every lookup, and this list is looked up twice per proxied call.
const HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// gRPC's own metadata names, looked up on every call (a string key is parsed per lookup).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `X-Forwarded-For`, `-Proto` and `-Host`, which the tunnel API adds. Constants, because a
/// `&'static str` key that is not a standard header is copied into a new name on every insert.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including those named in `Connection`. `keep_te_trailers`
/// keeps `te: trailers`, which gRPC requires end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // The values, not the names they list: a value is a shared slice, so keeping it costs no
    // copy, and `remove` looks a name up without building a `HeaderName` (an allocation per
    // name that is not one of `http`'s standard headers, such as `keep-alive`).
    let listed: Vec<HeaderValue> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    for v in &listed {
        let Ok(v) = v.to_str() else { continue };
        for n in v.split(',') {
            headers.remove(n.trim());
        }
    }
    let te_trailers = keep_te_trailers
        && headers
            .get(http::header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("trailers"))
            });
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

pub use agentgate_proto::headers::to_proto;

/// Converts tunnel headers back; invalid names or values, and headers past
/// `agentgate_proto::headers::MAX_HEADERS`, are dropped (and logged).
pub fn from_proto(headers: &[Header]) -> HeaderMap {
    use agentgate_proto::headers::Dropped;
    agentgate_proto::headers::from_proto(headers, |d| match d {
        Dropped::Invalid(h) => {
            let name: String = String::from_utf8_lossy(&h.name).chars().take(64).collect();
            tracing::debug!(name = %name, "dropping invalid header from tunnel")
        }
        Dropped::OverLimit(n) => tracing::warn!(
            dropped = n,
            limit = agentgate_proto::headers::MAX_HEADERS,
            "dropping tunnel headers over the limit"
        ),
    })
}

pub use agentgate_proto::headers::parse_grpc_timeout;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        let mut g = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        strip_hop_by_hop(&mut g, true);
        assert_eq!(g.get("te").unwrap(), "trailers");
    }

    #[test]
    fn connection_lists_with_junk_and_several_values_are_handled() {
        // Remote input: names that are not header names, empty entries, two Connection
        // headers. The valid names are removed, the rest is ignored, nothing panics.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("bad name, ,x-a,,"));
        h.append("connection", HeaderValue::from_static("X-B"));
        h.append("connection", HeaderValue::from_bytes(b"x-c\xff").unwrap());
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("2"));
        h.insert("x-c", HeaderValue::from_static("3"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-c", "x-kept"]);
    }

    #[test]
    fn round_trips() {
        let mut h = HeaderMap::new();
        h.append("a", HeaderValue::from_static("1"));
        h.append("a", HeaderValue::from_static("2"));
        let back = from_proto(&to_proto(&h));
        assert_eq!(back.get_all("a").iter().count(), 2);
    }
}
