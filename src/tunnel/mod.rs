//! WebSocket tunnels: an `Upgrade: websocket` request (or HTTP/2's extended
//! CONNECT, bridged by [`h2ws`]) joined to the device's backend.
//!
//! [`handshake`] sends the upgrade and, on 101, starts a [`session`], which
//! copies bytes both ways through a [`splice`] that follows the frames of
//! each direction ([`wsframe`]) and holds no buffer while a tunnel is idle.
//! The proxy ends a tunnel itself with a clean WebSocket close handshake:
//! 1012 when the [`rebalance`]r moves it to the device's new owner or its
//! draining backend's `drain_timeout` passes, 1001 at shutdown (once the
//! HTTP grace period is over).
//!
//! A tunnel with a device ID is recorded in the [`registry`] while it is
//! open, so the device's HTTP requests follow it. Each tunnel is a tokio
//! task, not a thread, so thousands cost only memory.

use std::sync::Arc;

use tokio::sync::watch;

use crate::routing::Router;
use crate::upstream::{Connector, Health};

pub mod h2ws;
pub mod handshake;
mod io;
pub mod rebalance;
pub mod registry;
pub mod session;
pub mod splice;
pub mod wsframe;

pub use registry::TunnelRegistry;

/// What every tunnel of one running proxy shares.
pub struct Tunnels {
    /// The live routing table: retries, and drains of a tunnel's backend.
    pub router: Router,
    /// Opens each tunnel's backend connection.
    pub connector: Connector,
    /// Told about backends that fail to answer an upgrade.
    pub health: Arc<Health>,
    /// Open tunnels by device.
    pub registry: Arc<TunnelRegistry>,
    /// Raised when open tunnels must close (the end of shutdown).
    pub close: watch::Receiver<bool>,
}
