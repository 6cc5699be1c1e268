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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{Limit, Metrics};

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
}

impl ConnState {
    /// A request starts; returns its guard and how many requests this
    /// connection has started, this one included.
    pub(crate) fn begin(self: &Arc<Self>) -> (InFlight, u64) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
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
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlight`] until it is done.
pub(crate) struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
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
