//! Sentences for the errors tonic's codec answers a malformed request message with.
//!
//! tonic answers a message over the size limit, a message that is not valid protobuf or a
//! broken gRPC frame with its own text ("Error, decoded message length too large: ...",
//! "failed to decode Protobuf message: ...", "Unexpected EOF decoding stream.") and mostly as
//! INTERNAL, which reads as the gateway's fault. For the agent port's own methods the status
//! is rewritten here into the code gRPC uses for the case (RESOURCE_EXHAUSTED for a message
//! too large, as grpc-go does; INVALID_ARGUMENT for input that cannot be decoded) and a
//! sentence saying what to send instead. Backends' answers are never touched.

use http::HeaderMap;
use tonic::{Code, Status};

/// The rewritten status for tonic's codec error `status`, or `None` for any other status.
pub fn explain(status: &Status) -> Option<Status> {
    let msg = status.message();
    match status.code() {
        Code::OutOfRange => {
            let rest = msg.strip_prefix("Error, decoded message length too large: found ")?;
            let (len, rest) = rest.split_once(" bytes, the limit is: ")?;
            let limit = rest.strip_suffix(" bytes")?;
            Some(Status::resource_exhausted(format!(
                "agentgate: a request message of {len} bytes is over this method's limit of \
                 {limit} bytes (docs/configuration.md, max_message_size_*); send smaller messages"
            )))
        }
        Code::Internal => {
            let sentence = if let Some(what) =
                msg.strip_prefix("failed to decode Protobuf message: ")
            {
                format!(
                    "agentgate: a request message is not what this method takes ({what}); build \
                     the client from agentgate's .proto files"
                )
            } else if msg == "Missing request message." {
                "agentgate: the call carried no request message (the stream ended after the \
                 headers); this method takes exactly one"
                    .to_string()
            } else if msg == "Unexpected EOF decoding stream." {
                "agentgate: the request ended inside a message (its 5-byte gRPC header announced \
                 more bytes than came)"
                    .to_string()
            } else if msg.contains("received message with compressed-flag but no grpc-encoding") {
                "agentgate: a message is flagged compressed but the call names no grpc-encoding; \
                 send 'grpc-encoding: gzip' with compressed messages"
                    .to_string()
            } else if let Some(rest) =
                msg.strip_prefix("protocol error: received message with invalid compression flag: ")
            {
                let flag: String = rest.chars().take_while(char::is_ascii_digit).collect();
                format!(
                    "agentgate: a message's compression flag is {flag}; gRPC allows 0 (plain) and \
                     1 (compressed)"
                )
            } else {
                return None;
            };
            Some(Status::invalid_argument(sentence))
        }
        _ => None,
    }
}

/// Rewrites the status in `map` (trailers, or a Trailers-Only answer's headers) in place.
pub fn explain_in(map: &mut HeaderMap) {
    let Some(better) = Status::from_header_map(map).and_then(|s| explain(&s)) else {
        return;
    };
    map.remove(crate::headers::GRPC_MESSAGE);
    let _ = better.add_header(map);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_errors_get_a_code_and_a_sentence() {
        let cases = [
            (
                Status::out_of_range(
                    "Error, decoded message length too large: found 5027 bytes, the limit is: 4096 bytes",
                ),
                Code::ResourceExhausted,
                "a request message of 5027 bytes is over this method's limit of 4096 bytes",
            ),
            (
                Status::internal(
                    "failed to decode Protobuf message: AgentMessage.msg: invalid wire type value: 7",
                ),
                Code::InvalidArgument,
                "not what this method takes (AgentMessage.msg: invalid wire type value: 7)",
            ),
            (
                Status::internal("Missing request message."),
                Code::InvalidArgument,
                "carried no request message",
            ),
            (
                Status::internal("Unexpected EOF decoding stream."),
                Code::InvalidArgument,
                "ended inside a message",
            ),
            (
                Status::internal(
                    "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                ),
                Code::InvalidArgument,
                "grpc-encoding: gzip",
            ),
            (
                Status::internal(
                    "protocol error: received message with invalid compression flag: 128 (valid flags are 0 and 1), while sending request",
                ),
                Code::InvalidArgument,
                "compression flag is 128",
            ),
        ];
        for (status, code, says) in cases {
            let mut map = HeaderMap::new();
            status.add_header(&mut map).unwrap();
            explain_in(&mut map);
            let got = Status::from_header_map(&map).unwrap();
            assert_eq!(got.code(), code, "{got:?}");
            assert!(
                got.message().starts_with("agentgate: "),
                "{}",
                got.message()
            );
            assert!(got.message().contains(says), "{}", got.message());
        }
        for other in [
            Status::internal("agentgate: something of ours"),
            Status::out_of_range("the backend's own"),
            Status::unavailable("x"),
        ] {
            assert!(explain(&other).is_none(), "{other:?}");
        }
    }
}
