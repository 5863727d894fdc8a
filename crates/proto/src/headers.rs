//! HTTP headers to and from the tunnel protocol's `Header` list, for both ends of a tunnel.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::v1::Header;

/// Headers as the tunnel protocol's list. Every name and value is a slice of one buffer:
/// two allocations for the whole list, and prost's encoder, which clones each `Bytes` field it
/// writes, only counts references (a `Bytes` made from its own `Vec` allocates when cloned).
pub fn to_proto(headers: &HeaderMap) -> Vec<Header> {
    let total = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let mut buf = bytes::BytesMut::with_capacity(total);
    for (k, v) in headers {
        buf.extend_from_slice(k.as_str().as_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
    let all = buf.freeze();
    let mut at = 0;
    let mut next = |len: usize| {
        let part = all.slice(at..at + len);
        at += len;
        part
    };
    headers
        .iter()
        .map(|(k, v)| Header {
            name: next(k.as_str().len()),
            value: next(v.len()),
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
            HeaderName::from_bytes(&h.name),
            HeaderValue::from_maybe_shared(h.value.clone()),
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

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n), as gRPC spells deadlines.
pub fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    let (digits, unit) = v.split_at_checked(v.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(n * 3600),
        "M" => std::time::Duration::from_secs(n * 60),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-timeout` for `d`: in milliseconds (at least 1), or in seconds past what 8 digits of
/// milliseconds hold.
pub fn format_grpc_timeout(d: std::time::Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms <= 99_999_999 {
        format!("{ms}m")
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    }
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
            value: bytes::Bytes::from_static(b"v"),
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
                value: i.to_string().into_bytes().into(),
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

    /// Generated input: header lists of random names and values (valid and not), up to past
    /// the limit, never panic, keep at most `MAX_HEADERS`, and keep every valid header of a
    /// list within the limit, in order. `AGENTGATE_GENERATED_CASES` sets the count.
    #[test]
    fn generated_header_lists_convert_without_panic() {
        use rand::{Rng, RngCore, SeedableRng};
        let cases: u64 = std::env::var("AGENTGATE_GENERATED_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..cases {
            let n = if rng.random_bool(0.01) {
                rng.random_range(MAX_HEADERS..MAX_HEADERS + 50)
            } else {
                rng.random_range(0..20)
            };
            let list: Vec<Header> = (0..n)
                .map(|_| {
                    let mut name = vec![0u8; rng.random_range(0..12)];
                    if rng.random_bool(0.7) {
                        name.iter_mut()
                            .for_each(|b| *b = rng.random_range(b'a'..=b'z'));
                    } else {
                        rng.fill_bytes(&mut name);
                    }
                    let mut value = vec![0u8; rng.random_range(0..24)];
                    rng.fill_bytes(&mut value);
                    Header {
                        name: name.into(),
                        value: value.into(),
                    }
                })
                .collect();
            let mut invalid = 0;
            let mut over = 0;
            let map = from_proto(&list, |d| match d {
                Dropped::Invalid(_) => invalid += 1,
                Dropped::OverLimit(k) => over = k,
            });
            assert!(map.len() <= MAX_HEADERS);
            assert_eq!(map.len() + invalid + over, list.len());
            let back = to_proto(&map);
            let valid: Vec<&Header> = list[..n.min(MAX_HEADERS)]
                .iter()
                .filter(|h| {
                    HeaderName::from_bytes(&h.name).is_ok()
                        && HeaderValue::from_bytes(&h.value).is_ok()
                })
                .collect();
            assert_eq!(back.len(), valid.len());
        }
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_does_not() {
        use std::time::Duration;
        for (text, want) in [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("10S", Duration::from_secs(10)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(parse_grpc_timeout(text), Some(want), "{text}");
        }
        for bad in [
            "",
            "S",
            "m",
            "5x",
            "123456789S",
            "10x",
            "-1S",
            "+1S",
            "1.5S",
            "é",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeouts_format_back_to_what_parses() {
        use std::time::Duration;
        for d in [
            Duration::from_micros(10),
            Duration::from_secs(2),
            Duration::from_secs(400_000),
        ] {
            let parsed = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(
                parsed >= d.min(Duration::from_millis(1))
                    && parsed <= d.max(Duration::from_millis(1)),
                "{d:?}"
            );
        }
    }
}
