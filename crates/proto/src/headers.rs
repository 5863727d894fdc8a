//! HTTP headers to and from the tunnel protocol's `Header` list, for both ends of a tunnel.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::v1::Header;

pub fn to_proto(headers: &HeaderMap) -> Vec<Header> {
    headers
        .iter()
        .map(|(k, v)| Header {
            name: k.as_str().to_string(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

/// Converts tunnel headers back. Invalid names or values are dropped and handed to
/// `invalid`, so that each side can report them its own way.
pub fn from_proto(headers: &[Header], mut invalid: impl FnMut(&Header)) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        match (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => invalid(h),
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_drops_invalid() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let mut list = to_proto(&h);
        assert_eq!(list.len(), 2);
        list.push(Header {
            name: "bad name".into(),
            value: b"v".to_vec(),
        });
        let mut dropped = vec![];
        let back = from_proto(&list, |h| dropped.push(h.name.clone()));
        assert_eq!(back, h);
        assert_eq!(dropped, ["bad name"]);
    }
}
