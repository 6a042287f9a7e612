//! Traces (`--otlp-endpoint`): one span per call, whatever transport brought
//! it and whatever service answers it, exported over OTLP/gRPC.
//!
//! A span starts where the call is counted ([`super::calls`]: where each
//! service is added, and the built-in plug-in of the WebSocket bridge) and
//! ends with the call's [`CallGuard`](super::calls::CallGuard). Its parent is
//! the W3C `traceparent` the client sent (an HTTP header, or a v2 call's
//! `open` metadata); the span's own context goes on to the service as
//! `traceparent` (an upstream continues the same trace; an in-process
//! service finds it in the request's metadata and, as a
//! [`opentelemetry::trace::SpanContext`], in its extensions).
//!
//! Attributes follow OpenTelemetry's RPC conventions (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`), plus
//! `streambridge.transport` and the messages and bytes each way
//! (`streambridge.messages_received` / `_sent`, `streambridge.bytes_received`
//! / `_sent`: the messages' own bytes, without gRPC's 5-byte prefixes).
//!
//! Off (no endpoint), nothing here runs: no span, no counter, no header.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span};

use super::calls::Transport;

/// How long a finished span waits, at most, before it is sent: short, so
/// a trace shows up while one is still looking for it.
const EXPORT_DELAY: Duration = Duration::from_secs(1);

/// The server's tracer; cheap to clone.
#[derive(Clone, Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Traces {
    /// Exports to the OTLP/gRPC collector at `endpoint` (e.g.
    /// `http://collector:4317`) as `service_name`. Must run on the tokio
    /// runtime (the exporter is a tonic client).
    pub fn start(endpoint: &str, service_name: &str) -> Result<Traces, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(BatchConfigBuilder::default().with_scheduled_delay(EXPORT_DELAY).build())
            .build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name.to_owned())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("streambridge");
        Ok(Traces { provider, tracer })
    }

    /// Sends what is left and stops (at the server's end). Blocks: call it
    /// off the runtime's worker threads.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "traces: the last spans were not all sent");
        }
    }

    /// Starts the span of a call of `method` (`/package.Service/Method`)
    /// that came by `transport`, its parent read from `parent` (the
    /// request's `traceparent` and `tracestate`).
    pub fn start_call(&self, transport: Transport, method: &str, parent: &dyn Extractor) -> CallSpan {
        let parent = TraceContextPropagator::new().extract(parent);
        let (service, name) = method.trim_start_matches('/').split_once('/').unwrap_or(("", method));
        let span = self
            .tracer
            .span_builder(method.trim_start_matches('/').to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_owned()),
                KeyValue::new("rpc.method", name.to_owned()),
                KeyValue::new("streambridge.transport", transport.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        CallSpan {
            span,
            tally: Arc::default(),
        }
    }
}

/// A call's span, ended with the call.
#[derive(Debug)]
pub struct CallSpan {
    span: Span,
    tally: Arc<Tally>,
}

/// Messages and bytes each way, counted by whoever sees them pass.
#[derive(Debug, Default)]
pub struct Tally {
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
}

impl Tally {
    pub fn received(&self, messages: u64, bytes: u64) {
        self.messages_received.fetch_add(messages, Ordering::Relaxed);
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn sent(&self, messages: u64, bytes: u64) {
        self.messages_sent.fetch_add(messages, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl CallSpan {
    /// Where the call's messages are counted.
    pub fn tally(&self) -> &Arc<Tally> {
        &self.tally
    }

    /// The span's context, for the service.
    pub fn span_context(&self) -> opentelemetry::trace::SpanContext {
        self.span.span_context().clone()
    }

    /// Replaces the request's `traceparent` (and `tracestate`) with this
    /// span's: the service's work is the span's child.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        headers.remove("traceparent");
        headers.remove("tracestate");
        let context = Context::new().with_remote_span_context(self.span_context());
        TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    }

    /// Ends the span with the call's gRPC status code.
    pub fn end(mut self, code: i32) {
        let count = |value: &AtomicU64| value.load(Ordering::Relaxed) as i64;
        let tally = &self.tally;
        self.span.set_attributes([
            KeyValue::new("rpc.grpc.status_code", i64::from(code)),
            KeyValue::new("streambridge.messages_received", count(&tally.messages_received)),
            KeyValue::new("streambridge.bytes_received", count(&tally.bytes_received)),
            KeyValue::new("streambridge.messages_sent", count(&tally.messages_sent)),
            KeyValue::new("streambridge.bytes_sent", count(&tally.bytes_sent)),
        ]);
        // The codes OpenTelemetry counts as a server's own failure.
        if let 2 | 4 | 12 | 13 | 14 | 15 = code {
            self.span.set_status(Status::error(format!("gRPC status {code}")));
        }
        self.span.end();
    }
}

/// Request headers as the propagator reads them.
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A v2 call's `open` metadata as the propagator reads it.
pub struct MetadataExtractor<'a>(pub &'a std::collections::HashMap<String, String>);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}
