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
//! reconnect in one herd (the `Pacer` keeps the slots). Every routing change
//! re-evaluates which tunnels are misplaced, so a second change in the
//! middle of a migration moves tunnels to where they belong now. A queued
//! tunnel that has closed by itself, or is no longer misplaced when its turn
//! comes, is skipped, and the slot's close goes to the next one. With
//! `rebalance = "keep"`, misplaced tunnels are only counted in the log.
//!
//! [`Rebalancer::run`] only waits; the decisions are plain methods that are
//! given the time, so the tests drive them without a clock.

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
use crate::util::time::sleep_until_some;

/// Moves misplaced tunnels to their owner, paced.
pub struct Rebalancer {
    router: Router,
    /// Fires on every routing change (subscribed at construction, so no
    /// change between [`Rebalancer::new`] and [`Rebalancer::run`] is missed).
    swaps: watch::Receiver<u64>,
    tunnels: Arc<TunnelRegistry>,
    metrics: Arc<Metrics>,
    /// Misplaced tunnels in the order they will be closed.
    queue: VecDeque<TunnelInfo>,
    pacer: Pacer,
    rng: SplitMix64,
}

impl Rebalancer {
    /// A rebalancer for the tunnels in `tunnels`, following the routing
    /// changes of `router`; it does nothing until [`Rebalancer::run`].
    pub fn new(router: Router, tunnels: Arc<TunnelRegistry>, metrics: Arc<Metrics>) -> Rebalancer {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64);
        Rebalancer::with_seed(router, tunnels, metrics, seed, Instant::now())
    }

    fn with_seed(
        router: Router,
        tunnels: Arc<TunnelRegistry>,
        metrics: Arc<Metrics>,
        seed: u64,
        now: Instant,
    ) -> Rebalancer {
        Rebalancer {
            swaps: router.subscribe(),
            router,
            tunnels,
            metrics,
            queue: VecDeque::new(),
            pacer: Pacer::new(now),
            rng: SplitMix64::new(seed),
        }
    }

    /// Runs until `stop` is raised.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                changed = self.swaps.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.reevaluate(Instant::now());
                }
                _ = sleep_until_some(self.pacer.next_close()) => self.close_next(Instant::now()),
                _ = raised(&mut stop) => return,
            }
        }
    }

    /// Finds the tunnels misplaced under the current table and, under
    /// `migrate`, queues them (in random order) for closing; the first
    /// close is scheduled unless one already is.
    fn reevaluate(&mut self, now: Instant) {
        let table = self.router.load_full();
        let mut misplaced = self.tunnels.misplaced(&table);
        let policy = table.config().routing.rebalance;
        if misplaced.is_empty() {
            self.queue.clear();
            self.pacer.clear();
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
                self.pacer.clear();
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
                if self.pacer.next_close().is_none() {
                    self.schedule(now);
                }
            }
        }
    }

    /// Schedules the next close in the next free slot, at the current rate.
    fn schedule(&mut self, now: Instant) {
        let rate = self.router.load().config().routing.rebalance_rate;
        let jitter = unit(&mut self.rng);
        self.pacer.schedule(now, rate, jitter);
    }

    /// The scheduled close is due: closes the next queued tunnel that is
    /// still open and still misplaced, and schedules the one after it.
    fn close_next(&mut self, now: Instant) {
        self.pacer.clear();
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
            self.schedule(now);
        } else {
            debug!("no misplaced tunnel left to move");
        }
    }
}

/// The pacing of closes: time is cut into slots of `1/rate` seconds, starting
/// when the first close is scheduled, and each slot holds at most one close,
/// at a random moment of it. A slot once given out stays used, even if its
/// close is called off, so re-evaluations can't exceed the rate. After an
/// idle spell the next slot starts at once: slots left unused are not
/// caught up in a burst.
#[derive(Debug)]
struct Pacer {
    /// Start of the next free slot (or a moment already past: then the next
    /// slot starts when it is asked for).
    slot: Instant,
    /// When the scheduled close happens, if one is.
    next_close: Option<Instant>,
}

impl Pacer {
    fn new(now: Instant) -> Pacer {
        Pacer { slot: now, next_close: None }
    }

    /// When the scheduled close happens, if one is.
    fn next_close(&self) -> Option<Instant> {
        self.next_close
    }

    /// Schedules a close in the next free slot, which starts at `now` at the
    /// earliest and lasts `1/rate` seconds, at `jitter` (in `[0, 1)`) of the
    /// way through it. Returns the moment of the close.
    fn schedule(&mut self, now: Instant, rate: f64, jitter: f64) -> Instant {
        let slot_len = slot_len(rate);
        if self.slot < now {
            self.slot = now;
        }
        let at = self.slot + slot_len.mul_f64(jitter);
        self.next_close = Some(at);
        self.slot += slot_len;
        at
    }

    /// No close is scheduled any more (it happened, or there is nothing
    /// left to close). Its slot stays used.
    fn clear(&mut self) {
        self.next_close = None;
    }
}

/// How long one slot lasts at `rate` closes a second.
fn slot_len(rate: f64) -> Duration {
    Duration::from_secs_f64(1.0 / rate)
}

/// A random number in `[0, 1)`.
fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    //! The pacing and the re-evaluations are driven by hand: each test fires
    //! the scheduled closes at the moments the rebalancer asked for, so no
    //! clock is involved and the seeds make every run the same. Only the
    //! last test runs `run` itself, on the real clock, with long timeouts.

    use std::collections::HashSet;

    use super::*;
    use crate::config::Config;
    use crate::routing::RoutingTable;
    use crate::tunnel::registry::{Ask, Registration};

    const DEVICES: usize = 60;

    fn config(policy: &str, rate: f64) -> Config {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[routing]\nkey = [\"header:x-device-id\"]\n\
             rebalance = \"{policy}\"\nrebalance_rate = {rate:?}\n\n\
             [[backends]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n\n\
             [[backends]]\nid = \"b\"\naddress = \"127.0.0.1:2\"\n\n\
             [[backends]]\nid = \"c\"\naddress = \"127.0.0.1:3\"\n"
        );
        Config::parse(&text).expect("valid config")
    }

    /// A router and one tunnel per device, each open on its device's owner.
    struct Fixture {
        router: Router,
        metrics: Arc<Metrics>,
        registry: Arc<TunnelRegistry>,
        /// `None` once the tunnel has closed by itself.
        tunnels: Vec<Option<Registration>>,
        /// The backend each tunnel is open on.
        on: Vec<String>,
        /// The tunnels [`Fixture::asked_to_move`] has reported.
        reported: std::sync::Mutex<HashSet<usize>>,
    }

    impl Fixture {
        fn new(policy: &str, rate: f64) -> Fixture {
            let metrics = Arc::new(Metrics::new());
            let router = RoutingTable::new(Arc::new(config(policy, rate)), 1, &metrics).into_router();
            let registry = Arc::new(TunnelRegistry::new());
            let table = router.load_full();
            let (mut tunnels, mut on) = (Vec::new(), Vec::new());
            for i in 0..DEVICES {
                let device = format!("device-{i}");
                let home = table.home(device.as_bytes()).expect("a backend is up");
                tunnels.push(Some(registry.register(device.as_bytes(), &home)));
                on.push(home.id.clone());
            }
            Fixture { router, metrics, registry, tunnels, on, reported: Default::default() }
        }

        fn rebalancer(&self, seed: u64, now: Instant) -> Rebalancer {
            let (router, registry, metrics) =
                (self.router.clone(), Arc::clone(&self.registry), Arc::clone(&self.metrics));
            Rebalancer::with_seed(router, registry, metrics, seed, now)
        }

        /// Swaps in the current table with backend health changed.
        fn set_health(&self, changes: &[(&str, bool)]) {
            self.router
                .update(|t| {
                    let (&(id, up), rest) = changes.split_first().expect("a change");
                    let mut next = t.with_health(id, up);
                    for &(id, up) in rest {
                        next = next.with_health(id, up);
                    }
                    Ok::<_, ()>((next, ()))
                })
                .expect("swapped");
        }

        /// The tunnels open on `backend`.
        fn on(&self, backend: &str) -> HashSet<usize> {
            (0..DEVICES).filter(|&i| self.on[i] == backend).collect()
        }

        /// The tunnels asked to move since the last call.
        fn asked_to_move(&self) -> Vec<usize> {
            let asked = |r: &Registration| r.control().asked() == Some(Ask::Migrate);
            let mut reported = self.reported.lock().expect("reported");
            (0..DEVICES).filter(|&i| self.tunnels[i].as_ref().is_some_and(asked) && reported.insert(i)).collect()
        }
    }

    /// Fires the scheduled closes due up to `until`, at their moments.
    /// Returns each close's moment and the tunnel it moved; every close
    /// moves at most one tunnel.
    fn fire_until(rb: &mut Rebalancer, fx: &Fixture, until: Instant) -> Vec<(Instant, usize)> {
        let mut closes = Vec::new();
        while let Some(at) = rb.pacer.next_close().filter(|&at| at <= until) {
            rb.close_next(at);
            let moved = fx.asked_to_move();
            assert!(moved.len() <= 1, "one close moved {moved:?}");
            closes.extend(moved.into_iter().map(|i| (at, i)));
        }
        closes
    }

    /// The slot (counted from `start`) in which a close at `at` falls.
    fn slot_of(start: Instant, len: Duration, at: Instant) -> u32 {
        ((at - start).as_nanos() / len.as_nanos()) as u32
    }

    #[test]
    fn pacer_gives_one_moment_per_slot() {
        let start = Instant::now();
        let len = slot_len(10.0);
        let mut pacer = Pacer::new(start);
        assert_eq!(pacer.next_close(), None);
        for (k, jitter) in [0.0, 0.999, 0.5, 0.25].into_iter().enumerate() {
            let at = pacer.schedule(start, 10.0, jitter);
            assert_eq!(pacer.next_close(), Some(at));
            let slot = start + len * k as u32;
            assert_eq!(at, slot + len.mul_f64(jitter), "close {k}");
            assert!(slot <= at && at < slot + len, "close {k} outside its slot");
            pacer.clear();
            assert_eq!(pacer.next_close(), None);
        }
    }

    #[test]
    fn pacer_keeps_called_off_slots_used_and_skips_idle_ones() {
        let start = Instant::now();
        let len = slot_len(4.0);
        let mut pacer = Pacer::new(start);
        pacer.schedule(start, 4.0, 0.5);
        // Called off (a re-evaluation found nothing to move), then asked again
        // at once: the next slot, not the same one again.
        pacer.clear();
        assert_eq!(pacer.schedule(start, 4.0, 0.0), start + len);
        // After an idle spell the next slot starts now, with no catching up.
        let later = start + Duration::from_secs(60);
        assert_eq!(pacer.schedule(later, 4.0, 0.0), later);
        assert_eq!(pacer.schedule(later, 4.0, 0.0), later + len);
        // A new rate applies from the next slot given out.
        assert_eq!(pacer.schedule(later, 1.0, 0.0), later + len * 2);
        assert_eq!(pacer.schedule(later, 1.0, 0.0), later + len * 2 + Duration::from_secs(1));
    }

    #[test]
    fn closes_misplaced_tunnels_one_per_slot() {
        const RATE: f64 = 10.0;
        for seed in [1, 2, 3] {
            let fx = Fixture::new("migrate", RATE);
            let start = Instant::now();
            let mut rb = fx.rebalancer(seed, start);
            let on_a = fx.on("a");
            assert!(on_a.len() >= 5, "too few tunnels on a: {}", on_a.len());

            fx.set_health(&[("a", false)]);
            rb.reevaluate(start);
            let closes = fire_until(&mut rb, &fx, start + Duration::from_secs(3600));

            let len = slot_len(RATE);
            let moved: HashSet<usize> = closes.iter().map(|&(_, i)| i).collect();
            assert_eq!(moved, on_a, "seed {seed}: every tunnel on a moved, no other");
            assert_eq!(closes.len(), on_a.len(), "seed {seed}: each moved once");
            for (k, &(at, _)) in closes.iter().enumerate() {
                let slot = start + len * k as u32;
                assert!(slot <= at && at < slot + len, "seed {seed}: close {k} outside slot {k}");
                assert_eq!(slot_of(start, len, at), k as u32);
            }
            let last = closes.last().expect("closes").0;
            assert!(last - start >= len * (on_a.len() as u32 - 1), "seed {seed}: too fast");
            assert!(last - start < len * on_a.len() as u32, "seed {seed}: too slow");
            assert_eq!(rb.pacer.next_close(), None, "seed {seed}: nothing left scheduled");
        }
    }

    #[test]
    fn a_second_change_reevaluates_what_is_misplaced() {
        const RATE: f64 = 10.0;
        for seed in [4, 5, 6] {
            let fx = Fixture::new("migrate", RATE);
            let start = Instant::now();
            let len = slot_len(RATE);
            let mut rb = fx.rebalancer(seed, start);
            let (on_a, on_b) = (fx.on("a"), fx.on("b"));
            assert!(on_a.len() >= 5 && on_b.len() >= 5, "too few tunnels: {} on a, {} on b", on_a.len(), on_b.len());

            fx.set_health(&[("a", false)]);
            rb.reevaluate(start);
            // Three slots in: a comes back, b goes down.
            let middle = start + len * 3;
            let first = fire_until(&mut rb, &fx, middle);
            assert_eq!(first.len(), 3, "seed {seed}: one close per slot before the change");
            assert!(first.iter().all(|(_, i)| on_a.contains(i)), "seed {seed}: {first:?}");

            fx.set_health(&[("a", true), ("b", false)]);
            rb.reevaluate(middle);
            let second = fire_until(&mut rb, &fx, start + Duration::from_secs(3600));

            let moved: HashSet<usize> = second.iter().map(|&(_, i)| i).collect();
            assert_eq!(moved, on_b, "seed {seed}: the tunnels on b move, those left on a stay");
            assert_eq!(second.len(), on_b.len(), "seed {seed}: each moved once");
            // The pacing goes on from the slot it had reached.
            for (k, &(at, _)) in second.iter().enumerate() {
                let slot = middle + len * k as u32;
                assert!(slot <= at && at < slot + len, "seed {seed}: close {k} after the change outside its slot");
            }
        }
    }

    /// The timer may fire before the routing change is seen: each tunnel is
    /// checked again when its turn comes.
    #[test]
    fn a_tunnel_no_longer_misplaced_when_its_turn_comes_stays() {
        let fx = Fixture::new("migrate", 10.0);
        let start = Instant::now();
        let mut rb = fx.rebalancer(10, start);
        let on_b = fx.on("b");

        fx.set_health(&[("a", false)]);
        rb.reevaluate(start);
        fx.set_health(&[("a", true), ("b", false)]);
        let at = rb.pacer.next_close().expect("scheduled");
        rb.close_next(at);
        assert!(fx.asked_to_move().is_empty(), "no tunnel on a moved");
        assert_eq!(rb.pacer.next_close(), None, "the queue of a's tunnels is used up");

        let later = at + Duration::from_millis(10);
        rb.reevaluate(later);
        let closes = fire_until(&mut rb, &fx, later + Duration::from_secs(3600));
        assert_eq!(closes.iter().map(|&(_, i)| i).collect::<HashSet<_>>(), on_b);
        // The slot used by the close that found nothing is not given again.
        assert!(closes[0].0 >= start + slot_len(10.0), "the first close of b's tunnels in the second slot");
    }

    #[test]
    fn keep_closes_nothing_until_migrate_is_back() {
        let fx = Fixture::new("keep", 10.0);
        let start = Instant::now();
        let mut rb = fx.rebalancer(7, start);
        let on_a = fx.on("a");

        fx.set_health(&[("a", false)]);
        rb.reevaluate(start);
        assert_eq!(rb.pacer.next_close(), None, "nothing scheduled under keep");
        assert!(rb.queue.is_empty());
        assert!(fx.asked_to_move().is_empty());

        // A reload to `migrate` (a still down): now they move.
        let later = start + Duration::from_secs(60);
        fx.router
            .update(|old| {
                let next = RoutingTable::new(Arc::new(config("migrate", 10.0)), 2, &fx.metrics).with_health_of(old);
                Ok::<_, ()>((next, ()))
            })
            .expect("swapped");
        rb.reevaluate(later);
        let closes = fire_until(&mut rb, &fx, later + Duration::from_secs(3600));
        let moved: HashSet<usize> = closes.iter().map(|&(_, i)| i).collect();
        assert_eq!(moved, on_a);
        assert_eq!(closes.len(), on_a.len());
        assert!(closes[0].0 >= later && closes[0].0 < later + slot_len(10.0), "the first close in the first slot");
    }

    #[test]
    fn a_tunnel_closed_by_itself_is_skipped_without_losing_the_slot() {
        const RATE: f64 = 10.0;
        let mut fx = Fixture::new("migrate", RATE);
        let start = Instant::now();
        let len = slot_len(RATE);
        let mut rb = fx.rebalancer(8, start);
        let on_a = fx.on("a");

        fx.set_health(&[("a", false)]);
        rb.reevaluate(start);
        // The first two in line close by themselves.
        let index = |t: &TunnelInfo| {
            let id = t.control.upgrade().expect("open").id;
            (0..DEVICES).find(|&i| fx.tunnels[i].as_ref().is_some_and(|r| r.control().id == id)).expect("known")
        };
        let gone: Vec<usize> = rb.queue.iter().take(2).map(index).collect();
        let third = index(&rb.queue[2]);
        for &i in &gone {
            fx.tunnels[i] = None;
        }

        let closes = fire_until(&mut rb, &fx, start + Duration::from_secs(3600));
        assert_eq!(closes[0].1, third, "the first slot's close goes to the next open tunnel");
        let moved: HashSet<usize> = closes.iter().map(|&(_, i)| i).collect();
        let open: HashSet<usize> = on_a.iter().copied().filter(|i| !gone.contains(i)).collect();
        assert_eq!(moved, open);
        assert_eq!(closes.len(), open.len(), "one close per open tunnel, none spent on the closed ones");
        for (k, &(at, _)) in closes.iter().enumerate() {
            let slot = start + len * k as u32;
            assert!(slot <= at && at < slot + len, "close {k} outside slot {k}");
        }
    }

    /// `run` itself, on the real clock: it sees a routing change made right
    /// after it was spawned, moves the tunnels, and stops when told to.
    #[tokio::test]
    async fn run_moves_misplaced_tunnels_and_stops() {
        let fx = Fixture::new("migrate", 1000.0);
        let on_a = fx.on("a");
        let (stop_tx, stop_rx) = watch::channel(false);
        let running = tokio::spawn(fx.rebalancer(9, Instant::now()).run(stop_rx));

        fx.set_health(&[("a", false)]);
        for &i in &on_a {
            let control = Arc::clone(fx.tunnels[i].as_ref().expect("open").control());
            tokio::time::timeout(Duration::from_secs(30), control.migration_requested())
                .await
                .expect("the tunnel was asked to move");
        }
        stop_tx.send(true).expect("running");
        tokio::time::timeout(Duration::from_secs(30), running).await.expect("stopped").expect("no panic");
        let moved: HashSet<usize> = fx.asked_to_move().into_iter().collect();
        assert_eq!(moved, on_a, "only the tunnels on a moved");
    }
}
