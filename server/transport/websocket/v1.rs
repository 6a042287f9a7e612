//! Protocol v1 (`docs/websocket-protocol.md`) as an adapter over the call
//! machine of protocol v2 ([`super::v2`]): a v1 socket is a socket with one
//! implicit call, [`CALL`], to the built-in `DataService`, opened with the
//! socket, without a deadline; v1's frames are that call's records in
//! another envelope:
//!
//! | v1 frame                 | record of call 1                         |
//! |--------------------------|------------------------------------------|
//! | `request` (client)       | `message` (the `StreamRequest`)          |
//! | `closeSend` (client)     | `closeSend`                              |
//! | `response` (server)      | `message`                                |
//! | `status` (server), Close | `status`: the call's end is the socket's |
//!
//! So credit, the drain, the liveness rules and the error statuses are the
//! machine's, written once. What v1 has and v2 has not lives here: no flow
//! control (the call's response credit never runs out, its request credit is
//! topped up without `window` frames: the server reads at most
//! `--ws-request-queue` messages ahead of writing their replies, and none
//! while a write waits), v1's error texts and a close code per error
//! ([`crate::error::Error`]).

use streambridge_protocol::v2::{self, Encoding};
use streambridge_protocol::{Subprotocol, client_frame, json, proto, server_frame};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};

use crate::error::Error;

/// The id of a v1 socket's one call.
pub const CALL: u32 = 1;

/// The subprotocol of a v1 socket whose messages are in `encoding`.
pub fn subprotocol(encoding: Encoding) -> Subprotocol {
    match encoding {
        Encoding::Json => Subprotocol::Json,
        Encoding::Proto => Subprotocol::Proto,
    }
}

/// The encoding of v1's `subprotocol`: the same as v2's of that name.
pub fn encoding(subprotocol: Subprotocol) -> Encoding {
    match subprotocol {
        Subprotocol::Json => Encoding::Json,
        Subprotocol::Proto => Encoding::Proto,
    }
}

/// The v1 frame a client's data message (text or binary) carries, or the
/// error that ends the call.
pub fn frame(message: Message, encoding: Encoding) -> Result<client_frame::Frame, Error> {
    Ok(match (message, encoding) {
        (Message::Text(text), Encoding::Json) => json::decode_client_frame(&text)?,
        (Message::Binary(bytes), Encoding::Proto) => proto::decode_client_frame(&bytes)?,
        (Message::Binary(_), Encoding::Json) => return Err(wrong_type("binary", "text", encoding)),
        (_, _) => return Err(wrong_type("text", "binary", encoding)),
    })
}

fn wrong_type(received: &'static str, expected: &'static str, encoding: Encoding) -> Error {
    Error::WrongFrameType {
        received,
        expected,
        subprotocol: subprotocol(encoding),
    }
}

/// What a failed read means on v1: the error that ends the call, and
/// whether the stream is still framed after it (else the peer's Close
/// cannot be read); `None` when the connection is gone.
pub fn read_error(error: WsError, limit: usize) -> Option<(Error, bool)> {
    Some(match error {
        // tungstenite stopped inside the frame: what follows is not framed.
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) => {
            (Error::MessageTooLarge { size, limit }, false)
        }
        // tungstenite ends the stream after this error: no Close can be read.
        WsError::Utf8(_) => (
            Error::InvalidFrame(streambridge_protocol::DecodeError(
                "text frame is not valid UTF-8".into(),
            )),
            false,
        ),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_) => return None,
        WsError::Protocol(violation) => (Error::ProtocolViolation(violation.to_string()), false),
        other => (Error::Internal(other.to_string()), false),
    })
}

/// The `status` frame for the call's last record.
pub fn append_status(encoding: Encoding, status: v2::Status, frame: &mut Vec<u8>) {
    let status = server_frame::Frame::Status(streambridge_protocol::Status {
        code: status.code,
        message: status.message,
    });
    match encoding {
        Encoding::Json => frame.extend_from_slice(json::encode_server_frame(&status).as_bytes()),
        Encoding::Proto => frame.extend_from_slice(&proto::encode_server_frame(status)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use clap::Parser;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
    use tokio::time::Instant;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::app::Core;
    use crate::config::Config;
    use crate::transport::websocket::{Protocol, SocketContext};

    const PING: Duration = Duration::from_secs(30);

    /// A v1 socket over an in-memory pipe: no real socket, so the paused
    /// clock can run the liveness rules to the millisecond.
    async fn pipe() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    async fn run_call<S: AsyncRead + AsyncWrite + Unpin>(server: WebSocketStream<S>) {
        let config = Config::try_parse_from([
            "streambridge",
            "--max-message-size",
            "1024",
            "--ws-request-queue",
            "4",
            "--ws-close-timeout",
            "5s",
            "--ws-ping-interval",
            "30s",
        ])
        .unwrap();
        let core = Core::new(&config).unwrap();
        let backend = core.builtin_backend(&config);
        let data_service = Some(core.calls.clone());
        let context = Arc::new(SocketContext::new(&config, backend, core.auth.clone(), data_service));
        let who = crate::policy::auth::Authenticated {
            caller: crate::policy::auth::Caller::Anonymous,
            client: None,
        };
        super::super::v2::run(server, Protocol::V1(Subprotocol::Json), context, &core.drain, who).await;
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
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut sink = vec![0u8; 4096];
            while let Ok(1..) = client.get_mut().read(&mut sink).await {}
        });
        let started = Instant::now();
        run_call(server).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "--ws-close-timeout, no more, no less"
        );
        reader.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_reads_no_further_ahead_than_its_request_queue() {
        // Requests come through a roomy pipe, replies leave through a tiny
        // one the client never reads: once the replies' pipe is full the
        // server must stop reading, having read at most --ws-request-queue
        // (4) requests beyond the replies it got out.
        let (requests_client, requests_server) = tokio::io::duplex(64 * 1024);
        let (replies_server, replies_client) = tokio::io::duplex(1024);
        // As the server configures its sockets: tungstenite reads 1 KiB at a time.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(1024);
        let server = WebSocketStream::from_raw_socket(
            tokio::io::join(requests_server, replies_server),
            Role::Server,
            Some(config),
        )
        .await;
        let mut client =
            WebSocketStream::from_raw_socket(tokio::io::join(replies_client, requests_client), Role::Client, None)
                .await;
        let request = Message::text(r#"{"request":{"data":"0123456789012345678901234567890123456789"}}"#);
        // Fill the requests' pipe (the paused clock jumps a stuck send's
        // timeout at once).
        async fn sends_until_blocked<S: AsyncRead + AsyncWrite + Unpin>(
            client: &mut WebSocketStream<S>,
            request: &Message,
        ) -> usize {
            let mut sent = 0;
            while tokio::time::timeout(Duration::from_secs(1), client.send(request.clone()))
                .await
                .is_ok()
            {
                sent += 1;
            }
            sent
        }
        let filled = sends_until_blocked(&mut client, &request).await;
        assert!(filled > 500, "the pipe takes {filled} requests");
        let server = tokio::spawn(run_call(server));
        // Idle until the server is stuck on its write.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let room = sends_until_blocked(&mut client, &request).await;
        // Replies of ~60 bytes: ~17 fit the replies' pipe; the requests read
        // for them, the 4 read ahead and tungstenite's 1 KiB read buffer
        // free the room for ~50. Without the bound the server reads all.
        assert!(room < 100, "the server read {room} requests ahead of their replies");
        server.abort();
    }

    #[test]
    fn a_frame_of_the_wrong_type_is_refused_with_1003() {
        let request = frame(Message::text(r#"{"request":{"data":"hi"}}"#), Encoding::Json).unwrap();
        assert!(matches!(request, client_frame::Frame::Request(r) if r.data == "hi"));
        let wrong = frame(Message::text("{}"), Encoding::Proto).err().unwrap();
        assert_eq!(wrong.close_code(), 1003);
        let wrong = frame(Message::binary(&b"{}"[..]), Encoding::Json).err().unwrap();
        assert_eq!(wrong.close_code(), 1003);
    }
}
