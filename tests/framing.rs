//! Differential HTTP/1.1 framing suite: every case of
//! `tests/fixtures/framing/cases.txt` is sent through sticky-proxy (the
//! real binary) and, where an `nginx` binary is installed, through nginx,
//! each in front of a raw TCP backend written here that records exactly
//! the bytes it receives. What the client gets and what the backend
//! receives, normalised (see the fixture's header), must match nginx's
//! recorded outcome, or, for a case that says why we differ on purpose
//! (`differs`), the `sticky` outcome the case records instead. nginx is
//! checked against its recording too, so the fixture can't drift from it.
//!
//! `FRAMING_RECORD=1 cargo test --test framing` rewrites the `nginx` lines
//! from the installed nginx (and prints sticky-proxy's outcomes).
//!
//! Loopback only; every wait is bounded; the cases run concurrently.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ChildProxy, ConfigFile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

const FIXTURE: &str = "tests/fixtures/framing/cases.txt";
/// How long a client waits for an answer before it counts as none.
const SILENCE: Duration = Duration::from_secs(5);
/// Bound on everything else (a backend connection's life, draining).
const BOUND: Duration = Duration::from_secs(10);
/// What the backend answers every request of a request case (and the
/// `/alive` probe of a response case).
const OK_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
/// The request of a response case that gives none of its own.
const DEFAULT_REQUEST: &str = "GET /r HTTP/1.1\r\nHost: example.test\r\nx-device-id: {id}\r\n\r\n";
const PROBE: &str = "GET /alive HTTP/1.1\r\nHost: example.test\r\nx-device-id: {id}\r\n\r\n";

// ---------------------------------------------------------------- fixture

#[derive(Debug, Clone)]
struct Case {
    name: String,
    /// Raw bytes the client sends (`{id}` already replaced).
    request: Vec<u8>,
    /// Raw bytes the backend answers (a response case), else [`OK_REPLY`].
    reply: Option<Vec<u8>>,
    /// Final responses a request case waits for (pipelining).
    responses: usize,
    nginx: String,
    differs: Option<String>,
    sticky: Option<String>,
}

impl Case {
    fn id(&self) -> String {
        format!("fx-{}", self.name)
    }

    fn head_request(&self) -> bool {
        self.request.starts_with(b"HEAD ")
    }

    /// What sticky-proxy must do: nginx's outcome unless we differ on purpose.
    fn sticky_expected(&self) -> &str {
        self.sticky.as_deref().unwrap_or(&self.nginx)
    }
}

/// `\r \n \t \0 \\ \xNN`, and `\{N}c` for the character c repeated N times.
fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut utf8 = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).map_err(|_| format!("bad \\x{hex}"))?);
            }
            Some('{') => {
                let count: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let count: usize = count.parse().map_err(|_| format!("bad \\{{{count}}}"))?;
                let byte = chars.next().ok_or("\\{N} without a character")?;
                let byte = u8::try_from(byte).map_err(|_| "\\{N} repeats ASCII only")?;
                out.extend(std::iter::repeat_n(byte, count));
            }
            other => return Err(format!("unknown escape \\{other:?}")),
        }
    }
    Ok(out)
}

/// Printable ASCII as is; `"` and `\` escaped; the rest as `\r \n \t \xNN`.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}

fn parse_fixture(text: &str) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("{FIXTURE}:{}", n + 1);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        if key == "case" {
            assert!(!value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{}", at());
            assert!(cases.iter().all(|c| c.name != value), "{}: case {value} twice", at());
            cases.push(Case {
                name: value.to_string(),
                request: Vec::new(),
                reply: None,
                responses: 1,
                nginx: String::new(),
                differs: None,
                sticky: None,
            });
            continue;
        }
        let case = cases.last_mut().unwrap_or_else(|| panic!("{}: {key} before any case", at()));
        let raw = |v: &str| unescape(&v.replace("{id}", &format!("fx-{}", case.name)));
        match key {
            "request" => case.request = raw(value).unwrap_or_else(|e| panic!("{}: {e}", at())),
            "reply" => case.reply = Some(raw(value).unwrap_or_else(|e| panic!("{}: {e}", at()))),
            "responses" => case.responses = value.parse().unwrap_or_else(|_| panic!("{}: responses N", at())),
            "nginx" => case.nginx = value.to_string(),
            "differs" => case.differs = Some(value.to_string()),
            "sticky" => case.sticky = Some(value.to_string()),
            _ => panic!("{}: unknown key {key:?}", at()),
        }
    }
    for case in &mut cases {
        if case.request.is_empty() {
            assert!(case.reply.is_some(), "case {}: a request case needs `request`", case.name);
            case.request = DEFAULT_REQUEST.replace("{id}", &case.id()).into_bytes();
        }
        assert!(
            case.differs.is_some() == case.sticky.is_some(),
            "case {}: `differs` (why) and `sticky` (what we do instead) go together",
            case.name
        );
    }
    cases
}

/// The fixture with every `nginx` line replaced by `recorded[name]`.
fn rewrite_fixture(text: &str, recorded: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("case ") {
            current = name.to_string();
        }
        match (line.starts_with("nginx "), recorded.get(&current)) {
            (true, Some(outcome)) => {
                let _ = writeln!(out, "nginx {outcome}");
            }
            _ => {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

// ---------------------------------------------------------------- HTTP/1 bits

/// The end of a message head (just past its blank line), CRLF or bare LF.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(lf) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + lf;
        let rest = &buf[at + 1..];
        if rest.starts_with(b"\n") {
            return Some(at + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(at + 3);
        }
        i = at + 1;
    }
    None
}

/// A head's first line and its header fields (names lowercased).
fn split_head(head: &[u8]) -> (String, Vec<(String, Vec<u8>)>) {
    let text = head.strip_suffix(b"\n").unwrap_or(head);
    let mut lines = text.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut fields = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_ascii_lowercase();
            fields.push((name, line[colon + 1..].trim_ascii().to_vec()));
        }
    }
    (first, fields)
}

fn field_values(fields: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    let values: Vec<String> =
        fields.iter().filter(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

#[derive(Debug, PartialEq)]
enum Chunked {
    /// The body, and how many bytes its chunked form took.
    Done(Vec<u8>, usize),
    Incomplete(Vec<u8>),
    Invalid(Vec<u8>),
}

/// De-chunks `data` (lenient about bare LF; trailers are skipped).
fn dechunk(data: &[u8]) -> Chunked {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(lf) = data[at..].iter().position(|&b| b == b'\n') else {
            return Chunked::Incomplete(body);
        };
        let line = &data[at..at + lf];
        let digits: Vec<u8> = line.iter().copied().take_while(u8::is_ascii_hexdigit).collect();
        let size = std::str::from_utf8(&digits).ok().and_then(|d| usize::from_str_radix(d, 16).ok());
        let Some(size) = size else {
            return Chunked::Invalid(body);
        };
        at += lf + 1;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(lf) = data[at..].iter().position(|&b| b == b'\n') else {
                    return Chunked::Incomplete(body);
                };
                let line = &data[at..at + lf];
                at += lf + 1;
                if line.is_empty() || line == b"\r" {
                    return Chunked::Done(body, at);
                }
            }
        }
        if data.len() < at + size {
            body.extend_from_slice(&data[at..]);
            return Chunked::Incomplete(body);
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size;
        if data[at..].starts_with(b"\r\n") {
            at += 2;
        } else if data[at..].starts_with(b"\n") {
            at += 1;
        } else if data.len() < at + 2 {
            return Chunked::Incomplete(body);
        } else {
            return Chunked::Invalid(body);
        }
    }
}

/// How a message with these header fields is framed (RFC 9112 §6.3, as a
/// plain backend reads it).
enum Framing {
    None,
    Length(usize),
    Chunked,
    /// Transfer-Encoding without chunked last: unreadable for a request.
    Other,
}

fn framing(fields: &[(String, Vec<u8>)]) -> Framing {
    if let Some(te) = field_values(fields, "transfer-encoding") {
        let last = te.rsplit(',').next().unwrap_or("").trim().to_ascii_lowercase();
        return if last == "chunked" { Framing::Chunked } else { Framing::Other };
    }
    match field_values(fields, "content-length") {
        None => Framing::None,
        Some(cl) => cl.trim().parse().map_or(Framing::Other, Framing::Length),
    }
}

/// Where the request at the start of `buf` ends, once it is all there.
fn request_end(buf: &[u8]) -> Option<usize> {
    let end = head_end(buf)?;
    let (_, fields) = split_head(&buf[..end]);
    match framing(&fields) {
        Framing::None | Framing::Other => Some(end),
        Framing::Length(n) => (buf.len() >= end + n).then_some(end + n),
        Framing::Chunked => match dechunk(&buf[end..]) {
            Chunked::Done(_, used) => Some(end + used),
            Chunked::Incomplete(_) => None,
            Chunked::Invalid(_) => Some(buf.len()),
        },
    }
}

/// What a backend connection received, normalised: `METHOD TARGET host=H
/// body="…"` (the body de-chunked), then ` framing="…"` when its framing
/// headers are anything but one `Content-Length` or `Transfer-Encoding:
/// chunked` (a proxy may re-frame a body either way: nginx sends a body that
/// arrived whole with Content-Length), ` incomplete` if the body never
/// ended, and ` rest="…"` for bytes after the request (a smuggled request
/// would show there). `backend` (the raw backend's address) reads BACKEND.
fn backend_view(buf: &[u8], backend: SocketAddr) -> String {
    let Some(end) = head_end(buf) else {
        return format!("incomplete-head \"{}\"", escape(&buf[..buf.len().min(80)]));
    };
    let (first, fields) = split_head(&buf[..end]);
    let mut words = first.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let host = field_values(&fields, "host").unwrap_or_else(|| "-".into()).replace(&backend.to_string(), "BACKEND");
    let data = &buf[end..];
    let mut notes = String::new();
    let (body, used, complete) = match framing(&fields) {
        Framing::None | Framing::Other => (Vec::new(), 0, true),
        Framing::Length(n) => (data[..n.min(data.len())].to_vec(), n.min(data.len()), data.len() >= n),
        Framing::Chunked => match dechunk(data) {
            Chunked::Done(body, used) => (body, used, true),
            Chunked::Incomplete(body) => (body, data.len(), false),
            Chunked::Invalid(body) => {
                notes.push_str(" invalid-chunks");
                (body, data.len(), true)
            }
        },
    };
    let mut view = format!("{method} {target} host={host} body=\"{}\"", escape(&body));
    let te = field_values(&fields, "transfer-encoding");
    let cl = field_values(&fields, "content-length");
    let regular = match (&te, &cl) {
        (None, None) => true,
        (Some(te), None) => te.eq_ignore_ascii_case("chunked"),
        (None, Some(cl)) => !cl.is_empty() && cl.bytes().all(|b| b.is_ascii_digit()),
        (Some(_), Some(_)) => false,
    };
    if !regular {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let _ = write!(view, " framing=\"cl={} te={}\"", show(&cl), show(&te));
    }
    view.push_str(&notes);
    if !complete {
        view.push_str(" incomplete");
    }
    if used < data.len() {
        let _ = write!(view, " rest=\"{}\"", escape(&data[used..]));
    }
    view
}

// ---------------------------------------------------------------- raw backend

/// The bytes one backend connection received so far.
type Received = Arc<Mutex<Vec<u8>>>;

/// A raw backend on loopback: records each connection's bytes; answers the
/// first request on each with the case's reply (or [`OK_REPLY`]), then
/// closes its side and keeps reading until the front closes.
struct Backend {
    addr: SocketAddr,
    /// Every connection's bytes, in accept order.
    conns: Arc<Mutex<Vec<Received>>>,
    open: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decrements the open-connection count when a connection task ends.
struct OpenGuard(Arc<watch::Sender<usize>>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Backend {
    async fn start(cases: &[Case]) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the raw backend");
        let addr = listener.local_addr().expect("backend address");
        let replies: Arc<HashMap<String, Vec<u8>>> =
            Arc::new(cases.iter().filter_map(|c| Some((c.id(), c.reply.clone()?))).collect());
        let conns: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (open_tx, open) = watch::channel(0usize);
        let open_tx = Arc::new(open_tx);
        let all = Arc::clone(&conns);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let buf: Received = Arc::default();
                all.lock().expect("backend lock").push(Arc::clone(&buf));
                open_tx.send_modify(|n| *n += 1);
                let guard = OpenGuard(Arc::clone(&open_tx));
                let replies = Arc::clone(&replies);
                tokio::spawn(async move {
                    let _guard = guard;
                    let _ = tokio::time::timeout(BOUND, serve_raw(stream, buf, replies)).await;
                });
            }
        });
        Backend { addr, conns, open, task }
    }

    /// Waits (bounded) until no connection is open, then returns every
    /// connection's view grouped by the case its `x-device-id` names.
    async fn views(&mut self) -> HashMap<String, Vec<String>> {
        let _ = tokio::time::timeout(BOUND, self.open.wait_for(|n| *n == 0)).await;
        let mut views: HashMap<String, Vec<String>> = HashMap::new();
        for conn in self.conns.lock().expect("backend lock").iter() {
            let buf = conn.lock().expect("connection lock");
            if buf.is_empty() {
                // Opened and closed without a byte: sticky-proxy connects as
                // soon as it has a request's head, and drops the connection
                // unused if the body's first chunk turns out malformed.
                // Nothing reached the backend.
                continue;
            }
            let id = head_end(&buf)
                .and_then(|end| field_values(&split_head(&buf[..end]).1, "x-device-id"))
                .unwrap_or_else(|| "?".into());
            views.entry(id).or_default().push(backend_view(&buf, self.addr));
        }
        views
    }
}

async fn serve_raw(mut stream: TcpStream, buf: Received, replies: Arc<HashMap<String, Vec<u8>>>) {
    let mut answered = false;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let reply = {
            let mut buf = buf.lock().expect("connection lock");
            buf.extend_from_slice(&chunk[..n]);
            if answered || request_end(&buf).is_none() {
                None
            } else {
                let end = head_end(&buf).unwrap_or(0);
                let (first, fields) = split_head(&buf[..end]);
                let id = field_values(&fields, "x-device-id").unwrap_or_default();
                let probe = first.split(' ').nth(1) == Some("/alive");
                Some(replies.get(&id).filter(|_| !probe).cloned().unwrap_or_else(|| OK_REPLY.to_vec()))
            }
        };
        if let Some(reply) = reply {
            answered = true;
            if stream.write_all(&reply).await.is_err() || stream.shutdown().await.is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------- client

/// A client connection to a front with everything read so far.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

enum Fill {
    More,
    Eof,
    Timeout,
}

impl Client {
    async fn fill(&mut self, deadline: Instant) -> Fill {
        if self.eof {
            return Fill::Eof;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Fill::Timeout,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                Fill::Eof
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Fill::More
            }
        }
    }
}

#[derive(Debug)]
enum Got {
    /// Closed, or silent for [`SILENCE`], before a byte of a response.
    Nothing,
    /// Bytes that are not an HTTP/1 response head.
    Garbage(Vec<u8>),
    Response {
        status: u16,
        body: Vec<u8>,
        end: &'static str,
    },
}

/// Reads one response (interim ones included) off `client`.
async fn read_response(client: &mut Client, head_request: bool) -> Got {
    let deadline = Instant::now() + SILENCE;
    let end = loop {
        if let Some(end) = head_end(&client.buf) {
            break end;
        }
        if !matches!(client.fill(deadline).await, Fill::More) {
            return if client.buf.is_empty() { Got::Nothing } else { Got::Garbage(std::mem::take(&mut client.buf)) };
        }
    };
    let head: Vec<u8> = client.buf.drain(..end).collect();
    let (first, fields) = split_head(&head);
    let status =
        first.strip_prefix("HTTP/1.").and_then(|rest| rest.get(2..5)).and_then(|code| code.parse::<u16>().ok());
    let Some(status) = status else {
        let mut garbage = head;
        garbage.append(&mut client.buf);
        return Got::Garbage(garbage);
    };
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Got::Response { status, body: Vec::new(), end: "complete" };
    }
    match framing(&fields) {
        Framing::Chunked => loop {
            match dechunk(&client.buf) {
                Chunked::Done(body, used) => {
                    client.buf.drain(..used);
                    return Got::Response { status, body, end: "complete" };
                }
                Chunked::Invalid(body) => return Got::Response { status, body, end: "bad-chunks" },
                Chunked::Incomplete(body) => match client.fill(deadline).await {
                    Fill::More => continue,
                    Fill::Eof => return Got::Response { status, body, end: "truncated" },
                    Fill::Timeout => return Got::Response { status, body, end: "stalled" },
                },
            }
        },
        Framing::Length(n) => loop {
            if client.buf.len() >= n {
                let body = client.buf.drain(..n).collect();
                return Got::Response { status, body, end: "complete" };
            }
            match client.fill(deadline).await {
                Fill::More => continue,
                Fill::Eof => return Got::Response { status, body: std::mem::take(&mut client.buf), end: "truncated" },
                Fill::Timeout => {
                    return Got::Response { status, body: std::mem::take(&mut client.buf), end: "stalled" }
                }
            }
        },
        Framing::None | Framing::Other => loop {
            match client.fill(deadline).await {
                Fill::More => continue,
                Fill::Eof => return Got::Response { status, body: std::mem::take(&mut client.buf), end: "close" },
                Fill::Timeout => {
                    return Got::Response { status, body: std::mem::take(&mut client.buf), end: "stalled" }
                }
            }
        },
    }
}

fn class(status: u16) -> String {
    if (100..200).contains(&status) {
        status.to_string()
    } else {
        format!("{}xx", status / 100)
    }
}

/// Runs one case against the front at `front`; the client's half of the
/// outcome (the backend's is added once every case is done).
async fn run_client(front: SocketAddr, case: &Case) -> String {
    let stream = match tokio::time::timeout(BOUND, TcpStream::connect(front)).await {
        Ok(Ok(stream)) => stream,
        other => return format!("client=connect-failed({other:?})"),
    };
    let mut client = Client { stream, buf: Vec::new(), eof: false };
    if tokio::time::timeout(BOUND, client.stream.write_all(&case.request)).await.is_err() {
        return "client=write-stalled".into();
    }
    if case.reply.is_none() {
        // A request case: the status class of each final response.
        let mut statuses = Vec::new();
        while statuses.len() < case.responses {
            match read_response(&mut client, case.head_request()).await {
                Got::Response { status, .. } if (100..200).contains(&status) && status != 101 => {}
                Got::Response { status, end: "complete", .. } => statuses.push(class(status)),
                Got::Response { status, end, .. } => {
                    statuses.push(format!("{}({end})", class(status)));
                    break;
                }
                Got::Nothing => {
                    statuses.push("none".into());
                    break;
                }
                Got::Garbage(_) => {
                    statuses.push("garbage".into());
                    break;
                }
            }
        }
        return format!("client={}", statuses.join(","));
    }
    // A response case: interim statuses, the final one, its body, how it
    // ended, and whether the connection takes another request.
    let mut statuses = Vec::new();
    let mut out = String::new();
    loop {
        match read_response(&mut client, case.head_request()).await {
            Got::Response { status, .. } if (100..200).contains(&status) && status != 101 => {
                statuses.push(class(status));
            }
            Got::Response { status, body, end } => {
                statuses.push(class(status));
                let _ = write!(out, "client={}", statuses.join(","));
                if status < 400 {
                    let _ = write!(out, " body=\"{}\"", escape(&body));
                }
                let _ = write!(out, " end={end}");
                if end != "complete" {
                    return out;
                }
                break;
            }
            Got::Nothing => {
                statuses.push("none".into());
                return format!("client={}", statuses.join(","));
            }
            Got::Garbage(bytes) => {
                return format!("client=garbage \"{}\"", escape(&bytes[..bytes.len().min(60)]));
            }
        }
    }
    // The connection after the response: does it serve the next request?
    let probe = PROBE.replace("{id}", &case.id());
    let next = if client.eof || client.stream.write_all(probe.as_bytes()).await.is_err() {
        "closed".to_string()
    } else {
        match read_response(&mut client, false).await {
            Got::Response { status, body, end: "complete" } if status == 200 && body == b"ok" => "alive".into(),
            Got::Response { status, .. } => format!("answered-{}", class(status)),
            Got::Nothing if client.eof => "closed".into(),
            Got::Nothing => "silent".into(),
            Got::Garbage(_) => "garbage".into(),
        }
    };
    let _ = write!(out, " next={next}");
    out
}

/// Runs every case through the front at `front`, in front of `backend`:
/// each case's whole outcome by name.
/// Also returns what the backend got on connections that name no case.
async fn run_all(front: SocketAddr, backend: &mut Backend, cases: &[Case]) -> (HashMap<String, String>, Vec<String>) {
    let mut tasks = tokio::task::JoinSet::new();
    for case in cases {
        let case = case.clone();
        tasks.spawn(async move {
            let client = run_client(front, &case).await;
            (case, client)
        });
    }
    let mut clients = Vec::new();
    while let Some(done) = tasks.join_next().await {
        clients.push(done.expect("a case's task panicked"));
    }
    let mut views = backend.views().await;
    let unknown = views.remove("?").unwrap_or_default();
    let outcomes = clients
        .into_iter()
        .map(|(case, client)| {
            let outcome = if case.reply.is_some() {
                client
            } else {
                let backend = views
                    .remove(&case.id())
                    .map_or("none".to_string(), |v| v.iter().map(|v| format!("[{v}]")).collect::<Vec<_>>().join(" "));
                format!("{client} backend={backend}")
            };
            (case.name, outcome)
        })
        .collect();
    (outcomes, unknown)
}

// ---------------------------------------------------------------- fronts

fn sticky_config(backend: SocketAddr) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\naccess_log = false\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [routing]\nkey = [\"header:x-device-id\"]\nmissing_key = \"spread\"\n\n\
         [reload]\nwatch = false\n\n\
         [[backends]]\nid = \"raw\"\naddress = \"{backend}\"\n"
    )
}

/// The nginx to check: `FRAMING_NGINX` (a path, or `none` to skip nginx),
/// else `nginx` on PATH, else /usr/sbin/nginx.
fn nginx_binary() -> Option<PathBuf> {
    if let Some(chosen) = std::env::var_os("FRAMING_NGINX").filter(|v| !v.is_empty()) {
        return (chosen != "none").then(|| PathBuf::from(chosen));
    }
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nginx"));
    from_path.chain([PathBuf::from("/usr/sbin/nginx")]).find(|p| p.is_file())
}

/// A line on the test's real stderr, past libtest's capture (which only
/// takes `print!` and `eprint!`): shown even when the test passes.
fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "framing: {line}");
}

/// nginx as the current user, in a temp prefix, on a free loopback port,
/// in one process (`master_process off`), logging to a pipe read here.
struct Nginx {
    child: std::process::Child,
    dir: PathBuf,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Nginx {
    /// Starts nginx; another port if the one picked was taken meanwhile.
    fn start(binary: &Path, backend: SocketAddr) -> Nginx {
        let mut tries = 0;
        loop {
            tries += 1;
            match Nginx::try_start(binary, backend) {
                Ok(nginx) => return nginx,
                Err(log) if tries < 3 && log.contains("Address already in use") => continue,
                Err(log) => panic!("nginx did not start within {BOUND:?}; its log:\n{log}"),
            }
        }
    }

    /// Starts nginx and waits (bounded) for its "OS: …" notice, which it
    /// logs once its listening socket is open; else its log.
    fn try_start(binary: &Path, backend: SocketAddr) -> Result<Nginx, String> {
        use std::io::BufRead;
        // A port the kernel just handed out and took back: free, short of a
        // race with another process on this machine.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port for nginx");
        let dir = std::env::temp_dir().join(format!("sticky-framing-nginx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).expect("nginx temp dir");
        let temp_paths: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| format!("  {t}_temp_path {};\n", dir.join(t).display()))
            .collect();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log stderr info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n{temp_paths}\
               server {{\n    listen {addr};\n    location / {{\n\
                   proxy_pass http://{backend};\n      proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n\
                   proxy_request_buffering off;\n      proxy_buffering off;\n\
                   proxy_next_upstream off;\n    }}\n  }}\n}}\n",
            dir = dir.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut child = std::process::Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .args(["-e", "stderr", "-c"])
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nginx");
        let stderr = child.stderr.take().expect("nginx's stderr");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, lines) = std::sync::mpsc::channel();
        let all = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                all.lock().expect("log lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let nginx = Nginx { child, dir, addr, log };
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains("OS: ") => return Ok(nginx),
                Ok(_) => continue,
                // Exited (the log pipe closed) or too slow.
                Err(_) => return Err(nginx.error_log()),
            }
        }
    }

    fn error_log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }
}

// ---------------------------------------------------------------- the test

/// One line per case whose outcome is not the expected one.
fn mismatches(cases: &[Case], got: &HashMap<String, String>, expected: impl Fn(&Case) -> &str) -> Vec<String> {
    cases
        .iter()
        .filter_map(|case| {
            let got = got.get(&case.name).map_or("(not run)", String::as_str);
            (got != expected(case)).then(|| format!("  {}\n    want: {}\n    got:  {got}", case.name, expected(case)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_matches_nginx() {
    let started = std::time::Instant::now();
    let text = std::fs::read_to_string(FIXTURE).expect("read the framing fixture");
    let mut cases = parse_fixture(&text);
    assert!(cases.len() >= 40, "the corpus has {} cases", cases.len());
    let record = std::env::var_os("FRAMING_RECORD").is_some_and(|v| v != "0");
    // FRAMING_ONLY=WORD runs the cases whose name contains WORD (to debug one).
    if let Some(only) = std::env::var("FRAMING_ONLY").ok().filter(|o| !o.is_empty()) {
        assert!(!record, "FRAMING_RECORD records every case: unset FRAMING_ONLY");
        cases.retain(|c| c.name.contains(&only));
    }

    let sticky_side = {
        let cases = cases.clone();
        async move {
            let mut backend = Backend::start(&cases).await;
            let config = ConfigFile::new("framing.toml", &sticky_config(backend.addr));
            let path = config.path.clone();
            let proxy = tokio::task::spawn_blocking(move || ChildProxy::spawn(&path)).await.expect("spawn proxy");
            let front: SocketAddr = proxy.addr.parse().expect("proxy address");
            let got = run_all(front, &mut backend, &cases).await;
            drop(proxy);
            got
        }
    };
    let nginx_side = {
        let cases = cases.clone();
        let binary = nginx_binary();
        async move {
            let binary = binary?;
            let mut backend = Backend::start(&cases).await;
            let backend_addr = backend.addr;
            let nginx =
                tokio::task::spawn_blocking(move || Nginx::start(&binary, backend_addr)).await.expect("start nginx");
            let (got, unknown) = run_all(nginx.addr, &mut backend, &cases).await;
            Some((got, nginx.error_log(), unknown))
        }
    };
    let ((sticky, sticky_unknown), nginx) = tokio::join!(sticky_side, nginx_side);

    let mut failures = Vec::new();
    // Every request a case sends names it (x-device-id): a backend request
    // that names none is one the client never sent as such.
    if !sticky_unknown.is_empty() {
        failures.push(format!("sticky-proxy sent the backend requests no case sent: {sticky_unknown:#?}"));
    }
    if let Some((_, _, unknown)) = nginx.as_ref().filter(|(_, _, unknown)| !unknown.is_empty()) {
        failures.push(format!("nginx sent the backend requests no case sent: {unknown:#?}"));
    }
    match &nginx {
        None => {
            assert!(!record, "FRAMING_RECORD needs nginx (FRAMING_NGINX, PATH or /usr/sbin/nginx)");
            note("nginx not found (FRAMING_NGINX, PATH, /usr/sbin/nginx): sticky-proxy checked against the recorded nginx outcomes only, nginx itself not checked");
        }
        Some((got, log, _)) if record => {
            let broken: Vec<&String> = got.values().filter(|o| o.contains("connect-failed")).collect();
            assert!(broken.is_empty(), "not recording: nginx failed: {broken:?}\n{log}");
            std::fs::write(FIXTURE, rewrite_fixture(&text, got)).expect("rewrite the fixture");
            note(&format!("recorded {} nginx outcomes into {FIXTURE}", got.len()));
            for case in &cases {
                note(&format!("{}\n  nginx:  {}\n  sticky: {}", case.name, got[&case.name], sticky[&case.name]));
            }
            if std::env::var_os("FRAMING_NGINX_LOG").is_some() {
                note(&format!("nginx's log:\n{log}"));
            }
        }
        Some((got, log, _)) => {
            let drifted = mismatches(&cases, got, |c| &c.nginx);
            if !drifted.is_empty() {
                failures.push(format!(
                    "nginx no longer does what {FIXTURE} recorded (re-record with FRAMING_RECORD=1):\n{}\nnginx's error log:\n{}",
                    drifted.join("\n"),
                    log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
                ));
            }
        }
    }
    if !record {
        let wrong = mismatches(&cases, &sticky, Case::sticky_expected);
        if !wrong.is_empty() {
            failures.push(format!(
                "sticky-proxy differs from nginx's recorded outcome (or a case's `sticky` line):\n{}",
                wrong.join("\n")
            ));
        }
    }
    note(&format!(
        "{} cases through sticky-proxy{} in {:.1?}",
        cases.len(),
        if nginx.is_some() { " and nginx" } else { "" },
        started.elapsed()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_helpers_read_http_as_expected() {
    assert_eq!(unescape(r"a\r\n\x41\{3}z\\").expect("escapes"), b"a\r\nAzzz\\");
    assert_eq!(dechunk(b"5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\nrest"), Chunked::Done(b"hello".to_vec(), 25));
    assert_eq!(dechunk(b"5\r\nhel"), Chunked::Incomplete(b"hel".to_vec()));
    assert_eq!(dechunk(b"zz\r\n"), Chunked::Invalid(Vec::new()));
    assert_eq!(request_end(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"), Some(40));
    assert_eq!(request_end(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\na"), None);
    assert_eq!(
        backend_view(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\nXY",
            "127.0.0.1:1".parse().expect("address")
        ),
        "POST /x host=h body=\"ab\" rest=\"XY\""
    );
    assert_eq!(escape(b"a\"\x00"), "a\\\"\\x00");
}
