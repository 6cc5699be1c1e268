//! One open tunnel's life: copy until either side closes, or end it with
//! a clean close handshake when the proxy must (shutdown, a move to the
//! device's new owner, a draining backend's deadline), and give up on a
//! close handshake that does not finish.
//!
//! The session is generic over its two streams, so its state machine runs
//! on in-memory streams in the unit tests.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use super::registry::TunnelControl;
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
}

impl ClosedBy {
    fn describe(self) -> &'static str {
        match self {
            ClosedBy::Shutdown => "proxy shutdown",
            ClosedBy::Migration => "moved to its device's new owner",
            ClosedBy::Drain => "its backend is draining and drain_timeout has passed",
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
}

/// Runs a tunnel to its end.
pub async fn run<C, B, D>(mut splice: Splice<C, B>, signals: Signals<D>) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
    D: Fn() -> Option<Instant>,
{
    let Signals { shutdown: mut close, control, routing_changed: mut swaps, drain_deadline } = signals;
    let mut closed_by: Option<ClosedBy> = None;
    let mut give_up: Option<Instant> = None;
    let mut force_at: Option<Instant> = None;
    let copied = loop {
        let drain = if closed_by.is_none() { drain_deadline() } else { None };
        let mut begin = None;
        tokio::select! {
            copied = &mut splice => break copied.map_err(|e| format!("closed by error: {e}")),
            _ = raised(&mut close), if closed_by.is_none() => begin = Some(ClosedBy::Shutdown),
            _ = migration_requested(control.as_deref()), if closed_by.is_none() => begin = Some(ClosedBy::Migration),
            _ = sleep_until_some(drain), if closed_by.is_none() => begin = Some(ClosedBy::Drain),
            changed = swaps.changed() => {
                if changed.is_err() {
                    // The router is gone: only the copy or shutdown can end us now.
                    swaps = watch::channel(0).1;
                }
            }
            _ = sleep_until_some(force_at) => {
                force_at = None;
                splice.force_close();
            }
            _ = sleep_until_some(give_up) => {
                break Err("dropped: the close handshake did not finish in time".to_string());
            }
        }
        if let Some(by) = begin {
            closed_by = Some(by);
            let (code, reason) = match by {
                ClosedBy::Shutdown => (wsframe::CLOSE_GOING_AWAY, "proxy shutting down"),
                ClosedBy::Migration => (wsframe::CLOSE_SERVICE_RESTART, "moved to another backend: reconnect"),
                ClosedBy::Drain => (wsframe::CLOSE_SERVICE_RESTART, "backend draining: reconnect"),
            };
            splice.begin_close(code, reason, mask());
            let now = Instant::now();
            force_at = Some(now + CLOSE_REPLY_WAIT);
            give_up = Some(now + CLOSE_HANDSHAKE_LIMIT);
        }
    };
    Outcome { copied, closed_by }
}

/// Resolves when the rebalancer asks this tunnel to move (never, for a
/// tunnel without a device ID).
async fn migration_requested(control: Option<&TunnelControl>) {
    match control {
        Some(control) => control.migration_requested().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
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
