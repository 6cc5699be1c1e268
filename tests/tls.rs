//! TLS termination, HTTP/2 (ALPN and h2c), WebSockets over HTTP/2 and TLS
//! backends: a real proxy, real demo backends, real TLS and HTTP/2 clients,
//! and throwaway certificates from a test CA made per test.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sticky_proxy::app::RunningProxy;
use sticky_proxy::config::Config;
use sticky_proxy::tools::demo::DemoInstance;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A test certificate authority.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Pair {
    fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).expect("test cert PEM")
    }
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        Pki { ca: CertifiedIssuer::self_signed(params, key).expect("CA cert") }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses).
    fn leaf(&self, names: &[&str]) -> Pair {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().expect("leaf key");
        let cert = CertificateParams::new(names).expect("leaf params").signed_by(&key, &self.ca).expect("leaf cert");
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A client trusting this CA and offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("CA as root");
        let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

/// A directory of PEM files next to a config file, rewritten by tests.
struct Files {
    config: ConfigFile,
}

impl Files {
    fn new() -> Files {
        Files { config: ConfigFile::new("tls.toml", "") }
    }

    fn dir(&self) -> PathBuf {
        self.config.path.parent().expect("config dir").to_path_buf()
    }

    /// Writes `content` to `name` beside the config (atomically, by rename).
    fn put(&self, name: &str, content: &str) {
        let path = self.dir().join(name);
        let tmp = self.dir().join(format!("{name}.tmp"));
        std::fs::write(&tmp, content).expect("write PEM");
        std::fs::rename(&tmp, &path).expect("rename PEM");
    }

    fn put_pair(&self, stem: &str, pair: &Pair) {
        self.put(&format!("{stem}.pem"), &pair.cert);
        self.put(&format!("{stem}.key"), &pair.key);
    }
}

/// `[server]` with a TLS listener serving `tls.pem`/`tls.key` (plus
/// `extra_certs` stems), `apps` as backends, routing by every key source.
fn tls_config(apps: &[DemoInstance], extra_certs: &[&str], server_extra: &str, extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n{server_extra}\n\n\
         [server.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"tls.pem\"\nkey = \"tls.key\"\nhandshake_timeout = \"500ms\"\n"
    );
    for stem in extra_certs {
        text.push_str(&format!("\n[[server.tls.certificates]]\ncert = \"{stem}.pem\"\nkey = \"{stem}.key\"\n"));
    }
    text.push_str(&format!("\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[routing]\n{ALL_KEYS}\n\n{extra}\n"));
    for app in apps {
        text.push_str(&format!("\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n", app.name(), app.addr()));
    }
    text
}

async fn tls_connect(connector: &TlsConnector, addr: SocketAddr, name: &str) -> TlsStream<TcpStream> {
    let tcp = within("TCP connect", TcpStream::connect(addr)).await.expect("connect to the TLS listener");
    let name = ServerName::try_from(name.to_string()).expect("server name");
    within("TLS handshake", connector.connect(name, tcp)).await.expect("TLS handshake")
}

/// The certificate the server presented on `tls`.
fn presented(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("a server certificate").clone().into_owned()
}

type H1 = http1::SendRequest<Empty<Bytes>>;
type H2 = http2::SendRequest<Full<Bytes>>;

async fn h1_over(tls: TlsStream<TcpStream>) -> H1 {
    let (sender, connection) = within("h1 handshake", http1::handshake(TokioIo::new(tls))).await.expect("h1 handshake");
    tokio::spawn(connection.with_upgrades());
    sender
}

async fn h2_over<T>(io: T) -> H2
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        within("h2 handshake", http2::handshake(TokioExecutor::new(), TokioIo::new(io))).await.expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// A GET over HTTP/1.1 on an open connection: (status, x-instance, body).
async fn h1_get(sender: &mut H1, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String, String) {
    within("h1 ready", sender.ready()).await.expect("connection usable");
    let mut req = Request::get(path).header("host", "a.test");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let response = within(path, sender.send_request(req.body(Empty::new()).expect("request"))).await.expect(path);
    read_reply(response).await
}

/// A request over HTTP/2: (status, x-instance, body).
async fn h2_send(
    sender: &H2,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String, String) {
    let mut req = Request::builder().method(method).uri(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let request = req.body(Full::new(Bytes::from(body.to_string()))).expect("request");
    let mut sender = sender.clone();
    let response = within(url, sender.send_request(request)).await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    read_reply(response).await
}

async fn read_reply(response: hyper::Response<hyper::body::Incoming>) -> (StatusCode, String, String) {
    let status = response.status();
    let instance = response.headers().get("x-instance").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = within("body", response.into_body().collect()).await.expect("body").to_bytes();
    (status, instance, String::from_utf8_lossy(&body).into_owned())
}

fn owner(proxy: &RunningProxy, device: &str) -> String {
    proxy.router().load().owner(device.as_bytes()).expect("owner").id.clone()
}

/// Starts a proxy on the config in `files` with a TLS listener.
async fn start(files: &Files) -> (RunningProxy, SocketAddr) {
    let proxy = start_proxy_from(&files.config).await;
    let tls = proxy.tls_addr().expect("a TLS listener");
    (proxy, tls)
}

/// `apps` demo apps behind a proxy with one certificate, for `a.test`.
async fn one_certificate_stack(apps: usize) -> (Pki, Vec<DemoInstance>, Files, RunningProxy, SocketAddr) {
    let pki = Pki::new();
    let apps = start_apps(apps).await;
    let files = Files::new();
    files.put_pair("tls", &pki.leaf(&["a.test"]));
    files.config.write(&tls_config(&apps, &[], "", ""));
    let (proxy, tls_addr) = start(&files).await;
    (pki, apps, files, proxy, tls_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_requests_are_routed_by_device_id_and_marked_https() {
    let (pki, _apps, _files, proxy, tls_addr) = one_certificate_stack(3).await;

    let tls = tls_connect(&pki.client(&[b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = h1_over(tls).await;
    let mut ids = Ids::new(6);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        let id = ids.next_id();
        let (status, instance, body) = h1_get(&mut h1, "/whoami", &[("x-device-id", &id)]).await;
        assert_eq!(status, 200);
        assert_eq!(body, owner(&proxy, &id), "device {id} reaches its owner over HTTPS");
        seen.insert(instance);
    }
    assert_eq!(seen.len(), 3, "devices spread over all three backends");

    let (_, _, headers) = h1_get(&mut h1, "/headers?device_id=d1", &[]).await;
    let headers: serde_json::Value = serde_json::from_str(&headers).expect("json");
    assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
    assert_eq!(headers["host"], "a.test", "{headers}");

    // The plain listener serves side by side, and says http.
    let reply = Http::default().get(&format!("http://{}/headers?device_id=d1", proxy.proxy_addr()), &[]).await;
    let headers: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_no_match_gets_the_first() {
    let pki = Pki::new();
    let apps = start_apps(1).await;
    let files = Files::new();
    let (a, b, wild) = (pki.leaf(&["a.test", "127.0.0.1"]), pki.leaf(&["b.test"]), pki.leaf(&["*.wild.test"]));
    files.put_pair("tls", &a);
    files.put_pair("b", &b);
    files.put_pair("wild", &wild);
    files.config.write(&tls_config(&apps, &["b", "wild"], "", ""));
    let (proxy, tls_addr) = start(&files).await;
    let client = pki.client(&[b"http/1.1"]);

    for (name, expected) in [("a.test", &a), ("b.test", &b), ("B.Test", &b), ("x.wild.test", &wild)] {
        let tls = tls_connect(&client, tls_addr, name).await;
        assert_eq!(presented(&tls), expected.der(), "SNI {name}");
        let (status, _, _) = h1_get(&mut h1_over(tls).await, "/whoami?device_id=d1", &[]).await;
        assert_eq!(status, 200, "SNI {name}");
    }
    // An IP address sends no SNI: the first certificate (which names the IP).
    let tls = tls_connect(&client, tls_addr, "127.0.0.1").await;
    assert_eq!(presented(&tls), a.der(), "no SNI");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_by_alpn_routes_every_stream_and_a_slow_stream_blocks_none() {
    let (pki, _apps, _files, proxy, tls_addr) = one_certificate_stack(3).await;

    let tls = tls_connect(&pki.client(&[b"h2", b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN picks h2");
    let h2 = h2_over(tls).await;
    let base = format!("https://a.test:{}", tls_addr.port());

    // A slow stream first; 40 quick ones on the same connection, concurrently,
    // are all answered (each by its device's owner) while it still waits.
    let slow = {
        let (h2, url) = (h2.clone(), format!("{base}/delay/4000?device_id=slow"));
        tokio::spawn(async move { h2_send(&h2, Method::GET, &url, &[], "").await })
    };
    let mut ids = Ids::new(2);
    let quick: Vec<_> = (0..40)
        .map(|_| {
            let (h2, id, url) = (h2.clone(), ids.next_id(), format!("{base}/whoami"));
            tokio::spawn(async move {
                let reply = h2_send(&h2, Method::GET, &url, &[("x-device-id", &id)], "").await;
                (id, reply)
            })
        })
        .collect();
    let mut instances = std::collections::HashSet::new();
    for task in quick {
        let (id, (status, instance, body)) = within("quick stream", task).await.expect("task");
        assert_eq!((status, body), (StatusCode::OK, owner(&proxy, &id)), "device {id} over HTTP/2");
        instances.insert(instance);
    }
    assert_eq!(instances.len(), 3, "one connection, streams to every backend");
    assert!(!slow.is_finished(), "the quick streams were answered while the slow one still waited");
    let (status, _, body) = within("slow stream", slow).await.expect("task");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slept 4000ms"));

    // No Host from an HTTP/2 client: the backend gets the :authority; cookie
    // crumbs become one line, and the device ID in them is found.
    let (status, instance, body) = h2_send(
        &h2,
        Method::GET,
        &format!("{base}/headers"),
        &[("cookie", "theme=dark"), ("cookie", "device_id=crumb-7")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(instance, owner(&proxy, "crumb-7"));
    let headers: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(headers["host"], format!("a.test:{}", tls_addr.port()), "{headers}");
    assert_eq!(headers["cookie"], "theme=dark; device_id=crumb-7", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
    assert_eq!(headers["_uri"], "/headers", "origin form to the HTTP/1.1 backend: {headers}");

    // A body both ways over HTTP/2.
    let (status, _, body) =
        h2_send(&h2, Method::POST, &format!("{base}/echo?device_id=d1"), &[], "over h2 and back").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "over h2 and back"));
    proxy.shutdown().await;
}

/// Opens a WebSocket over HTTP/2 (RFC 8441) on `h2` and checks an echo.
async fn h2_websocket(h2: &H2, url: &str) -> WebSocketStream<TokioIo<hyper::upgrade::Upgraded>> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(url)
        .header("sec-websocket-version", "13")
        .body(Full::new(Bytes::new()))
        .expect("request");
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = within("extended CONNECT", h2.clone().send_request(req)).await.expect("extended CONNECT");
    assert_eq!(response.status(), StatusCode::OK, "the proxy accepts the WebSocket");
    assert!(response.headers().get("sec-websocket-accept").is_none(), "no HTTP/1.1 handshake headers");
    let upgraded = within("upgrade", hyper::upgrade::on(&mut response)).await.expect("upgraded stream");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    within("send", ws.send(Message::text("ping over h2"))).await.expect("send");
    match within("echo", ws.next()).await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "ping over h2"),
        other => panic!("expected the echo, got {other:?}"),
    }
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_over_http2_reach_the_devices_owner_on_http1() {
    let (pki, apps, _files, proxy, tls_addr) = one_certificate_stack(3).await;
    let tls = tls_connect(&pki.client(&[b"h2"]), tls_addr, "a.test").await;
    let h2 = h2_over(tls).await;
    let base = format!("https://a.test:{}", tls_addr.port());

    // Three sockets on one connection, each held by its device's owner.
    let devices = ["ws-dev-1", "ws-dev-2", "ws-dev-3"];
    let mut sockets = Vec::new();
    for device in devices {
        sockets.push(h2_websocket(&h2, &format!("{base}/devices/{device}/ws")).await);
        let held_by = apps.iter().find(|a| a.sockets_for(device) == 1).map(|a| a.name().to_string());
        assert_eq!(held_by, Some(owner(&proxy, device)), "{device}'s socket is on its owner");
    }
    // A message posted (over the same HTTP/2 connection) reaches the device's socket.
    for (device, ws) in devices.iter().zip(&mut sockets) {
        let (status, _, body) =
            h2_send(&h2, Method::POST, &format!("{base}/devices/{device}/messages"), &[], "hello device").await;
        assert_eq!(status, 200, "{body}");
        match within("delivery", ws.next()).await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "hello device"),
            other => panic!("expected the message, got {other:?}"),
        }
    }
    // Closing one socket (the backend answers the close) leaves the others
    // and the connection working.
    let mut first = sockets.remove(0);
    within("close", first.close(None)).await.expect("close");
    loop {
        match within("close answered", first.next()).await {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("closing: {e}"),
        }
    }
    within("send", sockets[0].send(Message::text("still here"))).await.expect("send");
    match within("echo", sockets[0].next()).await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "still here"),
        other => panic!("expected the echo, got {other:?}"),
    }
    let (_, _, body) = h2_send(&h2, Method::GET, &format!("{base}/whoami?device_id=x"), &[], "").await;
    assert_eq!(body, owner(&proxy, "x"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_http1_share_the_plain_listener() {
    let apps = start_apps(2).await;
    let mut text = config_for(&apps, ALL_KEYS, "");
    text = text.replacen("[server]\n", "[server]\nh2c = true\n", 1);
    let proxy = start_proxy(&text).await;
    let addr = proxy.proxy_addr();

    let tcp = within("connect", TcpStream::connect(addr)).await.expect("connect");
    let h2 = h2_over(tcp).await;
    let base = format!("http://proxy.test:{}", addr.port());
    let mut ids = Ids::new(3);
    for _ in 0..10 {
        let id = ids.next_id();
        let (status, _, body) = h2_send(&h2, Method::GET, &format!("{base}/whoami"), &[("x-device-id", &id)], "").await;
        assert_eq!((status, body), (StatusCode::OK, owner(&proxy, &id)));
    }
    let (_, _, body) = h2_send(&h2, Method::GET, &format!("{base}/headers?device_id=a"), &[], "").await;
    let headers: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    // WebSockets over h2c too.
    let _ws = h2_websocket(&h2, &format!("{base}/devices/h2c-dev/ws")).await;

    // HTTP/1.1 and its WebSocket upgrade on the same listener.
    let reply = Http::default().get(&format!("http://{addr}/whoami"), &[("x-device-id", "d9")]).await;
    assert_eq!(reply.body, owner(&proxy, "d9"));
    let _ws1 = connect_device(addr, "h1-dev").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_h2c_the_plain_listener_refuses_the_http2_preface() {
    let apps = start_apps(1).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, "")).await;
    let mut tcp = within("connect", TcpStream::connect(proxy.proxy_addr())).await.expect("connect");
    within("write", tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")).await.expect("write preface");
    let mut answer = Vec::new();
    within("answer", tcp.read_to_end(&mut answer)).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 "), "HTTP/1.1 only: {answer:?}");
    proxy.shutdown().await;
}

/// Waits for the reloader's next attempt (bounded), returning its error if any.
async fn next_reload(
    status: &mut tokio::sync::watch::Receiver<sticky_proxy::ops::reload::ReloadStatus>,
) -> Option<String> {
    within("a reload attempt", status.changed()).await.expect("reloader alive");
    status.borrow_and_update().last_error.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_reloaded_and_open_connections_keep_theirs() {
    let pki = Pki::new();
    let apps = start_apps(2).await;
    let files = Files::new();
    let (old, new) = (pki.leaf(&["a.test"]), pki.leaf(&["a.test"]));
    files.put_pair("tls", &old);
    files.config.write(&tls_config(&apps, &[], "", "[reload]\ninterval = \"50ms\""));
    let (proxy, tls_addr) = start(&files).await;
    let mut status = proxy.reloader().subscribe();

    let tls = tls_connect(&pki.client(&[b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(presented(&tls), old.der());
    let mut open = h1_over(tls).await;
    assert_eq!(h1_get(&mut open, "/whoami?device_id=d1", &[]).await.0, 200);

    // Only the PEM files change; the watcher notices and reloads.
    files.put_pair("tls", &new);
    assert_eq!(next_reload(&mut status).await, None, "the new pair loads");
    // A new client: one that resumes its earlier session keeps that session's certificate.
    let tls = tls_connect(&pki.client(&[b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(presented(&tls), new.der(), "new connections get the new certificate");

    // The connection opened before keeps its session and keeps working.
    let (status_code, _, body) = h1_get(&mut open, "/whoami?device_id=d1", &[]).await;
    assert_eq!((status_code, body), (StatusCode::OK, owner(&proxy, "d1")));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_on_reload_keeps_the_old_certificate_serving() {
    let pki = Pki::new();
    let apps = start_apps(1).await;
    let files = Files::new();
    let good = pki.leaf(&["a.test"]);
    files.put_pair("tls", &good);
    files.config.write(&tls_config(&apps, &[], "", "[reload]\nwatch = false"));
    let (proxy, tls_addr) = start(&files).await;
    let http = Http::default();
    let reload_url = format!("http://{}/reload", proxy.admin_addr());
    let reload = || http.send(Method::POST, &reload_url, &[], "");

    // The key of another certificate: a mismatched pair.
    let other = pki.leaf(&["a.test"]);
    files.put("tls.key", &other.key);
    let reply = reload().await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("tls.toml:"), "names the file: {}", reply.body);
    assert!(reply.body.contains("server.tls.key"), "names the field: {}", reply.body);
    assert!(reply.body.contains("does not belong"), "says why: {}", reply.body);
    let tls = tls_connect(&pki.client(&[b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(presented(&tls), good.der(), "the old certificate still serves");
    assert_eq!(h1_get(&mut h1_over(tls).await, "/whoami?device_id=d1", &[]).await.0, 200);

    // Not a key at all.
    files.put("tls.key", "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n");
    let reply = reload().await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("server.tls.key"), "{}", reply.body);
    let tls = tls_connect(&pki.client(&[b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(presented(&tls), good.der(), "the old certificate still serves");

    // Fixed: the next reload takes it.
    files.put_pair("tls", &other);
    assert_eq!(reload().await.status, 200);
    let tls = tls_connect(&pki.client(&[b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(presented(&tls), other.der());
    let metrics = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body);
    assert_eq!(metric(&metrics, "sticky_proxy_config_reloads_total", &[("result", "failure")]), Some(2.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_counted_by_reason_and_never_stall_the_listener() {
    let (pki, _apps, _files, proxy, tls_addr) = one_certificate_stack(1).await;

    // A client that connects and says nothing holds no one up...
    let mut silent = within("connect", TcpStream::connect(tls_addr)).await.expect("connect");
    let tls = tls_connect(&pki.client(&[b"http/1.1"]), tls_addr, "a.test").await;
    assert_eq!(h1_get(&mut h1_over(tls).await, "/whoami?device_id=d1", &[]).await.0, 200);
    // ...and is dropped after handshake_timeout (500 ms).
    let mut rest = Vec::new();
    let _ = within("timeout close", silent.read_to_end(&mut rest)).await;

    // Plain HTTP on the TLS port.
    let mut plain = within("connect", TcpStream::connect(tls_addr)).await.expect("connect");
    within("write", plain.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")).await.expect("write");
    let _ = within("close", plain.read_to_end(&mut rest)).await;

    // A client that doesn't trust the certificate (another CA) says so in an
    // alert; the server counts it, then closes.
    let stranger = Pki::new().client(&[b"http/1.1"]);
    let tcp = within("connect", TcpStream::connect(tls_addr)).await.expect("connect");
    let name = ServerName::try_from("a.test").expect("name");
    match within("handshake", stranger.connect(name, tcp).into_fallible()).await {
        Ok(_) => panic!("the client must refuse a certificate from an unknown CA"),
        Err((_, mut tcp)) => {
            let _ = within("close after the alert", tcp.read_to_end(&mut rest)).await;
        }
    }
    let http = Http::default();
    let counted = |reason: &'static str| {
        let (http, admin) = (http.clone(), proxy.admin_addr());
        async move {
            let text = http.get(&format!("http://{admin}/metrics"), &[]).await.body;
            metric(&parse_prometheus(&text), "sticky_proxy_tls_handshake_failures_total", &[("reason", reason)])
        }
    };
    assert_eq!(counted("timeout").await, Some(1.0));
    assert_eq!(counted("not_tls").await, Some(1.0));
    assert_eq!(counted("alert").await, Some(1.0));
    assert_eq!(counted("other").await, Some(0.0), "series exist before any failure");
    proxy.shutdown().await;
}

/// A TLS-terminating front for a demo app: what a backend speaking TLS
/// looks like to the proxy. Counts the handshakes it completed.
async fn tls_backend(app: &DemoInstance, pair: &Pair) -> (SocketAddr, tokio::sync::watch::Receiver<u64>) {
    let chain = vec![pair.der()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).expect("config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app_addr = app.addr();
    let (handshakes, count) = tokio::sync::watch::channel(0);
    let handshakes = Arc::new(handshakes);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handshakes) = (acceptor.clone(), Arc::clone(&handshakes));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                handshakes.send_modify(|n| *n += 1);
                let Ok(mut app) = TcpStream::connect(app_addr).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut app).await;
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_backends_carry_requests_websockets_and_health_checks() {
    let pki = Pki::new();
    let apps = start_apps(2).await;
    let (front, mut handshakes) = tls_backend(&apps[0], &pki.leaf(&["backend.test"])).await;
    let files = Files::new();
    files.put("ca.pem", &pki.ca_pem());
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [routing]\n{ALL_KEYS}\n\n[reload]\nwatch = false\n\n[upstream]\ntls_ca = \"ca.pem\"\n\n\
         [health]\npath = \"/health\"\ninterval = \"100ms\"\n\n\
         [[backends]]\nid = \"app-1\"\naddress = \"{front}\"\ntls = true\ntls_server_name = \"backend.test\"\n\n\
         [[backends]]\nid = \"app-2\"\naddress = \"{}\"\n",
        apps[1].addr()
    );
    files.config.write(&text);
    let proxy = start_proxy_from(&files.config).await;
    let http = Http::default();

    // Health checks reach it over TLS: before any traffic, each connection
    // is a check's, and the second starts after the first was recorded.
    within("two checks over TLS", handshakes.wait_for(|n| *n >= 2)).await.expect("front alive");
    let exposition = http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body;
    let checks = metric(
        &parse_prometheus(&exposition),
        "sticky_proxy_health_checks_total",
        &[("backend", "app-1"), ("result", "success")],
    );
    assert!(checks >= Some(1.0), "a successful check over TLS: {checks:?}");

    let mut ids = Ids::new(8);
    let on_tls: Vec<String> =
        std::iter::from_fn(|| Some(ids.next_id())).filter(|d| owner(&proxy, d) == "app-1").take(5).collect();
    for id in &on_tls {
        let reply = http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[("x-device-id", id)]).await;
        assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, "app-1"), "device {id} via the TLS backend");
    }
    let _ws = connect_device(proxy.proxy_addr(), &on_tls[0]).await;
    assert_eq!(apps[0].sockets_for(&on_tls[0]), 1, "the tunnel runs over TLS to app-1");

    // A name the certificate doesn't carry: the handshake fails, 502 says so.
    files.config.write(&text.replace("tls_server_name = \"backend.test\"", "tls_server_name = \"other.test\""));
    let reply = http.send(Method::POST, &format!("http://{}/reload", proxy.admin_addr()), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let id = &on_tls[1];
    let reply = http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[("x-device-id", id)]).await;
    // Retried on app-2: the handshake failed before any byte of the request
    // went out. Connections pooled before the reload are not reused.
    assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, "app-2"), "{}", reply.body);
    let exposition = http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body;
    let errors = metric(
        &parse_prometheus(&exposition),
        "sticky_proxy_upstream_errors_total",
        &[("backend", "app-1"), ("kind", "connect")],
    );
    assert_eq!(errors, Some(1.0));
    proxy.shutdown().await;
}

#[test]
fn config_errors_name_the_tls_field_and_line() {
    let pki = Pki::new();
    let files = Files::new();
    let dir = files.dir();
    let (a, b) = (pki.leaf(&["a.test"]), pki.leaf(&["b.test"]));
    files.put_pair("tls", &a);
    files.put("b.key", &b.key);
    files.put("ca.pem", &pki.ca_pem());
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"tls.pem\"\nkey = \"tls.key\"\n\n\
                [routing]\nkey = [\"header:x-device-id\"]\n\n[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9\"\n";
    let error = |text: &str| -> String {
        match Config::parse_in(text, &dir) {
            Ok(_) => panic!("should fail:\n{text}"),
            Err(e) => e.to_string(),
        }
    };
    Config::parse_in(base, &dir).expect("the base config is valid");
    let e = error(&base.replace("key = \"tls.key\"", "key = \"b.key\""));
    assert!(e.starts_with("line 7: server.tls.key: ") && e.contains("does not belong"), "{e}");
    let e = error(&base.replace("cert = \"tls.pem\"", "cert = \"missing.pem\""));
    assert!(e.starts_with("line 6: server.tls.cert: cannot read"), "{e}");
    let e = error(&format!("{base}\n[[server.tls.certificates]]\ncert = \"tls.pem\"\nkey = \"b.key\"\n"));
    assert!(e.contains("server.tls.certificates[0].key"), "{e}");
    let e = error(&format!("{base}tls_ca = \"ca.pem\"\n"));
    assert!(e.contains("backends[0].tls_ca: only applies with tls = true"), "{e}");
    let e = error(&format!("{base}tls = true\ntls_ca = \"ca.pem\"\ntls_server_name = \"not a name\"\n"));
    assert!(e.contains("backends[0].tls_server_name"), "{e}");
    let e = error(&format!("{base}tls = true\ntls_ca = \"tls.key\"\n"));
    assert!(e.contains("backends[0].tls_ca") && e.contains("no PEM CERTIFICATE"), "{e}");
    let e = error(&base.replace(
        "[server.tls]\nlisten = \"127.0.0.1:0\"",
        "[server.tls]\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"0s\"",
    ));
    assert!(e.contains("server.tls.handshake_timeout"), "{e}");
    let ok = Config::parse_in(&format!("{base}tls = true\ntls_ca = \"ca.pem\"\n"), &dir).expect("a TLS backend");
    let tls = ok.backends[0].tls.as_ref().expect("tls");
    assert_eq!(format!("{:?}", tls.server_name), format!("{:?}", ServerName::try_from("127.0.0.1").expect("ip")));
}
