//! Redelivery: what happens when an app instance answers a device's request
//! with "not here" (`routing.not_here.status`, 421 by default).
//!
//! During a transition (a ring change rolled out to one replica before
//! another, a device reconnecting, a proxy restarting) the only party that
//! knows where a device's socket is, is the instance holding it. So a
//! not-here answer sends the request on through the device's redelivery
//! walk ([`crate::routing::RoutingTable::redelivery_candidates`]): the
//! backend of its open tunnel here, its ring owner even if draining, then
//! the next backends in ring order, up to `candidates`. When every one of
//! them said not-here, the request is held until a tunnel of the device
//! registers on this replica, the routing table changes, or a backoff
//! timer fires, and walks again, until `retry_for` after it arrived. Then
//! the last not-here answer goes to the client unchanged.
//!
//! Held requests are capped (`max_held`, 503 past it) and end when open
//! connections must close at shutdown. The last redelivery of each device
//! is remembered (a bounded log) for the admin API.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::tunnel::TunnelRegistry;
use crate::util::shutdown::raised;

/// Devices whose last redelivery is remembered for the admin API.
const LOG_CAPACITY: usize = 4096;
/// The first wait of a held request; it doubles up to [`MAX_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two walks of a held request.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How a request that met a not-here answer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redelivery {
    /// `delivered`, `gave_up` or `refused` (too many requests held).
    pub(crate) outcome: &'static str,
    /// Sends made, the first included.
    pub(crate) tries: u32,
    /// The backend that answered last.
    pub(crate) backend: String,
    /// From arrival to the answer.
    pub(crate) took: Duration,
    /// When it ended (wall clock).
    pub(crate) at: SystemTime,
}

/// The last redelivery of recently redelivered devices, oldest forgotten first.
#[derive(Debug, Default)]
pub(crate) struct DeliveryLog {
    inner: Mutex<LogInner>,
}

#[derive(Debug, Default)]
struct LogInner {
    last: HashMap<Box<[u8]>, Redelivery>,
    order: VecDeque<Box<[u8]>>,
}

impl DeliveryLog {
    /// Remembers how `device`'s request ended.
    pub(crate) fn record(&self, device: &[u8], redelivery: Redelivery) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.last.insert(device.into(), redelivery).is_none() {
            inner.order.push_back(device.into());
            while inner.order.len() > LOG_CAPACITY {
                if let Some(oldest) = inner.order.pop_front() {
                    inner.last.remove(&oldest);
                }
            }
        }
    }

    /// How `device`'s last redelivered request ended, if it is remembered.
    pub(crate) fn last(&self, device: &[u8]) -> Option<Redelivery> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).last.get(device).cloned()
    }
}

/// Counts requests held at once; a slot is given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct HeldCount(AtomicUsize);

/// One held request's place under the cap.
pub(crate) struct HeldSlot<'a>(&'a HeldCount);

impl HeldCount {
    /// A slot, unless `max` requests are held already.
    pub(crate) fn try_hold(&self, max: usize) -> Option<HeldSlot<'_>> {
        let taken = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        taken.ok().map(|_| HeldSlot(self))
    }

    /// Requests held now.
    pub(crate) fn now(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for HeldSlot<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a held request woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A tunnel of the device registered on this replica.
    TunnelOpened,
    /// The routing table changed (reload, health, drain).
    RoutingChanged,
    /// The backoff timer fired.
    Backoff,
    /// `retry_for` has passed, or the proxy is closing: give up.
    GiveUp,
}

/// What a held request waits on.
pub(crate) struct Waiter {
    registrations: watch::Receiver<u64>,
    routing: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    backoff: Duration,
    /// The senders are alive (they live as long as the proxy; once gone,
    /// their branch is off rather than firing in a loop).
    registrations_alive: bool,
    routing_alive: bool,
}

impl Waiter {
    /// Subscribes now, so that nothing that happens from here on is missed.
    pub(crate) fn new(
        registry: &TunnelRegistry,
        routing: watch::Receiver<u64>,
        closing: watch::Receiver<bool>,
    ) -> Waiter {
        let mut registrations = registry.subscribe_registrations();
        registrations.mark_unchanged();
        let mut routing = routing;
        routing.mark_unchanged();
        Waiter {
            registrations,
            routing,
            closing,
            backoff: FIRST_BACKOFF,
            registrations_alive: true,
            routing_alive: true,
        }
    }

    /// Waits for a reason to walk the device's candidates again, until
    /// `deadline`. `has_tunnel` tells whether the device has a tunnel on
    /// this replica now (registrations of other devices don't wake it).
    pub(crate) async fn wait(&mut self, deadline: tokio::time::Instant, has_tunnel: impl Fn() -> bool) -> Wake {
        let backoff =
            tokio::time::sleep(self.backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now())));
        tokio::pin!(backoff);
        let wake = loop {
            tokio::select! {
                changed = self.registrations.changed(), if self.registrations_alive => {
                    match changed {
                        Err(_) => self.registrations_alive = false,
                        Ok(()) if has_tunnel() => break Wake::TunnelOpened,
                        Ok(()) => {}
                    }
                }
                changed = self.routing.changed(), if self.routing_alive => {
                    match changed {
                        Err(_) => self.routing_alive = false,
                        Ok(()) => break Wake::RoutingChanged,
                    }
                }
                _ = &mut backoff => break Wake::Backoff,
                _ = raised(&mut self.closing) => break Wake::GiveUp,
            }
        };
        if wake == Wake::Backoff {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        if tokio::time::Instant::now() >= deadline && wake != Wake::TunnelOpened {
            return Wake::GiveUp;
        }
        wake
    }
}

/// The instant `retry_for` after `arrived`.
pub(crate) fn deadline(arrived: Instant, retry_for: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(arrived + retry_for)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::routing::RoutingTable;

    struct World {
        registry: Arc<TunnelRegistry>,
        routing: watch::Sender<u64>,
        closing: watch::Sender<bool>,
        backend: Arc<crate::routing::Backend>,
    }

    fn world() -> World {
        let text = "[server]\nlisten = \"127.0.0.1:0\"\n[routing]\nkey = [\"header:x-device-id\"]\n\
                    [[backends]]\nid = \"app-1\"\naddress = \"127.0.0.1:1\"\n";
        let table = RoutingTable::offline(&Config::parse(text).expect("config"));
        let backend = Arc::clone(&table.backends()[0]);
        World {
            registry: Arc::new(TunnelRegistry::new()),
            routing: watch::channel(0).0,
            closing: watch::channel(false).0,
            backend,
        }
    }

    fn waiter(w: &World) -> Waiter {
        Waiter::new(&w.registry, w.routing.subscribe(), w.closing.subscribe())
    }

    fn has<'w>(w: &'w World, device: &'static [u8]) -> impl Fn() -> bool + 'w {
        move || !w.registry.tunnels_of(device).is_empty()
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_a_second_and_gives_up_at_the_deadline() {
        let w = world();
        let mut wait = waiter(&w);
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_secs(3);
        let mut woke_at = Vec::new();
        loop {
            let wake = wait.wait(deadline, has(&w, b"d")).await;
            woke_at.push(start.elapsed().as_millis());
            if wake == Wake::GiveUp {
                break;
            }
            assert_eq!(wake, Wake::Backoff);
        }
        // 50, +100, +200, +400, +800, +1000 ms, then cut at the deadline.
        assert_eq!(woke_at, [50, 150, 350, 750, 1550, 2550, 3000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_of_this_device_wakes_it_and_others_do_not() {
        let w = world();
        let mut wait = waiter(&w);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        wait.backoff = Duration::from_secs(10);
        let registry = Arc::clone(&w.registry);
        let backend = Arc::clone(&w.backend);
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let other = registry.register(b"other", &backend);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mine = registry.register(b"d", &backend);
            (other, mine)
        });
        let start = tokio::time::Instant::now();
        assert_eq!(wait.wait(deadline, has(&w, b"d")).await, Wake::TunnelOpened);
        assert_eq!(start.elapsed(), Duration::from_millis(200), "not woken by another device's tunnel");
        drop(opener.await.expect("opener"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_routing_change_wakes_it_and_closing_gives_up() {
        let w = world();
        let mut wait = waiter(&w);
        wait.backoff = Duration::from_secs(10);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        w.routing.send_modify(|n| *n += 1);
        assert_eq!(wait.wait(deadline, has(&w, b"d")).await, Wake::RoutingChanged);
        let _ = w.closing.send(true);
        assert_eq!(wait.wait(deadline, has(&w, b"d")).await, Wake::GiveUp);
    }

    #[tokio::test(start_paused = true)]
    async fn changes_before_the_waiter_existed_do_not_wake_it() {
        let w = world();
        w.routing.send_modify(|n| *n += 1);
        let _early = w.registry.register(b"other", &w.backend);
        let mut wait = waiter(&w);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        assert_eq!(wait.wait(deadline, has(&w, b"d")).await, Wake::Backoff);
    }

    #[test]
    fn the_cap_counts_held_requests() {
        let held = HeldCount::default();
        let a = held.try_hold(2).expect("first");
        let b = held.try_hold(2).expect("second");
        assert!(held.try_hold(2).is_none(), "the third is refused");
        assert_eq!(held.now(), 2);
        drop(a);
        assert!(held.try_hold(2).is_some(), "a slot came back");
        drop(b);
        assert_eq!(held.now(), 0);
    }

    #[test]
    fn the_log_keeps_the_last_of_each_device_and_forgets_the_oldest() {
        let log = DeliveryLog::default();
        let entry = |tries| Redelivery {
            outcome: "delivered",
            tries,
            backend: "app-1".into(),
            took: Duration::ZERO,
            at: SystemTime::UNIX_EPOCH,
        };
        log.record(b"d", entry(2));
        log.record(b"d", entry(3));
        assert_eq!(log.last(b"d").map(|r| r.tries), Some(3));
        for i in 0..LOG_CAPACITY {
            log.record(format!("other-{i}").as_bytes(), entry(1));
        }
        assert_eq!(log.last(b"d"), None, "the oldest device was forgotten");
        assert!(log.last(format!("other-{}", LOG_CAPACITY - 1).as_bytes()).is_some());
    }
}
