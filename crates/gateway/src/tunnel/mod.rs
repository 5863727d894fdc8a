//! The reverse tunnel, gateway side: parking the streams agents open, and forwarding one
//! request down each.

mod error;
mod forward;
mod parking;
#[cfg(test)]
pub mod scripted_agent;
mod service;
mod stalled_caller;
mod to_agent;

pub use error::ForwardError;
pub use forward::{BoxError, ForwardResponse, LocalTunnels, ResponseBody, TunnelBody};
pub use parking::{ParkedTunnel, TunnelParking};
pub use service::TunnelService;
pub use stalled_caller::CallerStalled;
pub use to_agent::{channel as to_agent_channel, ToAgentSender, ToAgentStream};
