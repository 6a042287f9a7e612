//! Graceful shutdown: a termination signal cancels the server's one
//! [`CancellationToken`]; every part of the server watches it.
//!
//! - the accept loop stops accepting and asks connections to wind down;
//! - a WebSocket call stops reading, delivers the replies to every request it
//!   already read, then sends `status` 14 (UNAVAILABLE) and closes with 1001;
//! - a gRPC call does the same and ends with UNAVAILABLE;
//! - the server waits for all of it on its `TaskTracker`, at most
//!   `--drain-timeout`, then exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use slab::Slab;
use tokio_util::sync::CancellationToken;
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

/// The drain as calls watch it: a flag, and the wakers of the calls that
/// wait for it while idle. Cheap to clone; one per server.
///
/// Every call checks for the drain, busy or idle, so the check must take no
/// shared lock per message: `CancellationToken::is_cancelled` and polling its
/// future take the token's mutex (and tokio's `Notify` locks on every poll of
/// a waiting future). Here a busy call loads an atomic every
/// [`DrainCheck::BUSY_INTERVAL`] messages, and an idle one registers its
/// waker in a slot of its own (an `AtomicWaker`: lock-free after the first
/// poll). The one lock is taken twice per call (slot in, slot out) and once
/// at the drain. Each call costs a 48-byte slot; the child token per call
/// this replaces cost about 250 bytes on every open socket and stream.
#[derive(Clone)]
pub struct Drain(Arc<DrainState>);

struct DrainState {
    started: AtomicBool,
    idle: Mutex<Slab<Arc<AtomicWaker>>>,
}

impl Drain {
    /// Follows `token`: its cancellation starts the drain. Spawns the task
    /// that waits for it on `tasks`, so it must be called inside the runtime.
    pub fn follow(token: &CancellationToken, tasks: &TaskTracker) -> Drain {
        let drain = Drain(Arc::new(DrainState {
            started: AtomicBool::new(false),
            idle: Mutex::new(Slab::new()),
        }));
        let (token, starter) = (token.clone(), drain.clone());
        tasks.spawn(async move {
            token.cancelled().await;
            starter.start();
        });
        drain
    }

    fn start(&self) {
        self.0.started.store(true, Ordering::Release);
        let idle = std::mem::take(&mut *lock(&self.0.idle));
        for waker in idle {
            waker.1.wake();
        }
    }

    fn started(&self) -> bool {
        self.0.started.load(Ordering::Acquire)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding the lock; a poisoned lock still holds valid data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One call's watch on the [`Drain`].
pub struct DrainCheck {
    drain: Drain,
    /// The call's waker slot, made at its first idle poll, and its key.
    /// (A `u32` key beside the `u32` countdown: this struct is in every
    /// call's future, so its size is paid by every open call.)
    slot: Option<Arc<AtomicWaker>>,
    key: u32,
    countdown: u32,
}

impl DrainCheck {
    /// Messages between two looks at the flag while a call is busy.
    const BUSY_INTERVAL: u32 = 64;

    pub fn new(drain: &Drain) -> Self {
        DrainCheck {
            drain: drain.clone(),
            slot: None,
            key: 0,
            countdown: Self::BUSY_INTERVAL,
        }
    }

    /// Whether draining has started, looking only every
    /// [`Self::BUSY_INTERVAL`] calls.
    pub fn busy_check(&mut self) -> bool {
        self.countdown -= 1;
        if self.countdown > 0 {
            return false;
        }
        self.countdown = Self::BUSY_INTERVAL;
        self.drain.started()
    }

    /// Ready once draining has started; registers the waker otherwise.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain.started() {
            return Poll::Ready(());
        }
        match &self.slot {
            Some(waker) => waker.register(cx.waker()),
            None => {
                let waker = Arc::new(AtomicWaker::new());
                waker.register(cx.waker());
                let key = lock(&self.drain.0.idle).insert(waker.clone());
                self.key = u32::try_from(key).expect("fewer than 2^32 idle calls");
                self.slot = Some(waker);
            }
        }
        // The drain may have started between the first look and the registration.
        if self.drain.started() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for DrainCheck {
    fn drop(&mut self) {
        if let Some(waker) = self.slot.take() {
            let key = self.key as usize;
            let mut idle = lock(&self.drain.0.idle);
            // After the drain the slab was emptied, and the key may be another's.
            if idle.get(key).is_some_and(|slot| Arc::ptr_eq(slot, &waker)) {
                idle.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_call_notices_the_drain_within_one_interval_and_not_before() {
        let token = CancellationToken::new();
        let drain = Drain::follow(&token, &TaskTracker::new());
        let mut check = DrainCheck::new(&drain);
        for _ in 0..3 * DrainCheck::BUSY_INTERVAL {
            assert!(!check.busy_check(), "no drain yet");
        }
        token.cancel();
        // Once the drain has started (an idle watch resolves then)...
        let mut probe = DrainCheck::new(&drain);
        std::future::poll_fn(|cx| probe.poll_idle(cx)).await;
        let looks = (1..=DrainCheck::BUSY_INTERVAL).find(|_| check.busy_check());
        assert!(
            looks.is_some(),
            "a busy call must notice within {} messages",
            DrainCheck::BUSY_INTERVAL
        );
    }

    /// A waker that records that it was woken.
    struct Flag(AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn idle_calls_are_woken_by_the_drain_and_leave_no_slot_behind() {
        let token = CancellationToken::new();
        let drain = Drain::follow(&token, &TaskTracker::new());
        let flags: Vec<_> = (0..4).map(|_| Arc::new(Flag(AtomicBool::new(false)))).collect();
        let mut checks: Vec<_> = flags
            .iter()
            .map(|flag| {
                let mut check = DrainCheck::new(&drain);
                let waker = std::task::Waker::from(flag.clone());
                assert!(check.poll_idle(&mut Context::from_waker(&waker)).is_pending());
                // Polled again, as a select! loop does: still one slot.
                assert!(check.poll_idle(&mut Context::from_waker(&waker)).is_pending());
                check
            })
            .collect();
        assert_eq!(lock(&drain.0.idle).len(), 4, "one slot per idle call");
        // A call that ended before the drain gives its slot back.
        drop(checks.pop());
        assert_eq!(lock(&drain.0.idle).len(), 3);
        token.cancel();
        // Once the drain has started (a new idle watch resolves then)...
        let mut probe = DrainCheck::new(&drain);
        std::future::poll_fn(|cx| probe.poll_idle(cx)).await;
        drop(probe);
        // ...every idle call was woken and sees it, and no slot is left.
        for (check, flag) in checks.iter_mut().zip(&flags) {
            assert!(flag.0.load(Ordering::SeqCst), "an idle call was not woken");
            assert!(
                check
                    .poll_idle(&mut Context::from_waker(std::task::Waker::noop()))
                    .is_ready()
            );
        }
        assert!(!flags[3].0.load(Ordering::SeqCst), "the ended call is not woken");
        assert_eq!(lock(&drain.0.idle).len(), 0);
        drop(checks);
        assert_eq!(lock(&drain.0.idle).len(), 0);
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
