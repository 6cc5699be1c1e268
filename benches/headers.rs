//! Per-request header work of the proxy: hop-by-hop stripping and the
//! X-Forwarded-* headers, on the headers a typical client sends.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hyper::header::{HeaderMap, HeaderValue};
use sticky_proxy::http::headers::{add_forwarded_headers, strip_hop_by_hop, Client};

fn parsed_like_hyper() -> HeaderMap {
    // hyper reserves exactly the parsed count.
    let mut h = HeaderMap::new();
    h.reserve(2);
    h.insert("host", HeaderValue::from_static("127.0.0.1:18080"));
    h.insert("x-device-id", HeaderValue::from_static("dev-4242"));
    h
}

fn headers(c: &mut Criterion) {
    let client = Client::new("127.0.0.1:40000".parse().expect("addr"), "http");
    let template = parsed_like_hyper();
    c.bench_function("headers/clone (baseline)", |b| b.iter(|| black_box(template.clone())));
    c.bench_function("headers/strip_hop_by_hop", |b| {
        b.iter(|| {
            let mut h = template.clone();
            strip_hop_by_hop(&mut h);
            h
        })
    });
    c.bench_function("headers/add_forwarded_headers", |b| {
        b.iter(|| {
            let mut h = template.clone();
            add_forwarded_headers(&mut h, black_box(&client));
            h
        })
    });
    let mut response = HeaderMap::new();
    for (n, v) in [
        ("server", "nginx"),
        ("date", "Tue, 24 Nov 2026 17:00:00 GMT"),
        ("content-type", "text/plain"),
        ("content-length", "3"),
        ("connection", "keep-alive"),
    ] {
        response.insert(n, HeaderValue::from_static(v));
    }
    c.bench_function("headers/strip_hop_by_hop (response with Connection)", |b| {
        b.iter(|| {
            let mut h = response.clone();
            strip_hop_by_hop(&mut h);
            h
        })
    });
}

criterion_group!(benches, headers);
criterion_main!(benches);
