//! The demo app: a stand-in for the real application instances ("backends")
//! that sticky-proxy routes to.
//!
//! This module owns [`DemoInstance`]: one named HTTP/1.1 server (hyper, with
//! upgrades) plus an in-memory registry of the device WebSockets it holds.
//! It reproduces the situation the proxy exists for: a device's WebSocket
//! lives in the memory of exactly one instance, so a later HTTP request about
//! that device only succeeds if it reaches that same instance. The proxy's
//! integration tests and benchmarks use it as the real backend.
//!
//! Every response carries `X-Instance: {name}`.
//!
//! | Endpoint | Behaviour |
//! |---|---|
//! | `GET /whoami` | 200 `text/plain`, body = instance name |
//! | `GET /health` | 200 `ok` |
//! | `GET /devices/{id}/ws` | WebSocket upgrade (101). The socket is held in the registry under `{id}`; text/binary frames are echoed back. Without `Upgrade`: 426. Bad handshake: 400 |
//! | `POST /devices/{id}/messages` | body (max 1 MiB, else 413) is sent to every socket this instance holds for `{id}` (text frame if UTF-8, else binary): 200 JSON `{"delivered":true,"instance":..,"device":..,"sockets":n}`; none held: 421 (Misdirected Request: "not here") `device {id} is not connected to instance {name}` |
//! | `POST /echo` | streams the request body back unchanged (no buffering), `Content-Type` preserved |
//! | `GET /bytes/{n}` | streams `n` bytes (`n` ≤ 10 GiB) in 64 KiB chunks, byte `i` = `i % 256`, with `Content-Length` |
//! | `GET /delay/{ms}` | waits `ms` (capped at 60 000) then 200 `slept {ms}ms` |
//! | `GET /hangup` | closes the connection without answering (an app that drops a request) |
//! | `GET /headers` | 200 JSON object: request header name → value (repeats joined with `", "`), plus `"_uri"` → request target |
//! | anything else | 404 `text/plain` naming the method and path |
//!
//! `{id}` is percent-decoded (`dev%2042` → `dev 42`); invalid encoding or
//! non-UTF-8 result → 400.
//!
//! [`DemoInstance::shutdown`] (or dropping the instance) simulates the
//! instance dying: the listener is closed and every connection and socket is
//! dropped without a goodbye.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::http::headers::has_token;

/// Largest body accepted by `POST /devices/{id}/messages`.
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest `n` accepted by `GET /bytes/{n}`.
const MAX_BYTES_N: u64 = 10 * 1024 * 1024 * 1024;
/// `GET /delay/{ms}` never sleeps longer than this.
const MAX_DELAY_MS: u64 = 60_000;
/// Chunk size of `GET /bytes/{n}`.
const CHUNK_LEN: usize = 64 * 1024;
/// Per-socket queue of outgoing messages (POSTs wait when it is full).
const SOCKET_QUEUE: usize = 64;
/// How long a socket may take to finish the closing handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = UnsyncBoxBody<Bytes, BoxError>;
type Resp = Response<RespBody>;
type WsStream = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// One running demo app instance. See the module docs for its endpoints.
///
/// Dropping it is the same as calling [`DemoInstance::shutdown`].
pub struct DemoInstance {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The listener, shared with the accept loop so `shutdown` can close it synchronously.
    listener: Arc<Mutex<Option<TcpListener>>>,
    shutdown_tx: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

/// State shared by every task of one instance.
struct Shared {
    name: String,
    name_header: HeaderValue,
    registry: Mutex<HashMap<String, Vec<SocketEntry>>>,
    next_socket_id: AtomicU64,
    shutdown_rx: watch::Receiver<bool>,
}

struct SocketEntry {
    id: u64,
    tx: mpsc::Sender<Queued>,
}

/// A message for a socket, and who to tell once it has been written to it.
type Queued = (Message, oneshot::Sender<()>);

impl DemoInstance {
    /// Serve on an already-bound listener (tests bind `127.0.0.1:0`).
    /// Spawns onto the current tokio runtime; errors (instead of panicking)
    /// if there is none, or if `name` is not a valid header value.
    pub fn spawn(name: impl Into<String>, listener: TcpListener) -> std::io::Result<DemoInstance> {
        let name = name.into();
        let name_header = HeaderValue::from_str(&name).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("instance name {name:?} is not a valid header value"),
            )
        })?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| std::io::Error::other(format!("DemoInstance needs a tokio runtime: {e}")))?;
        let addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            name,
            name_header,
            registry: Mutex::new(HashMap::new()),
            next_socket_id: AtomicU64::new(0),
            shutdown_rx,
        });
        let listener = Arc::new(Mutex::new(Some(listener)));
        let accept_task = runtime.spawn(accept_loop(shared.clone(), listener.clone()));
        Ok(DemoInstance { shared, addr, listener, shutdown_tx, accept_task })
    }

    /// Bind `addr` and serve on it (see [`DemoInstance::spawn`]).
    pub async fn bind(name: impl Into<String>, addr: SocketAddr) -> std::io::Result<DemoInstance> {
        let listener = TcpListener::bind(addr).await?;
        Self::spawn(name, listener)
    }

    /// The instance name (body of `/whoami`, value of `X-Instance`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The address the instance listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of device sockets currently held (a device with two sockets counts twice).
    pub fn connected_devices(&self) -> usize {
        lock(&self.shared.registry).values().map(Vec::len).sum()
    }

    /// Number of sockets currently held for one (decoded) device id.
    pub fn sockets_for(&self, device: &str) -> usize {
        lock(&self.shared.registry).get(device).map_or(0, Vec::len)
    }

    /// Stop the instance, simulating it dying. Idempotent; also run on drop.
    ///
    /// Guarantees when it returns: the listening socket is closed (new TCP
    /// connects to [`addr`](Self::addr) are refused, connections still in
    /// the accept backlog are reset), the registry is empty
    /// (`connected_devices() == 0`, POSTs can no longer deliver) and every
    /// connection and socket task has been told to stop. Those tasks drop
    /// their streams (closing the TCP connections without a WebSocket close
    /// frame or HTTP response) the next time the runtime polls them, which
    /// is promptly but asynchronously.
    pub fn shutdown(&self) {
        drop(lock(&self.listener).take());
        self.shutdown_tx.send_replace(true);
        self.accept_task.abort();
        lock(&self.shared.registry).clear();
    }
}

impl Drop for DemoInstance {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for DemoInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoInstance")
            .field("name", &self.shared.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Lock a std mutex, ignoring poisoning (the data stays consistent: every
/// critical section is a single map operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves once the instance is shut down (or its `DemoInstance` is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

async fn accept_loop(shared: Arc<Shared>, listener: Arc<Mutex<Option<TcpListener>>>) {
    let accept = || {
        poll_fn(|cx| match lock(&listener).as_ref() {
            Some(l) => l.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        })
    };
    loop {
        let accepted = tokio::select! {
            a = accept() => a,
            _ = stopped(shared.shutdown_rx.clone()) => None,
        };
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => {
                tokio::spawn(serve_connection(shared.clone(), stream, peer));
            }
            Some(Err(e)) => {
                debug!(instance = %shared.name, error = %e, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    _ = stopped(shared.shutdown_rx.clone()) => break,
                }
            }
        }
    }
    debug!(instance = %shared.name, "accept loop stopped");
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let svc_shared = shared.clone();
    let svc = service_fn(move |req| {
        let shared = svc_shared.clone();
        async move {
            if req.uri().path() == "/hangup" {
                // The app drops the request: the connection closes unanswered.
                return Err(std::io::Error::other("hung up on purpose"));
            }
            let mut resp = route(&shared, req).await;
            resp.headers_mut().insert("x-instance", shared.name_header.clone());
            Ok::<_, std::io::Error>(resp)
        }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades();
    tokio::select! {
        res = conn => {
            if let Err(e) = res {
                debug!(instance = %shared.name, %peer, error = %e, "connection error");
            }
        }
        _ = stopped(shared.shutdown_rx.clone()) => {
            debug!(instance = %shared.name, %peer, "connection dropped: instance shut down");
        }
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(&path).split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["whoami"]) => text(StatusCode::OK, shared.name.clone()),
        (&Method::GET, ["health"]) => text(StatusCode::OK, "ok"),
        (&Method::GET, ["devices", id, "ws"]) => match decode_id(id) {
            Ok(device) => websocket(shared, req, device),
            Err(reason) => text(StatusCode::BAD_REQUEST, reason),
        },
        (&Method::POST, ["devices", id, "messages"]) => match decode_id(id) {
            Ok(device) => deliver(shared, req, device).await,
            Err(reason) => text(StatusCode::BAD_REQUEST, reason),
        },
        (&Method::POST, ["echo"]) => echo(req),
        (&Method::GET, ["bytes", n]) => match n.parse::<u64>() {
            Ok(n) if n <= MAX_BYTES_N => Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, n)
                .body(PatternBody { remaining: n }.boxed_unsync())
                .unwrap_or_else(|_| internal_error()),
            _ => text(StatusCode::BAD_REQUEST, format!("bad byte count {n:?}: expected an integer 0..={MAX_BYTES_N}")),
        },
        (&Method::GET, ["delay", ms]) => match ms.parse::<u64>() {
            Ok(ms) => {
                let ms = ms.min(MAX_DELAY_MS);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("slept {ms}ms"))
            }
            Err(_) => text(StatusCode::BAD_REQUEST, format!("bad delay {ms:?}: expected milliseconds as an integer")),
        },
        (&Method::GET, ["headers"]) => headers_json(&req),
        _ => text(StatusCode::NOT_FOUND, format!("no route for {} {}", req.method(), path)),
    }
}

// ---------------------------------------------------------------- responses

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed_unsync()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn json(status: StatusCode, value: &impl Serialize) -> Resp {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(_) => internal_error(),
    }
}

fn internal_error() -> Resp {
    text(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

// ---------------------------------------------------------------- device ids

/// Percent-decode a path segment into a device id.
fn decode_id(raw: &str) -> Result<String, String> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex);
            let lo = bytes.get(i + 2).copied().and_then(hex);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(format!("invalid percent-encoding in device id {raw:?}")),
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    let id = String::from_utf8(out).map_err(|_| format!("device id {raw:?} does not decode to UTF-8"))?;
    if id.is_empty() {
        return Err("empty device id".to_owned());
    }
    Ok(id)
}

// ---------------------------------------------------------------- websockets

/// Validate the upgrade request; on success answer 101 and adopt the socket in a new task.
fn websocket(shared: &Arc<Shared>, mut req: Request<Incoming>, device: String) -> Resp {
    let headers = req.headers();
    if !headers.contains_key(header::UPGRADE) {
        let mut resp =
            text(StatusCode::UPGRADE_REQUIRED, "this endpoint needs a WebSocket upgrade (Upgrade: websocket)");
        resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return resp;
    }
    if !has_token(headers, &header::UPGRADE, "websocket") {
        return text(StatusCode::BAD_REQUEST, "Upgrade header must be websocket");
    }
    if !has_token(headers, &header::CONNECTION, "upgrade") {
        return text(StatusCode::BAD_REQUEST, "Connection header must contain the upgrade token");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes().trim_ascii()) != Some(b"13") {
        let mut resp = text(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13");
        resp.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return resp;
    }
    let accept = match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if !key.as_bytes().trim_ascii().is_empty() => derive_accept_key(key.as_bytes().trim_ascii()),
        _ => return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key header"),
    };
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return internal_error();
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let shared = task_shared;
        let upgraded = tokio::select! {
            u = on_upgrade => match u {
                Ok(u) => u,
                Err(e) => {
                    debug!(instance = %shared.name, %device, error = %e, "websocket upgrade failed");
                    return;
                }
            },
            _ = stopped(shared.shutdown_rx.clone()) => return,
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        hold_socket(shared, device, ws).await;
    });

    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}

/// Removes a socket from the registry when dropped (also when its task is cancelled).
struct Registration {
    shared: Arc<Shared>,
    device: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = lock(&self.shared.registry);
        if let Some(sockets) = registry.get_mut(&self.device) {
            sockets.retain(|s| s.id != self.id);
            if sockets.is_empty() {
                registry.remove(&self.device);
            }
        }
    }
}

/// Own one device socket: registered before the first read, unregistered on
/// close/EOF/error (before the close reply is sent) or shutdown.
async fn hold_socket(shared: Arc<Shared>, device: String, mut ws: WsStream) {
    let (tx, mut rx) = mpsc::channel(SOCKET_QUEUE);
    let id = shared.next_socket_id.fetch_add(1, Ordering::Relaxed);
    if *shared.shutdown_rx.borrow() {
        return;
    }
    lock(&shared.registry).entry(device.clone()).or_default().push(SocketEntry { id, tx });
    let registration = Registration { shared: shared.clone(), device, id };

    let closing = tokio::select! {
        c = pump(&shared, &registration.device, &mut ws, &mut rx) => c,
        _ = stopped(shared.shutdown_rx.clone()) => return,
    };
    // From here a message can't be sent: refuse new ones (their POST gets
    // 421) rather than accept them into a queue nobody reads, and fail the
    // ones still queued (dropping them tells their senders).
    rx.close();
    while rx.try_recv().is_ok() {}
    drop(registration);
    if closing {
        // The peer sent Close: tungstenite has queued the reply; polling sends it.
        let finish = async { while let Some(Ok(_)) = ws.next().await {} };
        tokio::select! {
            _ = tokio::time::timeout(CLOSE_TIMEOUT, finish) => {}
            _ = stopped(shared.shutdown_rx.clone()) => {}
        }
    }
}

/// Echo device frames and forward queued messages. Returns true if the peer
/// started the closing handshake, false on EOF/error.
async fn pump(shared: &Shared, device: &str, ws: &mut WsStream, rx: &mut mpsc::Receiver<Queued>) -> bool {
    loop {
        let (outgoing, written) = tokio::select! {
            // Queued messages first: one accepted before the peer's Close
            // arrived is still sent.
            biased;
            queued = rx.recv() => match queued {
                Some((m, written)) => (m, Some(written)),
                None => return false,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => (m, None),
                Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => continue, // ping (auto-answered), pong, raw frame
                Some(Err(e)) => {
                    debug!(instance = %shared.name, %device, error = %e, "websocket error");
                    return false;
                }
                None => return false,
            },
        };
        if let Err(e) = ws.send(outgoing).await {
            debug!(instance = %shared.name, %device, error = %e, "websocket send failed");
            return false;
        }
        if let Some(written) = written {
            let _ = written.send(());
        }
    }
}

#[derive(Serialize)]
struct Delivered<'a> {
    delivered: bool,
    instance: &'a str,
    device: &'a str,
    sockets: usize,
}

async fn deliver(shared: &Shared, req: Request<Incoming>, device: String) -> Resp {
    let too_large = || text(StatusCode::PAYLOAD_TOO_LARGE, format!("message body exceeds {MAX_MESSAGE_BYTES} bytes"));
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_MESSAGE_BYTES as u64) {
        return too_large();
    }
    let body = match Limited::new(req.into_body(), MAX_MESSAGE_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("could not read request body: {e}")),
    };
    let message = match Utf8Bytes::try_from(body.clone()) {
        Ok(t) => Message::Text(t),
        Err(_) => Message::Binary(body),
    };
    let senders: Vec<mpsc::Sender<Queued>> = lock(&shared.registry)
        .get(&device)
        .map(|sockets| sockets.iter().map(|s| s.tx.clone()).collect())
        .unwrap_or_default();
    // Counted only once written to the socket: a socket that closes with
    // the message still queued did not get it (and the answer says so).
    let mut sockets = 0;
    for tx in senders {
        let (written, was_written) = oneshot::channel();
        if tx.send((message.clone(), written)).await.is_ok() && was_written.await.is_ok() {
            sockets += 1;
        }
    }
    if sockets == 0 {
        // 421 Misdirected Request: "not here", so a proxy with
        // `routing.not_here` tries the instance that holds the socket.
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            format!("device {device} is not connected to instance {}", shared.name),
        );
    }
    json(StatusCode::OK, &Delivered { delivered: true, instance: &shared.name, device: &device, sockets })
}

// ---------------------------------------------------------------- streaming

fn echo(req: Request<Incoming>) -> Resp {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    // Incoming reports an exact size hint when the request had Content-Length,
    // so hyper sends the same Content-Length back; otherwise it uses chunked.
    let mut resp = Response::new(req.into_body().map_err(BoxError::from).boxed_unsync());
    if let Some(ct) = content_type {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

/// 64 KiB of the byte pattern `i % 256` (so consecutive chunks continue the pattern).
static PATTERN: [u8; CHUNK_LEN] = {
    let mut a = [0u8; CHUNK_LEN];
    let mut i = 0;
    while i < CHUNK_LEN {
        a[i] = i as u8;
        i += 1;
    }
    a
};

/// Body of `GET /bytes/{n}`: `remaining` more bytes, generated on demand.
struct PatternBody {
    remaining: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK_LEN as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PATTERN).slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

// ---------------------------------------------------------------- /headers

fn headers_json(req: &Request<Incoming>) -> Resp {
    let headers = req.headers();
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(name.as_str().to_owned(), serde_json::Value::String(joined));
    }
    map.insert("_uri".to_owned(), serde_json::Value::String(req.uri().to_string()));
    json(StatusCode::OK, &map)
}
