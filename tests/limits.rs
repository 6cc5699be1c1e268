//! Resource limits: a proxy out of file descriptors says so and recovers.

mod common;

use common::*;

/// With RLIMIT_NOFILE at 64 (`ulimit -n` sets soft and hard, so the proxy
/// can't raise it), more client connections than descriptors make `accept`
/// fail with EMFILE.
/// The proxy must warn (naming the limit), not spin or drop its listener,
/// and serve again once connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_proxy_warns_and_serves_again() {
    let apps = start_apps(1).await;
    let text = config_for(&apps, ALL_KEYS, "").replace("[server]\n", "[server]\nworkers = 1\n");
    let file = ConfigFile::new("fd-limit.toml", &text);
    let mut proxy = ChildProxy::spawn_after("ulimit -n 64", &file.path);
    let limit = proxy.startup_log.iter().find(|l| l.contains("open-file limit")).cloned();
    let limit = limit.unwrap_or_else(|| panic!("no open-file limit line in {:#?}", proxy.startup_log));
    assert!(limit.contains("limit=64"), "{limit}");

    // The kernel completes these connects from the listen backlog whether or
    // not the proxy can accept them; 120 is well past 64 descriptors.
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(within("connect", tokio::net::TcpStream::connect(&proxy.addr)).await.expect("connect"));
    }
    let warning = proxy.wait_for_log("cannot accept connections");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("Too many open files"), "{warning}");
    assert!(warning.contains("RLIMIT_NOFILE soft 64, hard 64"), "{warning}");
    assert!(warning.contains("fd_limit"), "{warning}");

    // Close them all: the proxy accepts what is left in the backlog, sees
    // each one closed, and is back to normal.
    drop(held);
    let http = Http::default();
    let reply = http.get(&format!("http://{}/whoami", proxy.addr), &[("x-device-id", "phone-42")]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, "app-1");

    let metrics = http.get(&format!("http://{}/metrics", proxy.admin), &[]).await;
    let samples = parse_prometheus(&metrics.body);
    let fd_errors = metric(&samples, "sticky_proxy_accept_errors_total", &[("kind", "fd_limit")]);
    assert!(fd_errors.is_some_and(|n| n >= 1.0), "accept errors counted: {fd_errors:?}\n{}", metrics.body);
    assert!(proxy.child.try_wait().expect("child status").is_none(), "the proxy is still running");
}
