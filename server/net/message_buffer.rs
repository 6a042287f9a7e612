//! The bytes of unfinished gRPC messages a connection may hold
//! (`--connection-message-buffer`): made per connection by the listener,
//! carried to its calls in the request extensions, taken and given back by
//! the framing check of the gRPC transports (`transport::grpc_framing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes of unfinished messages one connection holds, and its limit.
/// One per connection, carried to the calls in the request extensions.
#[derive(Clone, Debug)]
pub struct MessageBuffer(Arc<MessageBufferInner>);

#[derive(Debug)]
struct MessageBufferInner {
    held: AtomicUsize,
    limit: usize,
}

impl MessageBuffer {
    /// An empty buffer allowing `limit` bytes (`--connection-message-buffer`).
    pub fn new(limit: usize) -> Self {
        MessageBuffer(Arc::new(MessageBufferInner {
            held: AtomicUsize::new(0),
            limit,
        }))
    }

    /// Takes `bytes` more, unless that would pass the limit.
    pub fn take(&self, bytes: usize) -> Result<(), usize> {
        let inner = &self.0;
        inner
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= inner.limit)
            })
            .map(drop)
    }

    pub fn give_back(&self, bytes: usize) {
        self.0.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes held now (for tests and metrics).
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Acquire)
    }
}
