//! An HTTP session as the call machine's [`Wire`]: what the client POSTs
//! comes in as messages, and the messages the machine writes go down one
//! long `text/event-stream` response as events.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream};
use http_body::Frame;
use streambridge_protocol::v2::Encoding;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::PollSender;

use crate::transport::websocket::{Closing, Wire};

/// Events buffered for a down-stream its client is slow to read: each is at
/// most one batch (64 KiB, or one larger message), so a session that stops
/// reading holds at most a few batches here before the machine's write
/// blocks and its deadline (two ping intervals) ends the session.
const DOWN_STREAM_EVENTS: usize = 2;

/// What a POST brings the session: small, since every session's channel
/// holds a block of them (a `Result<Message, WsError>` is four times the size).
pub enum Posted {
    /// A batch, as the message a WebSocket would have carried.
    Batch(Message),
    /// A body over the limit: its size, and the limit.
    TooLong(usize, usize),
    /// A JSON session's body that is not UTF-8.
    NotUtf8,
}

/// The call machine's side of a session.
pub struct HttpWire {
    from_client: mpsc::Receiver<Posted>,
    to_client: PollSender<Bytes>,
    /// Resolves when hyper drops the down-stream (its client went away).
    down_stream_dropped: oneshot::Receiver<()>,
    gone: bool,
}

/// The down-stream response's body: the events the machine writes.
pub struct DownStream {
    events: mpsc::Receiver<Bytes>,
    /// Dropped with the body, which tells the machine the client is gone.
    _dropped: oneshot::Sender<()>,
}

/// A new session's two ends: the machine's wire, the down-stream body, and
/// where POSTed batches go in. `first` is the first event (the session id).
pub fn session(first: Bytes) -> (HttpWire, DownStream, mpsc::Sender<Posted>) {
    // POSTs reach the session one at a time, in `seq` order: one waiting
    // batch is enough, and a full channel holds the next POST (its answer
    // waits), so a client that sends faster than its calls consume is paced
    // by HTTP.
    let (posted, from_client) = mpsc::channel(1);
    let (to_client, events) = mpsc::channel(DOWN_STREAM_EVENTS);
    to_client.try_send(first).expect("a new channel has room");
    let (dropped, down_stream_dropped) = oneshot::channel();
    let wire = HttpWire {
        from_client,
        to_client: PollSender::new(to_client),
        down_stream_dropped,
        gone: false,
    };
    (
        wire,
        DownStream {
            events,
            _dropped: dropped,
        },
        posted,
    )
}

impl http_body::Body for DownStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.events
            .poll_recv(cx)
            .map(|event| event.map(|event| Ok(Frame::data(event))))
    }
}

impl Stream for HttpWire {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.gone {
            return Poll::Ready(None);
        }
        if Pin::new(&mut self.down_stream_dropped).poll(cx).is_ready() {
            self.gone = true;
            return Poll::Ready(None);
        }
        self.from_client.poll_recv(cx).map(|posted| {
            posted.map(|posted| match posted {
                Posted::Batch(message) => Ok(message),
                Posted::TooLong(size, max_size) => {
                    Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))
                }
                Posted::NotUtf8 => Err(WsError::Utf8("a text batch that is not UTF-8".into())),
            })
        })
    }
}

impl Sink<Message> for HttpWire {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.to_client.poll_reserve(cx).map_err(|_| WsError::ConnectionClosed)
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        self.to_client
            .send_item(event(&message))
            .map_err(|_| WsError::ConnectionClosed)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        // What is in the channel is hyper's to write: as far as this session
        // goes, written (a full channel holds the next `poll_ready`).
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.to_client.close();
        Poll::Ready(Ok(()))
    }
}

impl Wire for HttpWire {
    /// Sends the `close` event and ends the down-stream. Nothing to wait
    /// for: POSTs after it find no session and are answered 404.
    async fn close(&mut self, closing: Closing, timeout: Duration) {
        let frame = CloseFrame {
            code: closing.code,
            reason: closing.reason.into(),
        };
        let _ = tokio::time::timeout(timeout, self.send(Message::Close(Some(frame)))).await;
        self.to_client.close();
    }
}

/// One server-sent event for a message of the machine (docs/protocol-v2.md,
/// "HTTP binding"): a batch is a `data` event (proto batches in base64, JSON
/// ones as they are); a ping asks the client for a POST; a close ends the
/// session with its code and reason.
pub fn event(message: &Message) -> Bytes {
    let mut event = BytesMut::new();
    match message {
        Message::Binary(batch) => {
            let base64 = base64_simd::STANDARD;
            let encoded = base64.encoded_length(batch.len());
            event.reserve(encoded + 8);
            event.put_slice(b"data: ");
            let start = event.len();
            event.resize(start + encoded, 0);
            let out = base64_simd::Out::from_slice(&mut event[start..]);
            let written = base64.encode(batch, out).len();
            event.truncate(start + written);
            event.put_slice(b"\n\n");
        }
        Message::Text(text) => {
            // JSON batches are one line; a line break in one would end the
            // `data` field, so each line gets its own (SSE joins them again).
            for line in text.as_str().split('\n') {
                event.put_slice(b"data: ");
                event.put_slice(line.as_bytes());
                event.put_u8(b'\n');
            }
            event.put_u8(b'\n');
        }
        Message::Ping(_) => event.put_slice(b"event: ping\ndata:\n\n"),
        Message::Close(frame) => {
            let (code, reason) = frame
                .as_ref()
                .map_or((1000, ""), |frame| (u16::from(frame.code), frame.reason.as_str()));
            let data = serde_json::json!({ "code": code, "reason": reason });
            event.put_slice(format!("event: close\ndata: {data}\n\n").as_bytes());
        }
        // Never written by the machine; a comment, which clients ignore.
        Message::Pong(_) | Message::Frame(_) => event.put_slice(b":\n\n"),
    }
    event.freeze()
}

/// The `session` event that opens a down-stream: the id POSTs name, and
/// how often the server pings (a client that hears nothing, not even a
/// ping, for two intervals may take the session for lost).
pub fn session_event(id: &str, encoding: Encoding, ping_interval: Duration) -> Bytes {
    let ping_ms = u64::try_from(ping_interval.as_millis()).unwrap_or(u64::MAX);
    let data = serde_json::json!({ "session": id, "protocol": encoding.name(), "pingMs": ping_ms });
    Bytes::from(format!("event: session\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_batches_pings_and_the_close() {
        assert_eq!(
            &event(&Message::Binary(Bytes::from_static(b"\x0a\x02hi")))[..],
            b"data: CgJoaQ==\n\n"
        );
        assert_eq!(&event(&Message::Text("[1,\n2]".into()))[..], b"data: [1,\ndata: 2]\n\n");
        assert_eq!(&event(&Message::Ping(Bytes::new()))[..], b"event: ping\ndata:\n\n");
        let close = CloseFrame {
            code: 1001.into(),
            reason: "server \"shutting\" down".into(),
        };
        assert_eq!(
            &event(&Message::Close(Some(close)))[..],
            b"event: close\ndata: {\"code\":1001,\"reason\":\"server \\\"shutting\\\" down\"}\n\n"
        );
    }
}
