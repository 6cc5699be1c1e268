//! The whole routing decision a request pays for: load the live snapshot,
//! extract the device ID, look its owner up on the ring (and check health).
//! Target: under 150 ns at 1,000 backends. Run with e.g.
//! `cargo bench --bench route -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::Uri;
use sticky_proxy::config::Config;
use sticky_proxy::metrics::Metrics;
use sticky_proxy::routing::{Decision, RoutingTable};

/// Requests cycled through (a power of 2), each with its own device ID.
const REQUESTS: usize = 1 << 14;

fn config(backends: usize) -> Config {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routing]\n\
         key = [\"header:x-device-id\", \"path:/devices/{id}/*\", \"query:device_id\", \"cookie:device_id\"]\n",
    );
    for i in 0..backends {
        text.push_str(&format!(
            "[[backends]]\nid = \"app-{i}\"\naddress = \"10.0.{}.{}:8080\"\n",
            i / 250,
            i % 250 + 1
        ));
    }
    Config::parse(&text).expect("valid config")
}

/// Realistic request heads: a few common headers plus the device ID.
fn requests(by_header: bool) -> Vec<(Uri, HeaderMap)> {
    sticky_proxy::tools::sample::uuids(0x5EED, REQUESTS)
        .into_iter()
        .map(|id| {
            let mut headers = HeaderMap::new();
            headers.insert("host", HeaderValue::from_static("api.example.com"));
            headers.insert("user-agent", HeaderValue::from_static("okhttp/4.12.0"));
            headers.insert("accept", HeaderValue::from_static("*/*"));
            if by_header {
                headers.insert("x-device-id", HeaderValue::from_str(&id).expect("header value"));
                ("/api/v1/status".parse().expect("uri"), headers)
            } else {
                (format!("/devices/{id}/messages").parse().expect("uri"), headers)
            }
        })
        .collect()
}

fn decide(c: &mut Criterion) {
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("route_decide");
    for backends in [3, 1000] {
        let router = RoutingTable::new(Arc::new(config(backends)), 1, &metrics).into_router();
        for (name, by_header) in [("header", true), ("path", false)] {
            let reqs = requests(by_header);
            g.bench_function(BenchmarkId::new(name, backends), |b| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) & (REQUESTS - 1);
                    let (uri, headers) = &reqs[i];
                    let table = router.load();
                    match table.decide(black_box(uri), black_box(headers), |_| None) {
                        Decision::Device { first, .. } => first.backend.weight,
                        _ => 0,
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
