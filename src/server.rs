//! Listeners, connections and the shutdown sequence.
//!
//! [`start`] binds the proxy and admin listeners and spawns their accept
//! loops; each accepted connection is served by hyper's HTTP/1.1 server in a
//! task of its own. [`RunningProxy::shutdown`] stops in three steps: stop
//! accepting, let in-flight HTTP finish within `server.shutdown_grace`, then
//! close whatever is left, WebSocket tunnels included.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::rebalance::Rebalancer;
use crate::registry::TunnelRegistry;
use crate::reload::{Reloader, Trigger};
use crate::routing::{Router, RoutingTable};

/// How long tunnels and leftover connections get to close after the grace.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after an accept error such as EMFILE, so the loop doesn't spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// A proxy that is serving; dropping it leaves it running until the runtime stops.
pub struct RunningProxy {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    router: Router,
    reloader: Arc<Reloader>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    tunnels: Arc<TunnelRegistry>,
    /// `true`: stop accepting and finish in-flight HTTP.
    drain: watch::Sender<bool>,
    /// `true`: close everything still open, tunnels included.
    close: watch::Sender<bool>,
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
    let proxy_listener = bind(config.server.listen, "server.listen").await?;
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let metrics = Arc::new(Metrics::new());
    let config = Arc::new(config);
    let router = RoutingTable::new(Arc::clone(&config), 1, &metrics).into_router();
    metrics.loaded_now();
    metrics.set_backend_states(&router.load());
    let reloader = Arc::new(Reloader::new(path, router.clone(), Arc::clone(&metrics)));
    let (drain, _) = watch::channel(false);
    let (close, _) = watch::channel(false);
    let health = Health::new(router.clone(), Arc::clone(&metrics));
    let tunnels = Arc::new(TunnelRegistry::new());
    let proxy = Arc::new(Proxy::new(
        router.clone(),
        &config.upstream,
        Arc::clone(&metrics),
        Arc::clone(&health),
        close.subscribe(),
        Arc::clone(&tunnels),
    ));

    let running = RunningProxy {
        proxy_addr: proxy_listener.local_addr()?,
        admin_addr: admin_listener.local_addr()?,
        router: router.clone(),
        reloader: Arc::clone(&reloader),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        tunnels: Arc::clone(&tunnels),
        drain,
        close,
    };
    let connections =
        Connections { router: router.clone(), drain: running.drain.subscribe(), close: running.close.subscribe() };
    tokio::spawn(Arc::clone(&reloader).watch_file(running.drain.subscribe()));
    tokio::spawn(health.run(running.drain.subscribe()));
    let rebalancer = Rebalancer::new(router.clone(), Arc::clone(&tunnels), Arc::clone(&metrics));
    tokio::spawn(rebalancer.run(running.drain.subscribe()));

    let proxy_service = move |addr: SocketAddr| {
        let proxy = proxy.clone();
        move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, addr).await) }
        }
    };
    tokio::spawn(connections.clone().accept_loop(proxy_listener, proxy_service));
    let admin_state = AdminState { router, reloader, metrics, tunnels };
    let admin_service = move |_addr: SocketAddr| {
        let state = admin_state.clone();
        move |req: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(admin::handle(req, &state).await) }
        }
    };
    tokio::spawn(connections.accept_loop(admin_listener, admin_service));

    info!(listen = %running.proxy_addr, admin = %running.admin_addr, backends = config.backends.len(), "sticky-proxy serving");
    Ok(running)
}

async fn bind(addr: SocketAddr, field: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} ({field}): {e}")))
}

impl RunningProxy {
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The open tunnels, by device.
    pub fn tunnels(&self) -> &Arc<TunnelRegistry> {
        &self.tunnels
    }

    /// Stops accepting, waits up to the grace period for in-flight HTTP,
    /// then closes remaining connections and tunnels.
    pub async fn shutdown(self) {
        let grace = self.router.load().config().server.shutdown_grace;
        info!(?grace, "shutting down: no new connections, finishing in-flight requests");
        let _ = self.drain.send(true);
        if tokio::time::timeout(grace, self.drain.closed()).await.is_err() {
            warn!("grace period over with requests still in flight; closing them");
        }
        let _ = self.close.send(true);
        if tokio::time::timeout(CLOSE_TIMEOUT, self.close.closed()).await.is_err() {
            warn!("some connections did not close in time");
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

/// What every connection task needs: live settings and the shutdown signals.
#[derive(Clone)]
struct Connections {
    router: Router,
    drain: watch::Receiver<bool>,
    close: watch::Receiver<bool>,
}

impl Connections {
    /// Accepts until drained; `make_service` builds a connection's service
    /// from the peer address.
    async fn accept_loop<M, S, F, B>(mut self, listener: TcpListener, make_service: M)
    where
        M: Fn(SocketAddr) -> S,
        S: Fn(Request<Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = raised(&mut self.drain) => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let service = make_service(peer);
                    tokio::spawn(self.clone().serve(stream, peer, service));
                }
                Err(e) if is_per_connection_error(&e) => debug!("accept: {e}"),
                Err(e) => {
                    // EMFILE/ENFILE/ENOMEM: keep the listener, pause, retry.
                    error!(listener = ?listener.local_addr().ok(), "cannot accept a connection: {e}; retrying in {ACCEPT_ERROR_BACKOFF:?}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }

    async fn serve<S, F, B>(mut self, stream: TcpStream, peer: SocketAddr, service: S)
    where
        S: Fn(Request<Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _ = stream.set_nodelay(true);
        keep_alive(&stream);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.router.load().config().server.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service_fn(service))
            .with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = raised(&mut self.drain) => {
                connection.as_mut().graceful_shutdown();
                tokio::select! {
                    result = connection.as_mut() => result,
                    _ = raised(&mut self.close) => return,
                }
            }
        };
        if let Err(e) = result {
            debug!(%peer, "connection ended: {e}");
        }
    }
}

/// TCP keepalive, so a peer that vanished without a FIN (a phone that
/// changed networks, a host that lost power) is noticed within minutes and
/// its connection or WebSocket tunnel freed, instead of held forever.
pub(crate) fn keep_alive(stream: &TcpStream) {
    let probes = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        debug!("cannot enable TCP keepalive: {e}");
    }
}

/// Resolves once the flag is `true` (or its sender is gone).
pub(crate) async fn raised(flag: &mut watch::Receiver<bool>) {
    // `let _` drops the borrow guard at once, keeping the future `Send`.
    let _ = flag.wait_for(|raised| *raised).await;
}

/// Accept errors that concern one connection only (it was reset before we
/// took it); anything else is about the process or system.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
