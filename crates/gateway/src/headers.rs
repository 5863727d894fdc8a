//! Header handling shared by the HTTP and gRPC front ends: conversion to and from the tunnel
//! protocol, and the hop-by-hop rules of an HTTP proxy (RFC 9110, section 7.6.1).

use agentgate_proto::v1::Header;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop, never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those named in `Connection`. `keep_te_trailers`
/// keeps `te: trailers`, which gRPC requires end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    let te_trailers = keep_te_trailers
        && headers
            .get(http::header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("trailers"))
            });
    for n in HOP_BY_HOP {
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
            let name: String = h.name.chars().take(64).collect();
            tracing::debug!(name = %name, "dropping invalid header from tunnel")
        }
        Dropped::OverLimit(n) => tracing::warn!(
            dropped = n,
            limit = agentgate_proto::headers::MAX_HEADERS,
            "dropping tunnel headers over the limit"
        ),
    })
}

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
    fn round_trips() {
        let mut h = HeaderMap::new();
        h.append("a", HeaderValue::from_static("1"));
        h.append("a", HeaderValue::from_static("2"));
        let back = from_proto(&to_proto(&h));
        assert_eq!(back.get_all("a").iter().count(), 2);
    }
}
