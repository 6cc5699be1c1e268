//! `sticky-proxy demo --tour`: the demo played by itself, on free loopback
//! ports, with a transcript. Real sockets all the way: three demo app
//! instances, the proxy (from a config file, so it can reload), a dozen
//! devices on WebSockets through the proxy, and plain HTTP/1.1 requests.
//!
//! 1. devices connect, each to the instance the ring names;
//! 2. a POST through the proxy is delivered to the device's socket;
//! 3. the same POST straight to another instance is refused (421);
//! 4. a fourth instance is added and the config reloaded: its devices move
//!    to it, the others stay, and every message sent during the move
//!    arrives exactly once.
//!
//! Exits 0 if every promise held. Also here: `demo --app NAME`, one demo
//! app instance alone (one per container in deploy/docker/compose.yaml).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::app::{self, RunningProxy};
use crate::config::Config;
use crate::tools::demo::DemoInstance;
use crate::tools::probe::{request, Answer};

/// The longest any one step may wait for what it promises.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest one HTTP exchange may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The devices of the tour: phone-40 … phone-51 (phone-42 is the README's).
const FIRST_DEVICE: u32 = 40;
const DEVICES: u32 = 12;
/// The device steps 2 and 3 use.
const STAR: &str = "phone-42";

/// `demo --app NAME`: one demo app instance on `listen`, until SIGINT or SIGTERM.
pub async fn app_only(name: String, listen: SocketAddr) -> io::Result<()> {
    let app = DemoInstance::bind(name.clone(), listen)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start demo instance {name} on {listen}: {e}")))?;
    println!("demo app instance {name} on http://{} (stop with Ctrl-C or SIGTERM)", app.addr());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        stopped = tokio::signal::ctrl_c() => stopped?,
        _ = terminate.recv() => {}
    }
    app.shutdown();
    Ok(())
}

/// `demo --tour`.
pub async fn tour() -> io::Result<()> {
    let dir = TempDir::new()?;
    let mut apps = Vec::new();
    for i in 1..=3 {
        apps.push(DemoInstance::spawn(format!("app-{i}"), TcpListener::bind("127.0.0.1:0").await?)?);
    }
    let path = dir.0.join("config.toml");
    std::fs::write(&path, config_text(&apps))?;
    let config = Config::load(&path).map_err(io::Error::other)?;
    let proxy = app::start_from_file(config, path.clone()).await?;
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
    println!("sticky-proxy demo --tour: proxy on http://{addr}, admin API on http://{admin}");
    let listed: Vec<String> = apps.iter().map(|a| format!("{} on {}", a.name(), a.addr())).collect();
    println!("demo app instances: {}", listed.join(", "));

    let (events, _) = watch::channel(0u64);
    let events = Arc::new(events);
    let devices: Vec<Device> =
        (FIRST_DEVICE..FIRST_DEVICE + DEVICES).map(|i| Device::spawn(format!("phone-{i}"), addr, &events)).collect();
    let mut tour = Tour { broken: Vec::new(), events: events.subscribe() };
    let outcome = tour.play(&proxy, &mut apps, &devices, &path).await;
    for device in &devices {
        device.task.abort();
    }
    proxy.shutdown().await;
    drop(apps);
    outcome?;
    if tour.broken.is_empty() {
        println!("\ntour: every promise held");
        Ok(())
    } else {
        Err(io::Error::other(format!("tour: {} promise(s) broken: {}", tour.broken.len(), tour.broken.join("; "))))
    }
}

struct Tour {
    broken: Vec<String>,
    /// Bumped by the devices on every connect and message.
    events: watch::Receiver<u64>,
}

impl Tour {
    /// Prints whether a promise held and remembers the broken ones.
    fn promise(&mut self, held: bool, what: String) {
        if held {
            println!("   ok: {what}");
        } else {
            println!("   BROKEN: {what}");
            self.broken.push(what);
        }
    }

    /// Waits (at most [`STEP_TIMEOUT`]) until `done` holds; re-checked after
    /// every device event and every 50 ms (instances change state too).
    async fn until(&mut self, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !done() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            let wake = left.min(Duration::from_millis(50));
            let _ = tokio::time::timeout(wake, self.events.changed()).await;
        }
        true
    }

    async fn play(
        &mut self,
        proxy: &RunningProxy,
        apps: &mut Vec<DemoInstance>,
        devices: &[Device],
        path: &PathBuf,
    ) -> io::Result<()> {
        let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());
        let owner = |id: &str| proxy.router().load().owner(id.as_bytes()).map_or("?".to_string(), |b| b.id.clone());
        let holders = |apps: &[DemoInstance], id: &str| -> Vec<String> {
            apps.iter().filter(|a| a.sockets_for(id) > 0).map(|a| a.name().to_string()).collect()
        };

        println!("\n1. Devices connect through the proxy");
        println!("   $ websocat ws://{addr}/devices/ID/ws   (for {} devices, ID = phone-40 … phone-51)", devices.len());
        let all_connected =
            self.until(|| devices.iter().all(|d| d.connects() >= 1 && !holders(apps, &d.name).is_empty())).await;
        self.promise(
            all_connected,
            format!("{} devices connected (101 Switching Protocols, echo answered)", devices.len()),
        );
        let mut placed = true;
        for d in devices {
            let (held_by, ring) = (holders(apps, &d.name), owner(&d.name));
            println!("   {} -> held by {}; the ring's owner: {ring}", d.name, held_by.join(", "));
            placed &= held_by == [ring];
        }
        self.promise(placed, "each device is held by exactly the instance the ring names".into());

        let star = find(devices, STAR)?;
        let star_owner = owner(STAR);
        println!("\n2. A POST through the proxy is delivered to the device's socket");
        let url = format!("http://{addr}/devices/{STAR}/messages");
        println!("   $ curl -i -X POST --data 'hello {STAR}' {url}");
        let answer = post(&url, format!("hello {STAR}")).await?;
        show(&answer);
        self.promise(
            answer.status == StatusCode::OK && instance(&answer) == star_owner,
            format!("200 OK from {star_owner}, the instance holding {STAR}'s socket"),
        );
        let hello = format!("hello {STAR}");
        let arrived = self.until(|| star.count(&hello) >= 1).await;
        self.promise(arrived && star.count(&hello) == 1, format!("{STAR}'s socket received \"{hello}\""));

        println!("\n3. The same POST straight to another instance is refused");
        let other = apps.iter().find(|a| a.name() != star_owner).map(|a| (a.name().to_string(), a.addr()));
        let (other, other_addr) = other.ok_or_else(|| io::Error::other("no second instance"))?;
        let url = format!("http://{other_addr}/devices/{STAR}/messages");
        println!("   $ curl -i -X POST --data 'hello again' {url}   ({other}, without the proxy)");
        let answer = post(&url, "hello again".into()).await?;
        show(&answer);
        self.promise(
            answer.status == StatusCode::MISDIRECTED_REQUEST && star.count("hello again") == 0,
            format!("421 Misdirected Request from {other}: not there, nothing delivered"),
        );

        println!("\n4. A backend is added: its devices move, and nothing is lost");
        let before: HashMap<String, String> = devices.iter().map(|d| (d.name.clone(), owner(&d.name))).collect();
        let app4 = DemoInstance::spawn("app-4", TcpListener::bind("127.0.0.1:0").await?)?;
        println!("   app-4 started on {}; {} now lists 4 backends", app4.addr(), path.display());
        apps.push(app4);
        std::fs::write(path, config_text(apps))?;
        let url = format!("http://{admin}/reload");
        println!("   $ curl -i -X POST {url}");
        let answer = request(Method::POST, &url, &[], Bytes::new(), HTTP_TIMEOUT).await?;
        show(&answer);
        self.promise(answer.status == StatusCode::OK, "the reload is applied (200 OK)".into());
        let moving: Vec<&Device> = devices.iter().filter(|d| owner(&d.name) == "app-4").collect();
        let names: Vec<&str> = moving.iter().map(|d| d.name.as_str()).collect();
        println!("   the ring now gives app-4: {}", names.join(", "));
        self.promise(!moving.is_empty(), format!("{} of {} devices move to app-4", moving.len(), devices.len()));

        println!("   a message to every device through the proxy, sent while they move:");
        let sends = devices.iter().map(|d| async move {
            let url = format!("http://{addr}/devices/{}/messages", d.name);
            (d, post(&url, format!("during the move: {}", d.name)).await)
        });
        let mut all_ok = true;
        for (d, answer) in futures_util::future::join_all(sends).await {
            let answer = answer?;
            println!(
                "   POST /devices/{}/messages -> {} from {}",
                d.name,
                status_line(answer.status),
                instance(&answer)
            );
            all_ok &= answer.status == StatusCode::OK;
        }
        self.promise(all_ok, format!("all {} POSTs answered 200 OK", devices.len()));
        let delivered =
            self.until(|| devices.iter().all(|d| d.count(&format!("during the move: {}", d.name)) >= 1)).await;
        let once = devices.iter().all(|d| d.count(&format!("during the move: {}", d.name)) == 1);
        self.promise(delivered && once, "every device received its message exactly once: nothing lost".into());

        let settled = self
            .until(|| {
                devices.iter().all(|d| holders(apps, &d.name) == [owner(&d.name)])
                    && moving.iter().all(|d| d.connects() >= 2)
            })
            .await;
        for d in &moving {
            println!(
                "   {}: {} -> {} (reconnected {} time(s))",
                d.name,
                before.get(&d.name).map_or("?", String::as_str),
                holders(apps, &d.name).join(", "),
                d.connects().saturating_sub(1)
            );
        }
        self.promise(settled, "every device is held by its new owner".into());
        let stayed = devices.iter().filter(|d| !moving.iter().any(|m| m.name == d.name)).all(|d| d.connects() == 1);
        self.promise(stayed, "the other devices kept their sockets (connected once)".into());

        if let Some(moved) = moving.first() {
            let url = format!("http://{addr}/devices/{}/messages", moved.name);
            println!("   $ curl -i -X POST --data 'welcome' {url}");
            let answer = post(&url, "welcome".into()).await?;
            show(&answer);
            let arrived = self.until(|| moved.count("welcome") >= 1).await;
            self.promise(
                answer.status == StatusCode::OK && instance(&answer) == "app-4" && arrived,
                format!("{} is reached on app-4 now", moved.name),
            );
        }
        Ok(())
    }
}

/// One device: a task that connects through the proxy, says hello (and waits
/// for the echo), records every other message, and reconnects when closed
/// (as a moved device is, with 1012).
struct Device {
    name: String,
    state: Arc<Mutex<DeviceState>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct DeviceState {
    connects: u32,
    received: Vec<String>,
}

impl Device {
    fn spawn(name: String, proxy: SocketAddr, events: &Arc<watch::Sender<u64>>) -> Device {
        let state = Arc::new(Mutex::new(DeviceState::default()));
        let task = tokio::spawn(device_loop(name.clone(), proxy, state.clone(), events.clone()));
        Device { name, state, task }
    }

    fn connects(&self) -> u32 {
        lock(&self.state).connects
    }

    fn count(&self, message: &str) -> usize {
        lock(&self.state).received.iter().filter(|m| *m == message).count()
    }
}

async fn device_loop(name: String, proxy: SocketAddr, state: Arc<Mutex<DeviceState>>, events: Arc<watch::Sender<u64>>) {
    let url = format!("ws://{proxy}/devices/{name}/ws");
    let hello = format!("ping from {name}");
    loop {
        let connected = tokio::time::timeout(HTTP_TIMEOUT, tokio_tungstenite::connect_async(url.as_str())).await;
        let Ok(Ok((mut ws, _))) = connected else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if ws.send(Message::text(hello.clone())).await.is_err() {
            continue;
        }
        while let Some(Ok(message)) = ws.next().await {
            let text = match message {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                Message::Close(_) => break,
                _ => continue,
            };
            {
                let mut state = lock(&state);
                if text == hello {
                    state.connects += 1;
                } else {
                    state.received.push(text);
                }
            }
            events.send_modify(|n| *n += 1);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn find<'a>(devices: &'a [Device], name: &str) -> io::Result<&'a Device> {
    devices.iter().find(|d| d.name == name).ok_or_else(|| io::Error::other(format!("no device {name}")))
}

async fn post(url: &str, body: String) -> io::Result<Answer> {
    request(Method::POST, url, &[], Bytes::from(body), HTTP_TIMEOUT).await
}

fn instance(answer: &Answer) -> String {
    answer.headers.get("x-instance").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string()
}

fn status_line(status: StatusCode) -> String {
    format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""))
}

/// `curl -i`, in short: the status line, X-Instance and the body (on one line, cut at 100 characters).
fn show(answer: &Answer) {
    println!("   HTTP/1.1 {}", status_line(answer.status));
    if let Some(name) = answer.headers.get("x-instance").and_then(|v| v.to_str().ok()) {
        println!("   x-instance: {name}");
    }
    let body = answer.body.split_whitespace().collect::<Vec<_>>().join(" ");
    if !body.is_empty() {
        let cut = body.char_indices().nth(100).map_or(body.len(), |(i, _)| i);
        println!("   {}{}", body.get(..cut).unwrap_or_default(), if cut < body.len() { " …" } else { "" });
    }
}

/// The tour's config: the demo's routing over `apps`, reloaded only on request.
fn config_text(apps: &[DemoInstance]) -> String {
    let mut text = String::from(
        r#"[server]
listen = "127.0.0.1:0"
shutdown_grace = "1s"

[admin]
listen = "127.0.0.1:0"

[routing]
key = ["header:x-device-id", "path:/devices/{id}/*", "query:device_id", "cookie:device_id"]
missing_key = "reject"
rebalance = "migrate"

[reload]
watch = false
"#,
    );
    for app in apps {
        text.push_str(&format!("\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n", app.name(), app.addr()));
    }
    text
}

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> io::Result<TempDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("sticky-proxy-tour-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
