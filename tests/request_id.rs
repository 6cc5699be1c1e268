//! `X-Request-Id`: a client's sane ID is passed upstream and returned, a
//! missing or insane one is replaced by a new one, WebSocket upgrades carry
//! it too.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn id_of(reply: &Reply) -> String {
    reply.headers.get("x-request-id").and_then(|v| v.to_str().ok()).expect("x-request-id on the response").to_string()
}

/// `GET /headers` through the proxy: the response's ID and the one the
/// backend received.
async fn ids(http: &Http, proxy: &sticky_proxy::app::RunningProxy, headers: &[(&str, &str)]) -> (String, String) {
    let mut all = vec![("x-device-id", "phone-1")];
    all.extend_from_slice(headers);
    let reply = http.get(&format!("http://{}/headers", proxy.proxy_addr()), &all).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    let upstream = seen["x-request-id"].as_str().unwrap_or_else(|| panic!("no x-request-id upstream: {seen}"));
    (id_of(&reply), upstream.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_id_goes_upstream_and_comes_back() {
    let (_apps, proxy) = stack(1).await;
    let http = Http::default();
    let (returned, upstream) = ids(&http, &proxy, &[("x-request-id", "client-id-42")]).await;
    assert_eq!((returned.as_str(), upstream.as_str()), ("client-id-42", "client-id-42"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_one_a_new_id_is_made_for_every_request() {
    let (_apps, proxy) = stack(1).await;
    let http = Http::default();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let (returned, upstream) = ids(&http, &proxy, &[]).await;
        assert_eq!(returned, upstream);
        assert!(returned.len() == 16 && returned.bytes().all(|b| b.is_ascii_hexdigit()), "{returned:?}");
        assert!(seen.insert(returned), "IDs repeat");
    }
    // The proxy's own answers carry one too.
    let reply = http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[]).await;
    assert_eq!(reply.status, 400);
    assert_eq!(id_of(&reply).len(), 16);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insane_client_id_is_replaced() {
    let (_apps, proxy) = stack(1).await;
    let http = Http::default();
    let too_long = "a".repeat(129);
    // (A client can't send other control characters: the HTTP parser refuses them.)
    for bad in [too_long.as_str(), "tab\there", "with space", "caf\u{e9}"] {
        let (returned, upstream) = ids(&http, &proxy, &[("x-request-id", bad)]).await;
        assert_ne!(returned, bad);
        assert_eq!(returned, upstream, "{bad:?}");
        assert_eq!(returned.len(), 16, "{bad:?}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_carries_the_id_upstream_and_back() {
    // A backend that records the upgrade request and refuses it.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = backend.local_addr().expect("addr");
    let seen = tokio::spawn(async move {
        let (mut conn, _) = backend.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the headers ended");
            head.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        String::from_utf8_lossy(&head).to_lowercase()
    });
    let config = format!("{}\n[[backends]]\nid = \"raw\"\naddress = \"{addr}\"\n", config_for(&[], ALL_KEYS, ""));
    let proxy = start_proxy(&config).await;
    let headers = [
        ("x-device-id", "phone-3"),
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("x-request-id", "ws-upgrade-7"),
    ];
    let reply = Http::default().get(&format!("http://{}/ws", proxy.proxy_addr()), &headers).await;
    assert_eq!(reply.status, 403);
    assert_eq!(id_of(&reply), "ws-upgrade-7");
    let head = within("the backend saw the upgrade", seen).await.expect("backend task");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-request-id: ws-upgrade-7"), "{head}");
    proxy.shutdown().await;
}
