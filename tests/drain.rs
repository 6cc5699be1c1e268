//! Draining: an instance taken out gently. New requests for its devices go
//! to their failover owner; its open tunnels stay until `drain_timeout`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use tokio_tungstenite::tungstenite::Message;

async fn whoami(http: &Http, addr: std::net::SocketAddr, device: &str) -> String {
    http.get(&format!("http://{addr}/whoami"), &[("x-device-id", device)]).await.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_moves_new_traffic_and_keeps_tunnels_until_the_timeout() {
    let apps = start_apps(3).await;
    let file = ConfigFile::new(
        "drain.toml",
        &config_for(&apps, &format!("{ALL_KEYS}\ndrain_timeout = \"1s\""), "[reload]\nwatch = false"),
    );
    let proxy = start_proxy_from(&file).await;
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    let http = Http::default();
    let drained = device_owned_by(&proxy, "app-2", 1);
    // Owned by app-2 too, but with no tunnel open.
    let newcomer = device_owned_by(&proxy, "app-2", 4);
    let other = device_owned_by(&proxy, "app-3", 2);
    let mut ws = connect_device(addr, &drained).await;

    let reply = http.send(Method::POST, &format!("http://{admin}/backends/app-2/drain"), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let drained_at = Instant::now();

    // New requests for app-2's devices go to their failover owner, except
    // those of a device whose tunnel is still open on app-2: they follow it.
    let standby_of = |device: &str| {
        let table = proxy.router().load();
        table
            .retry_target(Some(device.as_bytes()), None, table.owner(device.as_bytes()).expect("owner"))
            .expect("standby")
    };
    let standby = standby_of(&drained);
    assert_eq!(whoami(&http, addr, &newcomer).await, standby_of(&newcomer).id);
    assert_eq!(whoami(&http, addr, &drained).await, "app-2", "HTTP follows the open tunnel");
    assert_eq!(whoami(&http, addr, &other).await, "app-3");
    let route: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/route?key={drained}"), &[]).await.body).expect("json");
    // /route answers what a request does: the device's HTTP follows its
    // tunnel to app-2, and the draining owner's stand-in comes next.
    assert_eq!(route["backend"]["id"], "app-2", "{route}");
    assert_eq!(route["via"], "tunnel", "{route}");
    assert_eq!(route["candidates"][1]["id"], standby.id.as_str(), "{route}");
    assert!(route["candidates"][1]["reason"].as_str().unwrap_or_default().contains("draining"), "{route}");
    let route: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/route?key={newcomer}"), &[]).await.body).expect("json");
    assert!(route["reason"].as_str().unwrap_or_default().contains("draining"), "{route}");
    assert_eq!(route["backend"]["id"], standby_of(&newcomer).id.as_str(), "{route}");
    let backends = http.get(&format!("http://{admin}/backends"), &[]).await.body;
    assert!(backends.contains("\"draining\""), "{backends}");
    let m = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
    assert_eq!(metric(&m, "sticky_proxy_backends", &[("state", "draining")]), Some(1.0));
    assert_eq!(metric(&m, "sticky_proxy_backends", &[("state", "up")]), Some(2.0));
    assert_eq!(metric(&m, "sticky_proxy_backend_draining", &[("backend", "app-2")]), Some(1.0));
    assert_eq!(metric(&m, "sticky_proxy_backend_draining", &[("backend", "app-1")]), Some(0.0));
    // Draining is not down: backend_up alone would not tell.
    assert_eq!(metric(&m, "sticky_proxy_backend_up", &[("backend", "app-2")]), Some(1.0));

    // A drain survives a reload.
    let reply = http.send(Method::POST, &format!("http://{admin}/reload"), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(whoami(&http, addr, &newcomer).await, standby_of(&newcomer).id, "still drained after a reload");

    // The open tunnel still works during the drain…
    within("send", ws.send(Message::text("still here"))).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "still here");
    // …and is closed once drain_timeout has passed, not before.
    loop {
        match within("tunnel closes at the drain timeout", ws.next()).await {
            None | Some(Err(_)) => break,
            Some(Ok(m)) if m.is_close() => break,
            Some(Ok(_)) => continue,
        }
    }
    let closed_after = drained_at.elapsed();
    assert!(closed_after >= Duration::from_millis(900), "closed too early: {closed_after:?}");
    // The tunnel left the registry as its ending began, before the close
    // frame was sent: the device's HTTP now goes to the failover owner.
    assert!(proxy.tunnels().tunnels_of(drained.as_bytes()).is_empty());
    assert_eq!(whoami(&http, addr, &drained).await, standby.id);

    // Undrain: the device comes back to its owner.
    let reply = http.send(Method::POST, &format!("http://{admin}/backends/app-2/undrain"), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(whoami(&http, addr, &drained).await, "app-2");
    let reply = http.send(Method::POST, &format!("http://{admin}/backends/nope/drain"), &[], "").await;
    assert_eq!(reply.status, 404);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_configured_as_draining_gets_no_devices_until_the_config_says_so() {
    let apps = start_apps(2).await;
    let active = config_for(&apps, ALL_KEYS, "[reload]\nwatch = false");
    let draining = active.replacen(
        &format!("id = \"app-2\"\naddress = \"{}\"\n", apps[1].addr()),
        &format!("id = \"app-2\"\naddress = \"{}\"\nstate = \"draining\"\n", apps[1].addr()),
        1,
    );
    assert_ne!(draining, active);
    let file = ConfigFile::new("draining.toml", &draining);
    let proxy = start_proxy_from(&file).await;
    let http = Http::default();
    let device = device_owned_by(&proxy, "app-2", 3);
    let url = format!("http://{}/whoami", proxy.proxy_addr());
    assert_eq!(http.get(&url, &[("x-device-id", &device)]).await.body, "app-1");

    file.write(&active);
    let reply = http.send(Method::POST, &format!("http://{}/reload", proxy.admin_addr()), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(http.get(&url, &[("x-device-id", &device)]).await.body, "app-2");

    // A wrong state is a config error that names the field.
    file.write(&draining.replace("\"draining\"", "\"sleepy\""));
    let reply = http.send(Method::POST, &format!("http://{}/reload", proxy.admin_addr()), &[], "").await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("backends[1].state"), "{}", reply.body);
    proxy.shutdown().await;
}
