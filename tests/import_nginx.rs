//! `sticky-proxy import-nginx`, run as a real process on nginx configs
//! written to a temp dir, and its output checked by `sticky-proxy check`,
//! by the routing table, and against placements recorded from real nginx.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use sticky_proxy::config::Config;
use sticky_proxy::routing::{Decision, RoutingTable};

fn sticky_proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sticky-proxy")).args(args).output().expect("run sticky-proxy")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

/// A fresh directory holding `files` (relative path, content).
fn nginx_dir(name: &str, files: &[(&str, &str)]) -> TempDir {
    let dir = std::env::temp_dir().join(format!("sticky-proxy-import-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    }
    TempDir(dir)
}

/// Runs import-nginx; on success also writes the TOML next to the config
/// and runs `sticky-proxy check` on it.
fn import(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let conf = dir.join("nginx.conf");
    let mut all = vec!["import-nginx", conf.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    let out = sticky_proxy(&all);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    if matches!(out.status.code(), Some(0 | 2)) {
        let toml = dir.join("sticky.toml");
        std::fs::write(&toml, &stdout).expect("write toml");
        let check = sticky_proxy(&["check", "-c", toml.to_str().expect("utf-8 path")]);
        assert!(check.status.success(), "generated config fails check: {}\n{stdout}", text(&check.stderr));
    }
    (out.status.code(), stdout, stderr)
}

const MAIN: &str = r#"
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

const DEVICES: &str = r#"upstream devices {
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

fn realistic() -> TempDir {
    nginx_dir(
        "realistic",
        &[
            ("nginx.conf", MAIN),
            ("mime.types", "types { text/html html; }\n"),
            ("conf.d/devices.conf", DEVICES),
            ("conf.d/other.conf.disabled", "this is { not read"),
        ],
    )
}

#[test]
fn a_realistic_config_imports_with_every_gap_named() {
    let dir = realistic();
    let (code, toml, stderr) = import(&dir, &["--upstream", "devices"]);
    assert_eq!(code, Some(0), "{stderr}");
    let config = Config::parse(&toml).expect("valid");
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    let keys: Vec<String> = config.routing.keys.iter().map(ToString::to_string).collect();
    assert_eq!(keys, ["header:x-device-id", "query:device_id"]);
    let backends: Vec<(&str, &str, u32, bool)> =
        config.backends.iter().map(|b| (b.id.as_str(), b.server.as_str(), b.weight, b.draining)).collect();
    assert_eq!(
        backends,
        [
            ("10.0.0.5:8080", "10.0.0.5:8080", 2, false),
            ("fd00::6:8080", "[fd00::6]:8080", 1, false),
            ("10.0.0.7", "10.0.0.7", 1, true),
            ("10.0.0.8:8080", "10.0.0.8:8080", 1, false),
        ]
    );
    assert_eq!(config.backends[1].health.fall, 3);
    assert_eq!(config.backends[1].health.fail_timeout.as_secs(), 30);
    assert_eq!(config.backends[2].address, "10.0.0.7:80");
    // Each gap is named with its file and line, on stderr and in the file.
    let devices = dir.join("conf.d/devices.conf");
    for (line, what) in [(2, "zone"), (5, "max_fails"), (7, "max_conns=100"), (7, "slow_start=30s"), (8, "keepalive")] {
        let at = format!("{}:{line}: note:", devices.display());
        assert!(stderr.lines().any(|l| l.starts_with(&at) && l.contains(what)), "{at} {what} in:\n{stderr}");
        assert!(toml.contains(&at), "{at} in the output");
    }
    assert!(stderr.contains("reuseport") && stderr.contains("[::1]:8080"), "{stderr}");
    assert!(!stderr.contains("ROUTES DIFFERENTLY"), "{stderr}");
}

#[test]
fn several_hashed_upstreams_need_a_choice() {
    let dir = realistic();
    let (code, _, stderr) = import(&dir, &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--upstream") && stderr.contains("devices (") && stderr.contains("sessions ("), "{stderr}");
    let (code, toml, stderr) = import(&dir, &["--upstream", "sessions"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(toml.contains("key = [\"cookie:sid\"]") && toml.contains("listen = \"0.0.0.0:9090\""), "{toml}");
    let (code, _, stderr) = import(&dir, &["--upstream", "static"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no `hash`"), "{stderr}");
    let (code, _, stderr) = import(&dir, &["--upstream", "nope"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no upstream \"nope\"") && stderr.contains("sessions"), "{stderr}");
}

#[test]
fn what_routes_differently_is_flagged_and_exits_2() {
    let conf = "http {\n  upstream u {\n    hash $http_x_id;\n    server 10.0.0.1:80;\n    server unix:/run/app.sock;\n    server 10.0.0.2:80 backup;\n  }\n}\n";
    let dir = nginx_dir("differs", &[("nginx.conf", conf)]);
    let (code, toml, stderr) = import(&dir, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    let conf = dir.join("nginx.conf");
    for (line, what) in [(3, "without `consistent`"), (5, "unix sockets")] {
        let at = format!("{}:{line}: ROUTES DIFFERENTLY:", conf.display());
        assert!(stderr.lines().any(|l| l.starts_with(&at) && l.contains(what)), "{at} {what}:\n{stderr}");
        assert!(toml.contains(&at), "{toml}");
    }
    assert!(toml.contains("# WARNING: this config routes some requests differently from nginx"), "{toml}");
    assert!(stderr.contains(":6: note: backup server 10.0.0.2:80 left out"), "{stderr}");
    assert!(stderr.contains("no server block has `proxy_pass http://u`"), "{stderr}");
}

#[test]
fn untranslatable_input_is_an_error_with_file_and_line() {
    // (case, files as (path, content), expected in the error)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            "key",
            &[("nginx.conf", "http {\n upstream u {\n  hash $remote_addr consistent;\n  server 10.0.0.1:80;\n }\n}\n")],
            "nginx.conf:3: key $remote_addr",
        ),
        (
            "compound",
            &[("nginx.conf", "upstream u {\n  hash $host$uri consistent;\n  server 10.0.0.1:80;\n}\n")],
            "nginx.conf:2: key \"$host$uri\"",
        ),
        (
            "map",
            &[(
                "nginx.conf",
                "map $http_x $k {\n  default $http_x;\n  ~^a $arg_a;\n}\nupstream u {\n  hash $k consistent;\n  server 10.0.0.1:80;\n}\n",
            )],
            "nginx.conf:1: map $http_x → $k: entry \"~^a\" at line 3",
        ),
        ("unclosed", &[("nginx.conf", "http {\n  upstream u {\n    server a;\n")], "nginx.conf:2: the block of \"upstream\""),
        ("semicolon", &[("nginx.conf", "http {\n  include x.conf\n}\n")], "nginx.conf:2: \"include\" is not terminated"),
        ("quote", &[("nginx.conf", "\n\nmap \"a\n")], "nginx.conf:3: a quoted string is not closed"),
        ("include", &[("nginx.conf", "http {\n\n  include missing.conf;\n}\n")], "nginx.conf:3: cannot read included"),
        (
            "nested",
            &[("nginx.conf", "http { include a.conf; }\n"), ("a.conf", "upstream u {\n  hash $arg_x consistent\n}\n")],
            "a.conf:2: \"hash\" is not terminated",
        ),
        ("loop", &[("nginx.conf", "include nginx.conf;\n")], "nest more than 16 deep"),
        ("glob", &[("nginx.conf", "include */x.conf;\n")], "only * and ? in the last path component"),
        (
            "non-ascii",
            &[("nginx.conf", "upstream u {\n  hash $http_x consistent;\n  server aaaa\u{e9}:80;\n}\n")],
            "is not a valid address",
        ),
    ];
    for (name, files, expected) in cases {
        let dir = nginx_dir(name, files);
        let (code, stdout, stderr) = import(&dir, &[]);
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(stdout.is_empty(), "{name}: nothing printed on error");
        assert!(stderr.contains(expected), "{name}: expected {expected:?} in {stderr:?}");
    }
}

// ---- round trip against real nginx's recorded placements --------------------

/// `(servers, answers)` of a fixture recorded by tests/nginx/compare.sh.
fn fixture(name: &str) -> (Vec<String>, Vec<usize>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nginx").join(format!("{name}.txt"));
    let text = std::fs::read_to_string(path).expect("fixture");
    let (head, answers) = text.split_once("\nanswers\n").expect("answers");
    let servers = head.lines().filter_map(|l| l.strip_prefix("server ")).map(str::to_string).collect();
    (servers, answers.lines().map(|l| l.parse().expect("index")).collect())
}

/// The nginx.conf compare.sh runs for a fixture, minus the test backends.
fn nginx_conf(servers: &[String]) -> String {
    let lines: String = servers.iter().map(|s| format!("    server {s};\n")).collect();
    format!(
        "events {{}}\nhttp {{\n  upstream devices {{\n    hash $http_x_device_id consistent;\n{lines}    keepalive 16;\n  }}\n  server {{\n    listen 127.0.0.1:18000;\n    location / {{ proxy_pass http://devices; }}\n  }}\n}}\n"
    )
}

#[test]
fn imported_configs_route_every_recorded_id_like_nginx() {
    let ids = sticky_proxy::tools::sample::varied_ids(7, 10_000);
    for name in ["ipv4-3", "ipv4-30-weights", "ipv6", "portless-and-hostnames", "ties", "down"] {
        let (servers, answers) = fixture(name);
        let dir = nginx_dir(&format!("roundtrip-{name}"), &[("nginx.conf", &nginx_conf(&servers))]);
        let (code, toml, stderr) = import(&dir, &[]);
        // `localhost` may resolve to 127.0.0.1 and ::1: nginx then takes
        // turns between the two, which is worth the warning.
        let resolves_twice = stderr.contains("resolves to 2 addresses");
        assert_eq!(code, Some(if resolves_twice { 2 } else { 0 }), "{name}: {stderr}");
        let table = RoutingTable::offline(&Config::parse(&toml).expect("valid"));
        assert_eq!(table.backends().len(), servers.len());
        let uri = Uri::from_static("/");
        for (id, &want) in ids.iter().zip(&answers) {
            let mut headers = HeaderMap::new();
            let value = HeaderValue::from_bytes(id.as_bytes()).expect("header value");
            headers.insert(HeaderName::from_static("x-device-id"), value);
            let got = match table.decide(&uri, &headers, |_| None) {
                Decision::Device { first, .. } => table.position(&first.backend.id),
                other => panic!("{name} {id:?}: {other:?}"),
            };
            assert_eq!(got, Some(want), "{name}: {id:?}");
        }
    }
}

#[test]
fn route_stdin_answers_like_nginx_for_a_log() {
    // What an access log with `'$http_x_device_id\t$upstream_addr'` holds,
    // minus the address: one ID a line ("-" when the request had none).
    let (servers, answers) = fixture("ipv4-30-weights");
    let dir = nginx_dir("route-stdin", &[("nginx.conf", &nginx_conf(&servers))]);
    let (code, _, stderr) = import(&dir, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    // An ID that is literally "-" can't be told from a missing one in a log.
    let (ids, answers): (Vec<String>, Vec<usize>) =
        sticky_proxy::tools::sample::varied_ids(7, 2_000).into_iter().zip(answers).filter(|(id, _)| id != "-").unzip();
    let mut input: String = ids.iter().map(|id| format!("{id}\n")).collect();
    input.push_str("-\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sticky-proxy"))
        .args(["route", "--stdin", "-c", dir.join("sticky.toml").to_str().expect("utf-8 path")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write ids");
    let out = child.wait_with_output().expect("route");
    assert!(out.status.success());
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), ids.len() + 1);
    for ((line, id), &want) in lines.iter().zip(&ids).zip(&answers) {
        let address = servers[want].split_whitespace().next().expect("address");
        assert_eq!(line, &format!("{id}\t{address}"));
    }
    assert_eq!(lines.last().map(String::as_str), Some("-\t-"));
}

// ---- hostile input: bounded time, stack and memory --------------------------

/// Runs `sticky-proxy` with `args`, killing it if it is still running after
/// `limit` (far more than it needs: this catches a hang, it is not a
/// measurement). Output goes to files in `dir`, so a full pipe cannot stall
/// it.
fn sticky_proxy_within(dir: &Path, args: &[&str], limit: std::time::Duration) -> (Option<i32>, String, String) {
    let (out, err) = (dir.join("stdout.txt"), dir.join("stderr.txt"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sticky-proxy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sticky-proxy {args:?} still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let read = |p: &Path| text(&std::fs::read(p).expect("output"));
    (status.code(), read(&out), read(&err))
}

const UPSTREAM: &str = "upstream u {\n  hash $http_x_id consistent;\n  server 10.0.0.1:80;\n}\n";

#[test]
fn an_include_mask_with_many_stars_is_matched_quickly() {
    // Matching this mask against these names took exponential time in the
    // number of stars: 6 took seconds, 30 would never have finished.
    let mask = format!("{}b.conf", "a*".repeat(30));
    let conf = format!("http {{\n  include inc/{mask};\n}}\n");
    let matching = format!("inc/{}b.conf", "a".repeat(60));
    let mut files: Vec<(String, &str)> =
        (0..20).map(|i| (format!("inc/{}{i}.conf", "a".repeat(60)), "not { read")).collect();
    files.push((matching, UPSTREAM));
    files.push((format!("inc/.{}b.conf", "a".repeat(60)), "hidden { not read"));
    files.push(("nginx.conf".into(), &conf));
    let files: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), *c)).collect();
    let dir = nginx_dir("many-stars", &files);
    let conf = dir.join("nginx.conf");
    let (code, toml, stderr) = sticky_proxy_within(
        &dir,
        &["import-nginx", conf.to_str().expect("utf-8 path")],
        std::time::Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(toml.contains("address = \"10.0.0.1:80\""), "{toml}");
}

#[test]
fn deeply_nested_blocks_are_an_error_not_a_stack_overflow() {
    // 100,000 blocks inside each other used to overflow the reader's stack
    // (an abort, no message); at most 256 are read.
    let deep = format!("{}{}", "a {\n".repeat(100_000), "}\n".repeat(100_000));
    let dir = nginx_dir("deep", &[("nginx.conf", &deep)]);
    let (code, stdout, stderr) = import(&dir, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty());
    let at = format!("{}:257: the block of \"a\" nests more than 256 blocks deep", dir.join("nginx.conf").display());
    assert!(stderr.contains(&at), "{at} in {stderr:?}");
    // 256 are fine.
    let fine = format!("{}{}{UPSTREAM}", "a {\n".repeat(256), "}\n".repeat(256));
    let dir = nginx_dir("deep-enough", &[("nginx.conf", &fine)]);
    let (code, toml, stderr) = import(&dir, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(toml.contains("address = \"10.0.0.1:80\""), "{toml}");
}

#[test]
#[cfg(target_os = "linux")]
fn endless_and_huge_includes_are_refused() {
    // `include /dev/zero;` used to read until memory ran out. The run is
    // capped at 1 GiB of address space, so that without the limits this
    // fails with "out of memory" rather than taking the machine's memory.
    let dir = nginx_dir("dev-zero", &[("nginx.conf", "http {\n  include /dev/zero;\n}\n")]);
    let conf = dir.join("nginx.conf");
    let out = Command::new("sh")
        .args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_sticky-proxy"))
        .args(["import-nginx", conf.to_str().expect("utf-8 path")])
        .output()
        .expect("run sticky-proxy");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let at = format!("{}:2: cannot read included /dev/zero: not a regular file", conf.display());
    assert!(stderr.contains(&at), "{at} in {stderr:?}");
    // A regular file is read up to 16 MiB.
    let big = format!("#{}\n", " ".repeat(16 << 20));
    let files =
        [("nginx.conf", "include big.conf;\ninclude u.conf;\n"), ("big.conf", big.as_str()), ("u.conf", UPSTREAM)];
    let dir = nginx_dir("big", &files);
    let (code, _, stderr) = import(&dir, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let at = format!(
        "{}:1: cannot read included {}: larger than 16 MiB",
        dir.join("nginx.conf").display(),
        dir.join("big.conf").display()
    );
    assert!(stderr.contains(&at), "{at} in {stderr:?}");
}
