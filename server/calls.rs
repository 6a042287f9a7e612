//! Counts of live calls per transport.
//!
//! A call holds a [`CallGuard`] from its first byte to its last; dropping the
//! guard (normal end, error, client gone, task cancelled) is what decrements
//! the count, so a count that returns to zero proves nothing was left behind.
//! Tests wait on it instead of sleeping; `/metrics` will report it.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

/// The ways into the stream processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Native gRPC over HTTP/2.
    Grpc,
    /// gRPC-Web (binary or text) over HTTP/1.1 or HTTP/2.
    GrpcWeb,
    /// The WebSocket bridge at `/ws`.
    WebSocket,
}

impl Transport {
    const ALL: [Transport; 3] = [Transport::Grpc, Transport::GrpcWeb, Transport::WebSocket];

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Grpc => "grpc",
            Transport::GrpcWeb => "grpc-web",
            Transport::WebSocket => "websocket",
        })
    }
}

type Counts = [usize; Transport::ALL.len()];

/// Live calls per transport; cheap to clone, shared by the whole server.
#[derive(Clone)]
pub struct ActiveCalls {
    counts: Arc<watch::Sender<Counts>>,
}

impl Default for ActiveCalls {
    fn default() -> Self {
        ActiveCalls {
            counts: Arc::new(watch::Sender::new(Counts::default())),
        }
    }
}

impl ActiveCalls {
    /// Counts a new call until the returned guard is dropped.
    pub fn enter(&self, transport: Transport) -> CallGuard {
        self.counts.send_modify(|counts| counts[transport.index()] += 1);
        CallGuard {
            calls: self.clone(),
            transport,
        }
    }

    /// Live calls on one transport.
    pub fn get(&self, transport: Transport) -> usize {
        self.counts.borrow()[transport.index()]
    }

    /// Live calls on every transport.
    pub fn total(&self) -> usize {
        self.counts.borrow().iter().sum()
    }

    /// Resolves once `transport` has exactly `count` live calls.
    pub async fn wait_for(&self, transport: Transport, count: usize) {
        let mut changes = self.counts.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = changes.wait_for(|counts| counts[transport.index()] == count).await;
    }
}

/// Proof that a call is live; dropping it ends the call's count.
pub struct CallGuard {
    calls: ActiveCalls,
    transport: Transport,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls
            .counts
            .send_modify(|counts| counts[self.transport.index()] -= 1);
    }
}
