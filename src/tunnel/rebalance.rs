//! Re-homing tunnels after the ring changes (`routing.rebalance`).
//!
//! After a reload adds or removes a backend (or a backend goes down or comes
//! back), about 1/N of devices have a new owner while their tunnels are
//! still open on the old one. Their HTTP keeps following the tunnel
//! ([`super::registry`]), so nothing is lost; but the tunnel is *misplaced*:
//! another replica of the proxy, which knows nothing of it, would route the
//! device's HTTP to the new owner.
//!
//! With `rebalance = "migrate"`, the [`Rebalancer`] closes misplaced tunnels
//! with 1012 so their devices reconnect to their owner, at most
//! `rebalance_rate` a second: closes are spread over time slots of
//! `1/rate` seconds, each at a random moment of its slot, so devices don't
//! reconnect in one herd. Every routing change re-evaluates which tunnels
//! are misplaced, so a second change in the middle of a migration moves
//! tunnels to where they belong now.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use super::registry::{is_misplaced, TunnelInfo, TunnelRegistry};
use crate::config::Rebalance;
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::util::rng::SplitMix64;
use crate::util::shutdown::raised;

/// Moves misplaced tunnels to their owner, paced.
pub struct Rebalancer {
    router: Router,
    tunnels: Arc<TunnelRegistry>,
    metrics: Arc<Metrics>,
    queue: VecDeque<TunnelInfo>,
    /// Start of the next time slot in which one tunnel may be closed.
    slot: Instant,
    /// When, within that slot, the next close happens.
    next_close: Option<Instant>,
    rng: SplitMix64,
}

impl Rebalancer {
    pub fn new(router: Router, tunnels: Arc<TunnelRegistry>, metrics: Arc<Metrics>) -> Rebalancer {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64);
        Rebalancer {
            router,
            tunnels,
            metrics,
            queue: VecDeque::new(),
            slot: Instant::now(),
            next_close: None,
            rng: SplitMix64::new(seed),
        }
    }

    /// Runs until `stop` is raised.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut swaps = self.router.subscribe();
        loop {
            tokio::select! {
                changed = swaps.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.reevaluate();
                }
                _ = sleep_until_some(self.next_close) => self.close_next(),
                _ = raised(&mut stop) => return,
            }
        }
    }

    /// Finds the tunnels misplaced under the current table and, under
    /// `migrate`, queues them (in random order) for closing.
    fn reevaluate(&mut self) {
        let table = self.router.load_full();
        let mut misplaced = self.tunnels.misplaced(&table);
        let policy = table.config().routing.rebalance;
        if misplaced.is_empty() {
            self.queue.clear();
            self.next_close = None;
            return;
        }
        // Fisher-Yates: which devices reconnect first is left to chance.
        for i in (1..misplaced.len()).rev() {
            let j = self.rng.below(i + 1);
            misplaced.swap(i, j);
        }
        let n = misplaced.len();
        match policy {
            Rebalance::Keep => {
                info!(misplaced = n, "routing changed: tunnels on a backend that no longer owns their device are kept (rebalance = \"keep\")");
                self.queue.clear();
                self.next_close = None;
            }
            Rebalance::Migrate => {
                let rate = table.config().routing.rebalance_rate;
                info!(
                    misplaced = n,
                    rate,
                    seconds = n as f64 / rate,
                    "routing changed: moving tunnels to their devices' owners (rebalance = \"migrate\")"
                );
                self.queue = misplaced.into();
                if self.next_close.is_none() {
                    self.schedule();
                }
            }
        }
    }

    /// Picks the moment of the next close: a random point of the next free slot.
    fn schedule(&mut self) {
        let rate = self.router.load().config().routing.rebalance_rate;
        let slot_len = Duration::from_secs_f64(1.0 / rate);
        let now = Instant::now();
        if self.slot < now {
            self.slot = now;
        }
        let jitter = slot_len.mul_f64((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64);
        self.next_close = Some(self.slot + jitter);
        self.slot += slot_len;
    }

    /// Closes the next queued tunnel that is still open and still misplaced.
    fn close_next(&mut self) {
        self.next_close = None;
        let table = self.router.load();
        while let Some(tunnel) = self.queue.pop_front() {
            let Some(control) = tunnel.control.upgrade() else { continue };
            if !is_misplaced(&tunnel, &table) {
                continue;
            }
            debug!(device = %String::from_utf8_lossy(&tunnel.device), backend = %tunnel.backend.id, "moving a misplaced tunnel");
            self.metrics.migration(&tunnel.backend.id);
            control.migrate();
            break;
        }
        if !self.queue.is_empty() {
            self.schedule();
        } else {
            debug!("no misplaced tunnel left to move");
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
