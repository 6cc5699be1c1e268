//! Bodies stream through the proxy: 50 MB up and down without the proxy's
//! memory growing. The proxy runs as its own process so its RSS is its own.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SIZE: usize = 50 * 1024 * 1024;
/// Allowed growth of the proxy's peak RSS while moving 100 MB.
const MAX_GROWTH_KB: u64 = 8 * 1024;

/// `VmRSS` / `VmHWM` of a process, in kB.
fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_both_ways_in_constant_memory() {
    let apps = start_apps(1).await;
    let file = ConfigFile::new("stream.toml", &config_for(&apps, ALL_KEYS, ""));
    let proxy = ChildProxy::spawn(&file.path);
    let (pid, addr) = (proxy.child.id(), proxy.addr.clone());
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();

    // Warm up (pools, allocator arenas), then take the baseline peak.
    let warm = Request::post(format!("http://{addr}/echo"))
        .header("x-device-id", "d1")
        .body(Full::new(Bytes::from(vec![7u8; 1 << 20])));
    let response = within("warm-up", client.request(warm.expect("request"))).await.expect("warm-up");
    within("warm-up body", response.into_body().collect()).await.expect("warm-up body");
    let baseline = memory_kb(pid, "VmHWM:");

    // Upload 50 MB to /echo and count what streams back.
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let request =
        Request::post(format!("http://{addr}/echo")).header("x-device-id", "d1").body(Full::new(Bytes::from(payload)));
    let response = within("echo", client.request(request.expect("request"))).await.expect("echo");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut received, mut mismatch) = (0usize, None);
    while let Some(frame) = within("echo frame", body.frame()).await {
        if let Ok(data) = frame.expect("frame").into_data() {
            for (j, b) in data.iter().enumerate() {
                if mismatch.is_none() && *b != ((received + j) % 251) as u8 {
                    mismatch = Some(received + j);
                }
            }
            received += data.len();
        }
    }
    assert_eq!(received, SIZE, "all bytes echoed");
    assert_eq!(mismatch, None, "echoed bytes are identical");

    // Download 50 MB.
    let request =
        Request::get(format!("http://{addr}/bytes/{SIZE}")).header("x-device-id", "d1").body(Full::new(Bytes::new()));
    let response = within("download", client.request(request.expect("request"))).await.expect("download");
    let mut body = response.into_body();
    let mut received = 0usize;
    while let Some(frame) = within("download frame", body.frame()).await {
        received += frame.expect("frame").into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, SIZE);

    let peak = memory_kb(pid, "VmHWM:");
    eprintln!("proxy peak RSS: baseline {baseline} kB, after 100 MB {peak} kB");
    assert!(
        peak.saturating_sub(baseline) < MAX_GROWTH_KB,
        "proxy peak RSS grew by {} kB (baseline {baseline} kB, peak {peak} kB) moving 100 MB",
        peak - baseline
    );
}
