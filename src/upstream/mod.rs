//! Talking to backends: one [`connector::Connector`] opens every backend
//! connection (pooled, tunnel, health check), [`pool`] keeps keep-alive
//! connections, [`error::UpstreamFailure`] says what went wrong and whether
//! a request may go to the next candidate, and [`health`] turns what was
//! seen into up and down.

pub mod connector;
pub mod error;
pub mod health;
pub(crate) mod pool;
pub mod request;

pub use connector::{Connector, Endpoint};
pub use error::UpstreamFailure;
pub use health::Health;
