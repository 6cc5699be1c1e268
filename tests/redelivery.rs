//! Redelivery on one proxy: an instance that answers "not here" (421) sends
//! the request on to the instance that holds the device's socket, and the
//! settings of `routing.not_here` do what they say.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// A socket for `device` opened on `app` directly, not through the proxy:
/// the proxy knows nothing of it, as with a socket through another replica.
async fn socket_elsewhere(app: std::net::SocketAddr, device: &str) -> Ws {
    connect_device(app, device).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_here_answer_finds_the_instance_holding_the_socket() {
    let apps = start_apps(3).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, "")).await;
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    let device = device_owned_by(&proxy, "app-1", 1);
    let table = proxy.router().load_full();
    let second = table.candidates(device.as_bytes(), None).nth(1).expect("a second candidate").backend.id.clone();
    let holder = apps.iter().find(|a| a.name() == second).expect("app");
    let mut ws = socket_elsewhere(holder.addr(), &device).await;

    let http = Http::default();
    let reply = http.post(&format!("http://{addr}/devices/{device}/messages"), "found you").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.instance(), Some(second.as_str()), "the second candidate holds the socket");
    assert_eq!(next_text(&mut ws).await, "found you");

    let route: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/route?key={device}"), &[]).await.body).expect("json");
    assert_eq!(route["last_redelivery"]["outcome"], "delivered", "{route}");
    assert_eq!(route["last_redelivery"]["tries"], 2, "{route}");
    assert_eq!(route["last_redelivery"]["backend"], second.as_str(), "{route}");
    let m = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
    assert_eq!(metric(&m, "sticky_proxy_not_here_total", &[("backend", "app-1")]), Some(1.0));
    assert_eq!(metric(&m, "sticky_proxy_redeliveries_total", &[("outcome", "delivered"), ("tries", "2")]), Some(1.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_delivered_when_the_device_connects() {
    let apps = start_apps(2).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, "")).await;
    let addr = proxy.proxy_addr();
    let device = device_owned_by(&proxy, "app-2", 2);
    let http = Http::default();
    let post = tokio::spawn({
        let (http, device) = (http.clone(), device.clone());
        async move { http.post(&format!("http://{addr}/devices/{device}/messages"), "waited for you").await }
    });
    // The request is held once every candidate said "not here".
    let m = within("the request is held", async {
        loop {
            let m = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body);
            if metric_sum(&m, "sticky_proxy_not_here_total", &[]) >= 2.0 {
                return m;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(metric_sum(&m, "sticky_proxy_redeliveries_total", &[]), 0.0, "still held");
    let (mut ws, early) = connect_device_collecting(addr, &device).await;
    let reply = within("held POST", post).await.expect("post task");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let got = match early.first() {
        Some(text) => text.clone(),
        None => next_text(&mut ws).await,
    };
    assert_eq!(got, "waited for you");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settings_turn_it_off_bound_the_wait_and_cap_the_held() {
    let apps = start_apps(2).await;
    let http = Http::default();

    // status = []: the 421 goes straight to the client.
    let off = start_proxy(&config_for(&apps, &format!("{ALL_KEYS}\nnot_here = {{ status = [] }}"), "")).await;
    let device = device_owned_by(&off, "app-1", 3);
    let mut ws = socket_elsewhere(apps[1].addr(), &device).await;
    let reply = http.post(&format!("http://{}/devices/{device}/messages", off.proxy_addr()), "x").await;
    assert_eq!(reply.status, 421, "{}", reply.body);
    off.shutdown().await;
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}

    // retry_for = "0s": one walk, no wait; the last not-here answer as is.
    let once = start_proxy(&config_for(&apps, &format!("{ALL_KEYS}\nnot_here = {{ retry_for = \"0s\" }}"), "")).await;
    let started = Instant::now();
    let reply = http.post(&format!("http://{}/devices/nobody/messages", once.proxy_addr()), "x").await;
    assert_eq!(reply.status, 421, "{}", reply.body);
    assert!(reply.body.contains("is not connected"), "the instance's own answer: {}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(2), "no wait: {:?}", started.elapsed());
    once.shutdown().await;

    // max_held = 1: a second request that would wait is refused with 503.
    let capped =
        start_proxy(&config_for(&apps, &format!("{ALL_KEYS}\nnot_here = {{ retry_for = \"3s\", max_held = 1 }}"), ""))
            .await;
    let addr = capped.proxy_addr();
    let first = tokio::spawn({
        let http = http.clone();
        async move { http.post(&format!("http://{addr}/devices/first/messages"), "x").await }
    });
    within("the first request is held", async {
        loop {
            let m = parse_prometheus(&http.get(&format!("http://{}/metrics", capped.admin_addr()), &[]).await.body);
            if metric_sum(&m, "sticky_proxy_not_here_total", &[]) >= 2.0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let reply = http.post(&format!("http://{addr}/devices/second/messages"), "x").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("max_held"), "{}", reply.body);
    let first = within("the held request gives up", first).await.expect("post task");
    assert_eq!(first.status, 421, "after retry_for, the last not-here answer: {}", first.body);
    capped.shutdown().await;
}
