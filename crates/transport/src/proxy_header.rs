//! The PROXY protocol header (HAProxy's; version 1 text or version 2 binary) that a load
//! balancer in TCP mode writes before the client's bytes, so that the gateway's logs, its
//! per-source limits and its agent list see the agent's address instead of the balancer's.
//!
//! Only connections from the addresses in `proxy_protocol_from` must start with one; from
//! anywhere else a header is not looked for (an agent cannot claim another address). Exactly
//! the header is read, never a byte more, since what follows is TLS or HTTP/2 for the next
//! layer: version 2 gives its length in its first 16 bytes, version 1 is one line of at most
//! 107 bytes. Parsing is the `ppp` crate's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The first 12 bytes of every version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included (the specification's bound).
const V1_MAX_LINE: usize = 107;
/// The shortest version 1 line: `PROXY UNKNOWN\r\n`.
const V1_MIN_LINE: usize = 15;
/// Largest version 2 body accepted: the addresses (216 bytes for UNIX sockets) and the TLVs
/// that cloud balancers add (AWS: tens of bytes). More is refused rather than buffered.
pub const V2_MAX_BODY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection closed before a whole PROXY protocol header arrived ({0})")]
    Closed(#[source] io::Error),
    #[error(
        "no PROXY protocol header: the first bytes {} are neither version 1 nor 2 (is \
         the balancer at this address sending one? see proxy_protocol_from)",
        crate::sniff::hex_bytes(.0)
    )]
    Missing(Vec<u8>),
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    #[error("PROXY protocol version 2 header with a {0}-byte body, more than the {V2_MAX_BODY} accepted")]
    TooLong(usize),
    #[error("no whole PROXY protocol header within {0:?} (handshake_timeout)")]
    Timeout(Duration),
}

/// Whether `ip` is one of the balancers whose connections carry a header.
pub fn from_balancer(balancers: &[ipnet::IpNet], ip: IpAddr) -> bool {
    balancers.iter().any(|net| net.contains(&ip))
}

/// [`read_proxy_header`] under a deadline: what every listener calls.
pub async fn read_proxy_header_within<S: AsyncRead + Unpin>(
    io: &mut S,
    deadline: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(deadline, read_proxy_header(io))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(deadline))?
}

/// Reads one header from `io` and returns the client's address it carries; `None` when the
/// balancer speaks for itself (a `LOCAL` health check, `UNKNOWN` or an unspecified family),
/// so the connection's own peer address stands.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    io: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = vec![0u8; V1_MIN_LINE];
    read(io, &mut head).await?;
    if head[..12] == V2_SIGNATURE {
        head.resize(16, 0);
        read(io, &mut head[V1_MIN_LINE..]).await?;
        let body = u16::from_be_bytes([head[14], head[15]]) as usize;
        if body > V2_MAX_BODY {
            return Err(ProxyHeaderError::TooLong(body));
        }
        head.resize(16 + body, 0);
        read(io, &mut head[16..]).await?;
        let h = ppp::v2::Header::try_from(&head[..])
            .map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
        use ppp::v2::{Addresses, Command};
        return Ok(match (h.command, h.addresses) {
            (Command::Local, _) => None,
            (Command::Proxy, Addresses::IPv4(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (Command::Proxy, Addresses::IPv6(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (Command::Proxy, Addresses::Unspecified | Addresses::Unix(_)) => None,
        });
    }
    if head.starts_with(b"PROXY ") {
        // One byte at a time up to the CRLF: nothing past the line may be taken.
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n") {
            if head.len() >= V1_MAX_LINE {
                return Err(ProxyHeaderError::Invalid(format!(
                    "a version 1 line longer than {V1_MAX_LINE} bytes"
                )));
            }
            read(io, &mut byte).await?;
            head.push(byte[0]);
        }
        let h = ppp::v1::Header::try_from(&head[..])
            .map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
        use ppp::v1::Addresses;
        return Ok(match h.addresses {
            Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            Addresses::Unknown => None,
        });
    }
    Err(ProxyHeaderError::Missing(head[..8].to_vec()))
}

async fn read<S: AsyncRead + Unpin>(io: &mut S, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    io.read_exact(buf)
        .await
        .map(drop)
        .map_err(ProxyHeaderError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(bytes).await.unwrap();
        drop(client);
        let r = read_proxy_header(&mut server).await;
        let mut rest = vec![];
        server.read_to_end(&mut rest).await.unwrap();
        (r, rest)
    }

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend(addresses);
        h.extend(tlvs);
        h
    }

    #[tokio::test]
    async fn version_1_gives_the_client_and_leaves_the_rest() {
        let (r, rest) =
            parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 8150\r\nPRI * HTTP/2.0").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:56324".parse().unwrap()));
        assert_eq!(rest, b"PRI * HTTP/2.0");
        let (r, rest) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 8150\r\n\x16\x03").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:4000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03");
        let (r, rest) = parse(b"PROXY UNKNOWN\r\nGET /").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"GET /");
    }

    #[tokio::test]
    async fn version_2_gives_the_client_skips_tlvs_and_leaves_the_rest() {
        let mut addrs = vec![198, 51, 100, 9, 10, 0, 0, 1];
        addrs.extend(40000u16.to_be_bytes());
        addrs.extend(8150u16.to_be_bytes());
        let tlv = [0x04, 0x00, 0x01, 0x00]; // a NOOP TLV
        let mut bytes = v2(0x1, 0x11, &addrs, &tlv);
        bytes.extend(b"\x16\x03\x01");
        let (r, rest) = parse(&bytes).await;
        assert_eq!(r.unwrap(), Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
        // LOCAL: the balancer's own health check.
        let (r, rest) = parse(&[v2(0x0, 0x00, &[], &[]), b"PRI".to_vec()].concat()).await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"PRI");
    }

    #[tokio::test]
    async fn anything_else_is_refused_with_a_reason() {
        let (r, _) = parse(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing(_))), "{r:?}");
        let (r, _) = parse(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n").await;
        assert!(matches!(r, Err(ProxyHeaderError::Invalid(_))), "{r:?}");
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (r, _) = parse(long.as_bytes()).await;
        assert!(matches!(r, Err(ProxyHeaderError::Invalid(_))), "{r:?}");
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        let (r, _) = parse(&huge).await;
        assert!(matches!(r, Err(ProxyHeaderError::TooLong(65535))), "{r:?}");
        let (r, _) = parse(b"PROXY TCP4 1.2").await;
        assert!(matches!(r, Err(ProxyHeaderError::Closed(_))), "{r:?}");
    }
}
