//! The stream processor: the one place that implements
//! `DataService.BidirectionalStream`, for every transport.
//!
//! It maps a stream of requests to a stream of replies and knows nothing of
//! gRPC, HTTP or WebSockets: transports adapt their own types to it. It must
//! never import a transport's types.
//!
//! Semantics (from the seed):
//! - each request gets exactly one reply, `result = "processed: " + data`, in
//!   request order;
//! - replies flow while the client is still sending: the output is produced
//!   lazily, one reply per request as soon as that request is pulled;
//! - the end of the input (the client's half-close) ends the output, after
//!   every reply;
//! - an error in the input ends the call: it is passed on as the last item.
//!
//! There is no task and no queue in here: the transport that polls the output
//! drives the input, so a slow reader slows the reading of requests
//! (backpressure) and a dropped output frees everything.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Stream, StreamExt};
use streambridge_protocol::{StreamRequest, StreamResponse};

/// What every reply's `result` starts with.
pub const REPLY_PREFIX: &str = "processed: ";

/// The reply to one request.
pub fn reply(request: StreamRequest) -> StreamResponse {
    StreamResponse {
        result: result_pieces(&request.data).concat(),
    }
}

/// The reply's `result` for a request's `data`, as the pieces it is made
/// of, in order: a transport that encodes replies in place writes them
/// without building the `String` (the v2 socket answers built-in calls so).
pub fn result_pieces(data: &str) -> [&str; 2] {
    [REPLY_PREFIX, data]
}

/// Runs one bidirectional call: the replies to `requests`, in order, ending
/// with the input's end or right after its first error.
pub fn process<S, E>(requests: S) -> Replies<S>
where
    S: Stream<Item = Result<StreamRequest, E>> + Unpin,
{
    Replies {
        requests,
        failed: false,
    }
}

/// The reply stream of [`process`]: a plain loop over the requests, one reply
/// per request, no allocation besides the reply itself.
pub struct Replies<S> {
    requests: S,
    failed: bool,
}

impl<S, E> Stream for Replies<S>
where
    S: Stream<Item = Result<StreamRequest, E>> + Unpin,
{
    type Item = Result<StreamResponse, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match ready!(self.requests.poll_next_unpin(cx)) {
            Some(Ok(request)) => Poll::Ready(Some(Ok(reply(request)))),
            Some(Err(error)) => {
                self.failed = true;
                Poll::Ready(Some(Err(error)))
            }
            None => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream;

    use super::*;

    fn request(data: &str) -> Result<StreamRequest, &'static str> {
        Ok(StreamRequest { data: data.into() })
    }

    async fn results(input: Vec<Result<StreamRequest, &'static str>>) -> Vec<Result<String, &'static str>> {
        process(stream::iter(input))
            .map(|r| r.map(|r| r.result))
            .collect()
            .await
    }

    #[tokio::test]
    async fn every_request_gets_one_reply_in_order() {
        let replies = results(vec![request("a"), request(""), request("ü")]).await;
        assert_eq!(
            replies,
            vec![
                Ok("processed: a".into()),
                Ok("processed: ".into()),
                Ok("processed: ü".into())
            ]
        );
    }

    #[tokio::test]
    async fn the_first_error_ends_the_call_after_earlier_replies() {
        let replies = results(vec![request("a"), Err("broken"), request("never")]).await;
        assert_eq!(replies, vec![Ok("processed: a".into()), Err("broken")]);
    }

    #[tokio::test]
    async fn a_reply_is_ready_before_the_next_request_exists() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<StreamRequest, &'static str>>();
        let mut replies = Box::pin(process(tokio_stream_wrapper(rx)));
        tx.send(request("first")).unwrap();
        let first = replies.next().await.unwrap().unwrap();
        assert_eq!(first.result, "processed: first");
        drop(tx);
        assert!(replies.next().await.is_none());
    }

    fn tokio_stream_wrapper<T>(mut rx: tokio::sync::mpsc::UnboundedReceiver<T>) -> impl Stream<Item = T> {
        stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
