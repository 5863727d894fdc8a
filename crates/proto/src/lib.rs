//! agentgate's public gRPC contract, generated from the `.proto` files in `proto/`.

pub mod build_info;
pub mod codec;
pub mod exposition;
pub mod gateway_methods;
mod header_message;
pub mod headers;
pub mod pump;
pub mod status_code;
pub mod status_on_break;

/// Version 1 of the contract: `agentgate.v1`.
pub mod v1 {
    tonic::include_proto!("agentgate.v1");
    /// Written out, not generated: see `header_message.rs`.
    pub use crate::header_message::Header;
}

impl v1::Heartbeat {
    /// A heartbeat stamped with the wall clock (0 if the clock is before 1970).
    pub fn now() -> Self {
        let unix_millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self { unix_millis }
    }
}

/// Encoded `FileDescriptorSet` of every agentgate proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agentgate_descriptor");
