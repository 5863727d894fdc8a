//! The gateway's own methods on the agent port, and the metadata a sidecar call carries: both
//! ends need them, the gateway to serve and label calls, the agent's local listener to keep
//! local processes away from the agent's own session.

/// Every method the gateway's agent port serves itself (everything else goes to a backend or
/// is refused). Metrics label RPCs with these names and nothing else.
pub const GATEWAY_METHODS: [&str; 6] = [
    "/agentgate.v1.AgentSession/Register",
    "/agentgate.v1.Tunnel/Connect",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Whether `path` is one of [`GATEWAY_METHODS`].
pub fn is_gateway_method(path: &str) -> bool {
    GATEWAY_METHODS.contains(&path)
}

/// A call from the agent's local listener (a local process) to one of the gateway's own
/// methods: what to answer. The agent's session (`agentgate.v1.*`) is refused outright; health
/// and reflection are "not served" (UNIMPLEMENTED), which grpc-go's client-side health check
/// takes as "no health service" rather than as unhealthy.
pub fn local_caller_refusal(path: &str, who: &str) -> tonic::Status {
    if path.starts_with("/agentgate.v1.") {
        tonic::Status::permission_denied(format!(
            "{who}: {path} is the gateway's own method, which only the agent itself calls; \
             calls through the agent's local listener reach the gateway's backends only"
        ))
    } else {
        tonic::Status::unimplemented(format!(
            "{who}: {path} is not served to calls through the agent's local listener, which \
             reach the gateway's backends only"
        ))
    }
}

/// Metadata a call from the agent's local listener carries: the agent instance it comes
/// through. The gateway checks it against the sessions it holds, and refuses the gateway's
/// own methods to such a call: a local process must not register, or park tunnels, as the
/// agent.
pub const INSTANCE_CLAIM_HEADER: &str = "agentgate-instance-claim";
