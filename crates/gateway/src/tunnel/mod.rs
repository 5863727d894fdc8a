//! The reverse tunnel, gateway side: parking the streams agents open, and forwarding one
//! request down each.

mod error;
mod forward;
mod parking;
mod service;

pub use error::ForwardError;
pub use forward::{BoxError, ForwardResponse, ResponseBody, TunnelBody};
pub use parking::{ParkedTunnel, ToAgent, TunnelParking};
pub use service::TunnelService;
