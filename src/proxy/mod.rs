//! Proxying one HTTP request to the device's backend.
//!
//! [`Proxy::handle`] is the per-request hot path: load the routing snapshot,
//! find the device ID and its first candidate (the backend of its open
//! tunnel, else its ring owner or that owner's stand-in), then either
//! forward the request over a pooled keep-alive connection (bodies stream
//! both ways, nothing is buffered) or, for a WebSocket upgrade, hand it to
//! [`crate::tunnel`].
//!
//! Headers follow RFC 9110 ([`crate::http::headers`]). Upstream failures
//! answer the client with a short plain-text reason: 502 when the backend
//! refused, was unreachable or broke the connection, 504 when it was too
//! slow. A failure that [`UpstreamFailure::retryable`] allows, on a request
//! whose body can be sent again, is retried once on the next candidate;
//! one that met a kept-alive connection the backend had just closed
//! ([`UpstreamFailure::Stale`]) is first sent again to the same backend on
//! a new connection.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{Config, UpstreamConfig};
use crate::http::headers::{
    add_forwarded_headers, check_transfer_encoding, from_http2, is_websocket_upgrade, settle_host, strip_hop_by_hop,
    Client,
};
use crate::http::request_id::{self, X_REQUEST_ID};
use crate::http::{text_response, BodyLimits, ClientBody, ProxyBody, Upload, UpstreamBody};
use crate::metrics::{Limit, Metrics};
use crate::routing::{Backend, Decision, Reason, Router};
use crate::tunnel::{h2ws, handshake, TunnelRegistry, Tunnels};
use crate::upstream::pool::Pool;
use crate::upstream::request::upstream_request;
use crate::upstream::{Connector, Endpoint, Health, UpstreamFailure};
use crate::util::throttle::Throttle;

mod access;
pub(crate) mod redeliver;

pub(crate) use access::LoggedBody;
use access::{AccessLine, Received};

pub(crate) use redeliver::DeliveryLog;

/// Largest request body buffered to make a request retryable; larger or
/// chunked bodies stream and are never retried.
const REPLAYABLE_BODY: u64 = 64 * 1024;

/// What [`Proxy::forward`] needs to know about a request besides itself.
struct Sent<'k> {
    /// The device ID, if the request has one.
    key: Option<&'k [u8]>,
    /// When the request arrived (`retry_for` counts from here).
    arrived: Instant,
    response_timeout: Duration,
    /// The config in force, when a not-here answer may be redelivered.
    redelivery: Option<Arc<Config>>,
    /// What the request body may take.
    body_limits: BodyLimits,
    /// The request's ID, sent upstream.
    id: &'k HeaderValue,
}

/// Where one request stands on its way to the instance holding its
/// device's socket.
struct Delivery {
    /// The backend it goes to next (or went to last).
    backend: Arc<Backend>,
    /// Sends so far.
    tries: u32,
    /// The one retry after a failure has been used.
    retried: bool,
    /// The one resend after a [`UpstreamFailure::Stale`] pooled connection
    /// has been used.
    resent: bool,
    /// The next send must use a new connection (it resends).
    fresh: bool,
    /// Backends that answered "not here" (or failed) in this walk.
    tried: Vec<Arc<Backend>>,
    /// The last not-here answer, buffered: it goes to the client if no
    /// instance takes the request.
    last_not_here: Option<Response<ProxyBody>>,
}

/// A not-here answer with its body read (at most [`REPLAYABLE_BODY`]), so
/// that the connection it came on is free and the answer can be kept.
async fn buffered(response: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    let bytes = match Limited::new(body, REPLAYABLE_BODY as usize).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    // The length is the buffered body's now.
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Either::Right(Full::new(bytes)))
}

/// State shared by every connection of one running proxy.
pub(crate) struct Proxy {
    router: Router,
    pool: Arc<Pool>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Requests held waiting for their device's socket (capped; one count
    /// for every worker).
    held: Arc<redeliver::HeldCount>,
    /// How each device's last redelivered request ended.
    deliveries: Arc<DeliveryLog>,
    /// Open tunnels by device (HTTP for a device follows its tunnel), and
    /// what opening one needs.
    tunnels: Arc<Tunnels>,
}

impl Proxy {
    /// The proxy's shared state; spawns the pool's sweeper, so call it
    /// inside a runtime. `close_tunnels` is raised when open tunnels must
    /// close (the end of shutdown).
    pub(crate) fn new(
        router: Router,
        upstream: &UpstreamConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        close_tunnels: watch::Receiver<bool>,
        registry: Arc<TunnelRegistry>,
        deliveries: Arc<DeliveryLog>,
    ) -> Proxy {
        let connector = Connector::new(upstream.connect_timeout);
        let pool = Pool::new(upstream, connector);
        let tunnels = Arc::new(Tunnels {
            router: router.clone(),
            connector,
            health: Arc::clone(&health),
            registry,
            close: close_tunnels,
            metrics: Arc::clone(&metrics),
        });
        Proxy { router, pool, health, metrics, held: Arc::default(), deliveries, tunnels }
    }

    /// The proxy for thread-per-core worker `worker` of `workers`: this
    /// one's state, with a pool of its own when the limit splits (see
    /// [`Pool::share`]). Call on the worker's runtime: the pool's sweeper
    /// and connection tasks run there.
    pub(crate) fn for_worker(&self, upstream: &UpstreamConfig, worker: usize, workers: usize) -> Proxy {
        let pool = if Pool::splits(upstream, workers) {
            Pool::share(upstream, Connector::new(upstream.connect_timeout), worker, workers)
        } else {
            Arc::clone(&self.pool)
        };
        Proxy {
            router: self.router.clone(),
            pool,
            health: Arc::clone(&self.health),
            metrics: Arc::clone(&self.metrics),
            held: Arc::clone(&self.held),
            deliveries: Arc::clone(&self.deliveries),
            tunnels: Arc::clone(&self.tunnels),
        }
    }

    /// Serves one request from `client`. Never fails: every
    /// problem becomes a response with a status and a reason. The
    /// request's ID ([`request_id`]) goes upstream and back on the
    /// response; the access line is written as the response body ends.
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>, client: Arc<Client>) -> Response<LoggedBody> {
        let id = request_id::of(req.headers());
        let mut line = None;
        let mut response = self.serve(req, client, &id, &mut line).await;
        response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        response.map(|body| LoggedBody::new(body, line))
    }

    /// [`Proxy::handle`]'s work; fills `line` when the access line is due.
    async fn serve(
        &self,
        mut req: Request<Incoming>,
        client: Arc<Client>,
        id: &HeaderValue,
        line: &mut Option<Box<AccessLine>>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        {
            let (mut parts, body) = req.into_parts();
            if let Err(why) = settle_host(parts.version, &parts.uri, &mut parts.headers) {
                info!(method = %parts.method, path = %parts.uri.path(), status = 400, "rejected: {why}");
                return text_response(StatusCode::BAD_REQUEST, format!("bad request: {why}\n"));
            }
            if let Err((status, why)) = check_transfer_encoding(&parts.headers) {
                info!(method = %parts.method, path = %parts.uri.path(), status = status.as_u16(), "rejected: {why}");
                let mut response = text_response(status, format!("{why}\n"));
                // The body's framing is in doubt: read no further request.
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                return response;
            }
            if parts.version == Version::HTTP_2 {
                from_http2(&mut parts.headers);
            }
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
            self.metrics.no_backend_response(405);
            return response;
        }
        let upgrade = is_websocket_upgrade(req.headers()) || h2ws::is_extended_connect(&req);
        let (key, backend, response_timeout, access_log, redelivery, body_limits) = {
            let table = self.router.load();
            let server = &table.config().server;
            let body_limits =
                BodyLimits { max_size: server.client_max_body_size, stall_timeout: server.client_body_timeout };
            if let Some(max) = body_limits.max_size.filter(|max| req.body().size_hint().lower() > *max) {
                self.metrics.limit_hit(Limit::ClientMaxBodySize);
                info!(method = %req.method(), path = %req.uri().path(), status = 413, "rejected: body too large");
                let reason = format!("the request body is larger than server.client_max_body_size ({max} bytes)\n");
                let mut response = text_response(StatusCode::PAYLOAD_TOO_LARGE, reason);
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                self.metrics.no_backend_response(413);
                return response;
            }
            let response_timeout = table.config().upstream.response_timeout;
            let access_log = table.config().server.access_log;
            // HTTP for a device with an open tunnel goes where the tunnel
            // is; a new tunnel goes where the ring says.
            let registry = &self.tunnels.registry;
            let held = |id: &[u8]| if upgrade { None } else { registry.holder(id, &table) };
            match table.decide(req.uri(), req.headers(), held) {
                Decision::Device { key, first } => {
                    match first.reason {
                        Reason::Tunnel => self.metrics.routed_by_tunnel(),
                        _ if !upgrade => self.metrics.routed_by_ring(),
                        _ => {}
                    }
                    if first.reason.is_failover() {
                        if let Some(owner) = table.owner(&key.id) {
                            owner.stats.failover();
                        }
                    }
                    // Settings for a not-here answer, kept only where it can happen.
                    let not_here = &table.config().routing.not_here;
                    let redelivery = (!upgrade && !not_here.status.is_empty()).then(|| Arc::clone(table.config()));
                    (Some(key.id.into_owned()), first.backend, response_timeout, access_log, redelivery, body_limits)
                }
                Decision::Spread { backend } => {
                    self.metrics.missing_key();
                    (None, backend, response_timeout, access_log, None, body_limits)
                }
                Decision::NoKey => {
                    self.metrics.missing_key();
                    let reason = format!("no device ID in request: looked for {}\n", table.keys().describe());
                    info!(method = %req.method(), path = %req.uri().path(), status = 400, "rejected: no device ID");
                    self.metrics.no_backend_response(400);
                    return text_response(StatusCode::BAD_REQUEST, reason);
                }
                Decision::AllDown => {
                    let reason = format!(
                        "no backend can take this request: all {} backends are down or draining\n",
                        table.backends().len()
                    );
                    static THROTTLE: Throttle = Throttle::new();
                    if let Some(suppressed) = THROTTLE.allow() {
                        warn!(method = %req.method(), path = %req.uri().path(), status = 503, suppressed, "every backend is down");
                    }
                    self.metrics.no_backend_response(503);
                    return text_response(StatusCode::SERVICE_UNAVAILABLE, reason);
                }
            }
        };
        let device =
            |key: &Option<Vec<u8>>| key.as_deref().map_or(Cow::Borrowed("-"), String::from_utf8_lossy).into_owned();

        if upgrade {
            let device = device(&key);
            let request_id = id.clone();
            let tunnel = handshake::Request { client, backend, key, device, started, response_timeout, request_id };
            return Box::pin(handshake::open(Arc::clone(&self.tunnels), req, tunnel)).await;
        }

        // Copied only when the access log will be written.
        let logged = (access_log && tracing::enabled!(tracing::Level::INFO))
            .then(|| (req.method().clone(), req.uri().path().to_string()));
        let sent = Sent { key: key.as_deref(), arrived: started, response_timeout, redelivery, body_limits, id };
        let mut received = Received::Known(0);
        let (backend, response) = self.forward(req, &client, backend, sent, &mut received).await;
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        backend.stats.response(status, elapsed);
        if let Some((method, path)) = logged {
            let device = device(&key);
            let request_id = id.clone();
            *line = Some(Box::new(AccessLine {
                device,
                backend,
                method,
                path,
                status,
                elapsed,
                client,
                request_id,
                received,
            }));
        }
        response
    }

    /// Sends the request to `backend`. If it fails in a way
    /// [`UpstreamFailure::retryable`] allows and the body can be sent again
    /// (none, or buffered because small), retries once on the device's next
    /// candidate. If the backend answers "not here" ([`redeliver`]), walks
    /// the device's redelivery candidates. Returns who answered; `received`
    /// counts the request body bytes read from the client.
    async fn forward(
        &self,
        req: Request<Incoming>,
        client: &Client,
        backend: Arc<Backend>,
        sent: Sent<'_>,
        received: &mut Received,
    ) -> (Arc<Backend>, Response<ProxyBody>) {
        let Sent { key, arrived, response_timeout, redelivery, body_limits, id } = sent;
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded_headers(&mut parts.headers, client);
        // After the hop-by-hop headers: a client's `Connection` can't drop it.
        parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
        let replay = match body.size_hint().exact() {
            Some(0) => Bytes::new(),
            Some(n) if n <= REPLAYABLE_BODY => {
                let body = ClientBody::new(body, None, body_limits);
                match Limited::new(body, REPLAYABLE_BODY as usize).collect().await {
                    Ok(collected) => {
                        let bytes = collected.to_bytes();
                        *received = Received::Known(bytes.len() as u64);
                        bytes
                    }
                    Err(e) => {
                        let failure = UpstreamFailure::classify(e.as_ref(), false);
                        return (Arc::clone(&backend), self.failed(&backend, failure));
                    }
                }
            }
            _ => {
                if body.size_hint().exact().is_none() {
                    // hyper frames a body of unknown length as chunked only
                    // for methods that usually carry one: say so for all,
                    // or a GET's body would be dropped.
                    parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
                }
                let upload = Arc::new(Upload::default());
                *received = Received::Streamed(Arc::clone(&upload));
                let body = ClientBody::new(body, Some(Arc::clone(&upload)), body_limits);
                let request = upstream_request(&parts, &backend.address, Either::Left(body));
                return match self.send(&backend, request, response_timeout, Some(upload), false).await {
                    Ok(response) => (backend, response),
                    Err(failure) => {
                        let response = self.failed(&backend, failure);
                        (backend, response)
                    }
                };
            }
        };
        let not_here = redelivery.as_deref().map(|config| &config.routing.not_here);
        let mut delivery = Delivery {
            backend,
            tries: 0,
            retried: false,
            resent: false,
            fresh: false,
            tried: Vec::new(),
            last_not_here: None,
        };
        let mut waiter: Option<(redeliver::Waiter, redeliver::HeldSlot<'_>)> = None;
        loop {
            delivery.tries += 1;
            let backend = Arc::clone(&delivery.backend);
            let request = upstream_request(&parts, &backend.address, Either::Right(Full::new(replay.clone())));
            let fresh = std::mem::take(&mut delivery.fresh);
            match self.send(&backend, request, response_timeout, None, fresh).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if !not_here.as_ref().is_some_and(|config| config.is_not_here(status)) {
                        return self.delivered(key, delivery, response, arrived);
                    }
                    self.metrics.not_here(&backend.id);
                    delivery.last_not_here = Some(buffered(response).await);
                    delivery.tried.push(backend);
                }
                Err(failure) => {
                    if failure == UpstreamFailure::Stale && failure.retryable(&parts.method) && !delivery.resent {
                        // The backend closed a kept-alive connection as the
                        // request went out: the same backend, on a new
                        // connection, before any other candidate.
                        debug!(backend = %backend.id, "resending on a new connection: {failure}");
                        backend.stats.retried();
                        delivery.resent = true;
                        delivery.fresh = true;
                        continue;
                    }
                    if delivery.last_not_here.is_none() {
                        // No instance has said "not here": the one retry rule.
                        let next = if failure.retryable(&parts.method) && !delivery.retried {
                            let table = self.router.load();
                            let held = key.and_then(|id| self.tunnels.registry.holder(id, &table));
                            table.retry_target(key, held, &backend)
                        } else {
                            None
                        };
                        let Some(next) = next else {
                            return (Arc::clone(&backend), self.failed(&backend, failure));
                        };
                        self.health.upstream_failed(&backend, failure);
                        backend.stats.retried();
                        static THROTTLE: Throttle = Throttle::new();
                        if let Some(suppressed) = THROTTLE.allow() {
                            warn!(from = %backend.id, to = %next.id, ?failure, suppressed, "retrying once on the next candidate");
                        }
                        delivery.backend = next;
                        delivery.retried = true;
                        continue;
                    }
                    // Redelivering: a candidate that fails is passed over.
                    self.health.upstream_failed(&backend, failure);
                    delivery.tried.push(backend);
                }
            }
            // An instance said "not here" (else the loop went on or returned).
            let (Some(config), Some(device)) = (&not_here, key) else {
                return self.gave_up(key, delivery, arrived);
            };
            if let Some(next) = self.next_candidate(device, config.candidates, &delivery.tried) {
                delivery.backend = next;
                continue;
            }
            // Every candidate said "not here": hold the request until the
            // device's socket may have shown up, then walk again.
            let deadline = redeliver::deadline(arrived, config.retry_for);
            loop {
                if tokio::time::Instant::now() >= deadline {
                    return self.gave_up(key, delivery, arrived);
                }
                if waiter.is_none() {
                    let Some(slot) = self.held.try_hold(config.max_held) else {
                        self.metrics.redelivery("refused", delivery.tries, arrived.elapsed());
                        let reason = format!(
                            "{} requests are already waiting for their device's socket (routing.not_here.max_held)\n",
                            self.held.now()
                        );
                        return (delivery.backend, text_response(StatusCode::SERVICE_UNAVAILABLE, reason));
                    };
                    let wait = redeliver::Waiter::new(
                        &self.tunnels.registry,
                        self.router.subscribe(),
                        self.tunnels.close.clone(),
                    );
                    waiter = Some((wait, slot));
                }
                let Some((wait, _slot)) = waiter.as_mut() else {
                    return self.gave_up(key, delivery, arrived);
                };
                let registry = &self.tunnels.registry;
                let has_tunnel = || !registry.tunnels_of(device).is_empty();
                if wait.wait(deadline, has_tunnel).await == redeliver::Wake::GiveUp {
                    return self.gave_up(key, delivery, arrived);
                }
                delivery.tried.clear();
                if let Some(next) = self.next_candidate(device, config.candidates, &delivery.tried) {
                    delivery.backend = next;
                    break;
                }
            }
        }
    }

    /// The client's answer to a failure, after telling health and metrics.
    fn failed(&self, backend: &Backend, failure: UpstreamFailure) -> Response<ProxyBody> {
        self.health.upstream_failed(backend, failure);
        match failure {
            UpstreamFailure::ClientStalled => self.metrics.limit_hit(Limit::ClientBodyTimeout),
            UpstreamFailure::ClientTooLarge => self.metrics.limit_hit(Limit::ClientMaxBodySize),
            _ => {}
        }
        failure.response(backend)
    }

    /// The first of the device's redelivery candidates (at most `limit`)
    /// that has not answered in this walk.
    fn next_candidate(&self, device: &[u8], limit: usize, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let table = self.router.load();
        let held = self.tunnels.registry.holder(device, &table);
        table
            .redelivery_candidates(device, held)
            .take(limit)
            .map(|c| c.backend)
            .find(|b| !tried.iter().any(|t| t.id == b.id))
    }

    /// A response that is not "not here": counted and logged as a
    /// redelivery if an instance said "not here" before.
    fn delivered(
        &self,
        key: Option<&[u8]>,
        delivery: Delivery,
        response: Response<ProxyBody>,
        arrived: Instant,
    ) -> (Arc<Backend>, Response<ProxyBody>) {
        if delivery.last_not_here.is_some() {
            self.log_redelivery(key, "delivered", &delivery, arrived);
        }
        (delivery.backend, response)
    }

    /// Every try said "not here" (or failed) until `retry_for` passed: the
    /// last not-here answer goes to the client unchanged.
    fn gave_up(&self, key: Option<&[u8]>, delivery: Delivery, arrived: Instant) -> (Arc<Backend>, Response<ProxyBody>) {
        self.log_redelivery(key, "gave_up", &delivery, arrived);
        let answered = delivery.tried.last().cloned().unwrap_or_else(|| Arc::clone(&delivery.backend));
        let response = delivery
            .last_not_here
            .unwrap_or_else(|| text_response(StatusCode::BAD_GATEWAY, "no instance holds the device's socket\n"));
        (answered, response)
    }

    fn log_redelivery(&self, key: Option<&[u8]>, outcome: &'static str, delivery: &Delivery, arrived: Instant) {
        let took = arrived.elapsed();
        self.metrics.redelivery(outcome, delivery.tries, took);
        let backend = delivery.tried.last().filter(|_| outcome == "gave_up").unwrap_or(&delivery.backend);
        if let Some(device) = key {
            let record = redeliver::Redelivery {
                outcome,
                tries: delivery.tries,
                backend: backend.id.clone(),
                took,
                at: std::time::SystemTime::now(),
            };
            self.deliveries.record(device, record);
            info!(
                device = %String::from_utf8_lossy(device),
                backend = %backend.id,
                tries = delivery.tries,
                ?took,
                "{}",
                if outcome == "delivered" { "redelivered after a not-here answer" } else { "gave up: no instance holds the device's socket" }
            );
        }
    }

    /// Sends one request (on a new connection if `fresh`). `response_timeout`
    /// runs from when the body has been sent (`uploaded`, for streamed
    /// bodies), so a slow upload is not mistaken for a slow backend.
    async fn send(
        &self,
        backend: &Backend,
        request: Result<Request<UpstreamBody>, UpstreamFailure>,
        response_timeout: Duration,
        uploaded: Option<Arc<Upload>>,
        fresh: bool,
    ) -> Result<Response<ProxyBody>, UpstreamFailure> {
        let request = request?;
        let to = Endpoint { address: &backend.address, tls: backend.tls.as_ref() };
        let exchange = self.pool.send(to, request, fresh);
        tokio::pin!(exchange);
        if let Some(uploaded) = uploaded {
            let early = tokio::select! {
                answer = &mut exchange => Some(answer),
                _ = uploaded.done.notified() => None,
            };
            if let Some(answer) = early {
                return answer_of(answer, &self.metrics);
            }
        }
        match tokio::time::timeout(response_timeout, exchange).await {
            Ok(answer) => answer_of(answer, &self.metrics),
            Err(_) => Err(UpstreamFailure::Timeout),
        }
    }
}

fn answer_of(
    answer: Result<Response<Incoming>, UpstreamFailure>,
    metrics: &Metrics,
) -> Result<Response<ProxyBody>, UpstreamFailure> {
    if let Err(UpstreamFailure::QueueTimeout { .. }) = answer {
        metrics.limit_hit(Limit::QueueTimeout);
    }
    let mut response = answer?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Only an upgrade may be answered with 101 (those go through
        // `tunnel`); passed on, the client would read a protocol it never
        // asked for. HAProxy answers 502 too.
        info!(status = 502, "the backend answered 101 to a request that asked for no upgrade");
        return Ok(text_response(
            StatusCode::BAD_GATEWAY,
            "the backend switched protocols on a request that asked for no upgrade\n",
        ));
    }
    strip_hop_by_hop(response.headers_mut());
    Ok(response.map(Either::Left))
}
