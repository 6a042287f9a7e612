//! A request body paced by its caller's message rate limit
//! (`--limit-messages-per-second`): each request message is paid for from
//! the caller's bucket before the service sees it. Short of tokens, the
//! body hands the service the messages already paid for and stops reading
//! until the bucket refills; nothing is dropped. Not reading is what slows
//! the sender: on native gRPC and gRPC-Web the HTTP/2 stream's window fills,
//! and on WebSocket v2 the request body grants no new credit until it is
//! read.
//!
//! One chunk of the inner body is held at a time, so what the pacing holds
//! is bounded by the transport's own chunk (an HTTP/2 frame, a v2 batch).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use streambridge_protocol::grpc::{PREFIX_LEN, PrefixCursor};
use tokio::time::Sleep;

use super::limits::{MessageMeter, Paid};

/// `inner`, its messages paid for from `meter` before they pass.
pub struct PacedBody<B> {
    inner: B,
    meter: MessageMeter,
    cursor: PrefixCursor,
    /// Bytes of a chunk not handed on yet, and where in them each message
    /// not yet paid for starts.
    held: Bytes,
    unpaid: Vec<usize>,
    /// Until the bucket has a token again.
    wait: Option<Pin<Box<Sleep>>>,
}

impl<B> PacedBody<B> {
    pub fn new(inner: B, meter: MessageMeter) -> PacedBody<B> {
        PacedBody {
            inner,
            meter,
            cursor: PrefixCursor::default(),
            held: Bytes::new(),
            unpaid: Vec::new(),
            wait: None,
        }
    }

    /// Pays for what it can of the held chunk: the bytes that may pass now
    /// (empty when the first message held is still unpaid).
    fn release(&mut self) -> Bytes {
        match self.meter.pay(self.unpaid.len()) {
            Paid::All => {
                self.unpaid.clear();
                std::mem::take(&mut self.held)
            }
            Paid::Part { paid, retry } => {
                self.wait = Some(Box::pin(tokio::time::sleep_until(retry)));
                // Up to the first message still owed (its prefix included).
                let cut = self.unpaid[paid];
                self.unpaid.drain(..paid);
                for start in &mut self.unpaid {
                    *start -= cut;
                }
                self.held.split_to(cut)
            }
        }
    }
}

impl<B> Body for PacedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(wait) = &mut this.wait {
                ready!(wait.as_mut().poll(cx));
                this.wait = None;
            }
            if !this.held.is_empty() {
                let passing = this.release();
                if !passing.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(passing))));
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                other => return Poll::Ready(other),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                // Trailers: nothing to pay for.
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            let unpaid = &mut this.unpaid;
            let _ = this.cursor.advance(&data, |prefix| {
                // A prefix cut by the previous chunk began before this one.
                unpaid.push(prefix.end.saturating_sub(PREFIX_LEN));
                Ok::<(), ()>(())
            });
            this.held = data;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let held = self.held.len() as u64;
        hint.set_lower(hint.lower() + held);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use http_body_util::{BodyExt, StreamBody};
    use streambridge_protocol::grpc::put_message;

    use super::*;
    use crate::policy::auth::Caller;
    use crate::policy::limits::{LimitSettings, RateLimits};

    fn meter(per_second: u32, burst: u32) -> MessageMeter {
        let limits = RateLimits::new(LimitSettings {
            messages: (NonZeroU32::new(per_second), NonZeroU32::new(burst)),
            ..Default::default()
        });
        limits
            .message_meter(&Caller::Token, None)
            .expect("messages are limited")
    }

    // Real time: the buckets keep their own clock.
    #[tokio::test]
    async fn messages_past_the_burst_wait_for_the_bucket_and_none_is_lost() {
        // Ten messages in one chunk, a burst of four, twenty tokens a second.
        let mut chunk = bytes::BytesMut::new();
        for i in 0..10u8 {
            put_message(&mut chunk, &[i; 3]);
        }
        let whole = chunk.freeze();
        let chunks = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(whole.clone()))]);
        let mut body = PacedBody::new(StreamBody::new(chunks), meter(20, 4));
        let started = tokio::time::Instant::now();
        let mut passed = Vec::new();
        let mut times = Vec::new();
        while let Some(frame) = body.frame().await {
            passed.extend_from_slice(&frame.unwrap().into_data().unwrap());
            times.push(started.elapsed());
        }
        assert_eq!(passed, whole, "every byte, in order");
        // The burst first, then the rest as the bucket refills: a lower
        // bound only (the bucket cannot be faster), never an upper one.
        assert!(times.len() > 1, "held back, not passed whole: {times:?}");
        let last = *times.last().unwrap();
        assert!(
            last >= std::time::Duration::from_millis(250),
            "six messages past the burst at twenty a second: {times:?}"
        );
    }
}
