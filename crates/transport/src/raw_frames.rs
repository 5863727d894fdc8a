//! HTTP/2 frames as raw bytes, for code that must write what a well-behaved HTTP/2 stack never
//! would: the `bench hostile` attacker, the tests of the frame policy and of the `:authority`
//! patch, and the frames the ingress writes on a server connection behind the server's back
//! (the drain's GOAWAY and PING).

/// One HTTP/2 frame: a 9-byte header (length, type, flags, stream id) and the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    v.extend_from_slice(&[kind, flags]);
    v.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Appends an HPACK "literal header field without indexing, new name" (RFC 7541, 6.2.2) to a
/// header block. Names and values must be shorter than 127 bytes (one-byte lengths, no Huffman).
pub fn hpack_literal(block: &mut Vec<u8>, name: &str, value: &str) {
    debug_assert!(name.len() < 127 && value.len() < 127);
    block.push(0x00);
    block.push(name.len() as u8);
    block.extend_from_slice(name.as_bytes());
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
}
