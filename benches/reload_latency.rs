//! Does a hot reload disturb traffic in flight? Request latency through the
//! proxy with and without reloads of a 1,000-backend config, measured in
//! alternating phases so that all see the same machine.
//!
//! `cargo bench --bench reload_latency`
//!
//! The proxy and three demo backends run in this process on loopback; the
//! 1,000 backends' addresses cycle over the three demo instances. Clients
//! run on their own runtime thread, closed-loop, a bounded number of
//! requests per phase. In a "rebuilding" phase, `POST /reload` is sent every
//! 100 ms with a file whose backend list alternates between two 1,000-backend
//! lists with ten backends renamed (so every reload builds and swaps a new
//! ring: the worst case). In a "same ring" phase the file alternates between
//! two lists that differ only in addresses (pods rescheduled under the same
//! names): the new table keeps the ring.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sticky_proxy::app as server;
use sticky_proxy::config::Config;
use sticky_proxy::tools::demo::DemoInstance;

const BACKENDS: usize = 1000;
const CLIENTS: usize = 8;
const REQUESTS_PER_PHASE: usize = 40_000;
const ROUNDS: usize = 4;
const RELOAD_EVERY: Duration = Duration::from_millis(100);

/// Backends `app-{offset+i}`; the i-th on demo app `(i + shift) % 3`.
fn config(apps: &[SocketAddr], offset: usize, shift: usize) -> String {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routing]\nkey = [\"header:x-device-id\"]\n[reload]\nwatch = false\n",
    );
    for i in 0..BACKENDS {
        let addr = apps[(i + shift) % apps.len()];
        text.push_str(&format!("\n[[backends]]\nid = \"app-{}\"\naddress = \"{addr}\"\n", i + offset));
    }
    text
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Writes `text` to `file` and reloads it through the admin API; the
/// reload's own time in ms.
async fn reload(client: &Client<HttpConnector, Full<Bytes>>, admin: SocketAddr, file: &Path, text: &str) -> f64 {
    std::fs::write(file, text).expect("write config");
    let req = Request::builder().method(Method::POST).uri(format!("http://{admin}/reload")).body(Full::default());
    let resp = client.request(req.expect("request")).await.expect("reload");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("reload json");
    json["took_ms"].as_f64().expect("took_ms")
}

/// Runs one phase, reloading alternately `texts[1]` and `texts[0]` if
/// given (and left at `texts[0]`, the starting config, after the phase);
/// returns per-request latencies and the reloads' times.
async fn phase(
    proxy: SocketAddr,
    admin: SocketAddr,
    reloads: Option<&[String; 2]>,
    file: &Path,
) -> (Vec<Duration>, Vec<f64>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = {
        let (client, done, file, texts) = (client.clone(), done.clone(), file.to_path_buf(), reloads.cloned());
        tokio::spawn(async move {
            let mut took_ms = Vec::new();
            let Some(texts) = texts else { return took_ms };
            let mut flip = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && took_ms.len() < 1000 {
                tokio::time::sleep(RELOAD_EVERY).await;
                flip ^= 1;
                took_ms.push(reload(&client, admin, &file, &texts[flip]).await);
            }
            if flip == 1 {
                reload(&client, admin, &file, &texts[0]).await;
            }
            took_ms
        })
    };
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(REQUESTS_PER_PHASE / CLIENTS);
            for i in 0..REQUESTS_PER_PHASE / CLIENTS {
                let device = format!("dev-{}", c * 100_000 + i);
                let req =
                    Request::get(format!("http://{proxy}/whoami")).header("x-device-id", device).body(Full::default());
                let started = Instant::now();
                let resp = client.request(req.expect("request")).await.expect("request");
                assert_eq!(resp.status(), 200, "a request failed during the phase");
                resp.into_body().collect().await.expect("body");
                lat.push(started.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let reloads = reloader.await.expect("reloader");
    all.sort();
    (all, reloads)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: keep it cheap then.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let server_rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (apps, proxy, file, rebuilding, same_ring) = server_rt.block_on(async {
        let mut apps = Vec::new();
        for i in 1..=3 {
            apps.push(
                DemoInstance::bind(format!("demo-{i}"), "127.0.0.1:0".parse().expect("addr")).await.expect("demo"),
            );
        }
        let addrs: Vec<SocketAddr> = apps.iter().map(|a| a.addr()).collect();
        let rebuilding = [config(&addrs, 1, 0), config(&addrs, 11, 0)];
        let same_ring = [config(&addrs, 1, 0), config(&addrs, 1, 1)];
        let dir = std::env::temp_dir().join(format!("sticky-proxy-reload-latency-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("config.toml");
        std::fs::write(&file, &rebuilding[0]).expect("write");
        let config = Config::load(&file).expect("config");
        let proxy = server::start_from_file(config, file.clone()).await.expect("start");
        (apps, proxy, file, rebuilding, same_ring)
    });
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    println!("reload latency bench: {BACKENDS} backends, {CLIENTS} closed-loop clients, {REQUESTS_PER_PHASE} requests per phase, reload every {RELOAD_EVERY:?} in reloading phases");
    println!(
        "{:<10} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>14}",
        "phase", "round", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "reloads", "reload ms p50"
    );
    let phases = [("quiet", None), ("rebuilding", Some(&rebuilding)), ("same ring", Some(&same_ring))];
    let mut summary: [Vec<(Duration, Duration, Duration)>; 3] = Default::default();
    client_rt.block_on(async {
        // Warm-up: pools, allocator.
        phase(addr, admin, None, &file).await;
        for round in 1..=ROUNDS {
            for (i, (name, reloads)) in phases.iter().enumerate() {
                let (lat, reloads) = phase(addr, admin, *reloads, &file).await;
                let (p50, p99, p999, max) =
                    (percentile(&lat, 0.5), percentile(&lat, 0.99), percentile(&lat, 0.999), lat[lat.len() - 1]);
                let mut took = reloads.clone();
                took.sort_by(f64::total_cmp);
                let took_p50 = took.get(took.len() / 2).copied().unwrap_or(0.0);
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                println!(
                    "{:<10} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8} {:>14.1}",
                    name,
                    round,
                    ms(p50),
                    ms(p99),
                    ms(p999),
                    ms(max),
                    reloads.len(),
                    took_p50
                );
                summary[i].push((p50, p99, p999));
            }
        }
    });
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    for (i, (name, _)) in phases.iter().enumerate() {
        let mut p50: Vec<Duration> = summary[i].iter().map(|s| s.0).collect();
        let mut p99: Vec<Duration> = summary[i].iter().map(|s| s.1).collect();
        let mut p999: Vec<Duration> = summary[i].iter().map(|s| s.2).collect();
        println!(
            "median over rounds, {name:<10}: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
            median(&mut p50),
            median(&mut p99),
            median(&mut p999)
        );
    }
    server_rt.block_on(proxy.shutdown());
    drop(apps);
}
