//! `X-Request-Id`: one ID per request, to find it in the proxy's log, the
//! backend's and the client's. A client's own ID is kept when it is sane
//! (1 to [`MAX_LEN`] visible ASCII characters, sent once); otherwise the
//! proxy makes one: 16 lowercase hex digits from a per-thread splitmix64
//! stream, seeded from the clock, the process ID and the thread's number,
//! so IDs differ between requests, threads and restarts. The ID goes to
//! the backend (requests and WebSocket upgrades alike), back to the client
//! on the response, and into the access line.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::util::rng::SplitMix64;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-sent ID that is passed on (longer ones are replaced).
pub const MAX_LEN: usize = 128;

/// The request's ID: the client's, if it sent one sane `X-Request-Id`,
/// else a new one. Costs no allocation for a client's ID (the value is
/// shared) and one, the value's, for a new ID.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(&X_REQUEST_ID).iter();
    match (sent.next(), sent.next()) {
        (Some(id), None) if is_sane(id) => id.clone(),
        _ => generate(),
    }
}

/// 1 to [`MAX_LEN`] bytes, each visible ASCII (`!` to `~`): nothing that
/// could break a log line or a header elsewhere.
pub fn is_sane(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|b| (b'!'..=b'~').contains(b))
}

/// A new ID: 16 lowercase hex digits.
pub fn generate() -> HeaderValue {
    thread_local! {
        static RNG: RefCell<SplitMix64> = RefCell::new(SplitMix64::new(thread_seed()));
    }
    let bits = RNG.with(|rng| rng.borrow_mut().next_u64());
    let mut text = [0u8; 16];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((bits >> (60 - 4 * i)) & 0xf) as usize];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0000000000000000"))
}

/// A seed no other thread of this process (nor, very likely, another run)
/// starts from.
fn thread_seed() -> u64 {
    static THREADS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let thread = THREADS.fetch_add(1, Ordering::Relaxed);
    let mixed = nanos ^ (u64::from(std::process::id()) << 32) ^ thread.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    SplitMix64::new(mixed).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_client_id_is_kept() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("abc-123_XYZ.{}"));
        assert_eq!(of(&h), "abc-123_XYZ.{}");
        h.insert(X_REQUEST_ID.clone(), HeaderValue::from_str(&"a".repeat(MAX_LEN)).expect("value"));
        assert_eq!(of(&h).len(), MAX_LEN);
    }

    #[test]
    fn insane_or_repeated_ids_are_replaced() {
        let too_long = "a".repeat(MAX_LEN + 1);
        for bad in ["", "has space", "tab\there", "caf\u{e9}", too_long.as_str()] {
            let mut h = HeaderMap::new();
            h.insert(X_REQUEST_ID.clone(), HeaderValue::from_bytes(bad.as_bytes()).expect("value"));
            let id = of(&h);
            assert_ne!(id.as_bytes(), bad.as_bytes(), "{bad:?} kept");
            assert_eq!(id.len(), 16, "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.append(X_REQUEST_ID.clone(), HeaderValue::from_static("one"));
        h.append(X_REQUEST_ID.clone(), HeaderValue::from_static("two"));
        assert_eq!(of(&h).len(), 16, "two IDs: neither is the request's");
    }

    #[test]
    fn generated_ids_are_hex_and_differ() {
        let ids: std::collections::HashSet<Vec<u8>> = (0..1000).map(|_| generate().as_bytes().to_vec()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.len() == 16 && id.iter().all(u8::is_ascii_hexdigit)));
        let other = std::thread::spawn(generate).join().expect("thread");
        assert!(!ids.contains(other.as_bytes()), "another thread's stream differs");
    }
}
