//! `server.access_log`: one info line per proxied request, or none; what
//! it says (client, bytes each way, request ID); `server.log_format`; the
//! tunnel open line.

mod common;

use common::*;

/// Sends one request through `proxy`, then reloads it: the reload's log line
/// comes after anything the request logged (the access line is written
/// as the response body ends, before the client has it whole), so the
/// lines before it are the request's.
async fn lines_of_one_request(proxy: &mut ChildProxy) -> (Reply, Vec<String>) {
    let http = Http::default();
    let reply = http.get(&format!("http://{}/whoami", proxy.addr), &[("x-device-id", "phone-42")]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reload = http.send(hyper::Method::POST, &format!("http://{}/reload", proxy.admin), &[], "").await;
    assert_eq!(reload.status, 200, "{}", reload.body);
    (reply, proxy.log_until("config reloaded"))
}

fn request_id(reply: &Reply) -> String {
    reply.headers.get("x-request-id").and_then(|v| v.to_str().ok()).expect("x-request-id on the response").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_on_by_default_and_off_when_configured() {
    let apps = start_apps(1).await;
    let on = ConfigFile::new("log-on.toml", &config_for(&apps, ALL_KEYS, "[reload]\nwatch = false"));
    let mut proxy = ChildProxy::spawn(&on.path);
    let (reply, lines) = lines_of_one_request(&mut proxy).await;
    let proxied: Vec<&String> = lines.iter().filter(|l| l.contains("proxied")).collect();
    assert_eq!(proxied.len(), 1, "{lines:#?}");
    let id = request_id(&reply);
    let bytes_out = format!("bytes_out={}", reply.body.len());
    let request_id = format!("request_id={id}");
    for part in [
        "INFO",
        "device=\"phone-42\"",
        "backend=app-1",
        "method=GET",
        "path=\"/whoami\"",
        "status=200",
        "client=127.0.0.1",
        "bytes_in=0",
        &bytes_out,
        "complete=true",
        &request_id,
    ] {
        assert!(proxied[0].contains(part), "{part} missing: {}", proxied[0]);
    }
    drop(proxy);

    let off_text =
        config_for(&apps, ALL_KEYS, "[reload]\nwatch = false").replace("[server]\n", "[server]\naccess_log = false\n");
    let off = ConfigFile::new("log-off.toml", &off_text);
    let mut proxy = ChildProxy::spawn(&off.path);
    let (_, lines) = lines_of_one_request(&mut proxy).await;
    assert!(!lines.iter().any(|l| l.contains("proxied")), "{lines:#?}");
}

/// The `bytes_in`/`bytes_out` of the next access line.
fn bytes_of(proxy: &mut ChildProxy) -> (u64, u64) {
    let line = proxy.wait_for_log("proxied");
    let field = |name: &str| -> u64 {
        line.split(&format!(" {name}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("bytes_in"), field("bytes_out"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_in_and_out_count_the_bodies_buffered_or_streamed() {
    let apps = start_apps(1).await;
    let file = ConfigFile::new("bytes.toml", &config_for(&apps, ALL_KEYS, "[reload]\nwatch = false"));
    let mut proxy = ChildProxy::spawn(&file.path);
    let http = Http::default();
    let url = format!("http://{}/echo", proxy.addr);
    // Small: buffered so that it can be retried. Large (over 64 KiB): streamed.
    for size in [5usize, 300 * 1024] {
        let body = "x".repeat(size);
        let reply = http.send(hyper::Method::POST, &url, &[("x-device-id", "phone-7")], body).await;
        assert_eq!((reply.status.as_u16(), reply.body.len()), (200, size));
        assert_eq!(bytes_of(&mut proxy), (size as u64, size as u64), "{size}-byte echo");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_object_a_line() {
    let apps = start_apps(1).await;
    let text = config_for(&apps, ALL_KEYS, "[reload]\nwatch = false")
        .replace("[server]\n", "[server]\nlog_format = \"json\"\n");
    let file = ConfigFile::new("json.toml", &text);
    let mut proxy = ChildProxy::spawn(&file.path);
    let (reply, lines) = lines_of_one_request(&mut proxy).await;
    let mut access = None;
    for line in proxy.startup_log.iter().chain(&lines) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(value.get(field).is_some(), "{field} missing: {line}");
        }
        if value["message"] == "proxied" {
            access = Some(value);
        }
    }
    let access = access.unwrap_or_else(|| panic!("no access line in {lines:#?}"));
    assert_eq!(access["level"], "INFO");
    assert_eq!(access["device"], "phone-42");
    assert_eq!(access["backend"], "app-1");
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/whoami");
    assert_eq!(access["status"], 200);
    assert_eq!(access["client"], "127.0.0.1");
    assert_eq!(access["bytes_in"], 0);
    assert_eq!(access["bytes_out"], reply.body.len());
    assert_eq!(access["request_id"], request_id(&reply).as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_open_line_is_info_even_without_the_access_log() {
    let apps = start_apps(1).await;
    let text =
        config_for(&apps, ALL_KEYS, "[reload]\nwatch = false").replace("[server]\n", "[server]\naccess_log = false\n");
    let file = ConfigFile::new("tunnel.toml", &text);
    let mut proxy = ChildProxy::spawn(&file.path);
    let addr: std::net::SocketAddr = proxy.addr.parse().expect("proxy address");
    let _ws = connect_device(addr, "phone-9").await;
    let line = proxy.wait_for_log("tunnel open");
    for part in ["INFO", "device=\"phone-9\"", "backend=app-1", "client=127.0.0.1", "request_id="] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
}

#[test]
fn log_format_is_text_or_json() {
    let base = config_for(&[], ALL_KEYS, "") + "\n[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9\"\n";
    let with = |value: &str| base.replace("[server]\n", &format!("[server]\nlog_format = {value}\n"));
    use sticky_proxy::config::{Config, LogFormat};
    assert_eq!(Config::parse(&base).expect("valid").server.log_format, LogFormat::Text, "the default");
    assert_eq!(Config::parse(&with("\"text\"")).expect("valid").server.log_format, LogFormat::Text);
    assert_eq!(Config::parse(&with("\"json\"")).expect("valid").server.log_format, LogFormat::Json);
    let e = Config::parse(&with("\"xml\"")).expect_err("not a format").to_string();
    // The line and the values allowed (naming the field is the config
    // errors' work, done for every enum field at once).
    assert!(e.contains("line 2") && e.contains("`text` or `json`"), "{e}");
}
