//! One open tunnel's life: copy until either side closes, or end it with
//! a clean close handshake when the proxy must (shutdown, a move to the
//! device's new owner, a draining backend's deadline, no bytes either way
//! for `server.tunnel_idle_timeout`), and give up on a close handshake
//! that does not finish.
//!
//! One timer serves every deadline (the idle check, a draining backend's,
//! the close handshake's), set to the earliest. The idle deadline is not
//! moved per byte: the splice stamps when bytes last moved, and when the
//! timer fires the session either closes the tunnel or waits on until that
//! stamp plus the timeout.
//!
//! The session is generic over its two streams, so its state machine runs
//! on in-memory streams in the unit tests.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::registry::{Ask, TunnelControl};
use super::splice::Splice;
use super::wsframe;
use crate::util::rng::SplitMix64;
use crate::util::shutdown::raised;

/// When the proxy ends a tunnel: how long the backend has to answer its
/// close frame (and the device to finish a frame it is sending) before the
/// device's close frame goes anyway.
pub const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// After that, how long the close handshake may take before both
/// connections are simply dropped.
pub const CLOSE_HANDSHAKE_LIMIT: Duration = Duration::from_secs(3);

/// Why the proxy ended a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The proxy is shutting down (1001).
    Shutdown,
    /// The rebalancer moved the device to its new owner (1012).
    Migration,
    /// The backend is draining and `drain_timeout` has passed (1012).
    Drain,
    /// No bytes either way for `server.tunnel_idle_timeout` (1001).
    IdleTimeout,
}

impl ClosedBy {
    fn describe(self) -> &'static str {
        match self {
            ClosedBy::Shutdown => "proxy shutdown",
            ClosedBy::Migration => "moved to its device's new owner",
            ClosedBy::Drain => "its backend is draining and drain_timeout has passed",
            ClosedBy::IdleTimeout => "idle for server.tunnel_idle_timeout",
        }
    }
}

/// How a tunnel ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `Ok((bytes up, bytes down))` when both sides finished; `Err` with
    /// the reason when the copy failed or the close handshake timed out.
    pub copied: Result<(u64, u64), String>,
    /// Set when the proxy started the ending.
    pub closed_by: Option<ClosedBy>,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.copied {
            Ok((up, down)) => write!(f, "closed ({up} bytes up, {down} bytes down)")?,
            Err(e) => write!(f, "{e}")?,
        }
        if let Some(by) = self.closed_by {
            write!(f, "; closed by the proxy: {}", by.describe())?;
        }
        Ok(())
    }
}

/// What can end a session besides its own streams.
pub struct Signals<D> {
    /// Raised when open tunnels must close (the end of shutdown).
    pub shutdown: watch::Receiver<bool>,
    /// The tunnel's registry entry, through which the rebalancer asks it to
    /// move (`None`: a tunnel without a device ID, never moved).
    pub control: Option<Arc<TunnelControl>>,
    /// Fires on every routing change, when `drain_deadline` may change.
    pub routing_changed: watch::Receiver<u64>,
    /// When this tunnel must close because its backend is draining.
    pub drain_deadline: D,
    /// `server.tunnel_idle_timeout` when the tunnel opened: with no bytes
    /// either way for this long, it is closed (`None`: never for idleness).
    pub idle_timeout: Option<Duration>,
}

/// Runs a tunnel to its end.
pub async fn run<C, B, D>(splice: Splice<C, B>, signals: Signals<D>) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    D: Fn() -> Option<Instant>,
{
    run_then(splice, signals, |outcome| outcome).await
}

/// Runs a tunnel to its end, then hands its outcome to `then`.
///
/// A tunnel's task is this future and nothing around it (an idle device's
/// cost is mostly its size), so what happens after the tunnel goes in
/// `then` rather than in an enclosing `async` block, which would keep its
/// own copy of everything moved in here. For the same reason the waits are
/// few: one timer for every deadline and one wait for what the tunnel is
/// asked.
// Deliberately not an `async fn`: see the comment on the block.
#[allow(clippy::manual_async_fn)]
pub fn run_then<C, B, D, R>(
    mut splice: Splice<C, B>,
    mut signals: Signals<D>,
    then: impl FnOnce(Outcome) -> R,
) -> impl std::future::Future<Output = R>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    D: Fn() -> Option<Instant>,
{
    // An `async` block rather than an `async fn`: the block uses what it
    // captured in place, where an `async fn` keeps its arguments twice
    // (rust-lang/rust#62958), and `signals` is read through its fields for
    // the same reason.
    async move {
        let idle_timeout = signals.idle_timeout;
        let mut closed_by: Option<ClosedBy> = None;
        // When to look at the splice's last activity next.
        let mut idle_check = idle_timeout.map(|timeout| splice.last_active() + timeout);
        let mut give_up: Option<Instant> = None;
        let mut force_at: Option<Instant> = None;
        let mut router_gone = false;
        // The earliest deadline of those that apply; armed only with one.
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let copied = loop {
            let (drain, idle) = match closed_by {
                None => ((signals.drain_deadline)(), idle_check),
                Some(_) => (None, None),
            };
            let next = [drain, idle, force_at, give_up].into_iter().flatten().min();
            if let Some(at) = next {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            let mut begin = None;
            tokio::select! {
                copied = &mut splice => break copied.map_err(|e| format!("closed by error: {e}")),
                _ = raised(&mut signals.shutdown), if closed_by.is_none() => begin = Some(ClosedBy::Shutdown),
                asked = requested(signals.control.as_deref()), if closed_by.is_none() => {
                    begin = Some(match asked {
                        Ask::Migrate => ClosedBy::Migration,
                        Ask::Shutdown => ClosedBy::Shutdown,
                    });
                }
                changed = signals.routing_changed.changed(), if !router_gone => {
                    // The router is gone: only the copy or shutdown can end us
                    // now. (A closed channel would answer at once, every time.)
                    router_gone = changed.is_err();
                }
                () = &mut timer, if next.is_some() => {
                    let now = Instant::now();
                    if give_up.is_some_and(|at| at <= now) {
                        break Err("dropped: the close handshake did not finish in time".to_string());
                    }
                    if force_at.is_some_and(|at| at <= now) {
                        force_at = None;
                        splice.force_close();
                    }
                    if drain.is_some_and(|at| at <= now) {
                        begin = Some(ClosedBy::Drain);
                    } else if idle.is_some_and(|at| at <= now) {
                        // Bytes moved since the timer was set: wait on to the
                        // new deadline. Otherwise the tunnel has been idle
                        // long enough.
                        idle_check = idle_timeout.map(|timeout| splice.last_active() + timeout);
                        if idle_check.is_some_and(|at| at <= now) {
                            debug!(timeout = ?idle_timeout, "tunnel idle: closing it");
                            begin = Some(ClosedBy::IdleTimeout);
                        }
                    }
                }
            }
            if let Some(by) = begin {
                closed_by = Some(by);
                let (code, reason) = match by {
                    ClosedBy::Shutdown => (wsframe::CLOSE_GOING_AWAY, "proxy shutting down"),
                    ClosedBy::IdleTimeout => (wsframe::CLOSE_GOING_AWAY, "idle timeout"),
                    ClosedBy::Migration => (wsframe::CLOSE_SERVICE_RESTART, "moved to another backend: reconnect"),
                    ClosedBy::Drain => (wsframe::CLOSE_SERVICE_RESTART, "backend draining: reconnect"),
                };
                splice.begin_close(code, reason, mask());
                let now = Instant::now();
                force_at = Some(now + CLOSE_REPLY_WAIT);
                give_up = Some(now + CLOSE_HANDSHAKE_LIMIT);
            }
        };
        then(Outcome { copied, closed_by })
    }
}

/// Resolves when the tunnel is asked to move or to close for a shutdown
/// (never, for a tunnel without a device ID: the shutdown flag ends those).
async fn requested(control: Option<&TunnelControl>) -> Ask {
    match control {
        Some(control) => control.requested().await,
        None => std::future::pending().await,
    }
}

/// A fresh mask for a close frame to the backend (RFC 6455 wants masks
/// unpredictable; this is not about secrecy, only about not repeating).
fn mask() -> [u8; 4] {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let bytes = SplitMix64::new(seed).next_u64().to_le_bytes();
    [bytes[0], bytes[1], bytes[2], bytes[3]]
}

#[cfg(test)]
mod tests {
    //! The session's lifecycle on in-memory streams, in paused virtual
    //! time: the session runs as a task, the test plays device and backend.

    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::task::{Context, Wake, Waker};

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{duplex, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::Config;
    use crate::routing::RoutingTable;
    use crate::tunnel::registry::{Registration, TunnelRegistry};
    use crate::tunnel::splice::tests::{
        assert_quiet, client_frame, read_frame, read_n, read_rest, read_until_close, server_frame, within, OP_TEXT,
    };
    use crate::tunnel::wsframe::{CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART, OPCODE_CLOSE};

    /// A running session and what the test holds of it.
    struct Harness {
        /// The device's end of its connection.
        device: DuplexStream,
        /// The backend's end of its connection.
        server: DuplexStream,
        shutdown: watch::Sender<bool>,
        routing: watch::Sender<u64>,
        session: JoinHandle<Outcome>,
    }

    /// The session's inputs, before it starts.
    struct Parts<D> {
        device: DuplexStream,
        server: DuplexStream,
        splice: Splice<DuplexStream, DuplexStream>,
        shutdown: watch::Sender<bool>,
        routing: watch::Sender<u64>,
        signals: Signals<D>,
    }

    fn parts<D>(control: Option<Arc<TunnelControl>>, registration: Option<Registration>, drain_deadline: D) -> Parts<D>
    where
        D: Fn() -> Option<Instant>,
    {
        let (client, device) = duplex(64 * 1024);
        let (backend, server) = duplex(64 * 1024);
        let splice = Splice::new(client, backend, b"", b"", Counter::default(), Counter::default(), registration);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (routing, routing_rx) = watch::channel(0);
        let signals =
            Signals { shutdown: shutdown_rx, control, routing_changed: routing_rx, drain_deadline, idle_timeout: None };
        Parts { device, server, splice, shutdown, routing, signals }
    }

    fn start<D>(control: Option<Arc<TunnelControl>>, registration: Option<Registration>, drain_deadline: D) -> Harness
    where
        D: Fn() -> Option<Instant> + Send + 'static,
    {
        let Parts { device, server, splice, shutdown, routing, signals } = parts(control, registration, drain_deadline);
        let session = tokio::spawn(run(splice, signals));
        Harness { device, server, shutdown, routing, session }
    }

    fn close_reply() -> Vec<u8> {
        server_frame(OPCODE_CLOSE, &CLOSE_GOING_AWAY.to_be_bytes())
    }

    /// A message each way, so the outcome has bytes to count; returns
    /// `(bytes up, bytes down)`.
    async fn exchange(h: &mut Harness) -> (u64, u64) {
        let ping = client_frame(OP_TEXT, b"from the device");
        let pong = server_frame(OP_TEXT, b"from the backend");
        h.device.write_all(&ping).await.expect("device writes");
        h.server.write_all(&pong).await.expect("backend writes");
        let at_backend = within("device's message", read_n(&mut h.server, ping.len())).await;
        assert_eq!(at_backend.expect("backend reads"), ping);
        let at_device = within("backend's message", read_n(&mut h.device, pong.len())).await;
        assert_eq!(at_device.expect("device reads"), pong);
        (ping.len() as u64, pong.len() as u64)
    }

    /// The backend's side of a clean proxy-started close: gets the proxy's
    /// masked 1001, replies, and closes its connection. Returns the bytes
    /// it sent.
    async fn backend_answers_the_close(server: &mut DuplexStream) -> u64 {
        let close = within("close to the backend", read_frame(server)).await.expect("backend reads a frame");
        assert_eq!(close.opcode, OPCODE_CLOSE);
        assert!(close.mask.is_some(), "a client's frame must be masked");
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        let reply = close_reply();
        server.write_all(&reply).await.expect("backend replies");
        server.shutdown().await.expect("backend closes");
        reply.len() as u64
    }

    /// The device's side: its close frame (nothing before it), then EOF;
    /// then it closes its connection. Returns the close frame's code and
    /// reason.
    async fn device_gets_its_close(device: &mut DuplexStream) -> (Option<u16>, String) {
        let (before, close) =
            within("close to the device", read_until_close(device)).await.expect("device reads a close frame");
        assert!(before.is_empty(), "frames before the close: {before:?}");
        assert_eq!(close.mask, None);
        let rest = within("the device's stream end", read_rest(device)).await.expect("device reads to its end");
        assert!(rest.is_empty(), "after the close frame: {rest:?}");
        device.shutdown().await.expect("device closes");
        (close.close_code(), close.close_reason())
    }

    async fn outcome(session: JoinHandle<Outcome>) -> Outcome {
        within("the session's end", session).await.expect("the session task completes")
    }

    /// A backend, as the registry holds it.
    fn backend() -> Arc<crate::routing::Backend> {
        let config = Config::parse(
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[routing]\nkey = [\"header:x-device-id\"]\n\n\
             [[backends]]\nid = \"app-1\"\naddress = \"127.0.0.1:9001\"\n",
        )
        .expect("test config");
        let table = RoutingTable::offline(&config);
        Arc::clone(table.backends().first().expect("one backend"))
    }

    #[tokio::test(start_paused = true)]
    async fn ends_when_the_device_closes() {
        let mut h = start(None, None, || None);
        let (mut up, mut down) = exchange(&mut h).await;

        // The device closes; the proxy stays out of the way.
        let close = client_frame(OPCODE_CLOSE, &1000u16.to_be_bytes());
        h.device.write_all(&close).await.expect("device writes");
        h.device.shutdown().await.expect("device closes");
        up += close.len() as u64;
        let at_backend = within("device's close", read_until_close(&mut h.server)).await.expect("backend reads");
        assert_eq!(at_backend.1.close_code(), Some(1000));
        assert_eq!(read_rest(&mut h.server).await.expect("backend reads to its end"), b"");
        let reply = server_frame(OPCODE_CLOSE, &1000u16.to_be_bytes());
        h.server.write_all(&reply).await.expect("backend replies");
        h.server.shutdown().await.expect("backend closes");
        down += reply.len() as u64;
        let at_device = within("backend's close", read_until_close(&mut h.device)).await.expect("device reads");
        assert_eq!(at_device.1.close_code(), Some(1000), "the backend's own reply, not the proxy's");

        let out = outcome(h.session).await;
        assert_eq!(out, Outcome { copied: Ok((up, down)), closed_by: None });
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_with_1001() {
        let mut h = start(None, None, || None);
        let (up, mut down) = exchange(&mut h).await;
        let begun = Instant::now();
        h.shutdown.send(true).expect("the session listens");
        down += backend_answers_the_close(&mut h.server).await;
        let (code, reason) = device_gets_its_close(&mut h.device).await;
        assert_eq!((code, reason.as_str()), (Some(CLOSE_GOING_AWAY), "proxy shutting down"));

        let out = outcome(h.session).await;
        assert_eq!(out, Outcome { copied: Ok((up, down)), closed_by: Some(ClosedBy::Shutdown) });
        // A handshake both sides answered is not cut short by the timers.
        assert!(begun.elapsed() < CLOSE_REPLY_WAIT, "took {:?}", begun.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn migration_closes_with_1012_and_leaves_the_registry() {
        let registry = Arc::new(TunnelRegistry::new());
        let registration = registry.register(b"dev", &backend());
        let control = Arc::clone(registration.control());
        let mut h = start(Some(Arc::clone(&control)), Some(registration), || None);
        let (up, mut down) = exchange(&mut h).await;
        assert_eq!(registry.tunnels_of(b"dev").len(), 1);

        control.migrate();
        let close = within("close to the backend", read_frame(&mut h.server)).await.expect("backend reads");
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        // The device's HTTP no longer follows a tunnel that is ending.
        assert_eq!(registry.open(), 0);
        assert!(registry.tunnels_of(b"dev").is_empty());
        let reply = close_reply();
        h.server.write_all(&reply).await.expect("backend replies");
        h.server.shutdown().await.expect("backend closes");
        down += reply.len() as u64;
        let (code, reason) = device_gets_its_close(&mut h.device).await;
        assert_eq!((code, reason.as_str()), (Some(CLOSE_SERVICE_RESTART), "moved to another backend: reconnect"));

        let out = outcome(h.session).await;
        assert_eq!(out, Outcome { copied: Ok((up, down)), closed_by: Some(ClosedBy::Migration) });
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_backend_closes_at_its_deadline() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut h = start(None, None, move || Some(deadline));
        let (up, mut down) = exchange(&mut h).await;

        tokio::time::sleep_until(deadline - Duration::from_millis(1)).await;
        assert_quiet(&mut h.server, "backend before the drain deadline").await;
        assert_quiet(&mut h.device, "device before the drain deadline").await;
        assert!(!h.session.is_finished());

        let close = within("close to the backend", read_frame(&mut h.server)).await.expect("backend reads");
        assert!(Instant::now() >= deadline, "closed {:?} early", deadline - Instant::now());
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        let reply = close_reply();
        h.server.write_all(&reply).await.expect("backend replies");
        h.server.shutdown().await.expect("backend closes");
        down += reply.len() as u64;
        let (code, reason) = device_gets_its_close(&mut h.device).await;
        assert_eq!((code, reason.as_str()), (Some(CLOSE_SERVICE_RESTART), "backend draining: reconnect"));

        let out = outcome(h.session).await;
        assert_eq!(out, Outcome { copied: Ok((up, down)), closed_by: Some(ClosedBy::Drain) });
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_starts_later_is_noticed_on_a_routing_change() {
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::default();
        let read = Arc::clone(&deadline);
        let mut h = start(None, None, move || *read.lock().expect("deadline lock"));

        // Not draining: nothing happens however long the tunnel is idle.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_quiet(&mut h.server, "backend of an idle tunnel").await;
        assert!(!h.session.is_finished());

        let at = Instant::now() + Duration::from_secs(5);
        *deadline.lock().expect("deadline lock") = Some(at);
        h.routing.send_modify(|n| *n += 1);
        tokio::time::sleep_until(at - Duration::from_millis(1)).await;
        assert_quiet(&mut h.server, "backend before the drain deadline").await;

        let close = within("close to the backend", read_frame(&mut h.server)).await.expect("backend reads");
        assert!(Instant::now() >= at, "closed {:?} early", at - Instant::now());
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        h.server.write_all(&close_reply()).await.expect("backend replies");
        h.server.shutdown().await.expect("backend closes");
        let (code, _) = device_gets_its_close(&mut h.device).await;
        assert_eq!(code, Some(CLOSE_SERVICE_RESTART));
        assert_eq!(outcome(h.session).await.closed_by, Some(ClosedBy::Drain));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_backend_is_forced_after_the_reply_wait() {
        let mut h = start(None, None, || None);
        let (up, _) = exchange(&mut h).await;
        let begun = Instant::now();
        h.shutdown.send(true).expect("the session listens");
        let close = within("close to the backend", read_frame(&mut h.server)).await.expect("backend reads");
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        // The backend never replies nor closes.

        tokio::time::sleep_until(begun + CLOSE_REPLY_WAIT - Duration::from_millis(1)).await;
        assert_quiet(&mut h.device, "device before the reply wait is over").await;
        let (code, _) = device_gets_its_close(&mut h.device).await;
        assert_eq!(code, Some(CLOSE_GOING_AWAY));
        assert!(begun.elapsed() >= CLOSE_REPLY_WAIT, "forced after {:?}", begun.elapsed());

        // The device answered (it closed): the tunnel ends without waiting
        // for the backend, before the handshake limit.
        let out = outcome(h.session).await;
        assert!(begun.elapsed() < CLOSE_HANDSHAKE_LIMIT, "ended after {:?}", begun.elapsed());
        assert_eq!(out.closed_by, Some(ClosedBy::Shutdown));
        let (sent_up, sent_down) = out.copied.expect("a forced end is still a clean copy");
        assert_eq!(sent_up, up);
        assert!(sent_down > 0);
        // The backend's connection was shut, not left waiting.
        assert_eq!(read_rest(&mut h.server).await.expect("backend reads to its end"), b"");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_nobody_finishes_is_dropped_at_the_limit() {
        let mut h = start(None, None, || None);
        exchange(&mut h).await;
        let begun = Instant::now();
        h.shutdown.send(true).expect("the session listens");
        let close = within("close to the backend", read_frame(&mut h.server)).await.expect("backend reads");
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));

        // The device still gets its close frame once the reply wait is over,
        // but keeps its connection open, as does the backend.
        let (_, close) = within("close to the device", read_until_close(&mut h.device)).await.expect("device reads");
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        assert!(begun.elapsed() >= CLOSE_REPLY_WAIT);

        let out = outcome(h.session).await;
        let waited = begun.elapsed();
        assert!(
            (CLOSE_HANDSHAKE_LIMIT..CLOSE_HANDSHAKE_LIMIT + Duration::from_millis(10)).contains(&waited),
            "dropped after {waited:?}"
        );
        assert_eq!(
            out,
            Outcome {
                copied: Err("dropped: the close handshake did not finish in time".to_string()),
                closed_by: Some(ClosedBy::Shutdown),
            }
        );
        // Both connections are gone.
        assert!(h.device.write_all(b"anyone?").await.is_err());
        assert!(h.server.write_all(b"anyone?").await.is_err());
    }

    /// A session with `server.tunnel_idle_timeout = idle`.
    fn start_idle(idle: Option<Duration>) -> Harness {
        let Parts { device, server, splice, shutdown, routing, mut signals } = parts(None, None, || None);
        signals.idle_timeout = idle;
        let session = tokio::spawn(run(splice, signals));
        Harness { device, server, shutdown, routing, session }
    }

    /// Waits until just before `at` and checks that neither side has been
    /// sent anything and the session still runs.
    async fn still_open_just_before(h: &mut Harness, at: Instant) {
        tokio::time::sleep_until(at - Duration::from_millis(1)).await;
        assert_quiet(&mut h.server, "backend before the idle timeout").await;
        assert_quiet(&mut h.device, "device before the idle timeout").await;
        assert!(!h.session.is_finished(), "ended before the idle timeout");
    }

    /// The proxy's idle close as both sides see it, at `at`; the
    /// backend answers, and the session ends clean.
    async fn closed_for_idleness_at(mut h: Harness, at: Instant) -> Outcome {
        let close = within("close to the backend", read_frame(&mut h.server)).await.expect("backend reads");
        // The timer wheel counts whole milliseconds.
        let now = Instant::now();
        assert!(
            (at..at + Duration::from_millis(2)).contains(&now),
            "closed {:?} after {at:?}",
            now.checked_duration_since(at)
        );
        assert_eq!(close.close_code(), Some(CLOSE_GOING_AWAY));
        h.server.write_all(&close_reply()).await.expect("backend replies");
        h.server.shutdown().await.expect("backend closes");
        let (code, reason) = device_gets_its_close(&mut h.device).await;
        assert_eq!((code, reason.as_str()), (Some(CLOSE_GOING_AWAY), "idle timeout"));
        outcome(h.session).await
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_is_closed_at_the_idle_timeout() {
        let idle = Duration::from_secs(30);
        let opened = Instant::now();
        let mut h = start_idle(Some(idle));
        still_open_just_before(&mut h, opened + idle).await;
        let out = closed_for_idleness_at(h, opened + idle).await;
        assert_eq!(out.closed_by, Some(ClosedBy::IdleTimeout));
        assert!(out.copied.is_ok(), "{out:?}");
        assert!(out.to_string().contains("idle for server.tunnel_idle_timeout"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_either_way_postpone_the_idle_timeout() {
        let idle = Duration::from_secs(30);
        let mut h = start_idle(Some(idle));

        // The device speaks two thirds of the way in: the timeout counts
        // from then.
        tokio::time::sleep(idle * 2 / 3).await;
        let ping = client_frame(OP_TEXT, b"device");
        h.device.write_all(&ping).await.expect("device writes");
        let got = within("the device's message", read_n(&mut h.server, ping.len())).await;
        assert_eq!(got.expect("backend reads"), ping);
        let last = Instant::now();
        still_open_just_before(&mut h, last + idle * 2 / 3).await;

        // Then the backend alone, past when the first deadline was.
        let pong = server_frame(OP_TEXT, b"backend");
        h.server.write_all(&pong).await.expect("backend writes");
        let got = within("the backend's message", read_n(&mut h.device, pong.len())).await;
        assert_eq!(got.expect("device reads"), pong);
        let last = Instant::now();
        still_open_just_before(&mut h, last + idle).await;

        let out = closed_for_idleness_at(h, last + idle).await;
        assert_eq!(out.closed_by, Some(ClosedBy::IdleTimeout));
        let (up, down) = out.copied.expect("a clean end");
        assert_eq!(up, ping.len() as u64);
        assert!(down > pong.len() as u64, "the backend's close reply counts too");
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_timeout_an_idle_tunnel_stays_open() {
        let mut h = start_idle(None);
        tokio::time::sleep(Duration::from_secs(10 * 3600)).await;
        assert_quiet(&mut h.server, "backend of a tunnel idle for 10 h").await;
        assert_quiet(&mut h.device, "device of a tunnel idle for 10 h").await;
        assert!(!h.session.is_finished());
        exchange(&mut h).await;
    }

    #[test]
    fn an_idle_tunnels_future_stays_small() {
        // An idle device costs little more than this future (a task of its
        // own): 4.4 kB when the session was an `async fn` awaited inside
        // another, with a timer per deadline.
        let Parts { splice, signals, .. } = parts(None, None, || None);
        let session = run_then(splice, signals, drop);
        let size = std::mem::size_of_val(&session);
        eprintln!("session future: {size} bytes");
        assert!(size <= 1152, "the session future grew to {size} bytes");
    }

    /// Counts how often a waker is woken.
    #[derive(Default)]
    struct WakeCount(AtomicUsize);

    impl Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_gone_router_leaves_the_session_idle_but_alive() {
        let Parts { mut device, mut server, splice, shutdown: _shutdown, routing, signals } =
            parts(None, None, || None);
        drop(routing);
        let mut session = pin!(run(splice, signals));
        let wakes = Arc::new(WakeCount::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let first = session.as_mut().poll(&mut Context::from_waker(&waker));
        assert!(first.is_pending(), "{first:?}");
        // A task that spends its budget is woken once the scheduler gets
        // control back: give it that chance.
        tokio::task::yield_now().await;
        // An idle session waits; one that wakes itself at once is spinning.
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0, "an idle session woke itself");

        // And the copy can still end it.
        device.shutdown().await.expect("device closes");
        server.shutdown().await.expect("backend closes");
        let out = within("the session's end", session).await;
        assert_eq!(out, Outcome { copied: Ok((0, 0)), closed_by: None });
    }
}
