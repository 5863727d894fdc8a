//! `agentgate.v1.Header`, written out instead of generated, so that its name is `Bytes`.
//!
//! The .proto declares `string name = 1; bytes value = 2;`. prost would decode the name into
//! a `String`: one allocation per header of every tunnelled request and answer, about a seventh
//! of the gateway's allocations per small request (docs/BENCHMARKS.md, twelfth session). A
//! `string` and a `bytes` field are the same on the wire (length-delimited), so this struct,
//! derived by prost with both fields as `Bytes`, reads and writes exactly the bytes the
//! generated one did, and decoded it holds slices of the message instead of copies. The one
//! difference: a name that is not UTF-8 no longer fails the whole message; it reaches
//! `headers::from_proto`, which drops it as an invalid header name, like any other.
//!
//! The .proto is unchanged, so code others generate from it keeps its `string` name.

use bytes::Bytes;

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Header {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The message as prost generates it from the .proto (a `string` name).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(bytes = "vec", tag = "2")]
        value: Vec<u8>,
    }

    #[test]
    fn same_bytes_on_the_wire_as_the_generated_message() {
        for (name, value) in [
            ("", &b""[..]),
            ("x-a", b"1"),
            ("content-type", b"text/plain"),
        ] {
            let ours = Header {
                name: Bytes::copy_from_slice(name.as_bytes()),
                value: Bytes::copy_from_slice(value),
            };
            let theirs = Generated {
                name: name.into(),
                value: value.to_vec(),
            };
            assert_eq!(ours.encode_to_vec(), theirs.encode_to_vec());
            let back = Header::decode(&theirs.encode_to_vec()[..]).unwrap();
            assert_eq!(back, ours);
            let back = Generated::decode(&ours.encode_to_vec()[..]).unwrap();
            assert_eq!(back, theirs);
        }
    }

    #[test]
    fn a_name_that_is_not_utf8_decodes_and_is_then_dropped_as_invalid() {
        let h = Header {
            name: Bytes::from_static(b"x-\xff"),
            value: Bytes::from_static(b"1"),
        };
        let back = Header::decode(&h.encode_to_vec()[..]).unwrap();
        let mut dropped = 0;
        let map = crate::headers::from_proto(&[back], |_| dropped += 1);
        assert!(map.is_empty());
        assert_eq!(dropped, 1);
    }
}
