//! The wiring: the only module that knows every part. [`start`] builds the
//! routing table, health, the tunnel registry, the rebalancer, the
//! reloader and the proxy, binds the listeners and spawns their accept
//! loops; [`RunningProxy::shutdown`] stops in three steps: stop accepting,
//! let in-flight HTTP finish within `server.shutdown_grace`, then close
//! whatever is left, WebSocket tunnels included. [`run`] adds the signals.
//!
//! With `server.runtime = "thread-per-core"` and more than one worker, the
//! proxy's listeners are bound once per worker with `SO_REUSEPORT`, and each
//! worker thread runs a current-thread runtime of its own that accepts on
//! its listeners and proxies with a pool of its own, so a connection is
//! served start to finish on the thread that accepted it. The routing
//! snapshot, tunnel registry, metrics, `server.max_connections` and the
//! shutdown signals are shared; the admin API, health checks, reloads,
//! discovery and the rebalancer run on the runtime `start` is called on.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Version};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::http::headers::Client;
use crate::metrics::Metrics;
use crate::ops::admin::{self, AdminState};
use crate::ops::reload::{Reloader, Trigger};
use crate::proxy::{DeliveryLog, Proxy};
use crate::routing::{Router, RoutingTable};
use crate::server::{bind, bind_shared, Connections, Transport};
use crate::tls::PickCertificate;
use crate::tunnel::rebalance::Rebalancer;
use crate::tunnel::TunnelRegistry;
use crate::upstream::Health;
use crate::util::shutdown::raised;

/// How long tunnels and leftover connections get to close after the grace.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A proxy that is serving; dropping it leaves it running until the runtime stops.
pub struct RunningProxy {
    proxy_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    router: Router,
    reloader: Arc<Reloader>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    tunnels: Arc<TunnelRegistry>,
    /// Set when shutdown begins: `/readyz` answers 503 and HTTP/1.1
    /// responses carry `Connection: close`.
    stopping: Arc<AtomicBool>,
    /// `true`: stop accepting and finish in-flight HTTP.
    drain: watch::Sender<bool>,
    /// `true`: close everything still open, tunnels included.
    close: watch::Sender<bool>,
    /// Thread-per-core workers, if they serve the proxy's listeners.
    workers: Option<Workers>,
}

/// Binds the listeners named in `config` and starts serving. Without a
/// `path` the config can't be reloaded (the demo's embedded config).
pub async fn start(config: &Config) -> io::Result<RunningProxy> {
    start_inner(config.clone(), None).await
}

/// Like [`start`], for a config loaded from `path`: reloads re-read it, and
/// it is watched for changes.
pub async fn start_from_file(config: Config, path: PathBuf) -> io::Result<RunningProxy> {
    start_inner(config, Some(path)).await
}

async fn start_inner(config: Config, path: Option<PathBuf>) -> io::Result<RunningProxy> {
    let listeners = if config.server.thread_per_core() {
        let n = config.server.workers;
        let plain = bind_shared(config.server.listen, "server.listen", n)?;
        let tls: Vec<_> = match &config.server.tls {
            Some(tls) => bind_shared(tls.listen, "server.tls.listen", n)?.into_iter().map(Some).collect(),
            None => (0..n).map(|_| None).collect(),
        };
        Listeners::Workers(plain.into_iter().zip(tls).collect())
    } else {
        let tls = match &config.server.tls {
            Some(tls) => Some(bind(tls.listen, "server.tls.listen").await?),
            None => None,
        };
        Listeners::Main(bind(config.server.listen, "server.listen").await?, tls)
    };
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let metrics = Arc::new(Metrics::new());
    let config = Arc::new(config);
    let router = RoutingTable::new(Arc::clone(&config), 1, &metrics).into_router();
    metrics.loaded_now();
    router.load().publish_states(&metrics);
    let reloader = Arc::new(Reloader::new(path, router.clone(), Arc::clone(&metrics)));
    let (drain, _) = watch::channel(false);
    let (close, _) = watch::channel(false);
    let health = Health::new(router.clone(), Arc::clone(&metrics));
    let tunnels = Arc::new(TunnelRegistry::new());
    let deliveries = Arc::new(DeliveryLog::default());
    let proxy = Arc::new(Proxy::new(
        router.clone(),
        &config.upstream,
        Arc::clone(&metrics),
        Arc::clone(&health),
        close.subscribe(),
        Arc::clone(&tunnels),
        Arc::clone(&deliveries),
    ));

    let (proxy_addr, tls_addr) = listeners.addrs()?;
    let mut running = RunningProxy {
        proxy_addr,
        tls_addr,
        admin_addr: admin_listener.local_addr()?,
        router: router.clone(),
        reloader: Arc::clone(&reloader),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        tunnels: Arc::clone(&tunnels),
        stopping: Arc::new(AtomicBool::new(false)),
        drain,
        close,
        workers: None,
    };
    let connections = Connections {
        router: router.clone(),
        metrics: Arc::clone(&metrics),
        drain: running.drain.subscribe(),
        close: running.close.subscribe(),
        slots: config.server.max_connections.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
        in_flight: None,
        worker: 0,
    };
    tokio::spawn(Arc::clone(&reloader).watch_file(running.drain.subscribe()));
    tokio::spawn(crate::ops::discovery::run(
        Arc::clone(&reloader),
        router.clone(),
        Arc::clone(&metrics),
        running.drain.subscribe(),
    ));
    tokio::spawn(health.run(running.drain.subscribe()));
    let rebalancer = Rebalancer::new(router.clone(), Arc::clone(&tunnels), Arc::clone(&metrics));
    tokio::spawn(rebalancer.run(running.drain.subscribe()));
    // Freed memory of connection bursts back to the OS (glibc keeps it).
    tokio::spawn(crate::util::memory::trim_after_bursts(running.drain.subscribe()));

    // `proto` says how the client came: X-Forwarded-Proto.
    let stopping = Arc::clone(&running.stopping);
    let proxy_service = move |proxy: Arc<Proxy>, proto: &'static str| {
        let stopping = Arc::clone(&stopping);
        move |addr: SocketAddr| {
            let (proxy, stopping) = (proxy.clone(), Arc::clone(&stopping));
            let client = Arc::new(Client::new(addr, proto));
            move |req: Request<Incoming>| {
                let (proxy, client, stopping) = (proxy.clone(), Arc::clone(&client), Arc::clone(&stopping));
                async move {
                    let http1 = req.version() < Version::HTTP_2;
                    let mut response = proxy.handle(req, client).await;
                    // Shutting down: keep-alive clients move to another replica.
                    if http1 && stopping.load(Ordering::Relaxed) && response.status() != StatusCode::SWITCHING_PROTOCOLS
                    {
                        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                }
            }
        }
    };
    // Every handshake failure series exists at 0, with or without a TLS
    // listener (one may come with a restart), so dashboards need no `or`.
    metrics.tls_listener_started(&crate::tls::HANDSHAKE_FAILURE_REASONS);
    let acceptor = match &config.server.tls {
        Some(_) => {
            // Each handshake's certificate comes from the config in use, so a
            // reload swaps certificates with everything else.
            let live = router.clone();
            let pick: PickCertificate =
                Box::new(move |name| live.load().config().server.tls.as_ref()?.certificates.pick(name));
            Some(crate::tls::acceptor(pick).map_err(io::Error::other)?)
        }
        None => None,
    };
    match listeners {
        Listeners::Main(plain, tls) => {
            if let (Some(listener), Some(acceptor)) = (tls, acceptor) {
                let service = proxy_service(Arc::clone(&proxy), "https");
                tokio::spawn(connections.clone().accept_loop(listener, Transport::Tls(acceptor), service));
            }
            let service = proxy_service(Arc::clone(&proxy), "http");
            tokio::spawn(connections.clone().accept_loop(plain, Transport::Plain, service));
        }
        Listeners::Workers(listeners) => {
            let n = listeners.len();
            // The workers end when this sender goes: after `shutdown`, or
            // with the runtime driving this task.
            let (stop, stopped) = watch::channel(());
            let mut ready = Vec::with_capacity(n);
            let mut exited = Vec::with_capacity(n);
            for (worker, (plain, tls)) in listeners.into_iter().enumerate() {
                let (ready_tx, ready_rx) = oneshot::channel();
                let (exited_tx, exited_rx) = oneshot::channel::<()>();
                let template = Arc::clone(&proxy);
                let upstream = config.upstream.clone();
                let connections = Connections { worker, ..connections.clone() };
                let (tls, mut stopped) = (tls.zip(acceptor.clone()), stopped.clone());
                let service = proxy_service.clone();
                // A current-thread runtime per worker: its connections, their
                // requests and its pool's backend connections never leave it.
                let serve = move || {
                    // Dropped last, after the runtime: the worker is gone.
                    let _exited = exited_tx;
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(e) => return drop(ready_tx.send(Err(e))),
                    };
                    runtime.block_on(async move {
                        let listeners =
                            (TcpListener::from_std(plain), tls.map(|(l, a)| Ok((TcpListener::from_std(l)?, a))));
                        let (plain, tls) = match listeners {
                            (Ok(plain), None) => (plain, None),
                            (Ok(plain), Some(Ok(tls))) => (plain, Some(tls)),
                            (Err(e), _) | (_, Some(Err(e))) => return drop(ready_tx.send(Err(e))),
                        };
                        let proxy = Arc::new(template.for_worker(&upstream, worker, n));
                        drop(template);
                        if let Some((listener, acceptor)) = tls {
                            let service = service(Arc::clone(&proxy), "https");
                            tokio::spawn(connections.clone().accept_loop(listener, Transport::Tls(acceptor), service));
                        }
                        tokio::spawn(connections.accept_loop(plain, Transport::Plain, service(proxy, "http")));
                        let _ = ready_tx.send(Ok(()));
                        // Ok or Err: either way the sender is done with.
                        let _ = stopped.changed().await;
                    });
                    // Dropping the runtime drops what is left of its tasks:
                    // by now `shutdown` has closed them.
                };
                std::thread::Builder::new().name(format!("sticky-worker-{worker}")).spawn(serve)?;
                ready.push(ready_rx);
                exited.push(exited_rx);
            }
            for ready in ready {
                ready.await.unwrap_or_else(|_| Err(io::Error::other("a worker thread ended as it started")))?;
            }
            let (done, until_done) = oneshot::channel::<()>();
            tokio::spawn(async move {
                let _stop = stop;
                // RunningProxy dropped without `shutdown`: serve on until
                // this runtime stops.
                if until_done.await.is_err() {
                    std::future::pending::<()>().await;
                }
            });
            running.workers = Some(Workers { done, exited });
        }
    }
    let stopping = Arc::clone(&running.stopping);
    let admin_state = AdminState { router, reloader, metrics, tunnels, deliveries, stopping };
    let admin_service = move |_addr: SocketAddr| {
        let state = admin_state.clone();
        move |req: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(admin::handle(req, &state).await) }
        }
    };
    tokio::spawn(connections.accept_loop(admin_listener, Transport::Http1, admin_service));

    info!(
        listen = %running.proxy_addr,
        admin = %running.admin_addr,
        backends = config.backends.len(),
        workers = config.server.workers,
        runtime = match config.server.runtime {
            _ if config.server.workers == 1 => "current-thread",
            crate::config::Runtime::ThreadPerCore => "thread-per-core",
            crate::config::Runtime::WorkStealing => "work-stealing",
        },
        "sticky-proxy serving"
    );
    Ok(running)
}

/// The proxy's listeners (cleartext, and TLS if configured): on the
/// runtime `start` runs on, or one pair per thread-per-core worker.
enum Listeners {
    Main(TcpListener, Option<TcpListener>),
    Workers(Vec<(std::net::TcpListener, Option<std::net::TcpListener>)>),
}

impl Listeners {
    /// The cleartext and TLS addresses, ports resolved.
    fn addrs(&self) -> io::Result<(SocketAddr, Option<SocketAddr>)> {
        match self {
            Listeners::Main(plain, tls) => {
                Ok((plain.local_addr()?, tls.as_ref().map(TcpListener::local_addr).transpose()?))
            }
            Listeners::Workers(pairs) => {
                let (plain, tls) = pairs.first().ok_or_else(|| io::Error::other("no worker listeners"))?;
                Ok((plain.local_addr()?, tls.as_ref().map(std::net::TcpListener::local_addr).transpose()?))
            }
        }
    }
}

/// The running workers' handles, for `shutdown`.
struct Workers {
    /// Sent (or dropped) once everything is closed: the workers stop.
    done: oneshot::Sender<()>,
    /// Each resolves as its worker's thread ends.
    exited: Vec<oneshot::Receiver<()>>,
}

impl RunningProxy {
    /// The proxy listener's address (`server.listen`, its port resolved).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The TLS listener's address, if `[server.tls]` is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The admin API's address (`admin.listen`, its port resolved).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The live routing table, swapped by reloads.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// What reloads the config (SIGHUP, `POST /reload`, the file watcher).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// The process's metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Backend health: active checks and failures on real traffic.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The open tunnels, by device.
    pub fn tunnels(&self) -> &Arc<TunnelRegistry> {
        &self.tunnels
    }

    /// Shuts down without losing what is in flight:
    ///
    /// 1. `/readyz` turns 503 at once, and for `server.shutdown_delay` the
    ///    proxy goes on serving, with `Connection: close` on HTTP/1.1
    ///    responses, while load balancers take it out of rotation;
    /// 2. it stops accepting; in-flight HTTP (held redeliveries included)
    ///    gets up to `server.shutdown_grace` to finish, and open tunnels are
    ///    closed (1001) paced over most of that grace, so their devices
    ///    reconnect elsewhere in a trickle;
    /// 3. whatever is still open is closed.
    pub async fn shutdown(self) {
        let (grace, delay) = {
            let table = self.router.load();
            (table.config().server.shutdown_grace, table.config().server.shutdown_delay)
        };
        self.stopping.store(true, Ordering::Relaxed);
        if !delay.is_zero() {
            info!(?delay, "shutting down: not ready; serving on for shutdown_delay");
            tokio::time::sleep(delay).await;
        }
        info!(?grace, "shutting down: no new connections, finishing in-flight requests, closing tunnels paced");
        let _ = self.drain.send(true);
        let in_flight = async {
            if tokio::time::timeout(grace, self.drain.closed()).await.is_err() {
                warn!("grace period over with requests still in flight; closing them");
            }
        };
        // Leave a fifth of the grace for the last close handshakes.
        let tunnels = tokio::time::timeout(grace, crate::tunnel::close_paced(&self.tunnels, grace.mul_f64(0.8)));
        let _ = tokio::join!(in_flight, tunnels);
        let _ = self.close.send(true);
        if tokio::time::timeout(CLOSE_TIMEOUT, self.close.closed()).await.is_err() {
            warn!("some connections did not close in time");
        }
        if let Some(workers) = self.workers {
            let _ = workers.done.send(());
            let exited = async {
                for worker in workers.exited {
                    let _ = worker.await;
                }
            };
            if tokio::time::timeout(CLOSE_TIMEOUT, exited).await.is_err() {
                warn!("some workers did not stop in time");
            }
        }
        info!("stopped");
    }
}

/// Serves the config loaded from `path` until SIGINT or SIGTERM, then shuts
/// down gracefully; SIGHUP reloads the file.
pub async fn run(config: Config, path: PathBuf) -> io::Result<()> {
    // Take SIGHUP over before serving: its default action would end the
    // process if an operator reloaded the moment it said it was serving.
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let running = start_from_file(config, path).await?;
    #[cfg(unix)]
    match hangups {
        Ok(hangups) => {
            tokio::spawn(reload_on_sighup(hangups, Arc::clone(&running.reloader), running.drain.subscribe()));
        }
        Err(e) => error!("cannot listen for SIGHUP, reload by signal is off: {e}"),
    }
    wait_for_stop_signal().await;
    running.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn reload_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {
                // The outcome is logged and counted by the reloader itself.
                let _ = reloader.reload_in_background(Trigger::Signal).await;
            }
            _ = raised(&mut stop) => return,
        }
    }
}

async fn wait_for_stop_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => info!("SIGINT received"),
        _ = terminate => info!("SIGTERM received"),
    }
}
