//! Tests of the demo app alone (no proxy): real sockets on 127.0.0.1, every
//! wait bounded by a timeout.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sticky_proxy::tools::demo::DemoInstance;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

const T: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

async fn start(name: &str) -> DemoInstance {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    DemoInstance::spawn(name, listener).expect("spawn")
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
    fn instance(&self) -> &str {
        self.headers.get("x-instance").and_then(|v| v.to_str().ok()).expect("X-Instance header")
    }
}

async fn send(req: Request<Full<Bytes>>) -> Reply {
    within("http request", async {
        let resp = client().request(req).await.expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply { status: parts.status, headers: parts.headers, body }
    })
    .await
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let req = Request::get(format!("http://{addr}{path}")).body(Full::default()).expect("request");
    send(req).await
}

async fn post(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> Reply {
    let req = Request::post(format!("http://{addr}{path}")).body(Full::new(body.into())).expect("request");
    send(req).await
}

async fn ws_connect(addr: SocketAddr, id: &str) -> Ws {
    let (ws, resp) =
        within("ws connect", connect_async(format!("ws://{addr}/devices/{id}/ws"))).await.expect("ws handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Next text/binary message (skipping control frames), as bytes.
async fn ws_recv(ws: &mut Ws) -> Message {
    within("ws receive", async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                Some(Ok(_)) => continue,
                other => panic!("expected a data message, got {other:?}"),
            }
        }
    })
    .await
}

/// Echo round-trip: proves the server's socket task runs (and so is registered).
async fn ws_ping(ws: &mut Ws) {
    ws.send(Message::text("ping")).await.expect("ws send");
    assert_eq!(ws_recv(ws).await, Message::text("ping"));
}

/// Wait until the stream ends (EOF, error or close frame).
async fn ws_expect_end(ws: &mut Ws) {
    within("ws stream end", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => continue,
                Some(Ok(m)) => panic!("unexpected message {m:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn whoami_health_and_instance_header() {
    let app = start("app-1").await;
    let r = get(app.addr(), "/whoami").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "app-1");
    assert_eq!(r.instance(), "app-1");
    assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/plain"));

    let r = get(app.addr(), "/health").await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, "ok"));

    let r = get(app.addr(), "/nope/x").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text().contains("GET /nope/x"), "{}", r.text());
    assert_eq!(r.instance(), "app-1");

    let r = post(app.addr(), "/whoami", "x").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text().contains("POST /whoami"), "{}", r.text());
}

#[tokio::test]
async fn two_instances_answer_with_their_own_names() {
    let a = start("app-1").await;
    let b = DemoInstance::bind("app-2", "127.0.0.1:0".parse().unwrap()).await.expect("bind");
    assert_eq!(b.name(), "app-2");
    assert_eq!(get(a.addr(), "/whoami").await.text(), "app-1");
    let r = get(b.addr(), "/whoami").await;
    assert_eq!((r.text(), r.instance()), ("app-2", "app-2"));
}

#[tokio::test]
async fn invalid_name_is_an_error_not_a_panic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = DemoInstance::spawn("bad\nname", listener).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn ws_echoes_text_and_binary() {
    let app = start("app-1").await;
    let mut ws = ws_connect(app.addr(), "dev-1").await;
    ws_ping(&mut ws).await;
    assert_eq!(app.connected_devices(), 1);
    assert_eq!(app.sockets_for("dev-1"), 1);
    ws.send(Message::binary(vec![0u8, 159, 255])).await.unwrap();
    assert_eq!(ws_recv(&mut ws).await, Message::binary(vec![0u8, 159, 255]));
}

#[tokio::test]
async fn post_delivers_to_the_socket() {
    let app = start("app-1").await;
    let mut ws = ws_connect(app.addr(), "dev-42").await;
    ws_ping(&mut ws).await;

    let r = post(app.addr(), "/devices/dev-42/messages", "hello device").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.instance(), "app-1");
    assert_eq!(r.json(), serde_json::json!({"delivered": true, "instance": "app-1", "device": "dev-42", "sockets": 1}));
    assert_eq!(ws_recv(&mut ws).await, Message::text("hello device"));

    // Non-UTF-8 bodies arrive as binary frames.
    let r = post(app.addr(), "/devices/dev-42/messages", vec![0xffu8, 0x00]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(ws_recv(&mut ws).await, Message::binary(vec![0xffu8, 0x00]));
}

#[tokio::test]
async fn post_for_unconnected_device_is_421() {
    let app = start("app-1").await;
    let r = post(app.addr(), "/devices/dev-42/messages", "hi").await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(r.text(), "device dev-42 is not connected to instance app-1");
    assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/plain"));
}

#[tokio::test]
async fn oversized_message_is_413() {
    let app = start("app-1").await;
    let mut ws = ws_connect(app.addr(), "dev-1").await;
    ws_ping(&mut ws).await;
    let r = post(app.addr(), "/devices/dev-1/messages", vec![b'a'; (1 << 20) + 1]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Exactly the limit is fine.
    let r = post(app.addr(), "/devices/dev-1/messages", vec![b'a'; 1 << 20]).await;
    assert_eq!(r.status, StatusCode::OK);
    match ws_recv(&mut ws).await {
        Message::Text(t) => assert_eq!(t.len(), 1 << 20),
        m => panic!("unexpected {m:?}"),
    }
}

#[tokio::test]
async fn two_sockets_for_one_device_both_receive() {
    let app = start("app-1").await;
    let mut a = ws_connect(app.addr(), "dev-7").await;
    let mut b = ws_connect(app.addr(), "dev-7").await;
    ws_ping(&mut a).await;
    ws_ping(&mut b).await;
    assert_eq!(app.sockets_for("dev-7"), 2);

    let r = post(app.addr(), "/devices/dev-7/messages", "both").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["sockets"], 2);
    assert_eq!(ws_recv(&mut a).await, Message::text("both"));
    assert_eq!(ws_recv(&mut b).await, Message::text("both"));
}

#[tokio::test]
async fn closing_the_socket_unregisters_the_device() {
    let app = start("app-1").await;
    let mut ws = ws_connect(app.addr(), "dev-9").await;
    ws_ping(&mut ws).await;
    assert_eq!(app.connected_devices(), 1);

    within("ws close", ws.close(None)).await.expect("close");
    // The server unregisters before answering the close, so once the stream
    // has ended the device is gone.
    ws_expect_end(&mut ws).await;
    assert_eq!(app.connected_devices(), 0);
    let r = post(app.addr(), "/devices/dev-9/messages", "anyone?").await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(r.text(), "device dev-9 is not connected to instance app-1");
}

#[tokio::test]
async fn dropping_the_tcp_connection_unregisters_the_device() {
    let app = start("app-1").await;
    let mut ws = ws_connect(app.addr(), "dev-3").await;
    ws_ping(&mut ws).await;
    drop(ws);
    within("unregister after EOF", async {
        while app.connected_devices() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn percent_encoded_device_id() {
    let app = start("app-1").await;
    let mut ws = ws_connect(app.addr(), "dev%2042").await;
    ws_ping(&mut ws).await;
    assert_eq!(app.sockets_for("dev 42"), 1);

    let r = post(app.addr(), "/devices/dev%2042/messages", "spaced").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["device"], "dev 42");
    assert_eq!(ws_recv(&mut ws).await, Message::text("spaced"));

    let r = post(app.addr(), "/devices/caf%C3%A9%2Fx/messages", "x").await;
    assert_eq!(r.text(), "device café/x is not connected to instance app-1");

    for bad in ["dev%zz", "dev%2", "dev%ff", "%"] {
        let r = post(app.addr(), &format!("/devices/{bad}/messages"), "x").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        let r = get(app.addr(), &format!("/devices/{bad}/ws")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn plain_get_on_ws_path_is_426() {
    let app = start("app-1").await;
    let r = get(app.addr(), "/devices/dev-1/ws").await;
    assert_eq!(r.status, StatusCode::UPGRADE_REQUIRED);
    assert!(!r.body.is_empty());
    assert_eq!(r.instance(), "app-1");
}

#[tokio::test]
async fn bad_ws_handshakes_are_400() {
    let app = start("app-1").await;
    let cases: [&[(&str, &str)]; 4] = [
        // no key
        &[("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-version", "13")],
        // wrong version
        &[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "8"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        // no upgrade token in Connection
        &[
            ("upgrade", "websocket"),
            ("connection", "keep-alive"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        // not websocket
        &[
            ("upgrade", "h2c"),
            ("connection", "Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    ];
    for headers in cases {
        let mut req = Request::get(format!("http://{}/devices/d/ws", app.addr()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = send(req.body(Full::default()).unwrap()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{headers:?}");
        assert!(!r.body.is_empty());
    }
    assert_eq!(app.connected_devices(), 0);
}

#[tokio::test]
async fn echo_returns_identical_bytes() {
    let app = start("app-1").await;
    let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let req = Request::post(format!("http://{}/echo", app.addr()))
        .header("content-type", "application/x-test")
        .body(Full::new(Bytes::from(data.clone())))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/x-test");
    assert_eq!(r.body.len(), data.len());
    assert!(r.body == data, "echoed bytes differ");
}

/// Request body fed from a channel, to show /echo streams chunk by chunk.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

async fn next_chunk(body: &mut hyper::body::Incoming) -> Option<Bytes> {
    within("echo chunk", async {
        loop {
            match body.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) if !d.is_empty() => return Some(d),
                    _ => continue,
                },
                Some(Err(e)) => panic!("body error {e}"),
                None => return None,
            }
        }
    })
    .await
}

#[tokio::test]
async fn echo_streams_without_buffering_the_whole_body() {
    let app = start("app-1").await;
    let stream = within("connect", TcpStream::connect(app.addr())).await.unwrap();
    let (mut sender, conn) =
        within("handshake", hyper::client::conn::http1::handshake(TokioIo::new(stream))).await.unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(1);
    let req = Request::post(format!("http://{}/echo", app.addr())).body(ChannelBody(rx)).unwrap();
    tx.send(Bytes::from_static(b"first ")).await.unwrap();
    let resp = within("response head", sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The first chunk comes back while the request body is still open.
    assert_eq!(next_chunk(&mut body).await.as_deref(), Some(&b"first "[..]));
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(next_chunk(&mut body).await.as_deref(), Some(&b"second"[..]));
    drop(tx);
    assert_eq!(next_chunk(&mut body).await, None);
}

#[tokio::test]
async fn bytes_returns_n_bytes() {
    let app = start("app-1").await;
    let n = 3 * 64 * 1024 + 17;
    let r = get(app.addr(), &format!("/bytes/{n}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-length"], n.to_string().as_str());
    assert_eq!(r.body.len(), n);
    assert!(r.body.iter().enumerate().all(|(i, &b)| b == i as u8));

    let r = get(app.addr(), "/bytes/0").await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0));

    for bad in ["abc", "-1", "10737418241", "99999999999999999999999"] {
        let r = get(app.addr(), &format!("/bytes/{bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn delay_and_headers() {
    let app = start("app-1").await;
    let r = get(app.addr(), "/delay/20").await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, "slept 20ms"));
    assert_eq!(get(app.addr(), "/delay/soon").await.status, StatusCode::BAD_REQUEST);

    let req = Request::get(format!("http://{}/headers?x=1", app.addr()))
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(Full::default())
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    assert_eq!(j["x-forwarded-for"], "10.0.0.1");
    assert_eq!(j["x-multi"], "a, b");
    assert_eq!(j["host"], app.addr().to_string());
    assert_eq!(j["_uri"], "/headers?x=1");
}

#[tokio::test]
async fn garbage_on_one_connection_does_not_affect_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = start("app-1").await;
    let mut ws = ws_connect(app.addr(), "dev-1").await;
    ws_ping(&mut ws).await;
    let mut raw = TcpStream::connect(app.addr()).await.unwrap();
    raw.write_all(b"\x00\x01 not http at all\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    within("server closes garbage connection", raw.read_to_end(&mut sink)).await.ok();
    assert_eq!(get(app.addr(), "/whoami").await.text(), "app-1");
    ws_ping(&mut ws).await;
}

#[tokio::test]
async fn shutdown_refuses_connects_and_closes_everything() {
    let app = start("app-1").await;
    let addr = app.addr();
    let mut ws = ws_connect(addr, "dev-1").await;
    ws_ping(&mut ws).await;

    // An idle keep-alive HTTP connection.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}/whoami")).body(Full::<Bytes>::default()).unwrap();
    let resp = within("whoami", sender.send_request(req)).await.unwrap();
    within("whoami body", resp.into_body().collect()).await.unwrap();

    app.shutdown();
    assert_eq!(app.connected_devices(), 0);
    assert!(TcpStream::connect(addr).await.is_err(), "connect after shutdown");
    ws_expect_end(&mut ws).await;
    // Ok or a reset error are both fine: what matters is that it ends.
    let _ = within("keep-alive connection closed", conn).await;

    app.shutdown(); // idempotent
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn drop_acts_like_shutdown() {
    let app = start("app-1").await;
    let addr = app.addr();
    let mut ws = ws_connect(addr, "dev-1").await;
    ws_ping(&mut ws).await;
    drop(app);
    assert!(TcpStream::connect(addr).await.is_err());
    ws_expect_end(&mut ws).await;
}
