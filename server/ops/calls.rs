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

/// Counts the gRPC calls of services that do not count themselves (added
/// services, the upstream proxy): live calls, duration and status, by the
/// transport they came by. The built-in `DataService` counts its own (with
/// its messages); health and reflection are not counted.
#[derive(Clone)]
pub struct CountCalls<S> {
    inner: S,
    calls: ActiveCalls,
}

impl<S> CountCalls<S> {
    pub fn new(inner: S, calls: ActiveCalls) -> Self {
        CountCalls { inner, calls }
    }
}

/// Paths whose calls [`CountCalls`] leaves alone.
fn counts_itself_or_is_operational(path: &str) -> bool {
    ["/DataService/", "/grpc.health.v1.Health/", "/grpc.reflection."]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

impl<S, B> tower::Service<http::Request<B>> for CountCalls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if counts_itself_or_is_operational(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let transport = request
            .extensions()
            .get::<Transport>()
            .copied()
            .unwrap_or(Transport::Grpc);
        let mut guard = self.calls.enter(transport);
        let response = self.inner.call(request);
        Box::pin(async move {
            let Ok(response) = response.await;
            // A trailers-only response carries its status in the headers.
            if let Some(code) = grpc_status(response.headers()) {
                guard.set_code(code);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(CountedBody {
                    body,
                    guard: Some(guard),
                })
            }))
        })
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A response body that ends its call's count when it ends (or is dropped),
/// with the status its trailers carry.
struct CountedBody {
    body: tonic::body::Body,
    guard: Option<CallGuard>,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(trailers), Some(guard)) = (frame.trailers_ref(), this.guard.as_mut())
                    && let Some(code) = grpc_status(trailers)
                {
                    guard.set_code(code);
                }
            }
            Some(Err(status)) => {
                if let Some(guard) = this.guard.as_mut() {
                    guard.set_code(status.code() as i32);
                }
                this.guard = None;
            }
            None => this.guard = None,
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
