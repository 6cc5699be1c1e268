//! The admin API: endpoints, token, and metrics that match the traffic.

mod common;

use common::*;
use futures_util::SinkExt;
use hyper::Method;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_all_but_health_and_metrics() {
    let apps = start_apps(1).await;
    let proxy =
        start_proxy(&config_for(&apps, ALL_KEYS, "").replace("[admin]", "[admin]\ntoken = \"s3cret-t0ken\"")).await;
    let http = Http::default();
    let admin = proxy.admin_addr();
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http.get(&format!("http://{admin}{open}"), &[]).await.status, 200, "{open} needs no token");
    }
    let mut refused = 0;
    for (path, method) in [("/backends", Method::GET), ("/route?key=d1", Method::GET), ("/reload", Method::POST)] {
        let url = format!("http://{admin}{path}");
        for bad in [None, Some("Bearer wrong"), Some("Bearer s3cret-t0ke"), Some("s3cret-t0ken")] {
            let headers: Vec<(&str, &str)> = bad.map(|b| ("authorization", b)).into_iter().collect();
            let reply = http.send(method.clone(), &url, &headers, "").await;
            assert_eq!(reply.status, 401, "{path} with {bad:?}");
            assert_eq!(reply.headers.get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
            refused += 1;
        }
        let reply = http.send(method, &url, &[("authorization", "Bearer s3cret-t0ken")], "").await;
        // The right token gets through; /reload then says why it can't
        // reload (this proxy runs an embedded config).
        if path == "/reload" {
            assert_eq!(reply.status, 400, "{}", reply.body);
            assert!(reply.body.contains("embedded config"), "{}", reply.body);
        } else {
            assert_eq!(reply.status, 200, "{path} with the right token: {}", reply.body);
        }
    }
    let metrics = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
    assert_eq!(metric(&metrics, "sticky_proxy_admin_unauthorized_total", &[]), Some(refused as f64));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_route_and_readyz_describe_the_routing() {
    let (_apps, proxy) = stack(3).await;
    let http = Http::default();
    let admin = proxy.admin_addr();

    let ready = http.get(&format!("http://{admin}/readyz"), &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.body);

    let route: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/route?key=phone%2042"), &[]).await.body).expect("json");
    let owner = proxy.router().load().owner(b"phone 42").expect("owner").id.clone();
    assert_eq!(route["key"], "phone 42");
    assert_eq!(route["backend"]["id"], owner.as_str());
    assert_eq!(route["reason"], "ring owner");
    assert_eq!(route["failover_order"].as_array().map(Vec::len), Some(2));
    assert_eq!(http.get(&format!("http://{admin}/route"), &[]).await.status, 400);

    // Two requests for the device, then /backends counts them for its owner.
    for _ in 0..2 {
        http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[("x-device-id", "phone 42")]).await;
    }
    let backends: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/backends"), &[]).await.body).expect("json");
    let list = backends["backends"].as_array().expect("list");
    assert_eq!(list.len(), 3);
    let share: f64 = list.iter().filter_map(|b| b["ring_share"].as_f64()).sum();
    assert!((share - 1.0).abs() < 1e-9, "ring shares sum to 1: {share}");
    for b in list {
        let served = b["requests_served"].as_u64().expect("served");
        assert_eq!(served, if b["id"] == owner.as_str() { 2 } else { 0 }, "{b}");
        assert_eq!(b["state"], "up");
        assert_eq!(b["open_websockets"], 0);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_what_the_test_did() {
    let (apps, proxy) = stack(3).await;
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    let http = Http::default();

    // 90 requests for 30 devices, and 12 open sockets; count per instance.
    let mut ids = Ids::new(3);
    let mut requests = std::collections::HashMap::<String, f64>::new();
    for _ in 0..30 {
        let id = ids.next_id();
        for _ in 0..3 {
            let reply = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &id)]).await;
            *requests.entry(reply.body).or_default() += 1.0;
        }
    }
    let mut sockets = Vec::new();
    let mut tunnels = std::collections::HashMap::<String, f64>::new();
    for _ in 0..12 {
        let id = ids.next_id();
        let owner = proxy.router().load().owner(id.as_bytes()).expect("owner").id.clone();
        let mut ws = connect_device(addr, &id).await;
        within("send", ws.send(Message::text("0123456789"))).await.expect("send");
        assert_eq!(next_text(&mut ws).await, "0123456789");
        sockets.push(ws);
        *tunnels.entry(owner).or_default() += 1.0;
    }
    for _ in 0..4 {
        http.get(&format!("http://{addr}/whoami"), &[]).await; // no device ID: 400
    }

    let text = http.get(&format!("http://{admin}/metrics"), &[]).await.body;
    let m = parse_prometheus(&text);
    for app in &apps {
        let b = app.name();
        let sent = requests.get(b).copied().unwrap_or(0.0);
        let open = tunnels.get(b).copied().unwrap_or(0.0);
        assert_eq!(metric(&m, "sticky_proxy_requests_total", &[("backend", b), ("code", "200")]), Some(sent), "{b}");
        assert_eq!(metric(&m, "sticky_proxy_requests_total", &[("backend", b), ("code", "101")]), Some(open), "{b}");
        assert_eq!(metric(&m, "sticky_proxy_websockets_open", &[("backend", b)]), Some(open), "{b}");
        assert_eq!(metric(&m, "sticky_proxy_websocket_connections_total", &[("backend", b)]), Some(open), "{b}");
        assert_eq!(
            metric(&m, "sticky_proxy_request_duration_seconds_count", &[("backend", b)]),
            Some(sent + open),
            "{b}: one observation per response"
        );
        if open > 0.0 {
            // Each socket sent a 10-byte text message plus the harness's ping:
            // at least that much went up, framing included.
            let up = metric(&m, "sticky_proxy_websocket_bytes_total", &[("backend", b), ("direction", "up")]);
            assert!(up.unwrap_or(0.0) >= open * 10.0, "{b}: {up:?}");
        }
    }
    assert_eq!(metric(&m, "sticky_proxy_missing_key_total", &[]), Some(4.0));
    // The 400s had no backend: counted as backend "-".
    assert_eq!(metric(&m, "sticky_proxy_requests_total", &[("backend", "-"), ("code", "400")]), Some(4.0));
    assert_eq!(metric(&m, "sticky_proxy_config_last_reload_successful", &[]), Some(1.0));
    for b in ["app-1", "app-2", "app-3"] {
        assert_eq!(metric(&m, "sticky_proxy_backend_draining", &[("backend", b)]), Some(0.0), "{b}");
    }
    assert_eq!(metric(&m, "sticky_proxy_backends", &[("state", "up")]), Some(3.0));
    assert_eq!(metric(&m, "sticky_proxy_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert!(metric(&m, "sticky_proxy_config_last_reload_success_timestamp_seconds", &[]).unwrap_or(0.0) > 1.7e9);
    assert!(metric(&m, "process_resident_memory_bytes", &[]).unwrap_or(0.0) > 0.0);
    assert!(metric(&m, "process_open_fds", &[]).unwrap_or(0.0) > 0.0);
    assert!(!text.contains("dev-"), "no device ID ever appears in a label");

    // Closing the sockets brings the gauge back to zero.
    for mut ws in sockets {
        within("close", ws.close(None)).await.expect("close");
        while let Some(Ok(_)) = within("close handshake", futures_util::StreamExt::next(&mut ws)).await {}
    }
    // The tunnel task ends just after the close handshake; wait for it by
    // watching the gauge (bounded).
    within("gauge returns to zero", async {
        loop {
            let m = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
            if metric_sum(&m, "sticky_proxy_websockets_open", &[]) == 0.0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_elsewhere_cannot_drain_or_reload() {
    let apps = start_apps(1).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, "")).await;
    let (http, admin) = (Http::default(), proxy.admin_addr());
    let drain = format!("http://{admin}/backends/app-1/drain");
    let reply = http.send(Method::POST, &drain, &[("origin", "https://evil.example")], "").await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let reply = http.send(Method::POST, &drain, &[("content-type", "application/x-www-form-urlencoded")], "a=1").await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(proxy.router().load().draining_since("app-1"), None, "nothing was drained");
    // The operator's own tools still can.
    let reply = http.send(Method::POST, &drain, &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(proxy.router().load().draining_since("app-1").is_some());
    proxy.shutdown().await;
}
