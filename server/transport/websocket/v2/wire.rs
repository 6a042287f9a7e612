//! What the call machine reads records from and writes them to: a
//! WebSocket, or an HTTP session ([`crate::transport::http_session`]) that
//! looks like one. Both carry tungstenite's [`Message`]s, so the machine,
//! its limits and its errors are the same code whichever way a page came in.

use std::time::Duration;

use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// How the connection ends.
pub struct Closing {
    pub code: CloseCode,
    pub reason: String,
    /// Whether the peer's messages can still be parsed (not after one over
    /// the size limit, or text that is not UTF-8): then its Close is awaited.
    pub framing_intact: bool,
}

impl Closing {
    pub fn new(code: impl Into<CloseCode>, reason: &str, framing_intact: bool) -> Closing {
        Closing {
            code: code.into(),
            reason: close_reason(reason).to_string(),
            framing_intact,
        }
    }
}

/// A close frame's reason: `message` cut to the 123 bytes a close frame
/// allows, on a character boundary.
pub fn close_reason(message: &str) -> &str {
    const MAX: usize = 123;
    let mut end = message.len().min(MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// A message-oriented connection to one client. `next` gives what the
/// client sent (a `Pong` for its answer to our `Ping`); `feed`/`flush`
/// write, and a write that stays pending is a client not reading.
pub trait Wire: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin {
    /// Ends the connection with `closing`, taking at most `timeout`.
    fn close(&mut self, closing: Closing, timeout: Duration) -> impl Future<Output = ()>;
}

impl<S> Wire for WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Sends our Close and waits (bounded) for the peer's, so that frames
    /// still in flight are not answered with a reset (which would destroy
    /// the statuses and the Close the peer has not read yet).
    async fn close(&mut self, closing: Closing, timeout: Duration) {
        let frame = CloseFrame {
            code: closing.code,
            reason: Utf8Bytes::from(closing.reason),
        };
        let _ = tokio::time::timeout(timeout, async {
            if WebSocketStream::close(self, Some(frame)).await.is_ok() {
                drain_after_close(self, closing.framing_intact).await;
            }
        })
        .await;
    }
}

/// After our Close is out: reads until the peer ends the connection, so
/// that nothing it sent is left unread when ours drops (unread data turns
/// the close into a TCP reset, which destroys what the peer has not read
/// yet). Unbounded: the caller bounds it.
async fn drain_after_close<S>(socket: &mut WebSocketStream<S>, framing_intact: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if framing_intact {
        // Messages after ours are discarded until the peer's Close ends the stream.
        while let Some(Ok(_)) = socket.next().await {}
        return;
    }
    // The peer's Close cannot be parsed any more: end our side of the TCP
    // connection (our Close is out) and drop its bytes until it ends its side.
    let io = socket.get_mut();
    if io.shutdown().await.is_ok() {
        // On the heap: an array here would be part of every socket's future
        // (4 KiB on each idle socket), for the rare connection that gets here.
        let mut sink = vec![0u8; 4096];
        while let Ok(1..) = io.read(&mut sink).await {}
    }
}

#[cfg(test)]
mod tests {
    use super::close_reason;

    #[test]
    fn close_reasons_fit_a_control_frame_and_stay_utf8() {
        let long = "é".repeat(100);
        let reason = close_reason(&long);
        assert!(reason.len() <= 123);
        assert!(long.starts_with(reason));
        assert_eq!(close_reason("short"), "short");
    }
}
