//! The socket's byte budget for request messages not yet consumed
//! (`--ws-socket-buffer`): taken when the socket reads a message, given back
//! when the backend takes it (or the call ends). While it is used up the
//! socket stops reading, the one case where a call can slow its neighbours,
//! as an HTTP/2 connection window does; except when every call holding it
//! waits for response credit, which only a record the socket has not read
//! yet can give (see `v2::socket::Socket::may_read`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Cheap to clone; one per socket.
#[derive(Clone, Debug)]
pub struct Budget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    held: AtomicUsize,
    limit: usize,
    freed: Notify,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget(Arc::new(Inner {
            held: AtomicUsize::new(0),
            limit,
            freed: Notify::new(),
        }))
    }

    /// Whether the socket may read another message. One message may take
    /// the budget past its limit: it was read whole before it was counted.
    pub fn has_room(&self) -> bool {
        self.0.held.load(Ordering::Acquire) < self.0.limit
    }

    pub fn take(&self, bytes: usize) {
        self.0.held.fetch_add(bytes, Ordering::AcqRel);
    }

    pub fn give_back(&self, bytes: usize) {
        let before = self.0.held.fetch_sub(bytes, Ordering::AcqRel);
        if before >= self.0.limit && before - bytes < self.0.limit {
            self.0.freed.notify_one();
        }
    }

    /// Resolves when the budget gets room again (a backend in another task
    /// took messages): the socket then looks again whether it may read.
    pub async fn changed(&self) {
        self.0.freed.notified().await;
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_comes_back_when_bytes_are_given_back() {
        let budget = Budget::new(10);
        budget.take(12);
        assert!(!budget.has_room());
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.changed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        budget.give_back(5);
        waiter.await.unwrap();
        assert_eq!(budget.held(), 7);
    }
}
