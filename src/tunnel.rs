//! WebSocket tunnels: an `Upgrade: websocket` request joined to its owner.
//!
//! The upgrade request is sent to the device's backend on a fresh
//! connection of its own (tunnels are long-lived, so they never borrow a
//! pooled keep-alive connection). When the backend answers `101 Switching
//! Protocols`, that answer is passed to the client, both connections are
//! upgraded, and bytes are copied both ways in one task until either side
//! closes. Any other answer (401, 404, …) is passed back as is and no tunnel
//! forms. The bytes are moved by [`crate::splice`], which holds no buffer
//! while a tunnel is idle.
//!
//! A tunnel with a device ID is recorded in the [`crate::registry`] while it
//! is open, so the device's HTTP requests follow it. The proxy ends a tunnel
//! itself with a clean WebSocket close handshake (see [`crate::splice`]):
//! 1012 when the rebalancer moves it to the device's new owner or its
//! draining backend's `drain_timeout` passes, 1001 at shutdown (once the
//! HTTP grace period is over).
//!
//! Each tunnel is a tokio task, not a thread, so thousands cost only memory.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::proxy::{add_forwarded_headers, strip_hop_by_hop, Client, Proxy, ProxyBody, UpstreamFailure};
use crate::registry::TunnelControl;
use crate::routing::Backend;
use crate::splice::Splice;
use crate::tls::UpstreamStream;
use crate::wsframe;

/// Time allowed for both sides to complete the upgrade after a 101.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// When the proxy ends a tunnel: how long the backend has to answer its
/// close frame (and the device to finish a frame it is sending) before the
/// device's close frame goes anyway.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// After that, how long the close handshake may take before both
/// connections are simply dropped.
const CLOSE_HANDSHAKE_LIMIT: Duration = Duration::from_secs(3);

/// What the proxy decided for an upgrade request.
pub(crate) struct Request {
    pub client: Arc<Client>,
    pub backend: Arc<Backend>,
    /// The device ID's bytes, to find a retry target on the ring.
    pub key: Option<Vec<u8>>,
    pub device: String,
    pub started: Instant,
    pub response_timeout: Duration,
}

/// Sends a WebSocket upgrade to its backend and, on 101, starts the tunnel.
pub(crate) async fn open(proxy: Arc<Proxy>, mut req: HttpRequest<Incoming>, tunnel: Request) -> Response<ProxyBody> {
    let Request { client, mut backend, key, device, started, response_timeout } = tunnel;
    // HTTP/2 (RFC 8441): the stream is the client's side of the tunnel, and
    // the backend gets an HTTP/1.1 upgrade made from the CONNECT.
    let extended_connect = crate::h2ws::is_extended_connect(&req);
    let client_upgrade = hyper::upgrade::on(&mut req);
    let path = req.uri().path().to_string();
    // The upgrade's headers, cleaned once; the request itself has no body,
    // so a failed connect can be retried on the next backend up.
    let (mut parts, _empty) = req.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(upgrade) = upgrade {
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    add_forwarded_headers(&mut parts.headers, &client);
    let bridge = extended_connect.then(|| crate::h2ws::to_http1_upgrade(&mut parts));

    let mut retried = false;
    let mut backend_response = loop {
        match send_upgrade(&proxy, &parts, &backend, response_timeout).await {
            Ok(response) => break response,
            Err(failure) => {
                proxy.failed(&backend, failure);
                let next = if failure.is_connect() && !retried {
                    proxy.router().load().retry_target(key.as_deref(), &backend)
                } else {
                    None
                };
                if let Some(next) = next {
                    backend.stats.retried();
                    warn!(from = %backend.id, to = %next.id, "websocket connect failed; retrying once");
                    backend = next;
                    retried = true;
                    continue;
                }
                let response = failure.response(&backend);
                backend.stats.response(response.status().as_u16(), started.elapsed());
                info!(device, backend = %backend.id, path, status = response.status().as_u16(), "websocket upgrade failed");
                return response;
            }
        }
    };

    let status = backend_response.status();
    backend.stats.response(status.as_u16(), started.elapsed());
    if status != StatusCode::SWITCHING_PROTOCOLS {
        info!(device, backend = %backend.id, path, status = status.as_u16(), "websocket upgrade refused by backend");
        let mut response = backend_response.map(Either::Left);
        strip_hop_by_hop(response.headers_mut());
        return response;
    }

    // Pass the backend's 101 on, with its Upgrade/Connection headers intact.
    let backend_upgrade = hyper::upgrade::on(&mut backend_response);
    let mut response = Response::new(Either::Right(Default::default()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = std::mem::take(backend_response.headers_mut());
    if let Some(bridge) = &bridge {
        if let Err(e) = bridge.answer(&mut response) {
            warn!(device, backend = %backend.id, path, "websocket over HTTP/2: {e}");
            return crate::proxy::text_response(
                StatusCode::BAD_GATEWAY,
                format!("backend {} answered the WebSocket upgrade wrongly\n", backend.id),
            );
        }
    }

    let mut close = proxy.close_tunnels.clone();
    let router = Arc::clone(proxy.router());
    let registration = key.as_deref().map(|key| proxy.tunnels.register(key, &backend));
    tokio::spawn(async move {
        let upgrades =
            tokio::time::timeout(UPGRADE_TIMEOUT, async { tokio::try_join!(client_upgrade, backend_upgrade) });
        let (client_io, backend_io) = match upgrades.await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                return debug!(device, backend = %backend.id, error = %e, "websocket upgrade did not complete")
            }
            Err(_) => return debug!(device, backend = %backend.id, "websocket upgrade timed out"),
        };
        let _open = backend.stats.tunnel_opened();
        let control = registration.as_ref().map(|r| Arc::clone(r.control()));
        let (client_io, early_up) = Io::from_upgraded(client_io);
        let (backend_io, early_down) = Io::from_upgraded(backend_io);
        // Reads from the device count as "up", reads from the backend as "down".
        let mut splice = Splice::new(
            client_io,
            backend_io,
            &early_up,
            &early_down,
            backend.stats.bytes_up.clone(),
            backend.stats.bytes_down.clone(),
            registration,
        );
        drop((early_up, early_down));
        debug!(device, backend = %backend.id, path, setup = ?started.elapsed(), "tunnel open");
        let opened = Instant::now();
        // Wakes on every routing change, to notice this backend draining.
        let mut swaps = router.subscribe();
        let mut why: Option<&'static str> = None;
        let mut give_up: Option<tokio::time::Instant> = None;
        let mut force_at: Option<tokio::time::Instant> = None;
        let outcome = loop {
            let drain = if why.is_none() { drain_deadline(&router, &backend.id) } else { None };
            tokio::select! {
                copied = &mut splice => break match copied {
                    Ok((up, down)) => format!("closed ({up} bytes up, {down} bytes down)"),
                    Err(e) => format!("closed by error: {e}"),
                },
                _ = crate::server::raised(&mut close), if why.is_none() => {
                    why = Some("proxy shutdown");
                    splice.begin_close(wsframe::CLOSE_GOING_AWAY, "proxy shutting down", mask());
                }
                _ = migration_requested(control.as_deref()), if why.is_none() => {
                    why = Some("moved to its device's new owner");
                    splice.begin_close(wsframe::CLOSE_SERVICE_RESTART, "moved to another backend: reconnect", mask());
                }
                _ = sleep_until_some(drain), if why.is_none() => {
                    why = Some("its backend is draining and drain_timeout has passed");
                    splice.begin_close(wsframe::CLOSE_SERVICE_RESTART, "backend draining: reconnect", mask());
                }
                changed = swaps.changed() => {
                    if changed.is_err() {
                        // The router is gone: only the copy or shutdown can end us now.
                        swaps = tokio::sync::watch::channel(0).1;
                    }
                }
                _ = sleep_until_some(force_at) => {
                    force_at = None;
                    splice.force_close();
                }
                _ = sleep_until_some(give_up) => break "dropped: the close handshake did not finish in time".to_string(),
            }
            if why.is_some() && give_up.is_none() {
                let now = tokio::time::Instant::now();
                force_at = Some(now + CLOSE_REPLY_WAIT);
                give_up = Some(now + CLOSE_HANDSHAKE_LIMIT);
            }
        };
        drop(splice);
        let outcome = match why {
            Some(why) => format!("{outcome}; closed by the proxy: {why}"),
            None => outcome,
        };
        info!(device, backend = %backend.id, path, status = 101, elapsed = ?opened.elapsed(), "tunnel {outcome}");
    });
    response
}

/// Resolves when the rebalancer asks this tunnel to move (never, for a
/// tunnel without a device ID).
async fn migration_requested(control: Option<&TunnelControl>) {
    match control {
        Some(control) => control.migration_requested().await,
        None => std::future::pending().await,
    }
}

/// A fresh mask for a close frame to the backend (RFC 6455 wants masks
/// unpredictable; this is not about secrecy, only about not repeating).
fn mask() -> [u8; 4] {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let bytes = crate::sample::SplitMix64::new(seed).next_u64().to_le_bytes();
    [bytes[0], bytes[1], bytes[2], bytes[3]]
}

/// When a tunnel to `id` must close because its backend is draining.
fn drain_deadline(router: &crate::routing::Router, id: &str) -> Option<tokio::time::Instant> {
    let table = router.load();
    let since = table.draining_since(id)?;
    Some(tokio::time::Instant::from_std(since + table.config().routing.drain_timeout))
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Connects to the backend on a dedicated connection and sends the upgrade.
async fn send_upgrade(
    proxy: &Proxy,
    parts: &hyper::http::request::Parts,
    backend: &Backend,
    response_timeout: Duration,
) -> Result<Response<Incoming>, UpstreamFailure> {
    let stream = crate::tls::connect(&backend.address, backend.tls.as_ref(), proxy.connect_timeout)
        .await
        .map_err(|e| UpstreamFailure::classify(&e, true))?;
    let (mut sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| UpstreamFailure::classify(&e, false))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(error = %e, "backend connection for websocket upgrade ended");
        }
    });

    let mut request = HttpRequest::new(Empty::<Bytes>::new());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() =
        parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse().map_err(|_| UpstreamFailure::BadAddress)?;
    *request.headers_mut() = parts.headers.clone();
    if !request.headers().contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_str(&backend.address) {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    match tokio::time::timeout(response_timeout, sender.send_request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(UpstreamFailure::classify(&e, false)),
        Err(_) => Err(UpstreamFailure::Timeout),
    }
}

/// One side of a tunnel: the plain TCP stream when the upgraded connection
/// is one, the backend connection (TCP or TLS) of a tunnel's backend side
/// (hyper's wrapping taken off), any other upgraded stream as is.
enum Io {
    Tcp(TcpStream),
    Backend(Box<UpstreamStream>),
    Upgraded(TokioIo<Upgraded>),
}

impl Io {
    /// The stream and the bytes hyper had already read past the upgrade.
    fn from_upgraded(upgraded: Upgraded) -> (Io, Bytes) {
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => return (Io::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<UpstreamStream>>() {
            Ok(parts) => match parts.io.into_inner() {
                UpstreamStream::Plain(tcp) => (Io::Tcp(tcp), parts.read_buf),
                tls => (Io::Backend(Box::new(tls)), parts.read_buf),
            },
            Err(upgraded) => (Io::Upgraded(TokioIo::new(upgraded)), Bytes::new()),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_write(cx, data),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_write(cx, data),
            Io::Upgraded(io) => Pin::new(io).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_flush(cx),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_flush(cx),
            Io::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Io::Backend(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
            Io::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
