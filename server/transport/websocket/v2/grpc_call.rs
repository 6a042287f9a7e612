//! A v2 call answered by a gRPC request on the backend: an added tonic
//! service, the upstream, any method but the built-in plug-in's. The
//! bridge has no code per service: the call is the same request native gRPC
//! makes, on the same backend.
//!
//! The call has no task and no channel of its own. The socket polls it
//! ([`GrpcCall::poll`]) when its waker fires: the response future, then the
//! response body, whose messages become records in the socket's batch while
//! the client's response credit lasts. Out of credit, the call stops reading
//! its body, and the backend (tonic's stream, or the upstream's HTTP/2
//! stream window) stops producing: nothing piles up. Request messages wait
//! in the call's [`Inbox`] (empty, it allocates nothing) until the backend
//! reads the [`RequestBody`]: in process that happens while the socket polls
//! the response; for the upstream, in hyper's task for the stream, which is
//! why the inbox is behind a lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body::{Body as _, Frame};
use prost_reflect::{MessageDescriptor, MethodDescriptor};
use streambridge_protocol::grpc::{MessageError, MessageReader, each_message, put_message};
use streambridge_protocol::v2::{self, Encoding};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;
use tower::ServiceExt;

use super::batch::Batch;
use super::budget::Budget;
use super::records::{self, Kind, Request as Incoming, is_reserved, metadata_of};
use super::table::{CallWaker, REQUEST_WINDOW};
use crate::backend::descriptors::Catalog;
use crate::backend::transcode::{decodes_as, from_json, to_json};
use crate::backend::{ConnectionLost, GrpcService, ParkingLimit};
use crate::policy::auth::Authenticated;
use crate::transport::Transport;

/// What a call needs from its socket at `open`.
pub struct Opening {
    pub open: v2::Open,
    pub encoding: Encoding,
    pub backend: GrpcService,
    pub catalog: Catalog,
    pub budget: Budget,
    pub max_message_size: usize,
    pub waker: Arc<CallWaker>,
    /// When the call's `timeoutMs` passes, and the `timeoutMs` itself.
    pub deadline: Option<(Instant, u32)>,
    /// Who the call is from (its own token's, or its socket's, caller) and
    /// its client's address.
    pub who: Authenticated,
    /// The way the call came in (its metrics' label).
    pub transport: Transport,
    /// What the call's request credit is topped up to.
    pub request_credit: u16,
}

/// One live call on the backend, as the socket's call table holds it (boxed).
pub struct GrpcCall {
    inbox: Arc<Inbox>,
    waker: Arc<CallWaker>,
    /// `waker` as a [`Waker`], made once.
    wake: Waker,
    phase: Phase,
    /// Response messages the client takes before it grants more (saturates
    /// at 2^32-1).
    credit: u32,
    /// Set while the call waits without reading its response (for credit,
    /// or for a socket its client does not read).
    parked: Option<Parked>,
    deadline: Option<(Instant, u32)>,
}

#[expect(
    clippy::large_enum_variant,
    reason = "a call becomes Reading once it starts: boxing it would add an allocation, not save memory"
)]
enum Phase {
    /// Describing the method, then waiting for the response's headers.
    Starting(Pin<Box<dyn Future<Output = Result<Reading, Status>> + Send>>),
    Reading(Reading),
}

/// A response being read.
struct Reading {
    /// Response metadata, until its `headers` record is written.
    headers: Option<HeaderMap>,
    body: tonic::body::Body,
    messages: MessageReader,
    /// The reply's descriptor, for a json socket.
    output: Option<MessageDescriptor>,
    /// See [`ConnectionLost`]: watched while the call does not read.
    connection: Option<ConnectionLost>,
    /// See [`ParkingLimit`].
    parking: Option<ParkingLimit>,
}

/// A call waiting without reading: its place under the backend's
/// [`ParkingLimit`], and (waiting for credit) a watch on its connection.
struct Parked {
    _place: Option<OwnedSemaphorePermit>,
    lost: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

/// What one poll of a call did, for the socket.
pub struct Progress {
    /// Request credit granted (its `window` record is in the batch).
    pub granted: u32,
    /// The batch filled up: poll again once it is written.
    pub again: bool,
}

impl GrpcCall {
    pub fn new(opening: Opening, response_window: u32) -> GrpcCall {
        let Opening {
            open,
            encoding,
            backend,
            catalog,
            budget,
            max_message_size,
            waker,
            deadline,
            who,
            transport,
            request_credit,
        } = opening;
        let inbox = Arc::new(Inbox {
            budget,
            state: Mutex::new(InboxState {
                framed: BytesMut::new(),
                held: 0,
                closed: false,
                ended: false,
                reader: None,
                grant: 0,
                failed: None,
                call: Waker::from(waker.clone()),
            }),
        });
        let start = start(
            open,
            encoding,
            backend,
            catalog,
            inbox.clone(),
            max_message_size,
            (who, transport, request_credit),
        );
        GrpcCall {
            inbox,
            wake: Waker::from(waker.clone()),
            waker,
            phase: Phase::Starting(Box::pin(start)),
            credit: response_window,
            parked: None,
            deadline,
        }
    }

    pub fn deadline(&self) -> Option<(Instant, u32)> {
        self.deadline
    }

    /// A request message: it waits in the inbox, its bytes taken from the
    /// socket's budget, until the backend reads it.
    pub fn receive(&mut self, request: Incoming<'_>) {
        self.inbox.push(request.as_bytes());
    }

    /// The client's `closeSend`: the request body ends once the backend has
    /// read what came before.
    pub fn close_send(&mut self) {
        self.inbox.close();
    }

    pub fn add_credit(&mut self, credit: u32) {
        self.credit = self.credit.saturating_add(credit);
    }

    /// Whether the socket may read past a full budget for this call: it
    /// holds none of it, or it waits for response credit (which only a
    /// record the socket has not read yet can give).
    pub fn lets_socket_read(&self) -> bool {
        (self.credit == 0 && self.parked.is_some()) || self.inbox.lock().held == 0
    }

    /// Drives the call as far as it goes now, writing its records into
    /// `batch`. `Err` is its end (OK included): the status to write.
    pub fn poll(&mut self, call: u32, batch: &mut Batch) -> Result<Progress, Status> {
        self.waker.polling();
        let mut cx = Context::from_waker(&self.wake);
        let mut progress = Progress {
            granted: self.inbox.news()?,
            again: false,
        };
        if progress.granted > 0 {
            batch.record(call, Kind::Window(progress.granted));
        }
        if let Phase::Starting(start) = &mut self.phase {
            let Poll::Ready(reading) = start.as_mut().poll(&mut cx) else {
                return Ok(progress);
            };
            self.phase = Phase::Reading(reading?);
        }
        let Phase::Reading(reading) = &mut self.phase else {
            unreachable!("the call has started")
        };
        if let Some(headers) = reading.headers.take() {
            let metadata = metadata_of(&headers);
            if !metadata.is_empty() {
                batch.record(call, Kind::Headers(metadata));
            }
        }
        loop {
            while self.credit > 0 {
                let Some(message) = reading.messages.next_message().map_err(response_error)? else {
                    break;
                };
                // Credit that reached 2^32-1 is without limit (as on the built-in plug-in).
                if self.credit != u32::MAX {
                    self.credit -= 1;
                }
                match &reading.output {
                    Some(output) => batch.record(call, Kind::JsonMessage(to_json(output, message)?)),
                    None => {
                        let encoding = batch.encoding;
                        batch.append(|out| records::append_message(encoding, call, message, out));
                    }
                }
                if batch.is_full() {
                    progress.again = true;
                    return Ok(progress);
                }
            }
            // A refused message ends the call now, credit or not.
            if self.credit == 0 && reading.messages.ready().map_err(response_error)? {
                let parked = match &mut self.parked {
                    Some(parked) => parked,
                    None => self.parked.insert(Parked {
                        _place: ParkingLimit::park_in(reading.parking.as_ref())?,
                        lost: reading.connection.as_ref().map(|c| Box::pin(c.watch())),
                    }),
                };
                if let (Some(lost), Some(connection)) = (&mut parked.lost, &reading.connection)
                    && lost.as_mut().poll(&mut cx).is_ready()
                {
                    return Err(connection.status());
                }
                return Ok(progress);
            }
            self.parked = None;
            let frame = match Pin::new(&mut reading.body).poll_frame(&mut cx) {
                Poll::Pending => return Ok(progress),
                Poll::Ready(None) => return Err(Status::internal("the response ended without a gRPC status")),
                Poll::Ready(Some(frame)) => frame?,
            };
            match frame.into_data() {
                Ok(data) => reading.messages.push(data),
                Err(frame) => {
                    return Err(match frame.into_trailers() {
                        Ok(trailers) => status_in(&trailers)
                            .unwrap_or_else(|| Status::internal("the response's trailers carry no gRPC status")),
                        Err(_) => Status::internal("the response sent an unknown frame"),
                    });
                }
            }
        }
    }

    /// The socket cannot write (its client is not reading it) and the call
    /// has news, most likely replies it would read: it stops reading them,
    /// which costs others where the backend set a [`ParkingLimit`], so it
    /// takes a place first (or ends, `Err`).
    pub fn park_while_blocked(&mut self) -> Result<(), Status> {
        if let (Phase::Reading(reading), None) = (&self.phase, &self.parked) {
            self.parked = Some(Parked {
                _place: ParkingLimit::park_in(reading.parking.as_ref())?,
                lost: None,
            });
        }
        Ok(())
    }
}

impl Drop for GrpcCall {
    fn drop(&mut self) {
        // The request body may live on in the backend's hands (hyper pipes
        // it to the upstream): end it now, so that with the response dropped
        // too the backend's stream is reset at once.
        self.inbox.end();
    }
}

/// The status of a response message the bridge cannot pass on.
fn response_error(error: MessageError) -> Status {
    match error {
        MessageError::Compressed => {
            Status::internal("the service sent a compressed message; the bridge does not decompress")
        }
        MessageError::TooLarge { length, limit } => Status::resource_exhausted(format!(
            "the service sent a message of {length} bytes; the limit (--max-message-size) is {limit}"
        )),
    }
}

/// How a call starts: the method's descriptors (json needs them; proto uses
/// them, when there are any, to check requests), then the request on the
/// backend, up to the response's headers.
async fn start(
    open: v2::Open,
    encoding: Encoding,
    backend: GrpcService,
    catalog: Catalog,
    inbox: Arc<Inbox>,
    max_message_size: usize,
    (who, transport, request_credit): (Authenticated, Transport, u16),
) -> Result<Reading, Status> {
    let method = match (encoding, catalog.method(&open.method).await) {
        (_, Ok(method)) => Some(method),
        (Encoding::Json, Err(status)) => return Err(status),
        (Encoding::Proto, Err(_)) => None,
    };
    let body = RequestBody {
        inbox,
        encoding,
        input: method.as_ref().map(MethodDescriptor::input),
        consumed: 0,
        granted: REQUEST_WINDOW,
        credit: u64::from(request_credit),
    };
    let mut request = build_request(&open)?.map(|()| tonic::body::Body::new(body));
    // The socket's upgrade (or the call's own token) was checked.
    request.extensions_mut().insert(who);
    request.extensions_mut().insert(transport);
    let Ok(response) = backend.oneshot(request).await;
    let (parts, body) = response.into_parts();
    if let Some(status) = status_in(&parts.headers) {
        return Err(status);
    }
    Ok(Reading {
        headers: Some(parts.headers),
        body,
        messages: MessageReader::new(max_message_size),
        output: method
            .as_ref()
            .filter(|_| encoding == Encoding::Json)
            .map(MethodDescriptor::output),
        connection: parts.extensions.get::<ConnectionLost>().cloned(),
        parking: parts.extensions.get::<ParkingLimit>().cloned(),
    })
}

/// Request messages between the socket and the backend.
struct Inbox {
    budget: Budget,
    state: Mutex<InboxState>,
}

struct InboxState {
    /// Received, not yet read by the backend, in order, each with its gRPC
    /// prefix (json as it came: the body transcodes it). One buffer, not a
    /// queue of messages: a message costs no allocation of its own, and
    /// the body takes them all as one frame. Empty, it allocates nothing.
    framed: BytesMut,
    /// Their bytes, prefixes left out (as the socket's budget counts them).
    held: usize,
    /// `closeSend`: the body ends once the queue is empty.
    closed: bool,
    /// The call ended: the body ends now.
    ended: bool,
    /// The body, waiting for a message.
    reader: Option<Waker>,
    /// Request credit granted by the body, not yet written by the socket.
    grant: u32,
    /// A request that did not decode: the call's end.
    failed: Option<Box<Status>>,
    /// Wakes the call on its socket (for a grant or a failure).
    call: Waker,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        // Nothing panics while holding it; a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A request message, copied in (the socket's message it came in is
    /// not kept: see `records::Request::detached`).
    fn push(&self, message: &[u8]) {
        let mut state = self.lock();
        if state.ended {
            return;
        }
        self.budget.take(message.len());
        state.held += message.len();
        put_message(&mut state.framed, message);
        let reader = state.reader.take();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    fn close(&self) {
        let reader = {
            let mut state = self.lock();
            state.closed = true;
            state.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// Ends the body; what it never read gives its bytes back.
    fn end(&self) {
        let (held, reader) = {
            let mut state = self.lock();
            state.ended = true;
            state.framed = BytesMut::new();
            (std::mem::take(&mut state.held), state.reader.take())
        };
        self.budget.give_back(held);
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// For the socket: request credit granted since it last asked, or the
    /// request that ended the call.
    fn news(&self) -> Result<u32, Status> {
        let mut state = self.lock();
        if let Some(failed) = state.failed.take() {
            return Err(*failed);
        }
        Ok(std::mem::take(&mut state.grant))
    }

    /// For the body: every message waiting, framed (`None` at the end of
    /// the stream); their bytes are given back to the socket's budget.
    fn take(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut state = self.lock();
        if state.ended || (state.framed.is_empty() && state.closed) {
            return Poll::Ready(None);
        }
        if state.framed.is_empty() {
            if !state.reader.as_ref().is_some_and(|reader| reader.will_wake(cx.waker())) {
                state.reader = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let held = std::mem::take(&mut state.held);
        let framed = state.framed.split().freeze();
        drop(state);
        self.budget.give_back(held);
        Poll::Ready(Some(framed))
    }

    /// For the body: tells the socket what it granted or why it failed.
    fn tell(&self, grant: u32, failed: Option<Status>) {
        let call = {
            let mut state = self.lock();
            state.grant += grant;
            if state.failed.is_none() {
                state.failed = failed.map(Box::new);
            }
            state.call.clone()
        };
        call.wake();
    }
}

/// The request stream the backend reads: the inbox's messages, framed for
/// gRPC, ending at the client's `closeSend` (or the call's end).
struct RequestBody {
    inbox: Arc<Inbox>,
    /// The socket's: json messages are transcoded.
    encoding: Encoding,
    /// The request's descriptor: json is transcoded, proto checked.
    input: Option<MessageDescriptor>,
    /// Messages handed to the backend.
    consumed: u64,
    /// Request credit given: the first window plus every grant.
    granted: u64,
    /// What the credit is topped up to.
    credit: u64,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        // The end is the end of the request stream, not an error: hyper
        // resets a stream whose body fails with INTERNAL_ERROR, while a
        // stream both of whose halves are dropped is reset with CANCEL.
        let Some(framed) = std::task::ready!(this.inbox.take(cx)) else {
            return Poll::Ready(None);
        };
        // Every message waiting goes in one frame: one poll of the backend
        // for many messages.
        let checked = match (this.encoding, &this.input) {
            (Encoding::Json, Some(input)) => transcoded(input, &framed).map(|(out, n)| (out.freeze(), n)),
            (Encoding::Proto, Some(input)) => checked(input, &framed).map(|n| (framed, n)),
            (_, None) => {
                let n = each_message(&framed).count();
                Ok((framed, n))
            }
        };
        match checked {
            Ok((frame, messages)) => {
                if let Some(grant) = this.consumed(messages) {
                    this.inbox.tell(grant, None);
                }
                Poll::Ready(Some(Ok(Frame::data(frame))))
            }
            Err((status, messages)) => {
                let grant = this.consumed(messages).unwrap_or(0);
                this.inbox.tell(grant, Some(status.clone()));
                Poll::Ready(Some(Err(status)))
            }
        }
    }
}

impl RequestBody {
    /// Counts `messages` handed to the backend; the request credit to grant
    /// (once half of it is used up, it is topped up), if any.
    fn consumed(&mut self, messages: usize) -> Option<u32> {
        self.consumed += messages as u64;
        let left = self.granted.saturating_sub(self.consumed);
        if left > self.credit / 2 {
            return None;
        }
        let more = self.credit - left;
        self.granted += more;
        Some(more as u32)
    }
}

/// Checks each proto message of `framed` against the method's request
/// type: how many there are, or the status and how many passed before it.
fn checked(input: &MessageDescriptor, framed: &[u8]) -> Result<usize, (Status, usize)> {
    let mut count = 0;
    for message in each_message(framed) {
        if !decodes_as(input, message, 0) {
            let status = Status::invalid_argument(format!("message is not a valid {} in protobuf", input.full_name()));
            return Err((status, count));
        }
        count += 1;
    }
    Ok(count)
}

/// Each json message of `framed` transcoded to protobuf, framed again, and
/// how many there are; or the status and how many passed before it.
fn transcoded(input: &MessageDescriptor, framed: &[u8]) -> Result<(BytesMut, usize), (Status, usize)> {
    let mut out = BytesMut::with_capacity(framed.len());
    let mut count = 0;
    for text in each_message(framed) {
        let message = from_json(input, text).map_err(|status| (status, count))?;
        put_message(&mut out, &message);
        count += 1;
    }
    Ok((out, count))
}

/// The gRPC request for `open`: the method's path, its metadata, its
/// deadline.
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

/// The gRPC status in `headers` (trailers, or the headers of a
/// trailers-only response), if there is one.
fn status_in(headers: &HeaderMap) -> Option<Status> {
    headers.get("grpc-status")?;
    Some(Status::from_header_map(headers).unwrap_or_else(|| Status::unknown("unreadable grpc-status")))
}
