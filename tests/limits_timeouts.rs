//! Limits on the backend side, with the real binary: idle WebSocket tunnels
//! are closed after `server.tunnel_idle_timeout`, and requests past
//! `upstream.max_connections` queue for a connection, up to
//! `upstream.queue_timeout`.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// The value of `sticky_proxy_limits_total{limit}` now.
async fn limit_count(http: &Http, admin: &str, limit: &str) -> f64 {
    let metrics = http.get(&format!("http://{admin}/metrics"), &[]).await;
    let samples = parse_prometheus(&metrics.body);
    metric(&samples, "sticky_proxy_limits_total", &[("limit", limit)])
        .unwrap_or_else(|| panic!("no {limit} series in\n{}", metrics.body))
}

/// Polls the counter until it reaches `n` (bounded by [`STEP`]).
async fn until_limit_count(http: &Http, admin: &str, limit: &str, n: f64) {
    let deadline = Instant::now() + STEP;
    loop {
        let now = limit_count(http, admin, limit).await;
        if now >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{limit} still at {now} after {STEP:?}, expected {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a message and waits for its echo.
async fn echo(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text.to_string()))).await.expect("send");
    assert_eq!(next_text(ws).await, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_and_a_busy_one_is_not() {
    let idle_timeout = Duration::from_secs(1);
    let apps = start_apps(1).await;
    let text = config_for(&apps, ALL_KEYS, "").replace("[server]\n", "[server]\ntunnel_idle_timeout = \"1s\"\n");
    let file = ConfigFile::new("tunnel-idle.toml", &text);
    let mut proxy = ChildProxy::spawn(&file.path);
    let addr = proxy.addr.parse().expect("proxy address");
    let http = Http::default();
    assert_eq!(limit_count(&http, &proxy.admin, "server.tunnel_idle_timeout").await, 0.0);

    let mut idle = connect_device(addr, "idle-device").await;
    // The proxy saw the tunnel's last bytes no earlier than this.
    let idle_since = Instant::now();
    let mut busy = connect_device(addr, "busy-device").await;

    // The busy device talks every 100 ms (well inside the 1 s timeout)
    // until told to stop, while the idle one waits for its close.
    let (stop, mut stopped) = watch::channel(false);
    let talker = tokio::spawn(async move {
        let mut n = 0u64;
        while !*stopped.borrow() {
            n += 1;
            echo(&mut busy, &format!("keep-alive {n}")).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stopped.changed() => {}
            }
        }
        busy
    });

    let close = within("the idle tunnel's close", idle.next()).await;
    let waited = idle_since.elapsed();
    match close {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(waited >= idle_timeout, "closed after {waited:?}, before the idle timeout");
    // The device answers the close (tungstenite does as it reads on), and
    // the proxy ends the tunnel.
    let rest = within("the idle tunnel's end", idle.next()).await;
    assert!(!matches!(rest, Some(Ok(Message::Text(_) | Message::Binary(_)))), "after the close: {rest:?}");
    let logged = proxy.wait_for_log("idle for server.tunnel_idle_timeout");
    assert!(logged.contains("idle-device"), "{logged}");
    assert!(!logged.contains("WARN"), "an idle close is no warning: {logged}");
    until_limit_count(&http, &proxy.admin, "server.tunnel_idle_timeout", 1.0).await;

    // The busy one lives on past another whole timeout (its talker fails
    // if the tunnel closes).
    let busy_since = Instant::now();
    while busy_since.elapsed() < idle_timeout * 2 {
        assert!(!talker.is_finished(), "the busy tunnel's talker stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).expect("the talker listens");
    let mut busy = within("the busy device's talk", talker).await.expect("the busy tunnel stayed open");
    echo(&mut busy, "still here").await;
    assert_eq!(limit_count(&http, &proxy.admin, "server.tunnel_idle_timeout").await, 1.0);
}

/// A backend that holds every `/hold` request until the test releases it
/// (other paths answer at once), and counts what it sees.
struct HeldBackend {
    address: String,
    /// One permit answers one `/hold` request.
    release: Arc<Semaphore>,
    /// Requests that have arrived so far.
    arrived: watch::Receiver<usize>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl HeldBackend {
    async fn start() -> HeldBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let release = Arc::new(Semaphore::new(0));
        let (arrivals, arrived) = watch::channel(0);
        let arrivals = Arc::new(arrivals);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (gate, count) = (Arc::clone(&release), Arc::clone(&accepted));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (gate, arrivals) = (Arc::clone(&gate), Arc::clone(&arrivals));
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (gate, arrivals) = (Arc::clone(&gate), Arc::clone(&arrivals));
                    async move {
                        arrivals.send_modify(|n| *n += 1);
                        if req.uri().path() == "/hold" {
                            gate.acquire().await.expect("gate open").forget();
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        HeldBackend { address, release, arrived, accepted }
    }

    async fn until_arrived(&mut self, n: usize) {
        within(&format!("{n} requests at the backend"), self.arrived.wait_for(|&seen| seen >= n))
            .await
            .expect("the backend runs");
    }

    fn arrived_now(&self) -> usize {
        *self.arrived.borrow()
    }

    fn accepted_now(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_requests_queue_then_get_503_without_blaming_the_backend() {
    let mut backend = HeldBackend::start().await;
    let queue_timeout = Duration::from_secs(1);
    // One counted failure would take the backend down: none must count.
    // One pool: thread-per-core would split the limit between the workers'
    // pools, and which worker a connection lands on is the kernel's choice.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\nruntime = \"work-stealing\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [routing]\nkey = [\"header:x-device-id\"]\n\n\
         [upstream]\nmax_connections = 2\nqueue_timeout = \"1s\"\n\n\
         [health]\nobserve = \"responses\"\nfall = 1\n\n\
         [[backends]]\nid = \"app-1\"\naddress = \"{}\"\n",
        backend.address
    );
    let file = ConfigFile::new("max-connections.toml", &text);
    let proxy = ChildProxy::spawn(&file.path);
    let http = Http::default();
    let url = |path: &str| format!("http://{}{path}", proxy.addr);
    let spawn_get = |path: &str, device: &'static str| {
        let (http, url) = (http.clone(), url(path));
        tokio::spawn(async move { http.get(&url, &[("x-device-id", device)]).await })
    };

    // Two requests hold both connections.
    let a = spawn_get("/hold", "device-a");
    let b = spawn_get("/hold", "device-b");
    backend.until_arrived(2).await;
    assert_eq!(backend.accepted_now(), 2);

    // A third can't have a connection: it is answered only once one frees
    // up, and on that connection, not a third.
    let c = spawn_get("/now", "device-c");
    assert_eq!(backend.arrived_now(), 2, "the third request reached the backend with both connections busy");
    assert!(!c.is_finished());
    backend.release.add_permits(1);
    let c = within("the third request", c).await.expect("task");
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(backend.accepted_now(), 2, "no connection past max_connections");
    // The released one of the two answered too.
    let (mut a, mut b) = (a, b);
    let a_done = within("the released request", async {
        tokio::select! {
            done = &mut a => { assert_eq!(done.expect("task").status, 200); true }
            done = &mut b => { assert_eq!(done.expect("task").status, 200); false }
        }
    })
    .await;
    let other = if a_done { b } else { a };

    // Both connections held again: a fourth waits queue_timeout, then 503.
    let e = spawn_get("/hold", "device-e");
    backend.until_arrived(4).await;
    let sent = Instant::now();
    let d = http.get(&url("/now"), &[("x-device-id", "device-d")]).await;
    let waited = sent.elapsed();
    assert_eq!(d.status, 503, "{}", d.body);
    assert_eq!(
        d.body.trim_end(),
        "backend app-1 has upstream.max_connections = 2 connections busy; \
         no connection came free within upstream.queue_timeout (1s)"
    );
    assert!(waited >= queue_timeout, "answered after {waited:?}, before the queue timeout");
    assert_eq!(backend.arrived_now(), 4, "the refused request never reached the backend");
    assert_eq!(limit_count(&http, &proxy.admin, "upstream.queue_timeout").await, 1.0);

    // The backend is only busy, not failing: still up, no upstream errors.
    let metrics = http.get(&format!("http://{}/metrics", proxy.admin), &[]).await;
    let samples = parse_prometheus(&metrics.body);
    assert_eq!(metric(&samples, "sticky_proxy_backend_up", &[("backend", "app-1")]), Some(1.0), "{}", metrics.body);
    let errors = metric_sum(&samples, "sticky_proxy_upstream_errors_total", &[("backend", "app-1")]);
    assert_eq!(errors, 0.0, "{}", metrics.body);

    backend.release.add_permits(2);
    for held in [other, e] {
        assert_eq!(within("a held request", held).await.expect("task").status, 200);
    }
    let after = http.get(&url("/now"), &[("x-device-id", "device-d")]).await;
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(backend.accepted_now(), 2);
}
