//! Device ID extraction cost per request, for each kind of key source.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hyper::header::{HeaderMap, HeaderValue, COOKIE};
use hyper::Uri;
use sticky_proxy::routing::key::KeyExtractor;

fn extractor(sources: &[&str]) -> KeyExtractor {
    KeyExtractor::new(sources.iter().map(|s| s.parse().expect("valid source")).collect())
}

fn bench_extraction(c: &mut Criterion) {
    let all = extractor(&["header:x-device-id", "path:/devices/{id}/*", "query:device_id", "cookie:device_id"]);
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let plain: Uri = "/api/v1/status".parse().expect("uri");

    let mut group = c.benchmark_group("key_extraction");
    let mut with_header = headers.clone();
    with_header.insert("x-device-id", HeaderValue::from_static("dev-6f1c2a9e4b7d3c05"));
    group.bench_function("header (first source)", |b| {
        b.iter(|| black_box(all.extract(black_box(&plain), &with_header)))
    });

    let path: Uri = "/devices/dev-6f1c2a9e4b7d3c05/messages".parse().expect("uri");
    group.bench_function("path", |b| b.iter(|| black_box(all.extract(black_box(&path), &headers))));

    let encoded: Uri = "/devices/dev%206f1c2a9e4b7d3c05/messages".parse().expect("uri");
    group.bench_function("path, percent-decoded", |b| b.iter(|| black_box(all.extract(black_box(&encoded), &headers))));

    let query: Uri = "/api/v1/push?lang=en&device_id=dev-6f1c2a9e4b7d3c05&x=1".parse().expect("uri");
    group.bench_function("query", |b| b.iter(|| black_box(all.extract(black_box(&query), &headers))));

    let mut with_cookie = headers.clone();
    with_cookie.insert(
        COOKIE,
        HeaderValue::from_static("theme=dark; session=abcdef0123456789; device_id=dev-6f1c2a9e4b7d3c05"),
    );
    group
        .bench_function("cookie (last source)", |b| b.iter(|| black_box(all.extract(black_box(&plain), &with_cookie))));

    group
        .bench_function("missing (all four tried)", |b| b.iter(|| black_box(all.extract(black_box(&plain), &headers))));
    group.finish();
}

criterion_group!(benches, bench_extraction);
criterion_main!(benches);
