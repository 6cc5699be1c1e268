//! Proxying one HTTP request to the backend that owns its device.
//!
//! [`Proxy::handle`] is the per-request hot path: load the routing snapshot,
//! find the device ID and its owner, then either forward the request over a
//! pooled keep-alive connection (bodies stream both ways, nothing is
//! buffered) or, for `Upgrade: websocket`, hand it to [`crate::tunnel`].
//!
//! Headers follow RFC 9110: hop-by-hop headers (and any named in
//! `Connection`) are dropped in both directions, `Host` is kept,
//! `X-Forwarded-For` is appended to, and `X-Forwarded-Proto` and
//! `X-Forwarded-Host` are set. Upstream failures answer the client with a
//! short plain-text reason: 502 when the backend refused, was unreachable or
//! broke the connection, 504 when it was too slow.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::config::UpstreamConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::registry::TunnelRegistry;
use crate::routing::{Backend, Decision, Router};
use crate::{h2ws, tunnel};

/// Response bodies: a backend's streamed body, or a short message of ours.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Request bodies sent upstream: streamed from the client, or buffered
/// (small bodies, so that a request whose connect failed can be retried).
pub type UpstreamBody = Either<ClientBody, Full<Bytes>>;

/// The client's request body as it streams upstream. Its errors (a client
/// that aborts an upload) are marked as the client's, so they are never
/// blamed on the backend, and it announces when it has been sent in full,
/// which is when the backend's response clock starts.
pub struct ClientBody {
    inner: Incoming,
    sent: Arc<Notify>,
}

/// The client's body failed (it disconnected or broke framing mid-upload).
#[derive(Debug)]
pub struct ClientBodyError(hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client's request body failed: {}", self.0)
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, ClientBodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.sent.notify_one();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError(e)))),
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Largest request body buffered to make a request retryable; larger or
/// chunked bodies stream and are never retried.
const REPLAYABLE_BODY: u64 = 64 * 1024;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// State shared by every connection of one running proxy.
pub struct Proxy {
    router: Router,
    pool: Arc<Pool>,
    pub(crate) health: Arc<Health>,
    /// Fixed at start: the pooled connector is built with it.
    pub(crate) connect_timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
    /// Flips to `true` when open tunnels must close (end of shutdown).
    pub(crate) close_tunnels: watch::Receiver<bool>,
    /// Open tunnels by device: HTTP for a device follows its tunnel.
    pub(crate) tunnels: Arc<TunnelRegistry>,
}

impl Proxy {
    pub fn new(
        router: Router,
        upstream: &UpstreamConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        close_tunnels: watch::Receiver<bool>,
        tunnels: Arc<TunnelRegistry>,
    ) -> Proxy {
        let pool = Pool::new(upstream.pool_max_idle, upstream.pool_idle_timeout, upstream.connect_timeout);
        Proxy { router, pool, health, connect_timeout: upstream.connect_timeout, metrics, close_tunnels, tunnels }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Serves one request from `client`. Never fails: every
    /// problem becomes a response with a status and a reason.
    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>, client: Arc<Client>) -> Response<ProxyBody> {
        let started = Instant::now();
        if req.version() == Version::HTTP_2 {
            let (mut parts, body) = req.into_parts();
            from_http2(&parts.uri, &mut parts.headers);
            req = Request::from_parts(parts, body);
        }
        // A reverse proxy tunnels only WebSockets (HTTP/2's extended CONNECT).
        if req.method() == Method::CONNECT && !h2ws::is_extended_connect(&req) {
            let mut response = text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is only accepted for WebSockets over HTTP/2 (:protocol websocket)\n",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"));
            return response;
        }
        let upgrade = is_websocket_upgrade(req.headers()) || h2ws::is_extended_connect(&req);
        let (key, backend, response_timeout, access_log) = {
            let table = self.router.load();
            let response_timeout = table.config().upstream.response_timeout;
            let access_log = table.config().server.access_log;
            match table.decide(req.uri(), req.headers()) {
                Decision::Owner { key, backend, failed_over_from } => {
                    // HTTP for a device with an open tunnel goes where the
                    // tunnel is; a new tunnel goes to the ring's choice.
                    let held = if upgrade { None } else { self.tunnels.holder(&key.id, &table) };
                    let backend = match held {
                        Some(held) => {
                            self.metrics.routed_by_tunnel();
                            held
                        }
                        None => {
                            if !upgrade {
                                self.metrics.routed_by_ring();
                            }
                            if let Some(owner) = &failed_over_from {
                                owner.stats.failover();
                            }
                            backend
                        }
                    };
                    (Some(key.id.into_owned()), backend, response_timeout, access_log)
                }
                Decision::Spread { backend } => {
                    self.metrics.missing_key();
                    (None, backend, response_timeout, access_log)
                }
                Decision::NoKey => {
                    self.metrics.missing_key();
                    let reason = format!("no device ID in request: looked for {}\n", table.keys().describe());
                    info!(method = %req.method(), path = %req.uri().path(), status = 400, "rejected: no device ID");
                    return text_response(StatusCode::BAD_REQUEST, reason);
                }
                Decision::AllDown => {
                    let reason = format!(
                        "no backend can take this request: all {} backends are down or draining\n",
                        table.backends().len()
                    );
                    warn!(method = %req.method(), path = %req.uri().path(), status = 503, "every backend is down");
                    return text_response(StatusCode::SERVICE_UNAVAILABLE, reason);
                }
            }
        };
        let device =
            |key: &Option<Vec<u8>>| key.as_deref().map_or(Cow::Borrowed("-"), String::from_utf8_lossy).into_owned();

        if upgrade {
            let device = device(&key);
            let tunnel = tunnel::Request { client, backend, key, device, started, response_timeout };
            return Box::pin(tunnel::open(self, req, tunnel)).await;
        }

        // Copied only when the access log will be written.
        let logged = (access_log && tracing::enabled!(tracing::Level::INFO))
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let (backend, response) = self.forward(req, &client, key.as_deref(), backend, response_timeout).await;
        let elapsed = started.elapsed();
        backend.stats.response(response.status().as_u16(), elapsed);
        if let Some((method, path)) = logged {
            let device = device(&key);
            info!(device, backend = %backend.id, %method, path, status = response.status().as_u16(), ?elapsed, "proxied");
        }
        response
    }

    /// Sends the request to `backend`; if the connect fails (or, for an
    /// idempotent method, the connection breaks before any answer) and the
    /// body can be sent again (none, or buffered because small), retries
    /// once on the next backend up in ring order. Returns who answered.
    async fn forward(
        &self,
        req: Request<Incoming>,
        client: &Client,
        key: Option<&[u8]>,
        mut backend: Arc<Backend>,
        response_timeout: Duration,
    ) -> (Arc<Backend>, Response<ProxyBody>) {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded_headers(&mut parts.headers, client);
        let replay = match body.size_hint().exact() {
            Some(0) => Some(Bytes::new()),
            Some(n) if n <= REPLAYABLE_BODY => match Limited::new(body, REPLAYABLE_BODY as usize).collect().await {
                Ok(collected) => Some(collected.to_bytes()),
                Err(_) => {
                    let response = text_response(StatusCode::BAD_REQUEST, "could not read the request body\n");
                    return (backend, response);
                }
            },
            _ => {
                let sent = Arc::new(Notify::new());
                let body = ClientBody { inner: body, sent: Arc::clone(&sent) };
                let request = upstream_request(&parts, &backend, Either::Left(body));
                return match self.send(&backend, request, response_timeout, Some(sent)).await {
                    Ok(response) => (backend, response),
                    Err(failure) => {
                        self.failed(&backend, failure);
                        let response = failure.response(&backend);
                        (backend, response)
                    }
                };
            }
        };
        let replay = replay.unwrap_or_default();
        let mut retried = false;
        loop {
            let request = upstream_request(&parts, &backend, Either::Right(Full::new(replay.clone())));
            match self.send(&backend, request, response_timeout, None).await {
                Ok(response) => return (backend, response),
                Err(failure) => {
                    self.failed(&backend, failure);
                    // Nothing reached the backend, or the request is idempotent
                    // and the connection broke before any answer (as nginx's
                    // proxy_next_upstream does): safe to send again.
                    let may_retry =
                        failure.is_connect() || (failure == UpstreamFailure::Broken && parts.method.is_idempotent());
                    let next =
                        if may_retry && !retried { self.router.load().retry_target(key, &backend) } else { None };
                    match next {
                        Some(next) => {
                            backend.stats.retried();
                            warn!(from = %backend.id, to = %next.id, ?failure, "retrying once on the next backend up");
                            backend = next;
                            retried = true;
                        }
                        None => {
                            let response = failure.response(&backend);
                            return (backend, response);
                        }
                    }
                }
            }
        }
    }

    /// Sends one request. `response_timeout` runs from when the body has
    /// been sent (`uploaded`, for streamed bodies), so a slow upload is not
    /// mistaken for a slow backend.
    async fn send(
        &self,
        backend: &Backend,
        request: Result<Request<UpstreamBody>, UpstreamFailure>,
        response_timeout: Duration,
        uploaded: Option<Arc<Notify>>,
    ) -> Result<Response<ProxyBody>, UpstreamFailure> {
        let request = request?;
        let exchange = self.pool.send(&backend.address, backend.tls.as_ref(), request);
        tokio::pin!(exchange);
        if let Some(uploaded) = uploaded {
            let early = tokio::select! {
                answer = &mut exchange => Some(answer),
                _ = uploaded.notified() => None,
            };
            if let Some(answer) = early {
                return answer_of(answer);
            }
        }
        match tokio::time::timeout(response_timeout, exchange).await {
            Ok(answer) => answer_of(answer),
            Err(_) => Err(UpstreamFailure::Timeout),
        }
    }

    /// Counts a failure against `backend`, and tells health about the
    /// kinds that say the backend itself is in trouble. A client that
    /// aborted its upload is nobody's fault but the client's.
    pub(crate) fn failed(&self, backend: &Backend, failure: UpstreamFailure) {
        if failure == UpstreamFailure::ClientAborted {
            return;
        }
        backend.stats.upstream_error(failure);
        if failure.is_connect() || matches!(failure, UpstreamFailure::Timeout | UpstreamFailure::Broken) {
            self.health.traffic_failure(backend);
        }
    }
}

fn answer_of(answer: Result<Response<Incoming>, UpstreamFailure>) -> Result<Response<ProxyBody>, UpstreamFailure> {
    let mut response = answer?;
    strip_hop_by_hop(response.headers_mut());
    Ok(response.map(Either::Left))
}

/// The upstream request for `backend`, from the client's (cleaned) parts:
/// origin-form, as HTTP/1.1 sends it to a server; `Host` is the client's, or
/// the backend's address for a client that sent none (HTTP/1.0).
fn upstream_request(
    parts: &hyper::http::request::Parts,
    backend: &Backend,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, UpstreamFailure> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = origin_form(&parts.uri);
    *request.headers_mut() = parts.headers.clone();
    if !request.headers().contains_key(header::HOST) {
        let host = HeaderValue::from_str(&backend.address).map_err(|_| UpstreamFailure::BadAddress)?;
        request.headers_mut().insert(header::HOST, host);
    }
    Ok(request)
}

/// Why a backend gave no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Refused,
    Unreachable,
    ConnectTimeout,
    Timeout,
    /// Connected, but the backend closed or broke the connection.
    Broken,
    /// The backend address can't form a request URI.
    BadAddress,
    /// The client's request body failed mid-upload: not the backend's fault.
    ClientAborted,
    /// The TLS handshake with the backend failed (its certificate is not
    /// trusted or not for its name, or it doesn't speak TLS).
    Tls,
}

impl UpstreamFailure {
    /// The connection was never made, so nothing reached the backend.
    pub fn is_connect(self) -> bool {
        matches!(
            self,
            UpstreamFailure::Refused
                | UpstreamFailure::Unreachable
                | UpstreamFailure::ConnectTimeout
                | UpstreamFailure::Tls
        )
    }

    pub(crate) fn classify(err: &(dyn StdError + 'static), during_connect: bool) -> UpstreamFailure {
        let mut source: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = source {
            if e.is::<ClientBodyError>() {
                return UpstreamFailure::ClientAborted;
            }
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if crate::tls::is_tls_error(io) {
                    return UpstreamFailure::Tls;
                }
                match io.kind() {
                    io::ErrorKind::TimedOut if during_connect => return UpstreamFailure::ConnectTimeout,
                    io::ErrorKind::TimedOut => return UpstreamFailure::Timeout,
                    io::ErrorKind::ConnectionRefused => return UpstreamFailure::Refused,
                    _ => {}
                }
            }
            source = e.source();
        }
        if during_connect {
            UpstreamFailure::Unreachable
        } else {
            UpstreamFailure::Broken
        }
    }

    pub(crate) fn response(self, backend: &Backend) -> Response<ProxyBody> {
        let (id, addr) = (&backend.id, &backend.address);
        let (status, reason) = match self {
            UpstreamFailure::Refused => {
                (StatusCode::BAD_GATEWAY, format!("backend {id} ({addr}) refused the connection"))
            }
            UpstreamFailure::Unreachable => (StatusCode::BAD_GATEWAY, format!("backend {id} ({addr}) is unreachable")),
            UpstreamFailure::ConnectTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, format!("backend {id} ({addr}) did not accept the connection in time"))
            }
            UpstreamFailure::Timeout => {
                (StatusCode::GATEWAY_TIMEOUT, format!("backend {id} ({addr}) did not answer in time"))
            }
            UpstreamFailure::Broken => (
                StatusCode::BAD_GATEWAY,
                format!("backend {id} ({addr}) closed the connection without a valid response"),
            ),
            UpstreamFailure::BadAddress => {
                (StatusCode::BAD_GATEWAY, format!("backend {id} has an unusable address {addr:?}"))
            }
            UpstreamFailure::ClientAborted => (
                StatusCode::BAD_REQUEST,
                "the request body did not arrive whole; nothing was blamed on the backend".into(),
            ),
            UpstreamFailure::Tls => {
                (StatusCode::BAD_GATEWAY, format!("backend {id} ({addr}): the TLS handshake failed"))
            }
        };
        warn!(backend = %id, address = %addr, status = status.as_u16(), "{reason}");
        text_response(status, reason + "\n")
    }
}

/// The request's path and query alone (a reference-counted clone, no
/// parsing); asterisk-form (`OPTIONS *`) has no path to forward: "/".
pub(crate) fn origin_form(original: &Uri) -> Uri {
    let mut parts = hyper::http::uri::Parts::default();
    parts.path_and_query = Some(match original.path_and_query() {
        Some(p) if p.as_str().starts_with('/') => p.clone(),
        _ => PathAndQuery::from_static("/"),
    });
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// A short plain-text response of the proxy's own.
pub fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// True for `Connection: upgrade` + `Upgrade: websocket`.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, &header::CONNECTION, "upgrade") && has_token(headers, &header::UPGRADE, "websocket")
}

/// Does a comma-separated token of any `name` header equal `token`
/// (ignoring ASCII case)?
pub(crate) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// and `Upgrade`; `Connection` first, since it names more of them.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Which of [`HOP_BY_HOP`] `name` is. Most names are ruled out by their
/// length alone, without comparing bytes.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let name = name.as_str();
    if !matches!(name.len(), 2 | 7 | 10 | 16..=19) {
        return None;
    }
    HOP_BY_HOP.iter().position(|h| *h == name)
}

/// Removes hop-by-hop headers, those named in `Connection`, and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present: most requests carry
    // none, most responses only `Connection: keep-alive`, and then no
    // absent header is looked up.
    let mut present = 0u16; // bit i: HOP_BY_HOP[i]
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // HOP_BY_HOP[0] is Connection: drop the headers it names. Its values
        // are copied out first (reference-counted, no allocation for one line).
        let mut lines = headers.get_all(header::CONNECTION).iter();
        let first = lines.next().cloned();
        let more: Vec<HeaderValue> = lines.cloned().collect();
        for line in first.iter().chain(&more) {
            for token in line.to_str().unwrap_or("").split(',').map(str::trim) {
                // `Connection: host` must not cost the backend the client's Host.
                if !token.is_empty() && !token.eq_ignore_ascii_case("host") {
                    // Looked up by &str: no HeaderName is built; an invalid
                    // name matches nothing.
                    headers.remove(token);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// Makes an HTTP/2 request's headers fit an HTTP/1.1 backend: `Host` from
/// the `:authority` (HTTP/2 clients rarely send `Host`), and cookie crumbs,
/// which HTTP/2 lets a client send as separate headers, joined into one
/// `Cookie` line as RFC 9113 §8.2.3 asks. Pseudo-headers never appear in a
/// `HeaderMap`; hyper keeps them in the method, URI and extensions.
pub fn from_http2(uri: &Uri, headers: &mut HeaderMap) {
    if !headers.contains_key(header::HOST) {
        if let Some(host) = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            headers.insert(header::HOST, host);
        }
    }
    if headers.get_all(header::COOKIE).iter().nth(1).is_some() {
        let crumbs: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
        if let Ok(joined) = HeaderValue::from_bytes(&crumbs.join(&b"; "[..])) {
            headers.insert(header::COOKIE, joined);
        }
    }
}

/// Who sent a request, fixed for its connection: how it came (`"http"` or
/// `"https"`, for `X-Forwarded-Proto`) and its IP, formatted once for
/// `X-Forwarded-For` so that requests on a kept-alive connection don't
/// format it again (a thousand instructions each).
pub struct Client {
    pub proto: &'static str,
    forwarded_for: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr, proto: &'static str) -> Client {
        // An IP's text is always a valid header value.
        let forwarded_for =
            HeaderValue::try_from(addr.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Client { proto, forwarded_for }
    }
}

/// Appends the client to `X-Forwarded-For` and sets `-Proto` and `-Host`.
pub fn add_forwarded_headers(headers: &mut HeaderMap, client: &Client) {
    // Room for the three headers at once: at most one growth of the map.
    headers.reserve(3);
    let forwarded_for = if headers.contains_key(&X_FORWARDED_FOR) {
        // Every prior line counts: proxies before us may have added one each.
        let mut joined: Vec<u8> = Vec::new();
        for prior in headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).map(str::trim) {
            if !prior.is_empty() {
                joined.extend_from_slice(prior.as_bytes());
                joined.extend_from_slice(b", ");
            }
        }
        joined.extend_from_slice(client.forwarded_for.as_bytes());
        HeaderValue::from_bytes(&joined).unwrap_or_else(|_| client.forwarded_for.clone())
    } else {
        // The common case: no allocation, no formatting.
        client.forwarded_for.clone()
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(client.proto));
    match headers.get(header::HOST).cloned() {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert("x-device-id", HeaderValue::from_static("d1"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "x-device-id"]);
    }

    #[test]
    fn forwarded_headers_append_and_set() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("10.1.1.1"));
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        h.insert(header::HOST, HeaderValue::from_static("api.example.com"));
        add_forwarded_headers(&mut h, &Client::new("127.0.0.9:5555".parse().expect("addr"), "http"));
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.1.1, 127.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example.com");
    }

    #[test]
    fn every_forwarded_for_line_is_kept_and_host_survives_connection() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("2.2.2.2"));
        h.insert(header::HOST, HeaderValue::from_static("api.example.com"));
        h.insert(header::CONNECTION, HeaderValue::from_static("host"));
        strip_hop_by_hop(&mut h);
        add_forwarded_headers(&mut h, &Client::new("127.0.0.9:5555".parse().expect("addr"), "http"));
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 127.0.0.9");
        assert_eq!(h[header::HOST], "api.example.com");
    }

    #[test]
    fn connection_tokens_of_every_line_and_any_case_are_removed() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-One, keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-two,,bad name"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        for name in ["x-one", "x-two", "x-three"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["x-three"]);

        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn forwarded_for_is_the_client_ip_alone_when_first() {
        let mut h = HeaderMap::new();
        add_forwarded_headers(&mut h, &Client::new("[2001:db8::1]:443".parse().expect("addr"), "https"));
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::1");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    #[test]
    fn websocket_upgrade_detection_reads_tokens() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(is_websocket_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_websocket_upgrade(&h));
    }

    #[test]
    fn origin_form_keeps_path_and_query() {
        let uri: Uri = "/devices/a%20b/messages?x=1".parse().expect("uri");
        assert_eq!(origin_form(&uri).to_string(), "/devices/a%20b/messages?x=1");
        assert_eq!(origin_form(&"*".parse().expect("uri")).to_string(), "/");
        assert_eq!(origin_form(&"http://h:1/p?q".parse().expect("uri")).to_string(), "/p?q");
    }

    #[test]
    fn http2_requests_get_host_and_one_cookie_line() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("device_id=d7"));
        from_http2(&"https://api.example.com:8443/x".parse().expect("uri"), &mut h);
        assert_eq!(h[header::HOST], "api.example.com:8443");
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; device_id=d7"]);

        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("kept.example"));
        from_http2(&"https://other.example/x".parse().expect("uri"), &mut h);
        assert_eq!(h[header::HOST], "kept.example", "a Host the client sent stays");
    }
}
