//! Traces (`--otlp-endpoint`): the bridges here export to a collector the
//! test runs (a tonic server for the OTLP trace service, from the
//! `opentelemetry-proto` crate). Every call, on native gRPC and on
//! WebSocket v2, to the built-in service, a service added in process and an
//! upstream, is one span whose parent is the client's `traceparent`, and
//! the service (which reports the metadata it saw) receives a `traceparent`
//! in the same trace whose parent is that span.

mod support;

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use streambridge_protocol::StreamRequest;
use support::upstream::{EchoClient, EchoReply, EchoRequest, EchoUpstream};
use support::ws2::{proto_call_outcome, proto_socket, whole_call};
use support::{ServerAddr, TestServer, within};
use tokio::sync::mpsc;

/// A span as the collector received it, with the `service.name` it came from.
struct Received {
    service: String,
    span: Span,
}

struct Collector(mpsc::UnboundedSender<Received>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                let _ = self.0.send(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

/// Starts the collector: its URL and what it receives.
async fn collector() -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, rx)
}

/// A W3C `traceparent` of a client's own span, and its ids.
struct ClientSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

impl ClientSpan {
    fn new(seed: u8) -> ClientSpan {
        ClientSpan {
            trace_id: [seed; 16],
            span_id: [seed.wrapping_add(1); 8],
        }
    }

    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits for the span of the trace `client` started, from `service`.
async fn span_of(
    spans: &mut mpsc::UnboundedReceiver<Received>,
    seen: &mut Vec<Received>,
    service: &str,
    client: &ClientSpan,
) -> Span {
    let matches = |r: &Received| r.service == service && r.span.trace_id == client.trace_id;
    loop {
        if let Some(at) = seen.iter().position(matches) {
            return seen.remove(at).span;
        }
        let received = within("the call's span", spans.recv())
            .await
            .expect("the collector runs");
        seen.push(received);
    }
}

fn attributes(span: &Span) -> HashMap<String, Value> {
    span.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.as_ref()?.value.clone()?)))
        .collect()
}

fn int(attributes: &HashMap<String, Value>, key: &str) -> i64 {
    match attributes.get(key) {
        Some(Value::IntValue(n)) => *n,
        other => panic!("{key}: {other:?}"),
    }
}

fn string(attributes: &HashMap<String, Value>, key: &str) -> String {
    attributes
        .get(key)
        .and_then(text)
        .unwrap_or_else(|| panic!("{key}: missing"))
}

/// Checks a call's span: the client's span its parent, the method, the
/// transport, the status and the messages each way.
fn check_span(span: &Span, client: &ClientSpan, method: &str, transport: &str, messages: (i64, i64)) {
    assert_eq!(
        span.parent_span_id, client.span_id,
        "{method}: the client's span is the parent"
    );
    assert_eq!(span.name, method.trim_start_matches('/'));
    let attributes = attributes(span);
    let (service, name) = method.trim_start_matches('/').split_once('/').unwrap();
    assert_eq!(string(&attributes, "rpc.system"), "grpc");
    assert_eq!(string(&attributes, "rpc.service"), service);
    assert_eq!(string(&attributes, "rpc.method"), name);
    assert_eq!(string(&attributes, "streambridge.transport"), transport, "{method}");
    assert_eq!(int(&attributes, "rpc.grpc.status_code"), 0, "{method} on {transport}");
    assert_eq!(
        (
            int(&attributes, "streambridge.messages_received"),
            int(&attributes, "streambridge.messages_sent")
        ),
        messages,
        "{method} on {transport}"
    );
    assert!(int(&attributes, "streambridge.bytes_received") > 0);
    assert!(int(&attributes, "streambridge.bytes_sent") > 0);
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
}

/// The `traceparent` a service saw continues the trace, its parent the
/// bridge's span for the call.
fn check_propagated(reply: &EchoReply, client: &ClientSpan, span: &Span) {
    let seen = reply
        .metadata
        .get("traceparent")
        .expect("the service got a traceparent");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(parts[1], hex(&client.trace_id), "the same trace");
    assert_eq!(
        parts[2],
        hex(&span.span_id),
        "the bridge's span is the service's parent"
    );
}

#[tokio::test]
async fn every_call_is_a_span_under_the_clients_traceparent_and_the_service_continues_it() {
    let (url, mut spans) = collector().await;
    let mut seen = Vec::new();
    let traced = |name: &'static str| {
        let url = url.clone();
        move |config: &mut streambridge::Config| {
            config.otlp_endpoint = Some(url);
            config.service_name = name.into();
        }
    };
    let built_in = TestServer::start_with(traced("built-in")).await;
    let (added, _cancelled) = EchoUpstream::added_to_bridge(traced("added")).await;
    let upstream = EchoUpstream::start().await;
    let upstream_url: http::Uri = upstream.url().parse().unwrap();
    let bridge = TestServer::start_with(move |config| {
        traced("upstream")(config);
        config.upstream = Some(upstream_url);
    })
    .await;

    // The built-in service on native gRPC: two messages each way.
    let client = ClientSpan::new(1);
    let mut request = tonic::Request::new(tokio_stream::iter(
        ["a", "b"].map(|data| StreamRequest { data: data.into() }),
    ));
    request
        .metadata_mut()
        .insert("traceparent", client.traceparent().parse().unwrap());
    let mut grpc = built_in.grpc_client().await;
    let replies = within("call", grpc.bidirectional_stream(request))
        .await
        .unwrap()
        .into_inner();
    let replies: Vec<_> = within("replies", futures_util::StreamExt::collect::<Vec<_>>(replies)).await;
    assert_eq!(replies.len(), 2);
    let span = span_of(&mut spans, &mut seen, "built-in", &client).await;
    check_span(&span, &client, "/DataService/BidirectionalStream", "grpc", (2, 2));
    assert_eq!(
        int(&attributes(&span), "streambridge.bytes_received"),
        2 * 3,
        "two StreamRequests of one byte: 3 bytes each"
    );

    // The built-in service on WebSocket v2, traceparent in the open's metadata.
    let client = ClientSpan::new(2);
    let mut socket = proto_socket(&built_in, None).await;
    let message = StreamRequest { data: "c".into() }.encode_to_vec();
    let traceparent = client.traceparent();
    futures_util::SinkExt::send(
        &mut socket,
        whole_call(
            1,
            "/DataService/BidirectionalStream",
            &[("traceparent", &traceparent)],
            message,
        ),
    )
    .await
    .unwrap();
    let (_, status) = proto_call_outcome(&mut socket, 1).await;
    assert_eq!(status.code, 0, "{}", status.message);
    let span = span_of(&mut spans, &mut seen, "built-in", &client).await;
    check_span(&span, &client, "/DataService/BidirectionalStream", "websocket", (1, 1));

    // A service added in process and an upstream, on native gRPC and on v2:
    // the service continues the trace.
    for (server, service, seed) in [(&added, "added", 3), (&bridge, "upstream", 5)] {
        let client = ClientSpan::new(seed);
        let mut echo = EchoClient::new(server.grpc_channel().await);
        let mut request = tonic::Request::new(EchoRequest {
            text: "t".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("traceparent", client.traceparent().parse().unwrap());
        let reply = within("unary", echo.unary(request)).await.unwrap().into_inner();
        let span = span_of(&mut spans, &mut seen, service, &client).await;
        check_span(&span, &client, "/streambridge.testing.Echo/Unary", "grpc", (1, 1));
        check_propagated(&reply, &client, &span);

        let client = ClientSpan::new(seed + 1);
        let traceparent = client.traceparent();
        let mut socket = proto_socket(server, None).await;
        let message = EchoRequest {
            text: "v".into(),
            ..Default::default()
        }
        .encode_to_vec();
        futures_util::SinkExt::send(
            &mut socket,
            whole_call(
                1,
                "/streambridge.testing.Echo/Unary",
                &[("traceparent", &traceparent)],
                message,
            ),
        )
        .await
        .unwrap();
        let (replies, status) = proto_call_outcome(&mut socket, 1).await;
        assert_eq!(status.code, 0, "{}", status.message);
        let reply = EchoReply::decode(replies[0].clone()).unwrap();
        let span = span_of(&mut spans, &mut seen, service, &client).await;
        check_span(&span, &client, "/streambridge.testing.Echo/Unary", "websocket", (1, 1));
        check_propagated(&reply, &client, &span);
    }
}
