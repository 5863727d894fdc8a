//! `agentgate bench-attack`: one process of hostile connections for `bench hostile`.
//!
//! Each connection runs one attack against the agent port, written by hand from raw bytes (no
//! HTTP/2 or WebSocket library, so nothing here is polite by accident), and keeps at it until
//! the gateway closes the connection or the time is up. At the end the process prints one JSON
//! line: how many connections it opened, how many the gateway shed, and how long that took.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate_transport::raw_frames::{frame, hpack_literal as literal};
use rand::{Rng, RngCore};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    RandomBytes,
    Silent,
    SlowlorisPreface,
    SlowlorisUpgrade,
    WsText,
    WsWrongSubprotocol,
    WsOversized,
    RapidReset,
    ContinuationFlood,
    SettingsFlood,
    PingFlood,
    WatchFlood,
    RegisterNoBody,
    RandomPaths,
    TlsSilentH2,
    TlsGarbage,
}

impl Attack {
    pub const ALL: [Attack; 16] = [
        Self::RandomBytes,
        Self::Silent,
        Self::SlowlorisPreface,
        Self::SlowlorisUpgrade,
        Self::WsText,
        Self::WsWrongSubprotocol,
        Self::WsOversized,
        Self::RapidReset,
        Self::ContinuationFlood,
        Self::SettingsFlood,
        Self::PingFlood,
        Self::WatchFlood,
        Self::RegisterNoBody,
        Self::RandomPaths,
        Self::TlsSilentH2,
        Self::TlsGarbage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::RandomBytes => "random bytes",
            Self::Silent => "silent socket",
            Self::SlowlorisPreface => "slowloris, HTTP/2 preface",
            Self::SlowlorisUpgrade => "slowloris, upgrade headers",
            Self::WsText => "WebSocket text frame",
            Self::WsWrongSubprotocol => "wrong WebSocket subprotocol",
            Self::WsOversized => "oversized WebSocket frame",
            Self::RapidReset => "HTTP/2 rapid reset",
            Self::ContinuationFlood => "CONTINUATION flood",
            Self::SettingsFlood => "SETTINGS flood",
            Self::PingFlood => "PING flood",
            Self::WatchFlood => "Health/Watch streams, no token",
            Self::RegisterNoBody => "Register headers, no body, no token",
            Self::RandomPaths => "random method paths",
            Self::TlsSilentH2 => "TLS with ALPN h2, then silence",
            Self::TlsGarbage => "garbage to the TLS port",
        }
    }

    /// The CLI value (`--kind`).
    pub fn arg(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Whether it goes to the TLS port (the others go to the cleartext one).
    pub fn wants_tls_port(self) -> bool {
        matches!(self, Self::TlsGarbage | Self::TlsSilentH2)
    }
}

#[derive(clap::Args)]
pub struct AttackArgs {
    #[arg(long, value_enum)]
    kind: Attack,
    /// The agent port to attack.
    #[arg(long)]
    target: SocketAddr,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Seconds after which connections still open are counted as not shed and closed.
    #[arg(long, default_value_t = 15)]
    secs: u64,
    /// Source addresses 127.<net>.x.y, spread over this many (each gateway limit per source
    /// address sees a share).
    #[arg(long, default_value_t = 100)]
    net: u8,
    #[arg(long, default_value_t = 40)]
    sources: usize,
}

#[derive(Serialize, Default)]
pub struct AttackReport {
    pub opened: usize,
    pub connect_failed: usize,
    /// Closed by the gateway before `secs` ran out.
    pub shed: usize,
    /// Milliseconds from the start until the last shed connection closed.
    pub shed_ms_max: u64,
    pub shed_ms_p50: u64,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn grpc_headers(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", "POST");
    literal(&mut b, ":scheme", "http");
    literal(&mut b, ":path", path);
    literal(&mut b, ":authority", "gateway");
    literal(&mut b, "content-type", "application/grpc");
    literal(&mut b, "te", "trailers");
    b
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn h2_start() -> Vec<u8> {
    let mut v = PREFACE.to_vec();
    v.extend(frame(0x4, 0, 0, &[]));
    v
}

fn upgrade_request(subprotocol: &str) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    )
    .into_bytes()
}

/// A client WebSocket frame header (masked, as clients must), for a payload of `len` bytes.
fn ws_header(opcode: u8, len: u64) -> Vec<u8> {
    let mut v = vec![0x80 | opcode];
    if len < 126 {
        v.push(0x80 | len as u8);
    } else if len <= u16::MAX as u64 {
        v.push(0x80 | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&len.to_be_bytes());
    }
    v.extend_from_slice(&[1, 2, 3, 4]); // mask key
    v
}

/// Reads an HTTP/1.1 response head (until a blank line); false if the connection closed.
async fn read_head(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
        if buf.len() > 64 * 1024 {
            return false;
        }
    }
    true
}

/// Completes a TLS handshake offering ALPN h2 (any certificate is accepted: the attacker does
/// not care who it talks to), then says nothing; `true` once the gateway closes it.
async fn tls_silent(s: TcpStream) -> bool {
    use agentgate_transport::tls::{client_config, ServerVerification};
    let Ok(mut cfg) = client_config(&ServerVerification::InsecureSkipVerify) else {
        return false;
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let Ok(name) = rustls_pki_types::ServerName::try_from("localhost") else {
        return false;
    };
    let Ok(mut tls) = connector.connect(name, s).await else {
        return true;
    };
    let mut b = [0u8; 1024];
    while matches!(tls.read(&mut b).await, Ok(n) if n > 0) {}
    true
}

/// Runs one attack on one connection until the gateway closes it (`true`) or it is cancelled.
async fn run_one(kind: Attack, mut s: TcpStream) -> bool {
    if kind == Attack::TlsSilentH2 {
        return tls_silent(s).await;
    }
    // What must happen before the flood; a good upgrade waits for its answer.
    let (setup, wait_for_answer) = match kind {
        Attack::WsText | Attack::WsOversized => (upgrade_request("ws-tunnel"), true),
        Attack::WsWrongSubprotocol => (upgrade_request("chat"), false),
        Attack::RapidReset
        | Attack::ContinuationFlood
        | Attack::SettingsFlood
        | Attack::PingFlood
        | Attack::WatchFlood
        | Attack::RegisterNoBody
        | Attack::RandomPaths => (h2_start(), false),
        _ => (vec![], false),
    };
    if s.write_all(&setup).await.is_err() || (wait_for_answer && !read_head(&mut s).await) {
        return true;
    }
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut b = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let writer = async move {
        let mut stream_id: u32 = 1;
        let mut tick = 0u64;
        loop {
            let batch: Vec<u8> = match kind {
                Attack::Silent | Attack::WsWrongSubprotocol | Attack::TlsSilentH2 => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    continue;
                }
                Attack::RandomBytes | Attack::TlsGarbage => {
                    let mut v = vec![0u8; 4096];
                    rand::rng().fill_bytes(&mut v);
                    v
                }
                Attack::SlowlorisPreface => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let i = (tick as usize) % PREFACE.len();
                    PREFACE[i..i + 1].to_vec()
                }
                Attack::SlowlorisUpgrade => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let head = b"GET / HTTP/1.1\r\nHost: gateway\r\nX-Slow: ";
                    if (tick as usize) < head.len() {
                        vec![head[tick as usize]]
                    } else {
                        b"a".to_vec()
                    }
                }
                Attack::WsText => {
                    let mut v = ws_header(0x1, 5);
                    v.extend(
                        b"hello"
                            .iter()
                            .zip([1u8, 2, 3, 4].iter().cycle())
                            .map(|(b, m)| b ^ m),
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    v
                }
                Attack::WsOversized => {
                    if tick == 0 {
                        ws_header(0x2, 100 << 20)
                    } else {
                        vec![0u8; 64 * 1024]
                    }
                }
                Attack::RapidReset => {
                    let mut v = Vec::new();
                    for _ in 0..50 {
                        v.extend(frame(
                            0x1,
                            END_HEADERS,
                            stream_id,
                            &grpc_headers("/grpc.health.v1.Health/Watch"),
                        ));
                        v.extend(frame(0x3, 0, stream_id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
                        stream_id += 2;
                    }
                    v
                }
                Attack::ContinuationFlood => {
                    if tick == 0 {
                        frame(0x1, 0, 1, &grpc_headers("/grpc.health.v1.Health/Check"))
                    } else {
                        let mut block = Vec::new();
                        for i in 0..100 {
                            literal(&mut block, "x-flood", &format!("{tick}-{i}"));
                        }
                        frame(0x9, 0, 1, &block)
                    }
                }
                Attack::SettingsFlood => (0..100).flat_map(|_| frame(0x4, 0, 0, &[])).collect(),
                Attack::PingFlood => (0..100)
                    .flat_map(|i: u64| frame(0x6, 0, 0, &i.to_be_bytes()))
                    .collect(),
                Attack::WatchFlood | Attack::RandomPaths | Attack::RegisterNoBody => {
                    let mut v = Vec::new();
                    for _ in 0..20 {
                        let path = match kind {
                            Attack::WatchFlood => "/grpc.health.v1.Health/Watch".to_string(),
                            Attack::RegisterNoBody => {
                                "/agentgate.v1.AgentSession/Register".to_string()
                            }
                            _ => format!("/r{:x}.S/M{:x}", rand::rng().random::<u32>(), tick),
                        };
                        v.extend(frame(0x1, END_HEADERS, stream_id, &grpc_headers(&path)));
                        if kind != Attack::RegisterNoBody {
                            v.extend(frame(0x0, END_STREAM, stream_id, &[0, 0, 0, 0, 0]));
                        }
                        stream_id += 2;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    v
                }
            };
            tick += 1;
            if w.write_all(&batch).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::select! {
        _ = reader => true,
        _ = writer => true,
    }
}

pub async fn run(args: AttackArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = Duration::from_secs(args.secs);
    let shed_times: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut tasks = Vec::with_capacity(args.conns);
    let mut report = AttackReport::default();
    // Connect in parallel (a busy gateway accepts slowly), at most 256 attempts at once.
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..args.conns {
        let src = IpAddr::V4(Ipv4Addr::new(
            127,
            args.net,
            (i % args.sources / 250) as u8,
            2 + (i % args.sources % 250) as u8,
        ));
        let (times, kind, target) = (shed_times.clone(), args.kind, args.target);
        let (connecting, opened, failed) = (connecting.clone(), opened.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await;
            let left = deadline.saturating_sub(start.elapsed());
            let connect = async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(src, 0))?;
                socket.connect(target).await
            };
            let stream = match tokio::time::timeout(left, connect).await {
                Ok(Ok(s)) => s,
                _ => {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            };
            drop(permit);
            let _ = stream.set_nodelay(true);
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let left = deadline.saturating_sub(start.elapsed());
            if let Ok(true) = tokio::time::timeout(left, run_one(kind, stream)).await {
                times.lock().await.push(start.elapsed().as_millis() as u64);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    report.opened = opened.load(std::sync::atomic::Ordering::Relaxed);
    report.connect_failed = failed.load(std::sync::atomic::Ordering::Relaxed);
    let mut times = shed_times.lock().await.clone();
    times.sort_unstable();
    report.shed = times.len();
    report.shed_ms_max = times.last().copied().unwrap_or(0);
    report.shed_ms_p50 = times.get(times.len() / 2).copied().unwrap_or(0);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
