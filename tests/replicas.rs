//! The product's promise where users run it: two replicas of the proxy on
//! loopback behind a (simulated) L4 balancer, app instances holding device
//! sockets, devices that reconnect 100–300 ms after any close through a
//! random replica, and a sender posting one message per device every
//! half second through a random replica.
//!
//! A message counts as delivered only when its POST answered 200 and the
//! device's socket received it. Each scenario passes only at zero lost.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sticky_proxy::app::RunningProxy;
use sticky_proxy::ops::reload::Trigger;
use sticky_proxy::tools::demo::DemoInstance;
use sticky_proxy::tools::sample::SplitMix64;
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::Message;

const DEVICES: usize = 60;
/// One message per device this often.
const PERIOD: Duration = Duration::from_millis(500);
/// How long the last messages get to reach their sockets after sending stops.
const SETTLE: Duration = Duration::from_secs(10);

/// Which replicas new connections go to, like an L4 balancer or a
/// Kubernetes Service: a replica out of rotation gets none.
struct Balancer {
    replicas: Mutex<Vec<(SocketAddr, bool)>>,
    rng: Mutex<SplitMix64>,
}

impl Balancer {
    fn new(replicas: &[SocketAddr]) -> Arc<Balancer> {
        Arc::new(Balancer {
            replicas: Mutex::new(replicas.iter().map(|&a| (a, true)).collect()),
            rng: Mutex::new(SplitMix64::new(7)),
        })
    }

    /// A random replica in rotation.
    fn pick(&self) -> Option<SocketAddr> {
        let replicas = self.replicas.lock().expect("balancer");
        let live: Vec<SocketAddr> = replicas.iter().filter(|(_, on)| *on).map(|(a, _)| *a).collect();
        let i = self.rng.lock().expect("rng").below(live.len().max(1));
        live.get(i).copied()
    }

    fn rotate(&self, replica: SocketAddr, on: bool) {
        for entry in self.replicas.lock().expect("balancer").iter_mut() {
            if entry.0 == replica {
                entry.1 = on;
            }
        }
    }

    fn jitter(&self, from: u64, to: u64) -> Duration {
        let span = usize::try_from(to - from).unwrap_or(1);
        let extra = self.rng.lock().expect("rng").below(span) as u64;
        Duration::from_millis(from + extra)
    }
}

/// What was sent and what arrived.
#[derive(Default)]
struct Tally {
    /// Per device: each message's sequence number and the POST's status (0: no answer).
    sent: Mutex<HashMap<String, Vec<(u64, u16)>>>,
    received: Mutex<HashMap<String, HashSet<u64>>>,
    /// Devices connected at least once.
    connected: Mutex<HashSet<String>>,
    /// Close frames the devices got from the proxy, by code.
    closes: Mutex<HashMap<u16, usize>>,
    /// Fires on every message received and every first connection.
    changed: Notify,
}

impl Tally {
    /// Messages not delivered: answered other than 200, or never received.
    fn lost(&self) -> (usize, usize, Vec<String>) {
        let sent = self.sent.lock().expect("tally");
        let received = self.received.lock().expect("tally");
        let (mut total, mut lost, mut examples) = (0, 0, Vec::new());
        for (device, messages) in sent.iter() {
            for &(seq, status) in messages {
                total += 1;
                let arrived = received.get(device).is_some_and(|r| r.contains(&seq));
                if status != 200 || !arrived {
                    lost += 1;
                    if examples.len() < 10 {
                        examples.push(format!("{device} #{seq}: status {status}, arrived {arrived}"));
                    }
                }
            }
        }
        (total, lost, examples)
    }

    /// Messages received, over all devices.
    fn received_total(&self) -> usize {
        self.received.lock().expect("tally").values().map(HashSet::len).sum()
    }

    /// Whether every message answered 200 has arrived.
    fn all_200_arrived(&self) -> bool {
        let sent = self.sent.lock().expect("tally");
        let received = self.received.lock().expect("tally");
        sent.iter().all(|(device, messages)| {
            messages
                .iter()
                .filter(|(_, s)| *s == 200)
                .all(|(seq, _)| received.get(device).is_some_and(|r| r.contains(seq)))
        })
    }
}

/// One device: holds a WebSocket, records what it receives, and after any
/// close reconnects 100–300 ms later through a random replica.
async fn device(
    id: String,
    first: SocketAddr,
    balancer: Arc<Balancer>,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) {
    let mut target = Some(first);
    loop {
        if *stop.borrow() {
            return;
        }
        if let Some(addr) = target {
            let url = format!("ws://{addr}/devices/{id}/ws");
            let connected = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(&url)).await;
            if let Ok(Ok((mut ws, _))) = connected {
                if tally.connected.lock().expect("tally").insert(id.clone()) {
                    tally.changed.notify_waiters();
                }
                loop {
                    let incoming = tokio::select! {
                        incoming = ws.next() => Some(incoming),
                        _ = async { let _ = stop.wait_for(|s| *s).await; } => None,
                    };
                    let Some(incoming) = incoming else {
                        let _ = ws.close(None).await;
                        return;
                    };
                    match incoming {
                        Some(Ok(Message::Text(text))) => {
                            let seq = text.rsplit('#').next().and_then(|n| n.parse::<u64>().ok());
                            if let Some(seq) = seq {
                                tally.received.lock().expect("tally").entry(id.clone()).or_default().insert(seq);
                                tally.changed.notify_waiters();
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.map_or(1005, |f| u16::from(f.code));
                            *tally.closes.lock().expect("tally").entry(code).or_default() += 1;
                            // Finish the close handshake, as a real client does.
                            while let Some(Ok(_)) = ws.next().await {}
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
            }
        }
        tokio::time::sleep(balancer.jitter(100, 300)).await;
        target = balancer.pick();
    }
}

/// One device's sender: a message every [`PERIOD`] through a random replica.
async fn sender(id: String, balancer: Arc<Balancer>, tally: Arc<Tally>, stop: watch::Receiver<bool>) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Spread the devices' senders over the period.
    tokio::time::sleep(balancer.jitter(0, PERIOD.as_millis() as u64)).await;
    for seq in 0u64.. {
        tick.tick().await;
        if *stop.borrow() {
            return;
        }
        let Some(addr) = balancer.pick() else { continue };
        let request = hyper::Request::post(format!("http://{addr}/devices/{id}/messages"))
            .body(Full::new(Bytes::from(format!("{id} #{seq}"))))
            .expect("request");
        let status = match tokio::time::timeout(STEP, client.request(request)).await {
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                let _ = tokio::time::timeout(STEP, response.into_body().collect()).await;
                status
            }
            _ => 0,
        };
        tally.sent.lock().expect("tally").entry(id.clone()).or_default().push((seq, status));
    }
}

/// Devices and their senders, running until [`Fleet::finish`].
struct Fleet {
    tally: Arc<Tally>,
    stop_sending: watch::Sender<bool>,
    stop_devices: watch::Sender<bool>,
    senders: Vec<tokio::task::JoinHandle<()>>,
    devices: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Connects every device through `first` and starts the senders once
    /// all are connected.
    async fn start(first: SocketAddr, balancer: &Arc<Balancer>, seed: u64) -> Fleet {
        let tally = Arc::new(Tally::default());
        let (stop_sending, sending) = watch::channel(false);
        let (stop_devices, living) = watch::channel(false);
        let mut ids = Ids::new(seed);
        let names: Vec<String> = (0..DEVICES).map(|_| ids.next_id()).collect();
        let devices = names
            .iter()
            .map(|id| {
                let (b, t, s) = (Arc::clone(balancer), Arc::clone(&tally), living.clone());
                tokio::spawn(device(id.clone(), first, b, t, s))
            })
            .collect();
        within("every device connects", async {
            loop {
                let changed = tally.changed.notified();
                if tally.connected.lock().expect("tally").len() == DEVICES {
                    return;
                }
                changed.await;
            }
        })
        .await;
        let senders = names
            .iter()
            .map(|id| {
                let (b, t, s) = (Arc::clone(balancer), Arc::clone(&tally), sending.clone());
                tokio::spawn(sender(id.clone(), b, t, s))
            })
            .collect();
        Fleet { tally, stop_sending, stop_devices, senders, devices }
    }

    /// Waits (bounded) until `more` messages have arrived beyond those
    /// already received: traffic is flowing, whatever the machine's load.
    async fn wait_for_traffic(&self, what: &str, more: usize) {
        let goal = self.tally.received_total() + more;
        within(what, async {
            loop {
                let changed = self.tally.changed.notified();
                if self.tally.received_total() >= goal {
                    return;
                }
                changed.await;
            }
        })
        .await;
    }

    /// Stops sending, waits (bounded) for the messages answered 200 to
    /// arrive, stops the devices, and returns the tally.
    async fn finish(self) -> Arc<Tally> {
        let _ = self.stop_sending.send(true);
        for sender in self.senders {
            within("sender stops", sender).await.expect("sender task");
        }
        let tally = Arc::clone(&self.tally);
        let _ = tokio::time::timeout(SETTLE, async {
            loop {
                let changed = tally.changed.notified();
                if tally.all_200_arrived() {
                    return;
                }
                changed.await;
            }
        })
        .await;
        let _ = self.stop_devices.send(true);
        for device in self.devices {
            within("device stops", device).await.expect("device task");
        }
        self.tally
    }
}

fn assert_nothing_lost(what: &str, tally: &Tally) {
    let (total, lost, examples) = tally.lost();
    assert!(total >= DEVICES * 4, "{what}: only {total} messages sent");
    assert_eq!(lost, 0, "{what}: {lost} of {total} messages lost, e.g. {examples:#?}");
    eprintln!("{what}: {total} messages, 0 lost; closes seen by devices: {:?}", tally.closes.lock().expect("tally"));
}

fn config(apps: &[DemoInstance], routing: &str, listen: &str, extra: &str) -> String {
    let mut text = format!(
        "[server]\nlisten = \"{listen}\"\nshutdown_grace = \"2s\"\n{extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [reload]\nwatch = false\n\n[routing]\n{ALL_KEYS}\n{routing}\n"
    );
    for app in apps {
        text.push_str(&format!("\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n", app.name(), app.addr()));
    }
    text
}

/// A 4th instance is added, reloaded on replica A and on B 2 s later, as a
/// rolling ConfigMap update does, while messages flow through both.
async fn rolling_ring_change(rebalance: &str) {
    let apps = start_apps(4).await;
    let routing = format!("rebalance = \"{rebalance}\"");
    let before = config(&apps[..3], &routing, "127.0.0.1:0", "");
    let after = config(&apps, &routing, "127.0.0.1:0", "");
    let (file_a, file_b) = (ConfigFile::new("a.toml", &before), ConfigFile::new("b.toml", &before));
    let a = start_proxy_from(&file_a).await;
    let b = start_proxy_from(&file_b).await;
    let balancer = Balancer::new(&[a.proxy_addr(), b.proxy_addr()]);
    let fleet = Fleet::start(a.proxy_addr(), &balancer, 21).await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let reload = |proxy: &RunningProxy, file: &ConfigFile| {
        file.write(&after);
        proxy.reloader().reload(Trigger::Admin).expect("reload");
    };
    reload(&a, &file_a);
    tokio::time::sleep(Duration::from_secs(2)).await;
    reload(&b, &file_b);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let on_new_instance = apps[3].connected_devices();
    let tally = fleet.finish().await;
    assert_nothing_lost(&format!("rolling ring change, rebalance = {rebalance}"), &tally);
    if rebalance == "migrate" {
        assert!(on_new_instance > 0, "the new instance got its devices");
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_ring_change_loses_no_message_with_migrate() {
    rolling_ring_change("migrate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_ring_change_loses_no_message_with_keep() {
    rolling_ring_change("keep").await;
}

/// Replica A, the real binary, gets SIGTERM while every device's socket
/// went through it, and is started again on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restart_loses_no_message() {
    let apps = start_apps(3).await;
    // shutdown_delay covers the balancer's reaction, as it covers endpoint
    // removal on Kubernetes; retry_for covers a device's reconnect
    // (100-300 ms, stretched on a loaded machine) for messages posted while
    // its socket is away.
    let delay = "shutdown_delay = \"2s\"";
    let routing = "not_here = { retry_for = \"10s\" }";
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let file_a = ConfigFile::new("a.toml", &config(&apps, routing, &port.to_string(), delay));
    let file_b = ConfigFile::new("b.toml", &config(&apps, routing, "127.0.0.1:0", delay));
    let mut a = ChildProxy::spawn(&file_a.path);
    let b = start_proxy_from(&file_b).await;
    let balancer = Balancer::new(&[port, b.proxy_addr()]);
    let fleet = Fleet::start(port, &balancer, 22).await;
    fleet.wait_for_traffic("messages flow before the restart", DEVICES).await;

    // SIGTERM, and A leaves the balancer's rotation at the same time, as a
    // deleted pod leaves its Service's endpoints; A turns unready at once
    // and serves on for shutdown_delay what was already on its way.
    a.signal("TERM");
    balancer.rotate(port, false);
    let (http, admin_a) = (Http::default(), a.admin.clone());
    within("A turns unready", async {
        while http.get(&format!("http://{admin_a}/readyz"), &[]).await.status != 503 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    a.wait_for_log("stopped");
    let exited = within("A exits", tokio::task::spawn_blocking(move || a.child.wait())).await;
    assert!(exited.expect("join").expect("wait").success(), "A exits cleanly on SIGTERM");
    fleet.wait_for_traffic("messages flow while A is away", DEVICES).await;

    // Started again on the same address, back in rotation once ready.
    let a = ChildProxy::spawn(&file_a.path);
    let admin_a = a.admin.clone();
    within("A is ready again", async {
        while http.get(&format!("http://{admin_a}/readyz"), &[]).await.status != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    balancer.rotate(port, true);
    fleet.wait_for_traffic("messages flow after A is back", 2 * DEVICES).await;

    let tally = fleet.finish().await;
    assert_nothing_lost("replica restart", &tally);
    let going_away = tally.closes.lock().expect("tally").get(&1001).copied().unwrap_or(0);
    assert_eq!(going_away, DEVICES, "every device's tunnel through A was closed with 1001 once");
    drop(a);
    b.shutdown().await;
}

/// Requests any client can send, that the app drops or answers slowly,
/// change nobody's routing: no backend goes down and no tunnel closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_change_nobodys_routing() {
    let apps = start_apps(2).await;
    let file = ConfigFile::new(
        "h.toml",
        &config(&apps, "", "127.0.0.1:0", "").replace("[reload]", "[upstream]\nresponse_timeout = \"1s\"\n\n[reload]"),
    );
    let proxy = start_proxy_from(&file).await;
    let balancer = Balancer::new(&[proxy.proxy_addr()]);
    let fleet = Fleet::start(proxy.proxy_addr(), &balancer, 23).await;
    let http = Http::default();
    let addr = proxy.proxy_addr();
    let mut ids = Ids::new(99);
    let mut owners = HashSet::new();
    for _ in 0..8 {
        let id = ids.next_id();
        owners.insert(proxy.router().load().owner(id.as_bytes()).expect("owner").id.clone());
        // The app closes the connection without an answer.
        let reply = http.get(&format!("http://{addr}/hangup"), &[("x-device-id", &id)]).await;
        assert_eq!(reply.status, 502, "{}", reply.body);
    }
    assert_eq!(owners.len(), 2, "both backends were hung up on");
    for _ in 0..2 {
        let id = ids.next_id();
        let reply = http.get(&format!("http://{addr}/delay/3000"), &[("x-device-id", &id)]).await;
        assert_eq!(reply.status, 504, "{}", reply.body);
    }
    for app in &apps {
        assert_eq!(proxy.router().load().is_up(app.name()), Some(true), "{} stays up", app.name());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = fleet.finish().await;
    assert_nothing_lost("hostile requests", &tally);
    assert!(tally.closes.lock().expect("tally").is_empty(), "no tunnel was closed: {:?}", tally.closes);
    let m = parse_prometheus(&http.get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await.body);
    for app in &apps {
        assert_eq!(metric(&m, "sticky_proxy_backend_up", &[("backend", app.name())]), Some(1.0));
    }
    assert!(metric_sum(&m, "sticky_proxy_upstream_errors_total", &[]) >= 10.0, "the failures were counted");
    proxy.shutdown().await;
}
