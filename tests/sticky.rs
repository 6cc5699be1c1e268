//! The scenario sticky-proxy exists for: devices hold WebSockets on one app
//! instance, and HTTP requests about a device must reach that instance.

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

const DEVICES: usize = 200;

/// Opens a socket per device through the proxy, then POSTs one message per
/// device (in a shuffled order) and returns how many were delivered.
/// Asserts that every delivered message reached exactly its own device.
async fn deliver_to_all(proxy: std::net::SocketAddr, seed: u64) -> (usize, Vec<String>) {
    let mut ids = Ids::new(seed);
    let devices: Vec<String> = (0..DEVICES).map(|_| ids.next_id()).collect();
    let mut sockets = Vec::new();
    for d in &devices {
        sockets.push(connect_device(proxy, d).await);
    }

    // Shuffle the POST order so that round-robin can't line up by accident.
    let mut order: Vec<usize> = (0..DEVICES).collect();
    let mut shuffle = Ids::new(seed ^ 0xABCD);
    for i in (1..order.len()).rev() {
        let r = u64::from_str_radix(&shuffle.next_id()[4..], 16).unwrap_or(0);
        order.swap(i, (r % (i as u64 + 1)) as usize);
    }

    let http = Http::default();
    let mut delivered = [false; DEVICES];
    let mut answered_by = vec![String::new(); DEVICES];
    for &i in &order {
        let reply = http
            .post(&format!("http://{proxy}/devices/{}/messages", devices[i]), &format!("hello {}", devices[i]))
            .await;
        match reply.status.as_u16() {
            200 => {
                let json: serde_json::Value = serde_json::from_str(&reply.body).expect("json reply");
                answered_by[i] = json["instance"].as_str().unwrap_or_default().to_string();
                delivered[i] = true;
            }
            421 => assert!(reply.body.contains("is not connected to instance"), "{}", reply.body),
            other => panic!("unexpected status {other}: {}", reply.body),
        }
    }

    // Each device got exactly its own message (if delivered) and nothing
    // else: a marker echoed after the POSTs must be the very next message.
    for (i, ws) in sockets.iter_mut().enumerate() {
        if delivered[i] {
            assert_eq!(next_text(ws).await, format!("hello {}", devices[i]));
        }
        within("send marker", ws.send(Message::text("marker"))).await.expect("send");
        assert_eq!(next_text(ws).await, "marker", "device {} received something unexpected", devices[i]);
    }
    (delivered.iter().filter(|d| **d).count(), answered_by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_reaches_its_device_through_the_ring() {
    let (apps, proxy) = stack(3).await;
    let (delivered, answered_by) = deliver_to_all(proxy.proxy_addr(), 1).await;
    assert_eq!(delivered, DEVICES, "sticky routing must deliver every message");

    // Every instance took part, so the test didn't pass by sending all to one.
    for app in &apps {
        let answered = answered_by.iter().filter(|a| *a == app.name()).count();
        assert!(answered > DEVICES / 6, "{} delivered only {answered} messages", app.name());
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_scenario_with_round_robin_loses_most_messages() {
    // Same proxy, but the key is never found and requests are spread
    // round-robin: the only difference is the routing.
    let apps = start_apps(3).await;
    let routing = "key = [\"header:x-never-sent\"]\nmissing_key = \"spread\"";
    let proxy = start_proxy(&config_for(&apps, routing, "")).await;
    let (delivered, _) = deliver_to_all(proxy.proxy_addr(), 1).await;
    let lost = DEVICES - delivered;
    assert!(
        (DEVICES * 5 / 10..=DEVICES * 85 / 100).contains(&lost),
        "round-robin should lose about 2/3 of {DEVICES} messages, lost {lost}"
    );
    proxy.shutdown().await;
}
