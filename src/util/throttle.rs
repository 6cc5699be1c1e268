//! At most one log line a second for events a client or a failing backend
//! can repeat on every request, with a count of the lines left out, so a
//! flood of failures can't flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often a throttled line may be written.
const EVERY: Duration = Duration::from_secs(1);

/// One kind of log line's throttle; meant for a `static`.
pub(crate) struct Throttle {
    /// When the line was last written, in ms since the process's first
    /// throttled line (0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub(crate) const fn new() -> Throttle {
        Throttle { last_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(lines left out since the last one)` if the line may be written
    /// now; `None` (and counted) if it was written less than a second ago.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(since_start())
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let now_ms = now_ms.max(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= EVERY.as_millis() as u64;
        if due && self.last_ms.compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_rest_counted() {
        let t = Throttle::new();
        assert_eq!(t.allow_at(0), Some(0), "the first line is written");
        assert_eq!(t.allow_at(10), None);
        assert_eq!(t.allow_at(999), None);
        assert_eq!(t.allow_at(1001), Some(2), "then one a second, with the count left out");
        assert_eq!(t.allow_at(1500), None);
        assert_eq!(t.allow_at(5000), Some(1));
        assert_eq!(t.allow_at(5001), None);
    }
}
