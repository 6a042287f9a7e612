//! WebSocket load: one call per socket on `/ws`, in either subprotocol.
//!
//! Each socket is driven by one task (no split halves, no lock): it feeds
//! requests up to its window, flushes once, then reads every reply that is
//! ready before it refills. In fixed-rate mode it sends on a schedule instead,
//! and a reply's latency counts from the message's *intended* send time, so a
//! server that stalls is charged for the messages the stall held back
//! (coordinated omission).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use streambridge_protocol::{CloseSend, StreamRequest, client_frame, proto, server_frame};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::measure::{Control, TaskStats, payload};

/// A socket that has sent this many requests without a reply in fixed-rate
/// mode waits for replies before sending more (it still charges the wait).
const RATE_MODE_MAX_IN_FLIGHT: usize = 4096;

/// The WebSocket subprotocol (envelope encoding) a socket speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Json => "streambridge.v1.json",
            Codec::Proto => "streambridge.v1.proto",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Proto => "proto",
        }
    }
}

/// How a socket sends.
#[derive(Clone, Copy, Debug)]
pub enum Pacing {
    /// Closed loop: keep this many requests in flight.
    Window(usize),
    /// Open loop: one request every `interval`, the first after `offset`.
    Rate { interval: Duration, offset: Duration },
}

/// The frames a socket sends, encoded once and shared.
pub struct Frames {
    codec: Codec,
    request: Message,
    close_send: Message,
    expected_result: String,
}

impl Frames {
    pub fn new(codec: Codec, payload_size: usize) -> Arc<Self> {
        let data = payload(payload_size);
        let (request, close_send) = match codec {
            Codec::Json => (
                Message::text(format!(r#"{{"request":{{"data":"{data}"}}}}"#)),
                Message::text(r#"{"closeSend":{}}"#),
            ),
            Codec::Proto => (
                binary(client_frame::Frame::Request(StreamRequest { data: data.clone() })),
                binary(client_frame::Frame::CloseSend(CloseSend {})),
            ),
        };
        Arc::new(Frames {
            codec,
            request,
            close_send,
            expected_result: format!("processed: {data}"),
        })
    }

    /// What a server frame is, checking the reply's content when `verify`.
    fn classify(&self, message: &Message, verify: bool) -> Result<Reply, String> {
        match (self.codec, message) {
            (Codec::Json, Message::Text(text)) => {
                if !verify && text.starts_with(r#"{"response""#) {
                    return Ok(Reply::Response);
                }
                let value: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("reply is not JSON ({e}): {text:.80}"))?;
                if let Some(result) = value.pointer("/response/result") {
                    return if result.as_str() == Some(&self.expected_result) {
                        Ok(Reply::Response)
                    } else {
                        Err(format!("wrong reply: {text:.80}"))
                    };
                }
                match value.pointer("/status/code").and_then(|c| c.as_i64()).unwrap_or(0) {
                    0 if value.get("status").is_some() => Ok(Reply::Status),
                    _ => Err(format!("unexpected frame: {text:.120}")),
                }
            }
            (Codec::Proto, Message::Binary(bytes)) => {
                if !verify && bytes.first() == Some(&0x0a) {
                    return Ok(Reply::Response);
                }
                match proto::decode_server_frame(bytes).map_err(|e| e.to_string())? {
                    server_frame::Frame::Response(r) if r.result == self.expected_result => Ok(Reply::Response),
                    server_frame::Frame::Status(s) if s.code == 0 => Ok(Reply::Status),
                    other => Err(format!("unexpected frame: {other:?}")),
                }
            }
            (_, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Ok(Reply::Other),
            (_, Message::Close(frame)) => Err(format!("server closed the socket: {frame:?}")),
            (_, other) => Err(format!("wrong frame type for {:?}: {other:?}", self.codec)),
        }
    }
}

fn binary(frame: client_frame::Frame) -> Message {
    Message::Binary(Bytes::from(proto::encode_client_frame(frame)))
}

enum Reply {
    Response,
    Status,
    Other,
}

pub type Socket = WebSocketStream<TcpStream>;

/// Opens a socket to `/ws` offering `codec`'s subprotocol.
pub async fn connect(addr: SocketAddr, codec: Codec, read_buffer_size: usize) -> Result<Socket, String> {
    connect_offering(addr, codec.subprotocol(), read_buffer_size).await
}

/// Opens a socket to `/ws` offering `subprotocol` (v1 or v2).
pub async fn connect_offering(
    addr: SocketAddr,
    subprotocol: &'static str,
    read_buffer_size: usize,
) -> Result<Socket, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut request = format!("ws://{addr}/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let offer = match crate::servers::edge::token() {
        // The edge server's token, as browsers send one (unchecked elsewhere).
        Some(token) => {
            HeaderValue::try_from(format!("{subprotocol}, streambridge.bearer.{token}")).map_err(|e| e.to_string())?
        }
        None => HeaderValue::from_static(subprotocol),
    };
    request.headers_mut().insert("sec-websocket-protocol", offer);
    let config = WebSocketConfig::default().read_buffer_size(read_buffer_size);
    let (socket, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
        .await
        .map_err(|e| format!("WebSocket handshake with {addr}: {e}"))?;
    Ok(socket)
}

/// Drives one socket until the control says stop and every reply is in,
/// then ends the call with `closeSend` and waits for the OK status.
pub async fn drive(
    mut socket: Socket,
    frames: Arc<Frames>,
    pacing: Pacing,
    control: Control,
) -> Result<TaskStats, String> {
    let mut stats = TaskStats::new();
    let mut in_flight = VecDeque::new();
    let mut verified = false;
    let start = Instant::now();
    let (window, mut next_send) = match pacing {
        Pacing::Window(window) => (window, None),
        Pacing::Rate { interval, offset } => (RATE_MODE_MAX_IN_FLIGHT, Some((start + offset, interval))),
    };
    loop {
        let sending = !control.stopped();
        if !sending && in_flight.is_empty() {
            break;
        }
        let message = match &mut next_send {
            None => {
                if sending && in_flight.len() < window {
                    while in_flight.len() < window {
                        socket.feed(frames.request.clone()).await.map_err(write_error)?;
                        in_flight.push_back(Instant::now());
                    }
                    socket.flush().await.map_err(write_error)?;
                }
                socket.next().await
            }
            Some((due, interval)) => {
                let may_send = sending && in_flight.len() < window;
                tokio::select! {
                    biased;
                    message = socket.next() => message,
                    () = tokio::time::sleep_until((*due).into()), if may_send => {
                        let now = Instant::now();
                        while *due <= now && in_flight.len() < window {
                            socket.feed(frames.request.clone()).await.map_err(write_error)?;
                            in_flight.push_back(*due);
                            *due += *interval;
                        }
                        socket.flush().await.map_err(write_error)?;
                        continue;
                    }
                }
            }
        };
        let mut next = message;
        // Take this reply and every further one already received.
        loop {
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("server closed the connection mid-call".into()),
            };
            match frames.classify(&message, !verified)? {
                Reply::Response => {
                    verified = true;
                    let sent = in_flight.pop_front().ok_or("a reply to no request")?;
                    stats.record(&control, sent);
                }
                Reply::Status => return Err("status before closeSend".into()),
                Reply::Other => {}
            }
            match socket.next().now_or_never() {
                Some(message) => next = message,
                None => break,
            }
        }
    }
    finish_call(&mut socket, &frames).await?;
    Ok(stats)
}

/// `closeSend`, then read up to the OK status and complete the close handshake.
pub async fn finish_call(socket: &mut Socket, frames: &Frames) -> Result<(), String> {
    let ending = async {
        socket.send(frames.close_send.clone()).await.map_err(write_error)?;
        loop {
            match socket.next().await {
                Some(Ok(message)) => match frames.classify(&message, true)? {
                    Reply::Status => break,
                    Reply::Response => return Err("a reply after every request was answered".to_string()),
                    Reply::Other => {}
                },
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("connection ended before the status".into()),
            }
        }
        // The server closes after the status; answer and wait for the end.
        while let Some(Ok(_)) = socket.next().await {}
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), ending)
        .await
        .map_err(|_| "no status within 10 s of closeSend".to_string())?
}

/// One request and its reply on a fresh socket, which then stays open and idle.
pub async fn open_idle(addr: SocketAddr, frames: Arc<Frames>) -> Result<Socket, String> {
    let mut socket = connect(addr, frames.codec, 4096).await?;
    socket.send(frames.request.clone()).await.map_err(write_error)?;
    loop {
        match socket.next().await {
            Some(Ok(message)) => match frames.classify(&message, true)? {
                Reply::Response => return Ok(socket),
                Reply::Status => return Err("status without closeSend".into()),
                Reply::Other => {}
            },
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended before the reply".into()),
        }
    }
}

fn write_error(error: tokio_tungstenite::tungstenite::Error) -> String {
    format!("write: {error}")
}
