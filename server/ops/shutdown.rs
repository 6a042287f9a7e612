//! Graceful shutdown: a termination signal cancels the server's one
//! [`CancellationToken`]; every part of the server watches it.
//!
//! - the accept loop stops accepting and asks connections to wind down;
//! - a WebSocket call stops reading, delivers the replies to every request it
//!   already read, then sends `status` 14 (UNAVAILABLE) and closes with 1001;
//! - a gRPC call does the same and ends with UNAVAILABLE;
//! - the server waits for all of it on its `TaskTracker`, at most
//!   `--drain-timeout`, then exits.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
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

/// The shutdown token, checked cheaply from a hot loop.
///
/// `CancellationToken::is_cancelled` and polling its future take the token's
/// mutex; on the server's own token every call would contend on it for every
/// message. So each call watches a child token (its own mutex), looks at it
/// only every [`DrainCheck::BUSY_INTERVAL`] messages while busy, and is woken
/// by its future when idle.
pub struct DrainCheck {
    token: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    countdown: u32,
}

impl DrainCheck {
    /// Messages between two looks at the token while a call is busy.
    const BUSY_INTERVAL: u32 = 64;

    pub fn new(token: &CancellationToken) -> Self {
        // A child of its own: polling the server's token itself would lock the
        // one mutex every idle call polls; a child's lock is this call's alone.
        let token = token.child_token();
        let cancelled = Box::pin(token.clone().cancelled_owned());
        DrainCheck {
            token,
            cancelled,
            countdown: Self::BUSY_INTERVAL,
        }
    }

    /// Whether draining has started, looking at the token only every
    /// [`Self::BUSY_INTERVAL`] calls.
    pub fn busy_check(&mut self) -> bool {
        self.countdown -= 1;
        if self.countdown > 0 {
            return false;
        }
        self.countdown = Self::BUSY_INTERVAL;
        self.token.is_cancelled()
    }

    /// Ready once draining has started; registers the waker otherwise.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.cancelled.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_call_notices_the_drain_within_one_interval_and_not_before() {
        let token = CancellationToken::new();
        let mut check = DrainCheck::new(&token);
        for _ in 0..3 * DrainCheck::BUSY_INTERVAL {
            assert!(!check.busy_check(), "no drain yet");
        }
        token.cancel();
        let looks = (1..=DrainCheck::BUSY_INTERVAL).find(|_| check.busy_check());
        assert!(
            looks.is_some(),
            "a busy call must notice within {} messages",
            DrainCheck::BUSY_INTERVAL
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_reports_whether_every_task_finished_in_time() {
        let tasks = TaskTracker::new();
        tasks.spawn(tokio::time::sleep(Duration::from_secs(1)));
        assert!(drain(&tasks, Duration::from_secs(2)).await, "finished in time");
        let late = TaskTracker::new();
        late.spawn(tokio::time::sleep(Duration::from_secs(5)));
        assert!(!drain(&late, Duration::from_secs(2)).await, "cut at the deadline");
    }
}
