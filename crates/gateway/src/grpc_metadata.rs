//! gRPC metadata the gateway passes on to a gRPC server many callers share.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::headers::GRPC_TIMEOUT;

/// Refuses a call whose metadata a gRPC server would reject, or makes it acceptable to every
/// one; the error is a sentence for the caller (INVALID_ARGUMENT). Checked by the gateway, not
/// left to the server: many callers' calls share one connection to it (a backend's few, an
/// agent's to its gRPC upstream), and a gRPC C-core server that has read one bad
/// `grpc-timeout` or `-bin` value on a connection rejects the later calls there that carry the
/// same header, whoever sent them.
/// - `grpc-timeout` must be up to 8 digits and a unit: otherwise INVALID_ARGUMENT.
/// - A `-bin` value must be base64, padded or not: otherwise INVALID_ARGUMENT. Several values
///   joined with commas on one line (HTTP allows it; grpc-go reads it, C-core does not) go on
///   as one line each.
pub fn check_metadata(headers: &mut HeaderMap) -> Result<(), String> {
    use base64::Engine;
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    if let Some(v) = headers.get(&GRPC_TIMEOUT) {
        if v.to_str()
            .ok()
            .and_then(crate::headers::parse_grpc_timeout)
            .is_none()
        {
            let shown: String = String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(32)
                .collect();
            return Err(format!(
                "the call's grpc-timeout {shown:?} is not a gRPC deadline (up to 8 digits and \
                 one of H, M, S, m, u, n, as in 30S); fix the client's deadline"
            ));
        }
    }
    let mut joined: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        if !name.as_str().ends_with("-bin") {
            continue;
        }
        let mut parts = value.as_bytes().split(|b| *b == b',');
        if !parts.all(|part| LENIENT.decode(part.trim_ascii()).is_ok()) {
            let shown: String = name.as_str().chars().take(64).collect();
            return Err(format!(
                "the call's metadata {shown:?} ends in -bin but its value is not base64; binary \
                 metadata must be base64-encoded (gRPC libraries do it for you)"
            ));
        }
        if value.as_bytes().contains(&b',') && !joined.contains(name) {
            joined.push(name.clone());
        }
    }
    for name in joined {
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        headers.remove(&name);
        for value in values {
            for part in value.as_bytes().split(|b| *b == b',') {
                if let Ok(v) = HeaderValue::from_bytes(part.trim_ascii()) {
                    headers.append(name.clone(), v);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_every_grpc_server_takes_passes_and_joined_binary_values_are_split() {
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        for bad in [
            &[("grpc-timeout", "abc")][..],
            &[("grpc-timeout", "123456789S")],
            &[("grpc-timeout", "5s")],
            &[("x-a-bin", "not base64!")],
            &[("x-a-bin", "AAEC"), ("x-a-bin", "AA,@")],
        ] {
            check_metadata(&mut map(bad)).expect_err("refused");
        }
        let mut h = map(&[
            ("grpc-timeout", "99999999m"),
            ("x-a-bin", "AAEC"),
            ("x-b-bin", "AAE, AAECAw=="),
            ("x-b-bin", "AQ"),
            ("x-plain", "a,b"),
        ]);
        check_metadata(&mut h).expect("accepted");
        let all = |k| {
            h.get_all(k)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("x-a-bin"), ["AAEC"]);
        assert_eq!(all("x-b-bin"), ["AAE", "AAECAw==", "AQ"]);
        assert_eq!(all("x-plain"), ["a,b"]);
    }
}
