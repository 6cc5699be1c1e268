//! `server.runtime = "thread-per-core"` with two workers: both workers'
//! listeners share the one (port 0) address, the kernel spreads
//! connections between them, and shutdown drains both.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sticky_proxy::app::RunningProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections each test opens: all on one of two workers by chance is 2^-63.
const CONNECTIONS: usize = 64;

async fn two_workers(apps: &[sticky_proxy::tools::demo::DemoInstance]) -> RunningProxy {
    // A grace long enough to read every held body on a loaded machine.
    let text = config_for(apps, ALL_KEYS, "")
        .replace("[server]\n", "[server]\nworkers = 2\n")
        .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"20s\"");
    start_proxy(&text).await
}

/// `sticky_proxy_worker_connections_total` of worker 0 and 1.
async fn per_worker(proxy: &RunningProxy) -> (f64, f64) {
    let metrics = Http::default().get(&format!("http://{}/metrics", proxy.admin_addr()), &[]).await;
    let samples = parse_prometheus(&metrics.body);
    let of = |worker| metric(&samples, "sticky_proxy_worker_connections_total", &[("worker", worker)]).unwrap_or(0.0);
    (of("0"), of("1"))
}

/// One request on a connection of its own; the raw answer.
async fn one_request(addr: SocketAddr, device: String) -> String {
    let mut stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
    let request = format!("GET /whoami HTTP/1.1\r\nhost: test\r\nx-device-id: {device}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    within("answer", stream.read_to_end(&mut answer)).await.expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_port_and_both_serve_connections() {
    let apps = start_apps(2).await;
    let proxy = two_workers(&apps).await;
    let addr = proxy.proxy_addr();
    assert_ne!(addr.port(), 0, "port 0 resolved");

    let requests: Vec<_> = (0..CONNECTIONS).map(|i| tokio::spawn(one_request(addr, format!("device-{i}")))).collect();
    for request in requests {
        let answer = within("request", request).await.expect("task");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let (zero, one) = per_worker(&proxy).await;
    assert_eq!(zero + one, CONNECTIONS as f64, "every connection was counted by the worker that took it");
    assert!(zero > 0.0 && one > 0.0, "both workers accepted: {zero} and {one}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_drain_their_in_flight_requests_on_shutdown() {
    let apps = start_apps(2).await;
    let proxy = two_workers(&apps).await;
    let addr = proxy.proxy_addr();

    // Responses still streaming when the shutdown begins, one per
    // connection so that both workers hold some: headers in, 1 MB bodies
    // not read yet.
    const SIZE: usize = 1024 * 1024;
    let (mut bodies, mut clients) = (Vec::new(), Vec::new());
    for i in 0..CONNECTIONS {
        // A client each: a connection each.
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        clients.push(client.clone());
        let request = Request::get(format!("http://{addr}/bytes/{SIZE}"))
            .header("x-device-id", format!("device-{i}"))
            .body(Full::default())
            .expect("request");
        let response = within("response headers", client.request(request)).await.expect("response");
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    let (zero, one) = per_worker(&proxy).await;
    assert!(zero > 0.0 && one > 0.0, "both workers hold responses: {zero} and {one}");

    let shutdown = tokio::spawn(proxy.shutdown());
    for body in bodies {
        let received = within("in-flight body", body.collect()).await.expect("the in-flight body completes");
        assert_eq!(received.to_bytes().len(), SIZE, "the in-flight response is delivered whole");
    }
    within("shutdown", shutdown).await.expect("shutdown task");
    assert!(TcpStream::connect(addr).await.is_err(), "both workers' listeners are closed");
}
