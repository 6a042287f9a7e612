//! A native client of protocol v2's HTTP binding (docs/protocol-v2.md §11),
//! shaped as a WebSocket (a `Stream` of the server's batches and a `Sink` of
//! the client's), so that [`crate::ws2_load`] drives it as it drives a
//! socket: the same load, over the other transport.
//!
//! Like the WASM client: one HTTP/1.1 connection holds the down-stream (the
//! session's `GET`), another carries POSTs one at a time; batches written
//! while a POST is in flight go up together in the next one; each `ping`
//! is answered with a POST.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::{Sink, Stream};
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::ws_load::Codec;

/// An open session; dropping or closing it ends it.
pub struct HttpSession {
    from_server: mpsc::UnboundedReceiver<Result<Message, WsError>>,
    /// `None`: an empty POST (a ping's answer).
    to_server: mpsc::UnboundedSender<Option<Message>>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for HttpSession {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

async fn http1(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Opens a session at `addr` speaking `codec`.
pub async fn connect(addr: SocketAddr, codec: Codec) -> Result<HttpSession, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut down, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(connection);
    let protocol = crate::ws2_load::subprotocol(codec);
    let mut request = Request::get(format!("/ws?protocol={protocol}")).header("host", addr.to_string());
    if let Some(token) = crate::servers::edge::token() {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = down
        .send_request(request.body(Empty::new()).unwrap())
        .await
        .map_err(|e| format!("session request: {e}"))?;
    if response.status() != 200 {
        return Err(format!("session refused: {}", response.status()));
    }
    let mut body = response.into_body();
    let mut events = Events::default();
    let session = loop {
        if let Some((name, data)) = events.next() {
            if name != "session" {
                return Err(format!("the first event is {name:?}"));
            }
            let data: serde_json::Value = serde_json::from_str(&data).map_err(|e| e.to_string())?;
            break data["session"].as_str().ok_or("no session id")?.to_string();
        }
        match body.frame().await {
            Some(Ok(frame)) => events.extend(frame.into_data().unwrap_or_default()),
            _ => return Err("the down-stream ended before the session event".into()),
        }
    };
    let (to_reader, from_server) = mpsc::unbounded_channel();
    let (to_server, outgoing) = mpsc::unbounded_channel();
    let pongs = to_server.clone();
    let reader = tokio::spawn(async move {
        loop {
            while let Some((name, data)) = events.next() {
                let message = match name.as_str() {
                    "" => match codec {
                        Codec::Json => Message::Text(Utf8Bytes::from(data)),
                        Codec::Proto => match base64::engine::general_purpose::STANDARD.decode(&data) {
                            Ok(batch) => Message::Binary(batch.into()),
                            Err(_) => return drop(to_reader.send(Err(WsError::ConnectionClosed))),
                        },
                    },
                    "ping" => {
                        let _ = pongs.send(None);
                        continue;
                    }
                    "close" => Message::Close(None),
                    _ => continue,
                };
                if to_reader.send(Ok(message)).is_err() {
                    return;
                }
            }
            match body.frame().await {
                Some(Ok(frame)) => events.extend(frame.into_data().unwrap_or_default()),
                _ => return,
            }
        }
    });
    let poster = tokio::spawn(post_in_order(addr, session, outgoing));
    Ok(HttpSession {
        from_server,
        to_server,
        tasks: [reader, poster],
    })
}

/// POSTs what the session writes, one POST at a time, everything queued
/// meanwhile merged into the next.
async fn post_in_order(addr: SocketAddr, session: String, mut outgoing: mpsc::UnboundedReceiver<Option<Message>>) {
    // Connected at the first POST, as a browser does: an idle session holds
    // only its down-stream (the server closes a keep-alive connection that
    // waits longer than --http1-header-read-timeout anyway).
    let mut up = None;
    let mut seq = 0u64;
    while let Some(first) = outgoing.recv().await {
        if up.is_none() {
            match http1(addr).await {
                Ok(connected) => up = Some(connected),
                Err(_) => return,
            }
        }
        let Some(up) = up.as_mut() else { return };
        let mut body = BytesMut::new();
        let mut json = false;
        let mut add = |message: Option<Message>, body: &mut BytesMut| match message {
            Some(Message::Binary(batch)) => body.extend_from_slice(&batch),
            Some(Message::Text(text)) => {
                json = true;
                if body.is_empty() {
                    body.extend_from_slice(text.as_bytes());
                } else {
                    // `[a]` and `[b]` make `[a,b]`.
                    body.truncate(body.len() - 1);
                    body.extend_from_slice(b",");
                    body.extend_from_slice(&text.as_bytes()[1..]);
                }
            }
            _ => {}
        };
        add(first, &mut body);
        while let Ok(next) = outgoing.try_recv() {
            add(next, &mut body);
        }
        let request = Request::post(format!("/ws?session={session}&seq={seq}"))
            .header("host", addr.to_string())
            .header(
                "content-type",
                if json { "text/plain" } else { "application/octet-stream" },
            )
            .body(Full::new(body.freeze()))
            .unwrap();
        match up.send_request(request).await {
            Ok(response) if response.status() == 204 => seq += 1,
            _ => return,
        }
    }
}

/// Server-sent events parsed from the down-stream's bytes.
#[derive(Default)]
struct Events {
    unparsed: BytesMut,
}

impl Events {
    fn extend(&mut self, bytes: Bytes) {
        self.unparsed.extend_from_slice(&bytes);
    }

    /// The next whole event: its name and its data.
    fn next(&mut self) -> Option<(String, String)> {
        let end = self.unparsed.windows(2).position(|pair| pair == b"\n\n")?;
        let block = self.unparsed.split_to(end + 2);
        let text = std::str::from_utf8(&block[..end]).ok()?;
        let (mut name, mut data) = (String::new(), String::new());
        for line in text.split('\n') {
            if let Some(value) = line.strip_prefix("event: ") {
                name = value.to_string();
            } else if let Some(value) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        Some((name, data))
    }
}

impl Stream for HttpSession {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.from_server.poll_recv(cx)
    }
}

impl Sink<Message> for HttpSession {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        self.to_server
            .send(Some(message))
            .map_err(|_| WsError::ConnectionClosed)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }

    /// Ends the session: the server sees its down-stream go.
    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.tasks.iter().for_each(JoinHandle::abort);
        self.from_server.close();
        Poll::Ready(Ok(()))
    }
}
