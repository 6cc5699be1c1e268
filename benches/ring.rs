//! Ring build and lookup costs. Run with e.g.
//! `cargo bench --bench ring -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sticky_proxy::routing::ring::{Member, Ring, DEFAULT_REPLICAS};

/// Number of pre-generated device IDs cycled through by lookups (a power of 2).
const KEYS: usize = 1 << 16;

/// Deterministic UUID-shaped device IDs.
fn device_ids(n: usize) -> Vec<String> {
    sticky_proxy::tools::sample::uuids(0x5EED, n)
}

fn backend_ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("app-{i}")).collect()
}

fn ring_of(ids: &[String]) -> Ring {
    let members: Vec<Member> = ids.iter().map(|id| Member { identity: id.as_bytes(), weight: 1 }).collect();
    Ring::new(&members, DEFAULT_REPLICAS)
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_build");
    g.sample_size(10);
    for n in [10, 1000] {
        let ids = backend_ids(n);
        let members: Vec<Member> = ids.iter().map(|id| Member { identity: id.as_bytes(), weight: 1 }).collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &members, |b, m| {
            b.iter(|| Ring::new(black_box(m), DEFAULT_REPLICAS))
        });
    }
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let keys = device_ids(KEYS);
    let mut g = c.benchmark_group("ring_owner");
    for n in [3, 100, 1000] {
        let ring = ring_of(&backend_ids(n));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (KEYS - 1);
                ring.owner(black_box(keys[i].as_bytes()))
            })
        });
    }
    // Each key depends on the previous owner, so lookups cannot overlap:
    // this is the latency of one lookup rather than throughput.
    let ring = ring_of(&backend_ids(1000));
    g.bench_function("1000_serial", |b| {
        let mut i = 0;
        b.iter(|| {
            let owner = ring.owner(black_box(keys[i].as_bytes())).unwrap_or(0);
            i = (i + 1 + (owner & 1)) & (KEYS - 1);
            owner
        })
    });
    g.finish();
}

fn walk(c: &mut Criterion) {
    let keys = device_ids(KEYS);
    let ring = ring_of(&backend_ids(1000));
    c.bench_function("ring_walk_first3/1000", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & (KEYS - 1);
            let mut w = ring.walk(black_box(keys[i].as_bytes()));
            (w.next(), w.next(), w.next())
        })
    });
}

criterion_group!(benches, build, lookup, walk);
criterion_main!(benches);
