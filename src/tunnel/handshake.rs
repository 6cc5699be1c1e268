//! Opening a tunnel: the upgrade request goes to the device's backend on a
//! connection of its own (tunnels are long-lived, so they never borrow a
//! pooled keep-alive connection). A `101 Switching Protocols` is passed to
//! the client and the two upgraded connections become a [`super::session`];
//! any other answer (401, 404, …) is passed back as is and no tunnel forms.
//! The request has no body, so a failure that [`UpstreamFailure::retryable`]
//! allows is retried once on the device's next candidate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request as HttpRequest, Response, StatusCode};
use tracing::{debug, info, warn};

use super::io::Io;
use super::session::{self, ClosedBy, Signals};
use super::splice::Splice;
use super::{h2ws, Tunnels};
use crate::http::headers::{add_forwarded_headers, strip_hop_by_hop, Client};
use crate::http::request_id::X_REQUEST_ID;
use crate::http::{text_response, ProxyBody};
use crate::metrics::Limit;
use crate::routing::Backend;
use crate::upstream::request::upstream_request;
use crate::upstream::{Endpoint, UpstreamFailure};
use crate::util::throttle::Throttle;

/// Time allowed for both sides to complete the upgrade after a 101.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy decided for an upgrade request.
pub struct Request {
    /// Who asked.
    pub client: Arc<Client>,
    /// The device's first candidate.
    pub backend: Arc<Backend>,
    /// The device ID's bytes, to find a retry target on the ring.
    pub key: Option<Vec<u8>>,
    /// The device ID for logs (`-` without one).
    pub device: String,
    /// When the request arrived.
    pub started: Instant,
    /// How long the backend may take to answer the upgrade.
    pub response_timeout: Duration,
    /// The request's ID (`X-Request-Id`), sent to the backend and logged.
    pub request_id: HeaderValue,
}

/// Sends a WebSocket upgrade to its backend and, on 101, starts the tunnel.
pub async fn open(tunnels: Arc<Tunnels>, mut req: HttpRequest<Incoming>, tunnel: Request) -> Response<ProxyBody> {
    let Request { client, mut backend, key, device, started, response_timeout, request_id } = tunnel;
    let id = request_id.to_str().unwrap_or("-").to_string();
    // HTTP/2 (RFC 8441): the stream is the client's side of the tunnel, and
    // the backend gets an HTTP/1.1 upgrade made from the CONNECT.
    let extended_connect = h2ws::is_extended_connect(&req);
    let client_upgrade = hyper::upgrade::on(&mut req);
    let path = req.uri().path().to_string();
    // The upgrade's headers, cleaned once.
    let (mut parts, _empty) = req.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(upgrade) = upgrade {
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    add_forwarded_headers(&mut parts.headers, &client);
    // After the hop-by-hop headers: a client's `Connection` can't drop it.
    parts.headers.insert(X_REQUEST_ID.clone(), request_id);
    let bridge = extended_connect.then(|| h2ws::to_http1_upgrade(&mut parts));

    let mut retried = false;
    let mut backend_response = loop {
        match send_upgrade(&tunnels, &parts, &backend, response_timeout).await {
            Ok(response) => break response,
            Err(failure) => {
                tunnels.health.upstream_failed(&backend, failure);
                let next = if failure.retryable(&parts.method) && !retried {
                    // A new tunnel goes where the ring says: no tunnel to follow.
                    tunnels.router.load().retry_target(key.as_deref(), None, &backend)
                } else {
                    None
                };
                if let Some(next) = next {
                    backend.stats.retried();
                    static THROTTLE: Throttle = Throttle::new();
                    if let Some(suppressed) = THROTTLE.allow() {
                        warn!(from = %backend.id, to = %next.id, ?failure, suppressed, "websocket upgrade failed; retrying once on the next candidate");
                    }
                    backend = next;
                    retried = true;
                    continue;
                }
                let response = failure.response(&backend);
                backend.stats.response(response.status().as_u16(), started.elapsed());
                info!(device, backend = %backend.id, path, status = response.status().as_u16(), request_id = %id, "websocket upgrade failed");
                return response;
            }
        }
    };

    let status = backend_response.status();
    backend.stats.response(status.as_u16(), started.elapsed());
    if status != StatusCode::SWITCHING_PROTOCOLS {
        info!(device, backend = %backend.id, path, status = status.as_u16(), request_id = %id, "websocket upgrade refused by backend");
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
            static THROTTLE: Throttle = Throttle::new();
            if let Some(suppressed) = THROTTLE.allow() {
                warn!(device, backend = %backend.id, path, suppressed, "websocket over HTTP/2: {e}");
            }
            return text_response(
                StatusCode::BAD_GATEWAY,
                format!("backend {} answered the WebSocket upgrade wrongly\n", backend.id),
            );
        }
    }

    let registration = key.as_deref().map(|key| tunnels.registry.register(key, &backend));
    let open = Open { tunnels, backend, device, path, client, request_id: id, started, registration };
    tokio::spawn(async move {
        let upgrades =
            tokio::time::timeout(UPGRADE_TIMEOUT, async { tokio::try_join!(client_upgrade, backend_upgrade) });
        match upgrades.await {
            // The session is a task of its own: this one's state (the
            // upgrade futures, a timer) is freed rather than carried for
            // the tunnel's whole life, which for an idle device is most of
            // what it costs.
            Ok(Ok((client_io, backend_io))) => drop(tokio::spawn(open.session(client_io, backend_io))),
            Ok(Err(e)) => {
                debug!(device = open.device, backend = %open.backend.id, error = %e, "websocket upgrade did not complete")
            }
            Err(_) => debug!(device = open.device, backend = %open.backend.id, "websocket upgrade timed out"),
        }
    });
    response
}

/// A tunnel whose 101 has been passed on: what its session needs.
struct Open {
    tunnels: Arc<Tunnels>,
    backend: Arc<Backend>,
    device: String,
    path: String,
    client: Arc<Client>,
    request_id: String,
    started: Instant,
    registration: Option<crate::tunnel::registry::Registration>,
}

impl Open {
    /// The tunnel's session: splices the upgraded connections until the
    /// tunnel ends. Set up here, outside the future, so the future holds
    /// only the session's own state (see [`session::run_then`]).
    fn session(
        self,
        client_io: hyper::upgrade::Upgraded,
        backend_io: hyper::upgrade::Upgraded,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let Open { tunnels, backend, device, path, client, request_id, started, registration } = self;
        let open = backend.stats.tunnel_opened();
        let ended = crate::util::memory::EndGuard;
        let control = registration.as_ref().map(|r| Arc::clone(r.control()));
        let (client_io, early_up) = Io::from_upgraded(client_io);
        let (backend_io, early_down) = Io::from_upgraded(backend_io);
        // Reads from the device count as "up", reads from the backend as "down".
        let splice = Splice::new(
            client_io,
            backend_io,
            &early_up,
            &early_down,
            backend.stats.bytes_up.clone(),
            backend.stats.bytes_down.clone(),
            registration,
        );
        // Whatever `server.access_log` says, like the line that closes it:
        // one line per tunnel, not per request.
        info!(device, backend = %backend.id, path, client = %client.ip(), request_id, setup = ?started.elapsed(), "tunnel open");
        let opened = Instant::now();
        let router = Arc::clone(&tunnels.router);
        // Read as the tunnel opens: a reload applies to new tunnels.
        let idle_timeout = router.load().config().server.tunnel_idle_timeout;
        let draining = Arc::clone(&backend);
        let signals = Signals {
            shutdown: tunnels.close.clone(),
            control,
            routing_changed: router.subscribe(),
            drain_deadline: move || drain_deadline(&router, &draining.id),
            idle_timeout,
        };
        session::run_then(splice, signals, move |outcome| {
            if outcome.closed_by == Some(ClosedBy::IdleTimeout) {
                tunnels.metrics.limit_hit(Limit::TunnelIdleTimeout);
            }
            info!(device, backend = %backend.id, path, status = 101, elapsed = ?opened.elapsed(), request_id, "tunnel {outcome}");
            drop((open, ended));
        })
    }
}

/// When a tunnel to `id` must close because its backend is draining.
fn drain_deadline(router: &crate::routing::Router, id: &str) -> Option<tokio::time::Instant> {
    let table = router.load();
    let since = table.draining_since(id)?;
    Some(tokio::time::Instant::from_std(since + table.config().routing.drain_timeout))
}

/// Connects to the backend on a dedicated connection and sends the upgrade.
async fn send_upgrade(
    tunnels: &Tunnels,
    parts: &Parts,
    backend: &Backend,
    response_timeout: Duration,
) -> Result<Response<Incoming>, UpstreamFailure> {
    let to = Endpoint { address: &backend.address, tls: backend.tls.as_ref() };
    let (mut sender, connection) = tunnels.connector.http1(to).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(error = %e, "backend connection for websocket upgrade ended");
        }
    });
    let request = upstream_request(parts, &backend.address, Empty::<Bytes>::new())?;
    match tokio::time::timeout(response_timeout, sender.send_request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(UpstreamFailure::classify(&e, false)),
        Err(_) => Err(UpstreamFailure::Timeout),
    }
}
