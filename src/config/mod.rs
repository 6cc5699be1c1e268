//! The TOML configuration: parsing, defaults and validation.
//!
//! A file is read into raw serde structs (unknown keys are rejected), then
//! checked field by field into a [`Config`] whose values are known-good:
//! addresses parse, key patterns compile, backend ids are unique, weights are
//! positive. Every error names the file, line and field, so an operator can go
//! straight to the mistake. Nothing here touches the network.

mod toml_error;

use std::cell::RefCell;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::http::uri::Authority;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use toml::Spanned;

use crate::routing::key::KeySource;
use crate::routing::ring;
use crate::tls::{self, CertStore, ClientConfigs, PairError, UpstreamTls};
use crate::util::fs::read_capped;

mod discovery;
pub use discovery::{BackendSource, DiscoveryConfig, RecordKind};

/// Upper bound on ring points (sum of weight × replicas over all backends):
/// 10 million points is 80 MB of ring, far beyond any sane deployment.
const MAX_RING_POINTS: u64 = 10_000_000;

/// Longest duration accepted anywhere: timers past it would overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Most worker threads `server.workers` accepts.
const MAX_WORKERS: usize = 1024;

/// The default of `server.workers`: the CPUs this process may run on (its
/// affinity mask and cgroup quota count), at least 1.
pub(crate) fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS)
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`: the proxy's listeners and connection handling.
    pub server: ServerConfig,
    /// `[admin]`: the admin API (defaults apply without the section).
    pub admin: AdminConfig,
    /// `[routing]`: where the device ID is found and how it is hashed.
    pub routing: RoutingConfig,
    /// `[upstream]`: connecting to backends.
    pub upstream: UpstreamConfig,
    /// `[reload]`: watching the config file.
    pub reload: ReloadConfig,
    /// `[[backends]]`, in file order, then the backends last found by
    /// `[[discovery]]` (see [`Config::with_discovered`]). At least one
    /// static backend unless there is discovery.
    pub backends: Vec<BackendConfig>,
    /// What is accepted but probably not meant (two backends at one
    /// address, health checks slower than their interval): printed by
    /// `check`, logged at start and on reload.
    pub warnings: Vec<ConfigError>,
    /// `[[discovery]]`: DNS names whose records are backends.
    pub discovery: Vec<DiscoveryConfig>,
}

/// `server.log_format`: how log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// tracing's human-readable lines: `time LEVEL target: message key=value…`.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message`
    /// and the event's fields at the top level.
    Json,
}

/// `server.runtime`: how `server.workers` threads share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// One single-threaded runtime per worker, each accepting on its own
    /// `SO_REUSEPORT` listener with its own upstream pool: a connection is
    /// served start to finish on the thread that accepted it (nginx's
    /// worker per core). The admin API, health checks, reloads and
    /// discovery run on a further, mostly idle, thread.
    #[default]
    ThreadPerCore,
    /// One work-stealing runtime of `workers` threads for everything: a
    /// request may move between threads (the behaviour before 0.2).
    WorkStealing,
}

impl ServerConfig {
    /// Proxied traffic is served by `workers` threads of their own, each
    /// with its own listeners and pool (`runtime = "thread-per-core"`, more
    /// than one worker).
    pub fn thread_per_core(&self) -> bool {
        self.workers > 1 && self.runtime == Runtime::ThreadPerCore
    }
}

/// `[server]`: where proxied traffic is accepted and how connections are run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `listen`: where proxied traffic is accepted.
    pub listen: SocketAddr,
    /// `shutdown_grace` (default 10s): how long in-flight HTTP requests may
    /// take to finish on shutdown before connections (and then WebSocket
    /// tunnels) are closed. Open tunnels are closed paced over it.
    pub shutdown_grace: Duration,
    /// `shutdown_delay` (default 0s): on SIGTERM, how long the proxy goes on
    /// serving (with `/readyz` answering 503 and `Connection: close` on
    /// HTTP/1.1 responses) before it stops accepting, so that a load
    /// balancer or Kubernetes can take it out of its endpoints first.
    pub shutdown_delay: Duration,
    /// `header_read_timeout` (default 30s): how long a client may take to
    /// send a request's headers; hyper starts this clock when it waits for
    /// the next request, so it is also the idle limit of a keep-alive
    /// connection.
    pub header_read_timeout: Duration,
    /// `keepalive_timeout` (default 75s, as nginx): an HTTP connection with
    /// no request in flight is closed after this long; `None` ("0s") turns
    /// keep-alive off (one request per connection).
    pub keepalive_timeout: Option<Duration>,
    /// `keepalive_requests` (default 1000, as nginx): requests served on one
    /// connection before its response says `Connection: close`.
    pub keepalive_requests: u64,
    /// `client_body_timeout` (default 60s, as nginx): the longest pause
    /// between two reads of a request body (408 past it).
    pub client_body_timeout: Duration,
    /// `send_timeout` (default 60s, as nginx): the longest a write to a
    /// client may stall (a client that stopped reading) before the
    /// connection is closed.
    pub send_timeout: Duration,
    /// `tunnel_idle_timeout` (default 1h, HAProxy's `timeout tunnel`): a
    /// WebSocket tunnel with no bytes either way for this long is closed;
    /// `None` ("0s") never closes one for idleness.
    pub tunnel_idle_timeout: Option<Duration>,
    /// `max_connections` (default none): client connections open at once,
    /// over every listener; past it a new connection gets 503 and is
    /// closed. `None` leaves only the open-file limit.
    pub max_connections: Option<usize>,
    /// `client_max_body_size` (default 100 MiB; nginx's name): the largest
    /// request body (413 past it); `None` ("0") for no limit.
    pub client_max_body_size: Option<u64>,
    /// `max_header_count` (default 100): header lines in a request (431
    /// past it).
    pub max_header_count: usize,
    /// `max_header_size` (default 64 KiB): bytes in a request's start line
    /// and headers (431 past it).
    pub max_header_size: usize,
    /// `h2_max_concurrent_streams` (default 200): HTTP/2 streams a client
    /// may have open at once on one connection.
    pub h2_max_concurrent_streams: u32,
    /// `workers`: threads serving proxied traffic. Default: the CPUs this
    /// process may run on. Read at start only.
    pub workers: usize,
    /// `runtime` (default `"thread-per-core"`): how the `workers` threads
    /// are run (see [`Runtime`]); with one worker both are one
    /// current-thread runtime. Read at start only.
    pub runtime: Runtime,
    /// `access_log` (default true): one `info` line per proxied request
    /// (device, backend, status, time).
    pub access_log: bool,
    /// `log_format` (default `"text"`): how log lines are written to
    /// stderr. Read at start only.
    pub log_format: LogFormat,
    /// `h2c` (default false): serve cleartext HTTP/2 with prior knowledge
    /// (h2c) on `listen` too.
    pub h2c: bool,
    /// `[server.tls]`: the TLS listener, if any.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: a listener of its own terminating TLS.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// `listen`: where TLS clients are accepted (differs from the other
    /// listeners).
    pub listen: SocketAddr,
    /// `handshake_timeout` (default 10s): a client must finish its TLS
    /// handshake within this.
    pub handshake_timeout: Duration,
    /// `cert`/`key`, then each `[[server.tls.certificates]]`, already read
    /// and checked; the first is the default.
    pub certificates: Arc<CertStore>,
}

/// `[admin]`: the admin API's listener and access.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `listen` (default `127.0.0.1:9901`): the admin listener; never
    /// shared with proxied traffic.
    pub listen: SocketAddr,
    /// `token` or the content of `token_file`: bearer token required by
    /// every admin endpoint except `/healthz`, `/readyz` and `/metrics`;
    /// `None` leaves them open.
    pub token: Option<String>,
}

/// How config changes are picked up besides SIGHUP and `POST /reload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadConfig {
    /// `watch` (default true): watch the config file and reload when its
    /// content changes.
    pub watch: bool,
    /// `interval` (default 1s): how often the file is checked.
    pub interval: Duration,
}

/// What to do with a request that carries no device ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingKey {
    /// Answer 400 and say where the ID was looked for.
    Reject,
    /// Send it to any backend, round-robin.
    Spread,
}

/// How backends are placed on the ring and keys looked up (`routing.hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashMode {
    /// sticky-proxy's ring: backend `id`s, `replicas` points per weight.
    Ring,
    /// nginx's `hash $key consistent`: each backend's `address` as written,
    /// 160 points per weight, nginx's tie rule, keys as nginx's variables
    /// hold them (raw).
    Nginx,
}

/// What happens to a tunnel whose device has another owner after a ring change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rebalance {
    /// Leave it open; its HTTP follows it until the device reconnects.
    Keep,
    /// Close it with 1012 (at `rebalance_rate`) so the device reconnects
    /// to its owner.
    Migrate,
}

/// `[routing]`: how a request's device ID is found and mapped to a backend.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// `key`: where the device ID is looked for, in order; the first hit wins.
    pub keys: Vec<KeySource>,
    /// `missing_key` (default `"reject"`): what a request without an ID gets.
    pub missing_key: MissingKey,
    /// `hash` (default `"ring"`): how backends are placed on the ring.
    pub hash: HashMode,
    /// `replicas` (default [`ring::DEFAULT_REPLICAS`]; 160, fixed, with
    /// `hash = "nginx"`): ring points per unit of backend weight.
    pub replicas: u32,
    /// `drain_timeout` (default 300s): how long a draining backend's open
    /// WebSocket tunnels may stay.
    pub drain_timeout: Duration,
    /// `rebalance` (default `"migrate"`): misplaced tunnels after a ring
    /// change: keep or migrate.
    pub rebalance: Rebalance,
    /// `rebalance_rate` (default 100): misplaced tunnels closed per second
    /// under `migrate`.
    pub rebalance_rate: f64,
    /// `not_here`: redelivery of requests an app instance answers "I don't
    /// hold this device".
    pub not_here: NotHereConfig,
}

/// `[routing.not_here]`: when an app instance answers a device's request
/// with one of `status` (it does not hold the device's socket), the proxy
/// tries the device's next candidates, and waits for the socket to show up
/// for at most `retry_for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotHereConfig {
    /// `status` (default `[421]`): the answers that mean "not here"; empty
    /// turns redelivery off.
    pub status: Vec<u16>,
    /// `retry_for` (default 3s): how long after the request arrived the
    /// proxy keeps trying; `0s` walks the candidates once without waiting.
    pub retry_for: Duration,
    /// `candidates` (default 3): distinct backends tried per walk.
    pub candidates: usize,
    /// `max_held` (default 10000): requests waiting at once; past it, 503.
    pub max_held: usize,
}

impl Default for NotHereConfig {
    fn default() -> Self {
        NotHereConfig { status: vec![421], retry_for: Duration::from_secs(3), candidates: 3, max_held: 10_000 }
    }
}

impl NotHereConfig {
    /// Whether `status` means "this instance does not hold the device".
    pub fn is_not_here(&self, status: u16) -> bool {
        self.status.contains(&status)
    }
}

/// `[upstream]`: connections to backends.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `connect_timeout` (default 3s): time allowed to open a TCP
    /// connection to a backend (504 past it).
    pub connect_timeout: Duration,
    /// `response_timeout` (default 60s): time allowed for a backend to send
    /// response headers (504 past it). Streaming bodies and open WebSockets
    /// are not bounded by it.
    pub response_timeout: Duration,
    /// `pool_max_idle` (default 512): idle keep-alive connections kept per
    /// backend.
    pub pool_max_idle: usize,
    /// `pool_idle_timeout` (default 90s): how long an idle pooled
    /// connection is kept.
    pub pool_idle_timeout: Duration,
    /// `max_connections` (default none; HAProxy's `maxconn` on a server,
    /// nginx's `max_conns`): HTTP connections open to one backend at once.
    /// Past it requests wait in a queue for a free connection. WebSocket
    /// tunnels are not counted.
    pub max_connections: Option<usize>,
    /// `queue_timeout` (default 5s, HAProxy's `timeout queue`): how long a
    /// request waits for a free connection under `max_connections` (503
    /// past it).
    pub queue_timeout: Duration,
    /// `tls_ca`: CA file trusted by `tls = true` backends without their own
    /// `tls_ca`.
    pub tls_ca: Option<PathBuf>,
}

/// One `[[backends]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// `id`: stable identity hashed onto the ring; the address may change
    /// freely.
    pub id: String,
    /// `address`: `host:port` to connect to, where host is an IP address,
    /// `[IPv6]` or a DNS name.
    pub address: String,
    /// The address exactly as written (trimmed): with `hash = "nginx"`, what
    /// the ring hashes, as nginx hashes its `server` text; it may lack the
    /// port, which is then 80 in `address`.
    pub server: String,
    /// `weight` (default 1): ring points are `weight × replicas`.
    pub weight: u32,
    /// `[health]` with this backend's overrides applied.
    pub health: HealthConfig,
    /// `state = "draining"`: no new devices; open tunnels close after
    /// `routing.drain_timeout`.
    pub draining: bool,
    /// `tls = true`: connect with TLS, verifying the backend's certificate.
    pub tls: Option<UpstreamTls>,
    /// Where the backend came from: the file, or a `[[discovery]]` name.
    pub source: BackendSource,
}

/// How a backend's health is judged (`[health]`, per-backend overrides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// `path`: path of the active check (`GET`); `None`: active checks are
    /// off and only failures on real traffic count.
    pub path: Option<String>,
    /// `interval` (default 2s): time between active checks.
    pub interval: Duration,
    /// `timeout` (default 1s): an active check taking longer fails.
    pub timeout: Duration,
    /// `fall` (default 3 with a `[health]` section, else 1): consecutive
    /// failures (active checks, or connects/timeouts on real traffic) that
    /// mark a backend down.
    pub fall: u32,
    /// `rise` (default 2 with a `[health]` section, else 1): consecutive
    /// successful active checks that mark it up again.
    pub rise: u32,
    /// `fail_timeout` (default 10s): without active checks, how long a
    /// failed backend stays down before a probe (a TCP connect) may bring
    /// it back.
    pub fail_timeout: Duration,
    /// `observe` (default `"connect"`): which failures on real traffic
    /// count against a backend.
    pub observe: Observe,
}

/// Which failures on real traffic count against a backend's health
/// (`health.observe`). A client can't make a backend fail to accept a
/// connection, but it can send a request the app drops, or one that is
/// slow to answer: counting those would let any client take backends
/// down for everyone (HAProxy's `observe layer7` is opt-in for the same
/// reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observe {
    /// Only what says the backend is unreachable: connection refused,
    /// connect timeout, TLS handshake failure.
    Connect,
    /// Also a response timeout and a connection closed without an answer.
    Responses,
}

impl HealthConfig {
    /// No `[health]` section: like nginx's `max_fails=1 fail_timeout=10s`.
    fn passive_only() -> HealthConfig {
        HealthConfig {
            path: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            fall: 1,
            rise: 1,
            fail_timeout: Duration::from_secs(10),
            observe: Observe::Connect,
        }
    }

    /// With a `[health]` section, HAProxy-like defaults (fall 3, rise 2).
    fn active_defaults() -> HealthConfig {
        HealthConfig { fall: 3, rise: 2, ..HealthConfig::passive_only() }
    }
}

/// Ids appear in metric labels, logs and JSON: 1 to 256 plain characters.
fn plain_id(id: &str) -> bool {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '/' | '-');
    !id.is_empty() && id.len() <= 256 && id.chars().all(plain)
}

/// A configuration problem, located as precisely as the input allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, when the config came from one.
    pub file: Option<PathBuf>,
    /// 1-based line of the offending text, when known.
    pub line: Option<usize>,
    /// Dotted path of the offending field, e.g. `backends[2].weight`.
    pub field: Option<String>,
    /// What is wrong, and usually how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// A problem with the file as a whole (unreadable, not UTF-8, …).
    pub(crate) fn whole_file(file: Option<&Path>, message: impl Into<String>) -> ConfigError {
        ConfigError { file: file.map(Path::to_path_buf), line: None, field: None, message: message.into() }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = read_capped(path)
            .map_err(|e| ConfigError::whole_file(Some(path), format!("cannot read config file: {e}")))?;
        Config::from_file_bytes(path, &bytes)
    }

    /// Validates the content of the file at `path` (already read); errors
    /// name the file, and relative paths in it start at its directory.
    pub(crate) fn from_file_bytes(path: &Path, bytes: &[u8]) -> Result<Config, ConfigError> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| ConfigError::whole_file(Some(path), "the file is not UTF-8"))?;
        let base = path.parent().unwrap_or(Path::new("."));
        match Config::parse_in(text, base) {
            Ok(mut config) => {
                for warning in &mut config.warnings {
                    warning.file = Some(path.to_path_buf());
                }
                Ok(config)
            }
            Err(mut e) => {
                e.file = Some(path.to_path_buf());
                Err(e)
            }
        }
    }

    /// Parses and validates config text; relative paths in it (such as
    /// `admin.token_file`) are taken from the current directory.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_in(text, Path::new("."))
    }

    /// Parses and validates config text whose relative paths start at `base`.
    pub fn parse_in(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error::convert(text, &e))?;
        let validator = Validator { text, base, warnings: RefCell::default() };
        let mut config = validator.config(raw)?;
        config.warnings = validator.warnings.into_inner();
        Ok(config)
    }
}

// ---- raw file shape -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    admin: Option<RawAdmin>,
    routing: RawRouting,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    reload: RawReload,
    health: Option<RawHealth>,
    #[serde(default)]
    backends: Option<Spanned<Vec<RawBackend>>>,
    #[serde(default)]
    discovery: Vec<discovery::RawDiscovery>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Spanned<String>,
    shutdown_grace: Option<Spanned<String>>,
    shutdown_delay: Option<Spanned<String>>,
    header_read_timeout: Option<Spanned<String>>,
    keepalive_timeout: Option<Spanned<String>>,
    keepalive_requests: Option<Spanned<i64>>,
    client_body_timeout: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    tunnel_idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    client_max_body_size: Option<Spanned<String>>,
    max_header_count: Option<Spanned<i64>>,
    max_header_size: Option<Spanned<String>>,
    h2_max_concurrent_streams: Option<Spanned<i64>>,
    workers: Option<Spanned<i64>>,
    runtime: Option<Runtime>,
    access_log: Option<bool>,
    log_format: Option<LogFormat>,
    h2c: Option<bool>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
    handshake_timeout: Option<Spanned<String>>,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    insecure: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch: Option<bool>,
    interval: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    key: Spanned<Vec<Spanned<String>>>,
    missing_key: Option<MissingKey>,
    hash: Option<HashMode>,
    replicas: Option<Spanned<i64>>,
    drain_timeout: Option<Spanned<String>>,
    rebalance: Option<Rebalance>,
    rebalance_rate: Option<Spanned<f64>>,
    not_here: Option<RawNotHere>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotHere {
    status: Option<Spanned<Vec<Spanned<i64>>>>,
    retry_for: Option<Spanned<String>>,
    candidates: Option<Spanned<i64>>,
    max_held: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    pool_max_idle: Option<Spanned<i64>>,
    pool_idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    queue_timeout: Option<Spanned<String>>,
    tls_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    id: Spanned<String>,
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
    health: Option<RawHealth>,
    state: Option<Spanned<String>>,
    tls: Option<Spanned<bool>>,
    tls_ca: Option<Spanned<String>>,
    tls_server_name: Option<Spanned<String>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    fall: Option<Spanned<i64>>,
    rise: Option<Spanned<i64>>,
    fail_timeout: Option<Spanned<String>>,
    observe: Option<Observe>,
}

// ---- validation -------------------------------------------------------------

struct Validator<'t> {
    text: &'t str,
    base: &'t Path,
    warnings: RefCell<Vec<ConfigError>>,
}

impl Validator<'_> {
    fn err<T>(&self, span: std::ops::Range<usize>, field: &str, message: String) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: None,
            line: Some(line_of(self.text, span.start)),
            field: Some(field.to_string()),
            message,
        })
    }

    /// Notes a warning once: a section read twice (`[health]` is, for
    /// backends and for discovery) says it once.
    fn warn(&self, span: std::ops::Range<usize>, field: &str, message: String) {
        let warning = ConfigError {
            file: None,
            line: Some(line_of(self.text, span.start)),
            field: Some(field.to_string()),
            message,
        };
        let mut warnings = self.warnings.borrow_mut();
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = ServerConfig {
            listen: self.socket_addr(&raw.server.listen, "server.listen")?,
            shutdown_grace: self.duration(
                raw.server.shutdown_grace.as_ref(),
                "server.shutdown_grace",
                Duration::from_secs(10),
            )?,
            shutdown_delay: match &raw.server.shutdown_delay {
                Some(v) if parse_duration(v.get_ref()) == Some(Duration::ZERO) => Duration::ZERO,
                delay => self.duration(delay.as_ref(), "server.shutdown_delay", Duration::ZERO)?,
            },
            header_read_timeout: self.duration(
                raw.server.header_read_timeout.as_ref(),
                "server.header_read_timeout",
                Duration::from_secs(30),
            )?,
            keepalive_timeout: self.duration_or_off(
                raw.server.keepalive_timeout.as_ref(),
                "server.keepalive_timeout",
                Some(Duration::from_secs(75)),
            )?,
            keepalive_requests: self.count(
                raw.server.keepalive_requests.as_ref(),
                "server.keepalive_requests",
                1000,
                1..=u32::MAX as u64,
            )?,
            client_body_timeout: self.duration(
                raw.server.client_body_timeout.as_ref(),
                "server.client_body_timeout",
                Duration::from_secs(60),
            )?,
            send_timeout: self.duration(
                raw.server.send_timeout.as_ref(),
                "server.send_timeout",
                Duration::from_secs(60),
            )?,
            tunnel_idle_timeout: self.duration_or_off(
                raw.server.tunnel_idle_timeout.as_ref(),
                "server.tunnel_idle_timeout",
                Some(Duration::from_secs(3600)),
            )?,
            max_connections: match &raw.server.max_connections {
                None => None,
                Some(n) => Some(self.count(Some(n), "server.max_connections", 0, 1..=100_000_000)? as usize),
            },
            client_max_body_size: match self.size(
                raw.server.client_max_body_size.as_ref(),
                "server.client_max_body_size",
                100 << 20,
                0..=u64::MAX,
            )? {
                0 => None,
                n => Some(n),
            },
            max_header_count: self.count(
                raw.server.max_header_count.as_ref(),
                "server.max_header_count",
                100,
                1..=10_000,
            )? as usize,
            max_header_size: self.size(
                raw.server.max_header_size.as_ref(),
                "server.max_header_size",
                64 << 10,
                1024..=(1 << 20),
            )? as usize,
            h2_max_concurrent_streams: self.count(
                raw.server.h2_max_concurrent_streams.as_ref(),
                "server.h2_max_concurrent_streams",
                200,
                1..=10_000,
            )? as u32,
            workers: self.workers(raw.server.workers.as_ref())?,
            runtime: raw.server.runtime.unwrap_or_default(),
            access_log: raw.server.access_log.unwrap_or(true),
            log_format: raw.server.log_format.unwrap_or_default(),
            h2c: raw.server.h2c.unwrap_or(false),
            tls: match &raw.server.tls {
                Some(raw) => Some(self.tls(raw)?),
                None => None,
            },
        };
        let admin = self.admin(raw.admin.as_ref())?;
        if admin.listen == server.listen && server.listen.port() != 0 {
            return self.err(
                raw.admin.as_ref().and_then(|a| a.listen.as_ref()).map_or(0..0, |l| l.span()),
                "admin.listen",
                "must differ from server.listen: the admin API never shares a listener with proxied traffic".into(),
            );
        }
        if let (Some(tls), Some(raw_tls)) = (&server.tls, &raw.server.tls) {
            if tls.listen.port() != 0 && (tls.listen == server.listen || tls.listen == admin.listen) {
                return self.err(
                    raw_tls.listen.span(),
                    "server.tls.listen",
                    "must differ from server.listen and admin.listen".into(),
                );
            }
        }

        let routing = self.routing(raw.routing)?;
        let upstream = self.upstream(&raw.upstream)?;
        if let (Some(max), Some(raw_max)) = (upstream.max_connections, raw.upstream.max_connections.as_ref()) {
            if server.thread_per_core() {
                let workers = server.workers;
                let how = if max >= workers {
                    format!(
                        "are split between the {workers} workers' pools (about {} each): a request waits for \
                         its own worker's share, even while another worker has one free",
                        max / workers
                    )
                } else {
                    format!("are fewer than the {workers} workers: one pool is shared, and requests cross threads")
                };
                self.warn(
                    raw_max.span(),
                    "upstream.max_connections",
                    format!(
                        "with server.runtime = \"thread-per-core\", the {max} connections per backend {how}; \
                         set server.runtime = \"work-stealing\" for one pool that all requests share"
                    ),
                );
            }
        }
        let reload = ReloadConfig {
            watch: raw.reload.watch.unwrap_or(true),
            interval: self.duration(raw.reload.interval.as_ref(), "reload.interval", Duration::from_secs(1))?,
        };
        let discovery = self.discovery(&raw.discovery, raw.health.as_ref())?;
        let backends =
            self.backends(raw.backends, &routing, raw.health.as_ref(), &raw.upstream, !discovery.is_empty())?;
        Ok(Config { server, admin, routing, upstream, reload, backends, warnings: Vec::new(), discovery })
    }

    fn workers(&self, raw: Option<&Spanned<i64>>) -> Result<usize, ConfigError> {
        match raw {
            None => Ok(default_workers()),
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
                _ => self.err(
                    n.span(),
                    "server.workers",
                    format!("must be between 1 and {MAX_WORKERS}, got {}", n.get_ref()),
                ),
            },
        }
    }

    fn admin(&self, raw: Option<&RawAdmin>) -> Result<AdminConfig, ConfigError> {
        let listen = match raw.and_then(|a| a.listen.as_ref()) {
            Some(listen) => self.socket_addr(listen, "admin.listen")?,
            None => SocketAddr::from(([127, 0, 0, 1], 9901)),
        };
        let token = match (raw.and_then(|a| a.token.as_ref()), raw.and_then(|a| a.token_file.as_ref())) {
            (Some(_), Some(file)) => {
                return self.err(
                    file.span(),
                    "admin.token_file",
                    "set admin.token or admin.token_file, not both".into(),
                )
            }
            (Some(token), None) => Some((token.get_ref().trim().to_string(), token.span(), "admin.token")),
            (None, Some(file)) => {
                let path = self.base.join(file.get_ref().trim());
                match read_capped(&path).and_then(|t| {
                    String::from_utf8(t).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
                }) {
                    Ok(t) => Some((t.trim().to_string(), file.span(), "admin.token_file")),
                    Err(e) => {
                        return self.err(
                            file.span(),
                            "admin.token_file",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    }
                }
            }
            (None, None) => None,
        };
        let token = match token {
            Some((t, span, field)) if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return self.err(
                    span,
                    field,
                    "the token must be non-empty, without spaces or control characters".into(),
                )
            }
            Some((t, _, _)) => Some(t),
            None => None,
        };
        // Drains, reloads and the device map are the operator's: open to
        // anyone only where only this host can reach them, or when said so.
        let insecure = raw.and_then(|a| a.insecure).unwrap_or(false);
        if !listen.ip().is_loopback() && token.is_none() && !insecure {
            return self.err(
                raw.and_then(|a| a.listen.as_ref()).map_or(0..0, |l| l.span()),
                "admin.listen",
                format!(
                    "{listen} is reachable from other hosts, and without admin.token anyone there could drain \
                     backends or reload; set admin.token (or admin.token_file), listen on 127.0.0.1, or set \
                     admin.insecure = true to accept that"
                ),
            );
        }
        Ok(AdminConfig { listen, token })
    }

    fn routing(&self, raw: RawRouting) -> Result<RoutingConfig, ConfigError> {
        let mut keys = Vec::new();
        if raw.key.get_ref().is_empty() {
            return self.err(
                raw.key.span(),
                "routing.key",
                "must list at least one place to find the device ID".into(),
            );
        }
        for (i, source) in raw.key.get_ref().iter().enumerate() {
            match source.get_ref().parse::<KeySource>() {
                Ok(k) => keys.push(k),
                Err(e) => return self.err(source.span(), &format!("routing.key[{i}]"), e),
            }
        }
        let hash = raw.hash.unwrap_or(HashMode::Ring);
        let replicas = match &raw.replicas {
            None if hash == HashMode::Nginx => ring::NGINX_REPLICAS,
            None => ring::DEFAULT_REPLICAS,
            Some(r) if hash == HashMode::Nginx => {
                return self.err(
                    r.span(),
                    "routing.replicas",
                    "does not apply with hash = \"nginx\", which places 160 points per unit of weight as nginx does; remove it".into(),
                )
            }
            Some(r) => match u32::try_from(*r.get_ref()) {
                Ok(n) if (1..=100_000).contains(&n) => n,
                _ => {
                    return self.err(
                        r.span(),
                        "routing.replicas",
                        format!("must be between 1 and 100000, got {}", r.get_ref()),
                    )
                }
            },
        };
        let drain_timeout =
            self.duration(raw.drain_timeout.as_ref(), "routing.drain_timeout", Duration::from_secs(300))?;
        let rebalance_rate = match &raw.rebalance_rate {
            None => 100.0,
            Some(r) if r.get_ref().is_finite() && (0.01..=1_000_000.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                return self.err(
                    r.span(),
                    "routing.rebalance_rate",
                    format!("must be between 0.01 and 1000000 tunnels per second, got {}", r.get_ref()),
                )
            }
        };
        Ok(RoutingConfig {
            keys,
            missing_key: raw.missing_key.unwrap_or(MissingKey::Reject),
            hash,
            replicas,
            drain_timeout,
            rebalance: raw.rebalance.unwrap_or(Rebalance::Migrate),
            rebalance_rate,
            not_here: self.not_here(raw.not_here.unwrap_or_default())?,
        })
    }

    fn not_here(&self, raw: RawNotHere) -> Result<NotHereConfig, ConfigError> {
        let defaults = NotHereConfig::default();
        let mut status = Vec::new();
        match &raw.status {
            None => status = defaults.status,
            Some(list) => {
                for code in list.get_ref() {
                    match u16::try_from(*code.get_ref()) {
                        // 2xx would be a delivered message; 1xx is not an answer.
                        Ok(c) if (300..=599).contains(&c) => status.push(c),
                        _ => {
                            return self.err(
                                code.span(),
                                "routing.not_here.status",
                                format!("{} is not a status between 300 and 599", code.get_ref()),
                            )
                        }
                    }
                }
            }
        }
        let retry_for = match &raw.retry_for {
            None => defaults.retry_for,
            Some(v) => match parse_duration(v.get_ref()) {
                Some(d) if d <= Duration::from_secs(300) => d,
                _ => {
                    return self.err(
                        v.span(),
                        "routing.not_here.retry_for",
                        format!("{:?} is not a duration of at most 5m; write e.g. \"3s\" or \"0s\"", v.get_ref()),
                    )
                }
            },
        };
        let bounded = |v: &Option<Spanned<i64>>, field: &str, max: usize, default: usize| match v {
            None => Ok(default),
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => self.err(
                    n.span(),
                    &format!("routing.not_here.{field}"),
                    format!("must be between 1 and {max}, got {}", n.get_ref()),
                ),
            },
        };
        Ok(NotHereConfig {
            status,
            retry_for,
            candidates: bounded(&raw.candidates, "candidates", 64, defaults.candidates)?,
            max_held: bounded(&raw.max_held, "max_held", 10_000_000, defaults.max_held)?,
        })
    }

    fn upstream(&self, raw: &RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let pool_max_idle = match &raw.pool_max_idle {
            None => 512,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n) => n,
                Err(_) => {
                    return self.err(
                        n.span(),
                        "upstream.pool_max_idle",
                        format!("must be 0 or more, got {}", n.get_ref()),
                    )
                }
            },
        };
        Ok(UpstreamConfig {
            connect_timeout: self.duration(
                raw.connect_timeout.as_ref(),
                "upstream.connect_timeout",
                Duration::from_secs(3),
            )?,
            response_timeout: self.duration(
                raw.response_timeout.as_ref(),
                "upstream.response_timeout",
                Duration::from_secs(60),
            )?,
            pool_max_idle,
            pool_idle_timeout: self.duration(
                raw.pool_idle_timeout.as_ref(),
                "upstream.pool_idle_timeout",
                Duration::from_secs(90),
            )?,
            max_connections: match &raw.max_connections {
                None => None,
                Some(n) => Some(self.count(Some(n), "upstream.max_connections", 0, 1..=1_000_000)? as usize),
            },
            queue_timeout: self.duration(
                raw.queue_timeout.as_ref(),
                "upstream.queue_timeout",
                Duration::from_secs(5),
            )?,
            tls_ca: raw.tls_ca.as_ref().map(|ca| self.path(ca)),
        })
    }

    /// A path as written in the file, relative to the file's directory.
    fn path(&self, value: &Spanned<String>) -> PathBuf {
        self.base.join(value.get_ref().trim())
    }

    fn tls(&self, raw: &RawTls) -> Result<TlsConfig, ConfigError> {
        let listen = self.socket_addr(&raw.listen, "server.tls.listen")?;
        let handshake_timeout =
            self.duration(raw.handshake_timeout.as_ref(), "server.tls.handshake_timeout", Duration::from_secs(10))?;
        // The first pair is `cert`/`key`, then `[[server.tls.certificates]]`.
        let mut spans = vec![(raw.cert.clone(), raw.key.clone(), "server.tls".to_string())];
        for (i, c) in raw.certificates.iter().enumerate() {
            spans.push((c.cert.clone(), c.key.clone(), format!("server.tls.certificates[{i}]")));
        }
        let pairs: Vec<(PathBuf, PathBuf)> = spans.iter().map(|(c, k, _)| (self.path(c), self.path(k))).collect();
        match tls::load_server_certificates(&pairs) {
            Ok(store) => Ok(TlsConfig { listen, handshake_timeout, certificates: Arc::new(store) }),
            Err((i, error)) => {
                let (cert, key, section) = &spans[i];
                match error {
                    PairError::Cert(m) => self.err(cert.span(), &format!("{section}.cert"), m),
                    PairError::Key(m) => self.err(key.span(), &format!("{section}.key"), m),
                }
            }
        }
    }

    /// A backend's TLS settings (`tls`, `tls_ca`, `tls_server_name`).
    fn backend_tls(
        &self,
        b: &RawBackend,
        field: &dyn Fn(&str) -> String,
        address: &str,
        upstream: &RawUpstream,
        clients: &mut ClientConfigs,
    ) -> Result<Option<UpstreamTls>, ConfigError> {
        let on = b.tls.as_ref().is_some_and(|t| *t.get_ref());
        if !on {
            for (name, value) in [("tls_ca", &b.tls_ca), ("tls_server_name", &b.tls_server_name)] {
                if let Some(v) = value {
                    return self.err(v.span(), &field(name), "only applies with tls = true".into());
                }
            }
            return Ok(None);
        }
        let (ca, ca_span, ca_field) = match (&b.tls_ca, &upstream.tls_ca) {
            (Some(own), _) => (Some(self.path(own)), own.span(), field("tls_ca")),
            (None, Some(default)) => (Some(self.path(default)), default.span(), "upstream.tls_ca".to_string()),
            (None, None) => (None, b.tls.as_ref().map_or(0..0, |t| t.span()), field("tls")),
        };
        let (client, ca_hash) = match clients.get(ca.as_deref()) {
            Ok(client) => client,
            Err(e) => return self.err(ca_span, &ca_field, e),
        };
        let (name, span) = match &b.tls_server_name {
            Some(n) => (n.get_ref().trim().to_string(), n.span()),
            None => {
                // The address's host, brackets of an IPv6 address removed.
                let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
                (host.trim_start_matches('[').trim_end_matches(']').to_string(), b.address.span())
            }
        };
        let server_name = match ServerName::try_from(name.clone()) {
            Ok(n) => n,
            Err(_) => {
                return self.err(
                    span,
                    &field("tls_server_name"),
                    format!("{name:?} is not a DNS name or IP address to verify the backend's certificate against"),
                )
            }
        };
        Ok(Some(UpstreamTls::new(client, server_name, ca, ca_hash)))
    }

    fn backends(
        &self,
        raw: Option<Spanned<Vec<RawBackend>>>,
        routing: &RoutingConfig,
        global_health: Option<&RawHealth>,
        upstream: &RawUpstream,
        discovery: bool,
    ) -> Result<Vec<BackendConfig>, ConfigError> {
        // With [[discovery]], the static list may be empty: DNS fills it.
        if discovery && raw.as_ref().map_or(0, |r| r.get_ref().len()) == 0 {
            return Ok(Vec::new());
        }
        let Some(raw) = raw else {
            return Err(ConfigError {
                file: None,
                line: None,
                field: Some("backends".into()),
                message: "no backends configured: add at least one [[backends]] table".into(),
            });
        };
        if raw.get_ref().is_empty() {
            return self.err(
                raw.span(),
                "backends",
                "no backends configured: add at least one [[backends]] table".into(),
            );
        }
        if raw.get_ref().len() > ring::MAX_MEMBERS {
            return self.err(
                raw.span(),
                "backends",
                format!("at most {} backends are supported, got {}", ring::MAX_MEMBERS, raw.get_ref().len()),
            );
        }
        let health = self.global_health(global_health)?;
        let active_defaults = HealthConfig::active_defaults();
        let mut out: Vec<BackendConfig> = Vec::with_capacity(raw.get_ref().len());
        // Id → index, for the duplicate check (a scan per backend was
        // quadratic: seconds at tens of thousands of backends).
        let mut seen: std::collections::HashMap<String, usize> =
            std::collections::HashMap::with_capacity(out.capacity());
        // Address (lower case) → the backends at it, for the warning.
        let mut at_address: std::collections::HashMap<String, Vec<usize>> =
            std::collections::HashMap::with_capacity(out.capacity());
        let mut clients = ClientConfigs::default();
        let mut points: u64 = 0;
        for (i, b) in raw.get_ref().iter().enumerate() {
            let field = |name: &str| format!("backends[{i}].{name}");
            let id = b.id.get_ref().trim();
            // Ids appear in metric labels, logs and JSON: keep them plain.
            if !plain_id(id) {
                return self.err(
                    b.id.span(),
                    &field("id"),
                    format!("{id:?}: use 1 to 256 of the characters A-Z a-z 0-9 . _ : @ / -"),
                );
            }
            if let Some(first) = seen.get(id) {
                return self.err(
                    b.id.span(),
                    &field("id"),
                    format!("duplicate backend id {id:?} (also backends[{first}])"),
                );
            }
            seen.insert(id.to_string(), i);
            let server = b.address.get_ref().trim();
            let nginx = routing.hash == HashMode::Nginx;
            let address = match validate_address(server, nginx) {
                Ok(false) => server.to_string(),
                // nginx's default port; the ring still hashes `server`.
                Ok(true) => format!("{server}:80"),
                Err(e) => return self.err(b.address.span(), &field("address"), e),
            };
            let weight = match &b.weight {
                None => 1,
                Some(w) => match u32::try_from(*w.get_ref()) {
                    Ok(w) if w >= 1 => w,
                    _ => {
                        return self.err(
                            w.span(),
                            &field("weight"),
                            format!(
                                "must be a whole number of at least 1, got {} (remove the backend to take it out)",
                                w.get_ref()
                            ),
                        )
                    }
                },
            };
            points += u64::from(weight) * u64::from(routing.replicas);
            if points > MAX_RING_POINTS {
                return self.err(
                    b.weight.as_ref().map_or(b.id.span(), |w| w.span()),
                    &field("weight"),
                    format!("the ring would need more than {MAX_RING_POINTS} points (sum of weight × routing.replicas); lower the weights or replicas"),
                );
            }
            let health = match &b.health {
                // A backend's own section starts from the active defaults
                // when there is no [health] section to inherit from.
                Some(own) => {
                    let base = if global_health.is_some() { health.clone() } else { active_defaults.clone() };
                    self.health(own, base, &field("health"))?
                }
                None => health.clone(),
            };
            let draining = match b.state.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
                None | Some(("active", _)) => false,
                Some(("draining", _)) => true,
                Some((other, span)) => {
                    return self.err(span, &field("state"), format!("{other:?}: use \"active\" or \"draining\""))
                }
            };
            let tls = self.backend_tls(b, &field, &address, upstream, &mut clients)?;
            at_address.entry(address.to_ascii_lowercase()).or_default().push(i);
            out.push(BackendConfig {
                id: id.to_string(),
                address,
                server: server.to_string(),
                weight,
                health,
                draining,
                tls,
                source: BackendSource::Config,
            });
        }
        // One warning per shared address, at its second backend, in file order.
        let mut shared: Vec<&Vec<usize>> = at_address.values().filter(|at| at.len() > 1).collect();
        shared.sort_unstable_by_key(|at| at[1]);
        for at in shared {
            let (first, second) = (&out[at[0]], at[1]);
            let mut ids: Vec<&str> = at.iter().take(4).map(|&i| out[i].id.as_str()).collect();
            if at.len() > ids.len() {
                ids.push("…");
            }
            self.warn(
                raw.get_ref()[second].address.span(),
                &format!("backends[{second}].address"),
                format!(
                    "{} backends share the address {} ({}): one instance gets the devices of each, and \
                     failover from one to the other lands on the same instance; give each instance one \
                     backend (a larger weight gives it more devices)",
                    at.len(),
                    first.address,
                    ids.join(", ")
                ),
            );
        }
        Ok(out)
    }

    /// `[health]` as every backend without its own section gets it.
    fn global_health(&self, raw: Option<&RawHealth>) -> Result<HealthConfig, ConfigError> {
        match raw {
            Some(raw) => self.health(raw, HealthConfig::active_defaults(), "health"),
            None => Ok(HealthConfig::passive_only()),
        }
    }

    /// Overlays the fields present in `raw` onto `base`; errors name
    /// `{section}.{field}`.
    fn health(&self, raw: &RawHealth, base: HealthConfig, section: &str) -> Result<HealthConfig, ConfigError> {
        let name = |field: &str| format!("{section}.{field}");
        let count = |v: &Option<Spanned<i64>>, field: &str, current: u32| -> Result<u32, ConfigError> {
            match v {
                None => Ok(current),
                Some(n) => match u32::try_from(*n.get_ref()) {
                    Ok(n) if (1..=100).contains(&n) => Ok(n),
                    _ => self.err(n.span(), &name(field), format!("must be between 1 and 100, got {}", n.get_ref())),
                },
            }
        };
        let path = match &raw.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                return self.err(p.span(), &name("path"), format!("{:?} must start with '/'", p.get_ref()))
            }
            Some(p) => Some(p.get_ref().clone()),
            None => base.path,
        };
        let health = HealthConfig {
            interval: self.duration(raw.interval.as_ref(), &name("interval"), base.interval)?,
            timeout: self.duration(raw.timeout.as_ref(), &name("timeout"), base.timeout)?,
            fall: count(&raw.fall, "fall", base.fall)?,
            rise: count(&raw.rise, "rise", base.rise)?,
            fail_timeout: self.duration(raw.fail_timeout.as_ref(), &name("fail_timeout"), base.fail_timeout)?,
            observe: raw.observe.unwrap_or(base.observe),
            path,
        };
        // Checks never overlap: one that may last as long as the interval
        // sets the pace instead. Said where timeout or interval is written.
        let written = raw.timeout.as_ref().or(raw.interval.as_ref());
        if let (Some(_), Some(at)) = (&health.path, written) {
            if health.timeout >= health.interval {
                self.warn(
                    at.span(),
                    &name("timeout"),
                    format!(
                        "{:?} is not shorter than the interval ({:?}): a check starts only when the last one \
                         has ended, so a backend that hangs is checked every {:?} and marked down after \
                         fall × {:?}; make the timeout shorter than the interval",
                        health.timeout, health.interval, health.timeout, health.timeout
                    ),
                );
            }
        }
        Ok(health)
    }

    fn socket_addr(&self, value: &Spanned<String>, field: &str) -> Result<SocketAddr, ConfigError> {
        value.get_ref().trim().parse().or_else(|_| {
            self.err(
                value.span(),
                field,
                format!(
                    "{:?} is not an IP address with a port, e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
                    value.get_ref()
                ),
            )
        })
    }

    /// A whole number within `range`, or `default` when not set.
    fn count(
        &self,
        value: Option<&Spanned<i64>>,
        field: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        match u64::try_from(*v.get_ref()) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => self.err(
                v.span(),
                field,
                format!("must be between {} and {}, got {}", range.start(), range.end(), v.get_ref()),
            ),
        }
    }

    /// A byte size such as `"64k"` or `"100m"` within `range`, or
    /// `default` when not set.
    fn size(
        &self,
        value: Option<&Spanned<String>>,
        field: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        match parse_size(v.get_ref()) {
            Some(n) if range.contains(&n) => Ok(n),
            Some(n) => {
                self.err(v.span(), field, format!("{n} bytes is outside {} to {} bytes", range.start(), range.end()))
            }
            None => self.err(
                v.span(),
                field,
                format!(
                    "{:?} is not a size; write bytes or a number with k, m or g, e.g. \"64k\", \"100m\"",
                    v.get_ref()
                ),
            ),
        }
    }

    /// A duration where `"0s"` (or `"0"`) means off (`None`).
    fn duration_or_off(
        &self,
        value: Option<&Spanned<String>>,
        field: &str,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if v.get_ref().trim() == "0" || parse_duration(v.get_ref()) == Some(Duration::ZERO) => Ok(None),
            Some(v) => self.duration(Some(v), field, Duration::ZERO).map(Some),
        }
    }

    fn duration(
        &self,
        value: Option<&Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => match parse_duration(v.get_ref()) {
                Some(d) if !d.is_zero() && d <= MAX_DURATION => Ok(d),
                _ => self.err(
                    v.span(),
                    field,
                    format!(
                        "{:?} is not a positive duration of at most a year; write e.g. \"500ms\", \"2s\", \"1m\"",
                        v.get_ref()
                    ),
                ),
            },
        }
    }
}

/// Checks a backend address: `host:port` with a non-zero port, where host is
/// an IPv4 address, a bracketed IPv6 address or a DNS name. With
/// `portless_ok` (nginx mode) the port may be left out: `Ok(true)` says it
/// was, and the backend is reached on port 80 as nginx would.
fn validate_address(address: &str, portless_ok: bool) -> Result<bool, String> {
    let hint = "write host:port, e.g. \"10.0.0.5:8080\", \"[fd00::5]:8080\" or \"app-1.internal:8080\"";
    // By bytes: the address may have non-ASCII text where a str index would panic.
    if address.as_bytes().get(..5).is_some_and(|p| p.eq_ignore_ascii_case(b"unix:")) {
        return Err(format!("{address:?}: unix sockets are not supported as backends; {hint}"));
    }
    if address.contains("://") || address.contains('/') {
        return Err(format!("{address:?} must be host:port without a scheme or path; {hint}"));
    }
    let authority: Authority = address.parse().map_err(|_| format!("{address:?} is not a valid address; {hint}"))?;
    if address.contains('@') {
        return Err(format!("{address:?} must not contain user info; {hint}"));
    }
    let portless = match authority.port_u16() {
        Some(0) => return Err(format!("{address:?} has port 0; {hint}")),
        Some(_) => false,
        None if portless_ok && !address.ends_with(':') => true,
        None => return Err(format!("{address:?} has no port; {hint}")),
    };
    let host = authority.host();
    let valid_host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if !valid_host {
        return Err(format!("{address:?} has an invalid host; {hint}"));
    }
    Ok(portless)
}

/// Parses byte sizes written as `"1024"`, `"64k"`, `"100m"` or `"1g"`
/// (binary multiples, as nginx reads them; upper case too).
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Parses durations written as `"500ms"`, `"2s"`, `"1m"`, `"1h"` (a whole
/// number and a unit; `"1.5s"` is also accepted).
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Every file a config text refers to (PEM files, CA files, the admin token
/// file), relative paths taken from `base`. The reload watcher hashes them
/// with the config, so replacing a certificate is a change to reload.
/// Reads only the TOML structure; text that doesn't parse refers to nothing.
pub(crate) fn referenced_files(text: &str, base: &Path) -> Vec<PathBuf> {
    // Every such key has one of these in its name: most configs skip the parse.
    if !text.contains("tls") && !text.contains("token_file") {
        return Vec::new();
    }
    let Ok(root) = text.parse::<toml::Table>() else { return Vec::new() };
    let mut files = Vec::new();
    let mut add = |table: Option<&toml::Table>, key: &str| {
        if let Some(path) = table.and_then(|t| t.get(key)).and_then(toml::Value::as_str) {
            files.push(base.join(path.trim()));
        }
    };
    let section = |table: &toml::Table, key: &str| table.get(key).and_then(toml::Value::as_table).cloned();
    let tls = section(&root, "server").and_then(|s| section(&s, "tls"));
    add(tls.as_ref(), "cert");
    add(tls.as_ref(), "key");
    for c in tls.as_ref().and_then(|t| t.get("certificates")).and_then(toml::Value::as_array).into_iter().flatten() {
        add(c.as_table(), "cert");
        add(c.as_table(), "key");
    }
    add(section(&root, "upstream").as_ref(), "tls_ca");
    add(section(&root, "admin").as_ref(), "token_file");
    for b in root.get("backends").and_then(toml::Value::as_array).into_iter().flatten() {
        add(b.as_table(), "tls_ca");
    }
    files.sort();
    files.dedup();
    files
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"

[routing]
key = ["header:x-device-id", "path:/devices/{id}/*"]

[[backends]]
id = "app-1"
address = "127.0.0.1:9001"

[[backends]]
id = "app-2"
address = "app-2.internal:9002"
weight = 2
"#;

    fn error_for(text: &str) -> ConfigError {
        match Config::parse(text) {
            Ok(_) => panic!("config should have been rejected:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].weight, 2);
        assert_eq!(c.routing.missing_key, MissingKey::Reject);
        assert_eq!(c.routing.replicas, ring::DEFAULT_REPLICAS);
        assert_eq!(c.routing.rebalance, Rebalance::Migrate);
        assert_eq!(c.routing.rebalance_rate, 100.0);
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().expect("addr"));
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn limits_have_defaults_and_zero_turns_the_optional_ones_off() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.server.keepalive_timeout, Some(Duration::from_secs(75)));
        assert_eq!(c.server.keepalive_requests, 1000);
        assert_eq!(c.server.client_body_timeout, Duration::from_secs(60));
        assert_eq!(c.server.send_timeout, Duration::from_secs(60));
        assert_eq!(c.server.tunnel_idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.server.max_connections, None);
        assert_eq!(c.server.client_max_body_size, Some(100 << 20));
        assert_eq!((c.server.max_header_count, c.server.max_header_size), (100, 64 << 10));
        assert_eq!(c.server.h2_max_concurrent_streams, 200);
        assert_eq!((c.upstream.max_connections, c.upstream.queue_timeout), (None, Duration::from_secs(5)));

        let text = GOOD.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nkeepalive_timeout = \"0s\"\ntunnel_idle_timeout = \"0\"\n\
             client_max_body_size = \"0\"\nmax_header_size = \"8K\"\nmax_connections = 10",
        );
        let c = Config::parse(&text).expect("valid");
        assert_eq!((c.server.keepalive_timeout, c.server.tunnel_idle_timeout), (None, None));
        assert_eq!(c.server.client_max_body_size, None);
        assert_eq!((c.server.max_header_size, c.server.max_connections), (8192, Some(10)));
    }

    #[test]
    fn limits_out_of_range_name_their_field() {
        for (line, field) in [
            ("max_header_size = \"100\"", "server.max_header_size"),
            ("client_max_body_size = \"1x\"", "server.client_max_body_size"),
            ("keepalive_requests = 0", "server.keepalive_requests"),
            ("max_connections = -1", "server.max_connections"),
            ("h2_max_concurrent_streams = 0", "server.h2_max_concurrent_streams"),
            ("send_timeout = \"0s\"", "server.send_timeout"),
        ] {
            let e = error_for(
                &GOOD.replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:8080\"\n{line}")),
            );
            assert_eq!(e.field.as_deref(), Some(field), "{line}: {e}");
        }
    }

    #[test]
    fn an_endless_token_file_is_an_error() {
        let text = GOOD.replace("[routing]", "[admin]\ntoken_file = \"/dev/zero\"\n\n[routing]");
        let e = error_for(&text);
        assert_eq!(e.field.as_deref(), Some("admin.token_file"), "{e}");
        assert!(e.message.contains("larger than 16 MiB"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size(" 64k "), Some(65536));
        assert_eq!(parse_size("100M"), Some(100 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        for bad in ["", "k", "-1", "1.5m", "1kb", "é", "99999999999999999999g", "18014398509481984k"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = error_for(&GOOD.replace("[routing]", "[routing]\nreplica = 3"));
        assert!(e.message.contains("replica"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let e = error_for(&GOOD.replace("\"app-2\"", "\"app-1\""));
        assert_eq!(e.field.as_deref(), Some("backends[1].id"), "{e}");
        assert!(e.message.contains("duplicate"), "{e}");
        assert_eq!(e.line, Some(13));
    }

    #[test]
    fn backends_sharing_an_address_are_a_warning() {
        assert!(Config::parse(GOOD).expect("valid").warnings.is_empty());
        let text = GOOD.replace("app-2.internal:9002", "127.0.0.1:9001")
            + "\n[[backends]]\nid = \"app-3\"\naddress = \"APP-2.internal:9002\"\n\
               \n[[backends]]\nid = \"app-4\"\naddress = \"app-2.internal:9002\"\n";
        let c = Config::parse(&text).expect("accepted");
        let fields: Vec<_> = c.warnings.iter().map(|w| (w.field.as_deref(), w.line)).collect();
        assert_eq!(fields, [(Some("backends[1].address"), Some(14)), (Some("backends[3].address"), Some(23))]);
        assert!(c.warnings[0].message.contains("2 backends share the address 127.0.0.1:9001 (app-1, app-2)"));
        // Same under nginx's hash, where nginx accepts it too.
        let c = Config::parse(&text.replace("[routing]", "[routing]\nhash = \"nginx\"")).expect("accepted");
        assert_eq!(c.warnings.len(), 2);
    }

    #[test]
    fn a_connection_limit_split_between_workers_is_a_warning() {
        let with = |server: &str, upstream: &str| {
            let text =
                GOOD.replace("[server]\n", &format!("[server]\n{server}\n")) + &format!("\n[upstream]\n{upstream}\n");
            Config::parse(&text).expect("accepted").warnings
        };
        let w = with("workers = 2", "max_connections = 9");
        assert_eq!(w.iter().map(|w| w.field.as_deref()).collect::<Vec<_>>(), [Some("upstream.max_connections")]);
        assert!(w[0].message.contains("split between the 2 workers' pools (about 4 each)"), "{}", w[0]);
        let w = with("workers = 4", "max_connections = 3");
        assert!(w[0].message.contains("one pool is shared, and requests cross threads"), "{}", w[0]);
        // One pool anyway: nothing to say.
        assert!(with("workers = 2\nruntime = \"work-stealing\"", "max_connections = 9").is_empty());
        assert!(with("workers = 1", "max_connections = 9").is_empty());
        assert!(with("workers = 2", "queue_timeout = \"1s\"").is_empty());
    }

    #[test]
    fn a_health_timeout_as_long_as_the_interval_is_a_warning() {
        let with = |health: &str| Config::parse(&format!("{GOOD}\n{health}")).expect("accepted").warnings;
        assert!(with("[health]\npath = \"/h\"\ninterval = \"5s\"\ntimeout = \"2s\"\n").is_empty());
        // Without `path` there are no active checks to pace.
        assert!(with("[health]\ninterval = \"1s\"\ntimeout = \"1s\"\n").is_empty());
        let w = with("[health]\npath = \"/h\"\ninterval = \"1s\"\n");
        assert_eq!((w.len(), w[0].field.as_deref(), w[0].line), (1, Some("health.timeout"), Some(19)), "{w:?}");
        assert!(w[0].message.contains("1s is not shorter than the interval (1s)"), "{}", w[0]);
        let own = GOOD.to_string() + "health = { path = \"/h\", timeout = \"3s\" }\n";
        let w = Config::parse(&own).expect("accepted").warnings;
        assert_eq!(w.iter().map(|w| w.field.as_deref()).collect::<Vec<_>>(), [Some("backends[1].health.timeout")]);
        let dir = std::env::temp_dir().join(format!("sticky-proxy-warn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("warn.toml");
        std::fs::write(&file, &own).expect("write");
        let w = Config::load(&file).expect("accepted").warnings;
        assert_eq!(w[0].file.as_deref(), Some(file.as_path()), "warnings name the file");
    }

    #[test]
    fn zero_and_negative_weights_are_rejected() {
        for w in ["0", "-1"] {
            let e = error_for(&GOOD.replace("weight = 2", &format!("weight = {w}")));
            assert_eq!(e.field.as_deref(), Some("backends[1].weight"), "{e}");
        }
    }

    #[test]
    fn empty_backend_list_is_rejected() {
        let text = GOOD.split("[[backends]]").next().expect("prefix");
        assert_eq!(error_for(text).field.as_deref(), Some("backends"));
        assert_eq!(error_for(&format!("backends = []\n{text}")).field.as_deref(), Some("backends"));
    }

    #[test]
    fn bad_addresses_are_rejected() {
        for bad in [
            "127.0.0.1",
            "http://127.0.0.1:9002",
            "127.0.0.1:99999",
            "127.0.0.1:0",
            "[::1:9000",
            "a b:80",
            "user@host:80",
            "",
        ] {
            let e = error_for(&GOOD.replace("app-2.internal:9002", bad));
            assert_eq!(e.field.as_deref(), Some("backends[1].address"), "{bad}: {e}");
        }
        for good in ["[::1]:9000", "10.0.0.5:8080", "app_2.svc.cluster.local:80"] {
            Config::parse(&GOOD.replace("app-2.internal:9002", good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn nginx_hash_hashes_the_address_as_written() {
        let nginx = GOOD.replace("[routing]", "[routing]\nhash = \"nginx\"");
        let c = Config::parse(&nginx.replace("app-2.internal:9002", "app-2.internal")).expect("portless is fine");
        assert_eq!(c.routing.hash, HashMode::Nginx);
        assert_eq!(c.routing.replicas, ring::NGINX_REPLICAS);
        assert_eq!(
            (c.backends[1].address.as_str(), c.backends[1].server.as_str()),
            ("app-2.internal:80", "app-2.internal")
        );
        assert_eq!(c.backends[0].server, "127.0.0.1:9001");
        let c = Config::parse(&nginx.replace("app-2.internal:9002", "[::1]")).expect("portless v6");
        assert_eq!(c.backends[1].address, "[::1]:80");
        // Without nginx mode a port is still required.
        assert_eq!(
            error_for(&GOOD.replace("app-2.internal:9002", "app-2.internal")).field.as_deref(),
            Some("backends[1].address")
        );
        for bad in ["unix:/run/app.sock", "app-2.internal:", "[::1:80"] {
            let e = error_for(&nginx.replace("app-2.internal:9002", bad));
            assert_eq!(e.field.as_deref(), Some("backends[1].address"), "{bad}: {e}");
        }
        let e = error_for(&nginx.replace("hash = \"nginx\"", "hash = \"nginx\"\nreplicas = 160"));
        assert_eq!(e.field.as_deref(), Some("routing.replicas"), "{e}");
        let e = error_for(&GOOD.replace("[routing]", "[routing]\nhash = \"maglev\""));
        assert!(e.message.contains("maglev"), "{e}");
    }

    #[test]
    fn bad_key_patterns_are_rejected() {
        for bad in
            ["header:", "path:/devices/*/{id}", "path:devices/{id}", "path:/devices/x", "query:", "ip:x", "cookie:a=b"]
        {
            let e = error_for(&GOOD.replace("header:x-device-id", bad));
            assert_eq!(e.field.as_deref(), Some("routing.key[0]"), "{bad}: {e}");
        }
    }

    #[test]
    fn ids_that_would_break_metric_labels_are_rejected() {
        for bad in ["app\\\"1", "app 1", "app\\\\1", "app{1}"] {
            let e = error_for(&GOOD.replace("\"app-2\"", &format!("\"{bad}\"")));
            assert_eq!(e.field.as_deref(), Some("backends[1].id"), "{bad}: {e}");
        }
        Config::parse(&GOOD.replace("\"app-2\"", "\"eu-west/app_2.v1:9@a\"")).expect("plain id");
    }

    #[test]
    fn rebalance_settings() {
        let c = Config::parse(&GOOD.replace("[routing]", "[routing]\nrebalance = \"keep\"\nrebalance_rate = 5"))
            .expect("valid");
        assert_eq!((c.routing.rebalance, c.routing.rebalance_rate), (Rebalance::Keep, 5.0));
        let e = error_for(&GOOD.replace("[routing]", "[routing]\nrebalance_rate = 0"));
        assert_eq!(e.field.as_deref(), Some("routing.rebalance_rate"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        let e = error_for(&GOOD.replace("[routing]", "[routing]\nrebalance = \"shuffle\""));
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.to_string().contains("`keep` or `migrate`"), "{e}");
    }

    #[test]
    fn durations_past_a_year_are_rejected() {
        let text = GOOD.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\nheader_read_timeout = \"9999999999999999999s\"",
        );
        assert_eq!(error_for(&text).field.as_deref(), Some("server.header_read_timeout"));
    }

    #[test]
    fn bad_listen_and_durations_are_rejected() {
        let e = error_for(&GOOD.replace("127.0.0.1:8080", "localhost:8080"));
        assert_eq!(e.field.as_deref(), Some("server.listen"));
        let e = error_for(&GOOD.replace("[routing]", "[upstream]\nconnect_timeout = \"3 parsecs\"\n[routing]"));
        assert_eq!(e.field.as_deref(), Some("upstream.connect_timeout"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("1e400s"), None);
    }

    #[test]
    fn runtime_defaults_to_thread_per_core_with_more_than_one_worker() {
        let with =
            |line: &str| GOOD.replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:8080\"\n{line}"));
        let c = Config::parse(&with("workers = 2")).expect("valid");
        assert_eq!(c.server.runtime, Runtime::ThreadPerCore);
        assert!(c.server.thread_per_core());
        assert!(!Config::parse(&with("workers = 1")).expect("valid").server.thread_per_core());
        let c = Config::parse(&with("workers = 2\nruntime = \"work-stealing\"")).expect("valid");
        assert_eq!(c.server.runtime, Runtime::WorkStealing);
        assert!(!c.server.thread_per_core());
        let e = error_for(&with("runtime = \"fibers\""));
        assert!(e.to_string().contains("thread-per-core"), "{e}");
    }

    #[test]
    fn workers_default_to_the_cpus_and_are_bounded() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.server.workers, default_workers());
        assert!(c.server.workers >= 1);
        assert!(c.server.access_log);
        let with =
            |line: &str| GOOD.replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:8080\"\n{line}"));
        let c = Config::parse(&with("workers = 1\naccess_log = false")).expect("valid");
        assert_eq!(c.server.workers, 1);
        assert!(!c.server.access_log);
        assert_eq!(Config::parse(&with("workers = 1024")).expect("valid").server.workers, 1024);
        for bad in ["0", "-2", "1025"] {
            let e = error_for(&with(&format!("workers = {bad}")));
            assert_eq!(e.field.as_deref(), Some("server.workers"), "{bad}: {e}");
            assert_eq!(e.line, Some(4), "{e}");
        }
    }

    #[test]
    fn referenced_files_are_every_pem_ca_and_token_file() {
        let text = GOOD.replace("[routing]", "[server.tls]\nlisten = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[[server.tls.certificates]]\ncert = \"b.pem\"\nkey = \"b.key\"\n[admin]\ntoken_file = \"token\"\n[upstream]\ntls_ca = \"ca.pem\"\n[routing]")
            + "tls = true\ntls_ca = \"own-ca.pem\"\n";
        let files = referenced_files(&text, Path::new("/etc/sp"));
        let names: Vec<&str> = files.iter().filter_map(|f| f.file_name()?.to_str()).collect();
        assert_eq!(names, ["a.key", "a.pem", "b.key", "b.pem", "ca.pem", "own-ca.pem", "token"]);
        assert!(files.iter().all(|f| f.starts_with("/etc/sp")));
        assert!(referenced_files(GOOD, Path::new(".")).is_empty());
    }

    #[test]
    fn error_display_names_file_line_and_field() {
        let e = ConfigError {
            file: Some("/etc/sp.toml".into()),
            line: Some(3),
            field: Some("backends[0].weight".into()),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "/etc/sp.toml:3: backends[0].weight: bad");
    }

    #[test]
    fn not_here_defaults_inline_and_table_forms() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.routing.not_here, NotHereConfig::default());
        assert_eq!(c.routing.not_here.status, [421]);
        assert!(c.routing.not_here.is_not_here(421) && !c.routing.not_here.is_not_here(404));

        let inline = GOOD.replace(
            "[routing]\n",
            "[routing]\nnot_here = { status = [404, 421], retry_for = \"0s\", candidates = 2 }\n",
        );
        let c = Config::parse(&inline).expect("valid");
        assert_eq!(c.routing.not_here.status, [404, 421]);
        assert_eq!(c.routing.not_here.retry_for, Duration::ZERO);
        assert_eq!(c.routing.not_here.candidates, 2);

        let table = format!("{GOOD}\n[routing.not_here]\nstatus = []\nmax_held = 5\n");
        let c = Config::parse(&table).expect("valid");
        assert!(c.routing.not_here.status.is_empty(), "off");
        assert_eq!(c.routing.not_here.max_held, 5);

        for (bad, field) in [
            ("not_here = { status = [200] }", "routing.not_here.status"),
            ("not_here = { retry_for = \"forever\" }", "routing.not_here.retry_for"),
            ("not_here = { candidates = 0 }", "routing.not_here.candidates"),
            ("not_here = { tries = 3 }", "routing.not_here.tries: unknown field"),
        ] {
            let e = error_for(&GOOD.replace("[routing]\n", &format!("[routing]\n{bad}\n")));
            assert!(e.to_string().contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn an_admin_api_open_to_other_hosts_needs_a_token_or_insecure() {
        let open = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9901\"\n");
        let e = error_for(&open);
        assert_eq!(e.field.as_deref(), Some("admin.listen"), "{e}");
        assert!(e.message.contains("admin.token") && e.message.contains("admin.insecure"), "{e}");
        assert!(Config::parse(&format!("{open}token = \"s3cret\"\n")).is_ok());
        assert!(Config::parse(&format!("{open}insecure = true\n")).is_ok());
        let v6 = format!("{GOOD}\n[admin]\nlisten = \"[::1]:9901\"\n");
        assert!(Config::parse(&v6).is_ok(), "loopback needs no token");
    }

    #[test]
    fn non_ascii_addresses_are_errors_not_panics() {
        for bad in ["aaaa\u{e9}:80", "\u{e9}", "\u{fc}nix:/x", "aaaa\u{e9}", "unix\u{e9}:80"] {
            let e = error_for(&GOOD.replace("127.0.0.1:9001", bad));
            assert_eq!(e.field.as_deref(), Some("backends[0].address"), "{bad}: {e}");
        }
    }

    #[test]
    fn health_observe_and_shutdown_delay() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.backends[0].health.observe, Observe::Connect, "nothing a client can cause counts by default");
        assert_eq!(c.server.shutdown_delay, Duration::ZERO);
        let text = GOOD.replace("[server]\n", "[server]\nshutdown_delay = \"3s\"\n")
            + "\n[health]\npath = \"/h\"\nobserve = \"responses\"\n";
        let c = Config::parse(&text).expect("valid");
        assert_eq!(c.backends[0].health.observe, Observe::Responses);
        assert_eq!(c.server.shutdown_delay, Duration::from_secs(3));
        let e = error_for(&(GOOD.to_string() + "\n[health]\nobserve = \"everything\"\n"));
        assert!(e.to_string().contains("expected `connect` or `responses`"), "{e}");
    }
}
