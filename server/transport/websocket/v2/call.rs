//! One v2 call: a gRPC request on the backend, fed by the socket, its
//! response turned into records.
//!
//! The call runs as its own task. Request messages come from the socket over
//! an unbounded channel whose length the socket bounds by the call's request
//! credit and the socket's byte budget; the [`RequestBody`] hands them to the
//! backend as gRPC frames and grants the client more credit as they are
//! consumed. Response messages go out only against response credit (a
//! semaphore the client's `window` records fill), so a call whose reader
//! grants nothing stops reading its response, and the backend (tonic's
//! stream or the upstream's HTTP/2 window) stops producing: nothing piles up.
//!
//! Every call ends with exactly one `status` record, sent by this task: the
//! backend's status, or the reason the socket aborted the call (cancel, a
//! broken rule, the drain), or its deadline.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body::Frame;
use http_body_util::BodyExt;
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor};
use streambridge_protocol::v2::{self, Encoding, server_record};
use tokio::sync::{Semaphore, TryAcquireError, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tower::ServiceExt;

use super::budget::Budget;
use super::{CallGauge, Out, Payload};
use crate::backend::descriptors::Catalog;
use crate::backend::{ConnectionLost, GrpcService, ParkingLimit};
use crate::policy::auth::Authenticated;
use crate::transport::Transport;

/// Request credit a call starts with (the protocol's).
pub(super) const REQUEST_WINDOW: u64 = v2::DEFAULT_WINDOW as u64;

/// The request credit the server keeps a call topped up to: whenever the
/// credit left falls to half of this, a grant brings it back. With only the
/// first 256 in flight, a browser and the server take turns (each idle while
/// the other works through its batch); 1024 keeps both busy. Memory is
/// bounded by the socket's byte budget (`--ws-socket-buffer`), not by this.
pub(super) const REQUEST_CREDIT: u64 = 1024;

/// What a call task needs, handed over by the socket at `open`.
pub struct CallSpec {
    pub call: u32,
    pub open: v2::Open,
    pub encoding: Encoding,
    pub requests: mpsc::UnboundedReceiver<Payload>,
    pub response_credit: Arc<Semaphore>,
    pub abort: Abort,
    pub out: mpsc::Sender<Out>,
    pub control: mpsc::UnboundedSender<Out>,
    pub budget: Budget,
    pub gauge: Arc<CallGauge>,
    pub backend: GrpcService,
    pub catalog: Catalog,
    pub max_message_size: usize,
}

/// How the socket ends a call early: the status to end with, then the token.
#[derive(Clone, Default)]
pub struct Abort {
    reason: Arc<OnceLock<Status>>,
    token: CancellationToken,
}

impl Abort {
    /// Ends the call with `status` (the first reason given wins).
    pub fn abort(&self, status: Status) {
        let _ = self.reason.set(status);
        self.token.cancel();
    }

    fn reason(&self) -> Status {
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(|| Status::cancelled("call cancelled"))
    }
}

/// Runs the call to its status record.
pub async fn run(spec: CallSpec) {
    let call = spec.call;
    let encoding = spec.encoding;
    let out = spec.out.clone();
    let abort = spec.abort.clone();
    let timeout_ms = spec.open.timeout_ms;
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()));
    let deadline = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    let started = tokio::time::Instant::now();
    let deadline_passed = || Status::deadline_exceeded(format!("the call's deadline (timeoutMs {timeout_ms}) passed"));
    let status = tokio::select! {
        biased;
        () = abort.token.cancelled() => abort.reason(),
        () = deadline => deadline_passed(),
        status = exchange(spec) => status,
    };
    // The request body lives on in the backend's hands (hyper pipes it to
    // the upstream) until the socket drops the call, which waits for the
    // status record to get out: end it now, so the backend's stream is reset
    // at once (an upstream stops sending to a call that has ended).
    abort.token.cancel();
    // A service that ends the call on the same deadline may say CANCELLED
    // (tonic's server does) a moment before the bridge's own timer fires.
    let status = match timeout {
        Some(timeout) if status.code() == tonic::Code::Cancelled && started.elapsed() >= timeout => deadline_passed(),
        _ => status,
    };
    let record = encode(encoding, call, Kind::Status(to_record_status(&status)));
    let _ = out.send(Out::Status { call, record }).await;
}

/// The call's body: the backend's status, or why it could not run.
async fn exchange(spec: CallSpec) -> Status {
    let CallSpec {
        call,
        open,
        encoding,
        requests,
        response_credit,
        abort,
        out,
        control,
        budget,
        gauge,
        backend,
        catalog,
        max_message_size,
    } = spec;
    // JSON needs the method's descriptors; proto uses them, when there are
    // any, to check request messages.
    let method = match (encoding, catalog.method(&open.method).await) {
        (_, Ok(method)) => Some(method),
        (Encoding::Json, Err(status)) => return status,
        (Encoding::Proto, Err(_)) => None,
    };
    let request = match build_request(&open) {
        Ok(request) => request,
        Err(status) => return status,
    };
    let body = RequestBody {
        requests,
        input: method.as_ref().map(MethodDescriptor::input),
        budget: budget.clone(),
        gauge: gauge.clone(),
        ended: Box::pin(abort.token.clone().cancelled_owned()),
        abort: abort.clone(),
        call,
        encoding,
        control,
        consumed: 0,
        granted: REQUEST_WINDOW,
    };
    let request = request.map(|()| tonic::body::Body::new(body));
    let Ok(response) = backend.oneshot(request).await;
    let (parts, mut body) = response.into_parts();
    if let Some(status) = status_in(&parts.headers) {
        return status;
    }
    // While the call waits for credit it does not read its body, so it would
    // not see its backend's connection go; it watches for that instead.
    let connection = parts.extensions.get::<ConnectionLost>().cloned();
    // And, when its unread replies cost others, it waits (for credit, or for
    // a socket that does not take its records) only if there is room.
    let parking = parts.extensions.get::<ParkingLimit>().cloned();
    let metadata = metadata_of(&parts.headers);
    if !metadata.is_empty() {
        let record = encode(encoding, call, Kind::Headers(metadata));
        if let Err(status) = send_out(&out, Out::Record(record), parking.as_ref()).await {
            return status;
        }
    }
    let output = method
        .as_ref()
        .filter(|_| encoding == Encoding::Json)
        .map(MethodDescriptor::output);
    let mut buffer = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            None => return Status::internal("the response ended without a gRPC status"),
            Some(Err(status)) => return status,
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                return match frame.into_trailers() {
                    Ok(trailers) => status_in(&trailers)
                        .unwrap_or_else(|| Status::internal("the response's trailers carry no gRPC status")),
                    Err(_) => Status::internal("the response sent an unknown frame"),
                };
            }
        };
        // Whole messages are sliced out of the frame, not copied; only a
        // message cut by the frame's end waits in `buffer`.
        let mut data = if buffer.is_empty() {
            data
        } else {
            buffer.extend_from_slice(&data);
            buffer.split().freeze()
        };
        // The records of this frame, sent together: one wakeup of the socket.
        let mut records = Vec::new();
        while data.len() >= 5 {
            let compressed = data[0] != 0;
            let length = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            if compressed {
                return Status::internal("the service sent a compressed message; the bridge does not decompress");
            }
            if length > max_message_size {
                return Status::resource_exhausted(format!(
                    "the service sent a message of {length} bytes; the limit (--max-message-size) is {max_message_size}"
                ));
            }
            if data.len() < 5 + length {
                break;
            }
            data.advance(5);
            let message = data.split_to(length);
            let permit = match response_credit.try_acquire() {
                Ok(permit) => permit,
                Err(TryAcquireError::Closed) => return Status::cancelled("socket closed"),
                Err(TryAcquireError::NoPermits) => {
                    // Out of credit: what is ready goes now, then we wait.
                    if !records.is_empty()
                        && let Err(status) =
                            send_out(&out, Out::Records(std::mem::take(&mut records)), parking.as_ref()).await
                    {
                        return status;
                    }
                    let _parked = match ParkingLimit::park_in(parking.as_ref()) {
                        Ok(parked) => parked,
                        Err(status) => return status,
                    };
                    // Tell the socket: it may have to read past a full budget for our credit.
                    gauge.set_starved(true);
                    budget.nudge();
                    let permit = match &connection {
                        Some(connection) => tokio::select! {
                            permit = response_credit.acquire() => permit,
                            () = connection.lost() => {
                                gauge.set_starved(false);
                                return connection.status();
                            }
                        },
                        None => response_credit.acquire().await,
                    };
                    gauge.set_starved(false);
                    let Ok(permit) = permit else {
                        return Status::cancelled("socket closed");
                    };
                    permit
                }
            };
            permit.forget();
            let kind = match &output {
                Some(output) => match to_json(output, message) {
                    Ok(json) => Kind::JsonMessage(json),
                    Err(status) => return status,
                },
                None => Kind::Message(message),
            };
            records.push(encode(encoding, call, kind));
        }
        if !data.is_empty() {
            buffer.extend_from_slice(&data);
        }
        if !records.is_empty()
            && let Err(status) = send_out(&out, Out::Records(records), parking.as_ref()).await
        {
            return status;
        }
    }
}

/// Hands records to the socket. A call that has to wait for room (its
/// client is not taking what the socket writes) is not reading its response
/// meanwhile, so it parks first, as one waiting for credit does.
async fn send_out(out: &mpsc::Sender<Out>, item: Out, parking: Option<&ParkingLimit>) -> Result<(), Status> {
    match out.try_send(item) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(Status::cancelled("socket closed")),
        Err(mpsc::error::TrySendError::Full(item)) => {
            let _parked = ParkingLimit::park_in(parking)?;
            out.send(item).await.map_err(|_| Status::cancelled("socket closed"))
        }
    }
}

/// The gRPC request for `open`: the method's path, its metadata, its
/// deadline. The socket was authenticated at its upgrade.
fn build_request(open: &v2::Open) -> Result<Request<()>, Status> {
    let mut request = Request::post(open.method.as_str())
        .body(())
        .map_err(|_| Status::unimplemented(format!("{:?} is not a method path", open.method)))?;
    let headers = request.headers_mut();
    for (name, value) in &open.metadata {
        let lower = name.to_ascii_lowercase();
        if is_reserved(&lower) {
            return Err(Status::invalid_argument(format!("metadata key {name:?} is reserved")));
        }
        let header = HeaderName::try_from(lower.as_str())
            .map_err(|_| Status::invalid_argument(format!("metadata key {name:?} is not a valid header name")))?;
        if lower.ends_with("-bin") {
            base64::engine::general_purpose::STANDARD
                .decode(value)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(value))
                .map_err(|_| Status::invalid_argument(format!("metadata {name:?} is not base64")))?;
        }
        let value = HeaderValue::try_from(value.as_str())
            .map_err(|_| Status::invalid_argument(format!("metadata {name:?} has a value a header cannot carry")))?;
        headers.append(header, value);
    }
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    if open.timeout_ms > 0 {
        headers.insert(
            "grpc-timeout",
            HeaderValue::from_str(&format!("{}m", open.timeout_ms)).expect("digits and a unit"),
        );
    }
    request.extensions_mut().insert(Transport::WebSocket);
    request.extensions_mut().insert(Authenticated);
    Ok(request)
}

/// Whether `open`'s metadata could be sent on as request headers (for
/// calls that never become a gRPC request: the same refusals either way).
pub(super) fn check_metadata(open: &v2::Open) -> Result<(), Status> {
    if open.metadata.is_empty() {
        return Ok(());
    }
    build_request(open).map(drop)
}

/// Headers a client may not set as metadata: HTTP's own, and gRPC's.
fn is_reserved(name: &str) -> bool {
    name.starts_with("grpc-")
        || name.starts_with(':')
        || matches!(
            name,
            "content-type"
                | "te"
                | "host"
                | "connection"
                | "keep-alive"
                | "transfer-encoding"
                | "upgrade"
                | "content-length"
        )
}

/// The gRPC status in `headers` (trailers, or the headers of a
/// trailers-only response), if there is one.
fn status_in(headers: &HeaderMap) -> Option<Status> {
    headers.get("grpc-status")?;
    Some(Status::from_header_map(headers).unwrap_or_else(|| Status::unknown("unreadable grpc-status")))
}

/// Response metadata a client may see: everything but HTTP's and gRPC's own.
fn metadata_of(headers: &HeaderMap) -> HashMap<String, String> {
    headers
        .iter()
        .filter(|(name, _)| !is_reserved(name.as_str()) && name.as_str() != "date")
        .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

pub(super) fn to_record_status(status: &Status) -> v2::Status {
    v2::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: Bytes::copy_from_slice(status.details()),
        metadata: metadata_of(&status.metadata().clone().into_headers()),
    }
}

/// A response message as proto3 JSON.
fn to_json(output: &MessageDescriptor, message: Bytes) -> Result<String, Status> {
    let message = DynamicMessage::decode(output.clone(), message)
        .map_err(|e| Status::internal(format!("the service's reply is not a {}: {e}", output.full_name())))?;
    serde_json::to_string(&message).map_err(|e| Status::internal(format!("the reply does not map to JSON: {e}")))
}

/// Whether `bytes` decode as a `message` (protobuf wire format, known
/// fields with their wire types, strings UTF-8, nested messages likewise),
/// checked without building the message: a fraction of what decoding costs.
fn decodes_as(message: &MessageDescriptor, mut bytes: &[u8], depth: u32) -> bool {
    use prost::encoding::{WireType, decode_key, decode_varint};
    use prost_reflect::Kind;
    // prost's own recursion limit.
    if depth > 100 {
        return false;
    }
    while !bytes.is_empty() {
        let Ok((number, wire_type)) = decode_key(&mut bytes) else {
            return false;
        };
        let field = message.get_field(number);
        let kind = field.as_ref().map(|f| f.kind());
        let ok = match wire_type {
            WireType::Varint => {
                decode_varint(&mut bytes).is_ok()
                    && kind.as_ref().is_none_or(|k| {
                        matches!(
                            k,
                            Kind::Int32
                                | Kind::Int64
                                | Kind::Uint32
                                | Kind::Uint64
                                | Kind::Sint32
                                | Kind::Sint64
                                | Kind::Bool
                                | Kind::Enum(_)
                        )
                    })
            }
            WireType::SixtyFourBit => {
                let fits = bytes.len() >= 8;
                bytes = &bytes[8.min(bytes.len())..];
                fits && kind
                    .as_ref()
                    .is_none_or(|k| matches!(k, Kind::Fixed64 | Kind::Sfixed64 | Kind::Double))
            }
            WireType::ThirtyTwoBit => {
                let fits = bytes.len() >= 4;
                bytes = &bytes[4.min(bytes.len())..];
                fits && kind
                    .as_ref()
                    .is_none_or(|k| matches!(k, Kind::Fixed32 | Kind::Sfixed32 | Kind::Float))
            }
            WireType::LengthDelimited => {
                let Ok(length) = decode_varint(&mut bytes) else {
                    return false;
                };
                let Ok(length) = usize::try_from(length) else {
                    return false;
                };
                if length > bytes.len() {
                    return false;
                }
                let (value, rest) = bytes.split_at(length);
                bytes = rest;
                match (&field, kind) {
                    (None, _) => true,
                    (_, Some(Kind::String)) => std::str::from_utf8(value).is_ok(),
                    (_, Some(Kind::Bytes)) => true,
                    (_, Some(Kind::Message(nested))) => decodes_as(&nested, value, depth + 1),
                    // Packed repeated scalars.
                    (Some(field), _) => field.is_list(),
                }
            }
            // Groups (proto2's, deprecated) are not accepted.
            WireType::StartGroup | WireType::EndGroup => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// A request message from proto3 JSON; unknown fields are ignored.
fn from_json(input: &MessageDescriptor, text: &[u8]) -> Result<Vec<u8>, Status> {
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let message = DynamicMessage::deserialize_with_options(input.clone(), &mut deserializer, &options)
        .and_then(|m| deserializer.end().map(|()| m))
        .map_err(|e| Status::invalid_argument(format!("message is not a valid {} in JSON: {e}", input.full_name())))?;
    Ok(prost::Message::encode_to_vec(&message))
}

/// What a record carries, before encoding.
pub enum Kind {
    Headers(HashMap<String, String>),
    Message(Bytes),
    JsonMessage(String),
    Status(v2::Status),
    Window(u32),
    GoAway(v2::GoAway),
}

/// One record in the socket's encoding, for the socket to add to a batch.
pub fn encode(encoding: Encoding, call: u32, kind: Kind) -> Bytes {
    let mut out = Vec::new();
    append(encoding, call, kind, &mut out);
    Bytes::from(out)
}

/// One record in the socket's encoding, appended to a batch being built
/// (see [`super::Batch`]; the separators between JSON records are its job).
pub fn append(encoding: Encoding, call: u32, kind: Kind, out: &mut Vec<u8>) {
    use streambridge_protocol::v2::json::{JsonServerKind, encode_server_record};
    match encoding {
        Encoding::Proto => {
            let kind = match kind {
                Kind::Headers(metadata) => server_record::Kind::Headers(v2::Headers { metadata }),
                Kind::Message(message) => server_record::Kind::Message(message),
                Kind::JsonMessage(json) => server_record::Kind::Message(Bytes::from(json)),
                Kind::Status(status) => server_record::Kind::Status(status),
                Kind::Window(window) => server_record::Kind::Window(window),
                Kind::GoAway(goaway) => server_record::Kind::Goaway(goaway),
            };
            v2::append_record(&v2::ServerRecord { call, kind: Some(kind) }, out);
        }
        Encoding::Json => out.extend_from_slice(
            match kind {
                Kind::Headers(metadata) => encode_server_record(call, JsonServerKind::Headers(&metadata)),
                Kind::Message(message) => {
                    // Only a json socket without descriptors would get here; never in practice.
                    let json = serde_json::to_string(&base64::engine::general_purpose::STANDARD.encode(&message))
                        .expect("a string serialises");
                    encode_server_record(call, JsonServerKind::Message(&json))
                }
                Kind::JsonMessage(json) => encode_server_record(call, JsonServerKind::Message(&json)),
                Kind::Status(status) => encode_server_record(call, JsonServerKind::Status(&status)),
                Kind::Window(window) => encode_server_record(call, JsonServerKind::Window(window)),
                Kind::GoAway(goaway) => encode_server_record(call, JsonServerKind::GoAway(&goaway)),
            }
            .as_bytes(),
        ),
    }
}

/// The request stream the backend reads: messages from the socket, framed
/// for gRPC, ending at the client's `closeSend`.
struct RequestBody {
    requests: mpsc::UnboundedReceiver<Payload>,
    /// Resolves when the call has ended (or is aborted): the body then ends,
    /// and with the response already dropped the backend's stream is reset.
    ended: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    input: Option<MessageDescriptor>,
    budget: Budget,
    gauge: Arc<CallGauge>,
    abort: Abort,
    call: u32,
    encoding: Encoding,
    control: mpsc::UnboundedSender<Out>,
    /// Messages handed to the backend.
    consumed: u64,
    /// Request credit given: the first window plus every grant.
    granted: u64,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        // The end of the request stream, not an error: hyper resets a stream
        // whose body fails with INTERNAL_ERROR, while a stream both of whose
        // halves are dropped is reset with CANCEL, which is what this is.
        let ended = || Poll::Ready(None);
        if this.abort.token.is_cancelled() {
            return ended();
        }
        let first = match this.requests.poll_recv(cx) {
            Poll::Ready(Some(first)) => first,
            Poll::Ready(None) => return Poll::Ready(None),
            // Only an idle body waits for the end (registering costs a lock).
            Poll::Pending if this.ended.as_mut().poll(cx).is_ready() => return ended(),
            Poll::Pending => return Poll::Pending,
        };
        // Every message already queued goes in one frame (up to 64 KiB): one
        // poll of the backend for many messages.
        let mut framed = BytesMut::new();
        let mut next = Some(first);
        while let Some(payload) = next {
            let message = match this.take(payload) {
                Ok(message) => message,
                Err(status) => return Poll::Ready(Some(Err(status))),
            };
            framed.reserve(5 + message.len());
            framed.put_u8(0);
            framed.put_u32(message.len() as u32);
            framed.put_slice(&message);
            if framed.len() >= 64 * 1024 {
                break;
            }
            next = this.requests.try_recv().ok();
        }
        Poll::Ready(Some(Ok(Frame::data(framed.freeze()))))
    }
}

impl RequestBody {
    /// One request message handed to the backend: its bytes leave the
    /// socket's budget, it is checked or transcoded, and it counts towards
    /// the next grant of request credit.
    fn take(&mut self, payload: Payload) -> Result<Bytes, Status> {
        self.budget.give_back(payload.len());
        self.gauge.consumed(payload.len());
        let message = match payload {
            Payload::Proto(bytes) => match &self.input {
                Some(input) if !decodes_as(input, &bytes, 0) => {
                    let status =
                        Status::invalid_argument(format!("message is not a valid {} in protobuf", input.full_name()));
                    self.abort.abort(status.clone());
                    return Err(status);
                }
                _ => bytes,
            },
            Payload::Json(text) => match &self.input {
                Some(input) => match from_json(input, text.as_bytes()) {
                    Ok(bytes) => Bytes::from(bytes),
                    Err(status) => {
                        self.abort.abort(status.clone());
                        return Err(status);
                    }
                },
                None => Bytes::from(text),
            },
        };
        self.consumed += 1;
        // Top the credit up once half of it is used up.
        let left = self.granted - self.consumed;
        if left <= REQUEST_CREDIT / 2 {
            let grant = REQUEST_CREDIT - left;
            self.granted += grant;
            let record = encode(self.encoding, self.call, Kind::Window(grant as u32));
            let _ = self.control.send(Out::Grant {
                call: self.call,
                amount: grant as u32,
                record,
            });
        }
        Ok(message)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Messages never consumed give their bytes back to the socket.
        self.requests.close();
        while let Ok(payload) = self.requests.try_recv() {
            self.budget.give_back(payload.len());
            self.gauge.consumed(payload.len());
        }
    }
}
