//! Enforcement of the minimum interval between a client's HTTP/2 PINGs.
//!
//! hyper answers every PING and has no policy of its own, so a client could keep the server
//! busy with PINGs. This reads the frame headers of both directions of one HTTP/2 server
//! connection (it never copies payloads) and reports a violation when the client's PINGs
//! arrive closer together than the minimum interval more than `MAX_STRIKES` times with no
//! DATA or HEADERS *sent by the server* in between. That is grpc-go's keepalive enforcement
//! rule, and it matters: grpc-go clients (GitLab's agentk among them) send a bandwidth-probe
//! PING for every burst of DATA they receive, so a download to the agent produces PINGs
//! milliseconds apart that are legitimate. What the client itself sends never resets the
//! count, so interleaving HEADERS or DATA does not hide a PING flood.

use std::time::{Duration, Instant};

use crate::sniff::HTTP2_PREFACE;

const FRAME_HEADER_LEN: usize = 9;
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
pub(crate) const FRAME_PING: u8 = 0x6;
pub(crate) const FRAME_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
/// Early PINGs tolerated before the connection is closed.
pub const MAX_STRIKES: u32 = 2;
const FRAME_SETTINGS: u8 = 0x4;
/// SETTINGS frames (not acknowledgements) a client may send on one connection. Each costs the
/// server an acknowledgement; clients send one at the start and rarely another, so a stream of
/// them is a flood.
pub const MAX_CLIENT_SETTINGS: u32 = 32;
const FRAME_PRIORITY: u8 = 0x2;
const FRAME_WINDOW_UPDATE: u8 = 0x8;
/// Frame types from 0xa up are extensions (ALTSVC, ORIGIN, ...) or unknown: a server ignores
/// them, at the cost of reading them.
const FIRST_EXTENSION_FRAME: u8 = 0xa;

/// Frames a client sends that carry no request and ask nothing of the server (PRIORITY,
/// WINDOW_UPDATE, PING acknowledgements, GOAWAY, extension and unknown types): the server
/// reads and drops each, so a stream of them costs CPU out of all proportion to the client's
/// (a WINDOW_UPDATE flood cost the gateway 15 times what it cost the client). The allowance,
/// after Envoy's limits on PRIORITY frames per stream and WINDOW_UPDATE frames per DATA frame
/// sent: [`CONTROL_FRAMES_BASE`] to start with, more for each stream the client opened and
/// each DATA frame the server sent (a receiver acknowledges DATA with WINDOW_UPDATEs), and
/// [`CONTROL_FRAMES_PER_SECOND`] for each second of the connection, so long-lived quiet
/// connections (PING acknowledgements, a stray WINDOW_UPDATE) never run out.
pub const CONTROL_FRAMES_BASE: u64 = 1_000;
pub const CONTROL_FRAMES_PER_STREAM: u64 = 100;
pub const CONTROL_FRAMES_PER_DATA_SENT: u64 = 10;
pub const CONTROL_FRAMES_PER_SECOND: u64 = 100;

#[derive(Debug)]
enum State {
    /// Bytes to pass over: the client preface, or a frame's payload.
    Skip { remaining: usize },
    Header {
        buf: [u8; FRAME_HEADER_LEN],
        have: usize,
    },
}

/// Payload bytes kept of a captured frame: a GOAWAY's last stream id and error code, and
/// enough of its debug text to name the reason.
const CAPTURE_MAX: usize = 8 + 120;

/// Finds the frame headers in one direction of an HTTP/2 byte stream, however it is split
/// into reads or writes.
#[derive(Debug)]
pub(crate) struct FrameScanner {
    state: State,
    /// The first frame of this type has its first [`CAPTURE_MAX`] payload bytes kept.
    capture_kind: Option<u8>,
    capturing: bool,
    captured: Option<Vec<u8>>,
}

impl FrameScanner {
    /// A scanner that first passes over `skip` bytes (the client preface inbound).
    pub(crate) fn new(skip: usize) -> Self {
        Self {
            state: Self::skipping(skip),
            capture_kind: None,
            capturing: false,
            captured: None,
        }
    }

    /// A scanner that also keeps the start of the first frame of type `kind`.
    pub(crate) fn capturing(skip: usize, kind: u8) -> Self {
        Self {
            capture_kind: Some(kind),
            ..Self::new(skip)
        }
    }

    fn skipping(skip: usize) -> State {
        if skip == 0 {
            State::Header {
                buf: [0; FRAME_HEADER_LEN],
                have: 0,
            }
        } else {
            State::Skip { remaining: skip }
        }
    }

    /// The captured frame's payload start, once all of it that is kept has passed.
    pub(crate) fn captured(&self) -> Option<&[u8]> {
        match (&self.captured, self.capturing) {
            (Some(c), false) => Some(c),
            _ => None,
        }
    }

    /// Whether the bytes so far end exactly between two frames.
    pub(crate) fn at_frame_boundary(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// Calls `on_frame(type, flags)` for every frame header completed by `data`.
    pub(crate) fn scan<E>(
        &mut self,
        mut data: &[u8],
        mut on_frame: impl FnMut(u8, u8) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            match &mut self.state {
                State::Skip { remaining } => {
                    let n = (*remaining).min(data.len());
                    *remaining -= n;
                    if self.capturing {
                        let kept = self.captured.get_or_insert_with(Vec::new);
                        let take = n.min(CAPTURE_MAX - kept.len());
                        kept.extend_from_slice(&data[..take]);
                        self.capturing = kept.len() < CAPTURE_MAX;
                    }
                    data = &data[n..];
                    if *remaining == 0 {
                        self.capturing = false;
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
                        self.state = Self::skipping(len);
                        if self.capture_kind == Some(kind) && self.captured.is_none() {
                            self.captured = Some(Vec::with_capacity(len.min(CAPTURE_MAX)));
                            self.capturing = len > 0;
                        }
                        on_frame(kind, flags)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Watches both directions of one HTTP/2 server connection.
#[derive(Debug)]
pub struct PingPolicy {
    min_interval: Duration,
    inbound: FrameScanner,
    outbound: FrameScanner,
    last_ping: Option<Instant>,
    strikes: u32,
    settings: u32,
    /// HEADERS frames from the client: streams it opened (and trailers it sent).
    headers: u32,
    /// PING acknowledgements from the client.
    ping_acks: u32,
    /// When the client's first bytes were read: the start of the control-frame allowance.
    started: Option<Instant>,
    /// Control frames from the client (see [`CONTROL_FRAMES_BASE`]).
    control_frames: u64,
    /// DATA frames the server sent.
    data_sent: u64,
}

/// The client sent control frames faster than the policy allows.
#[derive(Debug, PartialEq, Eq)]
pub enum TooManyPings {
    /// PINGs closer than the minimum interval, `strikes` times in a row.
    Pings { strikes: u32 },
    /// More than [`MAX_CLIENT_SETTINGS`] SETTINGS frames.
    Settings { count: u32 },
    /// More control frames than the allowance (see [`CONTROL_FRAMES_BASE`]).
    ControlFrames { count: u64 },
}

impl PingPolicy {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            inbound: FrameScanner::new(HTTP2_PREFACE.len()),
            outbound: FrameScanner::capturing(0, FRAME_GOAWAY),
            last_ping: None,
            strikes: 0,
            settings: 0,
            headers: 0,
            ping_acks: 0,
            started: None,
            control_frames: 0,
            data_sent: 0,
        }
    }

    /// Feeds bytes just read from the client.
    pub fn feed(&mut self, data: &[u8], now: Instant) -> Result<(), TooManyPings> {
        let Self {
            inbound,
            min_interval,
            last_ping,
            strikes,
            settings,
            headers,
            ping_acks,
            started,
            control_frames,
            data_sent,
            ..
        } = self;
        let started = *started.get_or_insert(now);
        inbound.scan(data, |kind, flags| {
            if kind == FRAME_HEADERS {
                *headers = headers.saturating_add(1);
            }
            let control = matches!(kind, FRAME_PRIORITY | FRAME_WINDOW_UPDATE | FRAME_GOAWAY)
                || kind >= FIRST_EXTENSION_FRAME
                || (kind == FRAME_PING && flags & FLAG_ACK != 0);
            if control {
                *control_frames += 1;
                let allowance = CONTROL_FRAMES_BASE
                    + CONTROL_FRAMES_PER_STREAM * u64::from(*headers)
                    + CONTROL_FRAMES_PER_DATA_SENT * *data_sent
                    + CONTROL_FRAMES_PER_SECOND * now.saturating_duration_since(started).as_secs();
                if *control_frames > allowance {
                    return Err(TooManyPings::ControlFrames {
                        count: *control_frames,
                    });
                }
            }
            if kind == FRAME_PING && flags & FLAG_ACK != 0 {
                *ping_acks = ping_acks.saturating_add(1);
            }
            if kind == FRAME_SETTINGS && flags & FLAG_ACK == 0 {
                *settings += 1;
                if *settings > MAX_CLIENT_SETTINGS {
                    return Err(TooManyPings::Settings { count: *settings });
                }
            }
            if kind == FRAME_PING && flags & FLAG_ACK == 0 {
                if let Some(last) = *last_ping {
                    if now.duration_since(last) < *min_interval {
                        *strikes += 1;
                        if *strikes > MAX_STRIKES {
                            return Err(TooManyPings::Pings { strikes: *strikes });
                        }
                    }
                }
                *last_ping = Some(now);
            }
            Ok(())
        })
    }

    /// The error code and debug text of the first GOAWAY the server sent, once its start has
    /// passed.
    pub fn goaway_sent(&self) -> Option<(u32, String)> {
        let p = self.outbound.captured()?;
        let code = u32::from_be_bytes(p.get(4..8)?.try_into().ok()?);
        let debug = String::from_utf8_lossy(&p[8..]);
        // Only printable text of bounded length reaches a log line.
        let debug = debug
            .chars()
            .filter(|c| !c.is_control())
            .take(120)
            .collect();
        Some((code, debug))
    }

    /// Whether everything the server wrote so far ends between two frames, so a frame of our
    /// own may follow.
    pub fn outbound_at_frame_boundary(&self) -> bool {
        self.outbound.at_frame_boundary()
    }

    /// HEADERS frames the client has sent so far (about the streams it opened), counted as the
    /// bytes are read, before HTTP/2 decodes them.
    pub fn client_headers(&self) -> u32 {
        self.headers
    }

    /// PING acknowledgements the client has sent so far.
    pub fn client_ping_acks(&self) -> u32 {
        self.ping_acks
    }

    /// Feeds bytes just written to the client: DATA or HEADERS from the server clear the
    /// strikes, as in grpc-go.
    /// Reads what the server sent; true if it contained a GOAWAY (the gateway's shutdown
    /// waits for it before ending sessions).
    pub fn feed_outbound(&mut self, data: &[u8]) -> bool {
        let strikes = &mut self.strikes;
        let data_sent = &mut self.data_sent;
        let mut goaway = false;
        let _ = self.outbound.scan(data, |kind, _| {
            if kind == FRAME_DATA || kind == FRAME_HEADERS {
                *strikes = 0;
            }
            if kind == FRAME_DATA {
                *data_sent += 1;
            }
            goaway |= kind == FRAME_GOAWAY;
            Ok::<(), ()>(())
        });
        goaway
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame on the connection (stream 0); the policy reads only type and flags.
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        crate::raw_frames::frame(kind, flags, 0, payload)
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
        assert_eq!(result, Err(TooManyPings::Pings { strikes: 3 }));
    }

    #[test]
    fn server_data_or_headers_reset_strikes() {
        // grpc-go's BDP probes: a PING after each DATA burst the server sends.
        let mut p = PingPolicy::new(Duration::from_secs(20));
        let t0 = Instant::now();
        p.feed(HTTP2_PREFACE, t0).unwrap();
        let mut out = frame(0x4, 0, &[0; 6]); // server SETTINGS
        out.extend(frame(FRAME_HEADERS, 0x4, &[0x88]));
        p.feed_outbound(&out[..7]);
        p.feed_outbound(&out[7..]);
        for i in 0..10 {
            p.feed(&frame(FRAME_PING, 0, &[0; 8]), t0).unwrap();
            let data = frame(FRAME_DATA, 0, &[i; 100]);
            // Split across writes, as a vectored write would.
            p.feed_outbound(&data[..3]);
            p.feed_outbound(&data[3..]);
        }
    }

    #[test]
    fn client_traffic_does_not_hide_a_ping_flood() {
        let mut p = PingPolicy::new(Duration::from_secs(20));
        let t0 = Instant::now();
        p.feed(HTTP2_PREFACE, t0).unwrap();
        let mut result = Ok(());
        for _ in 0..4 {
            result = p.feed(&frame(FRAME_PING, 0, &[0; 8]), t0);
            if result.is_err() {
                break;
            }
            p.feed(&frame(FRAME_HEADERS, 0x4, &[0x82]), t0).unwrap();
            p.feed(&frame(FRAME_DATA, 0, b"hello"), t0).unwrap();
            // PING ACKs from the server are not DATA or HEADERS.
            p.feed_outbound(&frame(FRAME_PING, FLAG_ACK, &[0; 8]));
        }
        assert_eq!(result, Err(TooManyPings::Pings { strikes: 3 }));
    }

    /// Generated input: random frame streams (valid headers, random types, flags and
    /// lengths, random payload bytes) fed whole and in random splits give the same verdict,
    /// and never panic. `AGENTGATE_GENERATED_CASES` sets the count (CI: 2,000; the long run in
    /// docs/SECURITY.md: 1,000,000).
    #[test]
    fn generated_streams_give_the_same_verdict_however_split() {
        use rand::{Rng, SeedableRng};
        let cases = crate::generated_tests::cases();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let t0 = Instant::now();
        for _ in 0..cases {
            let mut bytes = HTTP2_PREFACE.to_vec();
            let mut out = Vec::new();
            for _ in 0..rng.random_range(0..12) {
                let kind = [
                    FRAME_DATA,
                    FRAME_HEADERS,
                    FRAME_PING,
                    0x4,
                    0x8,
                    rng.random(),
                ][rng.random_range(0..6)];
                let len = rng.random_range(0..64);
                let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                bytes.extend(frame(kind, rng.random_range(0..2), &payload));
                if rng.random_bool(0.3) {
                    out.push(frame(FRAME_DATA, 0, &[0; 4]));
                }
            }
            let whole = {
                let mut p = PingPolicy::new(Duration::from_secs(20));
                p.feed(&bytes, t0)
            };
            let mut p = PingPolicy::new(Duration::from_secs(20));
            let mut rest = &bytes[..];
            let mut split = Ok(());
            while !rest.is_empty() && split.is_ok() {
                let n = rng.random_range(1..=rest.len());
                split = p.feed(&rest[..n], t0);
                rest = &rest[n..];
            }
            assert_eq!(whole.is_err(), split.is_err(), "{bytes:02x?}");
            // Outbound bytes in random pieces never panic either.
            for o in &out {
                let cut = rng.random_range(0..=o.len());
                p.feed_outbound(&o[..cut]);
                p.feed_outbound(&o[cut..]);
            }
        }
    }

    #[test]
    fn a_settings_flood_is_refused() {
        let mut p = PingPolicy::new(Duration::from_secs(20));
        let t0 = Instant::now();
        p.feed(HTTP2_PREFACE, t0).unwrap();
        for _ in 0..MAX_CLIENT_SETTINGS {
            p.feed(&frame(FRAME_SETTINGS, 0, &[]), t0).unwrap();
            p.feed(&frame(FRAME_SETTINGS, FLAG_ACK, &[]), t0).unwrap();
        }
        assert_eq!(
            p.feed(&frame(FRAME_SETTINGS, 0, &[]), t0),
            Err(TooManyPings::Settings {
                count: MAX_CLIENT_SETTINGS + 1
            })
        );
    }

    #[test]
    fn a_control_frame_flood_is_refused_and_real_traffic_is_not() {
        let t0 = Instant::now();
        let window_update = frame(FRAME_WINDOW_UPDATE, 0, &[0, 0, 0, 1]);
        let priority = frame(FRAME_PRIORITY, 0, &[0, 0, 0, 0, 16]);
        let unknown = frame(0xfa, 0, b"x");
        // A flood of any of them, with nothing else going on, ends past the base allowance.
        for flood in [&window_update, &priority, &unknown] {
            let mut p = PingPolicy::new(Duration::from_secs(20));
            p.feed(HTTP2_PREFACE, t0).unwrap();
            for _ in 0..CONTROL_FRAMES_BASE {
                p.feed(flood, t0).unwrap();
            }
            assert_eq!(
                p.feed(flood, t0),
                Err(TooManyPings::ControlFrames {
                    count: CONTROL_FRAMES_BASE + 1
                })
            );
        }
        // A download: two WINDOW_UPDATEs (stream and connection) for every DATA frame sent,
        // far past the base allowance, is fine; so is a connection that lives for hours and
        // acknowledges a PING a minute.
        let mut p = PingPolicy::new(Duration::from_secs(20));
        p.feed(HTTP2_PREFACE, t0).unwrap();
        p.feed(&frame(FRAME_HEADERS, 0x4, &[0x82]), t0).unwrap();
        for _ in 0..100_000 {
            p.feed_outbound(&frame(FRAME_DATA, 0, &[0; 16]));
            p.feed(&window_update, t0).unwrap();
            p.feed(&window_update, t0).unwrap();
        }
        let mut p = PingPolicy::new(Duration::from_secs(20));
        p.feed(HTTP2_PREFACE, t0).unwrap();
        for minute in 0..600 {
            let at = t0 + Duration::from_secs(60 * minute);
            p.feed(&frame(FRAME_PING, FLAG_ACK, &[0; 8]), at).unwrap();
        }
        // Streams opened buy room for PRIORITY frames (browsers send several per stream).
        let mut p = PingPolicy::new(Duration::from_secs(20));
        p.feed(HTTP2_PREFACE, t0).unwrap();
        for _ in 0..50 {
            p.feed(&frame(FRAME_HEADERS, 0x4, &[0x82]), t0).unwrap();
            for _ in 0..CONTROL_FRAMES_PER_STREAM {
                p.feed(&priority, t0).unwrap();
            }
        }
    }

    #[test]
    fn the_first_goaway_sent_is_read_however_the_writes_split_it() {
        let mut payload = vec![0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0x0b];
        payload.extend_from_slice(b"too_many_resets");
        let mut out = frame(FRAME_HEADERS, 0x4, &[0x88]);
        out.extend(frame(FRAME_GOAWAY, 0, &payload));
        out.extend(frame(FRAME_GOAWAY, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
        for split in 1..out.len() {
            let mut p = PingPolicy::new(Duration::from_secs(1));
            assert_eq!(p.goaway_sent(), None);
            p.feed_outbound(&out[..split]);
            p.feed_outbound(&out[split..]);
            assert_eq!(
                p.goaway_sent(),
                Some((0x0b, "too_many_resets".to_string())),
                "split at {split}"
            );
            assert!(p.outbound_at_frame_boundary());
        }
        let mut p = PingPolicy::new(Duration::from_secs(1));
        p.feed_outbound(&out[..12]);
        assert!(!p.outbound_at_frame_boundary(), "inside the GOAWAY");
    }
}
