//! Listeners and connections: accepting, the TLS handshake, and serving
//! HTTP/1.1 or HTTP/2 on each connection with a given service.
//!
//! Each accepted connection is served in a task of its own: HTTP/1.1, or
//! HTTP/2 when a TLS client chose `h2` by ALPN or, with `server.h2c`, a
//! cleartext client starts with the HTTP/2 preface. The TLS handshake
//! happens in that task too, bounded by `server.tls.handshake_timeout`, so
//! a slow or broken client never holds up the accept loop. On drain a
//! connection finishes its in-flight requests; on close it is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::metrics::{Limit, LiveGauge, Metrics};
use crate::routing::Router;
use crate::util::shutdown::{raised, Gated};
use crate::util::socket::{fd_limit, set_nodelay_and_keepalive};

mod conn;

use conn::{ClientIo, Clocks, ConnState, TrackedAnswer};

/// Pause after an accept error such as EMFILE, so the loop doesn't spin:
/// the refused connection stays queued and the listener stays readable.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning per listener this often about failing accepts.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(1);

/// A listener on `addr` (`field` names the setting, for the error), with
/// TCP_NODELAY and keepalive set once for every accepted socket.
pub(crate) async fn bind(addr: SocketAddr, field: &str) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} ({field}): {e}")))?;
    #[cfg(target_os = "linux")]
    set_nodelay_and_keepalive(&socket2::SockRef::from(&listener));
    Ok(listener)
}

/// `workers` listeners on `addr` sharing it by `SO_REUSEPORT` (the kernel
/// spreads connections between them), one per thread-per-core worker,
/// for [`TcpListener::from_std`] on the worker's runtime. A port 0 is
/// resolved by the first, which the others then join.
pub(crate) fn bind_shared(addr: SocketAddr, field: &str, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr} ({field}): {e}"));
    // SO_REUSEPORT would let this process join another's listeners on the
    // port (same user) and share its traffic: fail as a plain bind would.
    if addr.port() != 0 {
        port_is_free(addr).map_err(named)?;
    }
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let at = match listeners.first() {
            Some(first) => first.local_addr().map_err(named)?,
            None => addr,
        };
        listeners.push(reuseport_listener(at).map_err(named)?);
    }
    Ok(listeners)
}

/// Binds (and at once drops) a socket without `SO_REUSEPORT`, which fails
/// where anything listens already.
fn port_is_free(addr: SocketAddr) -> io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's bind: connections in TIME_WAIT don't hold the port.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// One `SO_REUSEPORT` listener, set up as tokio's `TcpListener::bind` sets
/// its own (`SO_REUSEADDR`, a backlog of 1024, non-blocking).
fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Before bind, on every listener of the group, the first included.
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    #[cfg(target_os = "linux")]
    set_nodelay_and_keepalive(&socket2::SockRef::from(&socket));
    Ok(socket.into())
}

/// TCP_NODELAY and TCP keepalive for an accepted connection. On Linux
/// accepted sockets inherit both from their listener, where [`bind`] sets
/// them once, which saves four system calls per connection.
fn client_socket_options(stream: &TcpStream) {
    #[cfg(not(target_os = "linux"))]
    set_nodelay_and_keepalive(&socket2::SockRef::from(stream));
    #[cfg(target_os = "linux")]
    let _ = stream;
}

/// What every connection task needs: live settings and the shutdown signals.
#[derive(Clone)]
pub(crate) struct Connections {
    /// Live settings (`server.h2c`, timeouts) are read from its config.
    pub router: Router,
    /// Accept errors and TLS handshake failures are counted here.
    pub metrics: Arc<Metrics>,
    /// Raised: stop accepting, finish in-flight requests.
    pub drain: watch::Receiver<bool>,
    /// Raised: drop what is still open.
    pub close: watch::Receiver<bool>,
    /// `server.max_connections` over the proxy's listeners (not the
    /// admin's); `None`: no limit.
    pub slots: Option<Arc<Semaphore>>,
    /// `requests_in_flight`: set by `accept_loop` on the proxy's listeners
    /// (`None` on the admin's, whose requests are not counted).
    pub in_flight: Option<LiveGauge>,
    /// The thread-per-core worker accepting (0 without them), for
    /// `worker_connections_total`.
    pub worker: usize,
}

impl Connections {
    /// Accepts until drained; `make_service` builds a connection's service
    /// from the peer address.
    pub(crate) async fn accept_loop<M, S, F, B>(mut self, listener: TcpListener, transport: Transport, make_service: M)
    where
        M: Fn(SocketAddr) -> S,
        S: Fn(Request<Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut errors = AcceptErrors::default();
        let counted = match transport {
            Transport::Http1 => None,
            Transport::Plain | Transport::Tls(_) => Some(self.metrics.worker_connections(self.worker)),
        };
        self.in_flight = match transport {
            Transport::Http1 => None,
            Transport::Plain | Transport::Tls(_) => Some(self.metrics.requests_in_flight()),
        };
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = raised(&mut self.drain) => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Some(counted) = &counted {
                        counted.inc();
                    }
                    let slot = match (&self.slots, &transport) {
                        (Some(slots), Transport::Plain | Transport::Tls(_)) => {
                            match Arc::clone(slots).try_acquire_owned() {
                                Ok(slot) => Some(slot),
                                Err(_) => {
                                    self.refuse(stream, &transport);
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    let service = make_service(peer);
                    tokio::spawn(self.clone().serve(stream, peer, transport.clone(), service, slot));
                }
                Err(e) => {
                    let kind = AcceptErrorKind::of(&e);
                    self.metrics.accept_error(kind.label());
                    if kind == AcceptErrorKind::Connection {
                        // That one connection is gone; the next is fine.
                        debug!("accept: {e}");
                        continue;
                    }
                    errors.warn(&listener, kind, &e);
                    // Keep the listener; pause so the loop doesn't spin while
                    // the process is out of descriptors or memory.
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                        _ = raised(&mut self.drain) => break,
                    }
                }
            }
        }
    }

    /// Past `server.max_connections`: a cleartext client is told why (503)
    /// and closed; a TLS client is closed (the handshake would cost more
    /// than the connection is worth). The accept loop doesn't wait for it.
    fn refuse(&self, stream: TcpStream, transport: &Transport) {
        self.metrics.limit_hit(Limit::MaxConnections);
        debug!("refused a connection: server.max_connections are open");
        if matches!(transport, Transport::Plain) {
            let open = self.router.load().config().server.max_connections.unwrap_or(0);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let body = format!("too many connections: server.max_connections ({open}) are open; retry later\n");
                let answer = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
                     content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let mut stream = stream;
                let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, stream.write_all(answer.as_bytes())).await;
            });
        }
    }

    async fn serve<S, F, B>(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        transport: Transport,
        service: S,
        _slot: Option<OwnedSemaphorePermit>,
    ) where
        S: Fn(Request<Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        client_socket_options(&stream);
        // Its buffers are freed when this task ends (util::memory).
        let _ended = crate::util::memory::EndGuard;
        // Open until this task ends, however the connection ends.
        let _open = match transport {
            Transport::Http1 => None,
            Transport::Plain | Transport::Tls(_) => Some(self.metrics.client_connection()),
        };
        match transport {
            Transport::Http1 => self.serve_http1(stream, peer, service).await,
            Transport::Plain => {
                let (h2c, header_timeout) = {
                    let table = self.router.load();
                    (table.config().server.h2c, table.config().server.header_read_timeout)
                };
                if !h2c {
                    return self.serve_http1(stream, peer, service).await;
                }
                match tokio::time::timeout(header_timeout, sniff_h2_preface(stream)).await {
                    Ok(Ok((true, io))) => Box::pin(self.serve_h2(io, peer, service)).await,
                    Ok(Ok((false, io))) => self.serve_http1(io, peer, service).await,
                    Ok(Err(e)) => debug!(%peer, "connection ended before its first request: {e}"),
                    Err(_) => debug!(%peer, "no request within header_read_timeout"),
                }
            }
            // Boxed, like HTTP/2 above: the TLS state is large, and every
            // plain connection's task would otherwise carry (and copy) it.
            Transport::Tls(acceptor) => Box::pin(self.serve_tls(stream, peer, acceptor, service)).await,
        }
    }

    async fn serve_tls<S, F, B>(mut self, stream: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor, service: S)
    where
        S: Fn(Request<Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let timeout =
            self.router.load().config().server.tls.as_ref().map_or(TLS_HANDSHAKE_TIMEOUT, |t| t.handshake_timeout);
        let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
        let tls = tokio::select! {
            done = handshake => done,
            _ = raised(&mut self.close) => return,
        };
        let tls = match tls {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = crate::tls::handshake_failure_reason(&e);
                self.metrics.tls_handshake_failed(reason);
                return debug!(%peer, reason, "TLS handshake failed: {e}");
            }
            Err(_) => {
                self.metrics.tls_handshake_failed("timeout");
                return debug!(%peer, ?timeout, "TLS handshake timed out");
            }
        };
        if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
            self.serve_h2(tls, peer, service).await
        } else {
            self.serve_http1(tls, peer, service).await
        }
    }

    async fn serve_http1<I, S, F, B>(self, io: I, peer: SocketAddr, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Fn(Request<Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut builder, clocks, keepalive_requests) = {
            let table = self.router.load();
            let server = &table.config().server;
            let mut builder = http1::Builder::new();
            builder.keep_alive(server.keepalive_timeout.is_some()).max_buf_size(server.max_header_size.max(8192));
            builder.max_header_size(server.max_header_size);
            // hyper keeps 100 header slots on the stack; others cost a heap
            // allocation per request, so only a changed limit is set.
            if server.max_header_count != DEFAULT_MAX_HEADERS {
                builder.max_headers(server.max_header_count);
            }
            (builder, self.clocks(false), server.keepalive_requests)
        };
        let state = Arc::new(ConnState::new(self.in_flight.clone()));
        let io = ClientIo::new(io, Arc::clone(&state), clocks, Arc::clone(&self.metrics));
        let service = tracked(state, service, keepalive_requests);
        // The clocks are ClientIo's: hyper's own header timer can't tell
        // an idle keep-alive connection from slow headers.
        let connection = builder
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(io), service_fn(service))
            .with_upgrades();
        self.drive(connection, |c| c.graceful_shutdown(), peer).await;
    }

    /// The clocks of a connection accepted now.
    fn clocks(&self, h2: bool) -> Clocks {
        let table = self.router.load();
        let server = &table.config().server;
        Clocks {
            header_read: server.header_read_timeout,
            keepalive: server.keepalive_timeout,
            send: server.send_timeout,
            h2,
        }
    }

    /// HTTP/2: streams are served concurrently, each in a task of its own,
    /// and extended CONNECT (RFC 8441) is advertised for WebSockets.
    async fn serve_h2<I, S, F, B>(self, io: I, peer: SocketAddr, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Fn(Request<Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let streams = self.router.load().config().server.h2_max_concurrent_streams;
        let state = Arc::new(ConnState::new(self.in_flight.clone()));
        let io = ClientIo::new(io, Arc::clone(&state), self.clocks(true), Arc::clone(&self.metrics));
        // keepalive_requests is HTTP/1.1's: streams are cheap to start.
        let service = tracked(state, service, u64::MAX);
        let connection = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(streams)
            .serve_connection(TokioIo::new(io), service_fn(service));
        self.drive(connection, |c| c.graceful_shutdown(), peer).await;
    }

    /// Runs a connection to its end; on drain, asks it to finish gracefully
    /// (HTTP/1.1: after the current request; HTTP/2: GOAWAY, then the open
    /// streams), and on close, drops it.
    async fn drive<C, E>(mut self, connection: C, graceful_shutdown: impl FnOnce(Pin<&mut C>), peer: SocketAddr)
    where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = Gated::new(raised(&mut self.drain)) => {
                graceful_shutdown(connection.as_mut());
                tokio::select! {
                    result = connection.as_mut() => result,
                    _ = raised(&mut self.close) => return,
                }
            }
        };
        if let Err(e) = result {
            debug!(%peer, "connection ended: {e}");
        }
    }
}

/// hyper's default header count (kept on the stack).
const DEFAULT_MAX_HEADERS: usize = 100;

/// How long a refused connection's 503 may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// `service` with each request counted in flight on `state` until its
/// response body is done (see [`TrackedAnswer`]).
fn tracked<S, F, B>(
    state: Arc<ConnState>,
    service: S,
    keepalive_requests: u64,
) -> impl Fn(Request<Incoming>) -> TrackedAnswer<F>
where
    S: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + Send + Unpin + 'static,
{
    move |req| {
        let (in_flight, nth) = state.begin();
        TrackedAnswer::new(service(req), in_flight, nth, keepalive_requests)
    }
}

/// How a listener's connections are served.
#[derive(Clone)]
pub(crate) enum Transport {
    /// HTTP/1.1 only (the admin API).
    Http1,
    /// Proxied traffic in cleartext: HTTP/1.1, and HTTP/2 with prior
    /// knowledge when `server.h2c` is on (read per connection, so a reload
    /// turns it on or off for new connections).
    Plain,
    /// Proxied traffic over TLS; ALPN picks HTTP/2 or HTTP/1.1.
    Tls(TlsAcceptor),
}

/// Handshake limit if the TLS section vanished from the live config (a
/// reload can't remove it: it needs a restart); normally the config's.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `accept` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptErrorKind {
    /// EMFILE, ENFILE: the process's or the system's descriptor limit.
    FdLimit,
    /// ENOBUFS, ENOMEM: the kernel is short of memory.
    Memory,
    /// The connection was aborted or reset before we took it: skip it.
    Connection,
    Other,
}

impl AcceptErrorKind {
    fn of(e: &io::Error) -> AcceptErrorKind {
        #[cfg(unix)]
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => return AcceptErrorKind::FdLimit,
            Some(libc::ENOBUFS | libc::ENOMEM) => return AcceptErrorKind::Memory,
            // Linux passes a connection's pending network errors to accept(2).
            Some(
                libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::ECONNREFUSED
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ETIMEDOUT,
            ) => return AcceptErrorKind::Connection,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset => {
                AcceptErrorKind::Connection
            }
            io::ErrorKind::OutOfMemory => AcceptErrorKind::Memory,
            _ => AcceptErrorKind::Other,
        }
    }

    /// The `kind` label of `sticky_proxy_accept_errors_total`.
    fn label(self) -> &'static str {
        match self {
            AcceptErrorKind::FdLimit => "fd_limit",
            AcceptErrorKind::Memory => "no_memory",
            AcceptErrorKind::Connection => "connection",
            AcceptErrorKind::Other => "other",
        }
    }
}

/// One listener's failing accepts, warned about at most once a second.
#[derive(Default)]
struct AcceptErrors {
    last_warned: Option<Instant>,
    /// Failures since the last warning that were not logged.
    suppressed: u64,
}

impl AcceptErrors {
    fn warn(&mut self, listener: &TcpListener, kind: AcceptErrorKind, e: &io::Error) {
        let now = Instant::now();
        if self.last_warned.is_some_and(|at| now.duration_since(at) < ACCEPT_WARN_EVERY) {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.last_warned = Some(now);
        let listener = listener.local_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
        let hint = match kind {
            AcceptErrorKind::FdLimit => match fd_limit() {
                Some((soft, hard)) => format!(
                    "the open-file limit is {soft} (RLIMIT_NOFILE soft {soft}, hard {hard}); each proxied WebSocket \
                     takes 2 descriptors: raise LimitNOFILE / ulimit -n"
                ),
                None => "raise the open-file limit (LimitNOFILE / ulimit -n)".to_string(),
            },
            AcceptErrorKind::Memory => "the kernel is short of memory for sockets".to_string(),
            AcceptErrorKind::Connection | AcceptErrorKind::Other => String::new(),
        };
        warn!(
            %listener,
            kind = kind.label(),
            suppressed,
            "cannot accept connections: {e}; {hint}; retrying every {ACCEPT_ERROR_BACKOFF:?} \
             (suppressed: failures since the last warning, at most one a second)"
        );
    }
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes are known to be, or not to be, the HTTP/2
/// preface. An HTTP/1.1 request differs at its first byte, so this costs
/// one read; the bytes read are replayed to whichever server takes over.
async fn sniff_h2_preface(mut stream: TcpStream) -> io::Result<(bool, Prefixed)> {
    let mut head = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let is_h2 = loop {
        let n = stream.read(&mut head[filled..]).await?;
        filled += n;
        if n == 0 || head[..filled] != H2_PREFACE[..filled] {
            break false;
        }
        if filled == H2_PREFACE.len() {
            break true;
        }
    };
    Ok((is_h2, Prefixed { head, filled, read: 0, stream }))
}

/// A connection whose first bytes were already read: they are read again
/// first, then the stream continues.
struct Prefixed {
    head: [u8; H2_PREFACE.len()],
    filled: usize,
    read: usize,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.filled {
            let n = (this.filled - this.read).min(buf.remaining());
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind's series is created at 0 from that list.
    #[test]
    fn accept_error_kinds_are_the_metrics_list() {
        let kinds =
            [AcceptErrorKind::FdLimit, AcceptErrorKind::Memory, AcceptErrorKind::Connection, AcceptErrorKind::Other];
        assert_eq!(kinds.map(AcceptErrorKind::label), crate::metrics::ACCEPT_ERROR_KINDS);
    }

    /// Port 0: the workers' listeners share the port the first was given;
    /// a port something listens on already is refused, as without
    /// SO_REUSEPORT.
    #[test]
    fn shared_listeners_share_one_port_and_never_join_another_listener() {
        let listeners = bind_shared("127.0.0.1:0".parse().expect("addr"), "test", 3).expect("bind");
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
        assert_ne!(addrs[0].port(), 0);
        assert!(addrs.iter().all(|a| *a == addrs[0]), "{addrs:?}");

        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let e = bind_shared(taken.local_addr().expect("addr"), "server.listen", 2).expect_err("in use");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains("server.listen"), "{e}");
        // Nor another group of workers' listeners.
        let e = bind_shared(addrs[0], "server.listen", 2).expect_err("in use");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    }

    /// The saving in `client_socket_options` rests on this: an accepted
    /// socket has the listener's TCP_NODELAY and keepalive settings.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_keepalive() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"), "test").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_client, (accepted, _)) = (client.expect("connect"), accepted.expect("accept"));
        client_socket_options(&accepted);
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().expect("nodelay"), "TCP_NODELAY");
        assert!(socket.keepalive().expect("keepalive"), "SO_KEEPALIVE");
        #[cfg(target_os = "linux")]
        {
            assert_eq!(socket.tcp_keepalive_time().expect("idle"), Duration::from_secs(60));
            assert_eq!(socket.tcp_keepalive_interval().expect("interval"), Duration::from_secs(10));
        }
    }
}
