//! `agentgate bench compression`: what gzip costs and saves, per tunnel message kind.
//!
//! The gateway accepts gzip-compressed requests because GitLab's agentk compresses every
//! call. Whether the gateway should compress its answers, and whether our agent should compress
//! what it sends, is a trade of CPU for bytes that depends on the message: this measures both
//! sides for each kind of message that crosses the agent's connection, at the level tonic uses
//! (flate2's default, 6), on this machine's CPU. No network: the numbers are pure codec cost.

use std::time::{Duration, Instant};

use agentgate_proto::v1::{
    agent_message, gateway_message, session_event, AgentMessage, Chunk, GatewayMessage, Header,
    Heartbeat, Registered, RequestHead, RequestKind, ResponseHead, SessionEvent,
};
use bytes::Bytes;
use prost::Message;
use rand::RngCore;
use serde::Serialize;

/// One measured message kind.
#[derive(Serialize)]
pub struct Row {
    pub kind: &'static str,
    pub direction: &'static str,
    pub bytes: usize,
    pub gzip_bytes: usize,
    /// gzip size over plain size: above 1 means gzip makes it bigger.
    pub size_ratio: f64,
    pub compress_us: f64,
    pub decompress_us: f64,
    /// Plain bytes gzip gets through per second of one core, compressing.
    pub compress_mib_per_s: f64,
}

fn headers(pairs: &[(&str, &str)]) -> Vec<Header> {
    pairs
        .iter()
        .map(|(n, v)| Header {
            name: bytes::Bytes::copy_from_slice(n.as_bytes()),
            value: bytes::Bytes::copy_from_slice(v.as_bytes()),
        })
        .collect()
}

/// JSON-like text, the usual body of an API call through a tunnel.
fn json_text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "{{\"id\":{i},\"name\":\"pod-{}\",\"namespace\":\"ns-{}\",\"status\":\"Running\",\"restarts\":{}}},",
                i * 7919 % 10007,
                i % 13,
                i % 5
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn samples() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut random = vec![0u8; 64 * 1024];
    rand::rng().fill_bytes(&mut random);
    let chunk = |data: Vec<u8>| Chunk {
        data: Bytes::from(data),
    };
    vec![
        (
            "session: registered",
            "gateway -> agent",
            SessionEvent {
                event: Some(session_event::Event::Registered(Registered {
                    agent_name: "edge-1".into(),
                    connection_id: "123456".into(),
                    transport: "wss".into(),
                    heartbeat_interval_seconds: 20,
                })),
            }
            .encode_to_vec(),
        ),
        (
            "heartbeat",
            "both",
            SessionEvent {
                event: Some(session_event::Event::Heartbeat(Heartbeat {
                    unix_millis: 1_796_000_000_000,
                })),
            }
            .encode_to_vec(),
        ),
        (
            "request head (HTTP GET)",
            "gateway -> agent",
            GatewayMessage {
                msg: Some(gateway_message::Msg::RequestHead(RequestHead {
                    kind: RequestKind::Http as i32,
                    upstream: "default".into(),
                    method: "GET".into(),
                    path_and_query: "/api/v1/namespaces/default/pods?limit=500".into(),
                    headers: headers(&[
                        ("accept", "application/json"),
                        ("user-agent", "kubectl/v1.30.0 (linux/amd64)"),
                        ("x-request-id", "6f1c0a3e-9b7d-4f0e-8f57-2d3b9a1c4e77"),
                        ("x-forwarded-for", "203.0.113.7"),
                    ]),
                    timeout_millis: 30_000,
                    ..Default::default()
                })),
            }
            .encode_to_vec(),
        ),
        (
            "response head",
            "agent -> gateway",
            AgentMessage {
                msg: Some(agent_message::Msg::ResponseHead(ResponseHead {
                    status: 200,
                    headers: headers(&[
                        ("content-type", "application/json"),
                        ("date", "Tue, 01 Dec 2026 10:00:00 GMT"),
                        ("content-length", "65536"),
                    ]),
                    ..Default::default()
                })),
            }
            .encode_to_vec(),
        ),
        (
            "body chunk, JSON, 64 KiB",
            "both",
            AgentMessage {
                msg: Some(agent_message::Msg::Chunk(chunk(json_text(64 * 1024)))),
            }
            .encode_to_vec(),
        ),
        (
            "body chunk, random (already compressed), 64 KiB",
            "both",
            AgentMessage {
                msg: Some(agent_message::Msg::Chunk(chunk(random))),
            }
            .encode_to_vec(),
        ),
    ]
}

/// Runs `f` for about `budget` and returns the mean time per call.
fn time_per_call(budget: Duration, mut f: impl FnMut()) -> Duration {
    f(); // warm up
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget || n < 10 {
        f();
        n += 1;
    }
    start.elapsed() / n
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("writing to a Vec");
    enc.finish().expect("writing to a Vec")
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("our own gzip output");
    out
}

pub fn measure(budget: Duration) -> Vec<Row> {
    samples()
        .into_iter()
        .map(|(kind, direction, plain)| {
            let packed = gzip(&plain);
            assert_eq!(gunzip(&packed), plain);
            let c = time_per_call(budget, || {
                std::hint::black_box(gzip(std::hint::black_box(&plain)));
            });
            let d = time_per_call(budget, || {
                std::hint::black_box(gunzip(std::hint::black_box(&packed)));
            });
            Row {
                kind,
                direction,
                bytes: plain.len(),
                gzip_bytes: packed.len(),
                size_ratio: packed.len() as f64 / plain.len() as f64,
                compress_us: c.as_secs_f64() * 1e6,
                decompress_us: d.as_secs_f64() * 1e6,
                compress_mib_per_s: plain.len() as f64 / c.as_secs_f64() / (1024.0 * 1024.0),
            }
        })
        .collect()
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| message | direction | gzip/plain size | bytes | gzip bytes | compress µs | decompress µs | compress MiB/s |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {:.1} | {:.1} | {:.0} |\n",
            r.kind,
            r.direction,
            r.size_ratio,
            r.bytes,
            r.gzip_bytes,
            r.compress_us,
            r.decompress_us,
            r.compress_mib_per_s
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_kind_and_gzip_grows_tiny_messages() {
        let rows = measure(Duration::from_millis(1));
        assert_eq!(rows.len(), samples().len());
        let hb = rows.iter().find(|r| r.kind == "heartbeat").unwrap();
        assert!(
            hb.gzip_bytes > hb.bytes,
            "gzip adds a header to tiny messages"
        );
        let json = rows.iter().find(|r| r.kind.contains("JSON")).unwrap();
        assert!(json.size_ratio < 0.5);
        assert!(rows
            .iter()
            .all(|r| r.compress_us > 0.0 && r.decompress_us > 0.0));
    }
}
