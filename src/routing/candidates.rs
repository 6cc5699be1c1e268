//! The one candidates walk: the backends a device's request may go to, in
//! order of preference, each with the reason it is there.
//!
//! 1. The backend holding the device's open WebSocket on this replica, if
//!    the caller knows one (HTTP follows the tunnel).
//! 2. The ring owner if it may take requests; else its stand-in, the next
//!    backend usable in ring order (nginx mode: the first usable owner of
//!    the owner's point and the 20 after it, then round robin, as nginx).
//! 3. The remaining usable backends in ring order, each once.
//!
//! The proxy takes the first, a retry the next one after a failure, and
//! the admin API shows the walk, so what `/route` says is what a request
//! does. Without a device ID (`missing_key = "spread"`) the walk is round
//! robin over the usable backends.
//!
//! The common case, no tunnel and the owner usable, costs one ring lookup.

use std::sync::Arc;

use hyper::header::HeaderMap;
use hyper::Uri;

use super::key::DeviceKey;
use super::ring::{Ring, Walk};
use super::table::{Backend, RoutingTable};
use crate::config::MissingKey;

/// Points nginx looks at for a usable server before it falls back to round
/// robin (`hp->tries > 20` in `ngx_http_upstream_get_chash_peer`).
const NGINX_POINT_TRIES: usize = 21;

/// Why a backend is a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The device has a WebSocket open on this backend through this replica.
    Tunnel,
    /// The device's ring owner.
    RingOwner,
    /// Stands in for the ring owner, which is down.
    OwnerDown,
    /// Stands in for the ring owner, which is draining.
    OwnerDraining,
    /// nginx mode: no usable owner among 21 points, so round robin (no
    /// backend is this device's place).
    RoundRobin,
    /// The next usable backend in ring order: where a retry goes.
    Next,
    /// No device ID, `missing_key = "spread"`: round robin.
    Spread,
}

impl Reason {
    /// A sentence for the admin API and logs.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Tunnel => "tunnel: the device has a WebSocket open on this backend",
            Reason::RingOwner => "ring owner",
            Reason::OwnerDown => "failover: the ring owner is down; next backend up in ring order",
            Reason::OwnerDraining => "failover: the ring owner is draining; next backend up in ring order",
            Reason::RoundRobin => "failover: no usable backend among nginx's 21 points; round robin",
            Reason::Next => "next backend up in ring order",
            Reason::Spread => "no device ID: round robin",
        }
    }

    /// One word for how a request was routed: `tunnel`, `ring owner` or `failover`.
    pub fn via(self) -> &'static str {
        match self {
            Reason::Tunnel => "tunnel",
            Reason::RingOwner => "ring owner",
            Reason::Spread => "spread",
            Reason::OwnerDown | Reason::OwnerDraining | Reason::RoundRobin | Reason::Next => "failover",
        }
    }

    /// The request went to another backend than the ring owner's because
    /// the owner can't take it.
    pub fn is_failover(self) -> bool {
        matches!(self, Reason::OwnerDown | Reason::OwnerDraining | Reason::RoundRobin)
    }
}

/// One backend of the walk.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Where the request may go.
    pub backend: Arc<Backend>,
    /// Why it is in this place of the walk.
    pub reason: Reason,
}

/// The walk's iterator; see the module doc.
#[derive(Debug)]
pub struct Candidates<'t> {
    table: &'t RoutingTable,
    stage: Stage,
    /// The tunnel's backend, yielded first.
    held: Option<Arc<Backend>>,
    /// Backends yielded outside the ring walk (the tunnel's, nginx's pick),
    /// which the ring walk must not yield again.
    taken: [Option<usize>; 2],
    /// The first backend from the ring has been yielded.
    ring_started: bool,
    walk: Option<Walk<'t>>,
    hash: u32,
    /// Round robin: where it starts, and how many backends it has looked at.
    spread: (usize, usize),
    /// The redelivery walk: backends that may still hold a device's socket
    /// (draining, or down by failed traffic alone) stay in it.
    may_hold: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Held,
    NginxPoints,
    RoundRobin,
    Ring,
    Spread,
    Done,
}

impl<'t> Candidates<'t> {
    /// The walk for a device whose key hashes to `hash`; `held`: the
    /// backend of its open tunnel on this replica.
    pub(super) fn device(table: &'t RoutingTable, hash: u32, held: Option<Arc<Backend>>) -> Candidates<'t> {
        Candidates {
            table,
            stage: Stage::Held,
            held,
            taken: [None; 2],
            ring_started: false,
            walk: None,
            hash,
            spread: (0, 0),
            may_hold: false,
        }
    }

    /// The walk of a request an instance answered "not here": like
    /// [`Candidates::device`], but a backend that may still hold the
    /// device's socket (its ring owner while draining, say) is tried too.
    pub(super) fn redelivery(table: &'t RoutingTable, hash: u32, held: Option<Arc<Backend>>) -> Candidates<'t> {
        Candidates { may_hold: true, ..Candidates::device(table, hash, held) }
    }

    /// Round robin over usable backends, for a request without a device ID.
    pub(super) fn spread(table: &'t RoutingTable) -> Candidates<'t> {
        let start = table.next_spread_start();
        Candidates {
            table,
            stage: Stage::Spread,
            held: None,
            taken: [None; 2],
            ring_started: false,
            walk: None,
            hash: 0,
            spread: (start, 0),
            may_hold: false,
        }
    }

    /// May backend `i` be yielded: it may take requests, or (redelivery)
    /// it may still hold the device's socket.
    fn usable(&self, i: usize) -> bool {
        self.table.usable_at(i) || (self.may_hold && self.table.may_hold_tunnels_at(i))
    }

    fn take(&mut self, i: usize) {
        if let Some(slot) = self.taken.iter_mut().find(|t| t.is_none()) {
            *slot = Some(i);
        }
    }

    fn candidate(&self, i: usize, reason: Reason) -> Option<Candidate> {
        self.table.backends().get(i).map(|b| Candidate { backend: Arc::clone(b), reason })
    }

    /// The reason of the first backend chosen from the ring: the owner, or
    /// a stand-in for it.
    fn first_from_ring(&mut self, i: usize) -> Reason {
        self.ring_started = true;
        let ring = self.table.ring();
        let owner = ring.owner_of_hash(self.hash);
        match owner {
            Some(o) if o == i => Reason::RingOwner,
            Some(o) if self.table.is_draining_at(o) => Reason::OwnerDraining,
            _ => Reason::OwnerDown,
        }
    }

    /// The next round-robin pick: the next usable backend after the last.
    fn next_round_robin(&mut self) -> Option<usize> {
        let n = self.table.backends().len();
        while self.spread.1 < n {
            let i = (self.spread.0 + self.spread.1) % n;
            self.spread.1 += 1;
            if self.usable(i) {
                return Some(i);
            }
        }
        None
    }
}

impl Iterator for Candidates<'_> {
    type Item = Candidate;

    fn next(&mut self) -> Option<Candidate> {
        loop {
            match self.stage {
                Stage::Held => {
                    self.stage = if self.table.is_nginx() { Stage::NginxPoints } else { Stage::Ring };
                    if let Some(held) = self.held.take() {
                        if let Some(i) = self.table.position(&held.id) {
                            self.take(i);
                        }
                        return Some(Candidate { backend: held, reason: Reason::Tunnel });
                    }
                }
                Stage::NginxPoints => {
                    self.stage = Stage::RoundRobin;
                    let ring = self.table.ring();
                    let Some(start) = ring.point_of(self.hash) else { continue };
                    let usable =
                        (0..NGINX_POINT_TRIES).map(|k| ring.owner_of_point(start + k)).find(|&i| self.usable(i));
                    if let Some(i) = usable {
                        self.stage = Stage::Ring;
                        if self.taken.contains(&Some(i)) {
                            // The tunnel's backend is also the ring's choice.
                            self.ring_started = true;
                            continue;
                        }
                        self.take(i);
                        let reason = self.first_from_ring(i);
                        return self.candidate(i, reason);
                    }
                }
                Stage::RoundRobin => {
                    self.stage = Stage::Ring;
                    self.spread = (self.table.next_spread_start(), 0);
                    if let Some(i) = self.next_round_robin() {
                        self.ring_started = true;
                        if !self.taken.contains(&Some(i)) {
                            self.take(i);
                            return self.candidate(i, Reason::RoundRobin);
                        }
                    }
                }
                Stage::Ring => {
                    let (table, may_hold) = (self.table, self.may_hold);
                    let walk = self.walk.get_or_insert_with(|| table.ring().walk_from_hash(self.hash));
                    let found = walk.find(|&i| table.usable_at(i) || (may_hold && table.may_hold_tunnels_at(i)));
                    let Some(i) = found else {
                        self.stage = Stage::Done;
                        return None;
                    };
                    if self.taken.contains(&Some(i)) {
                        self.ring_started = true;
                        continue;
                    }
                    let reason = if self.ring_started { Reason::Next } else { self.first_from_ring(i) };
                    return self.candidate(i, reason);
                }
                Stage::Spread => {
                    let Some(i) = self.next_round_robin() else {
                        self.stage = Stage::Done;
                        return None;
                    };
                    return self.candidate(i, Reason::Spread);
                }
                Stage::Done => return None,
            }
        }
    }
}

/// The walk and the decisions made from it.
impl RoutingTable {
    /// Decides the backend for a request: the first of its candidates.
    /// `held` names the backend of a device's open tunnel on this replica.
    pub fn decide<'r>(
        &self,
        uri: &'r Uri,
        headers: &'r HeaderMap,
        held: impl FnOnce(&[u8]) -> Option<Arc<Backend>>,
    ) -> Decision<'r> {
        match self.keys().extract(uri, headers) {
            Some(key) => {
                let held = held(&key.id);
                match self.candidates(&key.id, held).next() {
                    Some(first) => Decision::Device { key, first },
                    None => Decision::AllDown,
                }
            }
            None => match self.missing_key() {
                MissingKey::Reject => Decision::NoKey,
                MissingKey::Spread => match self.spread_candidates().next() {
                    Some(first) => Decision::Spread { backend: first.backend },
                    None => Decision::AllDown,
                },
            },
        }
    }

    /// The device's candidates walk (see [`super::candidates`]); `held`:
    /// the backend of its open tunnel on this replica, if any.
    pub fn candidates(&self, device_id: &[u8], held: Option<Arc<Backend>>) -> Candidates<'_> {
        Candidates::device(self, Ring::hash_key(device_id), held)
    }

    /// The redelivery walk of a device whose instance answered "not here"
    /// (see [`Candidates::redelivery`]).
    pub fn redelivery_candidates(&self, device_id: &[u8], held: Option<Arc<Backend>>) -> Candidates<'_> {
        Candidates::redelivery(self, Ring::hash_key(device_id), held)
    }

    /// Round robin over the usable backends, for requests without a device ID.
    pub fn spread_candidates(&self) -> Candidates<'_> {
        Candidates::spread(self)
    }

    /// Where a new connection of the device would settle, without side
    /// effects: its first candidate when no tunnel is open. `None` when
    /// every backend is down or when nginx mode falls back to round robin
    /// (then no single backend is the device's place, so no tunnel is
    /// misplaced).
    pub fn home(&self, device_id: &[u8]) -> Option<Arc<Backend>> {
        let first = self.candidates(device_id, None).next()?;
        (first.reason != Reason::RoundRobin).then_some(first.backend)
    }

    /// The backend after `failed` in the walk: where a request that failed
    /// on `failed` may be sent again (a device without a key: the next
    /// backend in round robin).
    pub fn retry_target(
        &self,
        device_id: Option<&[u8]>,
        held: Option<Arc<Backend>>,
        failed: &Backend,
    ) -> Option<Arc<Backend>> {
        let walk = match device_id {
            Some(id) => self.candidates(id, held),
            None => self.spread_candidates(),
        };
        walk.map(|c| c.backend).find(|b| b.id != failed.id)
    }

    /// Where a device ID goes and why, for the admin API: the same walk
    /// a request takes. `held`: the backend of its open tunnel, if any.
    pub fn explain(&self, device_id: &[u8], held: Option<Arc<Backend>>) -> Option<Explanation<'_>> {
        let owner = self.owner(device_id)?;
        let candidates = self.candidates(device_id, held).collect();
        let failover_order =
            self.ring().walk(device_id).skip(1).filter_map(|i| self.backends().get(i)).map(|b| b.id.as_str()).collect();
        Some(Explanation { owner, candidates, hash: Ring::hash_key(device_id), failover_order })
    }
}

/// Where a request goes.
#[derive(Debug)]
pub enum Decision<'r> {
    /// The device's first candidate (see [`super::candidates`]).
    Device {
        /// The device ID found in the request.
        key: DeviceKey<'r>,
        /// Where it goes, and why.
        first: Candidate,
    },
    /// No device ID, `missing_key = "spread"`: round-robin over backends up.
    Spread {
        /// The next backend in turn.
        backend: Arc<Backend>,
    },
    /// No device ID, `missing_key = "reject"`.
    NoKey,
    /// Every backend is down.
    AllDown,
}

/// Why a device goes where it goes.
#[derive(Debug)]
pub struct Explanation<'t> {
    /// The ring owner.
    pub owner: &'t Arc<Backend>,
    /// Its candidates walk, in order: the first serves it now (none: every
    /// backend is down or draining).
    pub candidates: Vec<Candidate>,
    /// CRC-32 of the device ID: its position on the ring.
    pub hash: u32,
    /// The backends that would own it next, in ring order.
    pub failover_order: Vec<&'t str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(hash: &str, backends: usize) -> RoutingTable {
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[routing]\nkey = [\"header:x-device-id\"]\nhash = \"{hash}\"\n"
        );
        for i in 1..=backends {
            text.push_str(&format!("\n[[backends]]\nid = \"app-{i}\"\naddress = \"127.0.0.1:{}\"\n", 9000 + i));
        }
        RoutingTable::offline(&Config::parse(&text).expect("config"))
    }

    fn walk(table: &RoutingTable, device: &str, held: Option<&str>) -> Vec<(String, Reason)> {
        let held = held.and_then(|id| table.backends().iter().find(|b| b.id == id).cloned());
        table.candidates(device.as_bytes(), held).map(|c| (c.backend.id.clone(), c.reason)).collect()
    }

    fn ids(walk: &[(String, Reason)]) -> Vec<&str> {
        walk.iter().map(|(id, _)| id.as_str()).collect()
    }

    #[test]
    fn all_up_the_owner_comes_first_then_the_ring_order_once_each() {
        let t = table("ring", 5);
        for n in 0..200 {
            let device = format!("device-{n}");
            let got = walk(&t, &device, None);
            let ring: Vec<&str> = t.ring().walk(device.as_bytes()).map(|i| t.backends()[i].id.as_str()).collect();
            assert_eq!(ids(&got), ring, "{device}");
            assert_eq!(got[0].1, Reason::RingOwner);
            assert!(got[1..].iter().all(|(_, r)| *r == Reason::Next), "{got:?}");
        }
    }

    #[test]
    fn the_tunnel_comes_first_and_is_not_repeated() {
        let t = table("ring", 4);
        let device = "phone-42";
        let plain = walk(&t, device, None);
        let elsewhere = plain[2].0.clone();
        let got = walk(&t, device, Some(&elsewhere));
        assert_eq!(got[0], (elsewhere.clone(), Reason::Tunnel));
        assert_eq!(got[1], plain[0], "then the ring owner, as without a tunnel");
        assert_eq!(got.len(), 4, "each backend once: {got:?}");
        assert_eq!(got.iter().filter(|(id, _)| *id == elsewhere).count(), 1);

        // A tunnel on the owner itself: the owner once, as the tunnel.
        let got = walk(&t, device, Some(&plain[0].0));
        assert_eq!(got[0], (plain[0].0.clone(), Reason::Tunnel));
        assert_eq!(ids(&got[1..]), ids(&plain[1..]));
        assert!(got[1..].iter().all(|(_, r)| *r == Reason::Next));
    }

    #[test]
    fn a_down_or_draining_owner_is_skipped_and_named() {
        let t = table("ring", 4);
        let device = "phone-42";
        let plain = walk(&t, device, None);
        let owner = plain[0].0.clone();

        let down = t.with_health(&owner, false);
        let got = walk(&down, device, None);
        assert_eq!(got[0], (plain[1].0.clone(), Reason::OwnerDown));
        assert_eq!(ids(&got), ids(&plain[1..]));

        let draining = t.with_drain(&owner, true).expect("known backend");
        let got = walk(&draining, device, None);
        assert_eq!(got[0], (plain[1].0.clone(), Reason::OwnerDraining));
        assert!(got[0].1.is_failover());

        // The draining owner still holds the device's socket: HTTP follows it.
        let got = walk(&draining, device, Some(&owner));
        assert_eq!(got[0], (owner.clone(), Reason::Tunnel));
        assert_eq!(got[1], (plain[1].0.clone(), Reason::OwnerDraining));
    }

    #[test]
    fn every_backend_unusable_means_no_candidate() {
        let mut t = table("ring", 3);
        for id in ["app-1", "app-2", "app-3"] {
            t = t.with_health(id, false);
        }
        assert!(walk(&t, "d", None).is_empty());
        assert!(t.spread_candidates().next().is_none());
        assert!(t.home(b"d").is_none());
    }

    #[test]
    fn retries_and_home_come_from_the_same_walk() {
        let t = table("ring", 4);
        let plain = walk(&t, "d-7", None);
        let owner = t.backends().iter().find(|b| b.id == plain[0].0).cloned().expect("owner");
        let retry = t.retry_target(Some(b"d-7"), None, &owner).expect("a second backend");
        assert_eq!(retry.id, plain[1].0);
        assert_eq!(t.home(b"d-7").map(|b| b.id.clone()), Some(plain[0].0.clone()));
    }

    #[test]
    fn nginx_mode_steps_through_points_then_the_ring() {
        let t = table("nginx", 4);
        for n in 0..100 {
            let device = format!("device-{n}");
            let points: Vec<usize> = t.ring().point_owners(device.as_bytes()).take(NGINX_POINT_TRIES).collect();
            let owner = points[0];
            let down = t.with_health(&t.backends()[owner].id, false);
            let got = walk(&down, &device, None);
            let expected = points.iter().copied().find(|&i| i != owner);
            match expected {
                Some(i) => {
                    assert_eq!(got[0], (t.backends()[i].id.clone(), Reason::OwnerDown), "{device}");
                    let mut seen: Vec<&str> = ids(&got);
                    seen.sort();
                    seen.dedup();
                    assert_eq!(seen.len(), 3, "each usable backend once: {got:?}");
                }
                None => assert_eq!(got[0].1, Reason::RoundRobin),
            }
        }
    }

    #[test]
    fn without_a_key_round_robin_covers_every_usable_backend() {
        let t = table("ring", 3).with_health("app-2", false);
        let first: Vec<String> =
            (0..4).map(|_| t.spread_candidates().next().expect("one").backend.id.clone()).collect();
        assert!(first.iter().all(|id| id != "app-2"), "{first:?}");
        assert!(first.contains(&"app-1".to_string()) && first.contains(&"app-3".to_string()), "{first:?}");
        let all: Vec<String> = t.spread_candidates().map(|c| c.backend.id.clone()).collect();
        assert_eq!(all.len(), 2);
    }
}
