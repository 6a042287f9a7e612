//! The gRPC length-prefixed framing of a request body, followed as it passes
//! to tonic (native gRPC, and gRPC-Web after tonic-web's translation), for
//! two things tonic does not do:
//!
//! - **a truncated last message is an error**: a body that ends inside a
//!   message (its 5-byte prefix declared bytes that never came) fails the
//!   call with INTERNAL; tonic would end the stream as if it were complete
//!   and the call with OK;
//! - **unfinished messages are bounded per connection**: tonic buffers a
//!   message until all of it has arrived (up to `--max-message-size`), and a
//!   connection may carry up to `--http2-max-concurrent-streams` calls, each
//!   with one unfinished message. [`MessageBuffer`] counts those bytes for
//!   the whole connection; a call whose data would take it past
//!   `--connection-message-buffer` fails with RESOURCE_EXHAUSTED.
//!
//! The work per chunk is a walk over its message prefixes; the shared counter
//! is touched only when the chunk leaves a message unfinished.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Frame, SizeHint};
use tonic::Status;

/// Boxed, as tonic's body errors are; tonic takes a [`Status`] found in it as
/// the call's status.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The bytes of unfinished messages one connection holds, and its limit.
/// One per connection, carried to the calls in the request extensions.
#[derive(Clone, Debug)]
pub struct MessageBuffer(Arc<MessageBufferInner>);

#[derive(Debug)]
struct MessageBufferInner {
    held: AtomicUsize,
    limit: usize,
}

impl MessageBuffer {
    pub fn new(limit: usize) -> Self {
        MessageBuffer(Arc::new(MessageBufferInner {
            held: AtomicUsize::new(0),
            limit,
        }))
    }

    /// Takes `bytes` more, unless that would pass the limit.
    fn take(&self, bytes: usize) -> Result<(), usize> {
        let inner = &self.0;
        inner
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= inner.limit)
            })
            .map(drop)
    }

    fn give_back(&self, bytes: usize) {
        self.0.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes held now (for tests and metrics).
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Acquire)
    }
}

/// The gRPC services behind a [`FramedBody`] each: what both gRPC
/// transports call.
#[derive(Clone, Debug)]
pub struct FollowFraming<S>(pub S);

impl<S, B> tower::Service<http::Request<B>> for FollowFraming<S>
where
    S: tower::Service<http::Request<FramedBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        let buffer = request.extensions().get::<MessageBuffer>().cloned();
        self.0.call(request.map(|body| FramedBody::new(body, buffer)))
    }
}

/// Where a body stands in its sequence of length-prefixed messages.
#[derive(Debug, Default)]
struct MessageCursor {
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// The current message's declared length, once its prefix is complete.
    declared: usize,
    /// Bytes of the current message's body still to come.
    remaining: usize,
    /// Bytes of the current, unfinished message (prefix included) seen so far.
    unfinished: usize,
}

impl MessageCursor {
    /// Follows the framing through `data`.
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                self.unfinished += n;
                data = &data[n..];
                if self.remaining == 0 {
                    self.unfinished = 0;
                }
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            self.unfinished += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let length = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                self.declared = length as usize;
                self.remaining = self.declared;
                if self.remaining == 0 {
                    self.unfinished = 0;
                }
            }
        }
    }

    /// Why the body may not end here, if it is inside a message.
    fn truncation(&self) -> Option<String> {
        if self.prefix_len > 0 {
            Some(format!(
                "request truncated: the body ended after {} of a message's 5 prefix bytes",
                self.prefix_len
            ))
        } else if self.remaining > 0 {
            Some(format!(
                "request truncated: a message declared {} bytes but the body ended after {}",
                self.declared,
                self.declared - self.remaining
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
}

impl<B> FramedBody<B> {
    /// `body`, its unfinished message counted in `buffer` if there is one.
    pub fn new(body: B, buffer: Option<MessageBuffer>) -> Self {
        FramedBody {
            body,
            cursor: MessageCursor::default(),
            buffer,
            held: 0,
        }
    }

    /// Brings the connection's count in line with the cursor.
    fn account(&mut self) -> Result<(), Status> {
        let Some(buffer) = &self.buffer else { return Ok(()) };
        let now = self.cursor.unfinished;
        if now > self.held {
            if buffer.take(now - self.held).is_err() {
                return Err(Status::resource_exhausted(format!(
                    "this connection already holds {} bytes of unfinished messages, the limit \
                     (--connection-message-buffer) is {}; send large messages one at a time",
                    buffer.held(),
                    buffer.0.limit
                )));
            }
        } else if now < self.held {
            buffer.give_back(self.held - now);
        }
        self.held = now;
        Ok(())
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
        match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.cursor.advance(data.chunk());
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
        self.body.is_end_stream() && self.cursor.truncation().is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend((len as u32).to_be_bytes());
        bytes.resize(5 + len, b'x');
        bytes
    }

    #[test]
    fn whole_messages_in_any_split_leave_nothing_unfinished() {
        let body: Vec<u8> = [message(3), message(0), message(10)].concat();
        for split in 0..=body.len() {
            let mut cursor = MessageCursor::default();
            cursor.advance(&body[..split]);
            cursor.advance(&body[split..]);
            assert_eq!(cursor.truncation(), None, "split at {split}");
            assert_eq!(cursor.unfinished, 0);
        }
    }

    #[test]
    fn a_body_ending_inside_a_message_is_truncated() {
        let mut cursor = MessageCursor::default();
        cursor.advance(&message(3));
        cursor.advance(&message(1000)[..5]);
        assert_eq!(cursor.unfinished, 5);
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
    }

    #[test]
    fn the_connection_buffer_refuses_past_its_limit_and_takes_back_on_completion() {
        let buffer = MessageBuffer::new(100);
        let mut first = FramedBody::new((), Some(buffer.clone()));
        first.cursor.advance(&message(200)[..80]);
        first.account().unwrap();
        assert_eq!(buffer.held(), 80);
        let mut second = FramedBody::new((), Some(buffer.clone()));
        second.cursor.advance(&message(200)[..30]);
        let status = second.account().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(buffer.held(), 80, "a refused take leaves the count alone");
        first.cursor.advance(&message(200)[80..]);
        first.account().unwrap();
        assert_eq!(buffer.held(), 0, "a finished message gives its bytes back");
        second.account().unwrap();
        assert_eq!(buffer.held(), 30);
        drop(second);
        assert_eq!(buffer.held(), 0, "a dropped body gives its bytes back");
    }
}
