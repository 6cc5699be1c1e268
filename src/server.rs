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

use crate::admin;
use crate::config::Config;
use crate::proxy::Proxy;
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
    grace: Duration,
    /// `true`: stop accepting and finish in-flight HTTP.
    drain: watch::Sender<bool>,
    /// `true`: close everything still open, tunnels included.
    close: watch::Sender<bool>,
}

/// Binds the listeners named in `config` and starts serving.
pub async fn start(config: &Config) -> io::Result<RunningProxy> {
    let proxy_listener = bind(config.server.listen, "server.listen").await?;
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let router = RoutingTable::new(config).into_router();
    let (drain, _) = watch::channel(false);
    let (close, _) = watch::channel(false);
    let proxy = Arc::new(Proxy::new(
        router.clone(),
        config.upstream.clone(),
        close.subscribe(),
    ));

    let running = RunningProxy {
        proxy_addr: proxy_listener.local_addr()?,
        admin_addr: admin_listener.local_addr()?,
        router: router.clone(),
        grace: config.server.shutdown_grace,
        drain,
        close,
    };
    let connections = Connections {
        header_read_timeout: config.server.header_read_timeout,
        drain: running.drain.subscribe(),
        close: running.close.subscribe(),
    };

    let proxy_service = move |addr: SocketAddr| {
        let proxy = proxy.clone();
        move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, addr).await) }
        }
    };
    tokio::spawn(
        connections
            .clone()
            .accept_loop(proxy_listener, proxy_service),
    );
    let admin_service = move |_addr: SocketAddr| {
        let router = router.clone();
        move |req: Request<Incoming>| {
            let router = router.clone();
            async move { Ok::<_, Infallible>(admin::handle(req, &router)) }
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

    /// Stops accepting, waits up to the grace period for in-flight HTTP,
    /// then closes remaining connections and tunnels.
    pub async fn shutdown(self) {
        info!(
            grace = ?self.grace,
            "shutting down: no new connections, finishing in-flight requests"
        );
        let _ = self.drain.send(true);
        if tokio::time::timeout(self.grace, self.drain.closed())
            .await
            .is_err()
        {
            warn!("grace period over with requests still in flight; closing them");
        }
        let _ = self.close.send(true);
        if tokio::time::timeout(CLOSE_TIMEOUT, self.close.closed())
            .await
            .is_err()
        {
            warn!("some connections did not close in time");
        }
        info!("stopped");
    }
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(config: &Config) -> io::Result<()> {
    let running = start(config).await?;
    wait_for_stop_signal().await;
    running.shutdown().await;
    Ok(())
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

/// What every connection task needs: its limits and the shutdown signals.
#[derive(Clone)]
struct Connections {
    header_read_timeout: Duration,
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
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
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
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
