//! One WebTransport stream as the call machine's [`Wire`]: the stream's
//! frames (docs/protocol-v2.md §12) come in and go out as the messages a
//! WebSocket would carry, so the machine, its limits and its errors are the
//! same code as on the other transports.
//!
//! A frame is a 4-byte big-endian length, then that many bytes: a kind byte
//! ([`BATCH`] or [`CLOSE`]) and its payload. A batch is a v2 batch in the
//! session's encoding (a `ServerBatch`/`ClientBatch`, or a JSON array); a
//! close is a 2-byte code and a UTF-8 reason, as a WebSocket Close carries.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use streambridge_protocol::v2::Encoding;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::codec::{Decoder, Encoder, Framed};
use wtransport::VarInt;
use wtransport::stream::BiStream;

use crate::transport::websocket::{Closing, Wire};

/// A frame's kind: a v2 batch.
pub const BATCH: u8 = 0;
/// A frame's kind: the end of the stream's records, with a code and reason.
pub const CLOSE: u8 = 1;

/// Frames of one stream: [`BATCH`]es and a [`CLOSE`].
pub struct StreamCodec {
    /// The largest payload taken; a longer frame is an error.
    max_payload: usize,
}

/// What a stream carries.
#[derive(Debug)]
pub enum StreamFrame {
    Batch(Bytes),
    Close(u16, String),
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    TooLong { size: usize, max_size: usize },
    UnknownKind(u8),
    BadClose,
}

impl From<std::io::Error> for FrameError {
    fn from(error: std::io::Error) -> Self {
        FrameError::Io(error)
    }
}

impl StreamCodec {
    pub fn new(max_payload: usize) -> StreamCodec {
        StreamCodec { max_payload }
    }
}

impl Decoder for StreamCodec {
    type Item = StreamFrame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<StreamFrame>, FrameError> {
        let Some(header) = src.get(..4) else { return Ok(None) };
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        // The kind byte is not payload.
        if length.saturating_sub(1) > self.max_payload {
            return Err(FrameError::TooLong {
                size: length - 1,
                max_size: self.max_payload,
            });
        }
        if src.len() < 4 + length {
            src.reserve(4 + length - src.len());
            return Ok(None);
        }
        src.advance(4);
        let mut frame = src.split_to(length).freeze();
        if frame.is_empty() {
            return Err(FrameError::UnknownKind(0xff));
        }
        match frame.get_u8() {
            BATCH => Ok(Some(StreamFrame::Batch(frame))),
            CLOSE if frame.len() >= 2 => {
                let code = frame.get_u16();
                let reason = String::from_utf8(frame.to_vec()).map_err(|_| FrameError::BadClose)?;
                Ok(Some(StreamFrame::Close(code, reason)))
            }
            CLOSE => Err(FrameError::BadClose),
            kind => Err(FrameError::UnknownKind(kind)),
        }
    }
}

impl Encoder<StreamFrame> for StreamCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: StreamFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            StreamFrame::Batch(batch) => {
                dst.reserve(5 + batch.len());
                dst.put_u32((batch.len() + 1) as u32);
                dst.put_u8(BATCH);
                dst.put_slice(&batch);
            }
            StreamFrame::Close(code, reason) => {
                dst.put_u32((reason.len() + 3) as u32);
                dst.put_u8(CLOSE);
                dst.put_u16(code);
                dst.put_slice(reason.as_bytes());
            }
        }
        Ok(())
    }
}

/// The stream error code of a stream whose frames cannot be read (an
/// unknown kind, a broken close): as WebSocket's close code for a protocol
/// error.
pub const BROKEN_FRAMING: u32 = 1002;

/// The stream error code of a stream that brought no frame in time (as
/// WebSocket's close code for a policy violation).
pub const NO_CALL_IN_TIME: u32 = 1008;

/// The call machine's side of one stream.
pub struct StreamWire {
    frames: Framed<BiStream, StreamCodec>,
    encoding: Encoding,
    /// The machine asked whether the peer is there: the stream answers for
    /// it (QUIC's own idle timeout and keep-alives watch the peer).
    pong_due: bool,
    reader: Option<Waker>,
    /// The peer's close came, or the stream ended.
    ended: bool,
    /// A batch has come: the client's end of its side after it (FIN) only
    /// says it sends nothing more; its call goes on.
    read_any: bool,
    /// Until the first frame: a stream that brings none by then is reset, so
    /// an opened and forgotten stream does not hold a call machine for the
    /// whole session (nor, once the client's QUIC stack answers the reset,
    /// one of its stream slots, `--ws-max-calls`).
    first_frame_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StreamWire {
    /// `first_frame_within`: how long the stream may stay silent before its
    /// first frame (`--request-body-timeout`).
    pub fn new(stream: BiStream, encoding: Encoding, max_payload: usize, first_frame_within: Duration) -> StreamWire {
        StreamWire {
            frames: Framed::new(stream, StreamCodec::new(max_payload)),
            encoding,
            pong_due: false,
            reader: None,
            ended: false,
            read_any: false,
            first_frame_by: Some(Box::pin(tokio::time::sleep(first_frame_within))),
        }
    }
}

impl StreamWire {
    /// Nothing after a frame that cannot be read can be framed: the stream
    /// is reset with a code saying so (no frame can carry a reason now).
    fn broken(&mut self) -> WsError {
        self.reset(BROKEN_FRAMING);
        self.read_any = false;
        WsError::Protocol(ProtocolError::InvalidCloseSequence)
    }

    /// Resets the server's side of the stream with `code`; nothing more is
    /// read from it.
    fn reset(&mut self, code: u32) {
        let _ = self.frames.get_mut().send_mut().reset(VarInt::from_u32(code));
        self.ended = true;
    }
}

impl Stream for StreamWire {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if std::mem::take(&mut self.pong_due) {
            return Poll::Ready(Some(Ok(Message::Pong(Bytes::new()))));
        }
        self.reader = Some(cx.waker().clone());
        if self.ended {
            // Nothing more will come; the call's replies still go out.
            return if self.read_any {
                Poll::Pending
            } else {
                Poll::Ready(None)
            };
        }
        let encoding = self.encoding;
        let frame = match self.frames.poll_next_unpin(cx) {
            Poll::Ready(frame) => {
                self.first_frame_by = None;
                frame
            }
            Poll::Pending => {
                if let Some(deadline) = &mut self.first_frame_by
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    tracing::debug!("a WebTransport stream brought no frame in time");
                    self.reset(NO_CALL_IN_TIME);
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
        };
        let frame = match frame {
            None => {
                self.ended = true;
                return if self.read_any {
                    Poll::Pending
                } else {
                    Poll::Ready(None)
                };
            }
            Some(frame) => frame,
        };
        self.read_any = true;
        Poll::Ready(Some(match frame {
            Ok(StreamFrame::Batch(batch)) => match encoding {
                Encoding::Proto => Ok(Message::Binary(batch)),
                Encoding::Json => Utf8Bytes::try_from(batch)
                    .map(Message::Text)
                    .map_err(|_| WsError::Utf8("a JSON batch that is not UTF-8".into())),
            },
            Ok(StreamFrame::Close(code, reason)) => {
                // The client is done with the stream: its call is cancelled.
                self.read_any = false;
                self.ended = true;
                Ok(Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                })))
            }
            Err(FrameError::TooLong { size, max_size }) => {
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))
            }
            Err(FrameError::Io(error)) => Err(WsError::Io(error)),
            Err(FrameError::UnknownKind(kind)) => {
                tracing::debug!(kind, "a WebTransport frame of an unknown kind");
                Err(self.broken())
            }
            Err(FrameError::BadClose) => Err(self.broken()),
        }))
    }
}

impl Sink<Message> for StreamWire {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.frames.poll_ready_unpin(cx).map_err(io_error)
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        let frame = match message {
            Message::Binary(batch) => StreamFrame::Batch(batch),
            Message::Text(text) => StreamFrame::Batch(Bytes::from(text)),
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1000, String::new()), |frame| {
                    (u16::from(frame.code), frame.reason.as_str().to_string())
                });
                StreamFrame::Close(code, reason)
            }
            Message::Ping(_) => {
                self.pong_due = true;
                if let Some(reader) = self.reader.take() {
                    reader.wake();
                }
                return Ok(());
            }
            Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        self.frames.start_send_unpin(frame).map_err(io_error)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.frames.poll_flush_unpin(cx).map_err(io_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.frames.poll_close_unpin(cx).map_err(io_error)
    }
}

fn io_error(error: FrameError) -> WsError {
    match error {
        FrameError::Io(error) => WsError::Io(error),
        _ => WsError::ConnectionClosed,
    }
}

impl Wire for StreamWire {
    /// Sends the close frame and finishes the stream (QUIC delivers what was
    /// written before the end: no Close to wait for, as a TCP socket needs).
    async fn close(&mut self, closing: Closing, timeout: Duration) {
        let frame = CloseFrame {
            code: closing.code,
            reason: closing.reason.into(),
        };
        let _ = tokio::time::timeout(timeout, async {
            if self.send(Message::Close(Some(frame))).await.is_ok() {
                let _ = SinkExt::<Message>::close(self).await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_long_one_is_refused_before_it_is_read() {
        let mut codec = StreamCodec::new(16);
        let mut wire = BytesMut::new();
        codec
            .encode(StreamFrame::Batch(Bytes::from_static(b"abc")), &mut wire)
            .unwrap();
        codec
            .encode(StreamFrame::Close(1009, "too big".into()), &mut wire)
            .unwrap();
        let mut partial = wire.split_to(5);
        assert!(codec.decode(&mut partial).unwrap().is_none(), "a frame is read whole");
        partial.unsplit(wire);
        assert!(matches!(codec.decode(&mut partial).unwrap(), Some(StreamFrame::Batch(b)) if b == "abc"));
        assert!(matches!(
            codec.decode(&mut partial).unwrap(),
            Some(StreamFrame::Close(1009, reason)) if reason == "too big"
        ));
        // Only the header of a frame over the limit is needed to refuse it.
        let mut long = BytesMut::from(&[0, 0, 0, 18][..]);
        assert!(matches!(
            codec.decode(&mut long),
            Err(FrameError::TooLong { size: 17, max_size: 16 })
        ));
        let mut unknown = BytesMut::from(&[0, 0, 0, 1, 7][..]);
        assert!(matches!(codec.decode(&mut unknown), Err(FrameError::UnknownKind(7))));
    }
}
