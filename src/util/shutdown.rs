//! The shutdown signal: a `watch` flag that is raised once and stays up.

use tokio::sync::watch;

/// Resolves once the flag is `true` (or its sender is gone).
pub(crate) async fn raised(flag: &mut watch::Receiver<bool>) {
    // `let _` drops the borrow guard at once, keeping the future `Send`.
    let _ = flag.wait_for(|raised| *raised).await;
}
