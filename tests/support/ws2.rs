//! A WebSocket protocol v2 test client written from the spec
//! (docs/websocket-protocol.md): records built by hand in both encodings,
//! JSON with serde_json, proto with the generated types, and decoded
//! without the server's codec.

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::{Value, json};
use streambridge_protocol::v2::{ClientBatch, ClientRecord, Empty, Open, ServerBatch, client_record, server_record};
use streambridge_protocol::{StreamRequest, StreamResponse};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::http_session::HttpLink;
use super::ws::Socket;
use super::{ServerAddr, within};

/// The encoding a test speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enc {
    Json,
    Proto,
}

impl Enc {
    pub const BOTH: [Enc; 2] = [Enc::Json, Enc::Proto];

    pub fn name(self) -> &'static str {
        match self {
            Enc::Json => "streambridge.v2.json",
            Enc::Proto => "streambridge.v2.proto",
        }
    }
}

pub const BIDI: &str = "/DataService/BidirectionalStream";

/// A record from the client.
#[derive(Clone, Debug)]
pub enum Rec {
    Open {
        call: u32,
        method: String,
        window: u32,
        timeout_ms: u32,
    },
    /// A `StreamRequest` (json: `{"data": ...}`).
    Data {
        call: u32,
        data: String,
    },
    /// A message given as raw JSON text (json) or raw bytes (proto).
    Raw {
        call: u32,
        json: String,
        proto: Vec<u8>,
    },
    CloseSend {
        call: u32,
    },
    Cancel {
        call: u32,
    },
    Window {
        call: u32,
        n: u32,
    },
}

pub fn open(call: u32) -> Rec {
    Rec::Open {
        call,
        method: BIDI.into(),
        window: 0,
        timeout_ms: 0,
    }
}

/// `open` for the built-in bidi method with `window` response credit.
pub fn open_windowed(call: u32, window: u32) -> Rec {
    Rec::Open {
        call,
        method: BIDI.into(),
        window,
        timeout_ms: 0,
    }
}

pub fn data(call: u32, data: &str) -> Rec {
    Rec::Data {
        call,
        data: data.into(),
    }
}

pub fn close_send(call: u32) -> Rec {
    Rec::CloseSend { call }
}

/// What the server sent, decoded by hand.
#[derive(Clone, Debug, PartialEq)]
pub enum Got {
    Headers(u32),
    /// A message's first string field (`StreamResponse.result`, `EchoReply.text`).
    Message(u32, String),
    Status(u32, i32, String),
    Window(u32, u32),
    GoAway(String),
}

impl Got {
    pub fn call(&self) -> u32 {
        match self {
            Got::Headers(c) | Got::Message(c, _) | Got::Status(c, _, _) | Got::Window(c, _) => *c,
            Got::GoAway(_) => 0,
        }
    }
}

/// The way a [`V2`] client reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    WebSocket,
    Http,
}

impl Via {
    pub const BOTH: [Via; 2] = [Via::WebSocket, Via::Http];
}

/// Every encoding over every way in.
pub fn every_way() -> impl Iterator<Item = (Enc, Via)> {
    Enc::BOTH
        .into_iter()
        .flat_map(|enc| Via::BOTH.into_iter().map(move |via| (enc, via)))
}

enum Link {
    WebSocket(Box<Socket>),
    Http(Box<HttpLink>),
    /// One WebTransport stream: one call (docs/protocol-v2.md §12).
    WebTransport(Box<super::webtransport::WtStream>),
}

pub struct V2 {
    link: Link,
    pub enc: Enc,
    /// Records read but not yet taken (the rest of a batch).
    pending: std::collections::VecDeque<Got>,
    /// The close code and reason, once the server closed.
    pub closed: Option<(u16, String)>,
}

impl V2 {
    pub async fn connect(server: &impl ServerAddr, enc: Enc) -> V2 {
        let mut request = server.ws_url().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", enc.name().parse().unwrap());
        let (socket, response) = within("v2 connect", tokio_tungstenite::connect_async(request))
            .await
            .expect("upgrade");
        assert_eq!(response.headers()["sec-websocket-protocol"], enc.name());
        V2 {
            link: Link::WebSocket(Box::new(socket)),
            enc,
            pending: Default::default(),
            closed: None,
        }
    }

    /// A session of the HTTP binding instead of a WebSocket.
    pub async fn connect_http(server: &impl ServerAddr, enc: Enc) -> V2 {
        let link = super::http_session::open(server, enc.name(), &[])
            .await
            .unwrap_or_else(|(status, body)| panic!("session refused: {status} {body}"));
        V2 {
            link: Link::Http(Box::new(link)),
            enc,
            pending: Default::default(),
            closed: None,
        }
    }

    /// A call's stream of a WebTransport session (which carries one call).
    pub fn on_stream(stream: super::webtransport::WtStream, enc: Enc) -> V2 {
        V2 {
            link: Link::WebTransport(Box::new(stream)),
            enc,
            pending: Default::default(),
            closed: None,
        }
    }

    /// The WebTransport stream itself, to reset it.
    pub fn into_stream(self) -> Option<super::webtransport::WtStream> {
        match self.link {
            Link::WebTransport(stream) => Some(*stream),
            _ => None,
        }
    }

    /// The WebTransport stream, for tests of its framing.
    pub fn stream(&mut self) -> &mut super::webtransport::WtStream {
        match &mut self.link {
            Link::WebTransport(stream) => stream,
            _ => panic!("a WebTransport test on another transport"),
        }
    }

    /// Connects over `via`.
    pub async fn connect_via(server: &impl ServerAddr, enc: Enc, via: Via) -> V2 {
        match via {
            Via::WebSocket => V2::connect(server, enc).await,
            Via::Http => V2::connect_http(server, enc).await,
        }
    }

    /// The WebSocket, for tests of WebSocket framing.
    pub fn ws(&mut self) -> &mut Socket {
        match &mut self.link {
            Link::WebSocket(socket) => socket,
            _ => panic!("a WebSocket test on another transport"),
        }
    }

    /// The HTTP session, for tests of the HTTP binding.
    pub fn http(&mut self) -> &mut HttpLink {
        match &mut self.link {
            Link::Http(link) => link,
            _ => panic!("an HTTP binding test on another transport"),
        }
    }

    /// Sends `records` as one WebSocket message or one POST.
    pub async fn send(&mut self, records: &[Rec]) {
        let message = self.encode(records);
        match &mut self.link {
            Link::WebSocket(socket) => socket.send(message).await.expect("send batch"),
            Link::Http(link) => {
                let (status, body) = link.post(message.into_data()).await;
                assert_eq!(status, http::StatusCode::NO_CONTENT, "POST of a batch: {body}");
            }
            Link::WebTransport(stream) => {
                stream
                    .write_frame(super::webtransport::BATCH, &message.into_data())
                    .await
            }
        }
    }

    /// Sends `message` as it is: a WebSocket message, or a POST's body
    /// (whose answer is not checked: the test looks at what follows).
    pub async fn send_raw(&mut self, message: Message) {
        match &mut self.link {
            Link::WebSocket(socket) => socket.send(message).await.expect("send"),
            Link::Http(link) => drop(link.post(message.into_data()).await),
            Link::WebTransport(stream) => {
                stream
                    .write_frame(super::webtransport::BATCH, &message.into_data())
                    .await
            }
        }
    }

    pub fn encode(&self, records: &[Rec]) -> Message {
        match self.enc {
            Enc::Json => Message::text(Value::Array(records.iter().map(json_record).collect()).to_string()),
            Enc::Proto => Message::binary(
                ClientBatch {
                    records: records.iter().map(proto_record).collect(),
                }
                .encode_to_vec(),
            ),
        }
    }

    /// The records not yet taken, or else the next batch's; `None` once
    /// the server closed.
    pub async fn batch(&mut self) -> Option<Vec<Got>> {
        if !self.pending.is_empty() {
            return Some(self.pending.drain(..).collect());
        }
        self.read_batch().await
    }

    async fn read_batch(&mut self) -> Option<Vec<Got>> {
        let socket = match &mut self.link {
            Link::WebSocket(socket) => socket,
            Link::WebTransport(stream) => {
                return match stream.read_frame().await {
                    Some(super::webtransport::Frame::Batch(bytes)) => Some(match self.enc {
                        Enc::Json => parse_json_batch(std::str::from_utf8(&bytes).unwrap()),
                        Enc::Proto => parse_proto_batch(&bytes),
                    }),
                    Some(super::webtransport::Frame::Close(code, reason)) => {
                        self.closed = Some((code, reason));
                        None
                    }
                    None => {
                        self.closed.get_or_insert((1006, String::new()));
                        None
                    }
                };
            }
            Link::Http(link) => {
                let Some(event) = link.next_non_ping().await else {
                    self.closed.get_or_insert((1006, String::new()));
                    return None;
                };
                return match event.name.as_str() {
                    "" => {
                        let bytes = super::http_session::batch_bytes(&event, self.enc == Enc::Proto);
                        Some(match self.enc {
                            Enc::Json => parse_json_batch(std::str::from_utf8(&bytes).unwrap()),
                            Enc::Proto => parse_proto_batch(&bytes),
                        })
                    }
                    "close" => {
                        let close: Value = serde_json::from_str(&event.data).expect("close data is JSON");
                        let code = close["code"].as_u64().expect("a close code") as u16;
                        self.closed = Some((code, close["reason"].as_str().unwrap_or_default().into()));
                        None
                    }
                    other => panic!("unexpected event {other:?}: {event:?}"),
                };
            }
        };
        loop {
            let message = within("next server message", socket.next()).await;
            match message {
                Some(Ok(Message::Text(text))) => {
                    assert_eq!(self.enc, Enc::Json, "text message on a proto socket");
                    return Some(parse_json_batch(&text));
                }
                Some(Ok(Message::Binary(bytes))) => {
                    assert_eq!(self.enc, Enc::Proto, "binary message on a json socket");
                    return Some(parse_proto_batch(&bytes));
                }
                Some(Ok(Message::Close(frame))) => {
                    self.closed = Some(frame.map_or((1005, String::new()), |f| (f.code.into(), f.reason.to_string())));
                    // Finish the close handshake.
                    let _ = Socket::close(socket, None).await;
                    return None;
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.closed.get_or_insert((1006, String::new()));
                    return None;
                }
            }
        }
    }

    /// Reads until `call` has its status; returns everything read for it
    /// (other calls' records are returned in `others`).
    pub async fn until_status(&mut self, call: u32, others: &mut Vec<Got>) -> Vec<Got> {
        let mut mine = Vec::new();
        loop {
            let batch = self
                .batch()
                .await
                .unwrap_or_else(|| panic!("closed before call {call} ended: {mine:?}"));
            let mut records = batch.into_iter();
            while let Some(got) = records.next() {
                if got.call() == call {
                    let done = matches!(got, Got::Status(..));
                    mine.push(got);
                    if done {
                        // The rest of the batch is for the next reader.
                        self.pending.extend(records);
                        return mine;
                    }
                } else {
                    others.push(got);
                }
            }
        }
    }

    /// Reads everything up to the server's close.
    pub async fn read_to_close(&mut self) -> Vec<Got> {
        let mut all = Vec::new();
        while let Some(batch) = self.batch().await {
            all.extend(batch);
        }
        all
    }
}

fn json_record(record: &Rec) -> Value {
    match record {
        Rec::Open {
            call,
            method,
            window,
            timeout_ms,
        } => {
            let mut open = json!({ "method": method });
            if *window > 0 {
                open["window"] = json!(window);
            }
            if *timeout_ms > 0 {
                open["timeoutMs"] = json!(timeout_ms);
            }
            json!({ "call": call, "open": open })
        }
        Rec::Data { call, data } => json!({ "call": call, "message": { "data": data } }),
        Rec::Raw { call, json: text, .. } => {
            json!({ "call": call, "message": serde_json::from_str::<Value>(text).expect("test JSON") })
        }
        Rec::CloseSend { call } => json!({ "call": call, "closeSend": {} }),
        Rec::Cancel { call } => json!({ "call": call, "cancel": {} }),
        Rec::Window { call, n } => json!({ "call": call, "window": n }),
    }
}

fn proto_record(record: &Rec) -> ClientRecord {
    let (call, kind) = match record {
        Rec::Open {
            call,
            method,
            window,
            timeout_ms,
        } => (
            *call,
            client_record::Kind::Open(Open {
                method: method.clone(),
                metadata: Default::default(),
                timeout_ms: *timeout_ms,
                window: *window,
            }),
        ),
        Rec::Data { call, data } => (
            *call,
            client_record::Kind::Message(Bytes::from(StreamRequest { data: data.clone() }.encode_to_vec())),
        ),
        Rec::Raw { call, proto, .. } => (*call, client_record::Kind::Message(Bytes::from(proto.clone()))),
        Rec::CloseSend { call } => (*call, client_record::Kind::CloseSend(Empty {})),
        Rec::Cancel { call } => (*call, client_record::Kind::Cancel(Empty {})),
        Rec::Window { call, n } => (*call, client_record::Kind::Window(*n)),
    };
    ClientRecord { call, kind: Some(kind) }
}

fn parse_json_batch(text: &str) -> Vec<Got> {
    let value: Value = serde_json::from_str(text).expect("the server sends JSON");
    let records = value.as_array().expect("the server always sends an array");
    records
        .iter()
        .map(|record| {
            // Proto3 JSON leaves out defaults: no `call` is call 0.
            let call = record
                .get("call")
                .map_or(0, |c| c.as_u64().expect("call is a number") as u32);
            if let Some(message) = record.get("message") {
                let text = message
                    .get("result")
                    .or_else(|| message.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                Got::Message(call, text.to_string())
            } else if let Some(status) = record.get("status") {
                Got::Status(
                    call,
                    status.get("code").map_or(0, |c| c.as_i64().unwrap() as i32),
                    status.get("message").and_then(Value::as_str).unwrap_or_default().into(),
                )
            } else if let Some(window) = record.get("window") {
                Got::Window(call, window.as_u64().unwrap() as u32)
            } else if record.get("headers").is_some() {
                Got::Headers(call)
            } else if let Some(goaway) = record.get("goaway") {
                Got::GoAway(goaway.get("message").and_then(Value::as_str).unwrap_or_default().into())
            } else {
                panic!("a record of no known kind: {record}")
            }
        })
        .collect()
}

fn parse_proto_batch(bytes: &[u8]) -> Vec<Got> {
    let batch = ServerBatch::decode(bytes).expect("a ServerBatch");
    batch
        .records
        .into_iter()
        .map(|record| match record.kind.expect("every record has a kind") {
            server_record::Kind::Message(bytes) => Got::Message(
                record.call,
                StreamResponse::decode(bytes)
                    .expect("a message with a string field 1")
                    .result,
            ),
            server_record::Kind::Status(status) => Got::Status(record.call, status.code, status.message),
            server_record::Kind::Window(n) => Got::Window(record.call, n),
            server_record::Kind::Headers(_) => Got::Headers(record.call),
            server_record::Kind::Goaway(goaway) => Got::GoAway(goaway.message),
        })
        .collect()
}

/// The messages among `got`.
/// One JSON unary call to the test upstream's `Echo/Unary` (`{"text": text}`)
/// as `call` on a JSON socket: everything read for it, its status last.
pub async fn json_echo_unary(socket: &mut V2, call: u32, text: &str) -> Vec<Got> {
    socket
        .send(&[
            Rec::Open {
                call,
                method: "/streambridge.testing.Echo/Unary".into(),
                window: 0,
                timeout_ms: 0,
            },
            Rec::Raw {
                call,
                json: json!({ "text": text }).to_string(),
                proto: Vec::new(),
            },
            close_send(call),
        ])
        .await;
    socket.until_status(call, &mut Vec::new()).await
}

pub fn messages(got: &[Got]) -> Vec<String> {
    got.iter()
        .filter_map(|g| match g {
            Got::Message(_, text) => Some(text.clone()),
            _ => None,
        })
        .collect()
}

/// The status among `got` (the last record).
pub fn status(got: &[Got]) -> (i32, String) {
    match got.last() {
        Some(Got::Status(_, code, message)) => (*code, message.clone()),
        other => panic!("the call's last record is not its status: {other:?} in {got:?}"),
    }
}

/// A whole call in one proto batch: `open` of `method` with `metadata`,
/// one `message`, `closeSend` (for tests that set what `Rec` does not).
#[allow(dead_code)] // not every test file makes one
pub fn whole_call(call: u32, method: &str, metadata: &[(&str, &str)], message: Vec<u8>) -> Message {
    let open = Open {
        method: method.into(),
        metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let records = [
        client_record::Kind::Open(open),
        client_record::Kind::Message(Bytes::from(message)),
        client_record::Kind::CloseSend(Empty {}),
    ]
    .into_iter()
    .map(|kind| ClientRecord { call, kind: Some(kind) })
    .collect();
    Message::binary(ClientBatch { records }.encode_to_vec())
}

/// Reads a proto socket until `call` ends: its messages and its status.
#[allow(dead_code)] // not every test file reads one
pub async fn proto_call_outcome(socket: &mut Socket, call: u32) -> (Vec<Bytes>, streambridge_protocol::v2::Status) {
    let mut messages = Vec::new();
    loop {
        let Message::Binary(bytes) = within("v2 batch", socket.next()).await.expect("open").expect("read") else {
            continue;
        };
        for record in ServerBatch::decode(bytes).expect("a ServerBatch").records {
            match (record.call == call, record.kind) {
                (true, Some(server_record::Kind::Message(message))) => messages.push(message),
                (true, Some(server_record::Kind::Status(status))) => return (messages, status),
                _ => {}
            }
        }
    }
}

/// A v2 proto socket; `token` in its upgrade (the bearer subprotocol entry) if given.
#[allow(dead_code)] // not every test file opens one
pub async fn proto_socket(server: &impl ServerAddr, token: Option<&str>) -> Socket {
    let mut request = server.ws_url().into_client_request().unwrap();
    let offers = match token {
        Some(token) => format!("streambridge.v2.proto, streambridge.bearer.{token}"),
        None => "streambridge.v2.proto".into(),
    };
    request
        .headers_mut()
        .insert("sec-websocket-protocol", offers.parse().unwrap());
    within("v2 upgrade", tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .0
}
