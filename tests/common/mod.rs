//! Shared test harness: real demo app instances and a real proxy on
//! loopback ports, with HTTP and WebSocket clients. Every wait is bounded.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sticky_proxy::app::{self as server, RunningProxy};
use sticky_proxy::config::Config;
use sticky_proxy::tools::demo::DemoInstance;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single step of a test.
pub const STEP: Duration = Duration::from_secs(20);

/// Awaits `work`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, work: F) -> F::Output {
    match tokio::time::timeout(STEP, work).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// `n` demo app instances named app-1..app-n on ephemeral loopback ports.
pub async fn start_apps(n: usize) -> Vec<DemoInstance> {
    let mut apps = Vec::new();
    for i in 1..=n {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind demo app");
        apps.push(DemoInstance::spawn(format!("app-{i}"), listener).expect("spawn demo app"));
    }
    apps
}

/// A config for `apps` with the given `[routing]` body and extra sections.
pub fn config_for(apps: &[DemoInstance], routing: &str, extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[routing]\n{routing}\n\n{extra}\n"
    );
    for app in apps {
        text.push_str(&format!("\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n", app.name(), app.addr()));
    }
    text
}

/// The routing used by most tests: every key source, reject when missing.
pub const ALL_KEYS: &str =
    r#"key = ["header:x-device-id", "path:/devices/{id}/*", "query:device_id", "cookie:device_id"]"#;

pub async fn start_proxy(config_text: &str) -> RunningProxy {
    let config = Config::parse(config_text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{config_text}"));
    server::start(&config).await.expect("start proxy")
}

/// A demo stack: `n` apps behind a proxy routing by every key source.
pub async fn stack(n: usize) -> (Vec<DemoInstance>, RunningProxy) {
    let apps = start_apps(n).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, "")).await;
    (apps, proxy)
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// Which demo instance answered (its `X-Instance` header).
    pub fn instance(&self) -> Option<&str> {
        self.headers.get("x-instance").and_then(|v| v.to_str().ok())
    }
}

/// A plain HTTP/1.1 client with a connection pool.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Http { client: Client::builder(TokioExecutor::new()).build_http() }
    }
}

impl Http {
    pub async fn send(&self, method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        let response = within(url, self.client.request(req)).await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        let (parts, body) = response.into_parts();
        let body = within("response body", body.collect()).await.expect("body").to_bytes();
        Reply { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, url, headers, Bytes::new()).await
    }

    pub async fn post(&self, url: &str, body: &str) -> Reply {
        self.send(Method::POST, url, &[], body.to_string()).await
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through `addr` and proves it works with an echo round trip.
pub async fn connect_device(addr: SocketAddr, device: &str) -> Ws {
    let url = format!("ws://{addr}/devices/{device}/ws");
    let (mut ws, response) =
        within(&url, tokio_tungstenite::connect_async(&url)).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    within("echo send", ws.send(Message::text(format!("ping {device}")))).await.expect("send");
    assert_eq!(next_text(&mut ws).await, format!("ping {device}"), "echo through the tunnel");
    ws
}

/// Like [`connect_device`], for a device that may be sent messages while it
/// connects (a held request delivered as soon as its socket shows up):
/// returns them with the socket.
pub async fn connect_device_collecting(addr: SocketAddr, device: &str) -> (Ws, Vec<String>) {
    let url = format!("ws://{addr}/devices/{device}/ws");
    let (mut ws, response) =
        within(&url, tokio_tungstenite::connect_async(&url)).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let ping = format!("ping {device}");
    within("echo send", ws.send(Message::text(ping.clone()))).await.expect("send");
    let mut early = Vec::new();
    loop {
        let text = next_text(&mut ws).await;
        if text == ping {
            return (ws, early);
        }
        early.push(text);
    }
}

/// The next text message on `ws` (skipping control frames).
pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        match within("websocket message", ws.next()).await {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Binary(b))) => return String::from_utf8_lossy(&b).into_owned(),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// Deterministic device IDs (`dev-` and 16 hex digits).
pub struct Ids(sticky_proxy::tools::sample::SplitMix64);

impl Ids {
    pub fn new(seed: u64) -> Self {
        Ids(sticky_proxy::tools::sample::SplitMix64::new(seed))
    }

    pub fn next_id(&mut self) -> String {
        format!("dev-{:016x}", self.0.next_u64())
    }
}

/// A device ID (from the IDs of `seed`) whose ring owner is `backend`.
pub fn device_owned_by(proxy: &RunningProxy, backend: &str, seed: u64) -> String {
    let mut ids = Ids::new(seed);
    loop {
        let id = ids.next_id();
        if proxy.router().load().owner(id.as_bytes()).map(|b| b.id.as_str()) == Some(backend) {
            return id;
        }
    }
}

/// A config file in a fresh temp directory, rewritten by tests to trigger reloads.
pub struct ConfigFile {
    pub path: std::path::PathBuf,
}

impl ConfigFile {
    pub fn new(name: &str, text: &str) -> ConfigFile {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sticky-proxy-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = ConfigFile { path: dir.join(name) };
        file.write(text);
        file
    }

    /// Replaces the content atomically (write + rename), as editors and
    /// Kubernetes do, so a watcher never reads half a file.
    pub fn write(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.path).expect("rename config");
    }
}

/// Starts a proxy in-process from a config file (reloadable).
pub async fn start_proxy_from(file: &ConfigFile) -> RunningProxy {
    let config = Config::load(&file.path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    server::start_from_file(config, file.path.clone()).await.expect("start proxy")
}

/// `sticky-proxy run` as a child process, with its log lines readable.
pub struct ChildProxy {
    pub child: std::process::Child,
    pub addr: String,
    pub admin: String,
    /// The log lines before (and including) "sticky-proxy serving".
    pub startup_log: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildProxy {
    /// Starts the binary and waits for its "serving" log line.
    pub fn spawn(config: &std::path::Path) -> ChildProxy {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sticky-proxy"));
        command.args(["run", "--config"]).arg(config);
        ChildProxy::spawn_command(command)
    }

    /// Starts the binary through `sh -c '{shell}; exec BINARY run --config CONFIG'`,
    /// e.g. to lower its limits with `ulimit` first.
    pub fn spawn_after(shell: &str, config: &std::path::Path) -> ChildProxy {
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{shell} && exec \"$0\" run --config \"$1\""))
            .arg(env!("CARGO_BIN_EXE_sticky-proxy"))
            .arg(config);
        ChildProxy::spawn_command(command)
    }

    fn spawn_command(mut command: std::process::Command) -> ChildProxy {
        use std::io::BufRead;
        let mut child = command
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn proxy");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining the log so the proxy never blocks on a full pipe.
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proxy = ChildProxy { child, addr: String::new(), admin: String::new(), startup_log: Vec::new(), lines };
        let deadline = std::time::Instant::now() + STEP;
        let serving = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match proxy.lines.recv_timeout(left) {
                Ok(line) => {
                    proxy.startup_log.push(line.clone());
                    if line.contains("sticky-proxy serving") {
                        break line;
                    }
                }
                Err(e) => panic!("the proxy did not log \"sticky-proxy serving\" within {STEP:?}: {e}"),
            }
        };
        // `server.log_format = "json"`: one object a line, fields at the top.
        if let Ok(serde_json::Value::Object(json)) = serde_json::from_str::<serde_json::Value>(&serving) {
            let field = |name: &str| {
                json.get(name)
                    .and_then(|v| v.as_str())
                    .unwrap_or_else(|| panic!("no {name} in {serving:?}"))
                    .to_string()
            };
            proxy.addr = field("listen");
            proxy.admin = field("admin");
            return proxy;
        }
        let field = |name: &str| {
            serving
                .split(&format!("{name}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no {name}= in {serving:?}"))
                .to_string()
        };
        proxy.addr = field("listen");
        proxy.admin = field("admin");
        proxy
    }

    /// The log lines up to and including the next one containing `needle`
    /// (bounded wait).
    pub fn log_until(&mut self, needle: &str) -> Vec<String> {
        let deadline = std::time::Instant::now() + STEP;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(e) => panic!("no log line with {needle:?} within {STEP:?} (seen: {lines:#?}): {e}"),
            }
        }
    }

    /// The next log line containing `needle` (bounded wait).
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(e) => panic!("no log line with {needle:?} within {STEP:?}: {e}"),
            }
        }
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus text format 0.0.4 strictly enough that a malformed
/// exposition fails the test: every sample line must parse, and every
/// sample must belong to a family declared with `# TYPE`.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut types = std::collections::HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line:?}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "family {name} declared twice");
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "unexpected comment {line:?}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, std::collections::BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = std::collections::BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name, labels)
            }
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name {name:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|base| types.get(*base).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample {name} has no # TYPE");
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

/// The value of one series, if present.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

/// Sum of a metric over all series matching `labels`.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}
