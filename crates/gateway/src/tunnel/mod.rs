//! The reverse tunnel, gateway side: parking the streams agents open, and forwarding one
//! request down each.

mod answer_body;
mod error;
mod forward;
mod parking;
mod request_pump;
#[cfg(test)]
pub mod scripted_agent;
mod service;
mod stalled_caller;
mod to_agent;

pub use answer_body::TunnelBody;
pub use error::ForwardError;
pub use forward::{
    BoxError, ForwardResponse, LocalTunnels, ResponseBody, ServedOver, NO_AGENT, REPLICA,
};
pub use parking::{ParkedTunnel, TunnelParking};
pub use service::TunnelService;
pub use stalled_caller::CallerStalled;
pub use to_agent::{channel as to_agent_channel, ToAgentSender, ToAgentStream};
