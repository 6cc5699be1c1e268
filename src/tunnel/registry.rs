//! The live registry of open WebSocket tunnels: device ID → the backends
//! holding its sockets.
//!
//! Consistent hashing alone has a hole: after a ring change, a device's
//! socket stays open on its old owner while its HTTP requests go to the new
//! one, which has no socket. So while a device has a tunnel open through
//! this proxy, its HTTP requests follow the tunnel ([`TunnelRegistry::holder`]),
//! and [`super::rebalance`] moves misplaced tunnels to their new owner.
//!
//! The map is split into shards, each behind its own mutex, picked by the
//! device ID's CRC-32, so tunnels opening and closing on different devices
//! rarely meet. With no tunnel open at all, the HTTP hot path skips it with
//! one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Instant, SystemTime};

use tokio::sync::{watch, Notify};

use crate::routing::{Backend, RoutingTable};

const SHARDS: usize = 64;

type Shard = HashMap<Box<[u8]>, Vec<Entry>>;

/// Open tunnels by device.
#[derive(Debug)]
pub struct TunnelRegistry {
    shards: Box<[Mutex<Shard>]>,
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Counts registrations: requests waiting for a device's socket to
    /// show up wake on it.
    registered: watch::Sender<u64>,
}

/// One open tunnel.
#[derive(Debug, Clone)]
struct Entry {
    backend: Arc<Backend>,
    control: Arc<TunnelControl>,
}

/// How the rest of the proxy reaches one tunnel.
#[derive(Debug)]
pub struct TunnelControl {
    /// Unique among this proxy's tunnels.
    pub id: u64,
    /// When the tunnel was registered (monotonic).
    pub opened: Instant,
    /// When the tunnel was registered (wall clock, for the admin API).
    pub opened_at: SystemTime,
    /// What the tunnel has been asked ([`ASKED_MIGRATE`], [`ASKED_SHUTDOWN`]
    /// bits), and the wake-up of the session waiting for it: one word and
    /// one waiter for both questions, since an idle tunnel's session keeps
    /// its wait open for the tunnel's whole life.
    asked: AtomicU8,
    notify: Notify,
}

const ASKED_MIGRATE: u8 = 1;
const ASKED_SHUTDOWN: u8 = 2;

/// What the rest of the proxy asked a tunnel to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Move: close with 1012 so the device reconnects to its new owner.
    Migrate,
    /// Close with 1001: the proxy is shutting down.
    Shutdown,
}

impl TunnelControl {
    /// Asks the tunnel to move: it closes with 1012 and the device reconnects.
    pub fn migrate(&self) {
        self.ask(ASKED_MIGRATE);
    }

    /// Asks the tunnel to close (1001) because the proxy is shutting down.
    pub fn shut_down(&self) {
        self.ask(ASKED_SHUTDOWN);
    }

    fn ask(&self, what: u8) {
        self.asked.fetch_or(what, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// What has been asked so far, if anything; a shutdown wins over a move.
    pub fn asked(&self) -> Option<Ask> {
        let asked = self.asked.load(Ordering::Acquire);
        if asked & ASKED_SHUTDOWN != 0 {
            Some(Ask::Shutdown)
        } else if asked & ASKED_MIGRATE != 0 {
            Some(Ask::Migrate)
        } else {
            None
        }
    }

    /// Resolves once the tunnel has been asked something, with what.
    pub async fn requested(&self) -> Ask {
        loop {
            // Registered before the flag is read, so an ask between the
            // two still wakes this wait.
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(ask) = self.asked() {
                return ask;
            }
            notified.await;
        }
    }

    /// Resolves once [`TunnelControl::migrate`] has been called.
    pub async fn migration_requested(&self) {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.asked.load(Ordering::Acquire) & ASKED_MIGRATE != 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A tunnel as seen from outside: for the admin API and the rebalancer.
#[derive(Debug, Clone)]
pub struct TunnelInfo {
    /// The device ID.
    pub device: Box<[u8]>,
    /// The backend holding its socket.
    pub backend: Arc<Backend>,
    /// Reaches the tunnel while it is open.
    pub control: Weak<TunnelControl>,
    /// When it opened (monotonic).
    pub opened: Instant,
    /// When it opened (wall clock).
    pub opened_at: SystemTime,
}

/// Keeps a tunnel registered; dropping it (the tunnel ended) removes it.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<TunnelRegistry>,
    device: Box<[u8]>,
    control: Arc<TunnelControl>,
}

impl Registration {
    /// How the rest of the proxy reaches this tunnel.
    pub fn control(&self) -> &Arc<TunnelControl> {
        &self.control
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shard = self.registry.shard(&self.device);
        if let Some(list) = shard.get_mut(&self.device) {
            list.retain(|e| e.control.id != self.control.id);
            if list.is_empty() {
                shard.remove(&self.device);
            }
        }
        self.registry.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for TunnelRegistry {
    fn default() -> Self {
        TunnelRegistry::new()
    }
}

impl TunnelRegistry {
    /// An empty registry.
    pub fn new() -> TunnelRegistry {
        TunnelRegistry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            registered: watch::channel(0).0,
        }
    }

    fn shard(&self, device: &[u8]) -> MutexGuard<'_, Shard> {
        let i = crc32fast::hash(device) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a tunnel of `device` to `backend`, open until the returned
    /// registration is dropped.
    pub fn register(self: &Arc<Self>, device: &[u8], backend: &Arc<Backend>) -> Registration {
        let control = Arc::new(TunnelControl {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            opened: Instant::now(),
            opened_at: SystemTime::now(),
            asked: AtomicU8::new(0),
            notify: Notify::new(),
        });
        let entry = Entry { backend: Arc::clone(backend), control: Arc::clone(&control) };
        self.shard(device).entry(device.into()).or_default().push(entry);
        self.open.fetch_add(1, Ordering::Relaxed);
        self.registered.send_modify(|n| *n = n.wrapping_add(1));
        Registration { registry: Arc::clone(self), device: device.into(), control }
    }

    /// Fires after every registration (of any device).
    pub fn subscribe_registrations(&self) -> watch::Receiver<u64> {
        self.registered.subscribe()
    }

    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The backend holding the device's newest tunnel, unless an active
    /// check found it down: where the device's HTTP requests go. (A
    /// draining backend, or one down by failed traffic alone, still holds
    /// the socket, so it still gets them.)
    pub fn holder(&self, device: &[u8], table: &RoutingTable) -> Option<Arc<Backend>> {
        if self.open() == 0 {
            return None;
        }
        let shard = self.shard(device);
        let newest = shard.get(device)?.iter().rev().find(|e| table.keeps_tunnels(&e.backend.id) != Some(false))?;
        Some(Arc::clone(&newest.backend))
    }

    /// The device's open tunnels, oldest first.
    pub fn tunnels_of(&self, device: &[u8]) -> Vec<TunnelInfo> {
        let shard = self.shard(device);
        shard.get(device).map_or_else(Vec::new, |list| list.iter().map(|e| info(device, e)).collect())
    }

    /// Every open tunnel (each shard locked only while it is copied).
    pub fn all(&self) -> Vec<TunnelInfo> {
        let mut out = Vec::with_capacity(self.open());
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            out.extend(shard.iter().flat_map(|(device, list)| list.iter().map(|e| info(device, e))));
        }
        out
    }

    /// Tunnels whose device would now be routed elsewhere.
    pub fn misplaced(&self, table: &RoutingTable) -> Vec<TunnelInfo> {
        self.all().into_iter().filter(|t| is_misplaced(t, table)).collect()
    }
}

fn info(device: &[u8], e: &Entry) -> TunnelInfo {
    TunnelInfo {
        device: device.into(),
        backend: Arc::clone(&e.backend),
        control: Arc::downgrade(&e.control),
        opened: e.control.opened,
        opened_at: e.control.opened_at,
    }
}

/// A tunnel is misplaced when a new connection of its device would go to
/// another backend (its ring owner, or that owner's failover while it is
/// down). A draining backend's tunnels are not: draining has its own
/// deadline, `routing.drain_timeout`. Nor are those of a backend down by
/// failed traffic alone: the tunnels are alive, and only an active check
/// moves them.
pub fn is_misplaced(tunnel: &TunnelInfo, table: &RoutingTable) -> bool {
    if table.draining_since(&tunnel.backend.id).is_some() || table.is_down_by_traffic(&tunnel.backend.id) {
        return false;
    }
    table.home(&tunnel.device).is_some_and(|home| home.id != tunnel.backend.id)
}

#[cfg(test)]
mod tests {
    //! The asks a tunnel gets, through its one wait.

    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn control() -> TunnelControl {
        TunnelControl {
            id: 1,
            opened: Instant::now(),
            opened_at: SystemTime::now(),
            asked: AtomicU8::new(0),
            notify: Notify::new(),
        }
    }

    #[test]
    fn an_ask_wakes_the_wait_and_a_shutdown_wins() {
        let control = control();
        let mut waiting = pin!(control.requested());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending(), "nothing asked yet");
        control.migrate();
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(Ask::Migrate));
        control.shut_down();
        assert_eq!(control.asked(), Some(Ask::Shutdown), "a shutdown wins over a move");
    }

    #[test]
    fn an_ask_before_the_wait_is_not_lost() {
        let control = control();
        control.shut_down();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(pin!(control.requested()).poll(&mut cx), Poll::Ready(Ask::Shutdown));
        // The move was not asked: its wait stays pending.
        assert!(pin!(control.migration_requested()).poll(&mut cx).is_pending());
    }

    #[test]
    fn every_waiter_hears_a_move() {
        let control = control();
        let mut cx = Context::from_waker(Waker::noop());
        let mut session = pin!(control.requested());
        let mut watcher = pin!(control.migration_requested());
        assert!(session.as_mut().poll(&mut cx).is_pending());
        assert!(watcher.as_mut().poll(&mut cx).is_pending());
        control.migrate();
        assert_eq!(session.as_mut().poll(&mut cx), Poll::Ready(Ask::Migrate));
        assert_eq!(watcher.as_mut().poll(&mut cx), Poll::Ready(()));
    }
}
