//! Finding the device ID in a request.
//!
//! `routing.key` lists sources tried in order; the first that yields a
//! non-empty value wins:
//!
//! | source                 | takes                                              |
//! |------------------------|----------------------------------------------------|
//! | `header:x-device-id`   | the first non-empty value of that header, as sent  |
//! | `path:/devices/{id}/*` | the `{id}` segment, percent-decoded                |
//! | `query:device_id`      | the first non-empty such parameter, `%`/`+`-decoded |
//! | `cookie:device_id`     | that cookie's value, unquoted and `%`-decoded      |
//!
//! Path patterns match whole segments: literal segments must be equal,
//! `{id}` captures exactly one non-empty segment and a final `*` matches zero
//! or more remaining segments, so `/devices/{id}/*` matches `/devices/abc`,
//! `/devices/abc/ws` and `/devices/abc/messages`. Decoding makes `/devices/a%20b`
//! and `?device_id=a+b` the same device `a b`.
//!
//! With `routing.hash = "nginx"` ([`KeyExtractor::nginx`]) values are taken
//! as nginx 1.22's variables hold them instead, so keys hash to the same
//! bytes as behind nginx: `header:` is the first such header line
//! (`$http_…`), `query:` the first parameter whose name matches without
//! regard to case, raw (`$arg_…`), `cookie:` the raw value up to `;`
//! (`$cookie_…`). No percent-decoding, no unquoting; `path:` is unchanged.
//!
//! Extraction borrows from the request and allocates only when a value needs
//! decoding.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use hyper::header::{HeaderMap, HeaderName, COOKIE};
use hyper::Uri;

/// One place a device ID may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `header:NAME`: the first non-empty value of that header.
    Header(HeaderName),
    /// `path:/devices/{id}/*`: the `{id}` segment.
    Path(PathPattern),
    /// `query:NAME`: that query parameter.
    Query(String),
    /// `cookie:NAME`: that cookie's value.
    Cookie(String),
}

/// A compiled `path:` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    /// Literal segments before and after `{id}`.
    before: Vec<String>,
    after: Vec<String>,
    /// Whether a trailing `*` allows more segments.
    rest: bool,
}

/// A device ID found in a request, and which source gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKey<'r> {
    /// The device ID's bytes, decoded.
    pub id: Cow<'r, [u8]>,
    /// Index into the configured sources.
    pub source: usize,
}

impl DeviceKey<'_> {
    /// The ID for logs and messages (invalid UTF-8 shown as U+FFFD).
    pub fn display(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.id)
    }
}

/// The ordered list of key sources from `routing.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExtractor {
    sources: Vec<KeySource>,
    /// Values as nginx's variables hold them (see the module doc).
    nginx: bool,
}

impl KeyExtractor {
    /// Tries `sources` in order, decoding values (the default hashing).
    pub fn new(sources: Vec<KeySource>) -> Self {
        KeyExtractor { sources, nginx: false }
    }

    /// Takes values as nginx's `$http_`, `$arg_` and `$cookie_` variables
    /// hold them: raw, as nginx hashes them.
    pub fn nginx(sources: Vec<KeySource>) -> Self {
        KeyExtractor { sources, nginx: true }
    }

    /// The configured sources, in the order they are tried.
    pub fn sources(&self) -> &[KeySource] {
        &self.sources
    }

    /// The device ID of a request, from the first source that has one.
    pub fn extract<'r>(&self, uri: &'r Uri, headers: &'r HeaderMap) -> Option<DeviceKey<'r>> {
        self.sources.iter().enumerate().find_map(|(source, s)| {
            let id = match s {
                KeySource::Header(name) if self.nginx => {
                    headers.get(name).map(|v| Cow::Borrowed(v.as_bytes().trim_ascii()))
                }
                KeySource::Query(name) if self.nginx => {
                    uri.query().and_then(|q| nginx_arg(q.as_bytes(), name.as_bytes())).map(Cow::Borrowed)
                }
                KeySource::Cookie(name) if self.nginx => nginx_cookie(headers, name.as_bytes()).map(Cow::Borrowed),
                KeySource::Header(name) => header_value(headers, name),
                KeySource::Path(pattern) => pattern.capture(uri.path()),
                KeySource::Query(name) => uri.query().and_then(|q| query_value(q, name)),
                KeySource::Cookie(name) => cookie_value(headers, name),
            }?;
            (!id.is_empty()).then_some(DeviceKey { id, source })
        })
    }

    /// "header x-device-id, path /devices/{id}/*, …" for error messages.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.sources.iter().map(|s| s.to_string().replacen(':', " ", 1)).collect();
        parts.join(", ")
    }
}

fn header_value<'r>(headers: &'r HeaderMap, name: &HeaderName) -> Option<Cow<'r, [u8]>> {
    headers.get_all(name).iter().map(|v| v.as_bytes().trim_ascii()).find(|v| !v.is_empty()).map(Cow::Borrowed)
}

fn query_value<'r>(query: &'r str, name: &str) -> Option<Cow<'r, [u8]>> {
    query.split('&').find_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (!v.is_empty() && percent_decode(n.as_bytes(), true).as_ref() == name.as_bytes())
            .then(|| percent_decode(v.as_bytes(), true))
    })
}

fn cookie_value<'r>(headers: &'r HeaderMap, name: &str) -> Option<Cow<'r, [u8]>> {
    headers.get_all(COOKIE).iter().find_map(|header| {
        header.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = (&pair[..eq], &pair[eq + 1..]);
            if n != name.as_bytes() {
                return None;
            }
            let v = v.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(v);
            // The first non-empty one, as for headers and query parameters
            // (`device_id=; device_id=c5` is c5).
            if v.is_empty() {
                return None;
            }
            // Browsers' encodeURIComponent escapes with %XX (not '+').
            Some(percent_decode(v, false))
        })
    })
}

/// `$arg_NAME` (`ngx_http_arg`): the raw value of the first `NAME=` that
/// starts the query or follows a `&`, the name compared without regard to
/// ASCII case; `;` is not a separator and `+` stays `+`.
fn nginx_arg<'r>(args: &'r [u8], name: &[u8]) -> Option<&'r [u8]> {
    let n = name.len();
    // nginx searches for the name only where an '=' still fits after it.
    (0..args.len().saturating_sub(n)).find_map(|p| {
        let starts = p == 0 || args[p - 1] == b'&';
        if !(starts && args[p + n] == b'=' && args[p..p + n].eq_ignore_ascii_case(name)) {
            return None;
        }
        let value = &args[p + n + 1..];
        Some(&value[..value.iter().position(|&b| b == b'&').unwrap_or(value.len())])
    })
}

/// `$cookie_NAME` (nginx 1.22's `ngx_http_parse_multi_header_lines`): over
/// the Cookie lines in order, pairs start after `;` or `,` and spaces; the
/// first whose name matches without regard to ASCII case, then optional
/// spaces and `=`, gives its value raw: leading spaces skipped, up to the
/// next `;` (commas and quotes kept).
fn nginx_cookie<'r>(headers: &'r HeaderMap, name: &[u8]) -> Option<&'r [u8]> {
    headers.get_all(COOKIE).iter().find_map(|line| {
        let line = line.as_bytes();
        let mut at = 0;
        while at < line.len() {
            let rest = &line[at..];
            if rest.len() >= name.len() && rest[..name.len()].eq_ignore_ascii_case(name) {
                let after = rest[name.len()..].trim_ascii_start_spaces();
                if let Some(value) = after.strip_prefix(b"=") {
                    let value = value.trim_ascii_start_spaces();
                    return Some(&value[..value.iter().position(|&b| b == b';').unwrap_or(value.len())]);
                }
            }
            // Not this pair: past the next ';' or ',' and the spaces after it.
            at += rest.iter().position(|&b| b == b';' || b == b',').map_or(rest.len(), |i| i + 1);
            at += line[at..].iter().take_while(|&&b| b == b' ').count();
        }
        None
    })
}

/// Skipping only spaces (not tabs), as nginx's cookie parser does.
trait TrimSpaces {
    fn trim_ascii_start_spaces(&self) -> &Self;
}

impl TrimSpaces for [u8] {
    fn trim_ascii_start_spaces(&self) -> &[u8] {
        &self[self.iter().take_while(|&&b| b == b' ').count()..]
    }
}

impl PathPattern {
    fn capture<'r>(&self, path: &'r str) -> Option<Cow<'r, [u8]>> {
        let rest = path.strip_prefix('/')?;
        let id = if has_dot_segment(rest) {
            // `/devices/d1/../d2/messages` is d2's, as the app that
            // normalises the path (RFC 3986 §5.2.4) will see it.
            self.id_segment(normalized_segments(rest).into_iter())?
        } else {
            self.id_segment(rest.split('/'))?
        };
        Some(percent_decode(id.as_bytes(), false))
    }

    /// The `{id}` segment, if the segments match the pattern.
    fn id_segment<'s>(&self, mut segments: impl Iterator<Item = &'s str>) -> Option<&'s str> {
        for literal in &self.before {
            if segments.next()? != literal {
                return None;
            }
        }
        let id = segments.next().filter(|s| !s.is_empty())?;
        for literal in &self.after {
            if segments.next()? != literal {
                return None;
            }
        }
        if !self.rest && segments.next().is_some() {
            return None;
        }
        Some(id)
    }
}

/// Whether a segment of `path` (after its leading `/`) may be `.` or `..`,
/// written plainly or as `%2e`.
fn has_dot_segment(path: &str) -> bool {
    // Most paths have neither a '.' nor a '%' (one memchr each) and end here.
    let bytes = path.as_bytes();
    if !bytes.contains(&b'.') && !bytes.contains(&b'%') {
        return false;
    }
    path.split('/').any(|s| is_dot(s) || is_dot_dot(s))
}

fn is_dot(segment: &str) -> bool {
    segment == "." || segment.eq_ignore_ascii_case("%2e")
}

fn is_dot_dot(segment: &str) -> bool {
    matches!(segment.len(), 2 | 4 | 6)
        && matches!(segment.to_ascii_lowercase().as_str(), ".." | ".%2e" | "%2e." | "%2e%2e")
}

/// The path's segments with `.` and `..` resolved (RFC 3986 §5.2.4): a
/// final `.` or `..` leaves an empty last segment, as `/a/b/..` is `/a/`.
fn normalized_segments(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    let mut segments = path.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if is_dot(segment) {
            if last {
                out.push("");
            }
        } else if is_dot_dot(segment) {
            out.pop();
            if last {
                out.push("");
            }
        } else {
            out.push(segment);
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as space in query strings). Malformed
/// escapes are kept literally, as browsers do, so every input has one key.
pub fn percent_decode(input: &[u8], plus_as_space: bool) -> Cow<'_, [u8]> {
    // `contains` on bytes is a memchr: several times faster than a byte loop.
    if !(input.contains(&b'%') || plus_as_space && input.contains(&b'+')) {
        return Cow::Borrowed(input);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            if let (Some(h), Some(l)) = (input.get(i + 1).and_then(|&c| hex(c)), input.get(i + 2).and_then(|&c| hex(c)))
            {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if plus_as_space && b == b'+' { b' ' } else { b });
        i += 1;
    }
    Cow::Owned(out)
}

impl FromStr for KeySource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (kind, arg) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} must be kind:argument, e.g. \"header:x-device-id\""))?;
        let arg = arg.trim();
        let plain_name = |what: &str| -> Result<String, String> {
            if arg.is_empty()
                || arg.bytes().any(|b| {
                    matches!(b, b'=' | b'&' | b';' | b'%' | b'+') || b.is_ascii_whitespace() || b.is_ascii_control()
                })
            {
                Err(format!("{text:?}: {what} name must be non-empty and contain no '=', '&', ';', '%', '+' or spaces"))
            } else {
                Ok(arg.to_string())
            }
        };
        match kind.trim() {
            "header" => HeaderName::from_bytes(arg.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("{text:?}: {arg:?} is not a valid header name")),
            "path" => arg.parse().map(KeySource::Path).map_err(|e| format!("{text:?}: {e}")),
            "query" => plain_name("query parameter").map(KeySource::Query),
            "cookie" => plain_name("cookie").map(KeySource::Cookie),
            other => Err(format!("{text:?}: unknown key source {other:?}; use header:, path:, query: or cookie:")),
        }
    }
}

impl FromStr for PathPattern {
    type Err = String;

    fn from_str(pattern: &str) -> Result<Self, String> {
        let body = pattern.strip_prefix('/').ok_or("a path pattern must start with '/'")?;
        let mut segments: Vec<&str> = body.split('/').collect();
        let rest = segments.last() == Some(&"*");
        if rest {
            segments.pop();
        }
        let id_at =
            segments.iter().position(|s| *s == "{id}").ok_or("a path pattern needs exactly one {id} segment")?;
        for (i, s) in segments.iter().enumerate() {
            if i != id_at && (s.is_empty() || s.contains(['{', '}', '*'])) {
                return Err(format!(
                    "segment {s:?} is not allowed: use literal segments, one {{id}} and optionally a final *"
                ));
            }
        }
        let owned = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        Ok(PathPattern { before: owned(&segments[..id_at]), after: owned(&segments[id_at + 1..]), rest })
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.before {
            write!(f, "/{s}")?;
        }
        f.write_str("/{id}")?;
        for s in &self.after {
            write!(f, "/{s}")?;
        }
        if self.rest {
            f.write_str("/*")?;
        }
        Ok(())
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(h) => write!(f, "header:{h}"),
            KeySource::Path(p) => write!(f, "path:{p}"),
            KeySource::Query(q) => write!(f, "query:{q}"),
            KeySource::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn extractor(sources: &[&str]) -> KeyExtractor {
        KeyExtractor::new(sources.iter().map(|s| s.parse().expect("valid source")).collect())
    }

    fn key(x: &KeyExtractor, uri: &str, headers: &[(&str, &str)]) -> Option<(String, usize)> {
        let uri: Uri = uri.parse().expect("uri");
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(HeaderName::from_bytes(n.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
        }
        x.extract(&uri, &map).map(|k| (k.display().into_owned(), k.source))
    }

    fn some(id: &str, source: usize) -> Option<(String, usize)> {
        Some((id.to_string(), source))
    }

    #[test]
    fn path_patterns_match_whole_segments() {
        let x = extractor(&["path:/devices/{id}/*"]);
        assert_eq!(key(&x, "/devices/abc", &[]), some("abc", 0));
        assert_eq!(key(&x, "/devices/abc/ws", &[]), some("abc", 0));
        assert_eq!(key(&x, "/devices/abc/messages/1", &[]), some("abc", 0));
        assert_eq!(key(&x, "/devices/a%20b/ws?x=1", &[]), some("a b", 0));
        assert_eq!(key(&x, "/devices", &[]), None);
        assert_eq!(key(&x, "/devices/", &[]), None);
        assert_eq!(key(&x, "/devicesx/abc", &[]), None);
        assert_eq!(key(&x, "/api/devices/abc", &[]), None);

        let exact = extractor(&["path:/api/{id}/ws"]);
        assert_eq!(key(&exact, "/api/7/ws", &[]), some("7", 0));
        assert_eq!(key(&exact, "/api/7/ws/more", &[]), None);
        assert_eq!(key(&exact, "/api/7", &[]), None);
        assert_eq!(exact.sources()[0].to_string(), "path:/api/{id}/ws");
    }

    #[test]
    fn sources_are_tried_in_order() {
        let x = extractor(&["header:x-device-id", "path:/devices/{id}/*", "query:device_id", "cookie:device_id"]);
        assert_eq!(
            key(&x, "/devices/p/ws?device_id=q", &[("x-device-id", "h"), ("cookie", "device_id=c")]),
            some("h", 0)
        );
        assert_eq!(key(&x, "/devices/p/ws?device_id=q", &[("cookie", "device_id=c")]), some("p", 1));
        assert_eq!(key(&x, "/other?a=1&device_id=q", &[("cookie", "device_id=c")]), some("q", 2));
        assert_eq!(key(&x, "/other", &[("cookie", "a=1; device_id=c; b=2")]), some("c", 3));
        assert_eq!(key(&x, "/other", &[]), None);
        assert_eq!(x.describe(), "header x-device-id, path /devices/{id}/*, query device_id, cookie device_id");
    }

    #[test]
    fn empty_values_fall_through() {
        let x = extractor(&["header:x-device-id", "query:device_id", "cookie:d"]);
        assert_eq!(key(&x, "/?device_id=&device_id=z", &[("x-device-id", "")]), some("z", 1));
        assert_eq!(key(&x, "/?device_id=", &[("x-device-id", " "), ("cookie", "d=\"\"")]), None);
        assert_eq!(key(&x, "/?device_id=", &[("cookie", "d=\"q\"")]), some("q", 2));
        // Cookie values are %-decoded like paths (encodeURIComponent), '+' kept.
        assert_eq!(key(&x, "/", &[("cookie", "d=phone%2042+x")]), some("phone 42+x", 2));
        // The first non-empty cookie of the name, on one line or several.
        assert_eq!(key(&x, "/", &[("cookie", "d=; d=c5")]), some("c5", 2));
        assert_eq!(key(&x, "/", &[("cookie", "d=\"\""), ("cookie", "d=c6")]), some("c6", 2));
    }

    #[test]
    fn dot_segments_are_resolved_before_the_id_is_taken() {
        let x = extractor(&["path:/devices/{id}/*"]);
        assert_eq!(key(&x, "/devices/d1/../d2/messages", &[]), some("d2", 0));
        assert_eq!(key(&x, "/devices/./d3/messages", &[]), some("d3", 0));
        assert_eq!(key(&x, "/devices/d1/%2E%2e/d4", &[]), some("d4", 0));
        assert_eq!(key(&x, "/x/../devices/d5/ws", &[]), some("d5", 0));
        assert_eq!(key(&x, "/devices/d1/..", &[]), None, "/devices/ has no id");
        assert_eq!(key(&x, "/../../devices/d6", &[]), some("d6", 0), "above the root stays at the root");
        // Not dot segments: left alone.
        assert_eq!(key(&x, "/devices/.d7/ws", &[]), some(".d7", 0));
        assert_eq!(key(&x, "/devices/d8.../ws", &[]), some("d8...", 0));
    }

    #[test]
    fn query_values_are_decoded() {
        let x = extractor(&["query:device_id"]);
        assert_eq!(key(&x, "/?device_id=a+b", &[]), some("a b", 0));
        assert_eq!(key(&x, "/?device%5Fid=a%2Fb", &[]), some("a/b", 0));
        assert_eq!(key(&x, "/?device_id=%zz%4", &[]), some("%zz%4", 0));
        assert_eq!(key(&x, "/?device_idx=1&device_id", &[]), None);
    }

    #[test]
    fn nginx_values_are_raw_like_nginx_variables() {
        let x = KeyExtractor::nginx(
            ["header:x-device-id", "query:device_id", "cookie:device_id"]
                .iter()
                .map(|s| s.parse().expect("source"))
                .collect(),
        );
        let k = |uri: &str, headers: &[(&str, &str)]| key(&x, uri, headers);
        // The first header line, even when a later one is non-empty.
        assert_eq!(k("/", &[("x-device-id", "a%20b"), ("x-device-id", "c")]), some("a%20b", 0));
        assert_eq!(k("/?device_id=q", &[("x-device-id", "")]), some("q", 1));
        // $arg_: raw, first match, name case-insensitive, an empty first match wins.
        assert_eq!(k("/?device_id=a+b%2F", &[]), some("a+b%2F", 1));
        assert_eq!(k("/?x=1&DEVICE_ID=v&device_id=w", &[]), some("v", 1));
        assert_eq!(k("/?device_id=&device_id=w", &[]), None);
        assert_eq!(k("/?xdevice_id=1;device_id=2&device_id=3", &[]), some("3", 1));
        assert_eq!(k("/?device_id", &[]), None);
        assert_eq!(k("/?device%5Fid=z", &[]), None);
        // $cookie_: raw up to ';', quotes and commas kept, ',' also separates names.
        let c = |cookie: &str| k("/", &[("cookie", cookie)]);
        assert_eq!(c("device_id=\"a%20b\""), some("\"a%20b\"", 2));
        assert_eq!(c("a=1; Device_ID = v,w ; device_id=z"), some("v,w ", 2));
        assert_eq!(c("a=1,device_id=v"), some("v", 2));
        assert_eq!(c("device_idx=1; device_id=2"), some("2", 2));
        assert_eq!(c("x=device_id=1"), None);
        assert_eq!(k("/", &[("cookie", "a=1"), ("cookie", "device_id=2")]), some("2", 2));
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode(b"abc", false), Cow::Borrowed(b"abc"));
        assert_eq!(percent_decode(b"%41%", false).as_ref(), b"A%");
        assert_eq!(percent_decode(b"%", false).as_ref(), b"%");
        assert_eq!(percent_decode(b"%4", false).as_ref(), b"%4");
        assert_eq!(percent_decode(b"%ff", false).as_ref(), &[0xff]);
        assert_eq!(percent_decode(b"a+b", false).as_ref(), b"a+b");
    }

    #[test]
    fn bad_sources_are_rejected() {
        for bad in [
            "header",
            "header:",
            "header:bad header",
            "path:/devices/*/{id}",
            "path:/{id}/{id}",
            "path:devices/{id}",
            "path:/a//{id}",
            "query:",
            "cookie:a b",
            "body:x",
        ] {
            assert!(bad.parse::<KeySource>().is_err(), "{bad}");
        }
    }
}
