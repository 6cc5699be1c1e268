//! One client connection's clocks and counts: the I/O wrapper that enforces
//! `header_read_timeout`, `keepalive_timeout` and `send_timeout`, and the
//! request accounting those timeouts and `keepalive_requests` need.
//!
//! hyper's own header timer starts when it waits for a request, so it can't
//! tell an idle keep-alive connection (`keepalive_timeout`) from a client
//! sending its headers slowly (`header_read_timeout`). [`ClientIo`] can:
//! [`ConnState`] counts the connection's requests in flight (each held from
//! the service call until its response body is done, by [`Tracked`]), and
//! the read side is
//! - busy while a request is in flight or the connection was upgraded: no
//!   read clock (the body timeout and the tunnel's own idle limit apply);
//! - idle otherwise, until a byte of the next request arrives: closed after
//!   `keepalive_timeout` (the first request of a connection gets
//!   `header_read_timeout` instead, as nginx's `client_header_timeout`);
//! - reading a head once that byte arrived: `header_read_timeout` from it.
//!
//! On HTTP/2 only streams count: frames such as PING don't keep an idle
//! connection open, and there is no head clock.
//!
//! A write that makes no progress for `send_timeout` fails the connection.
//!
//! It also serves `HTTP/1.2` (and up to 1.9) as 1.1 (RFC 9112 §2.3): the
//! first request line of a connection is rewritten before hyper, whose
//! parser knows only 1.0 and 1.1, reads it; such a connection closes after
//! that request, since later request lines can't be found without framing.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{Limit, LiveGauge, Metrics};

/// What a connection's requests tell its I/O.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    in_flight: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// A response switched protocols: the connection is a tunnel now.
    upgraded: AtomicBool,
    /// The first request line said HTTP/1.2 or later and was served as 1.1.
    newer_minor: AtomicBool,
    /// A read that found the connection busy: woken when the last request
    /// in flight is done, so that the idle clock starts.
    reader: AtomicWaker,
    /// `requests_in_flight`, on the proxy's listeners (not the admin's).
    gauge: Option<LiveGauge>,
}

impl ConnState {
    /// The state of a new connection; `gauge` counts its requests in flight.
    pub(crate) fn new(gauge: Option<LiveGauge>) -> ConnState {
        ConnState { gauge, ..ConnState::default() }
    }

    /// A request starts; returns its guard and how many requests this
    /// connection has started, this one included.
    pub(crate) fn begin(self: &Arc<Self>) -> (InFlight, u64) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Some(gauge) = &self.gauge {
            gauge.inc();
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        (InFlight(Arc::clone(self)), n)
    }

    /// The connection now carries a tunnel (a 101 answer).
    pub(crate) fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// The request line was HTTP/1.2 or later, served as 1.1.
    pub(crate) fn newer_minor(&self) -> bool {
        self.newer_minor.load(Ordering::Relaxed)
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0 || self.upgraded.load(Ordering::Acquire)
    }
}

/// A request in flight; dropped when its response body is done (or the
/// request was abandoned).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
        if let Some(gauge) = &self.0.gauge {
            gauge.dec();
        }
    }
}

/// A response body that holds its request's [`InFlight`] until it is done.
pub(crate) struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

pin_project_lite::pin_project! {
    /// A service's answer to one request, made [`Tracked`]: the response
    /// closes the connection once it has served `keepalive_requests`, or
    /// after a request line that said HTTP/1.2 or later; a 101 marks the
    /// connection a tunnel. A future of its own rather than an `async`
    /// block, which hyper would need boxed: one allocation less per request.
    pub(crate) struct TrackedAnswer<F> {
        #[pin]
        answer: F,
        in_flight: Option<InFlight>,
        nth: u64,
        keepalive_requests: u64,
    }
}

impl<F> TrackedAnswer<F> {
    /// `answer`, the `nth` request of the connection `in_flight` counts on.
    pub(crate) fn new(answer: F, in_flight: InFlight, nth: u64, keepalive_requests: u64) -> TrackedAnswer<F> {
        TrackedAnswer { answer, in_flight: Some(in_flight), nth, keepalive_requests }
    }
}

impl<F, B> Future for TrackedAnswer<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<Tracked<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.answer.poll(cx));
        let Some(in_flight) = this.in_flight.take() else {
            panic!("TrackedAnswer polled after it completed");
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            in_flight.0.upgraded();
        } else if *this.nth >= *this.keepalive_requests || in_flight.0.newer_minor() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response.map(|body| Tracked::new(body, in_flight))))
    }
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked { inner, _in_flight: in_flight }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The clocks of one connection, from the config when it was accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clocks {
    pub header_read: Duration,
    /// `None`: keep-alive is off (hyper closes after one request).
    pub keepalive: Option<Duration>,
    pub send: Duration,
    /// HTTP/2: only streams count, no head clock.
    pub h2: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadPhase {
    /// No request in flight and no byte of the next one yet.
    Idle,
    /// Bytes of a request head have arrived.
    Head,
    /// A request is in flight, or the connection is a tunnel.
    Busy,
}

/// A client connection's transport with its clocks (see the module doc).
pub(crate) struct ClientIo<T> {
    inner: T,
    state: Arc<ConnState>,
    clocks: Clocks,
    metrics: Arc<Metrics>,
    phase: ReadPhase,
    /// The read clock's deadline, armed in `Idle` and `Head`.
    read_timer: Option<Pin<Box<Sleep>>>,
    read_armed: bool,
    write_timer: Option<Pin<Box<Sleep>>>,
    write_armed: bool,
    /// Looking for the end of the first request line (HTTP/1 only).
    first_line: bool,
}

impl<T> ClientIo<T> {
    pub(crate) fn new(inner: T, state: Arc<ConnState>, clocks: Clocks, metrics: Arc<Metrics>) -> ClientIo<T> {
        ClientIo {
            inner,
            state,
            first_line: !clocks.h2,
            clocks,
            metrics,
            phase: ReadPhase::Idle,
            read_timer: None,
            read_armed: false,
            write_timer: None,
            write_armed: false,
        }
    }

    /// The read clock's limit in the current phase.
    fn read_limit(&self) -> Option<Duration> {
        match self.phase {
            ReadPhase::Busy => None,
            ReadPhase::Head => Some(self.clocks.header_read),
            // The first request: the client has had no answer yet, so its
            // wait is for headers, as nginx's client_header_timeout.
            ReadPhase::Idle if self.state.requests.load(Ordering::Relaxed) == 0 && !self.clocks.h2 => {
                Some(self.clocks.header_read)
            }
            ReadPhase::Idle => self.clocks.keepalive,
        }
    }

    /// Moves between phases on what the requests say.
    fn settle_phase(&mut self) {
        let busy = self.state.busy();
        let phase = match (self.phase, busy) {
            (_, true) => ReadPhase::Busy,
            (ReadPhase::Busy, false) => ReadPhase::Idle,
            (phase, false) => phase,
        };
        if phase != self.phase {
            self.phase = phase;
            self.read_armed = false;
        }
    }
}

/// Arms `timer` for `limit` from now if it isn't armed, then polls it.
fn poll_clock(timer: &mut Option<Pin<Box<Sleep>>>, armed: &mut bool, limit: Duration, cx: &mut Context<'_>) -> bool {
    let deadline = Instant::now() + limit;
    let sleep = match timer {
        Some(sleep) => {
            if !*armed {
                sleep.as_mut().reset(deadline);
            }
            sleep
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    *armed = true;
    sleep.as_mut().poll(cx).is_ready()
}

/// Rewrites `HTTP/1.N` (N from 2 to 9) at the end of the first line in
/// `data` to `HTTP/1.1`; returns whether the line ended in `data` and
/// whether it was rewritten. Empty lines before it are skipped (RFC 9112
/// §2.2).
fn rewrite_newer_minor(data: &mut [u8]) -> (bool, bool) {
    let mut start = 0;
    while let Some(at) = data[start..].iter().position(|&b| b == b'\n') {
        let end = start + at;
        let line_end = if end > start && data[end - 1] == b'\r' { end - 1 } else { end };
        if line_end == start {
            start = end + 1;
            continue;
        }
        let line = &mut data[start..line_end];
        let n = line.len();
        if n > 9 && &line[n - 9..n - 1] == b" HTTP/1." && matches!(line[n - 1], b'2'..=b'9') {
            line[n - 1] = b'1';
            return (true, true);
        }
        return (true, false);
    }
    (false, false)
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.settle_phase();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if this.first_line {
                        let (ended, rewritten) = rewrite_newer_minor(&mut buf.filled_mut()[before..]);
                        this.first_line = !ended;
                        if rewritten {
                            this.state.newer_minor.store(true, Ordering::Relaxed);
                        }
                    }
                    if this.phase == ReadPhase::Idle && !this.clocks.h2 {
                        this.phase = ReadPhase::Head;
                        this.read_armed = false;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(limit) = this.read_limit() else {
                    this.read_armed = false;
                    if this.phase == ReadPhase::Busy {
                        this.state.reader.register(cx.waker());
                        // Done in between: read again, and the clock starts.
                        if !this.state.busy() {
                            cx.waker().wake_by_ref();
                        }
                    }
                    return Poll::Pending;
                };
                if !poll_clock(&mut this.read_timer, &mut this.read_armed, limit, cx) {
                    return Poll::Pending;
                }
                this.read_armed = false;
                if this.phase == ReadPhase::Head {
                    this.metrics.limit_hit(Limit::HeaderReadTimeout);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the request's headers took longer than server.header_read_timeout",
                    )));
                }
                // Idle: an end of stream closes the connection cleanly.
                let first = this.state.requests.load(Ordering::Relaxed) == 0 && !this.clocks.h2;
                this.metrics.limit_hit(if first { Limit::HeaderReadTimeout } else { Limit::KeepaliveTimeout });
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> ClientIo<T> {
    /// A write made progress (`Ready`) or stalls; past `send_timeout` the
    /// stall is an error.
    fn write_clock<R>(&mut self, polled: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(result) => {
                self.write_armed = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                if !poll_clock(&mut self.write_timer, &mut self.write_armed, self.clocks.send, cx) {
                    return Poll::Pending;
                }
                self.write_armed = false;
                self.metrics.limit_hit(Limit::SendTimeout);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing for server.send_timeout",
                )))
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.write_clock(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.write_clock(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.write_clock(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.write_clock(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HEAD: Duration = Duration::from_secs(10);
    const KEEPALIVE: Duration = Duration::from_secs(75);
    const SEND: Duration = Duration::from_secs(60);

    fn clocks(h2: bool) -> Clocks {
        Clocks { header_read: HEAD, keepalive: Some(KEEPALIVE), send: SEND, h2 }
    }

    fn io(h2: bool) -> (ClientIo<tokio::io::DuplexStream>, tokio::io::DuplexStream, Arc<ConnState>, Arc<Metrics>) {
        let (ours, theirs) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::default());
        let metrics = Arc::new(Metrics::new());
        (ClientIo::new(ours, Arc::clone(&state), clocks(h2), Arc::clone(&metrics)), theirs, state, metrics)
    }

    /// Reads until end of stream or error; returns which, and when.
    async fn read_to_end(io: &mut ClientIo<tokio::io::DuplexStream>) -> (io::Result<usize>, Duration) {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let result = io.read(&mut buf).await;
        (result, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_gets_header_read_timeout_then_idle_gets_keepalive_timeout() {
        // Nothing at all: the first request's wait is for headers.
        let (mut io, _client, _state, metrics) = io(false);
        let (result, took) = read_to_end(&mut io).await;
        assert_eq!((result.expect("a clean end"), took), (0, HEAD));
        assert!(metrics.encode().contains("limit=\"server.header_read_timeout\"} 1"));

        // A request line, and then nothing: the head clock runs from it.
        let (mut io, mut client, _state, _metrics) = io_pair();
        tokio::time::sleep(HEAD / 2).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.expect("read") > 0);
        let (result, took) = read_to_end(&mut io).await;
        assert_eq!(result.expect_err("a slow head is an error").kind(), io::ErrorKind::TimedOut);
        assert_eq!(took, HEAD);

        // After a request has been served, waiting is idling.
        let (mut io, _client, state, metrics) = io_pair();
        let (in_flight, nth) = state.begin();
        assert_eq!(nth, 1);
        drop(in_flight);
        let (result, took) = read_to_end(&mut io).await;
        assert_eq!((result.expect("a clean end"), took), (0, KEEPALIVE));
        assert!(metrics.encode().contains("limit=\"server.keepalive_timeout\"} 1"), "{}", metrics.encode());
    }

    fn io_pair() -> (ClientIo<tokio::io::DuplexStream>, tokio::io::DuplexStream, Arc<ConnState>, Arc<Metrics>) {
        io(false)
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_or_a_tunnel_stops_the_read_clock() {
        let (mut io, mut client, state, _metrics) = io(false);
        let (guard, _) = state.begin();
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = io.read(&mut buf).await;
            (n.map_err(|e| e.kind()), io)
        });
        tokio::time::sleep(KEEPALIVE * 3).await;
        assert!(!reading.is_finished(), "no clock while a request is in flight");
        client.write_all(b"x").await.expect("write");
        let (n, mut io) = reading.await.expect("task");
        assert_eq!(n, Ok(1));
        state.upgraded();
        drop(guard);
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            io.read(&mut buf).await.map_err(|e| e.kind())
        });
        tokio::time::sleep(KEEPALIVE * 3).await;
        assert!(!reading.is_finished(), "no clock on a tunnel");
        drop(client);
        assert_eq!(reading.await.expect("task"), Ok(0));
    }

    /// hyper may be parked on a read that found a request in flight; the
    /// request's end must wake it, or the idle clock would never start.
    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_last_request_starts_the_idle_clock_of_a_parked_read() {
        let (mut io, _client, state, _metrics) = io(false);
        let (in_flight, _) = state.begin();
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let start = Instant::now();
            let n = io.read(&mut buf).await.map_err(|e| e.kind());
            (n, start.elapsed())
        });
        tokio::time::sleep(KEEPALIVE * 2).await;
        drop(in_flight);
        let ended = tokio::time::timeout(KEEPALIVE * 10, reading).await;
        let (n, took) = ended.expect("the idle clock ran").expect("task");
        assert_eq!((n, took), (Ok(0), KEEPALIVE * 3));
    }

    #[tokio::test(start_paused = true)]
    async fn on_http2_frames_without_streams_do_not_keep_a_connection_open() {
        let (mut io, mut client, _state, _metrics) = io(true);
        let start = Instant::now();
        let pinging = tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if client.write_all(b"p").await.is_err() {
                    return;
                }
            }
        });
        let mut buf = [0u8; 8];
        while io.read(&mut buf).await.expect("no error") > 0 {}
        assert_eq!(start.elapsed(), KEEPALIVE, "idle on HTTP/2 is keepalive_timeout, pings or not");
        pinging.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_stalls_past_send_timeout_fails() {
        let (mut io, mut client, _state, metrics) = io(false);
        let start = Instant::now();
        // The duplex holds 64 bytes: the second write stalls until read.
        io.write_all(&[0u8; 64]).await.expect("fits");
        let reader = tokio::spawn(async move {
            tokio::time::sleep(SEND / 2).await;
            let mut buf = [0u8; 64];
            let _ = client.read(&mut buf).await;
            client
        });
        // Progress at SEND / 2 restarts the clock.
        io.write_all(&[0u8; 128]).await.expect_err("stalls after the reader stops");
        assert_eq!(start.elapsed(), SEND / 2 + SEND);
        assert!(metrics.encode().contains("limit=\"server.send_timeout\"} 1"));
        drop(reader);
    }

    #[test]
    fn newer_minor_versions_are_rewritten_on_the_first_line_only() {
        let mut data = *b"GET / HTTP/1.2\r\nX: HTTP/1.2\r\n";
        assert_eq!(rewrite_newer_minor(&mut data), (true, true));
        assert_eq!(&data, b"GET / HTTP/1.1\r\nX: HTTP/1.2\r\n");
        let mut data = *b"\r\nGET / HTTP/1.9\n";
        assert_eq!(rewrite_newer_minor(&mut data), (true, true));
        assert_eq!(&data, b"\r\nGET / HTTP/1.1\n");
        for line in [&b"GET / HTTP/1.1\r\n"[..], b"GET / HTTP/2.0\r\n", b"GET / HTTP/1.\r\n", b"HTTP/1.2\r\n"] {
            let mut data = line.to_vec();
            assert_eq!(rewrite_newer_minor(&mut data), (true, false), "{}", String::from_utf8_lossy(line));
            assert_eq!(data, line);
        }
        assert_eq!(rewrite_newer_minor(&mut b"GET / HTTP/1.2".to_vec()), (false, false), "the line has not ended");
    }
}
