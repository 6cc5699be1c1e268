//! The shutdown signal: a `watch` flag that is raised once and stays up;
//! and [`Gated`], which keeps waiting on it cheap inside a busy task.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::sync::watch;

/// Resolves once the flag is `true` (or its sender is gone).
pub(crate) async fn raised(flag: &mut watch::Receiver<bool>) {
    // `let _` drops the borrow guard at once, keeping the future `Send`.
    let _ = flag.wait_for(|raised| *raised).await;
}

pin_project_lite::pin_project! {
    /// `inner`, polled only when its own wake-up came (and on the first
    /// poll). Beside a connection in one `select!`, a wait on the shutdown
    /// flag would be polled on every read and write of the connection, and
    /// each poll of a `watch` wait takes its lock: 762 instructions per
    /// keep-alive request (benches/load/profile.sh). Gated, it is one
    /// atomic swap.
    pub(crate) struct Gated<F> {
        #[pin]
        inner: F,
        gate: Arc<Gate>,
        // The gate's waker, which `inner` registers.
        gate_waker: Waker,
    }
}

/// Whether `inner` was woken, and the task to wake then.
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Gated<F> {
    pub(crate) fn new(inner: F) -> Gated<F> {
        // Woken to begin with: the first poll looks at `inner`.
        let gate = Arc::new(Gate { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        let gate_waker = Waker::from(Arc::clone(&gate));
        Gated { inner, gate, gate_waker }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read, so a wake in between is seen.
        this.gate.task.register(cx.waker());
        if !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.gate_waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// `inner` is polled once up front and then only after its own wake;
    /// the raised flag gets through.
    #[tokio::test]
    async fn a_gated_wait_is_polled_only_when_woken() {
        let (raise, mut flag) = watch::channel(false);
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&polls);
        let mut wait = Box::pin(raised(&mut flag));
        let gated = Gated::new(std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::SeqCst);
            wait.as_mut().poll(cx)
        }));
        tokio::pin!(gated);
        let mut busy = 0;
        // A busy neighbour wakes the task again and again.
        let done = std::future::poll_fn(|cx| {
            if gated.as_mut().poll(cx).is_ready() {
                return Poll::Ready(busy);
            }
            busy += 1;
            if busy == 50 {
                raise.send_replace(true);
            } else if busy < 50 {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        });
        let busy = tokio::time::timeout(std::time::Duration::from_secs(10), done).await.expect("the flag got through");
        assert_eq!(busy, 50);
        // Once up front, once after the flag's wake.
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
