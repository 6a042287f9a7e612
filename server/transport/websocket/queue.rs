//! The requests a WebSocket call has read and the processor has not taken
//! yet: the input [`Stream`] of the processor for one socket.
//!
//! A tokio `mpsc` channel would do, but it allocates a block of 32 slots per
//! channel up front, about 1 KiB for every open socket even when idle. Reader
//! and processor run in the same task here (the call's `select!` loop), so a
//! `VecDeque` that grows on demand is enough. The stream does not register a
//! waker when it is empty: the only pushes and the close come from that same
//! loop, which polls the stream again on its next turn. It must not be polled
//! from any other task.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::Stream;
use streambridge_protocol::StreamRequest;

#[derive(Default)]
struct Shared {
    requests: VecDeque<StreamRequest>,
    closed: bool,
}

/// The reading side: pushes requests; dropping it ends the stream.
pub struct RequestQueue {
    shared: Arc<Mutex<Shared>>,
    capacity: usize,
}

/// The processor's side: the requests, in order, until the queue is dropped.
pub struct QueuedRequests {
    shared: Arc<Mutex<Shared>>,
}

/// A queue holding at most `capacity` requests (at least one).
pub fn request_queue(capacity: usize) -> (RequestQueue, QueuedRequests) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    (
        RequestQueue {
            shared: shared.clone(),
            capacity: capacity.max(1),
        },
        QueuedRequests { shared },
    )
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // Nothing panics while holding the lock; a poisoned lock still holds valid data.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RequestQueue {
    /// Whether another request fits.
    pub fn has_room(&self) -> bool {
        lock(&self.shared).requests.len() < self.capacity
    }

    /// Queues a request; the caller checked [`Self::has_room`].
    pub fn push(&self, request: StreamRequest) {
        lock(&self.shared).requests.push_back(request);
    }
}

impl Drop for RequestQueue {
    fn drop(&mut self) {
        lock(&self.shared).closed = true;
    }
}

impl Stream for QueuedRequests {
    type Item = Result<StreamRequest, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut shared = lock(&self.shared);
        match shared.requests.pop_front() {
            Some(request) => Poll::Ready(Some(Ok(request))),
            None if shared.closed => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[test]
    fn requests_come_out_in_order_and_the_end_follows_the_drop() {
        let (queue, mut requests) = request_queue(2);
        queue.push(StreamRequest { data: "a".into() });
        queue.push(StreamRequest { data: "b".into() });
        assert!(!queue.has_room());
        let next = |requests: &mut QueuedRequests| futures_util::FutureExt::now_or_never(requests.next());
        assert_eq!(next(&mut requests), Some(Some(Ok(StreamRequest { data: "a".into() }))));
        assert!(queue.has_room());
        assert_eq!(next(&mut requests), Some(Some(Ok(StreamRequest { data: "b".into() }))));
        assert_eq!(next(&mut requests), None, "empty and open: pending");
        drop(queue);
        assert_eq!(next(&mut requests), Some(None), "dropped: the end");
    }
}
