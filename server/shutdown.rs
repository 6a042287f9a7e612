//! Graceful shutdown: a termination signal cancels the server's one
//! [`CancellationToken`]; every part of the server watches it.
//!
//! - the accept loop stops accepting and asks connections to wind down;
//! - a WebSocket call stops reading, delivers the replies to every request it
//!   already read, then sends `status` 14 (UNAVAILABLE) and closes with 1001;
//! - a gRPC call does the same and ends with UNAVAILABLE;
//! - the server waits for all of it on its `TaskTracker`, at most
//!   `--drain-timeout`, then exits.

use std::time::Duration;

use tokio_util::task::TaskTracker;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn termination_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Waits until every tracked task has finished, or `deadline` has passed.
/// Returns whether everything finished in time.
pub async fn drain(tasks: &TaskTracker, deadline: Duration) -> bool {
    tasks.close();
    tokio::time::timeout(deadline, tasks.wait()).await.is_ok()
}
