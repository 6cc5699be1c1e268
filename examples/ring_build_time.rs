//! Times `Ring::new` without criterion: the median of RUNS builds of a ring
//! of BACKENDS equal backends at `DEFAULT_REPLICAS`, and for comparison the
//! point chain computed the first way (a crc32fast `Hasher` cloned and fed
//! 4 bytes per point).
//!
//! ```text
//! cargo run --release --example ring_build_time [BACKENDS] [RUNS]
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use sticky_proxy::routing::ring::{Member, Ring, DEFAULT_REPLICAS};

fn median(f: impl FnMut(usize) -> Duration, runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs).map(f).collect();
    times.sort();
    times[runs / 2]
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let backends = args.next().and_then(Result::ok).unwrap_or(1000);
    let runs = args.next().and_then(Result::ok).unwrap_or(21).max(1);
    let ids: Vec<String> = (1..=backends).map(|i| format!("app-{i}")).collect();
    let members: Vec<Member> = ids.iter().map(|id| Member { identity: id.as_bytes(), weight: 1 }).collect();

    let build = median(
        |_| {
            let t = Instant::now();
            black_box(Ring::new(black_box(&members), DEFAULT_REPLICAS));
            t.elapsed()
        },
        runs,
    );
    println!("Ring::new, {backends} backends x {DEFAULT_REPLICAS}: median {build:?}");

    let chain = median(
        |_| {
            let t = Instant::now();
            let mut acc = 0u32;
            for m in &members {
                let mut base = crc32fast::Hasher::new();
                base.update(m.identity);
                let mut prev = 0u32;
                for _ in 0..DEFAULT_REPLICAS {
                    let mut h = base.clone();
                    h.update(&prev.to_le_bytes());
                    prev = h.finalize();
                    acc ^= prev;
                }
            }
            black_box(acc);
            t.elapsed()
        },
        runs,
    );
    println!("  the same points via crc32fast clone + update: median {chain:?}");
}
