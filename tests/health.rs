//! Health checks and failover: a dead instance's devices move to live ones
//! at once, no other device moves, and they come back when it recovers.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use sticky_proxy::app::RunningProxy;
use sticky_proxy::tools::demo::DemoInstance;
use tokio_tungstenite::tungstenite::Message;

/// Active checks every 100 ms; down after 2 failures, up after 2 successes.
const HEALTH: &str = "[health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2";

/// Who answers each device's `GET /whoami` now; every request must succeed.
async fn answers(http: &Http, proxy: &RunningProxy, devices: &[String]) -> HashMap<String, String> {
    let mut seen = HashMap::new();
    for d in devices {
        let reply = http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[("x-device-id", d)]).await;
        assert_eq!(reply.status, 200, "device {d}: {}", reply.body);
        seen.insert(d.clone(), reply.body);
    }
    seen
}

/// Waits (bounded) until `count` health transitions have happened in all,
/// and returns when.
async fn transitions_reach(rx: &mut tokio::sync::watch::Receiver<u64>, count: u64) -> Instant {
    within("health transition", rx.wait_for(|n| *n >= count)).await.expect("health task alive");
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_fails_over_and_comes_back_and_nothing_else_moves() {
    let apps = start_apps(3).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, HEALTH)).await;
    let http = Http::default();
    let mut ids = Ids::new(11);
    let devices: Vec<String> = (0..90).map(|_| ids.next_id()).collect();
    let owner = |d: &String| proxy.router().load().owner(d.as_bytes()).expect("owner").id.clone();
    let before = answers(&http, &proxy, &devices).await;
    for d in &devices {
        assert_eq!(before[d], owner(d));
    }
    let victims: Vec<&String> = devices.iter().filter(|d| before[*d] == "app-2").collect();
    assert!(victims.len() > 10, "enough devices on app-2 to mean something");

    // A device with a socket on app-2.
    let socket_device = victims[0].clone();
    let mut ws = connect_device(proxy.proxy_addr(), &socket_device).await;

    // Kill app-2 while a client loop keeps asking for every device.
    let mut transitions = proxy.health().subscribe();
    let killed_at = Instant::now();
    let addr2 = apps[1].addr();
    apps[1].shutdown();
    let looping = {
        let (http, devices) = (http.clone(), devices.clone());
        let proxy_addr = proxy.proxy_addr();
        tokio::spawn(async move {
            // Bounded: 5 rounds over all devices; every request must succeed.
            for _ in 0..5 {
                for d in &devices {
                    let reply = http.get(&format!("http://{proxy_addr}/whoami"), &[("x-device-id", d)]).await;
                    assert_eq!(reply.status, 200, "no request is lost while app-2 dies: {d}: {}", reply.body);
                }
            }
        })
    };
    let down_at = transitions_reach(&mut transitions, 1).await;
    assert_eq!(proxy.router().load().is_up("app-2"), Some(false));
    // Down within about fall × interval (+ timeout), not seconds later.
    assert!(down_at - killed_at < Duration::from_millis(1500), "took {:?}", down_at - killed_at);
    within("client loop", looping).await.expect("no request failed during the failover");

    let during = answers(&http, &proxy, &devices).await;
    for d in &devices {
        if before[d] == "app-2" {
            let standby = {
                let table = proxy.router().load();
                table
                    .retry_target(Some(d.as_bytes()), None, table.owner(d.as_bytes()).expect("owner"))
                    .expect("standby")
            };
            assert_eq!(during[d], standby.id, "{d} lands on the next live backend of its ring walk");
        } else {
            assert_eq!(during[d], before[d], "{d} never changes backend");
        }
    }

    // The device whose socket died reconnects (to its failover owner) and
    // gets its messages.
    while let Some(Ok(_)) = within("old socket closes", futures_util::StreamExt::next(&mut ws)).await {}
    let mut ws = connect_device(proxy.proxy_addr(), &socket_device).await;
    let reply =
        http.post(&format!("http://{}/devices/{socket_device}/messages", proxy.proxy_addr()), "after failover").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(next_text(&mut ws).await, "after failover");

    // Restart app-2 on its address: after `rise` checks its devices come back.
    let _revived = DemoInstance::bind("app-2", addr2).await.expect("restart app-2");
    transitions_reach(&mut transitions, 2).await;
    assert_eq!(proxy.router().load().is_up("app-2"), Some(true));
    // Its tunnel on the failover owner is now misplaced: the rebalancer
    // closes it with 1012 so the device reconnects to app-2.
    let code = loop {
        match within("misplaced tunnel is moved", futures_util::StreamExt::next(&mut ws)).await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1012));
    let after = answers(&http, &proxy, &devices).await;
    assert_eq!(after, before, "every device is back on its ring owner");

    let m = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body);
    assert_eq!(metric(&m, "sticky_proxy_health_transitions_total", &[("backend", "app-2"), ("to", "down")]), Some(1.0));
    assert_eq!(metric(&m, "sticky_proxy_health_transitions_total", &[("backend", "app-2"), ("to", "up")]), Some(1.0));
    assert_eq!(metric(&m, "sticky_proxy_backend_up", &[("backend", "app-2")]), Some(1.0));
    assert!(metric(&m, "sticky_proxy_failovers_total", &[("backend", "app-2")]).unwrap_or(0.0) > 0.0);
    assert!(
        metric(&m, "sticky_proxy_health_checks_total", &[("backend", "app-1"), ("result", "success")]).unwrap_or(0.0)
            > 0.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_gives_503_and_one_coming_back_restores_service() {
    let apps = start_apps(2).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, HEALTH)).await;
    let http = Http::default();
    let url = format!("http://{}/whoami", proxy.proxy_addr());
    let mut transitions = proxy.health().subscribe();
    let addrs: Vec<_> = apps.iter().map(|a| a.addr()).collect();
    for app in &apps {
        app.shutdown();
    }
    transitions_reach(&mut transitions, 2).await;
    assert_eq!(proxy.router().load().backends_up(), 0);

    let reply = http.get(&url, &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("all 2 backends are down"), "{}", reply.body);
    let ready = http.get(&format!("http://{}/readyz", proxy.admin_addr()), &[]).await;
    assert_eq!(ready.status, 503, "not ready with nothing up: {}", ready.body);

    let _back = DemoInstance::bind("app-1", addrs[0]).await.expect("restart app-1");
    transitions_reach(&mut transitions, 3).await;
    for device in ["d1", "d2", "d3", "d4"] {
        let reply = http.get(&url, &[("x-device-id", device)]).await;
        assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "app-1"), "{device}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_active_checks_the_first_request_after_a_death_is_retried() {
    // No [health]: passive only, like nginx's max_fails=1 fail_timeout=10s.
    let apps = start_apps(3).await;
    let proxy = start_proxy(&config_for(&apps, ALL_KEYS, "")).await;
    let http = Http::default();
    let mut ids = Ids::new(5);
    let device = loop {
        let id = ids.next_id();
        if proxy.router().load().owner(id.as_bytes()).map(|b| b.id.as_str()) == Some("app-3") {
            break id;
        }
    };
    apps[2].shutdown();
    // A POST with a body: buffered (small), so it can be sent again.
    let reply = http
        .send(
            hyper::Method::POST,
            &format!("http://{}/echo", proxy.proxy_addr()),
            &[("x-device-id", &device)],
            "payload",
        )
        .await;
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "payload"), "retried, not lost");
    assert_ne!(reply.instance(), Some("app-3"));

    let m = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body);
    assert_eq!(metric(&m, "sticky_proxy_retries_total", &[("backend", "app-3")]), Some(1.0));
    assert_eq!(
        metric(&m, "sticky_proxy_upstream_errors_total", &[("backend", "app-3"), ("kind", "connect")]),
        Some(1.0)
    );
    assert_eq!(metric(&m, "sticky_proxy_backend_up", &[("backend", "app-3")]), Some(0.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_down_warning_names_the_last_failures_reason() {
    let apps = start_apps(1).await;
    // A port nothing listens on: connections are refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let text = format!(
        "{}\n[[backends]]\nid = \"dead\"\naddress = \"{dead}\"\n",
        config_for(&apps, ALL_KEYS, &format!("{HEALTH}\n\n[reload]\nwatch = false"))
    );
    let file = ConfigFile::new("dead.toml", &text);
    let mut proxy = ChildProxy::spawn(&file.path);
    let line = proxy.wait_for_log("backend is down");
    for part in ["WARN", "backend=\"dead\"", "failures=2", "last_failure=\"GET /health: connection refused\""] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
}
