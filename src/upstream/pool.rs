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

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use tracing::debug;

use super::connector::{Connector, Endpoint};
use super::error::UpstreamFailure;
use crate::http::UpstreamBody;

/// Idle connections by backend address.
pub(crate) struct Pool {
    idle: Mutex<HashMap<Box<str>, Vec<Idle>, BuildHasherDefault<Fnv>>>,
    max_idle: usize,
    idle_timeout: Duration,
    connector: Connector,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

impl Pool {
    /// A pool; its idle connections are swept every `idle_timeout` (within
    /// 0.1 to 30 s) by a task that ends with the pool. Call inside a runtime.
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration, connector: Connector) -> Arc<Pool> {
        let pool = Arc::new(Pool { idle: Mutex::new(HashMap::default()), max_idle, idle_timeout, connector });
        let every = idle_timeout.clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(sweep(Arc::downgrade(&pool), every));
        pool
    }

    /// Sends `request` (origin-form URI) to `address`: on an idle pooled
    /// connection if there is one, else on a new one. Errors say what broke.
    pub(crate) async fn send(
        self: &Arc<Self>,
        to: Endpoint<'_>,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamFailure> {
        // A plain backend's key is its address as it is (no allocation).
        let key = crate::tls::authority(to.address, to.tls);
        let key: &str = &key;
        loop {
            let (mut sender, reused) = match self.checkout(key) {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS included) is a large future that
                // every request would otherwise carry and copy around.
                None => (Box::pin(self.connect(to)).await?, false),
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
                    _ => return Err(UpstreamFailure::classify(&e.into_error(), false)),
                },
            }
        }
    }

    /// The most recently used idle connection to `address` that is still
    /// open and ready; closed and expired ones met on the way are dropped.
    fn checkout(&self, address: &str) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.lock();
        let list = idle.get_mut(address)?;
        while let Some(entry) = list.pop() {
            if entry.sender.is_ready() && entry.since.elapsed() < self.idle_timeout {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Returns a connection to the pool once it can take the next request.
    fn give_back(self: &Arc<Self>, address: &str, mut sender: SendRequest<UpstreamBody>) {
        if self.max_idle == 0 || sender.is_closed() {
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

    fn put(&self, address: &str, sender: SendRequest<UpstreamBody>) {
        let entry = Idle { sender, since: Instant::now() };
        let mut idle = self.lock();
        match idle.get_mut(address) {
            Some(list) if list.len() < self.max_idle => list.push(entry),
            Some(_) => {} // full: the connection closes as `entry` drops
            None => {
                idle.insert(address.into(), vec![entry]);
            }
        }
    }

    /// A new connection from the connector; its connection task runs
    /// until the last sender is gone.
    async fn connect(&self, to: Endpoint<'_>) -> Result<SendRequest<UpstreamBody>, UpstreamFailure> {
        let (sender, connection) = self.connector.http1(to).await?;
        let address = to.address.to_string();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(address, "backend connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Drops idle connections that expired or closed.
    fn sweep(&self) {
        let mut idle = self.lock();
        idle.retain(|_, list| {
            list.retain(|entry| !entry.sender.is_closed() && entry.since.elapsed() < self.idle_timeout);
            !list.is_empty()
        });
    }

    /// Idle connections to `address` now (for tests).
    #[cfg(test)]
    fn idle_count(&self, address: &str) -> usize {
        self.lock().get(address).map_or(0, Vec::len)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Vec<Idle>, BuildHasherDefault<Fnv>>> {
        // Every critical section leaves the map consistent.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Full};

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

        let pool = Pool::new(1, Duration::from_secs(60), Connector::new(Duration::from_secs(3)));
        for _ in 0..3 {
            let response = pool.send(plain(&address), get("/whoami")).await.expect("response");
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
        let (a, b) =
            tokio::join!(pool.send(plain(&address), get("/delay/50")), pool.send(plain(&address), get("/delay/50")));
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
        let short = Pool::new(4, Duration::ZERO, Connector::new(Duration::from_secs(3)));
        let response = short.send(plain(&address), get("/whoami")).await.expect("response");
        response.into_body().collect().await.expect("body");
        assert!(short.checkout(&address).is_none(), "expired connections are not handed out");
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let pool = Pool::new(4, Duration::from_secs(60), Connector::new(Duration::from_secs(3)));
        let failure = pool.send(plain(&address), get("/")).await.expect_err("nothing listens");
        assert!(failure.is_connect(), "{failure:?}");
    }
}
