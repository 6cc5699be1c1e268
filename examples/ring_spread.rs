//! Measures how evenly the ring spreads device IDs, to choose
//! `ring::DEFAULT_REPLICAS`. Run with:
//!
//! ```text
//! cargo run --release --example ring_spread [SEEDS]
//! ```
//!
//! For each naming scheme of 10 equal backends and each candidate `replicas`
//! it prints the ring's own imbalance (max and min share × 10) and, over
//! SEEDS (default 50) sets of 10,000 random device IDs, the busiest
//! backend's count / mean: median, worst, and how many seeds exceeded 1.10.

use sticky_proxy::routing::ring::{Member, Ring};
use sticky_proxy::tools::sample::{SplitMix64, Uuids};

const BACKENDS: usize = 10;
const KEYS: usize = 10_000;
const CANDIDATES: &[u32] = &[160, 256, 512, 768, 1024, 1536, 2048, 4096];

/// Busiest count / mean count for `keys` placed by `place`.
fn max_over_mean(keys: &[String], place: impl Fn(&[u8]) -> usize) -> f64 {
    let mut counts = [0usize; BACKENDS];
    for k in keys {
        counts[place(k.as_bytes())] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0);
    max as f64 * BACKENDS as f64 / keys.len() as f64
}

fn key_sets(seeds: u64) -> Vec<Vec<String>> {
    (0..seeds)
        .map(|s| {
            let mut rng = SplitMix64::new(0xD15E_A5E0 + s);
            (0..KEYS).map(|_| rng.uuid()).collect()
        })
        .collect()
}

fn schemes() -> Vec<(String, Vec<Vec<u8>>)> {
    let mut out = vec![
        ("app-N".to_string(), (1..=BACKENDS).map(|i| format!("app-{i}").into_bytes()).collect()),
        (
            "backend-a..j".to_string(),
            (b'a'..).take(BACKENDS).map(|c| format!("backend-{}", c as char).into_bytes()).collect(),
        ),
        ("10.0.0.N:8080".to_string(), (1..=BACKENDS).map(|i| format!("10.0.0.{i}:8080").into_bytes()).collect()),
        (
            "10.0.0.N\\08080 (nginx)".to_string(),
            (1..=BACKENDS).map(|i| format!("10.0.0.{i}\08080").into_bytes()).collect(),
        ),
    ];
    let mut rng = SplitMix64::new(42);
    for n in 1..=3 {
        let ids = (0..BACKENDS).map(|_| rng.uuid().into_bytes()).collect();
        out.push((format!("uuid set {n}"), ids));
    }
    out
}

fn ring_of(ids: &[Vec<u8>], replicas: u32) -> Ring {
    let members: Vec<Member> = ids.iter().map(|id| Member { identity: id, weight: 1 }).collect();
    Ring::new(&members, replicas)
}

fn max_min_share(ring: &Ring) -> (f64, f64) {
    let shares = ring.shares();
    let max = shares.iter().copied().fold(0.0, f64::max);
    let min = shares.iter().copied().fold(1.0, f64::min);
    (max * BACKENDS as f64, min * BACKENDS as f64)
}

fn main() {
    let seeds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    let keys = key_sets(seeds);

    // The floor: a perfect split of the hash space into 10 equal ranges.
    let mut floor: Vec<f64> = keys
        .iter()
        .map(|ks| max_over_mean(ks, |k| ((u64::from(Ring::hash_key(k)) * BACKENDS as u64) >> 32) as usize))
        .collect();
    floor.sort_by(f64::total_cmp);
    println!(
        "perfect split, {seeds} seeds x {KEYS} keys: max/mean median {:.3} worst {:.3} >1.10: {}",
        floor[floor.len() / 2],
        floor[floor.len() - 1],
        floor.iter().filter(|&&x| x > 1.10).count()
    );
    println!();
    println!(
        "{:<24} {:>8} {:>9} {:>9} {:>8} {:>8} {:>6}",
        "scheme", "replicas", "ring max", "ring min", "median", "worst", ">1.10"
    );

    for (name, ids) in schemes() {
        for &replicas in CANDIDATES {
            let ring = ring_of(&ids, replicas);
            let (rmax, rmin) = max_min_share(&ring);
            let mut m: Vec<f64> = keys.iter().map(|ks| max_over_mean(ks, |k| ring.owner(k).unwrap_or(0))).collect();
            m.sort_by(f64::total_cmp);
            println!(
                "{:<24} {:>8} {:>9.3} {:>9.3} {:>8.3} {:>8.3} {:>6}",
                name,
                replicas,
                rmax,
                rmin,
                m[m.len() / 2],
                m[m.len() - 1],
                m.iter().filter(|&&x| x > 1.10).count()
            );
        }
        println!();
    }

    // Robustness: the ring's own max share over many random name sets.
    println!("ring max share x10 over 200 random 10-uuid name sets:");
    println!("{:>8} {:>8} {:>8} {:>8} {:>10}", "replicas", "median", "p95", "worst", ">=1.05");
    for &replicas in CANDIDATES {
        let mut rng = SplitMix64::new(7);
        let mut maxes: Vec<f64> = (0..200)
            .map(|_| {
                let ids: Vec<Vec<u8>> = (0..BACKENDS).map(|_| rng.uuid().into_bytes()).collect();
                max_min_share(&ring_of(&ids, replicas)).0
            })
            .collect();
        maxes.sort_by(f64::total_cmp);
        println!(
            "{:>8} {:>8.3} {:>8.3} {:>8.3} {:>10}",
            replicas,
            maxes[100],
            maxes[190],
            maxes[199],
            maxes.iter().filter(|&&x| x >= 1.05).count()
        );
    }
}
