//! WebSocket protocol v2 load: many calls on each socket, records batched.
//!
//! Each socket is driven by one task. It opens `calls` calls to
//! `DataService.BidirectionalStream` with a large response window, keeps
//! `window` requests in flight on each, sends everything it has to send in
//! one WebSocket message, and reads every batch that is ready before it
//! refills, granting response credit as replies arrive, as a browser
//! client of v2 does. Replies are matched to their call and checked. In
//! fixed-rate mode each tick sends one message on every call, in one
//! WebSocket message, and latency counts from the tick's intended time (as
//! `ws_load` does: no coordinated omission).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use prost::Message as _;
use streambridge_protocol::v2::{ClientBatch, ClientRecord, Empty, Open, ServerBatch, client_record, server_record};
use streambridge_protocol::{StreamRequest, StreamResponse};
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::measure::{Control, TaskStats, payload};
use crate::ws_load::{self, Codec, Pacing, Socket};

const METHOD: &str = "/DataService/BidirectionalStream";
/// Response credit each call opens with, and what it grants back per batch read.
const RESPONSE_WINDOW: u32 = 1024;
/// In fixed-rate mode, a call with this many requests unanswered waits for
/// replies before its socket sends more (the wait is still charged); below
/// the request credit the server starts every call with.
const RATE_MODE_MAX_IN_FLIGHT: usize = 200;

pub fn subprotocol(codec: Codec) -> &'static str {
    match codec {
        Codec::Json => "streambridge.v2.json",
        Codec::Proto => "streambridge.v2.proto",
    }
}

/// Opens a v2 socket to `/ws`.
pub async fn connect(addr: SocketAddr, codec: Codec) -> Result<Socket, String> {
    ws_load::connect_offering(addr, subprotocol(codec), 64 * 1024).await
}

/// Records of a batch being built, in either encoding.
struct Batch {
    codec: Codec,
    json: Vec<String>,
    proto: Vec<ClientRecord>,
    data: String,
}

impl Batch {
    fn new(codec: Codec, data: String) -> Batch {
        Batch {
            codec,
            json: Vec::new(),
            proto: Vec::new(),
            data,
        }
    }

    fn open(&mut self, call: u32) {
        match self.codec {
            Codec::Json => self.json.push(format!(
                r#"{{"call":{call},"open":{{"method":"{METHOD}","window":{RESPONSE_WINDOW}}}}}"#
            )),
            Codec::Proto => self.proto.push(ClientRecord {
                call,
                kind: Some(client_record::Kind::Open(Open {
                    method: METHOD.into(),
                    metadata: Default::default(),
                    timeout_ms: 0,
                    window: RESPONSE_WINDOW,
                })),
            }),
        }
    }

    fn message(&mut self, call: u32) {
        match self.codec {
            Codec::Json => self
                .json
                .push(format!(r#"{{"call":{call},"message":{{"data":"{}"}}}}"#, self.data)),
            Codec::Proto => self.proto.push(ClientRecord {
                call,
                kind: Some(client_record::Kind::Message(Bytes::from(
                    StreamRequest {
                        data: self.data.clone(),
                    }
                    .encode_to_vec(),
                ))),
            }),
        }
    }

    fn window(&mut self, call: u32, n: u32) {
        match self.codec {
            Codec::Json => self.json.push(format!(r#"{{"call":{call},"window":{n}}}"#)),
            Codec::Proto => self.proto.push(ClientRecord {
                call,
                kind: Some(client_record::Kind::Window(n)),
            }),
        }
    }

    fn close_send(&mut self, call: u32) {
        match self.codec {
            Codec::Json => self.json.push(format!(r#"{{"call":{call},"closeSend":{{}}}}"#)),
            Codec::Proto => self.proto.push(ClientRecord {
                call,
                kind: Some(client_record::Kind::CloseSend(Empty {})),
            }),
        }
    }

    fn is_empty(&self) -> bool {
        self.json.is_empty() && self.proto.is_empty()
    }

    /// The batch as one WebSocket message; empties it.
    fn take(&mut self) -> Message {
        match self.codec {
            Codec::Json => Message::text(format!("[{}]", std::mem::take(&mut self.json).join(","))),
            Codec::Proto => Message::binary(
                ClientBatch {
                    records: std::mem::take(&mut self.proto),
                }
                .encode_to_vec(),
            ),
        }
    }
}

/// What a server batch carried, per call.
enum Got {
    Reply(u32),
    Status(u32, i32),
    Other,
}

fn parse(codec: Codec, message: &Message, expected: &str, verify: bool) -> Result<Vec<Got>, String> {
    match (codec, message) {
        (Codec::Json, Message::Text(text)) => {
            let records: Vec<serde_json::Value> =
                serde_json::from_str(text).map_err(|e| format!("batch is not JSON ({e}): {text:.80}"))?;
            records
                .iter()
                .map(|record| {
                    let call = record.get("call").and_then(|c| c.as_u64()).unwrap_or(0) as u32;
                    if let Some(message) = record.get("message") {
                        if verify && message.get("result").and_then(|r| r.as_str()) != Some(expected) {
                            return Err(format!("wrong reply: {record}"));
                        }
                        Ok(Got::Reply(call))
                    } else if let Some(status) = record.get("status") {
                        Ok(Got::Status(
                            call,
                            status.get("code").and_then(|c| c.as_i64()).unwrap_or(0) as i32,
                        ))
                    } else {
                        Ok(Got::Other)
                    }
                })
                .collect()
        }
        (Codec::Proto, Message::Binary(bytes)) => {
            let batch = ServerBatch::decode(&bytes[..]).map_err(|e| e.to_string())?;
            batch
                .records
                .into_iter()
                .map(|record| match record.kind {
                    Some(server_record::Kind::Message(bytes)) => {
                        if verify && StreamResponse::decode(bytes).map_err(|e| e.to_string())?.result != expected {
                            return Err("wrong reply".to_string());
                        }
                        Ok(Got::Reply(record.call))
                    }
                    Some(server_record::Kind::Status(status)) => Ok(Got::Status(record.call, status.code)),
                    _ => Ok(Got::Other),
                })
                .collect()
        }
        (_, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Ok(Vec::new()),
        (_, other) => Err(format!("unexpected message: {other:?}")),
    }
}

/// Drives `calls` calls on one socket until the control says stop and
/// every reply is in, then half-closes them all and waits for their OK.
pub async fn drive<S: Wire>(
    mut socket: S,
    codec: Codec,
    calls: u32,
    pacing: Pacing,
    payload_size: usize,
    control: Control,
) -> Result<TaskStats, String> {
    let data = payload(payload_size);
    let expected = format!("processed: {data}");
    let mut stats = TaskStats::new();
    let mut batch = Batch::new(codec, data);
    // Calls are 1..=calls; in_flight[i] holds the send times of call i+1.
    let mut in_flight: Vec<VecDeque<Instant>> = vec![VecDeque::new(); calls as usize];
    let mut unacknowledged = vec![0u32; calls as usize];
    for call in 1..=calls {
        batch.open(call);
    }
    let mut verified = false;
    let (window, mut next_send) = match pacing {
        Pacing::Window(window) => (window, None),
        Pacing::Rate { interval, offset } => (RATE_MODE_MAX_IN_FLIGHT, Some((Instant::now() + offset, interval))),
    };
    loop {
        let sending = !control.stopped();
        if !sending && in_flight.iter().all(VecDeque::is_empty) {
            break;
        }
        let first = match &mut next_send {
            None => {
                if sending {
                    let now = Instant::now();
                    for (index, queue) in in_flight.iter_mut().enumerate() {
                        while queue.len() < window {
                            batch.message(index as u32 + 1);
                            queue.push_back(now);
                        }
                    }
                }
                if !batch.is_empty() {
                    socket.send(batch.take()).await.map_err(write_error)?;
                }
                socket.next().await
            }
            Some((due, interval)) => {
                if !batch.is_empty() {
                    socket.send(batch.take()).await.map_err(write_error)?;
                }
                let may_send = sending && in_flight.iter().all(|queue| queue.len() < window);
                tokio::select! {
                    biased;
                    message = socket.next() => message,
                    () = tokio::time::sleep_until((*due).into()), if may_send => {
                        let now = Instant::now();
                        while *due <= now && in_flight.iter().all(|queue| queue.len() < window) {
                            for (index, queue) in in_flight.iter_mut().enumerate() {
                                batch.message(index as u32 + 1);
                                queue.push_back(*due);
                            }
                            *due += *interval;
                        }
                        socket.send(batch.take()).await.map_err(write_error)?;
                        continue;
                    }
                }
            }
        };
        let mut next = first;
        loop {
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("server closed the connection mid-call".into()),
            };
            for got in parse(codec, &message, &expected, !verified)? {
                match got {
                    Got::Reply(call) => {
                        verified = true;
                        let index = call.checked_sub(1).ok_or("a reply for call 0")? as usize;
                        let sent = in_flight
                            .get_mut(index)
                            .and_then(VecDeque::pop_front)
                            .ok_or("a reply to no request")?;
                        stats.record(&control, sent);
                        unacknowledged[index] += 1;
                    }
                    Got::Status(call, code) => return Err(format!("call {call} ended early with {code}")),
                    Got::Other => {}
                }
            }
            match socket.next().now_or_never() {
                Some(message) => next = message,
                None => break,
            }
        }
        // Give back the response credit the replies used, half a window at a time.
        for (index, used) in unacknowledged.iter_mut().enumerate() {
            if *used >= RESPONSE_WINDOW / 2 {
                batch.window(index as u32 + 1, *used);
                *used = 0;
            }
        }
    }
    finish(&mut socket, &mut batch, codec, calls).await?;
    Ok(stats)
}

/// Half-closes every call, reads their OK statuses, closes the socket.
async fn finish<S: Wire>(socket: &mut S, batch: &mut Batch, codec: Codec, calls: u32) -> Result<(), String> {
    let ending = async {
        for call in 1..=calls {
            batch.close_send(call);
        }
        socket.send(batch.take()).await.map_err(write_error)?;
        let mut open = calls;
        while open > 0 {
            match socket.next().await {
                Some(Ok(message)) => {
                    for got in parse(codec, &message, "", false)? {
                        match got {
                            Got::Status(_, 0) => open -= 1,
                            Got::Status(call, code) => return Err(format!("call {call} ended with {code}")),
                            Got::Reply(_) => return Err("a reply after every request was answered".to_string()),
                            Got::Other => {}
                        }
                    }
                }
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("connection ended before the statuses".into()),
            }
        }
        let _ = SinkExt::close(socket).await;
        while let Some(Ok(_)) = socket.next().await {}
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), ending)
        .await
        .map_err(|_| "no statuses within 10 s of closeSend".to_string())?
}

/// A socket with `calls` idle calls, each after one exchange.
pub async fn open_idle(addr: SocketAddr, calls: u32) -> Result<Socket, String> {
    let socket = connect(addr, Codec::Json).await?;
    make_idle(socket, calls).await
}

/// `socket` (a WebSocket or an HTTP session) with `calls` idle calls, each
/// after one exchange.
pub async fn make_idle<S: Wire>(mut socket: S, calls: u32) -> Result<S, String> {
    let mut batch = Batch::new(Codec::Json, payload(16));
    for call in 1..=calls {
        batch.open(call);
        batch.message(call);
    }
    if calls > 0 {
        socket.send(batch.take()).await.map_err(write_error)?;
    }
    let mut replies = 0;
    while replies < calls {
        match socket.next().await {
            Some(Ok(message)) => {
                for got in parse(Codec::Json, &message, "", false)? {
                    match got {
                        Got::Reply(_) => replies += 1,
                        Got::Status(call, code) => return Err(format!("idle call {call} ended with {code}")),
                        Got::Other => {}
                    }
                }
            }
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended before the replies".into()),
        }
    }
    Ok(socket)
}

/// What the load runs on: a WebSocket, or an HTTP session shaped as one
/// ([`crate::http_session_load`]).
pub trait Wire:
    futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
    + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
    + Unpin
{
}

impl<S> Wire for S where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin
{
}

fn write_error(error: tokio_tungstenite::tungstenite::Error) -> String {
    format!("write: {error}")
}
