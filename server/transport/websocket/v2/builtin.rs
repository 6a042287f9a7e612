//! Calls to the built-in `DataService`, answered on the socket's own task.
//!
//! The generic plug-in ([`super::grpc_call`]) makes each call a gRPC
//! request on the backend: tonic's routing and codec, gRPC framing both ways
//! and, for JSON, transcoding through the method's descriptors. For the
//! built-in service none of that buys anything: the socket hands each
//! request straight to the [processor](crate::backend::processor), as
//! protocol v1 does. A call is then a few words in the socket's call table (an idle one
//! holds no task, no channel, no buffer) and a message costs its decode, the
//! reply and its encode.
//!
//! The rules are the protocol's, the same on both paths: response credit
//! holds replies back (the requests wait, in order, counted against the
//! socket's byte budget), request credit is topped up as requests are
//! answered, every call ends with one `status`. `tests/websocket_v2.rs`
//! runs each rule through this path and through the generic one.

use std::borrow::Cow;
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use streambridge_protocol::v2::{self, Encoding};
use tokio::time::Instant;
use tonic::Status;

use super::batch::{Batch, Framing};
use super::budget::Budget;
use super::records::{Kind, Payload, Request};
use super::table::REQUEST_WINDOW;
use crate::backend::processor;
use crate::ops::calls::CallGuard;
use crate::ops::metrics::StreamMetrics;
use crate::ops::traces::Tally;
use crate::policy::limits::{MessageMeter, Paid};

/// The built-in method's path, as clients name it in `open`.
pub const METHOD: &str = "/DataService/BidirectionalStream";

/// One live call to the built-in service: a few words inline in the
/// socket's call table (what a message touches), the rest boxed. At a
/// steady rate every socket's calls have gone cold in the cache by the time
/// its next batch comes, so each cache line a message touches is a miss
/// (measured: the call table was most of the socket task's own time at v1's
/// message rate; docs/benchmarks.md).
pub struct BuiltinCall {
    /// Replies the client takes before it grants more (saturates at 2^32-1).
    credit: u32,
    /// Request credit given less requests answered: topped up to
    /// [`REQUEST_CREDIT`] when half of it is used up.
    request_left: u16,
    /// Grants made since the socket last asked (their `window` records are
    /// in the batch, not yet on the wire: the client cannot have used them).
    unsent_grants: u32,
    /// The client sent `closeSend`: the call ends once nothing waits.
    closed_send: bool,
    /// Requests wait in `rest.waiting` (for response credit, or for the
    /// caller's message bucket).
    queued: bool,
    /// Tokens the meter (in `rest`) took ahead (at most 32), spent here
    /// without touching `rest`.
    prepaid: u8,
    /// The caller's messages are limited: `rest.meter` pays for them.
    metered: bool,
    /// The call has a span: `rest.tally` counts its messages.
    traced: bool,
    rest: Box<Rest>,
}

/// What a message seldom touches.
struct Rest {
    /// Requests received and not yet answered, in order.
    waiting: VecDeque<Payload>,
    /// When the call's `timeoutMs` passes, and the `timeoutMs` itself.
    deadline: Option<(Instant, u32)>,
    /// Counts the call until it ends (its messages are counted by the socket).
    guard: CallGuard,
    /// Pays for each request from the caller's message bucket
    /// (`--limit-messages-per-second`; none without it).
    meter: Option<MessageMeter>,
    /// Counts the messages for the call's span (`--otlp-endpoint`).
    tally: Option<Arc<Tally>>,
}

impl BuiltinCall {
    pub fn new(
        response_window: u32,
        deadline: Option<(Instant, u32)>,
        guard: CallGuard,
        meter: Option<MessageMeter>,
    ) -> BuiltinCall {
        BuiltinCall {
            credit: response_window,
            request_left: REQUEST_WINDOW as u16,
            unsent_grants: 0,
            closed_send: false,
            queued: false,
            prepaid: 0,
            metered: meter.is_some(),
            traced: guard.span().is_some(),
            rest: Box::new(Rest {
                waiting: VecDeque::new(),
                deadline,
                tally: guard.span().map(|span| span.tally().clone()),
                guard,
                meter,
            }),
        }
    }

    pub fn deadline(&self) -> Option<(Instant, u32)> {
        self.rest.deadline
    }

    /// A request message: answered at once if nothing waits before it and
    /// the client has credit for the reply, else it waits, taken from the
    /// socket's budget until it is answered. An error is the call's end:
    /// its status record is for the caller to send.
    pub fn receive(&mut self, call: u32, request: Request<'_>, socket: &mut SocketSide<'_>) -> Result<(), Status> {
        if !self.queued && self.credit > 0 && self.pay(call, socket) {
            return self.answer(call, &request, socket);
        }
        self.wait(request.detached(), socket);
        Ok(())
    }

    /// A request already decoded by protocol v1's envelope (its `data`):
    /// the same as [`BuiltinCall::receive`], without reading it again.
    pub fn receive_data(&mut self, call: u32, data: &str, socket: &mut SocketSide<'_>) -> Result<(), Status> {
        if !self.queued && self.credit > 0 && self.pay(call, socket) {
            return self.answer_data(call, data, socket);
        }
        // On v1 (whose credit is without limit) only for the message bucket;
        // encoded as the request it is.
        let request = streambridge_protocol::StreamRequest { data: data.to_owned() };
        self.wait(Payload::Proto(prost::Message::encode_to_vec(&request).into()), socket);
        Ok(())
    }

    /// Queues a request until response credit comes, its bytes taken from
    /// the socket's budget.
    fn wait(&mut self, payload: Payload, socket: &mut SocketSide<'_>) {
        socket.budget.take(payload.len());
        self.rest.waiting.push_back(payload);
        self.queued = true;
    }

    pub fn close_send(&mut self) {
        self.closed_send = true;
    }

    pub fn add_credit(&mut self, credit: u32) {
        self.credit = self.credit.saturating_add(credit);
    }

    /// Whether the call holds no budget, or holds it only for want of
    /// response credit (see `LiveCall::lets_socket_read`).
    pub fn lets_socket_read(&self) -> bool {
        !self.queued || self.credit == 0
    }

    /// Pays for one request from the caller's message bucket; when it is
    /// empty, asks the socket to come back once it has refilled.
    fn pay(&mut self, call: u32, socket: &mut SocketSide<'_>) -> bool {
        if !self.metered {
            return true;
        }
        if self.prepaid > 0 {
            self.prepaid -= 1;
            return true;
        }
        let Some(meter) = &mut self.rest.meter else { return true };
        match meter.pay(1) {
            Paid::All => {
                self.prepaid = meter.take_prepaid().min(u32::from(u8::MAX)) as u8;
                true
            }
            Paid::Part { retry, .. } => {
                socket.paced.insert((retry, call));
                false
            }
        }
    }

    /// Answers waiting requests while the response credit and the
    /// caller's message bucket last.
    pub fn serve(&mut self, call: u32, socket: &mut SocketSide<'_>) -> Result<(), Status> {
        while self.queued && self.credit > 0 && self.pay(call, socket) {
            let Some(payload) = self.rest.waiting.pop_front() else {
                break;
            };
            self.queued = !self.rest.waiting.is_empty();
            socket.budget.give_back(payload.len());
            self.answer(call, &payload.as_request(), socket)?;
        }
        Ok(())
    }

    /// One reply, and a grant of request credit when it is due, into the batch.
    fn answer(&mut self, call: u32, request: &Request<'_>, socket: &mut SocketSide<'_>) -> Result<(), Status> {
        let data = request_data(request)?;
        self.answer_data(call, &data, socket)
    }

    fn answer_data(&mut self, call: u32, data: &str, socket: &mut SocketSide<'_>) -> Result<(), Status> {
        append_reply(call, data, socket.batch);
        if self.traced
            && let Some(tally) = &self.rest.tally
        {
            // As protobuf carries them (the span's bytes are the messages').
            tally.received(1, string_message_len(data.len()));
            tally.sent(1, string_message_len(processor::REPLY_PREFIX.len() + data.len()));
        }
        socket.messages.message_received();
        socket.messages.message_sent();
        // Credit that reached 2^32-1 is without limit: v1's call, and a v2
        // client that granted that much, never run out.
        if self.credit != u32::MAX {
            self.credit -= 1;
        }
        self.request_left -= 1;
        // Top the request credit up once half of it is used up (as the generic path does).
        if self.request_left <= socket.request_credit / 2 {
            let grant = socket.request_credit - self.request_left;
            self.request_left += grant;
            let grant = u32::from(grant);
            self.unsent_grants += grant;
            socket.batch.record(call, Kind::Window(grant));
        }
        Ok(())
    }

    /// The request credit granted since the last call, now that the batch
    /// carrying it is about to be written.
    pub fn take_unsent_grants(&mut self) -> u32 {
        std::mem::take(&mut self.unsent_grants)
    }

    /// Whether the call is done: the client closed its side and every
    /// request has its reply.
    pub fn is_done(&self) -> bool {
        self.closed_send && !self.queued
    }

    /// Whether the socket has to come back to the call once the incoming
    /// batch is applied: it granted request credit, or it is done.
    pub fn needs_settling(&self) -> bool {
        self.unsent_grants > 0 || self.is_done()
    }

    /// Ends the call with `status`: requests still waiting are dropped and
    /// give their bytes back.
    pub fn finish(mut self, status: &Status, budget: &Budget) {
        for payload in self.rest.waiting.drain(..) {
            budget.give_back(payload.len());
        }
        self.rest.guard.set_code(status.code() as i32);
    }
}

/// The encoded size of a message whose only field is a string of `len`
/// bytes (`StreamRequest`, `StreamResponse`).
fn string_message_len(len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    (1 + prost::encoding::encoded_len_varint(len as u64) + len) as u64
}

/// What a built-in call writes to and counts in: its socket's.
pub struct SocketSide<'a> {
    pub budget: &'a Budget,
    pub batch: &'a mut Batch,
    /// The socket's tally of its built-in calls' messages, published once
    /// per incoming batch (one per call would touch each call's own
    /// counters: more cache lines per message).
    pub messages: &'a StreamMetrics,
    /// When calls held back by their message bucket may go on.
    pub paced: &'a mut BTreeSet<(Instant, u32)>,
    /// What each call's request credit is topped up to.
    pub request_credit: u16,
}

/// A request's `data`, read in place; an error if the request does not
/// decode.
fn request_data<'a>(request: &'a Request<'_>) -> Result<Cow<'a, str>, Status> {
    match request {
        Request::Proto(bytes) => Ok(Cow::Borrowed(
            streambridge_protocol::stream_request_data(bytes).map_err(|e| {
                Status::invalid_argument(format!("message is not a valid StreamRequest in protobuf: {e}"))
            })?,
        )),
        Request::Json(text) => json_data(text),
    }
}

/// The processor's reply to `data`, as a `message` record of `call` in the
/// batch (a v1 `response` frame on v1). Written straight from the
/// request's bytes: neither the request's `data` nor the reply's `result`
/// gets a `String` of its own.
fn append_reply(call: u32, data: &str, batch: &mut Batch) {
    let pieces = processor::result_pieces(data);
    match (batch.framing, batch.encoding) {
        (Framing::Records, Encoding::Proto) => {
            batch.append(|out| v2::append_stream_response_record(call, &pieces, out));
        }
        (Framing::Records, Encoding::Json) => {
            batch.append(|out| v2::json::append_message_record(call, out, |out| append_reply_json(&pieces, out)));
        }
        (Framing::V1, Encoding::Proto) => {
            batch.append(|out| streambridge_protocol::proto::append_response_frame(&pieces, out));
        }
        (Framing::V1, Encoding::Json) => {
            let mut frame = String::with_capacity(32 + pieces.iter().map(|piece| piece.len()).sum::<usize>());
            frame.push_str(r#"{"response":"#);
            write_reply_json(&pieces, |text| frame.push_str(text));
            frame.push('}');
            batch.append_text(frame);
        }
    }
}

/// A `StreamRequest`'s `data`, from the request's proto3 JSON.
fn json_data(text: &str) -> Result<Cow<'_, str>, Status> {
    // The form clients write, `{"data":"…"}` with nothing escaped, needs no
    // parser: its value is the text between the quotes (the batch decoder
    // has just scanned this text once; the second full parse was ~5 % of
    // the server's time at v1's message rate). Anything else is parsed.
    if let Some(data) = text
        .strip_prefix(r#"{"data":""#)
        .and_then(|rest| rest.strip_suffix(r#""}"#))
        && is_plain_json_string(data)
    {
        return Ok(Cow::Borrowed(data));
    }
    parse_json_data(text)
}

/// [`json_data`], always with the parser.
fn parse_json_data(text: &str) -> Result<Cow<'_, str>, Status> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer
        .deserialize_map(RequestVisitor)
        .and_then(|data| deserializer.end().map(|()| data))
        .map_err(|e| Status::invalid_argument(format!("message is not a valid StreamRequest in JSON: {e}")))
}

/// `StreamRequest` in proto3 JSON: an object whose `data` is a string or
/// null (the default); other fields are ignored, as the generic path's
/// transcoder does. Written out rather than derived so that only an object
/// is accepted (serde's derive would take an array too), and so that `data`
/// is borrowed from the text when it has no escapes.
struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    /// The request's `data`.
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a StreamRequest object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cow<'de, str>, A::Error> {
        let mut data = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Data if data.is_some() => return Err(de::Error::duplicate_field("data")),
                Field::Data => data = Some(map.next_value_seed(DataSeed)?),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(data.unwrap_or_default())
    }
}

/// The value of `data`: a string, borrowed where it can be, or null ("").
struct DataSeed;

impl<'de> DeserializeSeed<'de> for DataSeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Cow<'de, str>, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for DataSeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(""))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Cow<'de, str>, D::Error> {
        deserializer.deserialize_str(self)
    }

    fn visit_borrowed_str<E: de::Error>(self, data: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(data))
    }

    fn visit_str<E: de::Error>(self, data: &str) -> Result<Cow<'de, str>, E> {
        // Unescaped into a scratch buffer: this one has to be copied.
        Ok(Cow::Owned(data.to_owned()))
    }
}

/// A key of a `StreamRequest` object, read without allocating.
#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Data,
    #[serde(other)]
    Other,
}

/// Whether `text`, put between quotes, is a JSON string whose value is
/// `text` itself: JSON escapes only `"`, `\` and control characters.
/// (Checked 64 bytes at a time without a branch per byte, a shape the
/// compiler can vectorise: it runs over every reply.)
fn is_plain_json_string(text: &str) -> bool {
    text.as_bytes().chunks(64).all(|chunk| {
        chunk
            .iter()
            .fold(true, |plain, &b| plain & (b >= 0x20) & (b != b'"') & (b != b'\\'))
    })
}

/// `StreamResponse { result }` in proto3 JSON, `result` being `pieces`
/// joined, appended to `out`.
fn append_reply_json(pieces: &[&str], out: &mut Vec<u8>) {
    write_reply_json(pieces, |text| out.extend_from_slice(text.as_bytes()));
}

/// [`append_reply_json`], written through `write` (into bytes, or a `String`).
fn write_reply_json(pieces: &[&str], mut write: impl FnMut(&str)) {
    // Text with nothing to escape (the usual reply) is copied as it is.
    if pieces.iter().all(|piece| is_plain_json_string(piece)) {
        write(r#"{"result":""#);
        for piece in pieces {
            write(piece);
        }
        write(r#""}"#);
    } else {
        write(r#"{"result":"#);
        write(&serde_json::to_string(&pieces.concat()).expect("a string serialises"));
        write("}");
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn json(text: &str) -> Result<String, String> {
        json_data(text)
            .map(Cow::into_owned)
            .map_err(|s| s.message().to_string())
    }

    #[test]
    fn a_request_that_waits_holds_its_own_bytes_not_its_whole_message() {
        use crate::ops::calls::ActiveCalls;
        use crate::transport::Transport;

        let calls = ActiveCalls::default();
        let budget = Budget::new(1 << 20);
        let mut batch = Batch::new(v2::Encoding::Proto, Framing::Records);
        let messages = calls.metrics().message_counters(Transport::WebSocket);
        let mut paced = BTreeSet::new();
        let mut socket = SocketSide {
            budget: &budget,
            batch: &mut batch,
            messages: &messages,
            paced: &mut paced,
            request_credit: crate::transport::websocket::v2::table::REQUEST_CREDIT,
        };
        // No response credit: the request has to wait.
        let mut call = BuiltinCall::new(0, None, calls.enter(Transport::WebSocket), None);
        let request = streambridge_protocol::StreamRequest { data: "hi".into() }.encode_to_vec();
        let mut whole = vec![0u8; 1 << 20];
        whole[..request.len()].copy_from_slice(&request);
        let whole = bytes::Bytes::from(whole);
        call.receive(1, Request::Proto(whole.slice(..request.len())), &mut socket)
            .unwrap();
        assert_eq!(budget.held(), request.len());
        let Some(Payload::Proto(waiting)) = call.rest.waiting.front() else {
            panic!("the request waits")
        };
        assert_eq!(waiting[..], request[..]);
        let inside = whole.as_ptr_range();
        assert!(
            !inside.contains(&waiting.as_ptr()),
            "a view would keep the 1 MiB message alive"
        );
        call.finish(&Status::cancelled(""), &budget);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn json_requests_follow_proto3_json() {
        assert_eq!(json(r#"{"data":"hi"}"#), Ok("hi".into()));
        assert_eq!(json(r#"{"data":"\u00fc\n"}"#), Ok("ü\n".into()));
        assert_eq!(json(r#"{"data":null}"#), Ok(String::new()));
        assert_eq!(json(r#"{}"#), Ok(String::new()));
        assert_eq!(json(r#"{"other":[1,{"x":2}],"data":"a"}"#), Ok("a".into()));
        for bad in [
            r#"{"data":5}"#,
            r#"["a"]"#,
            r#""a""#,
            r#"{"data":"a","data":"b"}"#,
            r#"{"data":"a"} x"#,
            r#"{"data":"\ud800"}"#,
        ] {
            assert!(json(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_v1_reply_is_the_frame_v1s_own_encoder_writes() {
        use streambridge_protocol::{StreamResponse, json, proto, server_frame};
        for data in ["hi", "", "\"q\"", "ü\n"] {
            let expected = server_frame::Frame::Response(StreamResponse {
                result: format!("processed: {data}"),
            });
            for encoding in [Encoding::Json, Encoding::Proto] {
                let mut batch = Batch::new(encoding, Framing::V1);
                append_reply(1, data, &mut batch);
                let frames: Vec<_> = batch.take().collect();
                assert_eq!(frames.len(), 1, "one frame per reply");
                let frame = frames.into_iter().next().unwrap().into_data();
                let written = match encoding {
                    Encoding::Json => json::encode_server_frame(&expected).into_bytes(),
                    Encoding::Proto => proto::encode_server_frame(expected.clone()),
                };
                assert_eq!(&frame[..], &written[..], "{encoding:?} {data:?}");
            }
        }
    }

    #[test]
    fn replies_are_escaped_json() {
        for data in [
            "hi",
            "",
            "\"q\"",
            "back\\slash",
            "line\n",
            "\u{1}",
            "\u{7f}",
            "ü 💡",
            "</script>",
        ] {
            let mut out = Vec::new();
            append_reply_json(&processor::result_pieces(data), &mut out);
            let result = format!("processed: {data}");
            let reply: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(reply, serde_json::json!({ "result": result }), "{data:?}");
            // Byte for byte what serde writes.
            assert_eq!(
                out,
                serde_json::to_vec(&serde_json::json!({ "result": result })).unwrap()
            );
        }
    }

    #[test]
    fn the_shortcut_for_plain_requests_reads_what_the_parser_reads() {
        for text in [
            r#"{"data":"hi"}"#,
            r#"{"data":""}"#,
            r#"{"data":"ü 💡 </x>"}"#,
            r#"{"data":"a\"b"}"#,
            r#"{"data":"a\\b"}"#,
            r#"{"data":"a\u0062"}"#,
            "{\"data\":\"tab\there\"}",
            r#"{"data":"a","data":"b"}"#,
            r#"{"data":"a"}"}"#,
            r#"{"data":"x", "other":1}"#,
            r#"{ "data":"spaced" }"#,
            r#"{"data":5}"#,
        ] {
            let shortcut = json_data(text).map_err(|s| s.message().to_string());
            let parsed = parse_json_data(text).map_err(|s| s.message().to_string());
            assert_eq!(shortcut, parsed, "{text}");
        }
    }

    #[test]
    fn data_without_escapes_is_borrowed_from_the_request() {
        assert!(matches!(json_data(r#"{"data":"hi"}"#), Ok(Cow::Borrowed("hi"))));
        assert!(matches!(json_data(r#"{"data":"h\u0069"}"#), Ok(Cow::Owned(data)) if data == "hi"));
    }
}
