//! Live calls per transport, and each call's metrics.
//!
//! A call holds a [`CallGuard`] from its first byte to its last; dropping the
//! guard (normal end, error, client gone, task cancelled) is what decrements
//! the count and records the call's duration and status, so a count that
//! returns to zero proves nothing was left behind. Tests wait on it instead of
//! sleeping; `/metrics` reports it.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::metrics::{Metrics, StreamMetrics};
use super::traces::{CallSpan, HeaderExtractor, Tally, Traces};

/// The ways into the server's calls; a label on every call metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Native gRPC over HTTP/2.
    Grpc,
    /// gRPC-Web (binary or text) over HTTP/1.1 or HTTP/2.
    GrpcWeb,
    /// The WebSocket bridge at `/ws`.
    WebSocket,
    /// Protocol v2 over plain HTTP at `/ws`, where WebSockets are blocked.
    Http,
    /// Protocol v2 over WebTransport (HTTP/3), each call on its own stream.
    WebTransport,
}

impl Transport {
    /// Every transport, in [`Transport::index`] order.
    pub const ALL: [Transport; 5] = [
        Transport::Grpc,
        Transport::GrpcWeb,
        Transport::WebSocket,
        Transport::Http,
        Transport::WebTransport,
    ];

    /// A dense index, for per-transport arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Grpc => "grpc",
            Transport::GrpcWeb => "grpc-web",
            Transport::WebSocket => "websocket",
            Transport::Http => "http",
            Transport::WebTransport => "webtransport",
        })
    }
}

type Counts = [usize; Transport::ALL.len()];

/// The status of a call that ended without recording one.
const CANCELLED: i32 = streambridge_protocol::code::CANCELLED;

/// Live calls per transport; cheap to clone, shared by the whole server.
#[derive(Clone)]
pub struct ActiveCalls {
    counts: Arc<watch::Sender<Counts>>,
    metrics: Arc<Metrics>,
    /// Where each call's span goes (`--otlp-endpoint`).
    traces: Option<Traces>,
}

impl Default for ActiveCalls {
    fn default() -> Self {
        ActiveCalls {
            counts: Arc::new(watch::Sender::new(Counts::default())),
            metrics: Arc::default(),
            traces: None,
        }
    }
}

impl ActiveCalls {
    /// The same, each call traced to `traces`.
    pub fn with_traces(self, traces: Option<Traces>) -> Self {
        ActiveCalls { traces, ..self }
    }

    /// The traces calls go to, if any.
    pub fn traces(&self) -> Option<&Traces> {
        self.traces.as_ref()
    }

    /// Counts a new call until the returned guard is dropped.
    pub fn enter(&self, transport: Transport) -> CallGuard {
        self.counts.send_modify(|counts| counts[transport.index()] += 1);
        let metrics = self.metrics.stream_started(transport);
        CallGuard {
            calls: self.clone(),
            metrics,
            started: Instant::now(),
            code: CANCELLED,
            span: None,
        }
    }

    /// [`ActiveCalls::enter`] for a call of `method`, with its span when
    /// traces are on (its parent the `traceparent` `parent` carries).
    pub fn enter_traced(
        &self,
        transport: Transport,
        method: &str,
        parent: &dyn opentelemetry::propagation::Extractor,
    ) -> CallGuard {
        let mut guard = self.enter(transport);
        if let Some(traces) = &self.traces {
            guard.span = Some(Box::new(traces.start_call(transport, method, parent)));
        }
        guard
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
    /// The call's span, ended with the guard (boxed: most calls have none).
    span: Option<Box<CallSpan>>,
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

    /// The call's span, when traces are on.
    pub fn span(&self) -> Option<&CallSpan> {
        self.span.as_deref()
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let transport = self.metrics.transport;
        self.calls
            .metrics
            .stream_ended(transport, self.started.elapsed().as_secs_f64(), self.code);
        self.calls.counts.send_modify(|counts| counts[transport.index()] -= 1);
        if let Some(span) = self.span.take() {
            span.end(self.code);
        }
    }
}

/// Counts the calls of one service: live calls, duration and status, by
/// the transport they came by (the [`Transport`] request extension; native
/// gRPC without one). Each service that answers calls is wrapped in it where
/// it is added (the built-in `DataService`, added services, the upstream);
/// health and reflection are not, so they are not counted. Nothing looks at
/// the path: an upstream's `DataService` is counted like any other.
///
/// The call's message counters go to the service as a request extension
/// ([`StreamMetrics`]): a service that can count its messages (the built-in
/// one does) counts them there.
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

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountCalls<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for CountCalls<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let transport = request
            .extensions()
            .get::<Transport>()
            .copied()
            .unwrap_or(Transport::Grpc);
        let mut guard = self
            .calls
            .enter_traced(transport, request.uri().path(), &HeaderExtractor(request.headers()));
        request.extensions_mut().insert(guard.metrics().clone());
        // Traced: the service's work is the span's child, and the messages
        // are counted both ways as they pass.
        let tally = guard.span().map(|span| {
            span.propagate(request.headers_mut());
            request.extensions_mut().insert(span.span_context());
            span.tally().clone()
        });
        if let Some(tally) = &tally {
            let tally = tally.clone();
            request = request.map(|body| tonic::body::Body::new(TalliedBody::received(body, tally)));
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let Ok(response) = response.await;
            // A trailers-only response carries its status in the headers.
            if let Some(code) = grpc_status(response.headers()) {
                guard.set_code(code);
            }
            Ok(response.map(|body| {
                let body = match tally {
                    Some(tally) => tonic::body::Body::new(TalliedBody::sent(body, tally)),
                    None => body,
                };
                tonic::body::Body::new(CountedBody {
                    body,
                    guard: Some(guard),
                })
            }))
        })
    }
}

/// A body whose gRPC messages are counted, for a call's span.
struct TalliedBody {
    body: tonic::body::Body,
    cursor: streambridge_protocol::grpc::PrefixCursor,
    tally: Arc<Tally>,
    received: bool,
}

impl TalliedBody {
    fn received(body: tonic::body::Body, tally: Arc<Tally>) -> TalliedBody {
        TalliedBody {
            body,
            cursor: Default::default(),
            tally,
            received: true,
        }
    }

    fn sent(body: tonic::body::Body, tally: Arc<Tally>) -> TalliedBody {
        TalliedBody {
            received: false,
            ..TalliedBody::received(body, tally)
        }
    }
}

/// The messages whose prefix completes in `chunk`, and the chunk's bytes
/// that belong to messages (none of a prefix, even one cut by a chunk's
/// end, is counted).
fn message_bytes(cursor: &mut streambridge_protocol::grpc::PrefixCursor, chunk: &[u8]) -> (u64, u64) {
    let prefix_before = cursor.in_prefix();
    let (mut messages, mut prefix_bytes) = (0u64, 0usize);
    let _ = cursor.advance(chunk, |prefix| {
        messages += 1;
        // A prefix cut by the chunk before ends early in this one.
        prefix_bytes += prefix.end.min(streambridge_protocol::grpc::PREFIX_LEN);
        Ok::<(), ()>(())
    });
    // A prefix the chunk ends inside: its bytes in this chunk (it may have
    // begun in the chunk before, if no prefix completed here).
    prefix_bytes += match messages {
        0 => cursor.in_prefix().saturating_sub(prefix_before),
        _ => cursor.in_prefix(),
    };
    (messages, (chunk.len() - prefix_bytes) as u64)
}

impl http_body::Body for TalliedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            let (messages, bytes) = message_bytes(&mut this.cursor, data);
            if this.received {
                this.tally.received(messages, bytes);
            } else {
                this.tally.sent(messages, bytes);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_bytes_leave_out_every_prefix_however_the_chunks_cut_it() {
        let mut body = bytes::BytesMut::new();
        for message in [&b"abc"[..], b"", b"defgh"] {
            streambridge_protocol::grpc::put_message(&mut body, message);
        }
        for size in 1..=body.len() {
            let mut cursor = streambridge_protocol::grpc::PrefixCursor::default();
            let (messages, bytes) = body
                .chunks(size)
                .map(|chunk| message_bytes(&mut cursor, chunk))
                .fold((0, 0), |(m, b), (dm, db)| (m + dm, b + db));
            assert_eq!((messages, bytes), (3, 8), "chunks of {size}");
        }
    }
}
