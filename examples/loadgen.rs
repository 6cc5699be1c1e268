//! Load generator and backends for `benches/load/run.sh` (not part of the
//! library). Every mode is bounded in count and in time (`--time-limit`),
//! talks to loopback addresses only, and prints one machine-readable
//! `SP_...` line that the script parses.
//!
//! ```text
//! loadgen http    --addr A [--connections 4] [--requests 20000] [--ids 10000] [--path /] [--body 0] [--close]
//! loadgen ws      --addr A [--sockets 1000] [--messages 20] [--size 32] [--ids 10000]
//! loadgen ws-idle --addr A [--sockets 2000] [--hold 60] [--ready-file F]
//! loadgen backend --listen 127.0.0.1:19111 [--count 3] [--workers 1]
//! ```
//!
//! - `http`: a fixed number of requests over keep-alive connections, each
//!   with `X-Device-Id: dev-N` cycling through `--ids` IDs (a deterministic
//!   load for instruction and allocation counts, where wrk's fixed duration
//!   would not do).
//! - `ws`: opens `--sockets` WebSockets to `/devices/dev-N/ws` (also sending
//!   `X-Device-Id`), then every socket sends `--messages` messages one at a
//!   time, each waiting for its echo: messages/s and round-trip percentiles.
//! - `ws-idle`: opens `--sockets` WebSockets, proves each with one echo,
//!   writes the count to `--ready-file` and holds them open for `--hold`
//!   seconds (or until killed): for measuring memory per idle socket.
//! - `backend`: `--count` demo app instances (WebSocket echo at
//!   `/devices/{id}/ws`) on consecutive ports from `--listen`, with
//!   `--workers` runtime threads, until killed or `--time-limit`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Load generator and backends for benches/load/run.sh")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// Give up (exit 1) after this many seconds.
    #[arg(long, global = true, default_value_t = 120)]
    time_limit: u64,
    /// Runtime worker threads (default: 1 for clients and backends alike).
    #[arg(long, global = true, default_value_t = 1)]
    workers: usize,
}

#[derive(Subcommand, Debug)]
enum Mode {
    Http {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 20_000)]
        requests: u64,
        #[arg(long, default_value_t = 10_000)]
        ids: u64,
        #[arg(long, default_value = "/")]
        path: String,
        /// Request body bytes (POST when > 0).
        #[arg(long, default_value_t = 0)]
        body: usize,
        /// A new connection per request (`Connection: close`).
        #[arg(long)]
        close: bool,
    },
    Ws {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        #[arg(long, default_value_t = 20)]
        messages: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 32)]
        size: usize,
        #[arg(long, default_value_t = 10_000)]
        ids: u64,
    },
    WsIdle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        sockets: usize,
        /// Seconds to hold the sockets open once they are all up.
        #[arg(long, default_value_t = 60)]
        hold: u64,
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
    },
    Backend {
        /// Address of the first instance; the others take the next ports.
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 3)]
        count: u16,
    },
}

/// At most this many WebSocket handshakes in flight at once.
const CONNECT_CONCURRENCY: usize = 64;
/// Upper bounds on what one run may ask for.
const MAX_SOCKETS: usize = 50_000;
const MAX_REQUESTS: u64 = 100_000_000;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !(1..=64).contains(&cli.workers) {
        eprintln!("--workers must be 1..64");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(cli.workers).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = Duration::from_secs(cli.time_limit.clamp(1, 24 * 3600));
    let outcome = runtime.block_on(async move {
        match tokio::time::timeout(limit, run(cli.mode)).await {
            Ok(result) => result,
            Err(_) => Err(format!("time limit of {limit:?} reached")),
        }
    });
    // Don't wait for tasks still holding sockets.
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mode: Mode) -> Result<(), String> {
    match mode {
        Mode::Http { addr, connections, requests, ids, path, body, close } => {
            if !(1..=10_000).contains(&connections) || requests > MAX_REQUESTS || ids == 0 {
                return Err("need 1..10000 connections, at most 1e8 requests, at least 1 id".into());
            }
            http(addr, connections, requests, ids, path, body, close).await
        }
        Mode::Ws { addr, sockets, messages, size, ids } => {
            if !(1..=MAX_SOCKETS).contains(&sockets) || messages > 100_000 || ids == 0 || size > 1 << 20 {
                return Err(format!("need 1..{MAX_SOCKETS} sockets, at most 100000 messages of at most 1 MiB"));
            }
            ws(addr, sockets, messages, size, ids).await
        }
        Mode::WsIdle { addr, sockets, hold, ready_file } => {
            if !(1..=MAX_SOCKETS).contains(&sockets) {
                return Err(format!("need 1..{MAX_SOCKETS} sockets"));
            }
            ws_idle(addr, sockets, Duration::from_secs(hold), ready_file).await
        }
        Mode::Backend { listen, count } => backend(listen, count).await,
    }
}

// ---------------------------------------------------------------- http

async fn http(
    addr: SocketAddr,
    connections: usize,
    requests: u64,
    ids: u64,
    path: String,
    body: usize,
    close: bool,
) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(vec![b'x'; body]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, path, body) = (Arc::clone(&next), path.clone(), body.clone());
        tasks.push(tokio::spawn(async move { http_connection(addr, next, requests, ids, path, body, close).await }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    for task in tasks {
        match task.await {
            Ok(Ok((l, e))) => {
                latencies.extend(l);
                errors += e;
            }
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("connection task failed: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let done = latencies.len() as u64;
    latencies.sort_unstable();
    println!(
        "SP_HTTP requests={done} errors={errors} elapsed_us={} rps={:.1} p50_us={} p99_us={}",
        elapsed.as_micros(),
        done as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0)
    );
    Ok(())
}

/// One client taking request numbers from `next` until `total` are taken,
/// on one keep-alive connection (or a new connection per request with
/// `close`): (latencies in µs, non-2xx answers).
async fn http_connection(
    addr: SocketAddr,
    next: Arc<AtomicU64>,
    total: u64,
    ids: u64,
    path: String,
    body: Bytes,
    close: bool,
) -> Result<(Vec<u32>, u64), String> {
    let method = if body.is_empty() { hyper::Method::GET } else { hyper::Method::POST };
    let (mut latencies, mut errors) = (Vec::new(), 0);
    let mut sender = None;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return Ok((latencies, errors));
        }
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path.as_str())
            .header("host", addr.to_string())
            .header("x-device-id", format!("dev-{}", n % ids + 1));
        if close {
            request = request.header("connection", "close");
        }
        let request = request.body(Full::new(body.clone())).map_err(|e| format!("request: {e}"))?;
        let sent = Instant::now();
        let mut current = match sender.take() {
            Some(s) => s,
            None => open_http(addr).await?,
        };
        current.ready().await.map_err(|e| format!("connection closed: {e}"))?;
        let response = current.send_request(request).await.map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            errors += 1;
        }
        response.into_body().collect().await.map_err(|e| format!("response body: {e}"))?;
        latencies.push(micros(sent.elapsed()));
        if !close {
            sender = Some(current);
        }
    }
}

async fn open_http(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

// ---------------------------------------------------------------- websockets

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket for device `dev-{n}` (path and `X-Device-Id`).
async fn open_socket(addr: SocketAddr, n: u64) -> Result<Socket, String> {
    let device = format!("dev-{n}");
    let mut request = format!("ws://{addr}/devices/{device}/ws").into_client_request().map_err(|e| e.to_string())?;
    let value = HeaderValue::from_str(&device).map_err(|e| e.to_string())?;
    request.headers_mut().insert("x-device-id", value);
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (socket, _) = tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .map_err(|e| format!("websocket handshake for {device}: {e}"))?;
    Ok(socket)
}

/// Sends `payload` and waits for it to come back; the round trip in µs.
async fn echo(socket: &mut Socket, payload: &Bytes) -> Result<u32, String> {
    let sent = Instant::now();
    socket.send(Message::Binary(payload.clone())).await.map_err(|e| format!("send: {e}"))?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == payload.len() => return Ok(micros(sent.elapsed())),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => return Err(format!("unexpected message {other:?}")),
            Some(Err(e)) => return Err(format!("receive: {e}")),
            None => return Err("the socket closed".into()),
        }
    }
}

/// Opens `count` sockets, at most [`CONNECT_CONCURRENCY`] handshakes at a time,
/// each proven with one echo.
async fn open_all(addr: SocketAddr, count: usize, ids: u64) -> Result<Vec<Socket>, String> {
    let probe = Bytes::from_static(b"hello");
    let opened = futures_util::stream::iter(0..count as u64)
        .map(|i| {
            let probe = probe.clone();
            async move {
                let mut socket = open_socket(addr, i % ids + 1).await?;
                echo(&mut socket, &probe).await?;
                Ok::<_, String>(socket)
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    opened.into_iter().collect()
}

async fn ws(addr: SocketAddr, sockets: usize, messages: usize, size: usize, ids: u64) -> Result<(), String> {
    let opening = Instant::now();
    let all = open_all(addr, sockets, ids).await?;
    let open_time = opening.elapsed();
    let payload = Bytes::from(vec![b'm'; size.max(1)]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut socket in all {
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut rtts = Vec::with_capacity(messages);
            for _ in 0..messages {
                rtts.push(echo(&mut socket, &payload).await?);
            }
            let _ = socket.close(None).await;
            Ok::<_, String>(rtts)
        }));
    }
    let mut rtts = Vec::with_capacity(sockets * messages);
    for task in tasks {
        rtts.extend(task.await.map_err(|e| format!("socket task failed: {e}"))??);
    }
    let elapsed = started.elapsed();
    rtts.sort_unstable();
    println!(
        "SP_WS sockets={sockets} messages={} elapsed_us={} msgs_per_s={:.1} p50_us={} p99_us={} open_ms={}",
        rtts.len(),
        elapsed.as_micros(),
        rtts.len() as f64 / elapsed.as_secs_f64(),
        percentile(&rtts, 50.0),
        percentile(&rtts, 99.0),
        open_time.as_millis()
    );
    Ok(())
}

async fn ws_idle(
    addr: SocketAddr,
    sockets: usize,
    hold: Duration,
    ready_file: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let started = Instant::now();
    let all = open_all(addr, sockets, u64::MAX).await?;
    println!("SP_WS_IDLE sockets={} open_ms={}", all.len(), started.elapsed().as_millis());
    if let Some(file) = ready_file {
        std::fs::write(&file, format!("{}\n", all.len())).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    tokio::time::sleep(hold).await;
    drop(all);
    Ok(())
}

// ---------------------------------------------------------------- backends

async fn backend(first: SocketAddr, count: u16) -> Result<(), String> {
    if !first.ip().is_loopback() {
        return Err("backends listen on loopback only".into());
    }
    let mut instances = Vec::new();
    for i in 0..count {
        let port = first.port().checked_add(i).ok_or("port out of range")?;
        let addr = SocketAddr::new(first.ip(), port);
        let instance = sticky_proxy::tools::demo::DemoInstance::bind(format!("ws-{}", i + 1), addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        instances.push(instance);
    }
    println!("SP_BACKEND listening={count} first={first}");
    std::future::pending::<()>().await;
    Ok(())
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The `p`th percentile of sorted values (nearest rank); 0 when empty.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
