//! Prometheus metrics, served at `GET /metrics` (OpenMetrics text):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `streambridge_open_connections` | gauge | |
//! | `streambridge_connections_refused_total` | counter | |
//! | `streambridge_active_streams` | gauge | `transport` |
//! | `streambridge_messages_received_total` | counter | `transport` |
//! | `streambridge_messages_sent_total` | counter | `transport` |
//! | `streambridge_stream_errors_total` | counter | `transport`, `code` (gRPC status code) |
//! | `streambridge_stream_duration_seconds` | histogram | `transport` |
//! | `streambridge_calls_refused_total` | counter | `reason`: `unauthenticated`, `permission_denied`, `rate_limited` |
//!
//! Per-message counters are handed to each call once (no lookup per message)
//! and batched per call (see [`StreamMetrics`]): message totals lag a live
//! call by at most 63 messages per direction, and are exact once it ends.
//! Everything else changes once per connection or call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::calls::Transport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why the bridge itself refused a call before any service saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No token, or a token that does not verify (16).
    Unauthenticated,
    /// The policy's claims do not hold (7).
    PermissionDenied,
    /// Past the caller's call rate (8).
    RateLimited,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    transport: String,
    code: i32,
}

/// Every metric of the server, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    open_connections: Gauge,
    refused_connections: Counter,
    active_streams: Family<TransportLabel, Gauge>,
    received: Family<TransportLabel, Counter>,
    sent: Family<TransportLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<TransportLabel, Histogram, fn() -> Histogram>,
    refused_calls: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("streambridge");
        let open_connections = Gauge::default();
        registry.register("open_connections", "Open TCP connections", open_connections.clone());
        let refused_connections = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept because --max-connections were open",
            refused_connections.clone(),
        );
        let active_streams = Family::<TransportLabel, Gauge>::default();
        registry.register("active_streams", "Live calls per transport", active_streams.clone());
        let received = Family::<TransportLabel, Counter>::default();
        registry.register("messages_received", "Request messages received", received.clone());
        let sent = Family::<TransportLabel, Counter>::default();
        registry.register("messages_sent", "Reply messages sent", sent.clone());
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "stream_errors",
            "Calls that ended with a non-OK status, by gRPC code",
            errors.clone(),
        );
        let durations: Family<TransportLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 12)));
        registry.register("stream_duration_seconds", "How long calls lasted", durations.clone());
        let refused_calls = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "calls_refused",
            "Calls the bridge refused before any service saw them, by reason",
            refused_calls.clone(),
        );
        Metrics {
            registry,
            open_connections,
            refused_connections,
            active_streams,
            received,
            sent,
            errors,
            durations,
            refused_calls,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGauge {
        self.open_connections.inc();
        ConnectionGauge(self.clone())
    }

    /// Counts a connection refused at the cap.
    pub fn connection_refused(&self) {
        self.refused_connections.inc();
    }

    /// Counts a call the bridge refused.
    pub fn call_refused(&self, why: Refused) {
        let reason = match why {
            Refused::Unauthenticated => "unauthenticated",
            Refused::PermissionDenied => "permission_denied",
            Refused::RateLimited => "rate_limited",
        };
        self.refused_calls.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn stream_started(&self, transport: Transport) -> StreamMetrics {
        let label = TransportLabel {
            transport: transport.to_string(),
        };
        self.active_streams.get_or_create(&label).inc();
        self.message_counters(transport)
    }

    /// Message counters for `transport` that belong to no one call: for a
    /// transport that counts many calls' messages in one place.
    pub(crate) fn message_counters(&self, transport: Transport) -> StreamMetrics {
        let label = TransportLabel {
            transport: transport.to_string(),
        };
        StreamMetrics {
            transport,
            received: BatchedCounter::new(self.received.get_or_create(&label).clone()),
            sent: BatchedCounter::new(self.sent.get_or_create(&label).clone()),
        }
    }

    pub(crate) fn stream_ended(&self, transport: Transport, seconds: f64, code: i32) {
        let label = TransportLabel {
            transport: transport.to_string(),
        };
        self.active_streams.get_or_create(&label).dec();
        self.durations.get_or_create(&label).observe(seconds);
        // A label per code an upstream can invent would grow without bound:
        // anything outside gRPC's 17 codes is UNKNOWN, as the gRPC spec reads
        // an unparsable `grpc-status`.
        let code = if (0..=16).contains(&code) {
            code
        } else {
            streambridge_protocol::code::UNKNOWN
        };
        if code != 0 {
            self.errors
                .get_or_create(&ErrorLabels {
                    transport: label.transport,
                    code,
                })
                .inc();
        }
    }
}

/// One open connection, counted until dropped.
pub struct ConnectionGauge(Arc<Metrics>);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

/// A call's message counters. Each call tallies locally (uncontended) and
/// publishes to the shared counters every [`FLUSH_EVERY`] messages, whenever
/// the transport calls [`StreamMetrics::publish`] (when it goes idle), and
/// when it ends: shared atomics bumped by every message of every call would
/// bounce one cache line between the cores on the hot path. Clones share the
/// call's tallies.
#[derive(Clone)]
pub struct StreamMetrics {
    pub(crate) transport: Transport,
    received: BatchedCounter,
    sent: BatchedCounter,
}

/// Messages a call tallies before it publishes them anyway.
const FLUSH_EVERY: u64 = 64;

impl StreamMetrics {
    pub fn message_received(&self) {
        self.received.inc();
    }

    pub fn message_sent(&self) {
        self.sent.inc();
    }

    /// Makes every message counted so far visible in `/metrics`.
    pub fn publish(&self) {
        self.received.publish();
        self.sent.publish();
    }
}

/// A shared counter with a per-call tally in front of it.
#[derive(Clone)]
struct BatchedCounter {
    shared: Counter,
    pending: Arc<AtomicU64>,
}

impl BatchedCounter {
    fn new(shared: Counter) -> Self {
        BatchedCounter {
            shared,
            pending: Arc::default(),
        }
    }

    fn inc(&self) {
        if self.pending.fetch_add(1, Ordering::Relaxed) + 1 >= FLUSH_EVERY {
            self.publish();
        }
    }

    fn publish(&self) {
        let pending = self.pending.swap(0, Ordering::Relaxed);
        if pending > 0 {
            self.shared.inc_by(pending);
        }
    }
}

impl Drop for BatchedCounter {
    fn drop(&mut self) {
        self.publish();
    }
}
