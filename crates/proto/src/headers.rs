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

/// Most headers one tunnel message may turn into. The tunnel's messages come from the other
/// end of a connection, so their header lists are remote input: `HeaderMap` panics past 32,768
/// entries, and no real request comes near this limit (nginx allows about 100 by default).
pub const MAX_HEADERS: usize = 1024;

/// A header `from_proto` did not keep.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped<'a> {
    /// Not a valid HTTP header name or value.
    Invalid(&'a Header),
    /// This many headers past [`MAX_HEADERS`] (reported once per list).
    OverLimit(usize),
}

/// Converts tunnel headers back. Invalid names or values, and anything past [`MAX_HEADERS`],
/// are dropped and handed to `dropped`, so that each side can report them its own way.
pub fn from_proto(headers: &[Header], mut dropped: impl FnMut(Dropped<'_>)) -> HeaderMap {
    let kept = headers.len().min(MAX_HEADERS);
    let mut map = HeaderMap::with_capacity(kept);
    for h in &headers[..kept] {
        match (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => dropped(Dropped::Invalid(h)),
        }
    }
    if headers.len() > kept {
        dropped(Dropped::OverLimit(headers.len() - kept));
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
        let back = from_proto(&list, |d| match d {
            Dropped::Invalid(h) => dropped.push(h.name.clone()),
            Dropped::OverLimit(n) => panic!("{n} over the limit"),
        });
        assert_eq!(back, h);
        assert_eq!(dropped, ["bad name"]);
    }

    #[test]
    fn a_huge_header_list_is_cut_not_a_panic() {
        // 40,000 entries of one name would make HeaderMap panic (its limit is 32,768).
        let list: Vec<Header> = (0..40_000)
            .map(|i| Header {
                name: "x-flood".into(),
                value: i.to_string().into_bytes(),
            })
            .collect();
        let mut over = None;
        let map = from_proto(&list, |d| {
            if let Dropped::OverLimit(n) = d {
                over = Some(n);
            }
        });
        assert_eq!(map.len(), MAX_HEADERS);
        assert_eq!(over, Some(40_000 - MAX_HEADERS));
    }
}
