//! Generated-input tests for the transport's parsers of remote input: the preface sniffer, the
//! WebSocket adapter, the HTTP/1 upgrade, and the CONNECT reply. (The PING policy's own is in
//! `ping_policy.rs`.) Each runs `AGENTGATE_GENERATED_CASES` cases (2,000 by default, for CI;
//! the long run is 1,000,000, see docs/SECURITY.md) from a fixed seed, so a failure repeats.
//! There is no coverage-guided fuzzer on stable Rust here; these check properties on inputs
//! built to reach the interesting paths (valid, nearly valid, and garbage).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sniff::{classify_prefix, read_prefix, PrefixClass, HTTP2_PREFACE};

pub(crate) fn cases() -> u64 {
    std::env::var("AGENTGATE_GENERATED_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let mut v = vec![0u8; rng.random_range(0..=max)];
    rng.fill_bytes(&mut v);
    v
}

/// `base`, maybe cut short, maybe with a few bytes flipped, maybe with garbage appended.
fn mutate(rng: &mut StdRng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    if rng.random_bool(0.3) && !v.is_empty() {
        v.truncate(rng.random_range(0..v.len()));
    }
    for _ in 0..rng.random_range(0..3) {
        if !v.is_empty() && rng.random_bool(0.5) {
            let i = rng.random_range(0..v.len());
            v[i] = rng.random();
        }
    }
    if rng.random_bool(0.3) {
        v.extend(random_bytes(rng, 64));
    }
    v
}

/// Writes `data` into `w` in random pieces (from `seed`), then closes it: a client that goes
/// away after its bytes, so anything cut short must end as an error, not a wait.
async fn write_split<W: tokio::io::AsyncWrite + Unpin>(seed: u64, mut w: W, data: Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rest = &data[..];
    while !rest.is_empty() {
        let n = rng.random_range(1..=rest.len());
        if w.write_all(&rest[..n]).await.is_err() {
            return;
        }
        rest = &rest[n..];
    }
    let _ = w.shutdown().await;
}

#[test]
fn sniffer_decides_the_same_however_the_bytes_arrive() {
    let rt = runtime();
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..cases() {
        let input = match rng.random_range(0..3) {
            0 => mutate(&mut rng, HTTP2_PREFACE),
            1 => mutate(&mut rng, b"GET /-/kubernetes-agent/ HTTP/1.1\r\n"),
            _ => random_bytes(&mut rng, 40),
        };
        let (w, mut r) = tokio::io::duplex(4096);
        let seed = rng.random();
        let got = rt.block_on(async {
            let writer = tokio::spawn(write_split(seed, w, input.clone()));
            let got = read_prefix(&mut r).await;
            let _ = writer.await;
            got
        });
        match got {
            Ok((class, prefix)) => {
                assert!(input.starts_with(&prefix), "{input:02x?}");
                assert_ne!(class, PrefixClass::NeedMore);
                assert_eq!(class, classify_prefix(&prefix));
                assert!(prefix.len() <= HTTP2_PREFACE.len());
            }
            Err(_) => assert_eq!(
                classify_prefix(&input),
                PrefixClass::NeedMore,
                "{input:02x?}"
            ),
        }
    }
}

/// A client WebSocket frame (masked).
fn ws_frame(rng: &mut StdRng, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        v.push(0x80 | len as u8);
    } else {
        v.push(0x80 | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    }
    let mask: [u8; 4] = rng.random();
    v.extend_from_slice(&mask);
    v.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    v
}

#[test]
fn websocket_adapter_yields_exactly_the_binary_payloads() {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let rt = runtime();
    let mut rng = StdRng::seed_from_u64(2);
    let settings = crate::WsSettings {
        max_message_size: 4096,
        ..crate::WsSettings::default()
    };
    for _ in 0..cases() {
        // Binary messages (some fragmented), control frames, and maybe one violation.
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        let mut clean = true;
        for _ in 0..rng.random_range(0..8) {
            match rng.random_range(0..10) {
                0 => wire.extend(ws_frame(&mut rng, true, 0x9, b"ping")),
                1 => {
                    let a = random_bytes(&mut rng, 50);
                    let b = random_bytes(&mut rng, 50);
                    wire.extend(ws_frame(&mut rng, false, 0x2, &a));
                    wire.extend(ws_frame(&mut rng, true, 0x0, &b));
                    expected.extend(a);
                    expected.extend(b);
                }
                2 if rng.random_bool(0.3) => {
                    wire.extend(ws_frame(&mut rng, true, 0x1, b"text is a violation"));
                    clean = false;
                    break;
                }
                3 if rng.random_bool(0.2) => {
                    // A whole frame that cannot pass: reserved bits set, no extension
                    // negotiated. (A frame cut short by the close is an abrupt end, not a
                    // violation.)
                    let payload = random_bytes(&mut rng, 30);
                    let mut frame = ws_frame(&mut rng, true, 0x2, &payload);
                    frame[0] |= 0x10 << rng.random_range(0..3u8);
                    wire.extend(frame);
                    clean = false;
                    break;
                }
                _ => {
                    let p = random_bytes(&mut rng, 300);
                    wire.extend(ws_frame(&mut rng, true, 0x2, &p));
                    expected.extend(p);
                }
            }
        }
        if clean {
            wire.extend(ws_frame(&mut rng, true, 0x8, &[0x03, 0xe8]));
        }
        let (client, server) = tokio::io::duplex(1 << 20);
        let (mut client_r, client_w) = tokio::io::split(client);
        let seed = rng.random();
        let out = rt.block_on(async {
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                server,
                Role::Server,
                Some(settings.tungstenite_config()),
            )
            .await;
            let mut bytes = crate::WsByteStream::new(ws, &settings);
            let writer = tokio::spawn(write_split(seed, client_w, wire));
            let drain = tokio::spawn(async move {
                let mut sink = vec![0u8; 4096];
                while matches!(client_r.read(&mut sink).await, Ok(n) if n > 0) {}
            });
            let mut out = Vec::new();
            let mut buf = vec![0u8; 1024];
            let end = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match bytes.read(&mut buf).await {
                        Ok(0) => return Ok(()),
                        Ok(n) => out.extend_from_slice(&buf[..n]),
                        Err(e) => return Err(e),
                    }
                }
            })
            .await
            .expect("the adapter must not hang");
            let _ = writer.await;
            drain.abort();
            (out, end)
        });
        let (out, end) = out;
        assert!(expected.starts_with(&out), "bytes out of order or invented");
        if clean {
            assert!(end.is_ok(), "{end:?}");
            assert_eq!(out, expected);
        } else {
            assert!(
                end.is_err(),
                "a violation must end the stream with an error"
            );
        }
    }
}

fn upgrade_request(rng: &mut StdRng) -> Vec<u8> {
    let protocol = ["ws-tunnel", "chat", "ws-tunnel, chat", ""][rng.random_range(0..4)];
    let mut req = format!(
        "GET /-/kubernetes-agent/ HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n"
    )
    .into_bytes();
    for _ in 0..rng.random_range(0..4) {
        let name: String = (0..rng.random_range(1..12))
            .map(|_| rng.random_range(b'a'..=b'z') as char)
            .collect();
        req.extend(format!("{name}: {}\r\n", rng.random::<u32>()).bytes());
    }
    req.extend(b"\r\n");
    mutate(rng, &req)
}

#[test]
fn upgrade_parser_answers_every_request_without_panic_or_hang() {
    let rt = runtime();
    let mut rng = StdRng::seed_from_u64(3);
    let settings = crate::IngressSettings {
        handshake_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    for _ in 0..cases() {
        let req = upgrade_request(&mut rng);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut cr, cw) = tokio::io::split(client);
        let seed = rng.random();
        let ok = rt.block_on(async {
            let writer = tokio::spawn(write_split(seed, cw, req.clone()));
            let drain = tokio::spawn(async move {
                let mut sink = vec![0u8; 4096];
                while matches!(cr.read(&mut sink).await, Ok(n) if n > 0) {}
            });
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                crate::ingress::websocket_upgrade(server, &settings),
            )
            .await
            .expect("the upgrade must end within its deadline");
            let _ = writer.await;
            drain.abort();
            (r.is_ok(), req)
        });
        let (accepted, req) = ok;
        if accepted {
            let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
            assert!(
                text.contains("ws-tunnel"),
                "accepted without ws-tunnel: {text}"
            );
        }
    }
}

#[test]
fn connect_reply_parser_consumes_only_the_head() {
    let rt = runtime();
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..cases() {
        let code = [200u16, 204, 407, 502, 999][rng.random_range(0..5)];
        let mut head = format!("HTTP/1.1 {code} Whatever\r\n").into_bytes();
        for _ in 0..rng.random_range(0..5) {
            head.extend(format!("X-{}: {}\r\n", rng.random::<u16>(), rng.random::<u64>()).bytes());
        }
        head.extend(b"\r\n");
        let kind = rng.random_range(0..4);
        let head = match kind {
            0 => mutate(&mut rng, &head),
            1 => random_bytes(&mut rng, 200),
            2 => vec![b'a'; 17 * 1024],
            _ => head,
        };
        let tail = random_bytes(&mut rng, 64);
        let mut wire = head.clone();
        wire.extend(&tail);
        let sent = wire.clone();
        let (w, mut r) = tokio::io::duplex(64 * 1024);
        let seed = rng.random();
        let (result, rest) = rt.block_on(async {
            let writer = tokio::spawn(write_split(seed, w, wire));
            let res = tokio::time::timeout(
                Duration::from_secs(2),
                crate::connect_proxy::read_connect_reply(&mut r, "http://proxy", "gateway:443"),
            )
            .await
            .expect("the reply parser must not hang on a closed stream");
            let mut rest = Vec::new();
            if res.is_ok() {
                let _ = r.read_to_end(&mut rest).await;
            }
            let _ = writer.await;
            (res, rest)
        });
        if let Ok(()) = result {
            let end = sent
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| i + 4)
                .expect("accepted only with a complete head");
            let status = String::from_utf8_lossy(&sent[..end]);
            let first = status.lines().next().unwrap_or("");
            assert!(first
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .starts_with('2'));
            // Everything after the head is the tunnel's and must still be there.
            assert_eq!(rest, sent[end..].to_vec());
        } else if kind == 3 {
            assert!(
                !(200..300).contains(&code),
                "a well-formed 2xx reply was refused"
            );
        }
    }
}
