//! Graceful stop: no new connections, in-flight HTTP finishes, tunnels close.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_then_closes_tunnels() {
    let (_apps, proxy) = stack(2).await;
    let addr = proxy.proxy_addr();
    let mut ws = connect_device(addr, "tunnel-device").await;

    // A response that is still streaming when the shutdown begins: its
    // headers have arrived, its 20 MB body has not (nobody reads it yet).
    const SIZE: usize = 20 * 1024 * 1024;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request =
        Request::get(format!("http://{addr}/bytes/{SIZE}")).header("x-device-id", "slow").body(Full::default());
    let response = within("response headers", client.request(request.expect("request"))).await.expect("response");
    assert_eq!(response.status(), 200);

    let shutdown = tokio::spawn(proxy.shutdown());
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(frame) = within("body frame", body.frame()).await {
        received += frame.expect("in-flight body completes").into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, SIZE, "the in-flight response is delivered whole");
    within("shutdown", shutdown).await.expect("shutdown task");

    // The tunnel is closed, and nothing accepts on the proxy port any more.
    loop {
        match within("tunnel closes", ws.next()).await {
            None | Some(Err(_)) => break,
            Some(Ok(m)) if m.is_close() => break,
            Some(Ok(_)) => continue,
        }
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener closed");
}
