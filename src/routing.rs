//! The live routing state: one immutable snapshot of backends, ring and key
//! rules, swapped atomically.
//!
//! Every request loads the current [`RoutingTable`] from an [`ArcSwap`]
//! (no lock, no contention between requests), decides its backend, and keeps
//! an `Arc` of that backend for as long as it runs. A later reload builds a
//! whole new table and swaps it in; requests and tunnels already running keep
//! what they started with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::header::HeaderMap;
use hyper::Uri;

use crate::config::{Config, MissingKey};
use crate::key::{DeviceKey, KeyExtractor};
use crate::metrics::{BackendStats, Metrics};
use crate::ring::{Member, Ring};

/// The shared handle through which the hot path reads the current table.
pub type Router = Arc<ArcSwap<RoutingTable>>;

/// One app instance requests can be sent to.
#[derive(Debug)]
pub struct Backend {
    /// Stable identity, hashed onto the ring.
    pub id: String,
    /// `host:port` to connect to.
    pub address: String,
    pub weight: u32,
    /// This backend's metric handles (shared with the same backend in
    /// other snapshots, so counts carry across reloads).
    pub stats: BackendStats,
}

/// Where a request goes.
#[derive(Debug)]
pub enum Decision<'r> {
    /// The device's owner on the ring.
    Owner { key: DeviceKey<'r>, backend: Arc<Backend> },
    /// No device ID, `missing_key = "spread"`: round-robin.
    Spread { backend: Arc<Backend> },
    /// No device ID, `missing_key = "reject"`.
    NoKey,
}

/// Backends, ring, key rules and live settings of one configuration
/// generation.
#[derive(Debug)]
pub struct RoutingTable {
    /// The config this table was built from; settings read per request
    /// (timeouts) come from here, so they change with a reload.
    config: Arc<Config>,
    /// Counts successful loads: 1 for the first config, +1 per reload.
    generation: u64,
    backends: Vec<Arc<Backend>>,
    ring: Ring,
    keys: KeyExtractor,
    missing_key: MissingKey,
    next_spread: AtomicUsize,
}

impl RoutingTable {
    /// Builds a table; `metrics` supplies each backend's metric handles.
    pub fn new(config: Arc<Config>, generation: u64, metrics: &Metrics) -> RoutingTable {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                let stats = metrics.backend(&b.id);
                Arc::new(Backend { id: b.id.clone(), address: b.address.clone(), weight: b.weight, stats })
            })
            .collect();
        let members: Vec<Member<'_>> =
            backends.iter().map(|b| Member { identity: b.id.as_bytes(), weight: b.weight }).collect();
        RoutingTable {
            ring: Ring::new(&members, config.routing.replicas),
            backends,
            keys: KeyExtractor::new(config.routing.keys.clone()),
            missing_key: config.routing.missing_key,
            next_spread: AtomicUsize::new(0),
            config,
            generation,
        }
    }

    /// A table for offline use (`route`, `check`): metrics go nowhere.
    pub fn offline(config: &Config) -> RoutingTable {
        RoutingTable::new(Arc::new(config.clone()), 0, &Metrics::new())
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A shareable handle holding this table, for the proxy and admin API.
    pub fn into_router(self) -> Router {
        Arc::new(ArcSwap::from_pointee(self))
    }

    /// Decides the backend for a request.
    pub fn decide<'r>(&self, uri: &'r Uri, headers: &'r HeaderMap) -> Decision<'r> {
        match self.keys.extract(uri, headers) {
            Some(key) => match self.owner(&key.id) {
                Some(backend) => Decision::Owner { backend: Arc::clone(backend), key },
                None => Decision::NoKey,
            },
            None => match self.missing_key {
                MissingKey::Reject => Decision::NoKey,
                MissingKey::Spread => {
                    let i = self.next_spread.fetch_add(1, Ordering::Relaxed) % self.backends.len().max(1);
                    match self.backends.get(i) {
                        Some(b) => Decision::Spread { backend: Arc::clone(b) },
                        None => Decision::NoKey,
                    }
                }
            },
        }
    }

    /// Where a device ID goes and why, for the admin API.
    pub fn explain(&self, device_id: &[u8]) -> Option<Explanation<'_>> {
        let owner = self.owner(device_id)?;
        let failover_order =
            self.ring.walk(device_id).skip(1).filter_map(|i| self.backends.get(i)).map(|b| b.id.as_str()).collect();
        Some(Explanation { owner, reason: "ring owner", hash: Ring::hash_key(device_id), failover_order })
    }

    /// The ring owner of a device ID.
    pub fn owner(&self, device_id: &[u8]) -> Option<&Arc<Backend>> {
        self.ring.owner(device_id).and_then(|i| self.backends.get(i))
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    pub fn keys(&self) -> &KeyExtractor {
        &self.keys
    }

    /// Each backend's share of the ring, in backend order.
    pub fn ring_shares(&self) -> Vec<f64> {
        self.ring.shares()
    }
}

/// Why a device goes where it goes.
#[derive(Debug)]
pub struct Explanation<'t> {
    pub owner: &'t Arc<Backend>,
    pub reason: &'static str,
    /// CRC-32 of the device ID: its position on the ring.
    pub hash: u32,
    /// The backends that would own it next, in ring order.
    pub failover_order: Vec<&'t str>,
}
