//! WebSockets over HTTP/2 (RFC 8441) bridged to HTTP/1.1 upgrades (RFC 6455).
//!
//! An HTTP/2 client opens a WebSocket with an extended CONNECT on a stream
//! of its connection (`:method CONNECT`, `:protocol websocket`); backends
//! only know the HTTP/1.1 upgrade. [`to_http1_upgrade`] rewrites the
//! request into that upgrade (GET, `Connection: upgrade`, `Upgrade:
//! websocket`, a fresh `Sec-WebSocket-Key`, version 13; subprotocols and
//! extensions pass through as they are), and [`Bridge::answer`] checks the
//! backend's `101` (its `Sec-WebSocket-Accept` must match our key) and turns
//! it into the `200` an HTTP/2 client expects. After that both sides carry
//! the same WebSocket frames, so the tunnel copies bytes as for HTTP/1.1.
//!
//! Only the request's and response's heads change here; opening the
//! backend connection and copying are [`super::handshake`]'s.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// An HTTP/2 extended CONNECT for a WebSocket (`:protocol = websocket`).
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req.extensions().get::<hyper::ext::Protocol>().is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// What is needed to check the backend's answer to a bridged upgrade.
#[derive(Debug)]
pub struct Bridge {
    /// The `Sec-WebSocket-Accept` the backend must send back.
    accept: String,
}

/// Turns an extended CONNECT's parts (hop-by-hop headers already removed)
/// into an HTTP/1.1 WebSocket upgrade for the backend.
pub fn to_http1_upgrade(parts: &mut Parts) -> Bridge {
    parts.method = Method::GET;
    parts.extensions.remove::<hyper::ext::Protocol>();
    let key = generate_key();
    let accept = derive_accept_key(key.as_bytes());
    let headers = &mut parts.headers;
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    if let Ok(key) = HeaderValue::from_str(&key) {
        headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    Bridge { accept }
}

impl Bridge {
    /// Makes the backend's `101` answer the HTTP/2 client's CONNECT: `200`
    /// without the HTTP/1.1 handshake headers (chosen subprotocol and
    /// extensions stay). Fails if the backend's accept value is wrong.
    pub fn answer<B>(&self, response: &mut Response<B>) -> Result<(), String> {
        let headers: &mut HeaderMap = response.headers_mut();
        let accepted = headers.get(header::SEC_WEBSOCKET_ACCEPT).map(HeaderValue::as_bytes);
        if accepted != Some(self.accept.as_bytes()) {
            return Err(format!(
                "the backend answered 101 with Sec-WebSocket-Accept {:?}, expected {:?}",
                accepted.map(String::from_utf8_lossy),
                self.accept
            ));
        }
        for name in [header::CONNECTION, header::UPGRADE, header::SEC_WEBSOCKET_ACCEPT] {
            headers.remove(name);
        }
        *response.status_mut() = StatusCode::OK;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extended_connect() -> Request<()> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("https://example.com/devices/d1/ws?x=1")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_PROTOCOL, "chat")
            .body(())
            .expect("request");
        req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        req
    }

    #[test]
    fn only_websocket_extended_connects_are_bridged() {
        assert!(is_extended_connect(&extended_connect()));
        let mut other = extended_connect();
        other.extensions_mut().insert(hyper::ext::Protocol::from_static("webtransport"));
        assert!(!is_extended_connect(&other));
        let (mut parts, ()) = extended_connect().into_parts();
        parts.extensions.clear();
        assert!(!is_extended_connect(&Request::from_parts(parts, ())));
    }

    #[test]
    fn the_backend_gets_an_http1_upgrade_and_the_client_a_200() {
        let (mut parts, ()) = extended_connect().into_parts();
        let bridge = to_http1_upgrade(&mut parts);
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.headers[header::UPGRADE], "websocket");
        assert_eq!(parts.headers[header::CONNECTION], "upgrade");
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_PROTOCOL], "chat", "subprotocols pass through");
        let key = parts.headers[header::SEC_WEBSOCKET_KEY].as_bytes().to_vec();
        assert_eq!(key.len(), 24, "16 random bytes, base64");

        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
            .header(header::SEC_WEBSOCKET_PROTOCOL, "chat")
            .body(())
            .expect("response");
        bridge.answer(&mut response).expect("a matching accept");
        assert_eq!(response.status(), StatusCode::OK);
        let mut left: Vec<&str> = response.headers().keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["sec-websocket-protocol"]);
    }

    #[test]
    fn a_wrong_accept_is_refused() {
        let (mut parts, ()) = extended_connect().into_parts();
        let bridge = to_http1_upgrade(&mut parts);
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::SEC_WEBSOCKET_ACCEPT, "bm90IHRoZSByaWdodCBhY2NlcHQ=")
            .body(())
            .expect("response");
        assert!(bridge.answer(&mut response).is_err());
        assert!(bridge.answer(&mut Response::new(())).is_err(), "a missing accept too");
    }
}
