//! `[[discovery]]` against a real DNS server: dnsmasq on a free loopback
//! port (tests/dns/install.sh installs it: CI runs that first, and these
//! tests run it when dnsmasq is missing). Without dnsmasq they fail, saying
//! so: they are not skipped.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use sticky_proxy::app::RunningProxy;
use sticky_proxy::tools::demo::DemoInstance;
use tokio::net::TcpListener;

const SRV: &str = "_http._tcp.app.test";

/// dnsmasq answering `records` (dnsmasq config lines) on 127.0.0.1:`port`,
/// authoritative for `.test` (unknown names are NXDOMAIN), TTL 1s.
struct Dnsmasq {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn dnsmasq_bin() -> PathBuf {
    // Found, or installed once by tests/dns/install.sh (Debian's
    // dnsmasq-base, as root), so that `cargo test` on a fresh machine sets
    // up what it needs, as the README promises.
    static FOUND: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let found = FOUND.get_or_init(|| {
        for candidate in ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/usr/local/sbin/dnsmasq"] {
            if std::path::Path::new(candidate).exists() {
                return Ok(candidate.into());
            }
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dns/install.sh");
        match std::process::Command::new("bash").arg(script).output() {
            Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).trim().into()),
            Ok(out) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
            Err(e) => Err(e.to_string()),
        }
    });
    match found {
        Ok(path) => path.clone(),
        Err(why) => panic!(
            "dnsmasq is not installed and tests/dns/install.sh could not install it ({why}): the [[discovery]] \
             tests need a real DNS server. As root: apt-get install -y dnsmasq-base; CI installs it."
        ),
    }
}

impl Dnsmasq {
    /// Starts on a free port (tries others if one is taken meanwhile).
    fn start(records: &[String]) -> Dnsmasq {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sticky-proxy-dns-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for _ in 0..20 {
            let port = free_udp_and_tcp_port();
            let mut server = Dnsmasq { child: None, port, dir: dir.clone() };
            if server.spawn(records) {
                return server;
            }
        }
        panic!("dnsmasq could not bind a free loopback port in 20 tries");
    }

    /// Starts dnsmasq with `records` on `self.port`; `false` if it exited
    /// (the port was taken). Ready when it logs "started" (after binding).
    fn spawn(&mut self, records: &[String]) -> bool {
        let conf = self.dir.join("dnsmasq.conf");
        let mut text = String::from("local=/test/\n");
        for r in records {
            text.push_str(r);
            text.push('\n');
        }
        std::fs::write(&conf, text).expect("write dnsmasq.conf");
        let mut child = Command::new(dnsmasq_bin())
            .args(["--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1"])
            .args(["--local-ttl=1", "--log-facility=-", "--pid-file=", "--user=root"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--conf-file={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dnsmasq");
        let stderr = child.stderr.take().expect("dnsmasq stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so dnsmasq never blocks.
                    continue;
                }
            }
        });
        let mut log = Vec::new();
        loop {
            match rx.recv_timeout(STEP) {
                Ok(line) if line.contains("started, version") => {
                    self.child = Some(child);
                    return true;
                }
                Ok(line) => log.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if log.iter().any(|l| l.contains("Address already in use")) {
                        return false;
                    }
                    panic!("dnsmasq did not start: {log:#?}");
                }
            }
        }
    }

    /// Stops the server; its port stays reserved for [`Dnsmasq::restart`].
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts on the same port with new records.
    fn restart(&mut self, records: &[String]) {
        self.stop();
        assert!(self.spawn(records), "dnsmasq could not get its port {} back", self.port);
    }

    fn resolver(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn free_udp_and_tcp_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("udp addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// SRV records naming each app as `app-N.test` (its A record 127.0.0.1).
fn srv_records(apps: &[&DemoInstance]) -> Vec<String> {
    let mut out = Vec::new();
    for app in apps {
        out.push(format!("srv-host={SRV},{}.test,{}", app.name(), app.addr().port()));
        out.push(format!("host-record={}.test,127.0.0.1", app.name()));
    }
    out
}

fn discovery_config(entry: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [routing]\nkey = [\"header:x-device-id\"]\n\n[reload]\nwatch = false\n\n[[discovery]]\n{entry}\n"
    )
}

/// Waits (bounded) until the proxy's backends are `want` (ids, sorted).
async fn wait_for_backends(proxy: &RunningProxy, want: &[&str]) {
    let mut swaps = proxy.router().subscribe();
    let ids = || {
        let mut ids: Vec<String> = proxy.router().load().backends().iter().map(|b| b.id.clone()).collect();
        ids.sort();
        ids
    };
    within(&format!("backends {want:?} (have {:?})", ids()), async {
        while ids() != want {
            swaps.changed().await.expect("router alive");
        }
    })
    .await;
}

fn owners(proxy: &RunningProxy, n: usize) -> BTreeMap<String, String> {
    let table = proxy.router().load();
    let mut ids = Ids::new(17);
    (0..n)
        .map(|_| {
            let id = ids.next_id();
            let owner = table.owner(id.as_bytes()).expect("an owner").id.clone();
            (id, owner)
        })
        .collect()
}

async fn admin_json(http: &Http, proxy: &RunningProxy, path: &str) -> serde_json::Value {
    let reply = http.get(&format!("http://{}{path}", proxy.admin_addr()), &[]).await;
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", reply.body))
}

async fn resolutions(http: &Http, proxy: &RunningProxy, dns: &str, result: &str) -> f64 {
    let reply = http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await;
    let samples = parse_prometheus(&reply.body);
    metric(&samples, "sticky_proxy_discovery_resolutions_total", &[("dns", dns), ("result", result)]).unwrap_or(0.0)
}

/// Polls the admin API until `check` holds, at most [`STEP`]; the pause is
/// only between looks at the real condition.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_become_backends_follow_changes_and_survive_the_server_going_away() {
    let apps = start_apps(3).await;
    let mut dns = Dnsmasq::start(&srv_records(&[&apps[0], &apps[1]]));
    let config = discovery_config(&format!(
        "dns = \"{SRV}\"\nresolver = \"{}\"\ninterval = \"200ms\"\nempty_after = \"1h\"\n",
        dns.resolver()
    ));
    let file = ConfigFile::new("dns.toml", &config);
    let proxy = start_proxy_from(&file).await;
    let twin = start_proxy_from(&file).await;
    let http = Http::default();

    // Backends with the SRV targets' names as ids, reached at their A records.
    wait_for_backends(&proxy, &["app-1.test", "app-2.test"]).await;
    let listed = admin_json(&http, &proxy, "/backends").await;
    let backends = listed["backends"].as_array().expect("backends");
    for (b, app) in backends.iter().zip(&apps) {
        assert_eq!(b["id"], format!("{}.test", app.name()), "{listed}");
        assert_eq!(b["address"], app.addr().to_string(), "{listed}");
        assert_eq!(b["source"], format!("dns:{SRV}"), "{listed}");
    }
    // Requests reach the app that owns their device.
    let url = format!("http://{}/whoami", proxy.proxy_addr());
    for (id, owner) in owners(&proxy, 20) {
        let reply = http.get(&url, &[("x-device-id", &id)]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.instance().map(|i| format!("{i}.test")), Some(owner), "device {id}");
    }

    // A third target: within TTL + interval it takes devices, and only
    // devices that move to it move.
    let before = owners(&proxy, 1000);
    dns.restart(&srv_records(&[&apps[0], &apps[1], &apps[2]]));
    wait_for_backends(&proxy, &["app-1.test", "app-2.test", "app-3.test"]).await;
    let after = owners(&proxy, 1000);
    let moved: Vec<&String> = before.keys().filter(|id| before[*id] != after[*id]).collect();
    for id in &moved {
        assert_eq!(after[*id], "app-3.test", "device {id} moved between the old backends");
    }
    let fraction = moved.len() as f64 / 1000.0;
    eprintln!("2 -> 3 backends through DNS: {} of 1000 devices moved ({fraction:.3})", moved.len());
    assert!((0.2..0.47).contains(&fraction), "moved {fraction}, expected about 1/3");
    let reply = http.get(&url, &[("x-device-id", moved[0])]).await;
    assert_eq!(reply.instance(), Some("app-3"), "a moved device is served by the new backend");

    // A replica with the same config and records agrees on every device.
    wait_for_backends(&twin, &["app-1.test", "app-2.test", "app-3.test"]).await;
    assert_eq!(owners(&twin, 1000), after, "the two proxies disagree");

    // The server goes away: lookups fail and are counted, the backends
    // and routing stay, traffic is served.
    let generation = proxy.router().load().generation();
    let failed_before = resolutions(&http, &proxy, SRV, "error").await;
    dns.stop();
    eventually("a failed lookup counted", || async { resolutions(&http, &proxy, SRV, "error").await > failed_before })
        .await;
    // A few more intervals of failures change nothing.
    let failed = resolutions(&http, &proxy, SRV, "error").await;
    eventually("more failed lookups", || async { resolutions(&http, &proxy, SRV, "error").await >= failed + 2.0 })
        .await;
    assert_eq!(proxy.router().load().generation(), generation, "a failed lookup swapped the table");
    assert_eq!(owners(&proxy, 1000), after, "routing changed while DNS was down");
    let reply = http.get(&url, &[("x-device-id", moved[0])]).await;
    assert_eq!(reply.instance(), Some("app-3"));
    assert!(resolutions(&http, &proxy, SRV, "ok").await >= 2.0);
    twin.shutdown().await;
    proxy.shutdown().await;
}

/// Demo apps on 127.0.0.2 .. 127.0.0.(n+1), all on one port.
async fn apps_on_one_port(n: usize) -> Vec<DemoInstance> {
    'again: loop {
        let first = TcpListener::bind("127.0.0.2:0").await.expect("bind");
        let port = first.local_addr().expect("addr").port();
        let mut apps = vec![DemoInstance::spawn("app-1", first).expect("demo app")];
        for i in 2..=n {
            let Ok(listener) = TcpListener::bind((format!("127.0.0.{}", i + 1), port)).await else {
                continue 'again;
            };
            apps.push(DemoInstance::spawn(format!("app-{i}"), listener).expect("demo app"));
        }
        return apps;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_are_backends_by_address_and_an_empty_answer_waits_for_empty_after() {
    let apps = apps_on_one_port(2).await;
    let port = apps[0].addr().port();
    let records: Vec<String> = apps.iter().map(|a| format!("host-record=app.test,{}", a.addr().ip())).collect();
    let mut dns = Dnsmasq::start(&records);
    let config = discovery_config(&format!(
        "dns = \"app.test\"\nkind = \"a\"\nport = {port}\nresolver = \"{}\"\ninterval = \"200ms\"\nempty_after = \"2s\"\n",
        dns.resolver()
    ));
    let file = ConfigFile::new("dns-a.toml", &config);
    let proxy = start_proxy_from(&file).await;
    let http = Http::default();
    let ids: Vec<String> = apps.iter().map(|a| a.addr().to_string()).collect();
    let want: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_for_backends(&proxy, &want).await;
    let listed = admin_json(&http, &proxy, "/backends").await;
    for b in listed["backends"].as_array().expect("backends") {
        assert_eq!(b["id"], b["address"], "{listed}");
        assert_eq!(b["source"], "dns:app.test", "{listed}");
    }
    let url = format!("http://{}/whoami", proxy.proxy_addr());
    for (id, owner) in owners(&proxy, 10) {
        let reply = http.get(&url, &[("x-device-id", &id)]).await;
        let app = apps.iter().find(|a| a.addr().to_string() == owner).expect("owner is an app");
        assert_eq!(reply.instance(), Some(app.name()), "device {id}");
    }

    // The name disappears (NXDOMAIN): the backends stay until the answer
    // has been empty for empty_after, then go.
    let generation = proxy.router().load().generation();
    let emptied = std::time::Instant::now();
    dns.restart(&[]);
    eventually("an empty answer counted", || async { resolutions(&http, &proxy, "app.test", "empty").await >= 1.0 })
        .await;
    assert_eq!(proxy.router().load().generation(), generation, "removed at the first empty answer");
    wait_for_backends(&proxy, &[]).await;
    assert!(emptied.elapsed() >= Duration::from_secs(2), "removed after {:?}, before empty_after", emptied.elapsed());
    // Back: the backends return.
    dns.restart(&records);
    wait_for_backends(&proxy, &want).await;
    proxy.shutdown().await;
}

#[test]
fn check_accepts_discovery_without_asking_the_server() {
    // A resolver nobody answers on: validation must not need it.
    let file = ConfigFile::new(
        "check.toml",
        &discovery_config("dns = \"_http._tcp.app.test\"\nresolver = \"127.0.0.1:9\"\ninterval = \"5s\"\nweight = 1\n"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sticky-proxy"))
        .args(["check", "--config"])
        .arg(&file.path)
        .output()
        .expect("run check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("found in DNS (SRV _http._tcp.app.test)"), "check names the discovery: {said}");
}
