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
use sticky_proxy::config::Config;
use sticky_proxy::demo::DemoInstance;
use sticky_proxy::server::{self, RunningProxy};
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

/// Small deterministic PRNG for device IDs (splitmix64).
pub struct Ids(u64);

impl Ids {
    pub fn new(seed: u64) -> Self {
        Ids(seed)
    }

    pub fn next_id(&mut self) -> String {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        format!("dev-{:016x}", z ^ (z >> 31))
    }
}
