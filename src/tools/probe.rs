//! `sticky-proxy probe URL`: one HTTP GET, success on a 2xx answer. It is the
//! container image's HEALTHCHECK (the slim image has no curl), and the tour's
//! HTTP client ([`request`]) lives here too.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The most of a response body [`request`] keeps (the rest is read and dropped).
const MAX_BODY: usize = 64 * 1024;

/// An answer as [`request`] returns it.
#[derive(Debug)]
pub struct Answer {
    /// The response's status.
    pub status: StatusCode,
    /// The response's headers.
    pub headers: HeaderMap,
    /// The body (lossy UTF-8), its first 64 KiB.
    pub body: String,
}

/// `GET url`: `Ok` with the status line when it answers 2xx within
/// `timeout`; an error saying why otherwise (for the exit code).
pub async fn probe(url: &str, timeout: Duration) -> io::Result<()> {
    let answer = request(Method::GET, url, &[], Bytes::new(), timeout).await?;
    if answer.status.is_success() {
        println!("{url}: {}", answer.status);
        Ok(())
    } else {
        Err(io::Error::other(format!("{url}: {} {}", answer.status, answer.body.trim())))
    }
}

/// One HTTP/1.1 request on a new connection (`http://` URLs only), the whole
/// exchange bounded by `timeout`.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> io::Result<Answer> {
    let what = format!("{method} {url}");
    match tokio::time::timeout(timeout, exchange(method, url, headers, body)).await {
        Ok(answer) => answer.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}"))),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("{what}: no answer within {timeout:?}"))),
    }
}

async fn exchange(method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> io::Result<Answer> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let uri: Uri = url.parse().map_err(|e| invalid(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid("only http:// URLs are supported".into()));
    }
    let authority = uri.authority().ok_or_else(|| invalid("the URL has no host".into()))?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host().trim_matches(['[', ']']), port)).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
    let conn = tokio::spawn(conn);
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::builder().method(method).uri(target).header(hyper::header::HOST, authority.as_str());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body)).map_err(|e| invalid(format!("bad request: {e}")))?;
    let response = sender.send_request(req).await.map_err(io::Error::other)?;
    let (parts, mut incoming) = response.into_parts();
    let mut kept = Vec::new();
    while let Some(frame) = incoming.frame().await {
        if let Ok(data) = frame.map_err(io::Error::other)?.into_data() {
            let room = MAX_BODY.saturating_sub(kept.len());
            kept.extend_from_slice(data.get(..room.min(data.len())).unwrap_or_default());
        }
    }
    conn.abort();
    Ok(Answer { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&kept).into_owned() })
}
