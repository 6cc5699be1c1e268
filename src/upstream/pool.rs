//! Keep-alive HTTP/1.1 connections to backends, pooled per address (and,
//! for a TLS backend, per TLS settings: see [`crate::tls::authority`]).
//!
//! A request takes the most recently used idle connection to its backend
//! (or opens one, TLS included where the backend wants it), sends on it, and gives it back as soon as the
//! connection can take the next request: at once when the response arrived
//! whole with its headers, else when its body has been read. At most
//! `upstream.pool_max_idle` idle connections are kept per address, each for
//! at most `upstream.pool_idle_timeout`.
//!
//! A pooled connection the backend closed while it sat idle (a keep-alive
//! race: the backend's idle timeout fired as we picked it) hands the request
//! back unsent, and the request goes out on the next connection, as
//! hyper-util's client does. This pool exists because hyper-util's costs
//! about 4,500 instructions per request for its generic bookkeeping (a
//! SipHash-keyed map of scheme and authority, a boxed future, checkout
//! futures), a tenth of a proxied request (benches/load/profile.sh).
//!
//! With `upstream.max_connections`, at most that many connections are open
//! per key at once, counted from the connect until the connection's task
//! ends (a [`Slot`] lives in that task). A request that finds no idle
//! connection and no free slot waits in a FIFO queue: a connection given
//! back goes to the first waiter before the idle list, and a slot freed by
//! a closing connection lets the first waiter connect. After
//! `upstream.queue_timeout` it fails with
//! [`UpstreamFailure::QueueTimeout`]. Without the limit none of this runs:
//! no count, no queue, no extra lock.
//!
//! Under `server.runtime = "thread-per-core"` each worker has a pool of its
//! own, created on its thread, so a connection's task runs where its
//! requests come from. The limit is then split between the workers'
//! pools (their sum is `upstream.max_connections`, a true upper bound for
//! the process), and a request queues for its own worker's share; a limit
//! below the worker count leaves the workers one shared pool instead.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use tokio::sync::oneshot;
use tracing::debug;

use super::connector::{Connector, Endpoint};
use super::error::UpstreamFailure;
use crate::config::UpstreamConfig;
use crate::http::UpstreamBody;

type Entries = HashMap<Box<str>, Entry, BuildHasherDefault<Fnv>>;

/// Connections by backend address (and TLS settings).
pub(crate) struct Pool {
    entries: Mutex<Entries>,
    max_idle: usize,
    idle_timeout: Duration,
    /// `upstream.max_connections` and `upstream.queue_timeout`, if limited.
    limit: Option<Limit>,
    connector: Connector,
}

/// Connections open to one key at once, and how long a request may wait
/// for one.
#[derive(Debug, Clone, Copy)]
struct Limit {
    /// This pool's share of `upstream.max_connections`.
    max: usize,
    /// `upstream.max_connections` itself, for error messages.
    configured: usize,
    queue_timeout: Duration,
}

/// One key's connections.
#[derive(Default)]
struct Entry {
    idle: Vec<Idle>,
    /// Open connections, idle, busy or connecting (counted only under a
    /// limit).
    open: usize,
    /// Requests waiting for a connection, first come first served (only
    /// under a limit).
    waiters: VecDeque<oneshot::Sender<Grant>>,
}

impl Entry {
    fn is_unused(&self) -> bool {
        self.idle.is_empty() && self.open == 0 && self.waiters.is_empty()
    }
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// What a request waiting under the limit is given.
enum Grant {
    /// A connection given back by another request.
    Idle(SendRequest<UpstreamBody>),
    /// A freed slot: connect.
    Slot(Slot),
}

/// One of a key's `max_connections`: held by a request while it connects,
/// then by the connection's task until the connection ends. Dropping it
/// hands it to the key's first waiter, or frees it.
struct Slot {
    pool: Weak<Pool>,
    key: Box<str>,
    /// False once the count has been settled (freed or handed on).
    held: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            let key = std::mem::take(&mut self.key);
            pool.release(Slot { pool: Weak::clone(&self.pool), key, held: true });
        }
    }
}

/// Gives `grant` to the first waiter still waiting; returns it if none is.
fn hand_over(waiters: &mut VecDeque<oneshot::Sender<Grant>>, mut grant: Grant) -> Option<Grant> {
    while let Some(waiter) = waiters.pop_front() {
        match waiter.send(grant) {
            Ok(()) => return None,
            Err(back) => grant = back,
        }
    }
    Some(grant)
}

/// A request's place in a key's queue. Dropped before it was served (the
/// client went away), it passes on a connection it was given meanwhile.
struct Waiting<'a> {
    pool: &'a Arc<Pool>,
    key: &'a str,
    grant: oneshot::Receiver<Grant>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.grant.close();
        // A slot passes itself on as it drops.
        if let Ok(Grant::Idle(sender)) = self.grant.try_recv() {
            self.pool.put(self.key, sender);
        }
    }
}

impl Pool {
    /// A pool; its idle connections are swept every `idle_timeout` (within
    /// 0.1 to 30 s) by a task that ends with the pool. Call inside a runtime.
    pub(crate) fn new(upstream: &UpstreamConfig, connector: Connector) -> Arc<Pool> {
        Pool::share(upstream, connector, 0, 1)
    }

    /// Pool `worker` of `workers` (one per thread-per-core worker):
    /// `upstream.max_connections` is split between them, the first
    /// `max % workers` taking one more, so that their sum is the limit.
    /// Call only when [`Pool::splits`].
    pub(crate) fn share(upstream: &UpstreamConfig, connector: Connector, worker: usize, workers: usize) -> Arc<Pool> {
        let idle_timeout = upstream.pool_idle_timeout;
        let limit = upstream.max_connections.map(|configured| Limit {
            max: configured / workers + usize::from(worker < configured % workers),
            configured,
            queue_timeout: upstream.queue_timeout,
        });
        let pool = Arc::new(Pool {
            entries: Mutex::new(HashMap::default()),
            max_idle: upstream.pool_max_idle,
            idle_timeout,
            limit,
            connector,
        });
        let every = idle_timeout.clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(sweep(Arc::downgrade(&pool), every));
        pool
    }

    /// `upstream.max_connections`, if set, leaves every one of `workers`
    /// pools at least one connection per backend.
    pub(crate) fn splits(upstream: &UpstreamConfig, workers: usize) -> bool {
        upstream.max_connections.is_none_or(|max| max >= workers)
    }

    /// Sends `request` (origin-form URI) to `address`: on an idle pooled
    /// connection if there is one (unless `fresh`), else on a new one.
    /// Errors say what broke; [`UpstreamFailure::Stale`] when a pooled
    /// connection closed with the request sent and no answer. `fresh` asks
    /// for a new connection, for sending that request again; under
    /// `max_connections` with every slot open, an idle one is used.
    pub(crate) async fn send(
        self: &Arc<Self>,
        to: Endpoint<'_>,
        mut request: Request<UpstreamBody>,
        fresh: bool,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        // A plain backend's key is its address as it is (no allocation).
        let key = crate::tls::authority(to.address, to.tls);
        let key: &str = &key;
        // Under a limit: when waiting for a connection must end.
        let mut deadline = None;
        loop {
            let (mut sender, reused) = match self.limit {
                None => match if fresh { None } else { self.checkout(key) } {
                    Some(sender) => (sender, true),
                    // Boxed: connecting (TLS included) is a large future that
                    // every request would otherwise carry and copy around.
                    None => (Box::pin(self.connect(to, None)).await?, false),
                },
                Some(limit) => match Box::pin(self.checkout_limited(key, limit, fresh, &mut deadline)).await? {
                    Grant::Idle(sender) => (sender, true),
                    Grant::Slot(slot) => (Box::pin(self.connect(to, Some(slot))).await?, false),
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.give_back(key, sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection closed before the request went out:
                    // nothing reached the backend, so try the next one. Each
                    // such connection is dropped, and a new one ends the loop.
                    Some(unsent) if reused => {
                        debug!(key, "pooled connection closed before use: {}", e.into_error());
                        request = unsent;
                    }
                    _ => {
                        let error = e.into_error();
                        return Err(match UpstreamFailure::classify(&error, false) {
                            UpstreamFailure::Broken if reused && closed_under_request(&error) => UpstreamFailure::Stale,
                            failure => failure,
                        });
                    }
                },
            }
        }
    }

    /// The most recently used idle connection to `address` that is still
    /// open and ready; closed and expired ones met on the way are dropped.
    fn checkout(&self, address: &str) -> Option<SendRequest<UpstreamBody>> {
        let mut entries = self.lock();
        self.usable_idle(entries.get_mut(address)?)
    }

    /// Pops `entry`'s most recently used idle connection that is still open
    /// and ready, dropping closed and expired ones met on the way.
    fn usable_idle(&self, entry: &mut Entry) -> Option<SendRequest<UpstreamBody>> {
        while let Some(idle) = entry.idle.pop() {
            if idle.sender.is_ready() && idle.since.elapsed() < self.idle_timeout {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Under `max_connections`: an idle connection, else a free slot to
    /// connect with (the slot first if `fresh`), else the first of either
    /// to come free, waiting in the key's queue until `deadline` (set on
    /// the first wait, `queue_timeout` from then).
    async fn checkout_limited(
        self: &Arc<Self>,
        key: &str,
        limit: Limit,
        fresh: bool,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Result<Grant, UpstreamFailure> {
        let receiver = {
            let mut entries = self.lock();
            let entry = match entries.get_mut(key) {
                Some(entry) => entry,
                None => entries.entry(key.into()).or_default(),
            };
            if fresh && entry.open < limit.max {
                entry.open += 1;
                return Ok(Grant::Slot(Slot { pool: Arc::downgrade(self), key: key.into(), held: true }));
            }
            if let Some(sender) = self.usable_idle(entry) {
                return Ok(Grant::Idle(sender));
            }
            if entry.open < limit.max {
                entry.open += 1;
                return Ok(Grant::Slot(Slot { pool: Arc::downgrade(self), key: key.into(), held: true }));
            }
            // Requests that gave up waiting leave their place behind.
            entry.waiters.retain(|waiter| !waiter.is_closed());
            let (sender, receiver) = oneshot::channel();
            entry.waiters.push_back(sender);
            receiver
        };
        let mut waiting = Waiting { pool: self, key, grant: receiver };
        let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + limit.queue_timeout);
        match tokio::time::timeout_at(deadline, &mut waiting.grant).await {
            Ok(Ok(grant)) => Ok(grant),
            // The pool let go of the queue: only when it is dropped.
            Ok(Err(_)) => Err(UpstreamFailure::Broken),
            Err(_) => {
                // One may have come free just as the time ran out.
                waiting.grant.close();
                match waiting.grant.try_recv() {
                    Ok(grant) => Ok(grant),
                    Err(_) => Err(UpstreamFailure::QueueTimeout { max: limit.configured, waited: limit.queue_timeout }),
                }
            }
        }
    }

    /// A slot's connection has ended (or never opened): the slot goes to
    /// the key's first waiter, else the count goes down.
    fn release(&self, mut slot: Slot) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&*slot.key) else {
            // (Not met: an entry with open connections is kept.) Dropped
            // held, the slot would come back here, under this lock.
            slot.held = false;
            return;
        };
        if let Some(Grant::Slot(mut slot)) = hand_over(&mut entry.waiters, Grant::Slot(slot)) {
            slot.held = false;
            entry.open = entry.open.saturating_sub(1);
        }
    }

    /// Returns a connection to the pool once it can take the next request.
    fn give_back(self: &Arc<Self>, address: &str, mut sender: SendRequest<UpstreamBody>) {
        // Under a limit a waiter may want it even when none are kept idle.
        if (self.max_idle == 0 && self.limit.is_none()) || sender.is_closed() {
            return;
        }
        if sender.is_ready() {
            self.put(address, sender);
            return;
        }
        // The response body is still coming: wait for it in the background
        // (dropped, and the connection closed, if the body fails).
        let (pool, address) = (Arc::downgrade(self), Box::<str>::from(address));
        tokio::spawn(async move {
            if std::future::poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.put(&address, sender);
                }
            }
        });
    }

    /// Keeps a ready connection: for the key's first waiter if there is
    /// one, else idle (if there is room).
    fn put(&self, address: &str, sender: SendRequest<UpstreamBody>) {
        let mut entries = self.lock();
        match entries.get_mut(address) {
            Some(entry) => {
                let sender = if entry.waiters.is_empty() {
                    sender
                } else {
                    match hand_over(&mut entry.waiters, Grant::Idle(sender)) {
                        Some(Grant::Idle(sender)) => sender,
                        _ => return,
                    }
                };
                if entry.idle.len() < self.max_idle {
                    entry.idle.push(Idle { sender, since: Instant::now() });
                } // else full: the connection closes as `sender` drops
            }
            None if self.max_idle > 0 => {
                let idle = vec![Idle { sender, since: Instant::now() }];
                entries.insert(address.into(), Entry { idle, ..Entry::default() });
            }
            None => {}
        }
    }

    /// A new connection from the connector; its connection task runs
    /// until the last sender is gone, holding `slot` (under a limit).
    async fn connect(
        &self,
        to: Endpoint<'_>,
        slot: Option<Slot>,
    ) -> Result<SendRequest<UpstreamBody>, UpstreamFailure> {
        let (sender, connection) = self.connector.http1(to).await?;
        let address = to.address.to_string();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.await {
                debug!(address, "backend connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Drops idle connections that expired or closed.
    fn sweep(&self) {
        let mut entries = self.lock();
        entries.retain(|_, entry| {
            entry.idle.retain(|idle| !idle.sender.is_closed() && idle.since.elapsed() < self.idle_timeout);
            !entry.is_unused()
        });
    }

    /// Idle connections to `address` now (for tests).
    #[cfg(test)]
    fn idle_count(&self, address: &str) -> usize {
        self.lock().get(address).map_or(0, |entry| entry.idle.len())
    }

    /// Open connections to `address` now, under a limit (for tests).
    #[cfg(test)]
    fn open_count(&self, address: &str) -> usize {
        self.lock().get(address).map_or(0, |entry| entry.open)
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Every critical section leaves the map consistent.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether `error` says the connection ended under the request (closed
/// before a whole response head, or reset), rather than that the backend
/// answered something malformed.
fn closed_under_request(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe);
        }
        source = e.source();
    }
    false
}

async fn sweep(pool: Weak<Pool>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// FNV-1a: backend addresses are short, few and not attacker-chosen, so a
/// simple hash beats SipHash here.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Full};
    use hyper::header::HeaderValue;
    use tokio::sync::{watch, Semaphore};
    use tokio::task::JoinHandle;

    fn connector() -> Connector {
        Connector::new(Duration::from_secs(3))
    }

    /// `[upstream]` with these pool settings; `limit`: `max_connections`
    /// and `queue_timeout`.
    fn upstream(max_idle: usize, idle_timeout: Duration, limit: Option<(usize, Duration)>) -> UpstreamConfig {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(60),
            pool_max_idle: max_idle,
            pool_idle_timeout: idle_timeout,
            max_connections: limit.map(|(max, _)| max),
            queue_timeout: limit.map_or(Duration::from_secs(5), |(_, wait)| wait),
            tls_ca: None,
        }
    }

    fn plain(address: &str) -> Endpoint<'_> {
        Endpoint { address, tls: None }
    }

    fn get(path: &str) -> Request<UpstreamBody> {
        let mut request = Request::new(Either::Right(Full::new(Bytes::new())));
        *request.uri_mut() = path.parse().expect("uri");
        request.headers_mut().insert("host", hyper::header::HeaderValue::from_static("test"));
        request
    }

    #[tokio::test]
    async fn connections_are_reused_capped_and_expire() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let app = crate::tools::demo::DemoInstance::spawn("app", listener).expect("demo");
        let address = app.addr().to_string();

        let pool = Pool::new(&upstream(1, Duration::from_secs(60), None), connector());
        for _ in 0..3 {
            let response = pool.send(plain(&address), get("/whoami"), false).await.expect("response");
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, "app");
        }
        // Sequential requests reuse one connection.
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool.idle_count(&address) != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection came back to the pool");

        // Two at once: two connections, but only one (max_idle) is kept.
        let (a, b) = tokio::join!(
            pool.send(plain(&address), get("/delay/50"), false),
            pool.send(plain(&address), get("/delay/50"), false)
        );
        for response in [a, b] {
            response.expect("response").into_body().collect().await.expect("body");
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while pool.idle_count(&address) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a connection came back");
        assert_eq!(pool.idle_count(&address), 1);

        // With no idle time allowed, nothing is handed out again.
        let short = Pool::new(&upstream(4, Duration::ZERO, None), connector());
        let response = short.send(plain(&address), get("/whoami"), false).await.expect("response");
        response.into_body().collect().await.expect("body");
        assert!(short.checkout(&address).is_none(), "expired connections are not handed out");
    }

    /// The workers' shares of `max_connections` add up to it, and a limit
    /// below the worker count is not split.
    #[tokio::test]
    async fn max_connections_is_split_between_workers_pools() {
        for (max, workers) in [(2, 2), (5, 2), (100, 3), (7, 7)] {
            let config = upstream(4, Duration::from_secs(60), Some((max, Duration::from_secs(5))));
            assert!(Pool::splits(&config, workers));
            let shares: Vec<usize> = (0..workers)
                .map(|w| Pool::share(&config, connector(), w, workers).limit.expect("limited").max)
                .collect();
            assert_eq!(shares.iter().sum::<usize>(), max, "{shares:?}");
            assert!(shares.iter().all(|&n| n >= 1 && n <= max.div_ceil(workers)), "{shares:?}");
        }
        assert!(!Pool::splits(&upstream(4, Duration::from_secs(60), Some((1, Duration::from_secs(5)))), 2));
        assert!(Pool::splits(&upstream(4, Duration::from_secs(60), None), 64));
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        drop(listener);
        for limit in [None, Some((1, Duration::from_secs(5)))] {
            let pool = Pool::new(&upstream(4, Duration::from_secs(60), limit), connector());
            let failure = pool.send(plain(&address), get("/"), false).await.expect_err("nothing listens");
            assert!(failure.is_connect(), "{failure:?}");
            // Under a limit the failed connect gave its slot back.
            assert_eq!(pool.open_count(&address), 0);
        }
    }

    /// A backend that holds every request until the test releases it.
    struct HeldBackend {
        address: String,
        /// One permit answers one request.
        release: Arc<Semaphore>,
        /// Requests that have arrived so far.
        arrived: watch::Receiver<usize>,
        /// Connections accepted so far.
        accepted: Arc<AtomicUsize>,
    }

    impl HeldBackend {
        /// `close`: each answer says `Connection: close`.
        async fn start(close: bool) -> HeldBackend {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let address = listener.local_addr().expect("addr").to_string();
            let release = Arc::new(Semaphore::new(0));
            let (arrivals, arrived) = watch::channel(0);
            let arrivals = Arc::new(arrivals);
            let accepted = Arc::new(AtomicUsize::new(0));
            let (gate, count) = (Arc::clone(&release), Arc::clone(&accepted));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let (gate, arrivals) = (Arc::clone(&gate), Arc::clone(&arrivals));
                    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let (gate, arrivals) = (Arc::clone(&gate), Arc::clone(&arrivals));
                        async move {
                            arrivals.send_modify(|n| *n += 1);
                            gate.acquire().await.expect("gate open").forget();
                            let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                            if close {
                                response.headers_mut().insert("connection", HeaderValue::from_static("close"));
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                    );
                }
            });
            HeldBackend { address, release, arrived, accepted }
        }

        async fn until_arrived(&mut self, n: usize) {
            within(&format!("{n} requests at the backend"), self.arrived.wait_for(|&seen| seen >= n))
                .await
                .expect("the backend runs");
        }
    }

    async fn within<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), work)
            .await
            .unwrap_or_else(|_| panic!("still waiting after 20 s: {what}"))
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        within(what, async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    }

    /// Sends a GET and reads its body.
    fn spawn_get(pool: &Arc<Pool>, address: &str) -> JoinHandle<Result<Bytes, UpstreamFailure>> {
        let (pool, address) = (Arc::clone(pool), address.to_string());
        tokio::spawn(async move {
            let response = pool.send(plain(&address), get("/"), false).await?;
            Ok(response.into_body().collect().await.expect("body").to_bytes())
        })
    }

    fn waiting(pool: &Pool, address: &str) -> usize {
        pool.lock().get(address).map_or(0, |entry| entry.waiters.iter().filter(|w| !w.is_closed()).count())
    }

    #[tokio::test]
    async fn at_the_limit_a_request_waits_for_a_connection_given_back() {
        let mut backend = HeldBackend::start(false).await;
        let address = backend.address.clone();
        let pool = Pool::new(&upstream(4, Duration::from_secs(60), Some((2, Duration::from_secs(60)))), connector());

        let first = [spawn_get(&pool, &address), spawn_get(&pool, &address)];
        backend.until_arrived(2).await;
        assert_eq!(pool.open_count(&address), 2);

        // A third waits, and one that gives up leaves nothing behind.
        let quitter = spawn_get(&pool, &address);
        until("the quitter queues", || waiting(&pool, &address) == 1).await;
        quitter.abort();
        assert!(quitter.await.is_err_and(|e| e.is_cancelled()));
        let third = spawn_get(&pool, &address);
        until("the third queues", || waiting(&pool, &address) == 1).await;
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "no connection past the limit");

        // One answer frees a connection: the waiter gets it, no new one.
        backend.release.add_permits(1);
        backend.until_arrived(3).await;
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "the waiter reused a connection");
        backend.release.add_permits(2);
        for request in first.into_iter().chain([third]) {
            let body = within("an answer", request).await.expect("task").expect("response");
            assert_eq!(body, "ok");
        }
        assert_eq!(pool.open_count(&address), 2);
        assert_eq!(waiting(&pool, &address), 0);
    }

    #[tokio::test]
    async fn a_connection_that_closes_frees_its_slot_for_the_first_waiter() {
        let mut backend = HeldBackend::start(true).await;
        let address = backend.address.clone();
        let pool = Pool::new(&upstream(4, Duration::from_secs(60), Some((1, Duration::from_secs(60)))), connector());

        let first = spawn_get(&pool, &address);
        backend.until_arrived(1).await;
        let second = spawn_get(&pool, &address);
        until("the second queues", || waiting(&pool, &address) == 1).await;

        // The answer closes its connection: the waiter connects anew.
        backend.release.add_permits(1);
        backend.until_arrived(2).await;
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
        backend.release.add_permits(1);
        for request in [first, second] {
            assert_eq!(within("an answer", request).await.expect("task").expect("response"), "ok");
        }
        until("the last connection's slot is free", || pool.open_count(&address) == 0).await;
    }

    /// Reads into `pending` until it holds a whole request head; its length,
    /// or `None` if the connection ended first.
    async fn read_head(stream: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<usize> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end + 4);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// A backend that answers one request per connection, keep-alive, and
    /// then closes it: the pooled connection dies while it sits idle.
    #[tokio::test]
    async fn a_pooled_connection_the_backend_closed_is_not_used_and_no_request_fails() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let (closed_tx, mut closed) = watch::channel(0usize);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = read_head(&mut stream, &mut Vec::new()).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                drop(stream);
                closed_tx.send_modify(|n| *n += 1);
            }
        });
        let mut served = 0;
        for limit in [None, Some((1, Duration::from_secs(5)))] {
            let pool = Pool::new(&upstream(4, Duration::from_secs(60), limit), connector());
            for _ in 0..3 {
                served += 1;
                let response =
                    within("an answer", pool.send(plain(&address), get("/"), false)).await.expect("response");
                let body = response.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(body, "ok");
                within("the backend's close", closed.wait_for(|&n| n >= served)).await.expect("backend runs");
            }
            if limit.is_some() {
                // Each dead connection gave its slot back.
                until("the slots are free", || pool.open_count(&address) <= 1).await;
            }
        }
    }

    /// A backend that answers the first request on each connection
    /// keep-alive and, when a second one arrives on it, writes `second`
    /// and closes the connection. Returns its address and the connections
    /// it accepted.
    async fn second_request_backend(second: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let Some(end) = read_head(&mut stream, &mut pending).await else { return };
                    pending.drain(..end);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                    if read_head(&mut stream, &mut pending).await.is_some() {
                        let _ = stream.write_all(second).await;
                    }
                });
            }
        });
        (address, accepted)
    }

    /// A pooled connection the backend closes as the request arrives (the
    /// race of a backend closing an idle connection just as the pool reuses
    /// it, made certain) is `Stale`; `fresh` sends on a new connection.
    #[tokio::test]
    async fn a_pooled_connection_closed_under_a_request_is_stale_and_fresh_gets_a_new_one() {
        let (address, accepted) = second_request_backend(b"").await;
        for limit in [None, Some((1, Duration::from_secs(5)))] {
            accepted.store(0, Ordering::SeqCst);
            let pool = Pool::new(&upstream(4, Duration::from_secs(60), limit), connector());
            let first = within("the first answer", pool.send(plain(&address), get("/"), false)).await;
            let body = first.expect("response").into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, "ok");
            until("the connection is idle", || pool.idle_count(&address) == 1).await;
            let failure = within("the stale answer", pool.send(plain(&address), get("/"), false)).await;
            let failure = failure.expect_err("the backend closed it");
            assert_eq!(failure, UpstreamFailure::Stale, "{limit:?}");
            assert!(failure.retryable(&hyper::Method::GET) && !failure.retryable(&hyper::Method::POST));
            // As a final answer it counts like any connection closed unanswered.
            assert!(failure.counts_against_backend(crate::config::Observe::Responses));
            assert!(!failure.counts_against_backend(crate::config::Observe::Connect));
            let again = within("the resend", pool.send(plain(&address), get("/"), true)).await;
            let body = again.expect("response").into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, "ok");
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "the resend went on a new connection ({limit:?})");
        }
    }

    /// A malformed answer on a reused connection is the backend's doing,
    /// not the keep-alive race: `Broken`, never resent as `Stale`.
    #[tokio::test]
    async fn a_malformed_answer_on_a_pooled_connection_is_not_stale() {
        let (address, _) = second_request_backend(b"HTTP/1.1 abc\r\n\r\n").await;
        let pool = Pool::new(&upstream(4, Duration::from_secs(60), None), connector());
        let first = within("the first answer", pool.send(plain(&address), get("/"), false)).await;
        first.expect("response").into_body().collect().await.expect("body");
        until("the connection is idle", || pool.idle_count(&address) == 1).await;
        let failure = within("the bad answer", pool.send(plain(&address), get("/"), false)).await;
        assert_eq!(failure.expect_err("malformed"), UpstreamFailure::Broken);
    }

    /// Under a limit, connections dropped by the pool itself (expired,
    /// closed, or not kept) give their slots back without deadlocking on
    /// the pool's lock. Multi-threaded, so that a deadlock fails the test
    /// instead of hanging it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_the_pool_drops_under_a_limit_free_their_slots() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let app = crate::tools::demo::DemoInstance::spawn("app", listener).expect("demo");
        let address = app.addr().to_string();
        let idle_timeout = Duration::from_millis(50);
        let scenario = tokio::spawn(async move {
            for max_idle in [0, 1] {
                let pool = Pool::new(&upstream(max_idle, idle_timeout, Some((1, Duration::from_secs(5)))), connector());
                for _ in 0..3 {
                    let response = pool.send(plain(&address), get("/whoami"), false).await.expect("response");
                    response.into_body().collect().await.expect("body");
                    // Past the idle timeout: the next checkout (or the sweep)
                    // drops the idle connection.
                    tokio::time::sleep(idle_timeout * 2).await;
                }
                until("the slot is free", || pool.open_count(&address) == 0).await;
            }
        });
        within("three requests, one slot, connections expiring", scenario).await.expect("no deadlock, no panic");
    }

    /// A backend that answers before it has read the request's body (and
    /// then reads the rest) still gets all of it.
    #[tokio::test]
    async fn an_upload_the_backend_answered_early_is_still_sent_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const UPLOAD: usize = 8 << 20; // more than the socket buffers hold
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let (got_tx, mut got) = watch::channel(Vec::<usize>::new());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let got_tx = got_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut pending = Vec::new();
                    loop {
                        // The head, then the answer at once, then the body.
                        let Some(end) = read_head(&mut stream, &mut pending).await else { return };
                        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                            return;
                        }
                        let mut read = pending.len() - end;
                        pending.clear();
                        while read < length {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => read += n,
                            }
                        }
                        got_tx.send_modify(|got| got.push(read));
                    }
                });
            }
        });
        let pool = Pool::new(&upstream(4, Duration::from_secs(60), None), connector());
        let mut upload = Request::new(Either::Right(Full::new(Bytes::from(vec![b'x'; UPLOAD]))));
        *upload.method_mut() = hyper::Method::POST;
        *upload.uri_mut() = "/upload".parse().expect("uri");
        upload.headers_mut().insert("host", HeaderValue::from_static("test"));
        let response = within("the early answer", pool.send(plain(&address), upload, false)).await.expect("response");
        assert_eq!(response.into_body().collect().await.expect("body").to_bytes(), "ok");
        within("the whole upload at the backend", got.wait_for(|got| got.len() == 1)).await.expect("backend runs");
        assert_eq!(got.borrow()[0], UPLOAD, "the backend got the whole upload");
        // (Whether hyper then keeps the connection depends on which ended
        // first, the upload or the response: not asserted.)
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn past_the_queue_timeout_the_request_fails_and_the_slot_stays_whole() {
        let mut backend = HeldBackend::start(false).await;
        let address = backend.address.clone();
        let queue_timeout = Duration::from_millis(200);
        let pool = Pool::new(&upstream(4, Duration::from_secs(60), Some((1, queue_timeout))), connector());

        let held = spawn_get(&pool, &address);
        backend.until_arrived(1).await;
        let began = Instant::now();
        let failure =
            within("the queue timeout", pool.send(plain(&address), get("/"), false)).await.expect_err("no slot");
        assert!(began.elapsed() >= queue_timeout, "gave up after {:?}", began.elapsed());
        assert_eq!(failure, UpstreamFailure::QueueTimeout { max: 1, waited: queue_timeout });
        assert!(!failure.retryable(&hyper::Method::GET));
        assert!(!failure.counts_against_backend(crate::config::Observe::Responses));
        assert_eq!(failure.metric_kind(), None);

        // The held request finishes; its connection serves the next one.
        backend.release.add_permits(2);
        assert_eq!(within("the held answer", held).await.expect("task").expect("response"), "ok");
        let next = within("the next request", spawn_get(&pool, &address)).await.expect("task");
        assert_eq!(next.expect("response"), "ok");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.open_count(&address), 1);
    }
}
