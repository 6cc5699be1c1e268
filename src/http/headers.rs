//! Request and response headers as a reverse proxy must rewrite them
//! (RFC 9110): hop-by-hop headers dropped in both directions, the
//! `X-Forwarded-*` family added, HTTP/2's `:authority` and cookie crumbs
//! fitted to an HTTP/1.1 backend.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{StatusCode, Uri, Version};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The request's path and query alone (a reference-counted clone, no
/// parsing); asterisk-form (`OPTIONS *`) has no path to forward: "/".
pub fn origin_form(original: &Uri) -> Uri {
    let mut parts = hyper::http::uri::Parts::default();
    parts.path_and_query = Some(match original.path_and_query() {
        Some(p) if p.as_str().starts_with('/') => p.clone(),
        _ => PathAndQuery::from_static("/"),
    });
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// True for `Connection: upgrade` + `Upgrade: websocket`.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, &header::CONNECTION, "upgrade") && has_token(headers, &header::UPGRADE, "websocket")
}

/// Does a comma-separated token of any `name` header equal `token`
/// (ignoring ASCII case)?
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// and `Upgrade`; `Connection` first, since it names more of them.
/// (`Trailer` is not among them, RFC 9110 §6.6.2: it declares the
/// message's trailer fields, which travel end to end.)
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The index of `transfer-encoding` in [`HOP_BY_HOP`].
const TRANSFER_ENCODING_BIT: u16 = 1 << 6;

/// Which of [`HOP_BY_HOP`] `name` is. Most names are ruled out by their
/// length alone, without comparing bytes.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let name = name.as_str();
    if !matches!(name.len(), 2 | 7 | 10 | 16..=19) {
        return None;
    }
    HOP_BY_HOP.iter().position(|h| *h == name)
}

/// Removes hop-by-hop headers, those named in `Connection`, and `Upgrade`.
/// A message framed by `Transfer-Encoding` also loses its `Content-Length`
/// (RFC 9112 §6.3: the encoding wins), so the next hop frames it anew by
/// what was actually received.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present: most requests carry
    // none, most responses only `Connection: keep-alive`, and then no
    // absent header is looked up.
    let mut present = 0u16; // bit i: HOP_BY_HOP[i]
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // HOP_BY_HOP[0] is Connection: drop the headers it names. Its values
        // are copied out first (reference-counted, no allocation for one line).
        let mut lines = headers.get_all(header::CONNECTION).iter();
        let first = lines.next().cloned();
        let more: Vec<HeaderValue> = lines.cloned().collect();
        for line in first.iter().chain(&more) {
            // By bytes: a non-ASCII byte elsewhere on the line must not keep
            // the names on it from being removed.
            for token in line.as_bytes().split(|&b| b == b',') {
                let Ok(token) = std::str::from_utf8(token.trim_ascii()) else { continue };
                // `Connection: host` must not cost the backend the client's Host.
                if !token.is_empty() && !token.eq_ignore_ascii_case("host") {
                    // Looked up by &str: no HeaderName is built; an invalid
                    // name matches nothing.
                    headers.remove(token);
                }
            }
        }
    }
    if present & TRANSFER_ENCODING_BIT != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// Checks a request's `Transfer-Encoding` (RFC 9112 §6.1): the proxy
/// decodes only `chunked`, alone, so anything else is refused before a byte
/// goes upstream, as nginx does: chunked named twice (on one line or two)
/// is a 400, any other coding (`gzip`, `identity, chunked`) a 501. Answers
/// which status and why.
pub fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let mut chunked = 0;
    for line in headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(line) = line.to_str() else {
            return Err((StatusCode::BAD_REQUEST, "Transfer-Encoding is not ASCII"));
        };
        for coding in line.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err((StatusCode::NOT_IMPLEMENTED, "the only Transfer-Encoding accepted is chunked, alone"));
            }
            chunked += 1;
        }
    }
    match chunked {
        0 if headers.contains_key(header::TRANSFER_ENCODING) => {
            Err((StatusCode::BAD_REQUEST, "Transfer-Encoding names no coding"))
        }
        0 | 1 => Ok(()),
        _ => Err((StatusCode::BAD_REQUEST, "Transfer-Encoding names chunked more than once")),
    }
}

/// Settles which host a request is for (RFC 9112 §3.2, RFC 9113 §8.3.1)
/// before anything reads `Host`: a target with an authority (absolute-form,
/// or HTTP/2's `:authority`) wins over the `Host` header and replaces it;
/// two `Host` lines, or an HTTP/1.1 request with none, are refused (the
/// error says why, for a 400).
pub fn settle_host(version: Version, uri: &Uri, headers: &mut HeaderMap) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next().is_some(), hosts.next().is_some());
    if second {
        return Err("more than one Host header");
    }
    match uri.authority() {
        // Host is the authority without user info (RFC 9112 §3.2.2).
        Some(authority) => match HeaderValue::from_str(authority.as_str().rsplit('@').next().unwrap_or_default()) {
            Ok(host) => {
                headers.insert(header::HOST, host);
            }
            Err(_) => return Err("the request target's authority is not a valid Host"),
        },
        None if !first && version == Version::HTTP_11 => return Err("an HTTP/1.1 request must carry Host"),
        None => {}
    }
    Ok(())
}

/// Makes an HTTP/2 request's headers fit an HTTP/1.1 backend: cookie
/// crumbs, which HTTP/2 lets a client send as separate headers, joined
/// into one `Cookie` line as RFC 9113 §8.2.3 asks (`Host` comes from the
/// `:authority`: [`settle_host`]). Pseudo-headers never appear in a
/// `HeaderMap`; hyper keeps them in the method, URI and extensions.
pub fn from_http2(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_some() {
        let crumbs: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
        if let Ok(joined) = HeaderValue::from_bytes(&crumbs.join(&b"; "[..])) {
            headers.insert(header::COOKIE, joined);
        }
    }
}

/// Who sent a request, fixed for its connection: how it came (`"http"` or
/// `"https"`, for `X-Forwarded-Proto`) and its IP, formatted once for
/// `X-Forwarded-For` so that requests on a kept-alive connection don't
/// format it again (a thousand instructions each).
pub struct Client {
    /// `"http"` or `"https"`.
    pub proto: &'static str,
    forwarded_for: HeaderValue,
}

impl Client {
    /// This hop's `Forwarded` element (RFC 7239): `for=` the client (IPv6
    /// quoted and bracketed) and `proto=`.
    fn forwarded_element(&self) -> Vec<u8> {
        let ip = self.forwarded_for.as_bytes();
        let mut element = Vec::with_capacity(ip.len() + 24);
        if ip.contains(&b':') {
            element.extend_from_slice(b"for=\"[");
            element.extend_from_slice(ip);
            element.extend_from_slice(b"]\"");
        } else {
            element.extend_from_slice(b"for=");
            element.extend_from_slice(ip);
        }
        element.extend_from_slice(b";proto=");
        element.extend_from_slice(self.proto.as_bytes());
        element
    }

    /// The client's IP, as text.
    pub fn ip(&self) -> &str {
        // Made from an IP's text, so always ASCII.
        self.forwarded_for.to_str().unwrap_or("-")
    }

    /// A client at `addr` that came over `proto`.
    pub fn new(addr: SocketAddr, proto: &'static str) -> Client {
        // An IP's text is always a valid header value.
        let forwarded_for =
            HeaderValue::try_from(addr.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Client { proto, forwarded_for }
    }
}

/// Every non-empty `name` line joined with `, `, then `ours` (as bytes: a
/// line with non-ASCII bytes is kept, not dropped whole). `None` if the
/// result is not a valid header value.
fn appended(headers: &HeaderMap, name: &HeaderName, ours: &[u8]) -> Option<HeaderValue> {
    let mut joined: Vec<u8> = Vec::new();
    for prior in headers.get_all(name).iter().map(|v| v.as_bytes().trim_ascii()) {
        if !prior.is_empty() {
            joined.extend_from_slice(prior);
            joined.extend_from_slice(b", ");
        }
    }
    joined.extend_from_slice(ours);
    HeaderValue::from_bytes(&joined).ok()
}

/// Appends the client to `X-Forwarded-For` and sets `-Proto` and `-Host`.
pub fn add_forwarded_headers(headers: &mut HeaderMap, client: &Client) {
    // Room for the four headers at once: at most one growth of the map.
    headers.reserve(4);
    let forwarded_for = if headers.contains_key(&X_FORWARDED_FOR) {
        // Every prior line counts: proxies before us may have added one each.
        appended(headers, &X_FORWARDED_FOR, client.forwarded_for.as_bytes())
            .unwrap_or_else(|| client.forwarded_for.clone())
    } else {
        // The common case: no allocation, no formatting.
        client.forwarded_for.clone()
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(client.proto));
    // The client's own X-Real-IP is not to be trusted: ours replaces it.
    headers.insert(X_REAL_IP.clone(), client.forwarded_for.clone());
    if headers.contains_key(header::FORWARDED) {
        // RFC 7239: each proxy appends its element, so the last one (ours)
        // is the one a backend can trust.
        if let Some(value) = appended(headers, &header::FORWARDED, &client.forwarded_element()) {
            headers.insert(header::FORWARDED, value);
        }
    }
    match headers.get(header::HOST).cloned() {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert("x-device-id", HeaderValue::from_static("d1"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "x-device-id"]);
    }

    #[test]
    fn connection_names_are_removed_even_beside_non_ascii_bytes() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_bytes(b"x-secret, caf\xe9").expect("obs-text is allowed"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn host_from_an_absolute_target_drops_user_info() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("other.example"));
        let uri: Uri = "http://user:pw@t.example:81/x".parse().expect("uri");
        settle_host(Version::HTTP_11, &uri, &mut h).expect("settled");
        assert_eq!(h[header::HOST], "t.example:81");
    }

    #[test]
    fn transfer_encodings_other_than_one_chunked_are_refused() {
        let with = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(line));
            }
            check_transfer_encoding(&h).map_err(|(status, _)| status.as_u16())
        };
        assert_eq!(with(&[]), Ok(()));
        assert_eq!(with(&["chunked"]), Ok(()));
        assert_eq!(with(&["Chunked "]), Ok(()));
        assert_eq!(with(&["identity, chunked"]), Err(501));
        assert_eq!(with(&["gzip"]), Err(501));
        assert_eq!(with(&["chunked, chunked"]), Err(400));
        assert_eq!(with(&["chunked", "chunked"]), Err(400));
        assert_eq!(with(&[" , "]), Err(400));
    }

    #[test]
    fn forwarded_headers_append_and_set() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("10.1.1.1"));
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        h.insert(header::HOST, HeaderValue::from_static("api.example.com"));
        add_forwarded_headers(&mut h, &Client::new("127.0.0.9:5555".parse().expect("addr"), "http"));
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.1.1, 127.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example.com");
    }

    #[test]
    fn every_forwarded_for_line_is_kept_and_host_survives_connection() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("2.2.2.2"));
        h.insert(header::HOST, HeaderValue::from_static("api.example.com"));
        h.insert(header::CONNECTION, HeaderValue::from_static("host"));
        strip_hop_by_hop(&mut h);
        add_forwarded_headers(&mut h, &Client::new("127.0.0.9:5555".parse().expect("addr"), "http"));
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 127.0.0.9");
        assert_eq!(h[header::HOST], "api.example.com");
    }

    #[test]
    fn connection_tokens_of_every_line_and_any_case_are_removed() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-One, keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-two,,bad name"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        for name in ["x-one", "x-two", "x-three"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["x-three"]);

        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn forwarded_for_is_the_client_ip_alone_when_first() {
        let mut h = HeaderMap::new();
        add_forwarded_headers(&mut h, &Client::new("[2001:db8::1]:443".parse().expect("addr"), "https"));
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::1");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    #[test]
    fn spoofable_client_headers_are_replaced_or_appended_to() {
        let mut h = HeaderMap::new();
        h.insert(X_REAL_IP.clone(), HeaderValue::from_static("6.6.6.6"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6;proto=https"));
        h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_bytes(b"caf\xc3\xa9").expect("value"));
        add_forwarded_headers(&mut h, &Client::new("127.0.0.9:5555".parse().expect("addr"), "http"));
        assert_eq!(h[&X_REAL_IP], "127.0.0.9", "ours, not the client's");
        assert_eq!(h[header::FORWARDED], "for=6.6.6.6;proto=https, for=127.0.0.9;proto=http");
        assert_eq!(h[&X_FORWARDED_FOR].as_bytes(), b"caf\xc3\xa9, 127.0.0.9", "a non-ASCII line is kept");

        let mut h = HeaderMap::new();
        h.insert(header::FORWARDED, HeaderValue::from_static("for=1.2.3.4"));
        add_forwarded_headers(&mut h, &Client::new("[2001:db8::1]:443".parse().expect("addr"), "https"));
        assert_eq!(h[header::FORWARDED], "for=1.2.3.4, for=\"[2001:db8::1]\";proto=https");

        let mut h = HeaderMap::new();
        add_forwarded_headers(&mut h, &Client::new("127.0.0.9:5555".parse().expect("addr"), "http"));
        assert!(!h.contains_key(header::FORWARDED), "not added where the client sent none");
    }

    #[test]
    fn transfer_encoding_wins_over_content_length_and_trailer_stays() {
        assert_eq!(HOP_BY_HOP.iter().position(|h| *h == "transfer-encoding"), Some(6));
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::CONTENT_LENGTH) && !h.contains_key(header::TRANSFER_ENCODING));
        assert_eq!(h[header::TRAILER], "x-checksum", "end to end");
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::CONTENT_LENGTH], "3", "alone it stays");
    }

    #[test]
    fn websocket_upgrade_detection_reads_tokens() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(is_websocket_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_websocket_upgrade(&h));
    }

    #[test]
    fn origin_form_keeps_path_and_query() {
        let uri: Uri = "/devices/a%20b/messages?x=1".parse().expect("uri");
        assert_eq!(origin_form(&uri).to_string(), "/devices/a%20b/messages?x=1");
        assert_eq!(origin_form(&"*".parse().expect("uri")).to_string(), "/");
        assert_eq!(origin_form(&"http://h:1/p?q".parse().expect("uri")).to_string(), "/p?q");
    }

    #[test]
    fn http2_requests_get_host_and_one_cookie_line() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("device_id=d7"));
        let uri: Uri = "https://api.example.com:8443/x".parse().expect("uri");
        settle_host(Version::HTTP_2, &uri, &mut h).expect("host");
        from_http2(&mut h);
        assert_eq!(h[header::HOST], "api.example.com:8443");
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; device_id=d7"]);

        // RFC 9113 §8.3.1: the :authority, not a Host the client added.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        settle_host(Version::HTTP_2, &"https://good.example/x".parse().expect("uri"), &mut h).expect("host");
        assert_eq!(h[header::HOST], "good.example");
    }

    #[test]
    fn host_is_settled_as_rfc_9112_says() {
        let settle = |version, target: &str, hosts: &[&'static str]| {
            let mut h = HeaderMap::new();
            for host in hosts {
                h.append(header::HOST, HeaderValue::from_static(host));
            }
            settle_host(version, &target.parse().expect("uri"), &mut h).map(|()| {
                h.get_all(header::HOST).iter().map(|v| v.to_str().unwrap_or("?").to_string()).collect::<Vec<_>>()
            })
        };
        assert_eq!(settle(Version::HTTP_11, "/p", &["a.example"]), Ok(vec!["a.example".to_string()]));
        assert!(settle(Version::HTTP_11, "/p", &["a.example", "b.example"]).is_err(), "two Host lines");
        assert!(settle(Version::HTTP_11, "/p", &[]).is_err(), "HTTP/1.1 without Host");
        assert_eq!(settle(Version::HTTP_10, "/p", &[]), Ok(vec![]), "HTTP/1.0 may leave it out");
        // Absolute-form: the target's authority replaces Host (§3.2.2).
        assert_eq!(settle(Version::HTTP_11, "http://t.example:81/p", &["h.example"]), Ok(vec!["t.example:81".into()]));
        assert_eq!(settle(Version::HTTP_11, "http://t.example/p", &[]), Ok(vec!["t.example".into()]));
    }
}
