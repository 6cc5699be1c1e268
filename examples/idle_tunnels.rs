//! What an idle proxied WebSocket costs, and whether thousands of them slow
//! down everyone else's HTTP.
//!
//! Starts 3 demo backends in this process and the proxy binary as a child
//! (so its memory is its own), then:
//!
//! 1. measures the HTTP latency of devices without sockets (baseline);
//! 2. opens `--sockets N` WebSockets through the proxy and leaves them idle;
//! 3. reads the proxy's RSS growth per socket, and measures the same HTTP
//!    latency again with all of them open.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example idle_tunnels -- --proxy target/release/sticky-proxy --sockets 9000
//! ```
//!
//! Each socket costs this process two file descriptors (client + backend)
//! and the proxy two; the soft fd limit is raised to the hard one. Loopback
//! only; every wait is bounded.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sticky_proxy::tools::demo::DemoInstance;
use tokio::net::TcpListener;

const STEP: Duration = Duration::from_secs(60);

struct Args {
    proxy: String,
    sockets: usize,
    requests: usize,
}

fn args() -> Result<Args, String> {
    let mut args = Args { proxy: "target/release/sticky-proxy".into(), sockets: 2000, requests: 4000 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--proxy" => args.proxy = value,
            "--sockets" => args.sockets = value.parse().map_err(|_| format!("bad --sockets {value}"))?,
            "--requests" => args.requests = value.parse().map_err(|_| format!("bad --requests {value}"))?,
            _ => return Err(format!("unknown flag {flag}; use --proxy PATH --sockets N --requests N")),
        }
    }
    Ok(args)
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// p50 and p99 of `n` GETs by 8 concurrent clients, each for a device
/// without a socket.
async fn http_latency(addr: SocketAddr, n: usize, seed: u64) -> Result<(Duration, Duration), String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            for i in 0..n / 8 {
                let req = hyper::Request::get(format!("http://{addr}/whoami"))
                    .header("x-device-id", format!("http-{seed}-{worker}-{i}"))
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let started = Instant::now();
                let response = tokio::time::timeout(STEP, client.request(req))
                    .await
                    .map_err(|_| "request timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                let status = response.status();
                response.into_body().collect().await.map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("status {status}"));
                }
                times.push(started.elapsed());
            }
            Ok::<_, String>(times)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.map_err(|e| e.to_string())??);
    }
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = args()?;
    raise_fd_limit();
    let mut apps = Vec::new();
    for i in 1..=3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        apps.push(DemoInstance::spawn(format!("app-{i}"), listener).map_err(|e| e.to_string())?);
    }
    let (port, admin_port) = (free_port()?, free_port()?);
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[routing]\nkey = [\"header:x-device-id\", \"path:/devices/{{id}}/*\"]\n[reload]\nwatch = false\n"
    );
    for app in &apps {
        config.push_str(&format!("\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n", app.name(), app.addr()));
    }
    let dir = std::env::temp_dir().join(format!("idle-tunnels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("config.toml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let child = Command::new(&args.proxy)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.proxy))?;
    let proxy = Proxy(child);
    let pid = proxy.0.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().map_err(|_| "addr")?;
    let ready = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if ready.elapsed() > STEP {
            return Err("the proxy did not start listening".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Warm up (pools, allocator arenas, lazy statics), then the baseline.
    http_latency(addr, args.requests, 0).await?;
    let warm: Vec<_> = open_sockets(addr, 200, "warm").await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (p50_before, p99_before) = http_latency(addr, args.requests, 1).await?;
    let rss_before = rss_kib(pid).ok_or("cannot read the proxy's RSS")?;

    let started = Instant::now();
    let sockets = open_sockets(addr, args.sockets, "idle").await?;
    let opened_in = started.elapsed();
    // Let every tunnel task settle into its idle state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_open = rss_kib(pid).ok_or("cannot read the proxy's RSS")?;
    let (p50_during, p99_during) = http_latency(addr, args.requests, 2).await?;
    let open_in_backends: usize = apps.iter().map(|a| a.connected_devices()).sum();

    let per_socket = (rss_open.saturating_sub(rss_before)) as f64 * 1024.0 / args.sockets as f64;
    println!("idle WebSockets through the proxy: {} (backends see {open_in_backends})", sockets.len());
    println!("opened in {opened_in:.2?}");
    println!("proxy RSS: {rss_before} KiB before, {rss_open} KiB with them open");
    println!("proxy memory per idle proxied WebSocket: {per_socket:.0} bytes");
    println!(
        "HTTP of other devices ({} GETs, 8 clients): p50 {p50_before:.2?} → {p50_during:.2?}, p99 {p99_before:.2?} → {p99_during:.2?}",
        args.requests
    );
    drop(sockets);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `n` WebSockets, 64 at a time.
async fn open_sockets(addr: SocketAddr, n: usize, prefix: &'static str) -> Result<Vec<Ws>, String> {
    let mut sockets = Vec::with_capacity(n);
    let mut batch = Vec::new();
    for i in 0..n {
        let url = format!("ws://{addr}/devices/{prefix}-{i}/ws");
        batch.push(tokio::spawn(async move {
            tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())
        }));
        if batch.len() == 64 || i + 1 == n {
            for task in batch.drain(..) {
                let (ws, _) = task.await.map_err(|e| e.to_string())??;
                sockets.push(ws);
            }
        }
    }
    Ok(sockets)
}
