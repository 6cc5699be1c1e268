//! Connection-aware routing: while the ring changes under 300 open
//! WebSockets, a message always finds its device's socket; with
//! `rebalance = "migrate"` misplaced tunnels move to their new owner with a
//! clean 1012 close, at the configured rate.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use sticky_proxy::config::Config;
use sticky_proxy::routing::RoutingTable;
use sticky_proxy::tools::demo::DemoInstance;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const DEVICES: usize = 300;
const SECONDS: u64 = 10;

/// What happened to one device during the run.
#[derive(Debug, Default)]
struct DeviceLog {
    delivered: u32,
    /// POSTs not answered 200 (the device had no socket where they went).
    missed: u32,
    /// POSTs answered 200 whose message never reached the device.
    lost: u32,
    /// When each proxy-initiated close arrived, and its code.
    closes: Vec<(Instant, Option<u16>)>,
    /// Backend of each reconnection (from the admin API).
    reconnected_to: Vec<String>,
}

struct Run {
    logs: HashMap<String, DeviceLog>,
    misplaced: HashSet<String>,
    new_owner: HashMap<String, String>,
    metrics: Vec<Sample>,
    /// Scraped just after the reload.
    metrics_after_reload: Vec<Sample>,
    backends_json: serde_json::Value,
}

/// 300 devices on apps 1–3; after about 2 s a reload adds app-4. Each device
/// gets one POST a second for 10 s, and reconnects at once if closed. With
/// `migrate`, the devices stay connected after their POSTs until the proxy
/// reports no misplaced tunnel, so a slow machine can't end the run before
/// the last move.
async fn scenario(routing_extra: &str) -> Run {
    // One scenario at a time: two at once are 600 devices and 8 apps on a
    // 2-core machine, and every clock in them stretches.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let migrate = routing_extra.contains("\"migrate\"");
    let apps = start_apps(4).await;
    // A POST that meets a device mid-move is held until the device is back;
    // on a loaded machine reconnecting can take longer than the default 3 s.
    let routing = format!("{ALL_KEYS}\n{routing_extra}\n[routing.not_here]\nretry_for = \"15s\"");
    let before = config_for(&apps[..3], &routing, "[reload]\nwatch = false");
    let after = config_for(&apps, &routing, "[reload]\nwatch = false");
    let file = ConfigFile::new("rebalance.toml", &before);
    let proxy = start_proxy_from(&file).await;
    let (addr, admin) = (proxy.proxy_addr(), proxy.admin_addr());

    let old = RoutingTable::offline(&Config::parse(&before).expect("config"));
    let new = RoutingTable::offline(&Config::parse(&after).expect("config"));
    let mut ids = Ids::new(55);
    let devices: Vec<String> = (0..DEVICES).map(|_| ids.next_id()).collect();
    let owner = |t: &RoutingTable, d: &str| t.owner(d.as_bytes()).expect("owner").id.clone();
    let misplaced: HashSet<String> = devices.iter().filter(|d| owner(&old, d) != owner(&new, d)).cloned().collect();
    let new_owner: HashMap<String, String> = devices.iter().map(|d| (d.clone(), owner(&new, d))).collect();
    assert!(misplaced.len() > 40, "adding a 4th backend moves about a quarter: {}", misplaced.len());
    assert!(misplaced.iter().all(|d| new_owner[d] == "app-4"), "keys only move to the new backend");

    let mut sockets = Vec::new();
    for d in &devices {
        sockets.push(connect_device(addr, d).await);
    }
    let http = Http::default();
    let start = tokio::time::Instant::now();
    let logs = Arc::new(Mutex::new(HashMap::new()));
    let (all_moved, moved) = tokio::sync::watch::channel(!migrate);
    let mut tasks = Vec::new();
    for (device, ws) in devices.iter().cloned().zip(sockets) {
        let (http, logs, moved) = (http.clone(), Arc::clone(&logs), moved.clone());
        tasks.push(tokio::spawn(async move {
            let log = drive_device(&http, addr, admin, &device, ws, start, moved).await;
            logs.lock().expect("logs").insert(device, log);
        }));
    }

    // The ring change, while the devices are busy.
    tokio::time::sleep_until(start + Duration::from_millis(2000)).await;
    file.write(&after);
    let reply = http.send(Method::POST, &format!("http://{admin}/reload"), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // What the proxy reports just after the change.
    let backends_json: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/backends"), &[]).await.body).expect("json");
    let metrics_after_reload = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
    if migrate {
        within("every misplaced tunnel moved", async {
            loop {
                let text = http.get(&format!("http://{admin}/metrics"), &[]).await.body;
                if metric_sum(&parse_prometheus(&text), "sticky_proxy_tunnels_misplaced", &[]) == 0.0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let _ = all_moved.send(true);
    }

    for task in tasks {
        within("device task", task).await.expect("device task");
    }
    let metrics = parse_prometheus(&http.get(&format!("http://{admin}/metrics"), &[]).await.body);
    proxy.shutdown().await;
    drop(apps);
    let logs = std::mem::take(&mut *logs.lock().expect("logs"));
    Run { logs, misplaced, new_owner, metrics, metrics_after_reload, backends_json }
}

/// One device: a POST every second through the proxy, each message awaited
/// on the device's socket; a close from the proxy is answered by
/// reconnecting straight away, as a real device would.
async fn drive_device(
    http: &Http,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    device: &str,
    mut ws: Ws,
    start: tokio::time::Instant,
    mut moved: tokio::sync::watch::Receiver<bool>,
) -> DeviceLog {
    let mut log = DeviceLog::default();
    let mut tick = tokio::time::interval_at(start, Duration::from_secs(1));
    for n in 0..SECONDS {
        // Between POSTs, watch the socket: a close means reconnect now.
        loop {
            tokio::select! {
                _ = tick.tick() => break,
                incoming = ws.next() => match incoming {
                    Some(Ok(Message::Close(frame))) => {
                        log.closes.push((Instant::now(), frame.map(|f| u16::from(f.code))));
                        let early;
                        (ws, early) = reconnect(addr, admin, device, &mut log).await;
                        assert!(early.is_empty(), "{device}: nothing was sent: {early:?}");
                    }
                    Some(Ok(other)) => panic!("{device}: unexpected message {other:?}"),
                    other => panic!("{device}: socket failed instead of closing cleanly: {other:?}"),
                },
            }
        }
        let body = format!("{device} #{n}");
        let url = format!("http://{addr}/devices/{device}/messages");
        let post = http.post(&url, &body);
        tokio::pin!(post);
        // While the POST is out the device goes on reading its socket: a
        // close means reconnect now (the POST may be held by the proxy
        // until the device's socket shows up again), and the message may
        // arrive before the POST's answer does.
        let mut arrived = false;
        let reply = loop {
            let event = tokio::select! {
                reply = &mut post => break reply,
                incoming = ws.next() => incoming,
            };
            match event {
                Some(Ok(Message::Text(t))) if t.as_str() == body && !arrived => arrived = true,
                Some(Ok(Message::Close(frame))) => {
                    log.closes.push((Instant::now(), frame.map(|f| u16::from(f.code))));
                    let early;
                    (ws, early) = reconnect(addr, admin, device, &mut log).await;
                    arrived |= early.contains(&body);
                    assert!(early.iter().all(|m| *m == body), "{device}: only {body:?} may come early: {early:?}");
                }
                other => panic!("{device}: unexpected {other:?} while posting {body:?}"),
            }
        };
        if reply.status != 200 {
            log.missed += 1;
            continue;
        }
        if arrived {
            log.delivered += 1;
            continue;
        }
        // Delivered by the backend: it must reach the device, even if the
        // proxy closes the tunnel right now (the close comes after it).
        match within("message on the socket", ws.next()).await {
            Some(Ok(Message::Text(t))) if t.as_str() == body => log.delivered += 1,
            Some(Ok(Message::Close(frame))) => {
                log.lost += 1;
                log.closes.push((Instant::now(), frame.map(|f| u16::from(f.code))));
                (ws, _) = reconnect(addr, admin, device, &mut log).await;
            }
            other => panic!("{device}: expected {body:?}, got {other:?}"),
        }
    }
    // Stay until every move is done: a close now is still a move.
    loop {
        tokio::select! {
            done = async { moved.wait_for(|done| *done).await.is_ok() } => {
                assert!(done, "the run ended before the moves did");
                break;
            }
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Close(frame))) => {
                    log.closes.push((Instant::now(), frame.map(|f| u16::from(f.code))));
                    (ws, _) = reconnect(addr, admin, device, &mut log).await;
                }
                other => panic!("{device}: unexpected {other:?} after its messages"),
            },
        }
    }
    let _ = within("close", ws.close(None)).await;
    log
}

async fn reconnect(
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    device: &str,
    log: &mut DeviceLog,
) -> (Ws, Vec<String>) {
    let (ws, early) = connect_device_collecting(addr, device).await;
    let info: serde_json::Value =
        serde_json::from_str(&Http::default().get(&format!("http://{admin}/devices/{device}"), &[]).await.body)
            .expect("json");
    log.reconnected_to.push(info["tunnels"][0]["backend"].as_str().unwrap_or("?").to_string());
    (ws, early)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keep_no_message_is_lost_and_no_tunnel_is_closed() {
    let run = scenario("rebalance = \"keep\"").await;
    let total: u32 = run.logs.values().map(|l| l.delivered).sum();
    assert_eq!(total as usize, DEVICES * SECONDS as usize, "every POST delivered");
    for (device, log) in &run.logs {
        assert_eq!((log.missed, log.lost), (0, 0), "{device}");
        assert!(log.closes.is_empty(), "{device} was closed: {:?}", log.closes);
    }
    // The misplaced devices' HTTP followed their tunnels to the old owner.
    let by_tunnel = metric(&run.metrics, "sticky_proxy_http_routed_total", &[("via", "tunnel")]).unwrap_or(0.0);
    assert!(by_tunnel >= (DEVICES * SECONDS as usize) as f64, "{by_tunnel}");
    let misplaced = metric_sum(&run.metrics_after_reload, "sticky_proxy_tunnels_misplaced", &[]);
    assert_eq!(misplaced as usize, run.misplaced.len());
    let reported: u64 = run.backends_json["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["misplaced_websockets"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(reported as usize, run.misplaced.len(), "/backends counts the misplaced tunnels");
    assert_eq!(metric_sum(&run.metrics, "sticky_proxy_tunnel_migrations_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_migrate_misplaced_devices_move_at_the_rate_and_no_other_is_closed() {
    const RATE: f64 = 40.0;
    let run = scenario(&format!("rebalance = \"migrate\"\nrebalance_rate = {RATE}")).await;
    let mut close_times = Vec::new();
    for (device, log) in &run.logs {
        assert_eq!(log.lost, 0, "{device}: a message the backend accepted was lost");
        if run.misplaced.contains(device) {
            assert_eq!(log.closes.len(), 1, "{device} is moved exactly once: {:?}", log.closes);
            assert_eq!(log.closes[0].1, Some(1012), "{device}: closed with 1012 (service restart)");
            assert_eq!(log.reconnected_to, [run.new_owner[device].clone()], "{device} reconnects to its new owner");
            // Not even the POST that falls between close and reconnect:
            // the old owner answers "not here", and the proxy holds it
            // until the device's socket is back.
            assert_eq!(log.missed, 0, "{device}: {log:?}");
            close_times.push(log.closes[0].0);
        } else {
            assert!(log.closes.is_empty(), "{device} was not misplaced but was closed: {:?}", log.closes);
            assert_eq!(log.missed, 0, "{device}");
        }
        assert_eq!(log.delivered + log.missed, SECONDS as u32, "{device}");
    }
    assert_eq!(metric_sum(&run.metrics, "sticky_proxy_tunnel_migrations_total", &[]) as usize, run.misplaced.len());
    assert_eq!(metric_sum(&run.metrics, "sticky_proxy_tunnels_misplaced", &[]), 0.0);

    // The rate: closes spread over at least n / RATE seconds, never much
    // more than RATE in any one second. (Times are taken where the devices
    // see the close, so a busy machine may bunch a few together; it can
    // only make the spread longer, not shorter.)
    close_times.sort();
    let n = close_times.len();
    let span = close_times[n - 1] - close_times[0];
    // n closes in n slots of 1/RATE, each at a random point of its slot,
    // span at least n - 2 slots; a fifth of slack for the delivery delays
    // of a loaded machine. Without pacing they would all come within a few
    // milliseconds.
    let expected = Duration::from_secs_f64(0.8 * (n - 2) as f64 / RATE);
    assert!(span >= expected, "{n} closes took {span:?}, faster than the rate allows ({expected:?})");
    // Stalled: much slower than the rate, beyond what a loaded machine's
    // delays (a few seconds) explain.
    assert!(span <= Duration::from_secs_f64(3.0 * n as f64 / RATE + 8.0), "{n} closes took {span:?}: stalled");
    for (i, t) in close_times.iter().enumerate() {
        let in_window = close_times[i..].iter().take_while(|u| **u - *t < Duration::from_secs(1)).count();
        assert!(in_window as f64 <= RATE * 1.5 + 2.0, "{in_window} closes within one second");
    }
}

/// A backend that streams large fragmented binary messages as raw frames,
/// split across TCP writes so the proxy often sees the middle of a frame.
/// With `answers_close`, it answers the proxy's close frame (after the
/// frame it is writing); otherwise it ignores it and keeps streaming.
async fn streaming_backend(answers_close: bool) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(stream_frames(stream, answers_close));
        }
    });
    addr
}

async fn stream_frames(mut stream: TcpStream, answers_close: bool) {
    // The upgrade request.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        if stream.read_exact(&mut byte).await.is_err() {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.to_ascii_lowercase().contains("upgrade: websocket") {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        return;
    }
    let key = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-key"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let (mut reader, mut writer) = stream.into_split();
    let (closed_tx, mut closed_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        // The only frame the proxy sends here is its close frame.
        let mut header = [0u8; 2];
        if reader.read_exact(&mut header).await.is_ok() && header[0] & 0x0f == 0x8 {
            let _ = closed_tx.send(true);
        }
        let mut sink = [0u8; 1024];
        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    // Bounded: at most 400 messages of 4 × 40 KB fragments, paced at about
    // 8 MB/s so the test doesn't eat the machine.
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(5));
    for m in 0..400u32 {
        for fragment in 0..4u8 {
            pace.tick().await;
            if answers_close && *closed_rx.borrow_and_update() {
                let _ = writer.write_all(&[0x88, 0x02, 0x03, 0xe9]).await;
                let _ = writer.shutdown().await;
                return;
            }
            let opcode = if fragment == 0 { 0x2 } else { 0x0 };
            let fin = if fragment == 3 { 0x80 } else { 0 };
            let payload: Vec<u8> = (0..40_000u32).map(|i| ((m + i) % 251) as u8).collect();
            let mut frame = vec![fin | opcode, 126];
            frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            frame.extend_from_slice(&payload);
            for piece in frame.chunks(7_000) {
                if writer.write_all(piece).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

async fn close_while_streaming(answers_close: bool) {
    let apps = start_apps(1).await;
    let backend = streaming_backend(answers_close).await;
    let routing = format!("{ALL_KEYS}\nrebalance_rate = 1000");
    let one = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routing]\n{routing}\n[reload]\nwatch = false\n\n[[backends]]\nid = \"streamer\"\naddress = \"{backend}\"\n"
    );
    let two = format!("{one}\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n", apps[0].name(), apps[0].addr());
    let new = RoutingTable::offline(&Config::parse(&two).expect("config"));
    let mut ids = Ids::new(99);
    let device = std::iter::repeat_with(|| ids.next_id())
        .find(|d| new.owner(d.as_bytes()).expect("owner").id == "app-1")
        .expect("a device that moves");
    let file = ConfigFile::new("stream.toml", &one);
    let proxy = start_proxy_from(&file).await;
    let url = format!("ws://{}/devices/{device}/ws", proxy.proxy_addr());
    let (mut ws, _) = within(&url, tokio_tungstenite::connect_async(&url)).await.expect("connect");
    // Take a few whole messages, then move the device while more stream in.
    for _ in 0..3 {
        match within("message", ws.next()).await {
            Some(Ok(Message::Binary(b))) => assert_eq!(b.len(), 160_000),
            other => panic!("expected a streamed message, got {other:?}"),
        }
    }
    file.write(&two);
    let reply = Http::default().send(Method::POST, &format!("http://{}/reload", proxy.admin_addr()), &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut whole = 0;
    let code = loop {
        match within("close frame", ws.next()).await {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(b.len(), 160_000, "only whole messages");
                let m = u32::from(b[0]);
                let intact = b.iter().enumerate().all(|(i, v)| u32::from(*v) == (m + (i % 40_000) as u32) % 251);
                assert!(intact, "intact payload");
                whole += 1;
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            other => panic!("expected messages then a clean close, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1012));
    // After the close, the stream ends cleanly: no protocol error.
    match within("end of stream", ws.next()).await {
        None | Some(Ok(Message::Close(_))) => {}
        Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => {}
        other => panic!("expected a clean end after the close frame, got {other:?} (after {whole} messages)"),
    }
    // The device reconnects to its new owner.
    let mut ws = connect_device(proxy.proxy_addr(), &device).await;
    within("send", ws.send(Message::text("hello"))).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "hello");
    assert_eq!(apps[0].sockets_for(&device), 1);
    proxy.shutdown().await;
    drop::<Vec<DemoInstance>>(apps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_frame_lands_between_frames_of_a_backend_that_answers() {
    close_while_streaming(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_frame_lands_between_frames_of_a_backend_that_ignores_it() {
    close_while_streaming(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_says_where_a_device_is_and_why() {
    let (apps, proxy) = stack(3).await;
    let http = Http::default();
    let admin = proxy.admin_addr();
    let device = "dev a/b";
    let encoded = "dev%20a%2Fb";
    let info: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/devices/{encoded}"), &[]).await.body).expect("json");
    let owner = proxy.router().load().owner(device.as_bytes()).expect("owner").id.clone();
    assert_eq!(info["tunnels"].as_array().map(Vec::len), Some(0), "{info}");
    assert_eq!(info["http"]["via"], "ring owner", "{info}");
    assert_eq!(info["http"]["backend"]["id"], owner.as_str(), "{info}");

    let _ws = connect_device(proxy.proxy_addr(), encoded).await;
    let info: serde_json::Value =
        serde_json::from_str(&http.get(&format!("http://{admin}/devices/{encoded}"), &[]).await.body).expect("json");
    assert_eq!(info["device"], device, "{info}");
    assert_eq!(info["tunnels"][0]["backend"], owner.as_str(), "{info}");
    assert_eq!(info["tunnels"][0]["misplaced"], false, "{info}");
    assert!(info["tunnels"][0]["open_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{info}");
    assert_eq!(info["http"]["via"], "tunnel", "{info}");
    let reply = http.get(&format!("http://{admin}/devices/"), &[]).await;
    assert_eq!(reply.status, 400);
    proxy.shutdown().await;
    drop(apps);
}
