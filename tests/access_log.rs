//! `server.access_log`: one info line per proxied request, or none.

mod common;

use common::*;

/// Sends one request through `proxy`, then reloads it: the reload's log line
/// comes after anything the request logged (the access line is written
/// before the response goes out), so the lines before it are the request's.
async fn lines_of_one_request(proxy: &mut ChildProxy) -> Vec<String> {
    let http = Http::default();
    let reply = http.get(&format!("http://{}/whoami", proxy.addr), &[("x-device-id", "phone-42")]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reload = http.send(hyper::Method::POST, &format!("http://{}/reload", proxy.admin), &[], "").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    proxy.log_until("config reloaded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_on_by_default_and_off_when_configured() {
    let apps = start_apps(1).await;
    let on = ConfigFile::new("log-on.toml", &config_for(&apps, ALL_KEYS, "[reload]\nwatch = false"));
    let mut proxy = ChildProxy::spawn(&on.path);
    let lines = lines_of_one_request(&mut proxy).await;
    let proxied: Vec<&String> = lines.iter().filter(|l| l.contains("proxied")).collect();
    assert_eq!(proxied.len(), 1, "{lines:#?}");
    for part in ["INFO", "device=\"phone-42\"", "backend=app-1", "method=GET", "path=\"/whoami\"", "status=200"] {
        assert!(proxied[0].contains(part), "{part} missing: {}", proxied[0]);
    }
    drop(proxy);

    let off_text =
        config_for(&apps, ALL_KEYS, "[reload]\nwatch = false").replace("[server]\n", "[server]\naccess_log = false\n");
    let off = ConfigFile::new("log-off.toml", &off_text);
    let mut proxy = ChildProxy::spawn(&off.path);
    let lines = lines_of_one_request(&mut proxy).await;
    assert!(!lines.iter().any(|l| l.contains("proxied")), "{lines:#?}");
}
