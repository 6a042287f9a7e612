//! One bidirectional call over one WebSocket: client frames in, through the
//! [processor](crate::backend::processor), server frames out, then the final `status`
//! frame and the close.
//!
//! One task owns the socket and runs a `select!` loop, so there is no lock
//! between a reading and a writing half. Reading has priority, but only while
//! the request queue has room; the queue holds at most
//! [`CallSettings::request_queue`] requests ahead of their replies, so a client
//! that sends without reading makes the server stop reading it
//! (backpressure) instead of growing memory.
//!
//! Replies are coalesced: every reply already computed is fed to the socket,
//! then one flush writes them in as few syscalls as the buffer allows.
//!
//! A failure (bad frame, oversize frame, shutdown) stops the reading; the
//! replies to every request read before it are still delivered, then the
//! `status` frame says what went wrong and the close code matches it (see
//! [`crate::error`]). A client that goes away without `closeSend` cancels the
//! call: the task returns and everything it held is dropped.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use futures_util::{FutureExt, SinkExt, StreamExt};
use streambridge_protocol::{Status, StreamResponse, Subprotocol, client_frame, json, proto, server_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::queue::{RequestQueue, request_queue};
use crate::backend::processor;
use crate::error::Error;
use crate::ops::calls::CallGuard;
use crate::ops::metrics::StreamMetrics;
use crate::ops::shutdown::{Drain, DrainCheck};

/// The limits and buffer sizes of a WebSocket call (from [`crate::Config`]).
#[derive(Clone, Debug)]
pub struct CallSettings {
    /// Largest frame payload accepted, in bytes.
    pub max_message_size: usize,
    /// Bytes read from the kernel at a time; allocated per socket.
    pub read_buffer_size: usize,
    /// Bytes of frames gathered before a write.
    pub write_buffer_size: usize,
    /// Requests read ahead of their replies.
    pub request_queue: usize,
    /// How long to wait for the peer's Close frame, and to deliver the last frames.
    pub close_timeout: Duration,
    /// How often to ping the peer. A peer that has sent nothing (not even the
    /// pong) and accepted none of our replies by the next ping is gone: the
    /// call is cancelled. So is a peer that takes longer than two intervals
    /// to accept a batch of replies.
    pub ping_interval: Duration,
}

/// Where the client's request stream stands.
enum Input {
    /// Requests may come; the sender feeds the processor.
    Open(RequestQueue),
    /// The client sent `closeSend`. The socket is still read, to catch a
    /// client that breaks the protocol by sending on.
    HalfClosed,
    /// A failure stopped the reading; the call is finishing.
    Stopped,
}

/// How the reading side of the call ended.
enum Ending {
    /// Every reply is out: send the status (OK, or the failure) and close.
    Finish {
        failure: Option<Error>,
        framing_intact: bool,
    },
    /// The client went away (or closed) before the call finished: cancel.
    Cancelled,
}

/// Runs the call on `socket` to its end.
///
/// Not an `async fn`: one moves its arguments into locals of its future and
/// keeps their first slots as well (rust-lang/rust#62958), which for the
/// socket is 328 bytes of every idle socket's task.
#[expect(clippy::manual_async_fn, reason = "an async fn would hold the socket twice")]
pub fn run<S>(
    mut socket: WebSocketStream<S>,
    subprotocol: Subprotocol,
    settings: &CallSettings,
    drain: &Drain,
    guard: &mut CallGuard,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        match exchange(&mut socket, subprotocol, settings, drain, guard.metrics()).await {
            Ending::Cancelled => tracing::debug!("client left without closeSend; call cancelled"),
            Ending::Finish {
                failure,
                framing_intact,
            } => {
                if let Some(error) = &failure {
                    tracing::debug!(%error, code = ?error.code(), "call failed");
                }
                guard.set_code(
                    failure
                        .as_ref()
                        .map_or(streambridge_protocol::code::OK, |error| error.code() as i32),
                );
                let closing = finish(
                    &mut socket,
                    subprotocol,
                    failure,
                    framing_intact,
                    settings.close_timeout,
                );
                // Boxed: the close handshake is the largest state of a call and runs
                // once at its end; inline it would weigh on every idle socket.
                if tokio::time::timeout(settings.close_timeout * 2, Box::pin(closing))
                    .await
                    .is_err()
                {
                    tracing::debug!("peer did not complete the close handshake in time");
                }
            }
        }
    }
}

/// The request/reply loop, up to the moment the status can be sent.
async fn exchange<S>(
    socket: &mut WebSocketStream<S>,
    subprotocol: Subprotocol,
    settings: &CallSettings,
    drain: &Drain,
    counters: &StreamMetrics,
) -> Ending
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (queue, requests) = request_queue(settings.request_queue);
    let mut replies = std::pin::pin!(processor::process(requests).fuse());
    let mut input = Input::Open(queue);
    let mut failure = None;
    let mut framing_intact = true;
    let mut drain = DrainCheck::new(drain);
    let mut ping = tokio::time::interval_at(Instant::now() + settings.ping_interval, settings.ping_interval);
    // Delay, not burst: after a long blocked write the next ping waits a full
    // interval, so a slow but live peer is not judged on ticks it could not see.
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Whether the peer showed life (a frame read, or replies it accepted)
    // since the last ping.
    let mut heard_since_ping = true;

    loop {
        let may_read = match &input {
            Input::Open(queue) => queue.has_room(),
            Input::HalfClosed => true,
            Input::Stopped => false,
        };
        // Draining stops the reading of a call still open (a half-closed one
        // just finishes). A busy call notices within a few loops, an idle one
        // through the last branch below.
        let draining_allowed = matches!(input, Input::Open(_));
        if draining_allowed && drain.busy_check() {
            failure = Some(Error::ShuttingDown);
            input = Input::Stopped;
            continue;
        }
        tokio::select! {
            biased;
            _ = ping.tick() => {
                if !heard_since_ping {
                    tracing::debug!("peer did not answer the last ping; cancelling the call");
                    return Ending::Cancelled;
                }
                heard_since_ping = false;
                if !written(settings, socket.send(Message::Ping(Bytes::new()))).await {
                    return Ending::Cancelled;
                }
            }
            frame = socket.next(), if may_read => {
                heard_since_ping = true;
                let outcome = match frame {
                    Some(Ok(message)) => on_message(message, subprotocol, &mut input, counters),
                    Some(Err(error)) => on_read_error(error, settings.max_message_size, &mut framing_intact),
                    None => return Ending::Cancelled,
                };
                match outcome {
                    Read::Continue => {}
                    Read::Pong => {
                        // tungstenite queued a pong; send it now, not with the next reply.
                        if !written(settings, socket.flush()).await {
                            return Ending::Cancelled;
                        }
                    }
                    Read::Failed(error) => {
                        failure = Some(error);
                        input = Input::Stopped;
                    }
                    Read::ClosedByPeer => {
                        // tungstenite queued the answer to the peer's Close; send it
                        // so the peer sees a clean close, not a dropped connection.
                        let _ = tokio::time::timeout(settings.close_timeout, socket.flush()).await;
                        return Ending::Cancelled;
                    }
                    Read::Gone => return Ending::Cancelled,
                }
            }
            reply = replies.next() => {
                let Some(Ok(reply)) = reply else {
                    return Ending::Finish { failure, framing_intact };
                };
                let sending = send_replies(socket, subprotocol, reply, &mut replies, counters);
                if !written(settings, sending).await {
                    return Ending::Cancelled;
                }
                heard_since_ping = true;
            }
            () = std::future::poll_fn(|cx| drain.poll_idle(cx)), if draining_allowed => {
                failure = Some(Error::ShuttingDown);
                input = Input::Stopped;
            }
        }
    }
}

/// Awaits a write to the socket, at most two ping intervals: a peer that
/// accepts nothing for that long is gone, even if TCP keeps the connection
/// (a zero window is answered forever). Returns whether the write completed.
///
/// A plain function returning a mapped future, not an `async fn`: an async
/// fn would keep `write` twice (its argument, and inside the timeout), and
/// its state is part of every socket's task, idle or not.
fn written(settings: &CallSettings, write: impl Future<Output = Result<(), WsError>>) -> impl Future<Output = bool> {
    tokio::time::timeout(settings.ping_interval * 2, write).map(|outcome| match outcome {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::debug!("peer accepted nothing for two ping intervals; cancelling the call");
            false
        }
    })
}

/// What reading one frame led to.
enum Read {
    Continue,
    Pong,
    Failed(Error),
    /// The peer sent a Close frame (without finishing the call).
    ClosedByPeer,
    /// The connection is gone.
    Gone,
}

fn on_message(message: Message, subprotocol: Subprotocol, input: &mut Input, counters: &StreamMetrics) -> Read {
    let decoded = match (message, subprotocol) {
        (Message::Text(text), Subprotocol::Json) => json::decode_client_frame(&text),
        (Message::Binary(bytes), Subprotocol::Proto) => proto::decode_client_frame(&bytes),
        (Message::Text(_), Subprotocol::Proto) => return Read::Failed(wrong_type("text", "binary", subprotocol)),
        (Message::Binary(_), Subprotocol::Json) => return Read::Failed(wrong_type("binary", "text", subprotocol)),
        (Message::Ping(_), _) => return Read::Pong,
        (Message::Pong(_) | Message::Frame(_), _) => return Read::Continue,
        (Message::Close(_), _) => return Read::ClosedByPeer,
    };
    match (decoded, &*input) {
        (Err(error), _) => Read::Failed(error.into()),
        (Ok(client_frame::Frame::Request(request)), Input::Open(queue)) => {
            // The loop reads only while the queue has room.
            queue.push(request);
            counters.message_received();
            Read::Continue
        }
        (Ok(client_frame::Frame::CloseSend(_)), Input::Open(_)) => {
            *input = Input::HalfClosed;
            Read::Continue
        }
        (Ok(client_frame::Frame::Request(_)), _) => Read::Failed(Error::AfterCloseSend("request")),
        (Ok(client_frame::Frame::CloseSend(_)), _) => Read::Failed(Error::AfterCloseSend("closeSend")),
    }
}

fn wrong_type(received: &'static str, expected: &'static str, subprotocol: Subprotocol) -> Error {
    Error::WrongFrameType {
        received,
        expected,
        subprotocol,
    }
}

fn on_read_error(error: WsError, limit: usize, framing_intact: &mut bool) -> Read {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) => {
            // tungstenite stopped inside the frame: what follows is not framed.
            *framing_intact = false;
            Read::Failed(Error::MessageTooLarge { size, limit })
        }
        WsError::Utf8(_) => {
            // tungstenite ends the stream after this error: no Close can be read.
            *framing_intact = false;
            Read::Failed(Error::InvalidFrame(streambridge_protocol::DecodeError(
                "text frame is not valid UTF-8".into(),
            )))
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Read::Gone,
        WsError::Protocol(violation) => {
            *framing_intact = false;
            Read::Failed(Error::ProtocolViolation(violation.to_string()))
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => Read::Gone,
        other => {
            *framing_intact = false;
            Read::Failed(Error::Internal(other.to_string()))
        }
    }
}

/// Feeds `first` and every further reply that is ready now, then flushes once.
async fn send_replies<S, R>(
    socket: &mut WebSocketStream<S>,
    subprotocol: Subprotocol,
    first: StreamResponse,
    replies: &mut R,
    counters: &StreamMetrics,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: futures_util::Stream<Item = Result<StreamResponse, std::convert::Infallible>> + Unpin,
{
    let mut next = Some(first);
    while let Some(reply) = next {
        socket
            .feed(encode(subprotocol, server_frame::Frame::Response(reply)))
            .await?;
        counters.message_sent();
        next = match replies.next().now_or_never() {
            Some(Some(Ok(reply))) => Some(reply),
            _ => None,
        };
    }
    // Before the flush: once the client sees these replies, /metrics does too.
    counters.publish();
    socket.flush().await
}

fn encode(subprotocol: Subprotocol, frame: server_frame::Frame) -> Message {
    match subprotocol {
        Subprotocol::Json => Message::text(json::encode_server_frame(&frame)),
        Subprotocol::Proto => Message::Binary(Bytes::from(proto::encode_server_frame(frame))),
    }
}

/// Sends the status frame and the close, then waits for the peer's close so
/// that nothing the peer sent is left unread when the connection drops.
async fn finish<S>(
    socket: &mut WebSocketStream<S>,
    subprotocol: Subprotocol,
    failure: Option<Error>,
    framing_intact: bool,
    close_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (status, close_code) = match &failure {
        None => (
            Status {
                code: streambridge_protocol::code::OK,
                message: String::new(),
            },
            1000,
        ),
        Some(error) => (
            Status {
                code: error.code() as i32,
                message: error.to_string(),
            },
            error.close_code(),
        ),
    };
    let reason = close_reason(&status.message);
    let close = CloseFrame {
        code: CloseCode::from(close_code),
        reason: reason.into(),
    };
    let sent = async {
        socket
            .feed(encode(subprotocol, server_frame::Frame::Status(status)))
            .await?;
        socket.send(Message::Close(Some(close))).await
    };
    if sent.await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(close_timeout, drain_after_close(socket, framing_intact)).await;
}

/// After our Close is out: reads until the peer ends the connection, so
/// that nothing it sent is left unread when ours drops (unread data turns
/// the close into a TCP reset, which destroys what the peer has not read
/// yet). Unbounded: the caller bounds it.
pub(super) async fn drain_after_close<S>(socket: &mut WebSocketStream<S>, framing_intact: bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if framing_intact {
        // Frames after ours are discarded until the peer's Close ends the stream.
        while let Some(Ok(_)) = socket.next().await {}
    } else {
        // The peer's Close cannot be parsed any more: end our side of the
        // TCP connection (our Close is out) and drop its bytes until it
        // ends its side.
        let io = socket.get_mut();
        if io.shutdown().await.is_ok() {
            discard_until_eof(io).await;
        }
    }
}

/// Reads and drops raw bytes until the peer closes the connection.
async fn discard_until_eof(io: &mut (impl AsyncRead + Unpin)) {
    // On the heap: an array here would be part of every socket's future
    // (4 KiB on each idle socket), for the rare connection that gets here.
    let mut sink = vec![0u8; 4096];
    while let Ok(1..) = io.read(&mut sink).await {}
}

/// The close frame's reason: the status message, cut to the 123 bytes a
/// close frame allows, on a character boundary.
fn close_reason(message: &str) -> String {
    const MAX: usize = 123;
    if message.len() <= MAX {
        return message.to_string();
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::calls::ActiveCalls;
    use crate::transport::Transport;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_util::sync::CancellationToken;

    const PING: Duration = Duration::from_secs(30);

    /// A call over an in-memory pipe: no real socket, so the paused clock
    /// can run the liveness rules to the millisecond.
    async fn pipe() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    async fn run_call(server: WebSocketStream<DuplexStream>) {
        let settings = CallSettings {
            max_message_size: 1024,
            read_buffer_size: 1024,
            write_buffer_size: 1024,
            request_queue: 4,
            close_timeout: Duration::from_secs(5),
            ping_interval: PING,
        };
        let calls = ActiveCalls::default();
        let mut guard = calls.enter(Transport::WebSocket);
        run(
            server,
            Subprotocol::Json,
            &settings,
            &Drain::follow(&CancellationToken::new(), &tokio_util::task::TaskTracker::new()),
            &mut guard,
        )
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_no_ping_is_cancelled_at_the_second_ping() {
        let (server, _silent_client) = pipe().await;
        let started = Instant::now();
        tokio::time::timeout(PING * 10, run_call(server))
            .await
            .expect("a silent peer is cancelled");
        assert_eq!(
            started.elapsed(),
            PING * 2,
            "the first ping goes unanswered, the second ends it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_pings_stays_however_long_it_says_nothing_else() {
        let (server, mut client) = pipe().await;
        // Reading answers each ping (tungstenite queues the pong and sends it).
        let reader = tokio::spawn(async move { while let Some(Ok(_)) = client.next().await {} });
        let still_running = tokio::time::timeout(PING * 20, run_call(server)).await.is_err();
        assert!(still_running, "a live peer was cancelled");
        reader.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_accepts_no_reply_for_two_intervals_is_cancelled() {
        let (server, mut client) = pipe().await;
        // Requests until the pipe is full, and no read: the server's replies
        // stop being accepted once the pipe's buffer is full.
        let sender = tokio::spawn(async move {
            let request = format!(r#"{{"request":{{"data":"{}"}}}}"#, "x".repeat(1000));
            while client.send(Message::text(request.clone())).await.is_ok() {}
        });
        let started = Instant::now();
        run_call(server).await;
        assert_eq!(started.elapsed(), PING * 2, "a blocked write gets two ping intervals");
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_close_handshake_waits_one_close_timeout_for_the_peers_close() {
        let (server, mut client) = pipe().await;
        client.send(Message::text(r#"{"closeSend":{}}"#)).await.unwrap();
        // From here the client reads raw bytes: it sees the status and the
        // server's Close but never answers it.
        let reader = tokio::spawn(async move { discard_until_eof(client.get_mut()).await });
        let started = Instant::now();
        run_call(server).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "--ws-close-timeout, no more, no less"
        );
        reader.abort();
    }

    #[test]
    fn close_reasons_fit_a_control_frame_and_stay_utf8() {
        let long = "é".repeat(100);
        let reason = close_reason(&long);
        assert!(reason.len() <= 123);
        assert!(long.starts_with(&reason));
        assert_eq!(close_reason("short"), "short");
    }
}
