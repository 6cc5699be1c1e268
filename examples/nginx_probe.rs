//! Asks a running proxy where device IDs go, for `tests/nginx/compare.sh`.
//!
//! `nginx_probe ADDR SEED N` sends `GET /` with `X-Device-Id: ID` for each
//! of `sticky_proxy::tools::sample::varied_ids(SEED, N)`, in order, over one
//! keep-alive HTTP/1.1 connection, and prints each response body (the
//! answering backend's name) on a line of its own. Any answer but 200, or
//! no answer within 10 s, is an error (exit 1): a probe that guesses would
//! hide a drift.
//!
//! Plain std networking so that what is sent is exactly the ID's bytes.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [addr, seed, n] => match (addr.parse::<SocketAddr>(), seed.parse::<u64>(), n.parse::<usize>()) {
            (Ok(a), Ok(s), Ok(n)) => Some((a, s, n)),
            _ => None,
        },
        _ => None,
    };
    let Some((addr, seed, n)) = parsed else {
        eprintln!("usage: nginx_probe ADDR SEED N   (e.g. 127.0.0.1:18000 7 10000)");
        return ExitCode::FAILURE;
    };
    match run(addr, seed, n) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nginx_probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(addr: SocketAddr, seed: u64, n: usize) -> Result<(), String> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut conn: Option<BufReader<TcpStream>> = None;
    for (i, id) in sticky_proxy::tools::sample::varied_ids(seed, n).iter().enumerate() {
        // A kept-alive connection the server closed meanwhile fails before
        // any answer: then once more on a new connection.
        let mut answer = None;
        for _ in 0..2 {
            let c = match conn.take() {
                Some(c) => c,
                None => BufReader::new(connect(addr)?),
            };
            match ask(c, id) {
                Ok((body, c)) => {
                    answer = Some(body);
                    conn = c;
                    break;
                }
                Err(Retry::Closed) => continue,
                Err(Retry::Fatal(e)) => return Err(format!("ID #{i} {id:?}: {e}")),
            }
        }
        let body = answer.ok_or_else(|| format!("ID #{i} {id:?}: the connection closed twice without an answer"))?;
        writeln!(out, "{body}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

/// Connects, waiting (at most [`TIMEOUT`]) for a server that is starting.
fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => return Err(format!("cannot connect to {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

enum Retry {
    /// Closed before any byte of an answer: safe to ask again.
    Closed,
    Fatal(String),
}

/// One request; the body, and the connection if it may be reused.
fn ask(mut conn: BufReader<TcpStream>, id: &str) -> Result<(String, Option<BufReader<TcpStream>>), Retry> {
    let fatal = |e: std::io::Error| Retry::Fatal(e.to_string());
    let request = format!("GET / HTTP/1.1\r\nHost: probe\r\nX-Device-Id: {id}\r\n\r\n");
    if conn.get_mut().write_all(request.as_bytes()).is_err() {
        return Err(Retry::Closed);
    }
    let mut status = String::new();
    match conn.read_line(&mut status) {
        Ok(0) => return Err(Retry::Closed),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(Retry::Closed),
        Err(e) => return Err(fatal(e)),
        Ok(_) => {}
    }
    let (mut length, mut close) = (None, false);
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).map_err(fatal)? == 0 {
            return Err(Retry::Fatal("the connection closed inside the headers".into()));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    let length = length.ok_or_else(|| Retry::Fatal(format!("no Content-Length in the answer ({})", status.trim())))?;
    let mut body = vec![0; length];
    conn.read_exact(&mut body).map_err(fatal)?;
    let body = String::from_utf8_lossy(&body).trim().to_string();
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(Retry::Fatal(format!("answer {:?}: {body:?}", status.trim())));
    }
    Ok((body, (!close).then_some(conn)))
}
