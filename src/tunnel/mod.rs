//! WebSocket tunnels: an `Upgrade: websocket` request (or HTTP/2's extended
//! CONNECT, bridged by [`h2ws`]) joined to the device's backend.
//!
//! [`handshake`] sends the upgrade and, on 101, starts a [`session`], which
//! copies bytes both ways through a [`splice`] that follows the frames of
//! each direction ([`wsframe`]) and holds no buffer while a tunnel is idle.
//! The proxy ends a tunnel itself with a clean WebSocket close handshake:
//! 1012 when the [`rebalance`]r moves it to the device's new owner or its
//! draining backend's `drain_timeout` passes, 1001 at shutdown (once the
//! HTTP grace period is over) and after `server.tunnel_idle_timeout` with
//! no bytes either way.
//!
//! A tunnel with a device ID is recorded in the [`registry`] while it is
//! open, so the device's HTTP requests follow it. Each tunnel is a tokio
//! task, not a thread, so thousands cost only memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

use crate::metrics::Metrics;
use crate::routing::Router;
use crate::upstream::{Connector, Health};
use crate::util::rng::SplitMix64;

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
    /// Counts tunnels closed for idleness.
    pub metrics: Arc<Metrics>,
}

/// Closes every open tunnel with a device ID (1001), one at a time, spread
/// evenly over `over` in random order, so that devices reconnect through
/// the other replicas in a trickle rather than a herd. Returns when the
/// last one has been asked.
pub async fn close_paced(registry: &TunnelRegistry, over: Duration) {
    let mut open = registry.all();
    if open.is_empty() {
        return;
    }
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(3, |d| d.as_nanos() as u64);
    let mut rng = SplitMix64::new(seed);
    for i in (1..open.len()).rev() {
        open.swap(i, rng.below(i + 1));
    }
    let step = over / u32::try_from(open.len()).unwrap_or(u32::MAX);
    info!(tunnels = open.len(), ?over, "closing open tunnels, paced");
    let start = tokio::time::Instant::now();
    for (i, tunnel) in open.iter().enumerate() {
        tokio::time::sleep_until(start + step * u32::try_from(i).unwrap_or(u32::MAX)).await;
        if let Some(control) = tunnel.control.upgrade() {
            control.shut_down();
        }
    }
}
