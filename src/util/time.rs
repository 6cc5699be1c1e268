//! Waiting on an optional deadline.

use tokio::time::Instant;

/// Sleeps until `deadline`, or forever without one (a disabled timer arm
/// of a `select!`).
pub(crate) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
