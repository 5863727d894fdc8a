//! agentgate's public gRPC contract, generated from the `.proto` files in `proto/`.

pub mod build_info;
pub mod codec;
pub mod headers;
pub mod pump;

/// Version 1 of the contract: `agentgate.v1`.
pub mod v1 {
    tonic::include_proto!("agentgate.v1");
}

/// Encoded `FileDescriptorSet` of every agentgate proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agentgate_descriptor");
