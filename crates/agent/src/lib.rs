//! The agentgate agent: dials out to the gateway over one of four transports, registers,
//! keeps a pool of idle tunnel streams, and executes the requests that arrive on them against
//! local upstreams.

mod backoff;
pub mod check;
pub mod config;
mod connection;
mod local_listener;
mod pool;
mod status;
mod upstream;

pub use config::{AgentConfig, PoolSettings, TransportMode};
pub use connection::{run, Agent};
pub use local_listener::{BackendCaller, WAIT_FOR_CONNECTION};
