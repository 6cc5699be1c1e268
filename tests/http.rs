//! HTTP proxying: headers, upstream failures, and WebSocket answers other
//! than 101.

mod common;

use common::*;
use hyper::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_and_hop_by_hop_headers_dropped() {
    let (_apps, proxy) = stack(2).await;
    let reply = Http::default()
        .get(
            &format!("http://{}/headers?x=1", proxy.proxy_addr()),
            &[
                ("x-device-id", "d1"),
                ("host", "api.example.test"),
                ("x-forwarded-for", "10.9.8.7"),
                ("connection", "x-hop"),
                ("x-hop", "secret"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(seen["host"], "api.example.test", "Host is kept");
    assert_eq!(seen["x-forwarded-for"], "10.9.8.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "api.example.test");
    assert_eq!(seen["x-device-id"], "d1");
    assert_eq!(seen["_uri"], "/headers?x=1");
    assert!(seen.get("x-hop").is_none(), "header named in Connection must not be forwarded: {seen}");
    assert!(seen.get("proxy-authorization").is_none(), "{seen}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_vanishes_loses_no_request_and_others_keep_serving() {
    let (apps, proxy) = stack(3).await;
    let http = Http::default();
    let addr = proxy.proxy_addr();
    let doomed = device_owned_by(&proxy, "app-2", 99);
    let survivor = device_owned_by(&proxy, "app-1", 99);
    assert_eq!(http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &doomed)]).await.body, "app-2");
    // Where app-2's device goes when app-2 is gone: the next backend on its ring walk.
    let standby = {
        let table = proxy.router().load();
        table
            .retry_target(Some(doomed.as_bytes()), None, table.owner(doomed.as_bytes()).expect("owner"))
            .expect("standby")
    };

    apps[1].shutdown();
    // From the death until the proxy notices, no request is lost: a connect
    // that is refused is retried on the standby (and marks app-2 down: no
    // [health] means one failure, as nginx's max_fails=1). A request that
    // catches a keep-alive connection the dying instance has not closed yet
    // may still be answered by it. Bounded: the first refused connect ends it.
    for attempt in 0.. {
        assert!(attempt < 50, "app-2 was never marked down");
        let reply = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &doomed)]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body == standby.id || reply.body == "app-2", "{}", reply.body);
        if proxy.router().load().is_up("app-2") == Some(false) {
            break;
        }
    }
    let reply = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &doomed)]).await;
    assert_eq!(reply.body, standby.id, "down: its devices go to the standby directly");

    let reply = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &survivor)]).await;
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "app-1"));

    // A WebSocket for the dead backend's device opens on the standby.
    let _ws = connect_device(addr, &doomed).await;
    assert_eq!(apps.iter().find(|a| a.name() == standby.id).map(|a| a.sockets_for(&doomed)), Some(1));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_backend_refusing_connections_gives_502_then_503() {
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    }; // dropped: nothing listens there now
    let mut text = config_for(&[], ALL_KEYS, "");
    text.push_str(&format!("\n[[backends]]\nid = \"gone\"\naddress = \"{closed}\"\n"));
    let proxy = start_proxy(&text).await;
    let http = Http::default();
    let url = format!("http://{}/whoami", proxy.proxy_addr());
    // No other backend to retry on: the refusal is the answer.
    let reply = http.get(&url, &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 502);
    assert!(reply.body.contains("gone") && reply.body.contains("refused"), "{}", reply.body);
    // And the backend is now down: every backend is down.
    let reply = http.get(&url, &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("all 1 backends are down"), "{}", reply.body);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_gives_504_and_the_proxy_keeps_serving() {
    let apps = start_apps(1).await;
    // A timeout counts as a failure; fall = 3 keeps one slow request from
    // taking the only backend down.
    let extra = "[upstream]\nresponse_timeout = \"300ms\"\n\n[health]\nfall = 3";
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, extra)).await;
    let http = Http::default();
    let addr = proxy.proxy_addr();
    let reply = http.get(&format!("http://{addr}/delay/5000"), &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.body);
    assert!(reply.body.contains("did not answer in time"), "{}", reply.body);
    let reply = http.get(&format!("http://{addr}/delay/10"), &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 200);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_refused_by_the_backend_passes_its_answer_back() {
    let (_apps, proxy) = stack(2).await;
    // The demo app upgrades only /devices/{id}/ws; elsewhere it answers 404.
    let url = format!("ws://{}/devices/d1/not-a-socket", proxy.proxy_addr());
    match within("ws connect", tokio_tungstenite::connect_async(&url)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404);
            assert!(response.headers().contains_key("x-instance"), "the backend's own answer");
        }
        other => panic!("expected the backend's 404, got {other:?}"),
    }
    // And the proxy still tunnels a proper upgrade afterwards.
    let _ws = connect_device(proxy.proxy_addr(), "d1").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_a_slow_backend() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    let apps = start_apps(1).await;
    let extra = "[upstream]\nresponse_timeout = \"300ms\"";
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, extra)).await;
    // A chunked body that trickles in over about a second: 5 pieces, 200 ms apart.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        for i in 0..5 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if tx.send(Ok(Frame::data(bytes::Bytes::from(format!("piece{i};"))))).await.is_err() {
                return;
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx));
    let client: hyper_util::client::legacy::Client<_, StreamBody<_>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    // This endpoint reads the whole body before it answers (421: no socket
    // for this device), so its answer can only come after the upload.
    let request = hyper::Request::post(format!("http://{}/devices/uploader/messages", proxy.proxy_addr()))
        .body(body)
        .expect("request");
    let response = within("slow upload", client.request(request)).await.expect("response");
    let status = response.status();
    let answer = within("answer", response.into_body().collect()).await.expect("body").to_bytes();
    assert_eq!(status, 421, "the response clock starts when the upload is done: {answer:?}");
    assert!(String::from_utf8_lossy(&answer).contains("not connected"), "{answer:?}");
    proxy.shutdown().await;
}

/// An mpsc receiver as a `Stream`, without pulling in tokio-stream.
fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Sends raw bytes and reads the whole answer (the proxy closes after a 400).
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = within("connect", tokio::net::TcpStream::connect(addr)).await.expect("connect");
    within("write", stream.write_all(request.as_bytes())).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = within("read", stream.read(&mut buf)).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        // One response is enough (the connection may stay open).
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_settled_before_anything_reads_it() {
    let (_apps, proxy) = stack(2).await;
    let addr = proxy.proxy_addr();
    let two = raw(addr, "GET /headers HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nx-device-id: d1\r\n\r\n").await;
    assert!(two.starts_with("HTTP/1.1 400"), "two Host lines: {two}");
    assert!(two.contains("more than one Host"), "{two}");
    let none = raw(addr, "GET /headers HTTP/1.1\r\nx-device-id: d1\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 400"), "HTTP/1.1 without Host: {none}");
    // Absolute-form: the target's authority is the Host the backend sees.
    let absolute =
        raw(addr, "GET http://t.example:81/headers HTTP/1.1\r\nHost: h.example\r\nx-device-id: d1\r\n\r\n").await;
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute}");
    assert!(absolute.contains("\"host\":\"t.example:81\""), "{absolute}");
    assert!(absolute.contains("\"x-forwarded-host\":\"t.example:81\""), "{absolute}");
    // HTTP/1.0 may leave Host out.
    let old = raw(addr, "GET /whoami HTTP/1.0\r\nx-device-id: d1\r\n\r\n").await;
    assert!(old.starts_with("HTTP/1.0 200") || old.starts_with("HTTP/1.1 200"), "{old}");
    proxy.shutdown().await;
}

/// A backend of raw bytes: answers every request on a connection with `response`.
async fn raw_backend(response: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        seen.clear();
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_with_a_content_length_arrives_whole() {
    let backend = raw_backend(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routing]\n{ALL_KEYS}\n\n\
         [[backends]]\nid = \"raw\"\naddress = \"{backend}\"\n"
    );
    let proxy = start_proxy(&config).await;
    let reply = Http::default().get(&format!("http://{}/x", proxy.proxy_addr()), &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "hello", "RFC 9112 §6.3: Transfer-Encoding wins over Content-Length");
    proxy.shutdown().await;
}

/// A backend of raw bytes that records what it receives: answers
/// `200 ok` once it has seen `until`, and sends the bytes seen on `seen`.
async fn recording_backend(until: &'static [u8]) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(until.len()).any(|w| w == until) {
                        let _ = tx.send(std::mem::take(&mut seen)).await;
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn one_backend_config(address: std::net::SocketAddr) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routing]\n{ALL_KEYS}\n\n\
         [[backends]]\nid = \"raw\"\naddress = \"{address}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_chunked_body_reaches_the_backend_with_it() {
    let (backend, mut seen) = recording_backend(b"0\r\n\r\n").await;
    let proxy = start_proxy(&one_backend_config(backend)).await;
    let request = "GET /x HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n";
    let answer = raw(proxy.proxy_addr(), request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = within("the backend's copy", seen.recv()).await.expect("a request");
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(got.starts_with("get /x http/1.1\r\n"), "{got}");
    assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "the body went upstream: {got}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_one_chunked_are_refused() {
    // Every request here ends with the last chunk.
    let (backend, mut seen) = recording_backend(b"0\r\n\r\n").await;
    let proxy = start_proxy(&one_backend_config(backend)).await;
    let addr = proxy.proxy_addr();
    let head = "POST /x HTTP/1.1\r\nHost: h\r\nx-device-id: d1\r\n";
    let body = "\r\n5\r\nhello\r\n0\r\n\r\n";
    for (te, status) in [
        ("Transfer-Encoding: identity, chunked\r\n", "501"),
        ("Transfer-Encoding: chunked, chunked\r\n", "400"),
        ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "400"),
    ] {
        let answer = raw(addr, &format!("{head}{te}{body}")).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{te:?}: {answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{te:?}: {answer}");
    }
    // Nothing reached the backend; a plain chunked upload still does.
    let answer = raw(addr, &format!("{head}Transfer-Encoding: chunked\r\n{body}")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let first = within("the backend's copy", seen.recv()).await.expect("a request");
    assert!(first.starts_with(b"POST /x HTTP/1.1\r\n"), "{}", String::from_utf8_lossy(&first));
    assert!(seen.try_recv().is_err(), "a refused request reached the backend");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_to_a_plain_request_is_a_502_and_folded_headers_are_unfolded() {
    let switching =
        raw_backend("HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: upgrade\r\n\r\n").await;
    let folded = raw_backend("HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 2\r\n\r\nok").await;
    for (backend, status, body) in [(switching, 502, "switched protocols"), (folded, 200, "ok")] {
        let proxy = start_proxy(&one_backend_config(backend)).await;
        let url = format!("http://{}/x", proxy.proxy_addr());
        let reply = Http::default().get(&url, &[("x-device-id", "d1")]).await;
        assert_eq!(reply.status, status, "{}", reply.body);
        assert!(reply.body.contains(body), "{}", reply.body);
        if status == 200 {
            assert_eq!(reply.headers.get("x-folded").and_then(|v| v.to_str().ok()), Some("a b"), "RFC 9112 §5.2");
        }
        // Neither is the backend's connection failing: it stays up.
        let again = Http::default().get(&url, &[("x-device-id", "d2")]).await;
        assert_eq!(again.status, status);
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_get_with_data_of_unknown_length_reaches_the_backend_chunked() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let (backend, mut seen) = recording_backend(b"0\r\n\r\n").await;
    let config = one_backend_config(backend).replacen("[server]\n", "[server]\nh2c = true\n", 1);
    let proxy = start_proxy(&config).await;
    let tcp = within("connect", tokio::net::TcpStream::connect(proxy.proxy_addr())).await.expect("connect");
    let (mut sender, connection) = within(
        "h2 handshake",
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    // A stream of frames: no length known up front, so no content-length.
    let frames = futures_util::stream::iter([
        Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from_static(b"hel"))),
        Ok(Frame::data(bytes::Bytes::from_static(b"lo"))),
    ]);
    let request = hyper::Request::get(format!("http://h.test:{}/x", proxy.proxy_addr().port()))
        .header("x-device-id", "d1")
        .body(StreamBody::new(frames))
        .expect("request");
    let response = within("h2 GET", sender.send_request(request)).await.expect("response");
    assert_eq!(response.status(), 200);
    let body = within("body", response.into_body().collect()).await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ok");
    let got = within("the backend's copy", seen.recv()).await.expect("a request");
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(got.starts_with("get /x http/1.1\r\n"), "{got}");
    assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
    // However the DATA frames were cut into chunks, they carry "hello".
    let (_, chunked) = got.split_once("\r\n\r\n").expect("a head");
    let (mut rest, mut body) = (chunked, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size, 16).expect("chunk size");
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    assert_eq!(body, "hello", "the DATA went upstream: {got}");
    proxy.shutdown().await;
}

/// A backend that answers the first request on each connection keep-alive
/// and closes the connection, unanswered, when a second request (head and
/// body) arrives on it: a backend closing an idle connection just as the
/// proxy reuses it. Counts the connections it accepted.
async fn one_answer_per_connection_backend() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Reads until `pending` holds a whole request (head and
    /// Content-Length body); its length, or `None` if the connection ended.
    async fn whole_request(stream: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<usize> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(head) = pending.windows(4).position(|w| w == b"\r\n\r\n").map(|end| end + 4) {
                let text = String::from_utf8_lossy(&pending[..head]).to_ascii_lowercase();
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
                    .unwrap_or(0);
                if pending.len() >= head + length {
                    return Some(head + length);
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let Some(end) = whole_request(&mut stream, &mut pending).await else { return };
                pending.drain(..end);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                let _ = whole_request(&mut stream, &mut pending).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_on_a_connection_the_backend_just_closed_is_sent_again_on_a_new_one() {
    use std::sync::atomic::Ordering;
    let (backend, accepted) = one_answer_per_connection_backend().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n[routing]\n{ALL_KEYS}\n\n\
         [[backends]]\nid = \"raw\"\naddress = \"{backend}\"\n"
    );
    let proxy = start_proxy(&config).await;
    let url = format!("http://{}/x", proxy.proxy_addr());
    let http = Http::default();
    let first = http.get(&url, &[("x-device-id", "d1")]).await;
    assert_eq!((first.status, first.body.as_str()), (StatusCode::OK, "ok"));
    // The proxy reuses the kept-alive connection, which the backend closes
    // under the request: a GET is sent again, on a new connection.
    let second = http.get(&url, &[("x-device-id", "d1")]).await;
    assert_eq!((second.status, second.body.as_str()), (StatusCode::OK, "ok"), "{}", second.body);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // A POST is not: the backend may have acted on it (RFC 9110 §9.2.2).
    let post = http.send(hyper::Method::POST, &url, &[("x-device-id", "d1")], "msg").await;
    assert_eq!(post.status, StatusCode::BAD_GATEWAY, "{}", post.body);
    assert!(post.body.contains("closed the connection"), "{}", post.body);
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "no resend of a POST");
    // The backend is not blamed: the next GET is served.
    let third = http.get(&url, &[("x-device-id", "d1")]).await;
    assert_eq!(third.status, StatusCode::OK, "{}", third.body);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    let m = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body);
    assert_eq!(metric(&m, "sticky_proxy_retries_total", &[("backend", "raw")]), Some(1.0), "the GET's resend");
    let reset = [("backend", "raw"), ("kind", "reset")];
    assert_eq!(metric(&m, "sticky_proxy_upstream_errors_total", &reset), Some(1.0), "the POST's 502 only");
    assert_eq!(metric(&m, "sticky_proxy_backend_up", &[("backend", "raw")]), Some(1.0));
    proxy.shutdown().await;
}
