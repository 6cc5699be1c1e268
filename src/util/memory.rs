//! Giving the memory of a burst of connections back to the OS.
//!
//! A burst of WebSocket handshakes (a reconnect storm after a failover, or
//! a benchmark) allocates tens of kB per handshake in flight: HTTP read and
//! write buffers on both sides, the backend connection's channel. They are
//! freed once the tunnel is open, but glibc's malloc keeps freed chunks in
//! its heap, interleaved with the tunnels' long-lived state, so the
//! process's resident memory stays at the burst's peak (about 3 MB after
//! 64 handshakes at once, 1.5 kB per socket at 2,000 idle sockets).
//! `malloc_trim` hands the whole free pages among them back.
//!
//! [`BurstTrimmer`] decides when: once a tick has seen [`QUIET`] or more
//! connections or tunnels end, at least [`MIN_BURST`] have ended since the
//! last trim, and then a tick sees fewer than `QUIET` (the burst is over).
//! Steady churn (every request on a new connection) keeps its heap in use
//! and is never trimmed, nor is a slow trickle: a trim then would only have
//! the pages faulted in again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::debug;

/// Connections and tunnels that ended, ever.
static ENDED: AtomicU64 = AtomicU64::new(0);

/// Ends counted since the last trim before one is worth it.
pub(crate) const MIN_BURST: u64 = 64;
/// Ends in one tick below which a burst is over.
pub(crate) const QUIET: u64 = 16;
/// How often the trimmer looks.
const TICK: Duration = Duration::from_secs(1);

/// Counts one ending (of a client connection's task, of a tunnel) when
/// dropped: memory was freed.
pub(crate) struct EndGuard;

impl Drop for EndGuard {
    fn drop(&mut self) {
        ENDED.fetch_add(1, Ordering::Relaxed);
    }
}

/// When to trim, from the count of endings seen at each tick.
#[derive(Debug, Default)]
pub(crate) struct BurstTrimmer {
    /// The count at the last tick.
    seen: u64,
    /// Endings since the last trim.
    pending: u64,
    /// Whether a tick since the last trim saw a burst (`QUIET` or more).
    burst: bool,
}

impl BurstTrimmer {
    /// A trimmer that counts from `ended` on.
    pub(crate) fn new(ended: u64) -> BurstTrimmer {
        BurstTrimmer { seen: ended, pending: 0, burst: false }
    }

    /// One tick with the count now at `ended`: whether to trim now.
    pub(crate) fn tick(&mut self, ended: u64) -> bool {
        let new = ended.wrapping_sub(self.seen);
        self.seen = ended;
        self.pending = self.pending.saturating_add(new);
        if new >= QUIET {
            self.burst = true;
            return false;
        }
        // Quiet now. A slow trickle that adds up is no burst: its freed
        // memory is reused by the next connections.
        if self.burst && self.pending >= MIN_BURST {
            self.pending = 0;
            self.burst = false;
            return true;
        }
        false
    }
}

/// Trims after each burst until `stop` is raised.
pub(crate) async fn trim_after_bursts(mut stop: watch::Receiver<bool>) {
    let mut trimmer = BurstTrimmer::new(ENDED.load(Ordering::Relaxed));
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::util::shutdown::raised(&mut stop) => return,
        }
        if trimmer.tick(ENDED.load(Ordering::Relaxed)) {
            // It walks the heap under malloc's lock: off the runtime's threads.
            let trimmed = tokio::task::spawn_blocking(|| {
                let started = Instant::now();
                (trim(), started.elapsed())
            });
            if let Ok((released, took)) = trimmed.await {
                debug!(released, ?took, "returned freed memory to the OS after a burst of connections");
            }
        }
    }
}

/// Returns the heap's free pages to the OS; whether any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim only walks and shrinks malloc's own heap, under
    // its own locks; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl's, macOS's) return memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_a_burst_is_over() {
        let mut t = BurstTrimmer::new(1000);
        // A burst of 500 endings over three ticks: no trim while it lasts.
        assert!(!t.tick(1200));
        assert!(!t.tick(1400));
        assert!(!t.tick(1500));
        // Quiet: trim once.
        assert!(t.tick(1505));
        assert!(!t.tick(1505));
        assert!(!t.tick(1510));
    }

    #[test]
    fn a_trickle_of_endings_is_not_a_burst() {
        let mut t = BurstTrimmer::new(0);
        // 10 a tick for 100 ticks: 1,000 endings, never trimmed.
        for ended in (10..=1000).step_by(10) {
            assert!(!t.tick(ended), "trimmed a trickle at {ended}");
        }
        // A burst after it: one trim once it is over.
        assert!(!t.tick(1100));
        assert!(t.tick(1101));
    }

    #[test]
    fn a_burst_too_small_is_not_trimmed() {
        let mut t = BurstTrimmer::new(0);
        assert!(!t.tick(QUIET), "a burst of QUIET endings");
        assert!(!t.tick(QUIET + 1), "pending below MIN_BURST");
    }

    #[test]
    fn steady_churn_is_never_trimmed() {
        let mut t = BurstTrimmer::new(0);
        let mut ended = 0;
        for _ in 0..100 {
            ended += 500;
            assert!(!t.tick(ended), "trimmed under steady churn at {ended}");
        }
        // When it stops, one trim.
        assert!(t.tick(ended));
    }
}
