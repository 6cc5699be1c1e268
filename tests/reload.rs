//! Hot reload: under load, with bad files, and by each trigger.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use hyper::Method;

const HEADER_KEY: &str = r#"key = ["header:x-device-id"]"#;

/// A config listing the given subset of `apps`.
fn config_with(apps: &[&sticky_proxy::tools::demo::DemoInstance], extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[routing]\n{HEADER_KEY}\n\n[reload]\nwatch = false\n{extra}\n"
    );
    for app in apps {
        text.push_str(&format!("\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n", app.name(), app.addr()));
    }
    text
}

async fn admin_reload(http: &Http, admin: std::net::SocketAddr) -> Reply {
    http.send(Method::POST, &format!("http://{admin}/reload"), &[], "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_requests_survive_twenty_reloads() {
    let apps = start_apps(4).await;
    let sets: [Vec<&sticky_proxy::tools::demo::DemoInstance>; 4] = [
        vec![&apps[0], &apps[1]],
        vec![&apps[0], &apps[1], &apps[2]],
        vec![&apps[1], &apps[2], &apps[3]],
        vec![&apps[0], &apps[1], &apps[2], &apps[3]],
    ];
    let file = ConfigFile::new("reload.toml", &config_with(&sets[0], ""));
    let proxy = start_proxy_from(&file).await;
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    let http = Http::default();

    // The load: 4 clients × 500 requests, each for a random device.
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 500;
    let done = Arc::new(AtomicUsize::new(0));
    // app-2 is in every set: its counts must carry across every reload.
    let by_app_2 = Arc::new(AtomicUsize::new(0));
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let mut load = Vec::new();
    for c in 0..CLIENTS {
        let (http, done, progress_tx) = (http.clone(), Arc::clone(&done), Arc::clone(&progress_tx));
        let by_app_2 = Arc::clone(&by_app_2);
        load.push(tokio::spawn(async move {
            let mut ids = Ids::new(c as u64);
            let mut failures = Vec::new();
            for _ in 0..PER_CLIENT {
                let id = ids.next_id();
                let reply = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &id)]).await;
                if reply.status != 200 {
                    failures.push(format!("{id}: {} {}", reply.status, reply.body));
                }
                if reply.body == "app-2" {
                    by_app_2.fetch_add(1, Ordering::Relaxed);
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                progress_tx.send_replace(n);
            }
            failures
        }));
    }

    // Twenty reloads spread over the load: reload i waits for i×90 requests.
    for i in 1..=20 {
        within("load progress", progress.wait_for(|n| *n >= i * 90)).await.expect("progress");
        file.write(&config_with(&sets[i % sets.len()], ""));
        let reply = admin_reload(&http, admin).await;
        assert_eq!(reply.status, 200, "reload {i}: {}", reply.body);
    }
    let mut failures = Vec::new();
    for task in load {
        failures.extend(within("load", task).await.expect("load task"));
    }
    assert_eq!(done.load(Ordering::Relaxed), CLIENTS * PER_CLIENT);
    assert!(failures.is_empty(), "{} failed requests: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert_eq!(proxy.router().load().generation(), 21);
    let m = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
    let served = metric(&m, "sticky_proxy_requests_total", &[("backend", "app-2"), ("code", "200")]);
    let by_app_2 = by_app_2.load(Ordering::Relaxed);
    assert!(by_app_2 > 100, "app-2 served {by_app_2} of 2,000");
    assert_eq!(served, Some(by_app_2 as f64), "app-2's count across 20 reloads");

    // The last config (sets[0]: app-1, app-2) is the one serving now; add
    // app-4 and check new devices reach it.
    file.write(&config_with(&[&apps[0], &apps[1], &apps[3]], ""));
    let reply = admin_reload(&http, admin).await;
    let applied: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(applied["added"], serde_json::json!(["app-4"]), "{applied}");
    let mut ids = Ids::new(4242);
    let mut reached_new = 0;
    for _ in 0..60 {
        let id = ids.next_id();
        let owner = proxy.router().load().owner(id.as_bytes()).expect("owner").id.clone();
        let reply = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &id)]).await;
        assert_eq!(reply.body, owner);
        reached_new += usize::from(owner == "app-4");
    }
    assert!(reached_new > 5, "new devices reach the new backend ({reached_new} of 60)");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_by_post_reload_keeps_the_old_config_and_says_why() {
    let apps = start_apps(2).await;
    let good = config_with(&[&apps[0], &apps[1]], "");
    let file = ConfigFile::new("bad-post.toml", &good);
    let proxy = start_proxy_from(&file).await;
    let http = Http::default();

    file.write(&good.replace("address = \"", "address = \"nonsense:").replacen("nonsense:", "", 1));
    let reply = admin_reload(&http, proxy.admin_addr()).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("bad-post.toml:"), "names the file: {}", reply.body);
    assert!(reply.body.contains("backends[1].address"), "names the field: {}", reply.body);
    assert_eq!(proxy.router().load().generation(), 1, "nothing changed");

    let reply = http.get(&format!("http://{}/whoami", proxy.proxy_addr()), &[("x-device-id", "d1")]).await;
    assert_eq!(reply.status, 200, "the old config keeps serving");

    // A non-ASCII address (it once panicked the reload thread): a clear
    // error, counted, and the old config keeps serving.
    let addresses: Vec<String> = apps.iter().map(|a| a.addr().to_string()).collect();
    file.write(&good.replace(&addresses[1], "aaaa\u{e9}:80"));
    let reply = admin_reload(&http, proxy.admin_addr()).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("backends[1].address"), "names the field: {}", reply.body);
    assert_eq!(proxy.router().load().generation(), 1, "nothing changed");

    let metrics = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body);
    assert_eq!(metric(&metrics, "sticky_proxy_config_reloads_total", &[("result", "failure")]), Some(2.0));
    // Every series exists from the start, at 0 until it happens.
    assert_eq!(metric(&metrics, "sticky_proxy_config_reloads_total", &[("result", "success")]), Some(0.0));
    assert_eq!(
        metric(&metrics, "sticky_proxy_config_last_reload_successful", &[]),
        Some(0.0),
        "the last reload failed"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watcher_reloads_changes_once_and_skips_bad_files() {
    let apps = start_apps(2).await;
    let watched = "[reload]\nwatch = true\ninterval = \"50ms\"";
    let good = config_with(&[&apps[0]], "").replace("[reload]\nwatch = false", watched);
    let file = ConfigFile::new("watched.toml", &good);
    let proxy = start_proxy_from(&file).await;
    let mut status = proxy.reloader().subscribe();

    // A bad file: one failed attempt, old config still in use.
    file.write(
        &good.replace("listen = \"127.0.0.1:0\"\n\n[admin]", "listen = \"127.0.0.1:0\"\nlisten_typo = 1\n\n[admin]"),
    );
    within("watcher sees the bad file", status.changed()).await.expect("status");
    let seen = status.borrow_and_update().clone();
    assert_eq!(seen.attempts, 1);
    assert!(seen.last_error.as_deref().unwrap_or_default().contains("listen_typo"), "{seen:?}");
    assert_eq!(proxy.router().load().backends().len(), 1);

    // A good file with a second backend: exactly one more attempt.
    file.write(&config_with(&[&apps[0], &apps[1]], "").replace("[reload]\nwatch = false", watched));
    within("watcher sees the good file", status.changed()).await.expect("status");
    let seen = status.borrow_and_update().clone();
    assert_eq!((seen.attempts, seen.generation, seen.last_error), (2, 2, None));
    assert_eq!(proxy.router().load().backends().len(), 2);

    // Unchanged content never reloads again: an explicit reload is the next attempt.
    proxy.reloader().reload(sticky_proxy::ops::reload::Trigger::Admin).expect("reload");
    assert_eq!(status.borrow_and_update().attempts, 3);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_file_is_logged_with_file_line_and_field() {
    let apps = start_apps(2).await;
    let good = config_with(&[&apps[0]], "");
    let file = ConfigFile::new("sighup.toml", &good);
    let mut proxy = ChildProxy::spawn(&file.path);
    let http = Http::default();

    file.write(&good.replace("[[backends]]\nid = \"app-1\"", "[[backends]]\nid = \"app-1\"\nweight = 0"));
    proxy.signal("HUP");
    let line = proxy.wait_for_log("config reload failed");
    assert!(line.contains("SIGHUP"), "{line}");
    assert!(line.contains("sighup.toml:") && line.contains("backends[0].weight"), "file:line: field in {line}");

    let reply = http.get(&format!("http://{}/whoami", proxy.addr), &[("x-device-id", "d1")]).await;
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "app-1"), "the old config keeps serving");

    file.write(&config_with(&[&apps[1]], ""));
    proxy.signal("HUP");
    let line = proxy.wait_for_log("config reloaded");
    assert!(line.contains("generation=2"), "{line}");
    let reply = http.get(&format!("http://{}/whoami", proxy.addr), &[("x-device-id", "d1")]).await;
    assert_eq!(reply.body, "app-2", "the new config serves");

    let metrics = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin), &[]).await.body);
    assert_eq!(metric(&metrics, "sticky_proxy_config_reloads_total", &[("result", "failure")]), Some(1.0));
    assert_eq!(metric(&metrics, "sticky_proxy_config_reloads_total", &[("result", "success")]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_need_a_restart_are_reported_and_the_rest_applies() {
    let apps = start_apps(2).await;
    let file = ConfigFile::new("restart.toml", &config_with(&[&apps[0]], ""));
    let proxy = start_proxy_from(&file).await;
    let http = Http::default();

    let changed = config_with(&[&apps[0], &apps[1]], "[upstream]\nresponse_timeout = \"5s\"\npool_max_idle = 7")
        .replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"\nlog_format = \"json\"", 1);
    file.write(&changed);
    let reply = admin_reload(&http, proxy.admin_addr()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let applied: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(
        applied["needs_restart"],
        serde_json::json!(["server.listen", "server.log_format", "upstream.pool_max_idle"]),
        "{applied}"
    );
    assert_eq!(applied["added"], serde_json::json!(["app-2"]));
    let table = proxy.router().load();
    assert_eq!(table.config().upstream.response_timeout, std::time::Duration::from_secs(5), "live setting applied");
    assert_eq!(table.config().server.listen.port(), 0, "the running listen address is what the snapshot says");
    assert_eq!(table.config().server.log_format, sticky_proxy::config::LogFormat::Text, "the running format stays");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_in_several_writes_reloads_once_with_the_final_content() {
    let apps = start_apps(2).await;
    let watched = "[reload]\nwatch = true\ninterval = \"50ms\"";
    let first = config_with(&[&apps[0]], "").replace("[reload]\nwatch = false", watched);
    let file = ConfigFile::new("slow-save.toml", &first);
    let proxy = start_proxy_from(&file).await;
    let mut status = proxy.reloader().subscribe();

    // An editor writing in place, slowly: two truncated (invalid) versions,
    // then the whole new file, 100 ms apart (less than the 200 ms settle).
    // The pauses shape the writer; the test waits on the reloader's events.
    let last = config_with(&[&apps[0], &apps[1]], "").replace("[reload]\nwatch = false", watched);
    for cut in [last.len() / 3, 2 * last.len() / 3, last.len()] {
        std::fs::write(&file.path, &last[..cut]).expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    within("the watcher reloads", status.changed()).await.expect("status");
    let seen = status.borrow_and_update().clone();
    assert_eq!((seen.attempts, seen.generation, seen.last_error), (1, 2, None), "one reload, of the final file");
    assert_eq!(proxy.router().load().backends().len(), 2);

    // Nothing else was loaded behind our back: an explicit reload is attempt 2.
    proxy.reloader().reload(sticky_proxy::ops::reload::Trigger::Admin).expect("reload");
    assert_eq!(status.borrow_and_update().attempts, 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reports_the_new_configs_warnings() {
    let apps = start_apps(1).await;
    let file = ConfigFile::new("warnings.toml", &config_with(&[&apps[0]], ""));
    let proxy = start_proxy_from(&file).await;
    let http = Http::default();

    // A second backend at the first one's address: accepted, with a warning.
    let shared = format!("\n[[backends]]\nid = \"again\"\naddress = \"{}\"\n", apps[0].addr());
    file.write(&(config_with(&[&apps[0]], "") + &shared));
    let reply = admin_reload(&http, proxy.admin_addr()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let applied: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    let warnings = applied["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{applied}");
    let warning = warnings[0].as_str().expect("text");
    assert!(
        warning.contains("warnings.toml:") && warning.contains("backends[1].address: 2 backends share"),
        "{warning}"
    );
    assert_eq!(proxy.router().load().backends().len(), 2, "applied all the same");
    proxy.shutdown().await;
}
