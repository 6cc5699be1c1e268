//! The live routing state: one immutable snapshot of backends, ring, key
//! rules and backend health, swapped atomically.
//!
//! Every request loads the current [`RoutingTable`] from a [`LiveTable`]
//! (no lock, no contention between requests), decides its backend, and keeps
//! an `Arc` of that backend for as long as it runs. Writers (a reload, a
//! health transition) build a whole new table and swap it in, one at a time
//! so that neither loses the other's change; requests and tunnels already
//! running keep what they started with.
//!
//! Where a device's request goes is the [`super::candidates`] walk over
//! this table: its ring owner while that owner is up, else the next
//! distinct backend up in ring order (the same rule in every replica, so
//! replicas that agree on health agree on placement).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use super::key::KeyExtractor;
use super::ring::{self, Member, Ring, Ties};
use crate::config::{Config, HashMode, MissingKey};
use crate::metrics::{BackendStats, Metrics};
use crate::tls::UpstreamTls;

/// The shared handle through which the hot path reads the current table.
pub type Router = Arc<LiveTable>;

/// The current [`RoutingTable`]: read without locks, replaced by writers in turn.
#[derive(Debug)]
pub struct LiveTable {
    current: ArcSwap<RoutingTable>,
    writers: Mutex<()>,
    /// Counts swaps; tunnels wait on it to notice their backend draining.
    swaps: watch::Sender<u64>,
}

impl LiveTable {
    /// The table in use (a cheap guard; hold it only while deciding).
    pub fn load(&self) -> Guard<Arc<RoutingTable>> {
        self.current.load()
    }

    /// The table in use, as an `Arc` that may be kept.
    pub fn load_full(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// Builds the next table from the current one and swaps it in. Writers
    /// are serialised, so a reload and a health change can't overwrite each
    /// other. Returns the replaced table, for the caller to free.
    pub fn update<T, E>(
        &self,
        next: impl FnOnce(&Arc<RoutingTable>) -> Result<(RoutingTable, T), E>,
    ) -> Result<(Arc<RoutingTable>, T), E> {
        let _turn = self.writers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.current.load_full();
        let (table, out) = next(&current)?;
        self.current.store(Arc::new(table));
        self.swaps.send_modify(|n| *n += 1);
        Ok((current, out))
    }

    /// Fires after every swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.swaps.subscribe()
    }
}

/// One app instance requests can be sent to.
#[derive(Debug)]
pub struct Backend {
    /// Stable identity, hashed onto the ring.
    pub id: String,
    /// `host:port` to connect to.
    pub address: String,
    /// Share of the ring, relative to the other backends.
    pub weight: u32,
    /// `Some`: spoken to over TLS.
    pub tls: Option<UpstreamTls>,
    /// This backend's metric handles (shared with the same backend in
    /// other snapshots, so counts carry across reloads).
    pub stats: BackendStats,
}

/// Backends, ring, key rules, health and live settings of one moment.
#[derive(Debug)]
pub struct RoutingTable {
    /// The config this table was built from; settings read per request
    /// (timeouts) come from here, so they change with a reload.
    config: Arc<Config>,
    /// Counts successful loads: 1 for the first config, +1 per reload.
    generation: u64,
    backends: Arc<Vec<Arc<Backend>>>,
    /// Backend id → index into `backends` (and `up`, `draining`).
    index: Arc<HashMap<String, usize>>,
    ring: Arc<Ring>,
    /// `routing.hash = "nginx"`: failover steps through points as nginx does.
    nginx: bool,
    keys: Arc<KeyExtractor>,
    /// Health, by backend index: `true` while the backend may take traffic.
    up: Vec<bool>,
    /// Down by failures on real traffic alone, by backend index: such a
    /// backend keeps its WebSocket tunnels (they are alive; only an active
    /// check's verdict, or the tunnel failing, moves them).
    down_by_traffic: Vec<bool>,
    /// Draining since, by backend index (`None`: not draining).
    draining: Vec<Option<Instant>>,
    /// Drains set or cleared on the admin API, by id; they outlive reloads
    /// and win over the config's `state`.
    drain_overrides: Arc<HashMap<String, bool>>,
    missing_key: MissingKey,
    next_spread: AtomicUsize,
}

/// Whether `a` and `b` build the same ring: the same hashing, replicas,
/// and the same backends' identities (ids, or `server` names with
/// `hash = "nginx"`) and weights in the same order. Addresses, states and
/// every other setting don't place points.
fn same_ring_inputs(a: &Config, b: &Config) -> bool {
    let nginx = a.routing.hash == HashMode::Nginx;
    a.routing.hash == b.routing.hash
        && a.routing.replicas == b.routing.replicas
        && a.backends.len() == b.backends.len()
        && a.backends
            .iter()
            .zip(&b.backends)
            .all(|(x, y)| x.weight == y.weight && if nginx { x.server == y.server } else { x.id == y.id })
}

impl RoutingTable {
    /// Builds a table with every backend up; `metrics` supplies each
    /// backend's metric handles.
    pub fn new(config: Arc<Config>, generation: u64, metrics: &Metrics) -> RoutingTable {
        RoutingTable::build(config, generation, metrics, None)
    }

    /// The table that replaces `previous` (a reload, a discovery change):
    /// health, drains and drain start times carried over by backend id (see
    /// [`with_health_of`](Self::with_health_of)), and `previous`'s ring
    /// shared when nothing it is built from changed. A ring of a thousand
    /// backends takes tens of milliseconds to build, and most reloads don't
    /// change it: other settings, or only addresses (a Kubernetes pod
    /// rescheduled under the same name).
    pub fn after(config: Arc<Config>, generation: u64, metrics: &Metrics, previous: &RoutingTable) -> RoutingTable {
        RoutingTable::build(config, generation, metrics, Some(previous)).with_health_of(previous)
    }

    fn build(config: Arc<Config>, generation: u64, metrics: &Metrics, previous: Option<&RoutingTable>) -> RoutingTable {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                // A backend the previous table had keeps its handles: the
                // same series, without a thousand registry lookups.
                let known = previous.and_then(|p| p.position(&b.id).and_then(|i| p.backends.get(i)));
                let stats = match known {
                    Some(known) => known.stats.clone(),
                    None => metrics.backend(&b.id),
                };
                Arc::new(Backend {
                    id: b.id.clone(),
                    address: b.address.clone(),
                    weight: b.weight,
                    tls: b.tls.clone(),
                    stats,
                })
            })
            .collect();
        let nginx = config.routing.hash == HashMode::Nginx;
        let same_ring = previous.filter(|p| same_ring_inputs(&p.config, &config)).map(|p| Arc::clone(&p.ring));
        let ring = if let Some(ring) = same_ring {
            ring
        } else if nginx {
            let identities: Vec<Vec<u8>> = config.backends.iter().map(|b| ring::nginx_identity(&b.server)).collect();
            let members: Vec<Member<'_>> = identities
                .iter()
                .zip(&config.backends)
                .map(|(identity, b)| Member { identity, weight: b.weight })
                .collect();
            Arc::new(Ring::with_ties(&members, ring::NGINX_REPLICAS, Ties::FirstListed))
        } else {
            let members: Vec<Member<'_>> =
                backends.iter().map(|b| Member { identity: b.id.as_bytes(), weight: b.weight }).collect();
            Arc::new(Ring::new(&members, config.routing.replicas))
        };
        let keys = config.routing.keys.clone();
        let index = backends.iter().enumerate().map(|(i, b)| (b.id.clone(), i)).collect();
        RoutingTable {
            ring,
            nginx,
            index: Arc::new(index),
            up: vec![true; backends.len()],
            down_by_traffic: vec![false; backends.len()],
            draining: config.backends.iter().map(|b| b.draining.then(Instant::now)).collect(),
            drain_overrides: Arc::new(HashMap::new()),
            backends: Arc::new(backends),
            keys: Arc::new(if nginx { KeyExtractor::nginx(keys) } else { KeyExtractor::new(keys) }),
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

    /// This table with one backend's health changed by an active verdict
    /// (a check or probe); ring and backends shared.
    pub fn with_health(&self, id: &str, up: bool) -> RoutingTable {
        self.with_verdict(id, up, false)
    }

    /// This table with one backend down by failures on real traffic alone:
    /// new requests avoid it, its open tunnels stay and HTTP still follows them.
    pub fn with_traffic_down(&self, id: &str) -> RoutingTable {
        self.with_verdict(id, false, true)
    }

    fn with_verdict(&self, id: &str, up: bool, by_traffic: bool) -> RoutingTable {
        let (mut health, mut passive) = (self.up.clone(), self.down_by_traffic.clone());
        if let Some(i) = self.position(id) {
            health[i] = up;
            passive[i] = by_traffic;
        }
        self.with_all_health(health, passive)
    }

    /// This table with health, admin drains and drain start times carried
    /// over from `previous` by backend id (backends new to this table are up).
    pub fn with_health_of(self, previous: &RoutingTable) -> RoutingTable {
        let health = self.backends.iter().map(|b| previous.is_up(&b.id).unwrap_or(true)).collect();
        let passive = self.backends.iter().map(|b| previous.is_down_by_traffic(&b.id)).collect();
        let mut table = self.with_all_health(health, passive);
        table.drain_overrides = Arc::clone(&previous.drain_overrides);
        for (i, b) in table.backends.iter().enumerate() {
            let configured = table.config.backends.get(i).is_some_and(|c| c.draining);
            let wanted = table.drain_overrides.get(&b.id).copied().unwrap_or(configured);
            table.draining[i] = wanted.then(|| previous.draining_since(&b.id).unwrap_or_else(Instant::now));
        }
        table
    }

    /// This table with a backend drained (or undrained) by the operator.
    /// `None` if there is no such backend.
    pub fn with_drain(&self, id: &str, drain: bool) -> Option<RoutingTable> {
        let i = self.position(id)?;
        let mut table = self.with_all_health(self.up.clone(), self.down_by_traffic.clone());
        let mut overrides = (*self.drain_overrides).clone();
        overrides.insert(id.to_string(), drain);
        table.drain_overrides = Arc::new(overrides);
        table.draining[i] = drain.then(|| self.draining[i].unwrap_or_else(Instant::now));
        Some(table)
    }

    /// Since when the backend has been draining, if it is.
    pub fn draining_since(&self, id: &str) -> Option<Instant> {
        self.position(id).and_then(|i| self.draining[i])
    }

    /// May take new requests: up and not draining.
    fn usable(&self, i: usize) -> bool {
        self.up.get(i) == Some(&true) && self.draining.get(i).is_some_and(Option::is_none)
    }

    fn with_all_health(&self, up: Vec<bool>, down_by_traffic: Vec<bool>) -> RoutingTable {
        RoutingTable {
            draining: self.draining.clone(),
            drain_overrides: Arc::clone(&self.drain_overrides),
            config: Arc::clone(&self.config),
            generation: self.generation,
            backends: Arc::clone(&self.backends),
            index: Arc::clone(&self.index),
            ring: Arc::clone(&self.ring),
            nginx: self.nginx,
            keys: Arc::clone(&self.keys),
            up,
            down_by_traffic,
            missing_key: self.missing_key,
            next_spread: AtomicUsize::new(self.next_spread.load(Ordering::Relaxed)),
        }
    }

    /// The config this table was built from (live settings are read here).
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Successful config loads so far: 1 for the first, +1 per reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A shareable handle holding this table, for the proxy and admin API.
    pub fn into_router(self) -> Router {
        let (swaps, _) = watch::channel(0);
        Arc::new(LiveTable { current: ArcSwap::from_pointee(self), writers: Mutex::new(()), swaps })
    }

    /// The start of the next round robin.
    pub(super) fn next_spread_start(&self) -> usize {
        self.next_spread.fetch_add(1, Ordering::Relaxed)
    }

    /// The ring.
    pub(super) fn ring(&self) -> &Ring {
        &self.ring
    }

    /// `routing.hash = "nginx"`: failover steps through points as nginx does.
    pub(super) fn is_nginx(&self) -> bool {
        self.nginx
    }

    /// May backend `i` take new requests: up and not draining.
    pub(super) fn usable_at(&self, i: usize) -> bool {
        self.usable(i)
    }

    /// May backend `i` still hold sockets: up (draining or not), or down by
    /// failed traffic alone.
    pub(super) fn may_hold_tunnels_at(&self, i: usize) -> bool {
        self.up.get(i) == Some(&true) || self.down_by_traffic.get(i) == Some(&true)
    }

    /// Is backend `i` draining?
    pub(super) fn is_draining_at(&self, i: usize) -> bool {
        self.draining.get(i).is_some_and(Option::is_some)
    }

    /// The ring owner of a device ID, whatever its health.
    pub fn owner(&self, device_id: &[u8]) -> Option<&Arc<Backend>> {
        self.ring.owner(device_id).and_then(|i| self.backends.get(i))
    }

    /// The index of the backend with this id.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Whether the backend with this id is up (`None`: no such backend).
    pub fn is_up(&self, id: &str) -> Option<bool> {
        self.position(id).map(|i| self.up[i])
    }

    /// Whether the backend is down by failures on real traffic alone.
    pub fn is_down_by_traffic(&self, id: &str) -> bool {
        self.position(id).is_some_and(|i| self.down_by_traffic[i] && !self.up[i])
    }

    /// Whether the backend's open tunnels stay where they are: it is up, or
    /// down by failures on real traffic alone (`None`: no such backend).
    pub fn keeps_tunnels(&self, id: &str) -> Option<bool> {
        self.position(id).map(|i| self.up[i] || self.down_by_traffic[i])
    }

    /// Every backend, in config order (the order of indices).
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Backends up now.
    pub fn backends_up(&self) -> usize {
        self.up.iter().filter(|u| **u).count()
    }

    /// Publishes `backends{state}` and each backend's `backend_draining`.
    pub fn publish_states(&self, metrics: &Metrics) {
        metrics.set_backend_states(self.state_counts());
        for (backend, draining) in self.backends.iter().zip(&self.draining) {
            backend.stats.set_draining(draining.is_some());
        }
    }

    /// How many backends are `up`, `down` and `draining` (a draining
    /// backend counts as draining whatever its health).
    pub fn state_counts(&self) -> [(&'static str, usize); 3] {
        let draining = self.draining.iter().filter(|d| d.is_some()).count();
        let down = (0..self.backends.len()).filter(|&i| !self.up[i] && self.draining[i].is_none()).count();
        [("up", self.backends.len() - draining - down), ("down", down), ("draining", draining)]
    }

    /// Backends that may take new requests: up and not draining.
    pub fn backends_usable(&self) -> usize {
        (0..self.backends.len()).filter(|&i| self.usable(i)).count()
    }

    /// What to do with a request without a device ID.
    pub fn missing_key(&self) -> MissingKey {
        self.missing_key
    }

    /// How device IDs are found in requests.
    pub fn keys(&self) -> &KeyExtractor {
        &self.keys
    }

    /// Each backend's share of the ring, in backend order.
    pub fn ring_shares(&self) -> Vec<f64> {
        self.ring.shares()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend: id, address, weight.
    type Listed<'a> = (&'a str, &'a str, u32);

    /// A config of `backends`, with `routing` lines added to the
    /// `[routing]` section.
    fn config(routing: &str, backends: &[Listed<'_>]) -> Arc<Config> {
        let mut text =
            format!("[server]\nlisten = \"127.0.0.1:8080\"\n\n[routing]\nkey = [\"header:x-device-id\"]\n{routing}\n");
        for (id, address, weight) in backends {
            text.push_str(&format!("\n[[backends]]\nid = \"{id}\"\naddress = \"{address}\"\nweight = {weight}\n"));
        }
        Arc::new(Config::parse(&text).expect("config"))
    }

    fn shares_ring(a: &RoutingTable, b: &RoutingTable) -> bool {
        Arc::ptr_eq(&a.ring, &b.ring)
    }

    #[test]
    fn a_reload_shares_the_ring_only_when_nothing_that_places_points_changed() {
        let metrics = Metrics::new();
        let base = [("a", "127.0.0.1:9001", 1), ("b", "127.0.0.1:9002", 2), ("c", "127.0.0.1:9003", 1)];
        let old = RoutingTable::new(config("", &base), 1, &metrics);
        // Other settings and addresses: the same ring, shared.
        let moved = [("a", "127.0.0.1:9101", 1), ("b", "127.0.0.1:9002", 2), ("c", "127.0.0.2:9003", 1)];
        let next = RoutingTable::after(config("missing_key = \"reject\"", &moved), 2, &metrics, &old);
        assert!(shares_ring(&old, &next));
        assert_eq!(next.backends()[0].address, "127.0.0.1:9101", "the new addresses are used");
        // Anything that places points: a new ring, the same as a fresh build.
        let changes: [(&str, Vec<Listed<'_>>); 5] = [
            ("", vec![base[0], ("b", "127.0.0.1:9002", 3), base[2]]),
            ("", vec![base[0], base[2], base[1]]),
            ("", vec![base[0], base[1]]),
            ("", vec![base[0], base[1], base[2], ("d", "127.0.0.1:9004", 1)]),
            ("replicas = 100", base.to_vec()),
        ];
        for (routing, backends) in changes {
            let config = config(routing, &backends);
            let next = RoutingTable::after(Arc::clone(&config), 2, &metrics, &old);
            assert!(!shares_ring(&old, &next), "{routing} {backends:?}");
            let fresh = RoutingTable::new(config, 2, &metrics);
            for n in 0..500 {
                let device = format!("device-{n}");
                let owner = |t: &RoutingTable| t.owner(device.as_bytes()).map(|b| b.id.clone());
                assert_eq!(owner(&next), owner(&fresh), "{routing} {backends:?} {device}");
            }
        }
    }

    #[test]
    fn with_nginx_hashing_the_ring_follows_the_server_names() {
        let metrics = Metrics::new();
        let nginx = "hash = \"nginx\"";
        let old =
            RoutingTable::new(config(nginx, &[("a", "127.0.0.1:9001", 1), ("b", "127.0.0.1:9002", 1)]), 1, &metrics);
        // nginx hashes the server's address: a new address is a new ring.
        let moved = config(nginx, &[("a", "127.0.0.1:9101", 1), ("b", "127.0.0.1:9002", 1)]);
        assert!(!shares_ring(&old, &RoutingTable::after(moved, 2, &metrics, &old)));
        // Renamed ids, same servers: the same ring.
        let renamed = config(nginx, &[("x", "127.0.0.1:9001", 1), ("y", "127.0.0.1:9002", 1)]);
        assert!(shares_ring(&old, &RoutingTable::after(renamed, 2, &metrics, &old)));
    }
}
