//! Extensions specific to the HTTP/2 protocol.

use crate::hpack::BytesStr;

use bytes::Bytes;
use std::fmt;

/// Represents the `:protocol` pseudo-header used by
/// the [Extended CONNECT Protocol].
///
/// [Extended CONNECT Protocol]: https://datatracker.ietf.org/doc/html/rfc8441#section-4
#[derive(Clone, Eq, PartialEq)]
pub struct Protocol {
    value: BytesStr,
}

impl Protocol {
    /// Converts a static string to a protocol name.
    pub const fn from_static(value: &'static str) -> Self {
        Self {
            value: BytesStr::from_static(value),
        }
    }

    /// Returns a str representation of the header.
    pub fn as_str(&self) -> &str {
        self.value.as_str()
    }

    pub(crate) fn try_from(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        Ok(Self {
            value: BytesStr::try_from(bytes)?,
        })
    }
}

impl<'a> From<&'a str> for Protocol {
    fn from(value: &'a str) -> Self {
        Self {
            value: BytesStr::from(value),
        }
    }
}

impl AsRef<[u8]> for Protocol {
    fn as_ref(&self) -> &[u8] {
        self.value.as_ref()
    }
}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.value.fmt(f)
    }
}

/// agentgate patch: the raw `:authority` of a request whose value is not a URI authority
/// (for example a whole URL such as `wss://host/path/`, or an empty value). The request's URI
/// then has no authority; a server that wants the strict behaviour refuses requests that carry
/// this extension.
#[derive(Clone, Eq, PartialEq)]
pub struct NonUriAuthority {
    value: Bytes,
}

impl NonUriAuthority {
    pub(crate) fn new(value: Bytes) -> Self {
        Self { value }
    }

    /// The raw bytes of the `:authority` pseudo-header as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.value
    }
}

impl fmt::Debug for NonUriAuthority {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_tuple("NonUriAuthority")
            .field(&String::from_utf8_lossy(&self.value))
            .finish()
    }
}

/// agentgate patch 8: a function the server calls each time it answers a request whose header
/// list was over its limit (`true` when the request was gRPC and got RESOURCE_EXHAUSTED,
/// `false` when it got 431), so that the application can count and log what h2 refused on
/// its own. One per process; the first one set stays.
static OVERSIZED_REQUEST_HEADERS: std::sync::OnceLock<fn(bool)> = std::sync::OnceLock::new();

/// Sets the function called for each request refused for its header list's size.
pub fn on_oversized_request_headers(hook: fn(bool)) {
    let _ = OVERSIZED_REQUEST_HEADERS.set(hook);
}

pub(crate) fn oversized_request_headers(grpc: bool) {
    if let Some(hook) = OVERSIZED_REQUEST_HEADERS.get() {
        hook(grpc);
    }
}
