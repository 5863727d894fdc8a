//! Enforcement of the minimum interval between a client's HTTP/2 PINGs.
//!
//! hyper answers every PING and has no policy of its own, so a client could keep the server
//! busy with PINGs. This reads the frame headers of the inbound HTTP/2 byte stream (it never
//! copies payloads) and reports a violation when PINGs arrive closer together than the
//! minimum interval more than `MAX_STRIKES` times without any request traffic in between,
//! the way grpc-go's keepalive enforcement policy does.

use std::time::{Duration, Instant};

use crate::sniff::HTTP2_PREFACE;

const FRAME_HEADER_LEN: usize = 9;
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
/// Early PINGs tolerated before the connection is closed.
pub const MAX_STRIKES: u32 = 2;

#[derive(Debug)]
enum State {
    /// Bytes to pass over: the client preface, or a frame's payload.
    Skip { remaining: usize },
    Header {
        buf: [u8; FRAME_HEADER_LEN],
        have: usize,
    },
}

/// Watches the inbound byte stream of one HTTP/2 server connection.
#[derive(Debug)]
pub struct PingPolicy {
    min_interval: Duration,
    state: State,
    last_ping: Option<Instant>,
    strikes: u32,
}

/// The client pinged too often.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManyPings {
    pub strikes: u32,
}

impl PingPolicy {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            state: State::Skip {
                remaining: HTTP2_PREFACE.len(),
            },
            last_ping: None,
            strikes: 0,
        }
    }

    /// Feeds bytes just read from the client.
    pub fn feed(&mut self, mut data: &[u8], now: Instant) -> Result<(), TooManyPings> {
        while !data.is_empty() {
            match &mut self.state {
                State::Skip { remaining } => {
                    let n = (*remaining).min(data.len());
                    *remaining -= n;
                    data = &data[n..];
                    if *remaining == 0 {
                        self.state = State::Header {
                            buf: [0; FRAME_HEADER_LEN],
                            have: 0,
                        };
                    }
                }
                State::Header { buf, have } => {
                    let n = (FRAME_HEADER_LEN - *have).min(data.len());
                    buf[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data = &data[n..];
                    if *have == FRAME_HEADER_LEN {
                        let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                        let (kind, flags) = (buf[3], buf[4]);
                        self.on_frame(kind, flags, now)?;
                        self.state = if len == 0 {
                            State::Header {
                                buf: [0; FRAME_HEADER_LEN],
                                have: 0,
                            }
                        } else {
                            State::Skip { remaining: len }
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, kind: u8, flags: u8, now: Instant) -> Result<(), TooManyPings> {
        match kind {
            FRAME_DATA | FRAME_HEADERS => self.strikes = 0,
            FRAME_PING if flags & FLAG_ACK == 0 => {
                if let Some(last) = self.last_ping {
                    if now.duration_since(last) < self.min_interval {
                        self.strikes += 1;
                        if self.strikes > MAX_STRIKES {
                            return Err(TooManyPings {
                                strikes: self.strikes,
                            });
                        }
                    }
                }
                self.last_ping = Some(now);
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = len.to_be_bytes()[1..].to_vec();
        v.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn tolerates_slow_pings_and_acks() {
        let mut p = PingPolicy::new(Duration::from_secs(20));
        let t0 = Instant::now();
        p.feed(HTTP2_PREFACE, t0).unwrap();
        p.feed(&frame(0x4, 0, &[0; 6]), t0).unwrap(); // SETTINGS
        for i in 0..10 {
            p.feed(
                &frame(FRAME_PING, 0, &[0; 8]),
                t0 + Duration::from_secs(21 * i),
            )
            .unwrap();
            // ACKs of the server's own pings never count.
            p.feed(&frame(FRAME_PING, FLAG_ACK, &[0; 8]), t0).unwrap();
        }
    }

    #[test]
    fn closes_on_ping_flood_even_split_across_reads() {
        let mut p = PingPolicy::new(Duration::from_secs(20));
        let t0 = Instant::now();
        let mut bytes = HTTP2_PREFACE.to_vec();
        for _ in 0..4 {
            bytes.extend(frame(FRAME_PING, 0, &[1; 8]));
        }
        let mut result = Ok(());
        for b in bytes.chunks(5) {
            result = p.feed(b, t0);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(TooManyPings { strikes: 3 }));
    }

    #[test]
    fn request_traffic_resets_strikes() {
        let mut p = PingPolicy::new(Duration::from_secs(20));
        let t0 = Instant::now();
        p.feed(HTTP2_PREFACE, t0).unwrap();
        for _ in 0..10 {
            p.feed(&frame(FRAME_PING, 0, &[0; 8]), t0).unwrap();
            p.feed(&frame(FRAME_DATA, 0, b"hello"), t0).unwrap();
        }
    }
}
