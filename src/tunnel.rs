//! WebSocket tunnels: an `Upgrade: websocket` request joined to its owner.
//!
//! The upgrade request is sent to the device's backend on a fresh
//! connection of its own (tunnels are long-lived, so they never borrow a
//! pooled keep-alive connection). When the backend answers `101 Switching
//! Protocols`, that answer is passed to the client, both connections are
//! upgraded, and bytes are copied both ways in one task until either side
//! closes. Any other answer (401, 404, …) is passed back as is and no tunnel
//! forms. The proxy doesn't parse WebSocket frames here; it copies bytes.
//!
//! Each tunnel is a tokio task, not a thread, so thousands cost only memory.
//! On shutdown, tunnels close once the HTTP grace period is over.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::{Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, warn};

use crate::proxy::{add_forwarded_headers, strip_hop_by_hop, Proxy, ProxyBody, UpstreamFailure};
use crate::routing::Backend;

/// Time allowed for both sides to complete the upgrade after a 101.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy decided for an upgrade request.
pub(crate) struct Request {
    pub client_addr: SocketAddr,
    /// How the client reached us, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    pub backend: Arc<Backend>,
    /// The device ID's bytes, to find a retry target on the ring.
    pub key: Option<Vec<u8>>,
    pub device: String,
    pub started: Instant,
    pub response_timeout: Duration,
}

/// Sends a WebSocket upgrade to its backend and, on 101, starts the tunnel.
pub(crate) async fn open(proxy: Arc<Proxy>, mut req: HttpRequest<Incoming>, tunnel: Request) -> Response<ProxyBody> {
    let Request { client_addr, proto, mut backend, key, device, started, response_timeout } = tunnel;
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
    add_forwarded_headers(&mut parts.headers, client_addr, proto);
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
        // Reads from the device count as "up", reads from the backend as "down".
        let mut client_io = Counted { io: TokioIo::new(client_io), read: backend.stats.bytes_up.clone() };
        let mut backend_io = Counted { io: TokioIo::new(backend_io), read: backend.stats.bytes_down.clone() };
        debug!(device, backend = %backend.id, path, setup = ?started.elapsed(), "tunnel open");
        let opened = Instant::now();
        let copy = tokio::io::copy_bidirectional(&mut client_io, &mut backend_io);
        tokio::pin!(copy);
        // Wakes on every routing change, to notice this backend draining.
        let mut swaps = router.subscribe();
        let outcome = loop {
            let deadline = drain_deadline(&router, &backend.id);
            tokio::select! {
                copied = &mut copy => break match copied {
                    Ok((up, down)) => format!("closed ({up} bytes up, {down} bytes down)"),
                    Err(e) => format!("closed by error: {e}"),
                },
                _ = crate::server::raised(&mut close) => break "closed by proxy shutdown".to_string(),
                changed = swaps.changed() => {
                    if changed.is_err() {
                        // The router is gone: only the copy or shutdown can end us now.
                        swaps = tokio::sync::watch::channel(0).1;
                    }
                }
                _ = sleep_until_some(deadline) => {
                    break "closed: its backend is draining and drain_timeout has passed".to_string()
                }
            }
        };
        info!(device, backend = %backend.id, path, status = 101, elapsed = ?opened.elapsed(), "tunnel {outcome}");
    });
    response
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

/// An upgraded connection that counts the bytes read from it, so tunnel
/// traffic shows in the metrics while it flows, not only when it ends.
struct Counted<T> {
    io: T,
    read: Counter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read.inc_by(read as u64);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
