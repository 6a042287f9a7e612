//! A WebSocket test client (tokio-tungstenite) that speaks protocol v1 with
//! hand-written frames, so the tests check the wire format, not our codec.

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use streambridge_protocol::{ClientFrame, ServerFrame, client_frame, server_frame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{ServerAddr, within};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The subprotocol a test speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Json,
    Proto,
}

impl Sub {
    pub fn name(self) -> &'static str {
        match self {
            Sub::Json => "streambridge.v1.json",
            Sub::Proto => "streambridge.v1.proto",
        }
    }
}

/// What the server sent, decoded independently of the server's codec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    Response(String),
    Status { code: i32, message: String },
}

/// The whole rest of a call: frames until the close, and the close itself.
#[derive(Debug)]
pub struct Transcript {
    pub frames: Vec<Received>,
    pub close: Option<CloseFrame>,
}

impl Transcript {
    pub fn responses(&self) -> Vec<String> {
        self.frames
            .iter()
            .filter_map(|f| match f {
                Received::Response(r) => Some(r.clone()),
                Received::Status { .. } => None,
            })
            .collect()
    }

    /// The last frame, which must be the status; returns (code, message).
    pub fn status(&self) -> (i32, String) {
        match self.frames.last() {
            Some(Received::Status { code, message }) => (*code, message.clone()),
            other => panic!("last frame is not a status: {other:?} (all: {:?})", self.frames),
        }
    }

    pub fn close_code(&self) -> u16 {
        self.close.as_ref().map(|c| u16::from(c.code)).expect("a close frame")
    }
}

/// Opens `/ws` offering `offers` (none: no `Sec-WebSocket-Protocol` header).
pub async fn connect(server: &impl ServerAddr, offers: &[&str]) -> Socket {
    let mut request = server.ws_url().into_client_request().unwrap();
    if !offers.is_empty() {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&offers.join(", ")).unwrap(),
        );
    }
    let (socket, _response) = within("ws connect", tokio_tungstenite::connect_async(request))
        .await
        .expect("ws connect");
    socket
}

pub async fn connect_with(server: &impl ServerAddr, sub: Sub) -> Socket {
    connect(server, &[sub.name()]).await
}

pub fn request_frame(sub: Sub, data: &str) -> Message {
    match sub {
        Sub::Json => Message::text(serde_json::json!({ "request": { "data": data } }).to_string()),
        Sub::Proto => {
            let frame = ClientFrame {
                frame: Some(client_frame::Frame::Request(streambridge_protocol::StreamRequest {
                    data: data.into(),
                })),
            };
            Message::Binary(Bytes::from(frame.encode_to_vec()))
        }
    }
}

pub fn close_send_frame(sub: Sub) -> Message {
    match sub {
        Sub::Json => Message::text(r#"{"closeSend":{}}"#),
        Sub::Proto => Message::Binary(Bytes::from_static(&[0x12, 0x00])),
    }
}

/// Sends `frames` in one write, so the server reads them in one go.
pub async fn send_all(socket: &mut Socket, frames: impl IntoIterator<Item = Message>) {
    for frame in frames {
        socket.feed(frame).await.expect("feed");
    }
    within("flush", socket.flush()).await.expect("flush");
}

/// Decodes one server frame; panics on anything the protocol does not allow.
pub fn decode(sub: Sub, message: Message) -> Received {
    match (sub, message) {
        (Sub::Json, Message::Text(text)) => {
            let value: serde_json::Value = serde_json::from_str(&text).expect("server sent valid JSON");
            if let Some(response) = value.get("response") {
                Received::Response(response["result"].as_str().unwrap_or_default().to_string())
            } else if let Some(status) = value.get("status") {
                Received::Status {
                    code: status["code"].as_i64().expect("status.code is always present") as i32,
                    message: status
                        .get("message")
                        .and_then(|m| m.as_str())
                        .unwrap_or_default()
                        .to_string(),
                }
            } else {
                panic!("unexpected server frame {text}")
            }
        }
        (Sub::Proto, Message::Binary(bytes)) => match ServerFrame::decode(bytes).expect("valid ServerFrame").frame {
            Some(server_frame::Frame::Response(r)) => Received::Response(r.result),
            Some(server_frame::Frame::Status(s)) => Received::Status {
                code: s.code,
                message: s.message,
            },
            None => panic!("empty ServerFrame"),
        },
        (sub, other) => panic!("unexpected frame type on {sub:?}: {other:?}"),
    }
}

/// Reads one frame that must be a response.
pub async fn next_response(socket: &mut Socket, sub: Sub) -> String {
    loop {
        let message = within("next frame", socket.next())
            .await
            .expect("socket open")
            .expect("frame");
        match message {
            Message::Ping(_) | Message::Pong(_) => continue,
            message => match decode(sub, message) {
                Received::Response(result) => return result,
                status => panic!("expected a response, got {status:?}"),
            },
        }
    }
}

/// Reads everything up to and including the server's close.
pub async fn read_to_close(socket: &mut Socket, sub: Sub) -> Transcript {
    let mut frames = Vec::new();
    loop {
        let message = within("frames up to close", socket.next()).await;
        match message {
            Some(Ok(Message::Close(close))) => {
                // Finish the close handshake as a well-behaved client does:
                // our Close reply goes out, then the server ends the connection.
                while within("close handshake", socket.next()).await.is_some() {}
                return Transcript { frames, close };
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(message)) => frames.push(decode(sub, message)),
            Some(Err(error)) => panic!("socket error before the close: {error} (frames so far: {frames:?})"),
            None => return Transcript { frames, close: None },
        }
    }
}

/// Sends one request and `closeSend`; asserts its reply, status 0 and close 1000.
pub async fn assert_one_round_trip(socket: &mut Socket, sub: Sub, data: &str) {
    send_all(socket, [request_frame(sub, data), close_send_frame(sub)]).await;
    let transcript = read_to_close(socket, sub).await;
    assert_eq!(transcript.responses(), vec![format!("processed: {data}")]);
    assert_eq!(transcript.status(), (0, String::new()));
    assert_eq!(transcript.close_code(), 1000);
}

/// Attempts an upgrade that the server must refuse; returns the HTTP status and body.
pub async fn refused_upgrade(request: tokio_tungstenite::tungstenite::handshake::client::Request) -> (u16, String) {
    let error = within("refused upgrade", tokio_tungstenite::connect_async(request))
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
        panic!("expected an HTTP refusal: {error}")
    };
    let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap_or_default();
    (response.status().as_u16(), body)
}

/// Sends `inputs` as requests and then `closeSend`, in one write, and reads
/// the rest of the call up to the server's close.
pub async fn call_with(socket: &mut Socket, sub: Sub, inputs: &[String]) -> Transcript {
    let frames = inputs
        .iter()
        .map(|data| request_frame(sub, data))
        .chain([close_send_frame(sub)]);
    send_all(socket, frames).await;
    read_to_close(socket, sub).await
}
