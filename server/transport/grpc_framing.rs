//! The gRPC length-prefixed framing of a request body, followed as it passes
//! to tonic (native gRPC, and gRPC-Web after tonic-web's translation), for
//! what tonic does not do:
//!
//! - **a truncated last message is an error with a clear message**: a body
//!   that ends inside a message fails the call with INTERNAL and says how
//!   much of the message came. (tonic itself says "Unexpected EOF" when bytes
//!   of the message are buffered, and ends the call with OK when the body
//!   ends right after a complete 5-byte prefix.)
//! - **unfinished messages are bounded per connection**: as soon as a
//!   message's prefix has arrived tonic reserves its whole declared length
//!   (up to `--max-message-size`), and a connection may carry up to
//!   `--http2-max-concurrent-streams` calls. [`MessageBuffer`] reserves the
//!   same for the whole connection, from the prefix until the message is
//!   complete; a call whose message would take it past
//!   `--connection-message-buffer` fails with RESOURCE_EXHAUSTED before any
//!   of its bytes are held.
//! - **a body does not stall**: gRPC-Web sends its body whole, so any pause
//!   longer than `--request-body-timeout` fails the call; a native gRPC
//!   stream may be quiet between messages for as long as it likes, but a
//!   message that has started must keep arriving. Both fail with
//!   DEADLINE_EXCEEDED. The timer is looked at only after the body itself
//!   had nothing: a consumer that stopped reading (its replies are blocked)
//!   never makes a body look stalled.
//!
//! The work per chunk is a walk over its message prefixes; the shared counter
//! is touched once per message that spans chunks, never for one that
//! arrives whole.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Frame, SizeHint};
use streambridge_protocol::grpc::{PREFIX_LEN, PrefixCursor};
use tokio::time::Sleep;
use tonic::Status;

use super::Transport;
pub use crate::net::message_buffer::MessageBuffer;

/// Boxed, as tonic's body errors are; tonic takes a [`Status`] found in it as
/// the call's status.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the framing check needs from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct FramingSettings {
    /// `--max-message-size`: a larger message fails its call with
    /// RESOURCE_EXHAUSTED as soon as its prefix arrives, whatever serves
    /// the call (tonic would say OUT_OF_RANGE; an upstream would get it).
    pub max_message_size: usize,
    /// `--request-body-timeout`.
    pub stall_timeout: Duration,
}

/// The gRPC services behind a [`FramedBody`] each: what both gRPC
/// transports call.
#[derive(Clone, Debug)]
pub struct FollowFraming<S> {
    inner: S,
    settings: FramingSettings,
}

impl<S> FollowFraming<S> {
    /// `inner` (the gRPC routes), its request bodies followed with `settings`.
    pub fn new(inner: S, settings: FramingSettings) -> Self {
        FollowFraming { inner, settings }
    }
}

impl<S, B> tower::Service<http::Request<B>> for FollowFraming<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        let buffer = request.extensions().get::<MessageBuffer>().cloned();
        // gRPC-Web's marker is set by its layer before the routes are called.
        let stall = match request.extensions().get::<Transport>() {
            Some(Transport::GrpcWeb) => Stall::AnyPause,
            _ => Stall::InsideMessage,
        };
        let settings = self.settings;
        self.inner
            .call(request.map(|body| tonic::body::Body::new(FramedBody::new(body, buffer, settings, stall))))
    }
}

/// Which pauses in a body count as a stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stall {
    /// Every pause (gRPC-Web: the body is sent whole).
    AnyPause,
    /// Only inside a message (native gRPC: streams may idle between messages).
    InsideMessage,
}

/// Where a body stands in its sequence of length-prefixed messages.
#[derive(Debug, Default)]
struct MessageCursor(PrefixCursor);

impl MessageCursor {
    /// Follows the framing through `data`; returns the largest length a
    /// prefix completed in `data` declared (0 if none did).
    fn advance(&mut self, data: &[u8]) -> usize {
        let mut largest = 0;
        let _ = self.0.advance(data, |prefix| {
            largest = largest.max(prefix.length);
            Ok::<_, Infallible>(())
        });
        largest
    }

    /// Whether the body is inside a message (its prefix, or its bytes).
    fn inside_message(&self) -> bool {
        self.0.inside_message()
    }

    /// What the current unfinished message reserves: its whole length once
    /// the prefix is known (tonic reserves as much), the prefix bytes before
    /// that, nothing for a message over `max` (tonic refuses it at once).
    fn reserved(&self, max: usize) -> usize {
        let declared = self.0.declared();
        if self.0.remaining() > 0 {
            if declared > max { 0 } else { PREFIX_LEN + declared }
        } else {
            self.0.in_prefix()
        }
    }

    /// Why the body may not end here, if it is inside a message.
    fn truncation(&self) -> Option<String> {
        let cursor = &self.0;
        if cursor.in_prefix() > 0 {
            Some(format!(
                "request truncated: the body ended after {} of a message's 5 prefix bytes",
                cursor.in_prefix()
            ))
        } else if cursor.remaining() > 0 {
            Some(format!(
                "request truncated: a message declared {} bytes but the body ended after {}",
                cursor.declared(),
                cursor.declared() - cursor.remaining()
            ))
        } else {
            None
        }
    }
}

/// A request body whose message framing is followed (see the module docs).
pub struct FramedBody<B> {
    body: B,
    cursor: MessageCursor,
    buffer: Option<MessageBuffer>,
    /// Bytes of `buffer` this body holds now.
    held: usize,
    settings: FramingSettings,
    stall: Stall,
    /// Armed while the body has nothing and a pause counts.
    stall_timer: Option<Pin<Box<Sleep>>>,
}

impl<B> FramedBody<B> {
    fn new(body: B, buffer: Option<MessageBuffer>, settings: FramingSettings, stall: Stall) -> Self {
        FramedBody {
            body,
            cursor: MessageCursor::default(),
            buffer,
            held: 0,
            settings,
            stall,
            stall_timer: None,
        }
    }

    /// Brings the connection's count in line with the cursor.
    fn account(&mut self) -> Result<(), Status> {
        let Some(buffer) = &self.buffer else { return Ok(()) };
        let now = self.cursor.reserved(self.settings.max_message_size);
        if now > self.held {
            if buffer.take(now - self.held).is_err() {
                return Err(Status::resource_exhausted(format!(
                    "this connection already holds {} bytes of unfinished messages and this one needs {}; \
                     the limit (--connection-message-buffer) is {}: send large messages one at a time",
                    buffer.held(),
                    now,
                    buffer.limit()
                )));
            }
        } else if now < self.held {
            buffer.give_back(self.held - now);
        }
        self.held = now;
        Ok(())
    }

    /// Called when the body has nothing: whether the pause has now lasted
    /// too long (arming the timer on the first call of a pause).
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let counts = match self.stall {
            Stall::AnyPause => true,
            Stall::InsideMessage => self.cursor.inside_message(),
        };
        if !counts {
            self.stall_timer = None;
            return false;
        }
        let timeout = self.settings.stall_timeout;
        let timer = self
            .stall_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        timer.as_mut().poll(cx).is_ready()
    }
}

impl<B> Drop for FramedBody<B> {
    fn drop(&mut self) {
        if let Some(buffer) = &self.buffer
            && self.held > 0
        {
            buffer.give_back(self.held);
        }
    }
}

impl<B> http_body::Body for FramedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // The body first: bytes that are there never count as a stall.
        let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) else {
            if this.stalled(cx) {
                let message = format!(
                    "request body stalled: no data for {:?} (--request-body-timeout)",
                    this.settings.stall_timeout
                );
                return Poll::Ready(Some(Err(Box::new(Status::deadline_exceeded(message)))));
            }
            return Poll::Pending;
        };
        this.stall_timer = None;
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let declared = this.cursor.advance(data.chunk());
                    if declared > this.settings.max_message_size {
                        return Poll::Ready(Some(Err(Box::new(Status::resource_exhausted(format!(
                            "request message too large: {declared} bytes declared, the limit \
                             (--max-message-size) is {}",
                            this.settings.max_message_size
                        ))))));
                    }
                    if let Err(status) = this.account() {
                        return Poll::Ready(Some(Err(Box::new(status))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(error.into()))),
            None => match this.cursor.truncation() {
                Some(why) => Poll::Ready(Some(Err(Box::new(Status::internal(why))))),
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never claim the end early: the end is where truncation is noticed.
        self.body.is_end_stream() && !self.cursor.inside_message()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: FramingSettings = FramingSettings {
        max_message_size: 1000,
        stall_timeout: Duration::from_secs(1),
    };

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend((len as u32).to_be_bytes());
        bytes.resize(5 + len, b'x');
        bytes
    }

    fn framed(buffer: &MessageBuffer) -> FramedBody<()> {
        FramedBody::new((), Some(buffer.clone()), SETTINGS, Stall::InsideMessage)
    }

    #[test]
    fn whole_messages_in_any_split_leave_nothing_unfinished() {
        let body: Vec<u8> = [message(3), message(0), message(10)].concat();
        for split in 0..=body.len() {
            let mut cursor = MessageCursor::default();
            cursor.advance(&body[..split]);
            cursor.advance(&body[split..]);
            assert_eq!(cursor.truncation(), None, "split at {split}");
            assert_eq!(cursor.reserved(1000), 0);
        }
    }

    #[test]
    fn a_body_ending_inside_a_message_is_truncated() {
        let mut cursor = MessageCursor::default();
        cursor.advance(&message(3));
        cursor.advance(&message(1000)[..5]);
        assert_eq!(cursor.reserved(1000), 1005, "the whole message from its prefix on");
        assert_eq!(cursor.reserved(999), 0, "over the limit: tonic's to refuse");
        let why = cursor.truncation().unwrap();
        assert!(why.contains("declared 1000 bytes") && why.contains("after 0"), "{why}");
        let mut in_prefix = MessageCursor::default();
        in_prefix.advance(&[0, 0]);
        assert!(
            in_prefix
                .truncation()
                .unwrap()
                .contains("2 of a message's 5 prefix bytes")
        );
        assert_eq!(in_prefix.reserved(1000), 2);
    }

    #[test]
    fn the_connection_buffer_reserves_from_the_prefix_and_gives_back_on_completion() {
        let buffer = MessageBuffer::new(1500);
        let mut first = framed(&buffer);
        first.cursor.advance(&message(800)[..5]);
        first.account().unwrap();
        assert_eq!(
            buffer.held(),
            805,
            "reserved at the prefix, before any byte of the message"
        );
        let mut second = framed(&buffer);
        second.cursor.advance(&message(800)[..5]);
        let status = second.account().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(buffer.held(), 805, "a refused take leaves the count alone");
        first.cursor.advance(&message(800)[5..]);
        first.account().unwrap();
        assert_eq!(buffer.held(), 0, "a finished message gives its bytes back");
        second.account().unwrap();
        assert_eq!(buffer.held(), 805);
        drop(second);
        assert_eq!(buffer.held(), 0, "a dropped body gives its bytes back");
    }

    #[test]
    fn a_prefix_in_pieces_is_reserved_step_by_step_and_all_given_back() {
        let buffer = MessageBuffer::new(1500);
        let mut body = framed(&buffer);
        let whole = message(800);
        body.cursor.advance(&whole[..2]);
        body.account().unwrap();
        assert_eq!(buffer.held(), 2, "two prefix bytes");
        body.cursor.advance(&whole[2..10]);
        body.account().unwrap();
        assert_eq!(buffer.held(), 805, "the whole message once its length is known");
        body.cursor.advance(&whole[10..]);
        body.account().unwrap();
        assert_eq!(buffer.held(), 0, "nothing left behind");
    }
}
