//! Prometheus metrics, served as text on the admin port at `GET /metrics`.
//!
//! One [`Metrics`] registry lives as long as the process. Per-backend
//! series are resolved into a [`BackendStats`] of plain handles when a
//! routing snapshot is built, so the request path increments atomics and
//! never looks a series up by its labels; when a backend leaves the config,
//! its series are removed. No label ever carries a device ID.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Status codes that get a pre-resolved counter per backend; any other code
/// is looked up in its family (a read lock), which is rare by definition.
const COMMON_CODES: [u16; 16] = [101, 200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendCode {
    backend: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendKind {
    backend: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendDirection {
    backend: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendResult {
    backend: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendTo {
    backend: String,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeTries {
    outcome: &'static str,
    tries: &'static str,
}

/// The `tries` label of `redeliveries_total`, up to 4 (then `5+`).
const TRIES: [&str; 6] = ["0", "1", "2", "3", "4", "5+"];

/// The `outcome` label of `redeliveries_total`.
const REDELIVERY_OUTCOMES: [&str; 3] = ["delivered", "gave_up", "refused"];

/// The `backend` label of `requests_total` for the proxy's own answers that
/// no backend was chosen for: 400 (no device ID), 503 (every backend down
/// or draining), 405 (CONNECT), 413 (body too large).
pub const NO_BACKEND: &str = "-";

/// Codes the proxy answers by itself, before any backend is chosen: each
/// `requests_total{backend="-",code}` exists from the start at 0.
const NO_BACKEND_CODES: [u16; 4] = [400, 405, 413, 503];

/// The `kind` label of `accept_errors_total` (every series exists at 0).
pub(crate) const ACCEPT_ERROR_KINDS: [&str; 4] = ["fd_limit", "no_memory", "connection", "other"];

/// The `result` label of `config_reloads_total`.
const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsResult {
    dns: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// A limit or timeout that ended a connection or refused a request; the
/// `limit` label of `sticky_proxy_limits_total` is the setting's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `server.max_connections`: a new client connection was refused.
    MaxConnections,
    /// `server.client_max_body_size`: a request body was too large (413).
    ClientMaxBodySize,
    /// `server.client_body_timeout`: a request body stalled (408).
    ClientBodyTimeout,
    /// `server.send_timeout`: a client stopped reading its response.
    SendTimeout,
    /// `server.keepalive_timeout`: an idle keep-alive connection was closed.
    KeepaliveTimeout,
    /// `server.header_read_timeout`: a request's headers came too slowly.
    HeaderReadTimeout,
    /// `server.tunnel_idle_timeout`: an idle WebSocket tunnel was closed.
    TunnelIdleTimeout,
    /// `upstream.queue_timeout`: no connection to the backend came free
    /// under `upstream.max_connections` (503).
    QueueTimeout,
}

impl Limit {
    /// Every limit, so each series exists (at 0) from the start.
    pub(crate) const ALL: [Limit; 8] = [
        Limit::MaxConnections,
        Limit::ClientMaxBodySize,
        Limit::ClientBodyTimeout,
        Limit::SendTimeout,
        Limit::KeepaliveTimeout,
        Limit::HeaderReadTimeout,
        Limit::TunnelIdleTimeout,
        Limit::QueueTimeout,
    ];

    /// The setting's name, as in the config file.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Limit::MaxConnections => "server.max_connections",
            Limit::ClientMaxBodySize => "server.client_max_body_size",
            Limit::ClientBodyTimeout => "server.client_body_timeout",
            Limit::SendTimeout => "server.send_timeout",
            Limit::KeepaliveTimeout => "server.keepalive_timeout",
            Limit::HeaderReadTimeout => "server.header_read_timeout",
            Limit::TunnelIdleTimeout => "server.tunnel_idle_timeout",
            Limit::QueueTimeout => "upstream.queue_timeout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabel {
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

const ERROR_KINDS: [&str; 3] = ["connect", "timeout", "reset"];

/// Upper bounds past the doubling buckets, up to twice the default
/// `upstream.response_timeout` (60 s).
const SLOW_BUCKETS: [f64; 4] = [15.0, 30.0, 60.0, 120.0];

fn latency_histogram() -> Histogram {
    // 0.25 ms … 8.192 s doubling (fine resolution for fast requests),
    // then 15, 30, 60 and 120 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16).chain(SLOW_BUCKETS))
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<BackendCode, Counter>,
    duration: Family<BackendLabel, Histogram, fn() -> Histogram>,
    upstream_errors: Family<BackendKind, Counter>,
    missing_key: Counter,
    ws_open: Family<BackendLabel, Gauge>,
    ws_total: Family<BackendLabel, Counter>,
    ws_bytes: Family<BackendDirection, Counter>,
    /// `requests_total{backend="-",code}` for [`NO_BACKEND_CODES`].
    no_backend: [(u16, Counter); NO_BACKEND_CODES.len()],
    in_flight: Gauge,
    client_connections: Gauge,
    worker_connections: Family<WorkerLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    last_reload_success: Gauge<f64, AtomicU64>,
    last_reload_ok: Gauge,
    backend_draining: Family<BackendLabel, Gauge>,
    backends: Family<StateLabel, Gauge>,
    admin_unauthorized: Counter,
    accept_errors: Family<KindLabel, Counter>,
    limits: Family<LimitLabel, Counter>,
    backend_up: Family<BackendLabel, Gauge>,
    health_checks: Family<BackendResult, Counter>,
    health_check_duration: Family<BackendLabel, Histogram, fn() -> Histogram>,
    health_transitions: Family<BackendTo, Counter>,
    failovers: Family<BackendLabel, Counter>,
    retries: Family<BackendLabel, Counter>,
    tls_handshake_failures: Family<ReasonLabel, Counter>,
    routed_by_tunnel: Counter,
    routed_by_ring: Counter,
    misplaced: Family<BackendLabel, Gauge>,
    migrations: Family<BackendLabel, Counter>,
    not_here: Family<BackendLabel, Counter>,
    redeliveries: Family<OutcomeTries, Counter>,
    redelivery_held: Histogram,
    discovery: Family<DnsResult, Counter>,
    /// Per backend id: set when the backend leaves the config, so handles
    /// still held by requests and tunnels in flight stop creating series.
    retired: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    /// Responses per backend for the admin API (not exported: the sum of
    /// `requests_total` over codes says the same).
    served: Family<BackendLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every series registered (a backend's own series
    /// are added when a routing snapshot first names it).
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            missing_key: Counter::default(),
            ws_open: Family::default(),
            ws_total: Family::default(),
            ws_bytes: Family::default(),
            no_backend: NO_BACKEND_CODES.map(|code| (code, Counter::default())),
            in_flight: Gauge::default(),
            client_connections: Gauge::default(),
            worker_connections: Family::default(),
            reloads: Family::default(),
            last_reload_success: Gauge::default(),
            last_reload_ok: Gauge::default(),
            backend_draining: Family::default(),
            backends: Family::default(),
            admin_unauthorized: Counter::default(),
            accept_errors: Family::default(),
            limits: Family::default(),
            served: Family::default(),
            retired: Arc::default(),
            backend_up: Family::default(),
            health_checks: Family::default(),
            health_check_duration: Family::new_with_constructor(latency_histogram),
            health_transitions: Family::default(),
            failovers: Family::default(),
            retries: Family::default(),
            tls_handshake_failures: Family::default(),
            routed_by_tunnel: Counter::default(),
            routed_by_ring: Counter::default(),
            misplaced: Family::default(),
            migrations: Family::default(),
            not_here: Family::default(),
            redeliveries: Family::default(),
            redelivery_held: latency_histogram(),
            discovery: Family::default(),
        };
        m.registry.register_collector(Box::new(ProcessCollector));
        let r = m.registry.sub_registry_with_prefix("sticky_proxy");
        for (code, counter) in &mut m.no_backend {
            *counter = m.requests.get_or_create_owned(&BackendCode { backend: NO_BACKEND.to_string(), code: *code });
        }
        r.register(
            "requests",
            "HTTP responses sent, by backend and status code (backend \"-\": answered by the proxy, no backend chosen)",
            m.requests.clone(),
        );
        r.register(
            "requests_in_flight",
            "HTTP requests on the proxy's listeners from arrival until their response body is sent",
            m.in_flight.clone(),
        );
        r.register(
            "client_connections",
            "Open client connections on the proxy's listeners (cleartext and TLS; not the admin's)",
            m.client_connections.clone(),
        );
        r.register(
            "worker_connections",
            "Client connections accepted on the proxy's listeners, by worker (thread-per-core; else all worker 0)",
            m.worker_connections.clone(),
        );
        r.register("request_duration_seconds", "Time from request to response headers, by backend", m.duration.clone());
        r.register(
            "upstream_errors",
            "Requests that got no response from their backend, by kind (connect, timeout, reset)",
            m.upstream_errors.clone(),
        );
        r.register("missing_key", "Requests that carried no device ID", m.missing_key.clone());
        // Not `websocket_connections`: that base name is the counter's
        // (`websocket_connections_total`), and one name is one family.
        r.register("websockets_open", "Open WebSocket tunnels, by backend", m.ws_open.clone());
        r.register("websocket_connections", "WebSocket tunnels opened, by backend", m.ws_total.clone());
        r.register(
            "websocket_bytes",
            "Bytes carried by WebSocket tunnels, by backend and direction (up: device to backend)",
            m.ws_bytes.clone(),
        );
        for result in RELOAD_RESULTS {
            let _ = m.reloads.get_or_create(&ResultLabel { result });
        }
        r.register("config_reloads", "Config reloads, by result", m.reloads.clone());
        r.register(
            "config_last_reload_successful",
            "1 if the last config load or reload succeeded, 0 if it failed (the previous config still runs)",
            m.last_reload_ok.clone(),
        );
        r.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load",
            m.last_reload_success.clone(),
        );
        r.register("backends", "Configured backends, by state (up, down, draining)", m.backends.clone());
        r.register(
            "backend_draining",
            "1 while the backend is draining (no new requests; backend_up may still say 1), else 0",
            m.backend_draining.clone(),
        );
        r.register(
            "admin_unauthorized",
            "Admin API calls refused for a missing or wrong token",
            m.admin_unauthorized.clone(),
        );
        for kind in ACCEPT_ERROR_KINDS {
            let _ = m.accept_errors.get_or_create(&KindLabel { kind });
        }
        r.register(
            "accept_errors",
            "Failed accepts on the proxy and admin listeners, by kind (fd_limit, no_memory, connection, other)",
            m.accept_errors.clone(),
        );
        for limit in Limit::ALL {
            let _ = m.limits.get_or_create(&LimitLabel { limit: limit.name() });
        }
        r.register(
            "limits",
            "Connections closed and requests refused by a limit or timeout, by setting (e.g. server.send_timeout)",
            m.limits.clone(),
        );
        r.register("backend_up", "1 while the backend takes traffic, 0 while it is down", m.backend_up.clone());
        r.register("health_checks", "Active health checks and probes, by backend and result", m.health_checks.clone());
        r.register(
            "health_check_duration_seconds",
            "Time an active health check or probe took, by backend",
            m.health_check_duration.clone(),
        );
        r.register(
            "discovery_resolutions",
            "DNS lookups of [[discovery]] names, by name and result (ok, empty, error)",
            m.discovery.clone(),
        );
        r.register(
            "health_transitions",
            "Backends turning up or down, by backend and new state",
            m.health_transitions.clone(),
        );
        r.register(
            "failovers",
            "Requests served by a failover owner because their ring owner was down, by ring owner",
            m.failovers.clone(),
        );
        r.register(
            "retries",
            "Requests sent again after a failed try (to the next candidate, or on a new connection when a kept-alive one closed under them), by the backend that failed; one request can be sent again twice",
            m.retries.clone(),
        );
        let routed: Family<ViaLabel, Counter> = Family::default();
        m.routed_by_tunnel = routed.get_or_create_owned(&ViaLabel { via: "tunnel" });
        m.routed_by_ring = routed.get_or_create_owned(&ViaLabel { via: "ring" });
        r.register(
            "http_routed",
            "HTTP requests with a device ID, by what chose their backend: the device's open tunnel, or the ring",
            routed,
        );
        r.register(
            "tunnels_misplaced",
            "Open tunnels whose device would now be routed to another backend, by the backend holding them",
            m.misplaced.clone(),
        );
        r.register(
            "tunnel_migrations",
            "Misplaced tunnels closed with 1012 so their device reconnects to its owner, by the backend left",
            m.migrations.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Client TLS handshakes that failed, by reason (timeout, closed, not_tls, protocol, incompatible, alert, other)",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "not_here",
            "Answers meaning \"this instance does not hold the device\" (routing.not_here.status), by backend",
            m.not_here.clone(),
        );
        for outcome in REDELIVERY_OUTCOMES {
            for tries in TRIES {
                let _ = m.redeliveries.get_or_create(&OutcomeTries { outcome, tries });
            }
        }
        r.register(
            "redeliveries",
            "Requests that met a not-here answer, by outcome (delivered, gave_up, refused: too many held) and tries",
            m.redeliveries.clone(),
        );
        r.register(
            "redelivery_held_seconds",
            "Time a request that met a not-here answer spent until delivered or given up",
            m.redelivery_held.clone(),
        );
        let build_info: Family<VersionLabel, Gauge> = Family::default();
        build_info.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.register("build_info", "Always 1, labelled with the version", build_info);
        m
    }

    /// The exposition in Prometheus' text format 0.0.4
    /// ([`CLASSIC_CONTENT_TYPE`]).
    ///
    /// prometheus-client writes OpenMetrics, where a counter family `x`
    /// owns the sample name `x_total`; in the classic format counter
    /// families are named with their `_total` suffix, and the
    /// OpenMetrics-only `# UNIT` and `# EOF` lines are dropped.
    pub(crate) fn encode(&self) -> String {
        to_classic_text(&self.encode_openmetrics())
    }

    /// The exposition in OpenMetrics 1.0 text ([`OPENMETRICS_CONTENT_TYPE`]),
    /// ending in `# EOF`.
    pub(crate) fn encode_openmetrics(&self) -> String {
        let mut openmetrics = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut openmetrics, &self.registry).is_err() {
            return "# metrics encoding failed\n".to_string();
        }
        openmetrics
    }

    /// The exposition a scraper asked for with `accept` (its `Accept`
    /// header), and its content type: OpenMetrics when it names
    /// `application/openmetrics-text` (with a q above 0), else 0.0.4 text.
    pub(crate) fn encode_for(&self, accept: Option<&str>) -> (String, &'static str) {
        if accept.is_some_and(wants_openmetrics) {
            (self.encode_openmetrics(), OPENMETRICS_CONTENT_TYPE)
        } else {
            (self.encode(), CLASSIC_CONTENT_TYPE)
        }
    }

    /// Handles for one backend's series (created if new).
    pub(crate) fn backend(&self, id: &str) -> BackendStats {
        // New backends start up; a known one keeps its gauge as it is.
        if self.backend_up.get(&BackendLabel { backend: id.to_string() }).is_none() {
            self.backend_up.get_or_create(&BackendLabel { backend: id.to_string() }).set(1);
        }
        let label = || BackendLabel { backend: id.to_string() };
        let code = |code| self.requests.get_or_create_owned(&BackendCode { backend: id.to_string(), code });
        let kind = |kind| self.upstream_errors.get_or_create_owned(&BackendKind { backend: id.to_string(), kind });
        let bytes =
            |direction| self.ws_bytes.get_or_create_owned(&BackendDirection { backend: id.to_string(), direction });
        let retired =
            Arc::clone(self.retired.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_string()).or_default());
        // Every series of a backend exists from when it is added, at 0.
        for result in ["success", "failure"] {
            let _ = self.health_checks.get_or_create(&BackendResult { backend: id.to_string(), result });
        }
        for to in ["up", "down"] {
            let _ = self.health_transitions.get_or_create(&BackendTo { backend: id.to_string(), to });
        }
        let _ = self.health_check_duration.get_or_create(&label());
        let _ = self.migrations.get_or_create(&label());
        let _ = self.not_here.get_or_create(&label());
        BackendStats {
            retired,
            registry: Arc::clone(&self.retired),
            ws_family: self.ws_open.clone(),
            id: id.to_string(),
            common_codes: COMMON_CODES.map(|c| (c, code(c))),
            requests: self.requests.clone(),
            duration: self.duration.get_or_create_owned(&label()),
            errors: ERROR_KINDS.map(kind),
            served: self.served.get_or_create_owned(&label()),
            failovers: self.failovers.get_or_create_owned(&label()),
            retries: self.retries.get_or_create_owned(&label()),
            ws_open: self.ws_open.get_or_create_owned(&label()),
            ws_total: self.ws_total.get_or_create_owned(&label()),
            bytes_up: bytes("up"),
            bytes_down: bytes("down"),
            draining: self.backend_draining.get_or_create_owned(&label()),
        }
    }

    /// Drops every series of a backend that left the config. Its open-tunnel
    /// gauge stays while its tunnels do (they stay open across the reload)
    /// and goes when the last one closes.
    pub(crate) fn remove_backend(&self, id: &str) {
        if let Some(flag) = self.retired.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            flag.store(true, Ordering::Relaxed);
        }
        let backend = id.to_string();
        for code in 100..=599 {
            self.requests.remove(&BackendCode { backend: backend.clone(), code });
        }
        for kind in ERROR_KINDS {
            self.upstream_errors.remove(&BackendKind { backend: backend.clone(), kind });
        }
        for direction in ["up", "down"] {
            self.ws_bytes.remove(&BackendDirection { backend: backend.clone(), direction });
        }
        let label = BackendLabel { backend };
        self.duration.remove(&label);
        self.served.remove(&label);
        self.backend_up.remove(&label);
        self.backend_draining.remove(&label);
        self.health_check_duration.remove(&label);
        self.failovers.remove(&label);
        self.retries.remove(&label);
        self.migrations.remove(&label);
        self.not_here.remove(&label);
        for result in ["success", "failure"] {
            self.health_checks.remove(&BackendResult { backend: label.backend.clone(), result });
        }
        for to in ["up", "down"] {
            self.health_transitions.remove(&BackendTo { backend: label.backend.clone(), to });
        }
        if self.ws_open.get(&label).is_none_or(|open| open.get() <= 0) {
            self.ws_open.remove(&label);
        }
        self.ws_total.remove(&label);
    }

    /// `backend` answered a device's request with a not-here status.
    pub(crate) fn not_here(&self, backend: &str) {
        self.not_here.get_or_create(&BackendLabel { backend: backend.to_string() }).inc();
    }

    /// A request that met a not-here answer ended: `outcome` is
    /// `delivered`, `gave_up` or `refused`, after `tries` sends, `held` after
    /// it arrived.
    pub(crate) fn redelivery(&self, outcome: &'static str, tries: u32, held: Duration) {
        let tries = TRIES[(tries as usize).min(TRIES.len() - 1)];
        self.redeliveries.get_or_create(&OutcomeTries { outcome, tries }).inc();
        self.redelivery_held.observe(held.as_secs_f64());
    }

    /// A backend turned up or down.
    pub(crate) fn health_transition(&self, id: &str, up: bool) {
        let to = if up { "up" } else { "down" };
        self.health_transitions.get_or_create(&BackendTo { backend: id.to_string(), to }).inc();
        self.backend_up.get_or_create(&BackendLabel { backend: id.to_string() }).set(i64::from(up));
    }

    /// An active check or probe finished.
    pub(crate) fn health_check(&self, id: &str, ok: bool, took: Duration) {
        let result = if ok { "success" } else { "failure" };
        self.health_checks.get_or_create(&BackendResult { backend: id.to_string(), result }).inc();
        self.health_check_duration.get_or_create(&BackendLabel { backend: id.to_string() }).observe(took.as_secs_f64());
    }

    /// An HTTP request went to the backend holding its device's tunnel.
    pub(crate) fn routed_by_tunnel(&self) {
        self.routed_by_tunnel.inc();
    }

    /// An HTTP request went where the ring (with failover) said.
    pub(crate) fn routed_by_ring(&self) {
        self.routed_by_ring.inc();
    }

    /// Replaces the misplaced-tunnel gauges: `counts` by backend id (every
    /// current backend should be listed, with 0 where none are misplaced).
    pub(crate) fn set_misplaced<'a>(&self, counts: impl IntoIterator<Item = (&'a str, usize)>) {
        self.misplaced.clear();
        for (id, n) in counts {
            self.misplaced.get_or_create(&BackendLabel { backend: id.to_string() }).set(n as i64);
        }
    }

    /// A misplaced tunnel on `backend` was asked to move.
    pub(crate) fn migration(&self, backend: &str) {
        self.migrations.get_or_create(&BackendLabel { backend: backend.to_string() }).inc();
    }

    /// Creates every handshake failure series at 0 (when a TLS listener
    /// starts), so that dashboards see them before the first failure.
    pub(crate) fn tls_listener_started(&self, reasons: &[&'static str]) {
        for &reason in reasons {
            let _ = self.tls_handshake_failures.get_or_create(&ReasonLabel { reason });
        }
    }

    /// A client's TLS handshake failed.
    pub(crate) fn tls_handshake_failed(&self, reason: &'static str) {
        self.tls_handshake_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A request carried no device ID.
    pub(crate) fn missing_key(&self) {
        self.missing_key.inc();
    }

    /// The proxy answered `code` itself, before any backend was chosen:
    /// counted as `requests_total{backend="-",code}`.
    pub(crate) fn no_backend_response(&self, code: u16) {
        match self.no_backend.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                self.requests.get_or_create(&BackendCode { backend: NO_BACKEND.to_string(), code }).inc();
            }
        }
    }

    /// The gauge of requests in flight on the proxy's listeners, for a
    /// connection to count its requests on: one atomic add per request and
    /// one per response done.
    pub(crate) fn requests_in_flight(&self) -> LiveGauge {
        LiveGauge(self.in_flight.clone())
    }

    /// A client connection on a proxy listener opened; it counts as open
    /// until the returned guard is dropped.
    pub(crate) fn client_connection(&self) -> GaugeGuard {
        self.client_connections.inc();
        GaugeGuard(self.client_connections.clone())
    }

    /// `worker_connections_total` of one worker, its series created at 0;
    /// the accept loop keeps the handle, so counting costs no lookup.
    pub(crate) fn worker_connections(&self, worker: usize) -> Counter {
        self.worker_connections.get_or_create_owned(&WorkerLabel { worker: worker.to_string() })
    }

    /// An admin API call was refused for a missing or wrong token.
    pub(crate) fn admin_unauthorized(&self) {
        self.admin_unauthorized.inc();
    }

    /// A listener's `accept` failed (`kind`: fd_limit, no_memory, connection, other).
    pub(crate) fn accept_error(&self, kind: &'static str) {
        self.accept_errors.get_or_create(&KindLabel { kind }).inc();
    }

    /// A limit or timeout ended a connection or refused a request.
    pub(crate) fn limit_hit(&self, limit: Limit) {
        self.limits.get_or_create(&LimitLabel { limit: limit.name() }).inc();
    }

    /// One lookup of a `[[discovery]]` name: `result` is `ok`, `empty`
    /// (NXDOMAIN or no records) or `error` (timeout, SERVFAIL, no server).
    pub(crate) fn discovery_resolution(&self, dns: &str, result: &'static str) {
        self.discovery.get_or_create(&DnsResult { dns: dns.to_string(), result }).inc();
    }

    /// Counts a reload attempt; a success also stamps the time.
    pub(crate) fn reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
        if success {
            self.loaded_now();
        } else {
            self.last_reload_ok.set(0);
        }
    }

    /// Stamps the time of a successful config load (also the first one).
    pub(crate) fn loaded_now(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_reload_success.set(now.as_secs_f64());
        self.last_reload_ok.set(1);
    }

    /// Sets `sticky_proxy_backends{state}`: how many backends are in each state.
    pub(crate) fn set_backend_states(&self, counts: [(&'static str, usize); 3]) {
        for (state, count) in counts {
            self.backends.get_or_create(&StateLabel { state }).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// One backend's metric handles, resolved when the backend joins the
/// config; clones share the series.
#[derive(Debug, Clone)]
pub struct BackendStats {
    id: String,
    /// Set once this backend has left the config.
    retired: Arc<AtomicBool>,
    /// Which ids are current (to tell a re-added backend from a retired one).
    registry: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    ws_family: Family<BackendLabel, Gauge>,
    common_codes: [(u16, Counter); COMMON_CODES.len()],
    requests: Family<BackendCode, Counter>,
    duration: Histogram,
    served: Counter,
    failovers: Counter,
    retries: Counter,
    errors: [Counter; ERROR_KINDS.len()],
    ws_open: Gauge,
    ws_total: Counter,
    pub(crate) bytes_up: Counter,
    pub(crate) bytes_down: Counter,
    draining: Gauge,
}

impl BackendStats {
    /// Counts a response and how long its headers took.
    pub(crate) fn response(&self, code: u16, elapsed: Duration) {
        match self.common_codes.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => {
                counter.inc();
            }
            // A backend that left the config gets no new series.
            None if self.retired.load(Ordering::Relaxed) => {}
            None => {
                self.requests.get_or_create(&BackendCode { backend: self.id.clone(), code }).inc();
            }
        }
        self.duration.observe(elapsed.as_secs_f64());
        self.served.inc();
    }

    /// A request for a device this backend owns went to its failover owner.
    pub(crate) fn failover(&self) {
        self.failovers.inc();
    }

    /// A request whose connect to this backend failed was retried elsewhere.
    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    /// Counts a request this backend gave no response to, by `kind`
    /// (one of `ERROR_KINDS`: connect, timeout, reset).
    pub(crate) fn upstream_error(&self, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.errors[i].inc();
        }
    }

    /// A tunnel opened; the returned guard marks it closed when dropped.
    pub(crate) fn tunnel_opened(&self) -> TunnelGauge {
        self.ws_total.inc();
        self.ws_open.inc();
        TunnelGauge {
            open: self.ws_open.clone(),
            retired: Arc::clone(&self.retired),
            registry: Arc::clone(&self.registry),
            family: self.ws_family.clone(),
            id: self.id.clone(),
        }
    }

    /// Requests answered so far (every response is observed once).
    pub(crate) fn served(&self) -> u64 {
        self.served.get()
    }

    /// Tunnels open now.
    pub(crate) fn open_tunnels(&self) -> i64 {
        self.ws_open.get()
    }

    /// Sets `backend_draining` (1 while draining).
    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }
}

/// A gauge counted up and down by its holder (requests in flight).
#[derive(Debug, Clone)]
pub(crate) struct LiveGauge(Gauge);

impl LiveGauge {
    pub(crate) fn inc(&self) {
        self.0.inc();
    }

    pub(crate) fn dec(&self) {
        self.0.dec();
    }
}

/// Decrements a gauge when dropped (an open connection).
#[derive(Debug)]
pub(crate) struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Decrements the open-tunnel gauge when the tunnel ends, however it ends.
#[derive(Debug)]
pub(crate) struct TunnelGauge {
    open: Gauge,
    retired: Arc<AtomicBool>,
    registry: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    family: Family<BackendLabel, Gauge>,
    id: String,
}

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        let left = self.open.dec() - 1;
        // The last tunnel of a backend that left the config (and was not
        // added back since) takes the gauge's series with it.
        if left <= 0 && self.retired.load(Ordering::Relaxed) {
            // Held across the removal: a reload adding the backend back
            // registers it before it creates the series, so it either is
            // seen here or creates the series after the removal.
            let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            if !registry.contains_key(&self.id) {
                self.family.remove(&BackendLabel { backend: self.id.clone() });
            }
        }
    }
}

/// `process_*` metrics from /proc/self, read at scrape time (Linux only;
/// elsewhere they are omitted).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessStats::read() else { return Ok(()) };
        let gauge =
            |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64| -> Result<(), std::fmt::Error> {
                let g = ConstGauge::new(value);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
            };
        gauge(&mut encoder, "process_resident_memory_bytes", "Resident memory size in bytes", p.resident_bytes)?;
        gauge(&mut encoder, "process_open_fds", "Open file descriptors", p.open_fds)?;
        gauge(&mut encoder, "process_max_fds", "Limit of open file descriptors", p.max_fds)?;
        gauge(&mut encoder, "process_start_time_seconds", "Start time since the Unix epoch, seconds", p.start_time)?;
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time, seconds",
            None,
            cpu.metric_type(),
        )?)
    }
}

struct ProcessStats {
    resident_bytes: f64,
    cpu_seconds: f64,
    open_fds: f64,
    max_fds: f64,
    start_time: f64,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        // Fields after the command name (which may contain spaces) in /proc/self/stat.
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        // Linux reports these in clock ticks and pages; USER_HZ is 100 and
        // pages are 4 KiB on every mainstream Linux target.
        let ticks = 100.0;
        let page = 4096.0;
        let cpu_seconds = (field(14)? + field(15)?) / ticks;
        let resident_bytes = field(24)? * page;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok())));
        let start_time = boot_time.map_or(0.0, |b| b + field(22).unwrap_or(0.0) / ticks);
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as f64;
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<f64>().ok()))
        });
        Some(ProcessStats { resident_bytes, cpu_seconds, open_fds, max_fds: max_fds.unwrap_or(0.0), start_time })
    }
}

/// The content type of [`Metrics::encode`].
pub(crate) const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of [`Metrics::encode_openmetrics`].
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header names OpenMetrics text with a q above 0, as
/// Prometheus sends (`application/openmetrics-text;version=1.0.0;q=0.5,
/// text/plain;version=0.0.4;q=0.4,*/*;q=0.1`). A version other than 1.0.0
/// (or none) is served 1.0.0, the only one there is.
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("");
        if !media.eq_ignore_ascii_case("application/openmetrics-text") {
            return false;
        }
        let q = params
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, v)| v.trim().parse::<f64>().ok());
        q.is_some_and(|q| q > 0.0)
    })
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4 (see
/// [`Metrics::encode`]).
fn to_classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            pending_help = Some(line);
            continue;
        }
        if let Some(name) = line.strip_prefix("# TYPE ").and_then(|t| t.strip_suffix(" counter")) {
            if let Some(help) = pending_help.take() {
                let text = help.strip_prefix("# HELP ").and_then(|h| h.strip_prefix(name)).unwrap_or("");
                out.push_str(&format!("# HELP {name}_total{text}\n"));
            }
            out.push_str(&format!("# TYPE {name}_total counter\n"));
            continue;
        }
        if let Some(help) = pending_help.take() {
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_and_gauges_keep_their_name() {
        let text = to_classic_text(
            "# HELP a_x Open.\n# TYPE a_x gauge\na_x 1\n# HELP a_x Opened.\n# TYPE a_x counter\na_x_total 5\n# UNIT a_s seconds\n# EOF\n",
        );
        assert_eq!(
            text,
            "# HELP a_x Open.\n# TYPE a_x gauge\na_x 1\n# HELP a_x_total Opened.\n# TYPE a_x_total counter\na_x_total 5\n"
        );
    }

    #[test]
    fn backend_series_appear_and_disappear() {
        let m = Metrics::new();
        let stats = m.backend("app-9");
        stats.response(200, Duration::from_millis(3));
        stats.response(418, Duration::from_millis(3));
        let tunnel = stats.tunnel_opened();
        let text = m.encode();
        assert!(text.contains("sticky_proxy_requests_total{backend=\"app-9\",code=\"200\"} 1"), "{text}");
        assert!(text.contains("sticky_proxy_requests_total{backend=\"app-9\",code=\"418\"} 1"), "{text}");
        assert!(text.contains("sticky_proxy_websockets_open{backend=\"app-9\"} 1"), "{text}");
        assert!(text.contains("sticky_proxy_websocket_connections_total{backend=\"app-9\"} 1"), "{text}");
        assert!(text.contains("# TYPE sticky_proxy_websocket_connections_total counter"), "{text}");
        assert_eq!(stats.served(), 2);
        drop(tunnel);
        assert_eq!(stats.open_tunnels(), 0);
        m.remove_backend("app-9");
        assert!(!m.encode().contains("app-9"), "removed backend's series are gone");
    }

    #[test]
    fn a_removed_backend_keeps_its_tunnel_gauge_until_the_last_tunnel_and_grows_no_new_series() {
        let m = Metrics::new();
        let stats = m.backend("gone");
        let tunnel = stats.tunnel_opened();
        m.remove_backend("gone");
        let text = m.encode();
        assert!(text.contains("sticky_proxy_websockets_open{backend=\"gone\"} 1"), "{text}");
        assert!(!text.contains("sticky_proxy_requests_total{backend=\"gone\""), "{text}");
        // An in-flight request finishing with an uncommon code: no resurrection.
        stats.response(206, Duration::from_millis(1));
        assert!(!m.encode().contains("code=\"206\""));
        drop(tunnel);
        assert!(!m.encode().contains("backend=\"gone\""), "the last tunnel took the gauge with it");

        // Re-added while a tunnel of its earlier life is open: the gauge stays.
        let first = m.backend("back");
        let old_tunnel = first.tunnel_opened();
        m.remove_backend("back");
        let second = m.backend("back");
        drop(old_tunnel);
        let _new_tunnel = second.tunnel_opened();
        assert!(m.encode().contains("sticky_proxy_websockets_open{backend=\"back\"} 1"));
    }

    #[test]
    fn process_metrics_are_exported() {
        let text = Metrics::new().encode();
        for name in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "sticky_proxy_build_info{version=",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }

    #[test]
    fn openmetrics_is_served_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
        for (accept, openmetrics) in [
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain"), false),
            (Some(prometheus), true),
            (Some("application/openmetrics-text"), true),
            (Some("Application/OpenMetrics-Text; version=0.0.1"), true),
            (Some("application/openmetrics-text;q=0, text/plain"), false),
            (Some("application/openmetrics-text;q=x"), false),
        ] {
            let (text, content_type) = Metrics::new().encode_for(accept);
            assert_eq!(content_type == OPENMETRICS_CONTENT_TYPE, openmetrics, "{accept:?}");
            assert_eq!(text.ends_with("# EOF\n"), openmetrics, "{accept:?}");
            if !openmetrics {
                assert_eq!(content_type, CLASSIC_CONTENT_TYPE);
            }
        }
    }

    #[test]
    fn latency_buckets_reach_past_the_default_response_timeout() {
        let m = Metrics::new();
        m.backend("b").response(200, Duration::from_secs(45));
        let text = m.encode();
        for le in ["0.00025", "0.0005", "0.001", "8.192", "15.0", "30.0", "60.0", "120.0", "+Inf"] {
            assert!(
                text.contains(&format!("sticky_proxy_request_duration_seconds_bucket{{le=\"{le}\",backend=\"b\"}}")),
                "{le}:\n{text}"
            );
        }
        assert!(text.contains("sticky_proxy_request_duration_seconds_bucket{le=\"30.0\",backend=\"b\"} 0"), "{text}");
        assert!(text.contains("sticky_proxy_request_duration_seconds_bucket{le=\"60.0\",backend=\"b\"} 1"), "{text}");
    }

    #[test]
    fn every_finite_series_exists_from_the_start() {
        let m = Metrics::new();
        let _stats = m.backend("b");
        let text = m.encode();
        for series in [
            "sticky_proxy_config_reloads_total{result=\"success\"} 0",
            "sticky_proxy_config_reloads_total{result=\"failure\"} 0",
            "sticky_proxy_accept_errors_total{kind=\"fd_limit\"} 0",
            "sticky_proxy_accept_errors_total{kind=\"other\"} 0",
            "sticky_proxy_redeliveries_total{outcome=\"gave_up\",tries=\"5+\"} 0",
            "sticky_proxy_requests_total{backend=\"-\",code=\"400\"} 0",
            "sticky_proxy_requests_total{backend=\"-\",code=\"503\"} 0",
            "sticky_proxy_health_transitions_total{backend=\"b\",to=\"down\"} 0",
            "sticky_proxy_health_checks_total{backend=\"b\",result=\"failure\"} 0",
            "sticky_proxy_tunnel_migrations_total{backend=\"b\"} 0",
            "sticky_proxy_not_here_total{backend=\"b\"} 0",
            "sticky_proxy_backend_draining{backend=\"b\"} 0",
            "sticky_proxy_requests_in_flight 0",
            "sticky_proxy_client_connections 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        m.remove_backend("b");
        assert!(!m.encode().contains("backend=\"b\""), "a removed backend's series are gone");
    }

    #[test]
    fn reload_results_and_gauges() {
        let m = Metrics::new();
        m.loaded_now();
        assert!(m.encode().contains("sticky_proxy_config_last_reload_successful 1"));
        m.reload(false);
        assert!(m.encode().contains("sticky_proxy_config_last_reload_successful 0"));
        m.reload(true);
        assert!(m.encode().contains("sticky_proxy_config_last_reload_successful 1"));
        let requests = m.requests_in_flight();
        requests.inc();
        let connection = m.client_connection();
        let text = m.encode();
        assert!(text.contains("sticky_proxy_requests_in_flight 1"), "{text}");
        assert!(text.contains("sticky_proxy_client_connections 1"), "{text}");
        requests.dec();
        drop(connection);
        let text = m.encode();
        assert!(text.contains("sticky_proxy_requests_in_flight 0"), "{text}");
        assert!(text.contains("sticky_proxy_client_connections 0"), "{text}");
        m.no_backend_response(400);
        m.no_backend_response(418);
        let text = m.encode();
        assert!(text.contains("sticky_proxy_requests_total{backend=\"-\",code=\"400\"} 1"), "{text}");
        assert!(text.contains("sticky_proxy_requests_total{backend=\"-\",code=\"418\"} 1"), "{text}");
    }
}
