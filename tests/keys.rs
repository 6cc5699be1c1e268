//! Every key source finds the same device ID, and so the same owner.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_source_routes_a_device_to_its_ring_owner() {
    let (_apps, proxy) = stack(3).await;
    let addr = proxy.proxy_addr();
    let http = Http::default();
    let mut ids = Ids::new(7);
    let mut devices: Vec<(String, String)> = (0..40).map(|_| ids.next_id()).map(|id| (id.clone(), id)).collect();
    // IDs that need decoding: (raw in path/query, decoded ID).
    devices.push(("phone%2042".into(), "phone 42".into()));
    devices.push(("caf%C3%A9".into(), "café".into()));

    let mut owners_seen = std::collections::HashSet::new();
    for (encoded, id) in &devices {
        let expected = proxy.router().load().owner(id.as_bytes()).expect("owner").id.clone();
        let header = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", id)]).await;
        let path = http.get(&format!("http://{addr}/devices/{encoded}/status"), &[]).await;
        let query = http.get(&format!("http://{addr}/whoami?device_id={}", encoded.replace("%20", "+")), &[]).await;
        let cookie =
            http.get(&format!("http://{addr}/whoami"), &[("cookie", &format!("theme=dark; device_id={id}"))]).await;
        for (source, reply) in [("header", &header), ("path", &path), ("query", &query), ("cookie", &cookie)] {
            assert_eq!(reply.instance(), Some(expected.as_str()), "{source} for {id:?}: {}", reply.body);
        }
        assert_eq!(header.body, expected);
        owners_seen.insert(expected);
    }
    assert_eq!(owners_seen.len(), 3, "devices spread over every backend");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_device_id_is_rejected_with_the_reason() {
    let (_apps, proxy) = stack(3).await;
    let http = Http::default();
    let reply = http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[("x-device-id", "")]).await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("no device ID"), "{}", reply.body);
    assert!(reply.body.contains("header x-device-id"), "{}", reply.body);
    assert_eq!(reply.instance(), None, "a rejected request never reaches a backend");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_sends_keyless_requests_round_robin() {
    let apps = start_apps(3).await;
    let proxy = start_proxy(&config_for(&apps, &format!("{ALL_KEYS}\nmissing_key = \"spread\""), "")).await;
    let http = Http::default();
    let mut seen = Vec::new();
    for _ in 0..6 {
        let reply = http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[]).await;
        assert_eq!(reply.status, 200);
        seen.push(reply.body);
    }
    for app in &apps {
        assert_eq!(seen.iter().filter(|s| *s == app.name()).count(), 2, "{seen:?}");
    }
    proxy.shutdown().await;
}
