//! Limits and timeouts on the client side: body size and stalls, stalled
//! reads of a response, idle and slow connections, requests per
//! connection, connections at once, header counts and HTTP/2 streams. Each
//! answers the client with a clear status (or closes an idle connection)
//! and counts `sticky_proxy_limits_total{limit}`; everyone else is served.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use sticky_proxy::app::RunningProxy;
use sticky_proxy::tools::demo::DemoInstance;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy over one demo app with `settings` added to `[server]`.
async fn proxy_with(settings: &str) -> (Vec<DemoInstance>, RunningProxy) {
    let apps = start_apps(1).await;
    let text = config_for(&apps, ALL_KEYS, "").replace("[server]\n", &format!("[server]\n{settings}\n"));
    let proxy = start_proxy(&text).await;
    (apps, proxy)
}

async fn limit_count(proxy: &RunningProxy, limit: &str) -> f64 {
    let text = Http::default().get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body;
    metric(&parse_prometheus(&text), "sticky_proxy_limits_total", &[("limit", limit)]).unwrap_or(-1.0)
}

/// Waits until the limit's counter reaches `at_least` (bounded by `within`).
async fn counted(proxy: &RunningProxy, limit: &str, at_least: f64) {
    within(limit, async {
        while limit_count(proxy, limit).await < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Whether `elapsed` is at least `limit`, give or take the 1 ms resolution
/// of tokio's timer (which may round a deadline down).
fn not_before(elapsed: Duration, limit: Duration) -> bool {
    elapsed + Duration::from_millis(2) >= limit
}

async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr)).await.expect("connect")
}

/// Reads what the proxy sends until it closes the connection (or resets it).
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within("the proxy closes", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&answer).into_owned(),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response with a Content-Length body; returns its head and body.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = within("a response", stream.read(&mut buf)).await.expect("read");
        assert!(n > 0, "closed before a whole response: {}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                return (text[..end].to_string(), text[end + 4..end + 4 + length].to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_client_max_body_size_get_413() {
    let (_apps, proxy) = proxy_with("client_max_body_size = \"1k\"").await;
    let addr = proxy.proxy_addr();
    // Declared too large: refused before anything goes upstream.
    let mut stream = connect(addr).await;
    let head = "POST /echo HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\nContent-Length: 9223372036854775807\r\n\r\n";
    stream.write_all(head.as_bytes()).await.expect("write");
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("server.client_max_body_size (1024 bytes)"), "{answer}");

    // Chunked, found too large on the way (the demo app reads a message
    // whole before it answers, so the 413 is the proxy's to send).
    let mut stream = connect(addr).await;
    let chunk = "x".repeat(600);
    let request = format!(
        "POST /devices/d1/messages HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    counted(&proxy, "server.client_max_body_size", 2.0).await;

    // At the limit is fine.
    let reply = Http::default().post(&format!("http://{addr}/echo?device_id=d1"), &"y".repeat(1024)).await;
    assert_eq!((reply.status.as_u16(), reply.body.len()), (200, 1024));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_after_client_body_timeout() {
    const STALL: Duration = Duration::from_millis(300);
    let (_apps, proxy) = proxy_with("client_body_timeout = \"300ms\"").await;
    let addr = proxy.proxy_addr();
    for content_length in ["10", "100000"] {
        // Small bodies are read before sending, large ones streamed: both
        // stall. The demo app reads a message whole before it answers.
        let mut stream = connect(addr).await;
        let head = format!("POST /devices/d1/messages HTTP/1.1\r\nHost: h\r\nContent-Length: {content_length}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("write");
        stream.write_all(b"12345").await.expect("write");
        let start = Instant::now();
        let answer = read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{content_length}: {answer}");
        assert!(answer.contains("server.client_body_timeout"), "{answer}");
        assert!(not_before(start.elapsed(), STALL), "not before the timeout: {:?}", start.elapsed());
    }
    counted(&proxy, "server.client_body_timeout", 2.0).await;
    // The backend was not blamed.
    let reply = Http::default().get(&format!("http://{addr}/whoami"), &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 200);
    let metrics = Http::default().get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body;
    let samples = parse_prometheus(&metrics);
    assert_eq!(metric_sum(&samples, "sticky_proxy_upstream_errors_total", &[]), 0.0, "{metrics}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_after_send_timeout() {
    let (_apps, proxy) = proxy_with("send_timeout = \"300ms\"").await;
    let addr = proxy.proxy_addr();
    let mut stream = connect(addr).await;
    // 64 MiB is far more than the socket buffers between us hold.
    let request = "GET /bytes/67108864 HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("write");
    counted(&proxy, "server.send_timeout", 1.0).await;
    // What was sent is there to read, then the connection ends short.
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match within("read to the end", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    assert!(received < 64 << 20, "the response was cut short: {received} bytes");
    // Others are served.
    let reply = Http::default().get(&format!("http://{addr}/whoami"), &[("x-device-id", "d2")]).await;
    assert_eq!(reply.status, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_by_their_own_clocks() {
    let (_apps, proxy) = proxy_with("keepalive_timeout = \"300ms\"\nheader_read_timeout = \"400ms\"").await;
    let addr = proxy.proxy_addr();

    // A request served, then idle: closed after keepalive_timeout.
    let mut idle = connect(addr).await;
    idle.write_all(b"GET /whoami HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\n\r\n").await.expect("write");
    let (head, body) = read_response(&mut idle).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "app-1");
    let start = Instant::now();
    assert_eq!(read_until_closed(&mut idle).await, "", "closed without a word");
    assert!(not_before(start.elapsed(), Duration::from_millis(300)), "{:?}", start.elapsed());
    counted(&proxy, "server.keepalive_timeout", 1.0).await;

    // Half a request line, then nothing: closed after header_read_timeout.
    let mut slow = connect(addr).await;
    slow.write_all(b"GET /whoami HTT").await.expect("write");
    let start = Instant::now();
    read_until_closed(&mut slow).await;
    assert!(not_before(start.elapsed(), Duration::from_millis(400)), "{:?}", start.elapsed());
    // A connection that never sends: the same clock.
    let mut silent = connect(addr).await;
    assert_eq!(read_until_closed(&mut silent).await, "");
    counted(&proxy, "server.header_read_timeout", 2.0).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_requests_closes_after_that_many() {
    let (_apps, proxy) = proxy_with("keepalive_requests = 2").await;
    let mut stream = connect(proxy.proxy_addr()).await;
    let request = b"GET /whoami HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\n\r\n";
    stream.write_all(request).await.expect("write");
    let (first, _) = read_response(&mut stream).await;
    assert!(!first.to_ascii_lowercase().contains("connection: close"), "{first}");
    stream.write_all(request).await.expect("write");
    let (second, _) = read_response(&mut stream).await;
    assert!(second.to_ascii_lowercase().contains("connection: close"), "{second}");
    assert_eq!(read_until_closed(&mut stream).await, "");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_client_gets_503_until_one_closes() {
    let (_apps, proxy) = proxy_with("max_connections = 2").await;
    let addr = proxy.proxy_addr();
    let request = b"GET /whoami HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(addr).await;
        stream.write_all(request).await.expect("write");
        let (head, _) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(stream);
    }
    let mut third = connect(addr).await;
    let answer = read_until_closed(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("server.max_connections (2)"), "{answer}");
    counted(&proxy, "server.max_connections", 1.0).await;
    // The admin API is not counted.
    assert_eq!(Http::default().get(&format!("http://{}/healthz", proxy.admin_addr()), &[]).await.status, 200);

    // One closes: a slot comes free once the proxy has seen it go.
    drop(held.pop());
    within("a free slot", async {
        loop {
            let mut stream = connect(addr).await;
            stream.write_all(request).await.expect("write");
            let answer = read_until_closed_or_response(&mut stream).await;
            if answer.starts_with("HTTP/1.1 200") {
                return;
            }
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    proxy.shutdown().await;
}

/// The first response on the connection, or all it got before closing.
async fn read_until_closed_or_response(stream: &mut TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within("an answer", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        if data.windows(4).any(|w| w == b"\r\n\r\n") && data.ends_with(b"app-1") {
            break;
        }
    }
    String::from_utf8_lossy(&data).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_headers_than_max_header_count_get_431() {
    let (_apps, proxy) = proxy_with("max_header_count = 8").await;
    let mut request = String::from("GET /whoami HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\n");
    for i in 0..10 {
        request.push_str(&format!("x-extra-{i}: {i}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = connect(proxy.proxy_addr()).await;
    stream.write_all(request.as_bytes()).await.expect("write");
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let reply = Http::default().get(&format!("http://{}/whoami", proxy.proxy_addr()), &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_told_h2_max_concurrent_streams() {
    let (_apps, proxy) = proxy_with("h2c = true\nh2_max_concurrent_streams = 7").await;
    let mut stream = connect(proxy.proxy_addr()).await;
    // The preface and an empty SETTINGS frame; the server's SETTINGS come first.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).await.expect("write");
    let mut header = [0u8; 9];
    within("SETTINGS", stream.read_exact(&mut header)).await.expect("frame header");
    assert_eq!(header[3], 0x4, "the first frame is SETTINGS");
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    within("SETTINGS payload", stream.read_exact(&mut payload)).await.expect("payload");
    let max_streams = payload
        .chunks_exact(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == 0x3)
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(max_streams, Some(7), "SETTINGS_MAX_CONCURRENT_STREAMS");
    proxy.shutdown().await;
}
