//! Live calls per transport, and each call's metrics.
//!
//! A call holds a [`CallGuard`] from its first byte to its last; dropping the
//! guard (normal end, error, client gone, task cancelled) is what decrements
//! the count and records the call's duration and status, so a count that
//! returns to zero proves nothing was left behind. Tests wait on it instead of
//! sleeping; `/metrics` reports it.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::metrics::{Metrics, StreamMetrics};
use crate::transport::Transport;

type Counts = [usize; Transport::ALL.len()];

/// The status of a call that ended without recording one.
const CANCELLED: i32 = streambridge_protocol::code::CANCELLED;

/// Live calls per transport; cheap to clone, shared by the whole server.
#[derive(Clone)]
pub struct ActiveCalls {
    counts: Arc<watch::Sender<Counts>>,
    metrics: Arc<Metrics>,
}

impl Default for ActiveCalls {
    fn default() -> Self {
        ActiveCalls {
            counts: Arc::new(watch::Sender::new(Counts::default())),
            metrics: Arc::default(),
        }
    }
}

impl ActiveCalls {
    /// Counts a new call until the returned guard is dropped.
    pub fn enter(&self, transport: Transport) -> CallGuard {
        self.counts.send_modify(|counts| counts[transport.index()] += 1);
        let metrics = self.metrics.stream_started(transport);
        CallGuard {
            calls: self.clone(),
            metrics,
            started: Instant::now(),
            code: CANCELLED,
        }
    }

    /// The server's metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Live calls on one transport.
    pub fn get(&self, transport: Transport) -> usize {
        self.counts.borrow()[transport.index()]
    }

    /// Resolves once `transport` has exactly `count` live calls.
    pub async fn wait_for(&self, transport: Transport, count: usize) {
        let mut changes = self.counts.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = changes.wait_for(|counts| counts[transport.index()] == count).await;
    }
}

/// Proof that a call is live; dropping it ends the call's count and records
/// its duration and status.
pub struct CallGuard {
    calls: ActiveCalls,
    metrics: StreamMetrics,
    started: Instant,
    code: i32,
}

impl CallGuard {
    /// The call's message counters.
    pub fn metrics(&self) -> &StreamMetrics {
        &self.metrics
    }

    /// Records the gRPC status code the call ends with. A call dropped before
    /// it recorded one was cancelled (the client went away).
    pub fn set_code(&mut self, code: i32) {
        self.code = code;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let transport = self.metrics.transport;
        self.calls
            .metrics
            .stream_ended(transport, self.started.elapsed().as_secs_f64(), self.code);
        self.calls.counts.send_modify(|counts| counts[transport.index()] -= 1);
    }
}
