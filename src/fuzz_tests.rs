//! Property-based fuzz tests, run by `cargo test` on stable Rust: every
//! input is Ok or an error, never a panic, and is handled within a time
//! bound. `cargo test --lib fuzz` runs only these.
//!
//! No fuzzing crate: a fixed-seed splitmix64 drives structure-aware
//! generators that mutate a corpus of valid inputs (configs, nginx configs,
//! WebSocket frames, header maps) with byte flips, inserted tokens
//! (quotes, brackets, `%zz`, `..`, non-ASCII, NUL, huge numbers, deep
//! nesting, long runs), truncation and duplication, plus purely random
//! input. Each case has its own generator, derived from the seed, the
//! target and the case index, so that one case replays alone:
//!
//! - `FUZZ_SEED=0x1234` (or decimal, or `random`): the seed;
//! - `FUZZ_CASES=100000`: cases per target (each has its own default);
//! - `FUZZ_CASE=17`: only that case (what a failure prints);
//! - `FUZZ_CASE_MS=1000`: the time bound per case.
//!
//! Targets: config parsing and validation, key extraction and path
//! patterns, the WebSocket frame tracker, header rewriting, import-nginx.

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Uri, Version};

use crate::config::Config;
use crate::http::headers;
use crate::routing::key::{percent_decode, KeyExtractor, KeySource, PathPattern};
use crate::tools::nginx_import;
use crate::tunnel::wsframe::FrameTracker;
use crate::util::rng::SplitMix64;

// ---- the runner ---------------------------------------------------------------

const DEFAULT_SEED: u64 = 0x5EED_F022_2024_0001;

struct Settings {
    seed: u64,
    cases: Option<usize>,
    only: Option<usize>,
    bound: Duration,
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

fn settings() -> Settings {
    let seed = match std::env::var("FUZZ_SEED").ok().as_deref().map(str::trim) {
        Some("random") => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            SplitMix64::new(now.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64()
        }
        _ => env_number("FUZZ_SEED").unwrap_or(DEFAULT_SEED),
    };
    Settings {
        seed,
        cases: env_number("FUZZ_CASES").map(|n| n as usize),
        only: env_number("FUZZ_CASE").map(|n| n as usize),
        bound: Duration::from_millis(env_number("FUZZ_CASE_MS").unwrap_or(1000)),
    }
}

/// FNV-1a, to give each target its own stream from one seed.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The generator of one case: a function of the seed, target and index.
fn case_gen(seed: u64, target: &str, case: usize) -> Gen {
    let mut mix = SplitMix64::new(seed ^ fnv(target) ^ (case as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    Gen(SplitMix64::new(mix.next_u64()))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// At most `max` characters of an input's debug form.
fn shown(input: &impl Debug, max: usize) -> String {
    let text = format!("{input:#?}");
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}… ({} more bytes)", &text[..at], text.len() - at),
        None => text,
    }
}

/// Runs `check` on `cases` inputs from `generate`; fails on the first
/// panic or slow case, naming the seed, the case and the input.
fn fuzz<I: Debug>(target: &str, default_cases: usize, generate: impl Fn(&mut Gen) -> I, check: impl Fn(&I)) {
    let s = settings();
    let cases = s.cases.unwrap_or(default_cases);
    let replay = format!("FUZZ_SEED={:#x} cargo test --lib fuzz_{target}", s.seed);
    println!("fuzz {target}: {cases} cases, seed {:#x} (replay: {replay}; more: FUZZ_CASES=n)", s.seed);
    let started = Instant::now();
    let range = match s.only {
        Some(i) => i..i + 1,
        None => 0..cases,
    };
    let mut slowest = (Duration::ZERO, 0);
    for case in range {
        let mut g = case_gen(s.seed, target, case);
        let input = generate(&mut g);
        if s.only.is_some() {
            println!("fuzz {target}: case {case} input: {}", shown(&input, 100_000));
        }
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = start.elapsed();
        slowest = slowest.max((took, case));
        let failure = match outcome {
            Err(payload) => Some(format!("panicked: {}", panic_message(payload.as_ref()))),
            Ok(()) if took > s.bound => Some(format!("took {took:?}, more than the bound of {:?}", s.bound)),
            Ok(()) => None,
        };
        if let Some(failure) = failure {
            panic!(
                "fuzz {target}: case {case} {failure}\nreplay: FUZZ_CASE={case} {replay} -- --nocapture\ninput: {}",
                shown(&input, 8000)
            );
        }
    }
    let (took, case) = slowest;
    println!("fuzz {target}: done in {:?}; slowest: case {case}, {took:?}", started.elapsed());
}

// ---- generating -----------------------------------------------------------------

struct Gen(SplitMix64);

/// Tokens that tend to break parsers, as bytes (some not UTF-8).
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"'",
    b"[",
    b"]",
    b"{",
    b"}",
    b"(",
    b"*",
    b"?",
    b"..",
    b"/../",
    b"%",
    b"%zz",
    b"%2e",
    b"%2E%2e",
    b"%00",
    b"%ff",
    b"%25",
    b"\xc3\xa9",         // é
    b"\xf0\x9f\x92\xa5", // a 4-byte character
    b"\xe2\x80\xae",     // right-to-left override
    b"\xef\xbb\xbf",     // BOM
    b"\xff",
    b"\xc3",
    b"\x80",
    b"\0",
    b"\x7f",
    b"\n",
    b"\r\n",
    b"\r",
    b"\t",
    b" ",
    b"=",
    b",",
    b";",
    b"#",
    b"\\",
    b"\\u",
    b"\\x",
    b":",
    b"/",
    b"{id}",
    b"$",
    b"${",
    b"&",
    b"+",
    b"@",
    b"0",
    b"-1",
    b"-0.0",
    b"99999999999999999999999999",
    b"18446744073709551616",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"4294967296",
    b"65536",
    b"1e308",
    b"1.5",
    b"nan",
    b"inf",
    b"0x10",
    b"\"\"\"",
    b"'''",
    b"[[",
    b"]]",
    b"{{{{",
    b"}}}}",
    b"0s",
    b"1ms",
    b"99999999999h",
    b"unix:",
    b"http://",
    b"[::]",
    b"::1",
    b"true",
    b"localhost",
];

impl Gen {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }

    /// True one time in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A number below `big` one time in `one_in`, else below `small`.
    fn upto(&mut self, one_in: usize, big: usize, small: usize) -> usize {
        let n = if self.one_in(one_in) { big } else { small };
        self.below(n)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    /// Up to `max` random bytes, often from a small alphabet.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        match self.below(3) {
            0 => (0..len).map(|_| self.byte()).collect(),
            1 => (0..len).map(|_| self.byte() % 0x60 + 0x20).collect(),
            _ => {
                let mut out = Vec::new();
                while out.len() < len {
                    out.extend_from_slice(self.pick(TOKENS));
                }
                out
            }
        }
    }

    /// A position in `0..=len`, at a line start half the time.
    fn position(&mut self, data: &[u8]) -> usize {
        let at = self.below(data.len() + 1);
        if self.one_in(2) {
            data[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1)
        } else {
            at
        }
    }

    /// The line containing a random byte: its start and end (past '\n').
    fn line(&mut self, data: &[u8]) -> (usize, usize) {
        let at = self.below(data.len().max(1)).min(data.len());
        let start = data[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let end = data[at..].iter().position(|&b| b == b'\n').map_or(data.len(), |p| at + p + 1);
        (start, end)
    }

    /// Applies a few random mutations to `data`; `extra` are snippets that
    /// fit the format (whole lines, or other corpus entries to splice in).
    fn mutate(&mut self, data: &mut Vec<u8>, extra: &[&[u8]]) {
        let ops = if self.one_in(8) { 1 + self.below(24) } else { 1 + self.below(4) };
        for _ in 0..ops {
            let len = data.len();
            match self.below(14) {
                0 if len > 0 => {
                    let at = self.below(len);
                    data[at] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let at = self.below(len);
                    data[at] = self.byte();
                }
                2 | 3 => {
                    let at = self.position(data);
                    let token = self.pick(TOKENS);
                    data.splice(at..at, token.iter().copied());
                }
                4 if len > 0 => {
                    let at = self.below(len);
                    let n = 1 + self.upto(4, len - at, 16.min(len - at));
                    data.drain(at..at + n);
                }
                5 => data.truncate(self.below(len + 1)),
                6 if len > 0 => {
                    let a = self.below(len);
                    let b = a + 1 + self.below(len - a);
                    let copy = data[a..b].to_vec();
                    let at = self.position(data);
                    data.splice(at..at, copy);
                }
                7 if !extra.is_empty() => {
                    let other = self.pick(extra);
                    let (a, b) = if self.one_in(2) || other.is_empty() {
                        (0, other.len())
                    } else {
                        let a = self.below(other.len());
                        (a, a + 1 + self.below(other.len() - a))
                    };
                    let at = self.position(data);
                    data.splice(at..at, other[a..b].iter().copied());
                }
                8 => {
                    // Deep nesting, optionally closed again.
                    let pairs: [(&[u8], &[u8]); 5] =
                        [(b"{", b"}"), (b"[", b"]"), (b"a = [", b"]"), (b"x = {", b"}"), (b"\"", b"\"")];
                    let (open, close) = self.pick(&pairs);
                    let depth = 1 + self.upto(4, 3000, 100);
                    let at = self.position(data);
                    let mut nest = open.repeat(depth);
                    if self.one_in(2) {
                        nest.extend(close.repeat(depth));
                    }
                    data.splice(at..at, nest);
                }
                9 => {
                    // A long run of one token.
                    let token = if self.one_in(2) { &b"a"[..] } else { self.pick(TOKENS) };
                    let n = 1 + self.upto(8, 8000, 300);
                    let at = self.position(data);
                    data.splice(at..at, token.repeat(n));
                }
                10 if len > 0 => {
                    // A number made huge, negative or odd.
                    if let Some(start) =
                        (0..len).map(|i| (self.below(len) + i) % len).find(|&i| data[i].is_ascii_digit())
                    {
                        let end = data[start..].iter().position(|b| !b.is_ascii_digit()).map_or(len, |p| start + p);
                        let number: &[u8] = self.pick::<&[u8]>(&[
                            b"0",
                            b"-1",
                            b"1",
                            b"65535",
                            b"65536",
                            b"4294967295",
                            b"4294967296",
                            b"9223372036854775807",
                            b"99999999999999999999999",
                            b"1e400",
                            b"0.000001",
                            b"007",
                        ]);
                        data.splice(start..end, number.iter().copied());
                    }
                }
                11 if len > 0 => {
                    // A line repeated.
                    let (a, b) = self.line(data);
                    let line = data[a..b].to_vec();
                    let n = 1 + self.upto(8, 200, 4);
                    data.splice(b..b, line.repeat(n));
                }
                12 if len > 0 => {
                    let (a, b) = self.line(data);
                    data.drain(a..b);
                }
                13 if len > 0 => {
                    // Two lines swapped.
                    let (a1, b1) = self.line(data);
                    let (a2, b2) = self.line(data);
                    if b1 <= a2 {
                        let second = data[a2..b2].to_vec();
                        let first = data[a1..b1].to_vec();
                        data.splice(a2..b2, first);
                        data.splice(a1..b1, second);
                    }
                }
                _ => {
                    let at = self.position(data);
                    let noise = self.bytes(12);
                    data.splice(at..at, noise);
                }
            }
        }
        data.truncate(64 << 10);
    }

    /// A mutated corpus entry, or (one time in `random_in`) random bytes.
    fn input(&mut self, corpus: &[&str], extra: &[&[u8]], random_in: usize) -> Vec<u8> {
        if self.one_in(random_in) {
            return self.bytes(400);
        }
        let mut data = self.pick(corpus).as_bytes().to_vec();
        // A few inputs are kept as they are: the corpus itself must pass.
        if !self.one_in(16) {
            let mut all: Vec<&[u8]> = corpus.iter().map(|c| c.as_bytes()).collect();
            all.extend_from_slice(extra);
            self.mutate(&mut data, &all);
        }
        data
    }
}

/// Bytes shown as text in a failure report (invalid UTF-8 as `\xNN`).
struct Text(Vec<u8>);

impl Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

/// A directory under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sticky-proxy-fuzz-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- 1. config parsing and validation --------------------------------------------

const CONFIG_EXAMPLE: &str = include_str!("../config.toml.example");

const CONFIG_CORPUS: &[&str] = &[
    CONFIG_EXAMPLE,
    r#"
[server]
listen = "127.0.0.1:8080"

[routing]
key = ["header:x-device-id", "path:/devices/{id}/*"]

[[backends]]
id = "app-1"
address = "127.0.0.1:9001"

[[backends]]
id = "app-2"
address = "app-2.internal:9002"
weight = 2
"#,
    r#"
[server]
listen = "[::1]:8080"
shutdown_delay = "0s"
shutdown_grace = "1.5s"
workers = 2
h2c = true
access_log = false

[admin]
listen = "0.0.0.0:9901"
token = "s3cret"
insecure = false

[routing]
hash = "nginx"
key = ["header:x-device-id", "query:device_id", "cookie:sid"]
missing_key = "spread"
rebalance = "keep"
rebalance_rate = 0.5
drain_timeout = "1h"

[routing.not_here]
status = [409, 421, 503]
retry_for = "3s"
candidates = 3
max_held = 1000

[reload]
watch = false
interval = "500ms"

[health]
path = "/healthz"
interval = "2s"
timeout = "1s"
fall = 3
rise = 2
fail_timeout = "10s"
observe = "responses"

[[backends]]
id = "10.0.0.1:80"
address = "10.0.0.1"
weight = 3
health = { fall = 2, rise = 1, fail_timeout = "10s", observe = "connect" }
state = "draining"

[[backends]]
id = "fd00::6:8080"
address = "[fd00::6]:8080"
state = "active"
"#,
    r#"
[server]
listen = "0.0.0.0:8080"
header_read_timeout = "30s"

[server.tls]
listen = "0.0.0.0:8443"
cert = "cert.pem"
key = "key.pem"
handshake_timeout = "5s"

[[server.tls.certificates]]
cert = "b.pem"
key = "b.key"

[routing]
key = ["path:/v1/{id}/ws/*"]
replicas = 200

[upstream]
connect_timeout = "3s"
response_timeout = "60s"
pool_max_idle = 0
pool_idle_timeout = "90s"
tls_ca = "ca.pem"

[[backends]]
id = "a"
address = "app-1.internal:8443"
tls = true
tls_server_name = "app-1"
"#,
    r#"
[server]
listen = "127.0.0.1:8080"
[admin]
token_file = "token"
[routing]
key = ["cookie:device_id"]
[[backends]]
id = "b"
address = "127.0.0.1:9001"
tls = false
[[backends]]
id = "c"
address = "localhost:9002"
tls = true
tls_ca = "ca.pem"
"#,
];

/// Lines that fit a config: every field, with values good and bad.
fn config_line(g: &mut Gen) -> Vec<u8> {
    const SECTIONS: &[&str] = &[
        "[server]",
        "[server.tls]",
        "[[server.tls.certificates]]",
        "[admin]",
        "[routing]",
        "[routing.not_here]",
        "[upstream]",
        "[reload]",
        "[health]",
        "[[backends]]",
        "[backends.health]",
    ];
    const FIELDS: &[&str] = &[
        "listen",
        "shutdown_grace",
        "shutdown_delay",
        "header_read_timeout",
        "workers",
        "access_log",
        "log_format",
        "h2c",
        "cert",
        "key",
        "handshake_timeout",
        "token",
        "token_file",
        "insecure",
        "missing_key",
        "hash",
        "replicas",
        "drain_timeout",
        "rebalance",
        "rebalance_rate",
        "status",
        "retry_for",
        "candidates",
        "max_held",
        "connect_timeout",
        "response_timeout",
        "pool_max_idle",
        "pool_idle_timeout",
        "tls_ca",
        "watch",
        "interval",
        "id",
        "address",
        "weight",
        "health",
        "state",
        "tls",
        "tls_server_name",
        "path",
        "timeout",
        "fall",
        "rise",
        "fail_timeout",
        "observe",
    ];
    const VALUES: &[&str] = &[
        "\"127.0.0.1:0\"",
        "\"0.0.0.0:8080\"",
        "\"[::]:9901\"",
        "\"localhost:80\"",
        "\"app-9.internal:9009\"",
        "\"[fd00::1]\"",
        "\"unix:/run/x.sock\"",
        "\"http://a:1/\"",
        "\"a@b:1\"",
        "\"10.0.0.1:0\"",
        "\"0s\"",
        "\"1ms\"",
        "\"1.5s\"",
        "\"5m\"",
        "\"8760h\"",
        "\"8761h\"",
        "\"1e9h\"",
        "\"99999999999999999999h\"",
        "\".s\"",
        "\"3 parsecs\"",
        "0",
        "1",
        "-1",
        "100",
        "101",
        "100000",
        "100001",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "0.001",
        "1e308",
        "nan",
        "inf",
        "-inf",
        "true",
        "false",
        "[]",
        "[409]",
        "[200, 600, -1, 70000]",
        "[\"header:x\", \"path:/{id}\", \"query:q\", \"cookie:c\"]",
        "[\"path:/a/{id}/{id}\"]",
        "[\"header:\"]",
        "[\"nope:x\"]",
        "\"reject\"",
        "\"spread\"",
        "\"nginx\"",
        "\"ring\"",
        "\"keep\"",
        "\"migrate\"",
        "\"connect\"",
        "\"responses\"",
        "\"draining\"",
        "\"active\"",
        "\"/health\"",
        "\"health\"",
        "{ fall = 0 }",
        "{ rise = 101, interval = \"0s\" }",
        "{}",
        "\"\"",
        "\" \"",
        "\"é\"",
        "\"a\\u0000b\"",
        "\"\\ud800\"",
        "1979-05-27T07:32:00Z",
        "'literal'",
        "\"\"\"multi\nline\"\"\"",
    ];
    let mut line =
        if g.one_in(4) { g.pick(SECTIONS).to_string() } else { format!("{} = {}", g.pick(FIELDS), g.pick(VALUES)) };
    line.push('\n');
    line.into_bytes()
}

#[test]
fn fuzz_config() {
    let scratch = Scratch::new("config");
    let base = scratch.0.clone();
    // A token file and a PEM that is not a certificate, for the paths that read them.
    std::fs::write(base.join("token"), "from-a-file\n").expect("write token");
    std::fs::write(base.join("ca.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .expect("write ca");
    fuzz(
        "config",
        3000,
        |g| {
            let mut data = if g.one_in(3) {
                // Structure-aware: a corpus entry with fields added.
                let mut data = g.pick(CONFIG_CORPUS).as_bytes().to_vec();
                for _ in 0..1 + g.below(6) {
                    let line = config_line(g);
                    let at = g.position(&data);
                    let at = data[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                    data.splice(at..at, line);
                }
                data
            } else {
                let lines: Vec<Vec<u8>> = (0..8).map(|_| config_line(g)).collect();
                let lines: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
                g.input(CONFIG_CORPUS, &lines, 12)
            };
            data.truncate(64 << 10);
            (g.one_in(2), Text(data))
        },
        |(as_file, text)| {
            let result = if *as_file {
                Config::from_file_bytes(&base.join("sticky-proxy.toml"), &text.0)
            } else {
                Config::parse_in(&String::from_utf8_lossy(&text.0), &base)
            };
            match result {
                Ok(config) => {
                    assert!(!config.backends.is_empty(), "a valid config has backends");
                    assert!(!config.routing.keys.is_empty(), "a valid config has key sources");
                    let mut ids: Vec<&str> = config.backends.iter().map(|b| b.id.as_str()).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    assert_eq!(ids.len(), config.backends.len(), "backend ids are unique");
                }
                Err(e) => {
                    // The message is built (and so must not panic either).
                    let _ = e.to_string();
                }
            }
            let _ = crate::config::referenced_files(&String::from_utf8_lossy(&text.0), &base);
        },
    );
}

#[test]
fn fuzz_config_corpus_is_valid() {
    // The corpus entries that should parse do: the mutations start from
    // configs that reach validation's last steps.
    for (i, text) in CONFIG_CORPUS.iter().enumerate().take(3) {
        if let Err(e) = Config::parse(text) {
            panic!("corpus entry {i} does not parse: {e}");
        }
    }
}

// ---- 2. key extraction and path patterns ------------------------------------------

/// Segment text for patterns and paths: plain, encoded, dotted, odd.
const SEGMENTS: &[&str] = &[
    "devices", "d1", "abc", "v1", "ws", "{id}", "*", "", ".", "..", "%2e", "%2E%2e", ".%2e", "a%20b", "%zz", "%", "%4",
    "é", "a+b", "{", "}", "{id", "id}", "**", "a.b", "~", "%2f", "%00", "%ff", ";x", "a=b",
];

/// A random `kind:argument` key source text.
fn key_source_text(g: &mut Gen) -> String {
    let kind = g.pick(&["header", "path", "query", "cookie", "path", " path ", "nope", ""]);
    let arg = match g.below(4) {
        0 => {
            let n = g.below(5);
            let mut p = String::new();
            for _ in 0..n {
                p.push('/');
                p.push_str(g.pick(SEGMENTS));
            }
            if g.one_in(2) {
                p.push_str("/{id}");
            }
            if g.one_in(2) {
                p.push_str("/*");
            }
            p
        }
        1 => {
            g.pick(&["x-device-id", "device_id", "sid", "X-Device-Id", "a b", "a=b", "é", "", " x ", "a:b"]).to_string()
        }
        _ => String::from_utf8_lossy(&g.bytes(16)).into_owned(),
    };
    if g.one_in(10) {
        kind.to_string()
    } else {
        format!("{kind}:{arg}")
    }
}

fn random_uri(g: &mut Gen) -> Option<Uri> {
    let mut text = String::new();
    if g.one_in(6) {
        text.push_str(g.pick(&["http://example.com", "https://a:1", "http://[::1]:8080"]));
    }
    for _ in 0..g.below(6) {
        text.push('/');
        if g.one_in(4) {
            text.push_str(&String::from_utf8_lossy(&g.bytes(6)));
        } else {
            text.push_str(g.pick(SEGMENTS));
        }
    }
    if text.is_empty() || g.one_in(8) {
        text.push('/');
    }
    if g.one_in(2) {
        text.push('?');
        for i in 0..g.below(4) {
            if i > 0 {
                text.push(if g.one_in(6) { ';' } else { '&' });
            }
            text.push_str(g.pick(&["device_id", "Device_ID", "d", "device%5Fid", "", "a+b", "x"]));
            if !g.one_in(5) {
                text.push('=');
            }
            text.push_str(g.pick(SEGMENTS));
        }
    }
    Uri::try_from(text).ok()
}

fn random_value(g: &mut Gen, max: usize) -> Option<HeaderValue> {
    let bytes = match g.below(4) {
        0 => g.bytes(max),
        // obs-text: bytes 0x80-0xFF are allowed in values.
        1 => (0..g.below(max + 1)).map(|_| g.byte() | 0x80).collect(),
        _ => {
            let mut v = Vec::new();
            for _ in 0..g.below(4) {
                v.extend_from_slice(g.pick(&[&b"device_id="[..], b"sid=", b"\"", b"; ", b",", b" ", b"=", b"a%20b"]));
                v.extend_from_slice(g.pick(SEGMENTS).as_bytes());
            }
            v
        }
    };
    HeaderValue::from_bytes(&bytes).ok()
}

#[derive(Debug)]
struct KeyCase {
    sources: Vec<String>,
    nginx: bool,
    uri: Option<Uri>,
    headers: HeaderMap,
    decode: (Text, bool),
    /// A pattern built from plain literals, a path made to match it, and the
    /// id in that path.
    matching: (String, String, String),
}

fn plain_segment(g: &mut Gen) -> String {
    let len = 1 + g.below(6);
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789-_~";
    let s: String = (0..len).map(|_| char::from(g.pick(alphabet))).collect();
    s
}

fn key_case(g: &mut Gen) -> KeyCase {
    let sources = (0..1 + g.below(4)).map(|_| key_source_text(g)).collect();
    let mut headers = HeaderMap::new();
    for _ in 0..g.below(5) {
        let name = g.pick(&["x-device-id", "cookie", "cookie", "x-other", "X-Device-Id"]);
        if let Some(v) = random_value(g, 24) {
            headers.append(HeaderName::from_bytes(name.as_bytes()).expect("a valid name"), v);
        }
    }
    // A pattern of plain literals and a path that matches it.
    let before: Vec<String> = (0..g.below(3)).map(|_| plain_segment(g)).collect();
    let after: Vec<String> = (0..g.below(3)).map(|_| plain_segment(g)).collect();
    let rest = g.one_in(2);
    let id = plain_segment(g);
    let mut pattern = String::new();
    let mut path = String::new();
    for s in &before {
        pattern.push_str(&format!("/{s}"));
        path.push_str(&format!("/{s}"));
    }
    pattern.push_str("/{id}");
    path.push_str(&format!("/{id}"));
    for s in &after {
        pattern.push_str(&format!("/{s}"));
        path.push_str(&format!("/{s}"));
    }
    if rest {
        pattern.push_str("/*");
        for _ in 0..g.below(3) {
            path.push_str(&format!("/{}", plain_segment(g)));
        }
    }
    if g.one_in(2) {
        path.push_str("?q=1");
    }
    KeyCase {
        sources,
        nginx: g.one_in(3),
        uri: random_uri(g),
        headers,
        decode: (Text(g.bytes(24)), g.one_in(2)),
        matching: (pattern, path, id),
    }
}

#[test]
fn fuzz_keys() {
    fuzz("keys", 6000, key_case, |case| {
        let mut parsed = Vec::new();
        for text in &case.sources {
            if let Ok(source) = text.parse::<KeySource>() {
                // What a source prints parses back to the same source.
                let again: KeySource = source.to_string().parse().unwrap_or_else(|e| panic!("{source} reparsed: {e}"));
                assert_eq!(again, source);
                parsed.push(source);
            }
        }
        if !parsed.is_empty() {
            let count = parsed.len();
            let extractor = if case.nginx { KeyExtractor::nginx(parsed) } else { KeyExtractor::new(parsed) };
            let _ = extractor.describe();
            if let Some(uri) = &case.uri {
                if let Some(key) = extractor.extract(uri, &case.headers) {
                    assert!(!key.id.is_empty(), "an extracted key is never empty");
                    assert!(key.source < count, "the source index is one of the sources");
                    let _ = key.display();
                }
            }
        }
        // percent_decode: never longer; the identity without '%' (or '+').
        let (input, plus) = (&case.decode.0 .0, case.decode.1);
        let decoded = percent_decode(input, plus);
        assert!(decoded.len() <= input.len());
        if !input.contains(&b'%') {
            let expected: Vec<u8> = input.iter().map(|&b| if plus && b == b'+' { b' ' } else { b }).collect();
            assert_eq!(decoded.as_ref(), &expected[..]);
        }
        // A path built to match a plain pattern gives its id.
        let (pattern, path, id) = &case.matching;
        let compiled: PathPattern = pattern.parse().unwrap_or_else(|e| panic!("{pattern}: {e}"));
        assert_eq!(&compiled.to_string(), pattern);
        let uri: Uri = path.parse().unwrap_or_else(|e| panic!("{path}: {e}"));
        let extractor = KeyExtractor::new(vec![KeySource::Path(compiled)]);
        let no_headers = HeaderMap::new();
        let key = extractor.extract(&uri, &no_headers);
        assert_eq!(key.map(|k| k.id.into_owned()), Some(id.as_bytes().to_vec()), "{pattern} on {path}");
    });
}

// ---- 3. the WebSocket frame tracker -------------------------------------------------

/// A frame header: FIN, opcode, the length in the given encoding (0: 7-bit
/// if it fits, 1: 16-bit, 2: 64-bit), and a mask.
fn frame_header(fin: bool, opcode: u8, len: u64, encoding: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut h = vec![if fin { 0x80 } else { 0 } | (opcode & 0x0f)];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match encoding {
        0 if len < 126 => h.push(m | len as u8),
        0 | 1 if len <= 0xffff => {
            h.push(m | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(m | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
    }
    if let Some(key) = mask {
        h.extend_from_slice(&key);
    }
    h
}

#[derive(Debug)]
struct FrameCase {
    /// The stream, and where each well-formed frame ends (empty if random).
    stream: Text,
    ends: Vec<usize>,
    /// Read sizes to split the stream by.
    splits: Vec<usize>,
}

fn frame_case(g: &mut Gen) -> FrameCase {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    if g.one_in(4) {
        stream = g.bytes(300);
        if g.one_in(2) {
            // A header that promises a huge payload, and a few bytes of it.
            stream.extend(frame_header(g.one_in(2), 2, u64::MAX - g.below(3) as u64, 2, None));
            stream.extend(g.bytes(20));
        }
    } else {
        for _ in 0..1 + g.below(8) {
            let len = match g.below(10) {
                0 if g.one_in(4) => 0x1_0000 + g.below(5000),
                0..=2 => 126 + g.below(300),
                _ => g.below(126),
            } as u64;
            let mask = g.one_in(2).then(|| [g.byte(), g.byte(), g.byte(), g.byte()]);
            stream.extend(frame_header(g.one_in(2), g.byte(), len, g.below(3), mask));
            // The payload's bytes don't matter: only its length.
            let fill = g.byte();
            stream.extend(std::iter::repeat_n(fill, len as usize));
            ends.push(stream.len());
        }
        if g.one_in(3) {
            // A truncated stream: not at a boundary at the end (unless cut at one).
            stream.truncate(g.below(stream.len() + 1));
            ends.retain(|&e| e <= stream.len());
        }
    }
    let splits = (0..1 + g.below(16))
        .map(|_| if g.one_in(3) { 1 + g.below(4) } else { 1 + g.below(stream.len().max(1)) })
        .collect();
    FrameCase { stream: Text(stream), ends, splits }
}

/// Feeds `stream` in reads of the given sizes (cycled) by `advance_one`,
/// noting where the tracker is at a boundary.
fn boundaries(stream: &[u8], splits: &[usize]) -> (FrameTracker, Vec<usize>) {
    let mut t = FrameTracker::default();
    let mut seen = Vec::new();
    let mut pos = 0;
    for &size in splits.iter().cycle() {
        if pos >= stream.len() {
            break;
        }
        let mut rest = &stream[pos..(pos + size).min(stream.len())];
        while !rest.is_empty() {
            let used = t.advance_one(rest);
            assert!(used > 0 && used <= rest.len(), "advance_one takes 1..={} bytes, took {used}", rest.len());
            pos += used;
            rest = &rest[used..];
            if t.at_boundary() {
                seen.push(pos);
            }
        }
    }
    (t, seen)
}

#[test]
fn fuzz_wsframe() {
    fuzz("wsframe", 3000, frame_case, |case| {
        let stream = &case.stream.0;
        let mut whole = FrameTracker::default();
        whole.advance(stream);
        let mut chunked = FrameTracker::default();
        let mut pos = 0;
        for &size in case.splits.iter().cycle() {
            if pos >= stream.len() {
                break;
            }
            let end = (pos + size).min(stream.len());
            chunked.advance(&stream[pos..end]);
            pos = end;
        }
        // The same state however the stream was split.
        assert_eq!(format!("{whole:?}"), format!("{chunked:?}"));
        let (one, seen) = boundaries(stream, &case.splits);
        // Byte by byte (by 1 to 3 bytes for long streams, to keep it quick).
        let small: &[usize] = if stream.len() <= 8192 { &[1] } else { &[1, 2, 3] };
        let (bytewise, seen_bytewise) = boundaries(stream, small);
        assert_eq!(format!("{one:?}"), format!("{whole:?}"));
        assert_eq!(format!("{bytewise:?}"), format!("{whole:?}"));
        assert_eq!(seen, seen_bytewise, "boundaries don't depend on read sizes");
        if !case.ends.is_empty() {
            // Well-formed frames: a boundary exactly after each, and only there.
            let expected: Vec<usize> = case.ends.clone();
            assert_eq!(seen, expected);
            assert_eq!(whole.at_boundary(), case.ends.last() == Some(&stream.len()));
        }
    });
}

// ---- 4. header rewriting ---------------------------------------------------------------

/// The headers `strip_hop_by_hop` documents as removed.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

const HEADER_NAMES: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
    "cookie",
    "trailer",
    "x-device-id",
    "x-custom",
    "Content-Type",
];

#[derive(Debug)]
struct HeaderCase {
    headers: HeaderMap,
    version: Version,
    uri: Option<Uri>,
    client: SocketAddr,
    https: bool,
}

fn header_case(g: &mut Gen) -> HeaderCase {
    let mut headers = HeaderMap::new();
    for _ in 0..g.below(12) {
        let name = if g.one_in(6) {
            match HeaderName::from_bytes(&g.bytes(10)) {
                Ok(n) => n,
                Err(_) => continue,
            }
        } else {
            HeaderName::from_bytes(g.pick(HEADER_NAMES).as_bytes()).expect("a valid name")
        };
        let value = if name == "connection" && !g.one_in(4) {
            // A list naming other headers, in any case, with junk.
            let mut list: Vec<String> = Vec::new();
            for _ in 0..g.below(5) {
                let token = match g.below(5) {
                    0 => g.pick(HEADER_NAMES).to_ascii_uppercase(),
                    1 => g.pick(&["", " ", "close", "keep-alive", "Host", "a b", "é", "%zz", "x-custom "]).to_string(),
                    _ => g.pick(HEADER_NAMES).to_string(),
                };
                list.push(token);
            }
            let mut bytes = list.join(if g.one_in(3) { "," } else { ", " }).into_bytes();
            if g.one_in(8) {
                bytes.push(0xe9); // obs-text: the line is not a str
            }
            HeaderValue::from_bytes(&bytes).ok()
        } else if name == "host" && g.one_in(2) {
            HeaderValue::from_str(g.pick(&["example.com", "a:8080", "[::1]:80", ""])).ok()
        } else {
            random_value(g, 20)
        };
        if let Some(value) = value {
            headers.append(name, value);
        }
    }
    let version = g.pick(&[Version::HTTP_10, Version::HTTP_11, Version::HTTP_2]);
    let uri = match g.below(4) {
        0 => random_uri(g),
        1 => g.pick(&["*", "example.com:443", "http://a.example/x?y", "http://u@h:1/", "/"]).parse().ok(),
        _ => {
            let text: String = String::from_utf8_lossy(&g.bytes(24)).into_owned();
            Uri::try_from(text).ok()
        }
    };
    let ip = if g.one_in(2) {
        IpAddr::V4(Ipv4Addr::from(g.next() as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(u128::from(g.next()) << 64 | u128::from(g.next())))
    };
    HeaderCase { headers, version, uri, client: SocketAddr::new(ip, g.below(65536) as u16), https: g.one_in(2) }
}

#[test]
fn fuzz_headers() {
    fuzz("headers", 6000, header_case, |case| {
        let original = &case.headers;

        // strip_hop_by_hop
        let mut h = original.clone();
        headers::strip_hop_by_hop(&mut h);
        for name in HOP_BY_HOP {
            assert!(!h.contains_key(*name), "{name} left after strip_hop_by_hop");
        }
        let mut named: Vec<String> = Vec::new();
        for line in original.get_all("connection") {
            // Token by token: a non-ASCII byte spoils only its own token.
            for token in line.as_bytes().split(|&b| b == b',') {
                if let Ok(token) = std::str::from_utf8(token.trim_ascii()) {
                    if !token.is_empty() {
                        named.push(token.to_ascii_lowercase());
                    }
                }
            }
        }
        for token in &named {
            if token != "host" {
                assert!(!h.contains_key(token.as_str()), "{token}, named in Connection, left");
            }
        }
        let te = original.contains_key("transfer-encoding");
        if te {
            assert!(!h.contains_key("content-length"), "Content-Length left beside Transfer-Encoding");
        }
        // And nothing else is touched.
        for name in original.keys() {
            let removed = HOP_BY_HOP.contains(&name.as_str())
                || named.iter().any(|t| t == name.as_str() && t != "host")
                || (te && name == "content-length");
            if !removed {
                let before: Vec<_> = original.get_all(name).iter().collect();
                let after: Vec<_> = h.get_all(name).iter().collect();
                assert_eq!(before, after, "{name} changed by strip_hop_by_hop");
            }
        }

        // settle_host
        if let Some(uri) = &case.uri {
            let mut h = original.clone();
            let hosts = original.get_all("host").iter().count();
            match headers::settle_host(case.version, uri, &mut h) {
                Ok(()) => {
                    assert!(h.get_all("host").iter().count() <= 1, "at most one Host after settle_host");
                    if let Some(authority) = uri.authority() {
                        // The authority without user info (RFC 9112 §3.2.2).
                        let host = authority.as_str().rsplit('@').next().unwrap_or_default();
                        assert_eq!(h.get("host").map(HeaderValue::as_bytes), Some(host.as_bytes()));
                    }
                }
                Err(_) => assert!(
                    hosts > 1 || uri.authority().is_some() || (hosts == 0 && case.version == Version::HTTP_11),
                    "settle_host refused a request with one Host"
                ),
            }
            let origin = headers::origin_form(uri);
            assert!(origin.scheme().is_none() && origin.authority().is_none());
            assert!(origin.path().starts_with('/'), "origin_form gives a path: {origin}");
            if uri.path_and_query().is_some_and(|p| p.as_str().starts_with('/')) {
                assert_eq!(origin.path_and_query(), uri.path_and_query());
            }
        }

        // from_http2
        let mut h = original.clone();
        headers::from_http2(&mut h);
        assert!(h.get_all("cookie").iter().count() <= 1, "cookie crumbs joined into one line");
        if original.contains_key("cookie") {
            assert!(h.contains_key("cookie"));
        }

        // add_forwarded_headers
        let proto = if case.https { "https" } else { "http" };
        let client = headers::Client::new(case.client, proto);
        let ip = case.client.ip().to_string();
        let mut h = original.clone();
        headers::add_forwarded_headers(&mut h, &client);
        let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff.len(), 1, "one X-Forwarded-For line");
        assert!(xff[0].as_bytes().ends_with(ip.as_bytes()), "X-Forwarded-For ends with the client {ip}: {:?}", xff[0]);
        assert_eq!(h.get("x-real-ip").map(HeaderValue::as_bytes), Some(ip.as_bytes()));
        assert_eq!(h.get("x-forwarded-proto").map(HeaderValue::as_bytes), Some(proto.as_bytes()));
        assert_eq!(h.get("x-forwarded-host"), h.get("host"));
        if original.contains_key("forwarded") {
            let forwarded: Vec<_> = h.get_all("forwarded").iter().collect();
            assert_eq!(forwarded.len(), 1, "one Forwarded line");
            let ours = format!(";proto={proto}");
            assert!(forwarded[0].as_bytes().ends_with(ours.as_bytes()), "Forwarded ends with ours: {:?}", forwarded[0]);
        }
    });
}

// ---- 5. import-nginx ------------------------------------------------------------------

const NGINX_MAIN: &str = r#"
user www-data;
worker_processes auto;
events { worker_connections 768; }

http {
    include mime.types;
    # Which device a request is about: header, else query argument.
    map $http_x_device_id $device_key {
        default $http_x_device_id;
        ""      $arg_device_id;
    }
    log_format sticky escape=none '$device_key\t$upstream_addr';
    include conf.d/*.conf;
    include sites/none-*.conf;   # matches nothing, as nginx allows
}
"#;

const NGINX_DEVICES: &str = r#"upstream devices {
    zone devices 64k;
    hash $device_key consistent;
    server 10.0.0.5:8080 weight=2;
    server [fd00::6]:8080 max_fails=3 fail_timeout=30s;
    server 10.0.0.7 down;
    server 10.0.0.8:8080 max_conns=100 slow_start=30s;
    keepalive 32;
}

upstream sessions {
    hash $cookie_sid consistent;
    server 10.0.2.1:9000;
    server 10.0.2.2:9000;
}

upstream static {
    least_conn;
    server 10.0.1.1:80;
}

server {
    listen 127.0.0.1:8080 reuseport;
    listen [::1]:8080;
    location /devices/ {
        proxy_pass http://devices;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
    }
    location / { proxy_pass http://static/; }
}

server {
    listen 9090;
    location / { proxy_pass http://sessions; }
}
"#;

const NGINX_SINGLE: &str = "http {\n  upstream u {\n    hash $http_x_id;\n    server 10.0.0.1:80;\n    server unix:/run/app.sock;\n    server 10.0.0.2:80 backup;\n    server 10.0.0.3 max_fails=0 fail_timeout=1m;\n    ip_hash;\n  }\n  server {\n    listen *:8081;\n    location / { proxy_pass http://u/x; }\n  }\n}\n";

const NGINX_MAP: &str = "map $http_x $k {\n  default $http_x;\n  \"\" ${cookie_c};\n}\nmap $k $k2 {\n  default $k;\n}\nupstream u {\n  hash $k2 consistent;\n  server 127.0.0.1:8080 weight=10;\n  server [::1]:9000;\n}\nserver { listen [::]:8080; location / { proxy_pass https://u; } }\n";

const NGINX_MIME: &str = "types { text/html html; }\n";

const NGINX_CORPUS: &[&str] = &[NGINX_MAIN, NGINX_DEVICES, NGINX_SINGLE, NGINX_MAP, NGINX_MIME];

/// Lines that fit an nginx config.
const NGINX_LINES: &[&[u8]] = &[
    b"include conf.d/*.conf;\n",
    b"include mime.types;\n",
    b"include *;\n",
    b"include ?*;\n",
    b"include nginx.conf;\n",
    b"include conf.d/devices.conf;\n",
    b"include conf.d/[a].conf;\n",
    b"include */x.conf;\n",
    b"include missing.conf;\n",
    b"server 10.0.0.9:80 weight=0;\n",
    b"server 10.0.0.9:80 weight=4294967296;\n",
    b"server 10.0.0.9:80 max_fails=101 fail_timeout=0;\n",
    b"server 10.0.0.9;\n",
    b"server [fd00::9];\n",
    b"server unix:/x;\n",
    b"server;\n",
    b"hash $http_x_device_id consistent;\n",
    b"hash $arg_id;\n",
    b"hash $remote_addr consistent;\n",
    b"hash $host$uri consistent;\n",
    b"listen 0;\n",
    b"listen 65536;\n",
    b"listen *:80 default_server;\n",
    b"listen [::]:443 ssl;\n",
    b"listen;\n",
    b"proxy_pass http://devices;\n",
    b"upstream x { hash $arg_x consistent; server 10.1.1.1:1; }\n",
    b"map $arg_a $arg_b { default $arg_a; }\n",
    b"location / { proxy_pass http://u; }\n",
    b"'quoted\\'word' \"x\\\"y\";\n",
    b"${var}text;\n",
    b"# comment { ; }\n",
];

#[derive(Debug)]
struct NginxCase {
    /// (path relative to the scratch dir, content)
    files: Vec<(&'static str, Text)>,
    upstream: Option<String>,
}

fn nginx_case(g: &mut Gen) -> NginxCase {
    let main = if g.one_in(2) { NGINX_MAIN } else { g.pick(NGINX_CORPUS) };
    let mutate = |g: &mut Gen, text: &str, always: bool| {
        let mut data = text.as_bytes().to_vec();
        if always || g.one_in(2) {
            let mut extra: Vec<&[u8]> = NGINX_LINES.to_vec();
            extra.extend(NGINX_CORPUS.iter().map(|c| c.as_bytes()));
            g.mutate(&mut data, &extra);
        }
        Text(data)
    };
    let main = if g.one_in(10) {
        Text(g.bytes(400))
    } else {
        {
            let always = !g.one_in(16);
            mutate(g, main, always)
        }
    };
    let mut files = vec![("nginx.conf", main)];
    if !g.one_in(4) {
        files.push(("mime.types", mutate(g, NGINX_MIME, false)));
        files.push(("conf.d/devices.conf", mutate(g, NGINX_DEVICES, false)));
    }
    if g.one_in(3) {
        let other = g.pick(NGINX_CORPUS);
        files.push(("conf.d/other.conf", mutate(g, other, true)));
        files.push(("conf.d/other.conf.disabled", Text(b"this is { not read".to_vec())));
    }
    let upstream = match g.below(4) {
        0 => Some(g.pick(&["devices", "sessions", "static", "u", "nope", ""]).to_string()),
        1 => Some(String::from_utf8_lossy(&g.bytes(8)).into_owned()),
        _ => None,
    };
    NginxCase { files, upstream }
}

/// Every file a case may have.
const NGINX_FILES: &[&str] =
    &["nginx.conf", "mime.types", "conf.d/devices.conf", "conf.d/other.conf", "conf.d/other.conf.disabled"];

/// Writes a case's files into `dir` (which has `conf.d/`), and removes
/// those of earlier cases.
fn write_nginx_files(dir: &Path, case: &NginxCase) {
    for name in NGINX_FILES {
        // Removed first: overwriting (truncating) a file costs ext4 a
        // flush on close (auto_da_alloc), some 2 ms a file.
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        if let Some((_, content)) = case.files.iter().find(|(n, _)| n == name) {
            std::fs::write(&path, &content.0).expect("write an nginx file");
        }
    }
}

/// No DNS in the fuzz tests (a resolver that drops queries takes seconds
/// a name): names resolve, by their hash, to none, one or a few addresses.
fn fake_resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let h = fnv(host);
    match h % 4 {
        0 => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such name (fake resolver)")),
        n => Ok((0..n).map(|i| SocketAddr::from(([10, 99, (h >> 8) as u8, i as u8], port))).collect()),
    }
}

#[test]
fn fuzz_import_nginx() {
    let scratch = Scratch::new("nginx");
    let dir = scratch.0.clone();
    std::fs::create_dir_all(dir.join("conf.d")).expect("mkdir conf.d");
    fuzz("import_nginx", 3000, nginx_case, |case| {
        write_nginx_files(&dir, case);
        match nginx_import::import_with(&dir.join("nginx.conf"), case.upstream.as_deref(), &fake_resolve) {
            // What it writes is a config the proxy takes.
            Ok(import) => {
                Config::parse(&import.toml).unwrap_or_else(|e| panic!("the import is not a valid config: {e}"));
                let _ = import.routes_differently();
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    });
}
