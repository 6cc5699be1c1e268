//! What a hot reload costs: a 1,000-backend config file read, validated,
//! turned into a new routing snapshot (ring included) and swapped in.
//!
//! `cargo bench --bench reload`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use sticky_proxy::config::Config;
use sticky_proxy::metrics::Metrics;
use sticky_proxy::ops::reload::{Reloader, Trigger};
use sticky_proxy::routing::RoutingTable;

/// A config with `n` backends (ids app-1..app-n on loopback ports).
fn config_text(n: usize) -> String {
    variant(n, "", 20000)
}

/// [`config_text`] with the last backend's id suffixed by `last_id` and
/// every port moved to `port_base + i`.
fn variant(n: usize, last_id: &str, port_base: usize) -> String {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routing]\nkey = [\"header:x-device-id\"]\n",
    );
    for i in 1..=n {
        let suffix = if i == n { last_id } else { "" };
        text.push_str(&format!(
            "\n[[backends]]\nid = \"app-{i}{suffix}\"\naddress = \"127.0.0.1:{}\"\nweight = 1\n",
            port_base + i
        ));
    }
    text
}

fn bench_reload(c: &mut Criterion) {
    let mut group = c.benchmark_group("reload");
    group.sample_size(20);
    for n in [10, 1000] {
        let text = config_text(n);
        group.bench_function(format!("parse+validate/{n}"), |b| b.iter(|| black_box(Config::parse(black_box(&text)))));

        let config = Arc::new(Config::parse(&text).expect("valid"));
        let metrics = Metrics::new();
        group.bench_function(format!("build snapshot/{n}"), |b| {
            b.iter(|| black_box(RoutingTable::new(Arc::clone(&config), 2, &metrics)))
        });

        // The whole reload, as POST /reload runs it, from a file on disk
        // that alternates between two versions: one backend renamed (the
        // ring is rebuilt), or every address moved (the ring is kept).
        let dir = std::env::temp_dir().join(format!("sticky-proxy-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cases =
            [("full reload", variant(n, "-renamed", 20000)), ("full reload, addresses only", variant(n, "", 30000))];
        for (name, other) in cases {
            let path = dir.join(format!("reload-{n}.toml"));
            std::fs::write(&path, &text).expect("write config");
            let metrics = Arc::new(Metrics::new());
            let router = RoutingTable::new(Arc::clone(&config), 1, &metrics).into_router();
            let reloader = Reloader::new(Some(path.clone()), router, metrics);
            let versions = [text.clone(), other];
            let mut flip = 0;
            group.bench_function(format!("{name}/{n}"), |b| {
                b.iter_batched(
                    || {
                        flip ^= 1;
                        std::fs::write(&path, &versions[flip]).expect("write config");
                    },
                    |()| black_box(reloader.reload(Trigger::Admin).expect("reload")),
                    criterion::BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_reload);
criterion_main!(benches);
