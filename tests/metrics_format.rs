//! The `/metrics` exposition of a proxy with traffic, in both formats it
//! speaks (Prometheus text 0.0.4, and OpenMetrics 1.0 when asked for):
//! one family per name (no gauge `X` beside a counter `X_total`), checked
//! here in Rust, by `promtool check metrics` when promtool is installed, and
//! by Python's `prometheus_client` parsers when they are; and the Grafana
//! dashboard queries only metrics a real scrape has.
//!
//! `.ci/run` installs promtool and `python3-prometheus-client`
//! (tests/prometheus/install.sh); without them a note says what was skipped.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

const OPENMETRICS_ACCEPT: &str =
    "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";

/// Both expositions (classic, OpenMetrics) of a proxy that has served
/// requests with and without a device ID and holds an open tunnel.
async fn scrape_with_traffic() -> (String, String) {
    let (apps, proxy) = stack(3).await;
    let addr = proxy.proxy_addr();
    let admin = proxy.admin_addr();
    let http = Http::default();
    let mut ids = Ids::new(16);
    for _ in 0..12 {
        let id = ids.next_id();
        let reply = http.get(&format!("http://{addr}/whoami"), &[("x-device-id", &id)]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let reply = http.get(&format!("http://{addr}/whoami"), &[]).await;
    assert_eq!(reply.status, 400, "no device ID");
    let mut ws = connect_device(addr, &ids.next_id()).await;
    within("send", ws.send(Message::text("hello"))).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "hello");

    // Every request is done (the tunnel's upgrade included), so none is in
    // flight; the response body may end a moment after the client has it.
    within("requests_in_flight returns to 0", async {
        loop {
            let m = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
            if metric(&m, "sticky_proxy_requests_in_flight", &[]) == Some(0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let classic = http.get(&format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(classic.status, 200);
    let content_type = classic.headers.get("content-type").and_then(|v| v.to_str().ok());
    assert_eq!(content_type, Some("text/plain; version=0.0.4; charset=utf-8"));
    let openmetrics = http.get(&format!("http://{admin}/metrics"), &[("accept", OPENMETRICS_ACCEPT)]).await;
    assert_eq!(openmetrics.status, 200);
    let content_type = openmetrics.headers.get("content-type").and_then(|v| v.to_str().ok());
    assert_eq!(content_type, Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    drop(ws);
    proxy.shutdown().await;
    drop(apps);
    (classic.body, openmetrics.body)
}

/// Families by name (`# TYPE` lines), failing on a name declared twice.
fn families(text: &str) -> BTreeMap<String, String> {
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            let earlier = types.insert(name.to_string(), kind.to_string());
            assert!(earlier.is_none(), "family {name} declared twice ({earlier:?} and {kind})");
        }
    }
    types
}

/// Checks that every family has a name of its own: its base name (a
/// counter's without `_total`) and the sample names it owns are nobody
/// else's, so a parser keyed by name sees each family once. Returns the
/// base names.
fn assert_one_family_per_name(text: &str, openmetrics: bool) -> BTreeSet<String> {
    let types = families(text);
    assert!(!types.is_empty(), "no families in\n{text}");
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut bases = BTreeSet::new();
    for (name, kind) in &types {
        let base = match (kind.as_str(), openmetrics) {
            ("counter", false) => {
                name.strip_suffix("_total").unwrap_or_else(|| panic!("counter {name} without _total")).to_string()
            }
            ("counter", true) => {
                assert!(!name.ends_with("_total"), "OpenMetrics counter family {name} must not end in _total");
                name.clone()
            }
            _ => name.clone(),
        };
        assert!(bases.insert(base.clone()), "two families with the base name {base} (one is {name} {kind})");
        let owned: Vec<String> = match kind.as_str() {
            "counter" => vec![base.clone(), format!("{base}_total"), format!("{base}_created")],
            "histogram" => ["", "_bucket", "_sum", "_count", "_created"].iter().map(|s| format!("{base}{s}")).collect(),
            _ => vec![base.clone()],
        };
        for sample in owned {
            if let Some(other) = owner.insert(sample.clone(), name.clone()) {
                panic!("{sample} belongs to both {other} and {name}");
            }
        }
    }
    // Every sample belongs to a declared family.
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        assert!(owner.contains_key(name), "sample {name} belongs to no family: {line:?}");
    }
    if openmetrics {
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        assert_eq!(text.matches("# EOF").count(), 1);
    } else {
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "no OpenMetrics-only lines in 0.0.4 text");
    }
    bases
}

/// Runs `program args` with `input` on stdin, killed after [`STEP`].
/// `None` when the program can't be started.
fn run_with_input(program: &str, args: &[&str], input: &str) -> Option<(bool, String)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let deadline = Instant::now() + STEP;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                panic!("{program} {args:?} did not finish within {STEP:?}");
            }
        }
    }
    let _ = writer.join();
    let output = child.wait_with_output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Some((output.status.success(), text))
}

fn promtool() -> Option<String> {
    ["promtool", "/usr/bin/promtool"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(str::to_string)
}

/// A Python 3 that has `prometheus_client` (Debian's package goes to the
/// system Python, which may not be the first `python3` on PATH).
fn python_with_prometheus_client() -> Option<String> {
    ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| Command::new(p).args(["-c", "import prometheus_client"]).output().is_ok_and(|o| o.status.success()))
        .map(str::to_string)
}

/// Parses stdin with prometheus_client's parser for `format` and prints
/// each family as `name type`.
const PYTHON_PARSE: &str = r#"
import sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    print(family.name, family.type)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_family_has_one_name_in_both_formats_and_the_tools_agree() {
    let (classic, openmetrics) = scrape_with_traffic().await;
    let classic_bases = assert_one_family_per_name(&classic, false);
    let openmetrics_bases = assert_one_family_per_name(&openmetrics, true);
    assert_eq!(classic_bases, openmetrics_bases, "the same families in both formats");
    // The parser of the tests' other checks reads the classic text too.
    let samples = parse_prometheus(&classic);
    assert_eq!(metric(&samples, "sticky_proxy_requests_total", &[("backend", "-"), ("code", "400")]), Some(1.0));
    assert_eq!(metric_sum(&samples, "sticky_proxy_websockets_open", &[]), 1.0);
    assert_eq!(metric(&samples, "sticky_proxy_client_connections", &[]).map(|n| n >= 1.0), Some(true));

    match promtool() {
        Some(promtool) => {
            // promtool reads the classic text format (and lints it).
            let (ok, out) = run_with_input(&promtool, &["check", "metrics"], &classic).expect("run promtool");
            assert!(ok, "promtool check metrics failed:\n{out}\n--- exposition:\n{classic}");
        }
        None => eprintln!("note: promtool not found; `promtool check metrics` skipped (tests/prometheus/install.sh)"),
    }

    match python_with_prometheus_client() {
        Some(python) => {
            for (format, text, bases) in
                [("classic", &classic, &classic_bases), ("openmetrics", &openmetrics, &openmetrics_bases)]
            {
                let (ok, out) = run_with_input(&python, &["-c", PYTHON_PARSE, format], text).expect("run python3");
                assert!(ok, "prometheus_client could not parse the {format} exposition:\n{out}");
                let mut seen = BTreeSet::new();
                for line in out.lines() {
                    let name = line.split(' ').next().unwrap_or_default().to_string();
                    assert!(
                        seen.insert(name.clone()),
                        "prometheus_client ({format}) returned two families named {name}"
                    );
                }
                assert_eq!(&seen, bases, "prometheus_client ({format}) sees the families the exposition declares");
            }
        }
        None => eprintln!(
            "note: Python 3 with prometheus_client not found; its parsers skipped (tests/prometheus/install.sh)"
        ),
    }
}

/// Every metric name in a PromQL expression (`sticky_proxy_*`, `process_*`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = ["sticky_proxy_", "process_"].iter().filter_map(|p| rest.find(p)).min() {
        let preceded = rest[..start].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !preceded {
            names.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Every string under a key named `key`, anywhere in `value`.
fn strings_under(value: &serde_json::Value, key: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s.clone()),
                    // A templating variable's query may be an object with its own `query`.
                    _ => strings_under(v, key, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_a_scrape_has() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/sticky-proxy.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(!text.contains("$__interval"), "use $__rate_interval, not $__interval");
    let mut exprs = Vec::new();
    strings_under(&dashboard, "expr", &mut exprs);
    strings_under(&dashboard, "query", &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard's queries were found: {exprs:?}");

    let (classic, _) = scrape_with_traffic().await;
    let scraped: BTreeSet<String> = parse_prometheus(&classic).into_iter().map(|s| s.name).collect();
    let mut queried = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(scraped.contains(&name), "the dashboard queries {name}, which /metrics does not have: {expr}");
            queried.insert(name);
        }
    }
    // What makes this proxy different is on it.
    for name in [
        "sticky_proxy_backend_up",
        "sticky_proxy_backend_draining",
        "sticky_proxy_failovers_total",
        "sticky_proxy_retries_total",
        "sticky_proxy_tunnels_misplaced",
        "sticky_proxy_tunnel_migrations_total",
        "sticky_proxy_http_routed_total",
        "sticky_proxy_not_here_total",
        "sticky_proxy_redeliveries_total",
        "sticky_proxy_limits_total",
        "sticky_proxy_websockets_open",
        "sticky_proxy_requests_in_flight",
    ] {
        assert!(queried.contains(name), "the dashboard shows {name}");
    }
}
