//! A chat room, hosted in process behind every streambridge transport:
//! your own tonic service instead of the built-in `DataService`.
//!
//! ```sh
//! cargo run --example chat -- --listen 127.0.0.1:8080
//! grpcurl -plaintext -d '{"name":"ann"} {"text":"hi"}' 127.0.0.1:8080 streambridge.examples.chat.ChatRoom/Join
//! ```
//!
//! `Join` is a bidirectional stream: every member receives every event of
//! the room (joins, messages, leaves) in one order, numbered without gaps;
//! `Members` is a unary call. Native gRPC, gRPC-Web and WebSocket protocol
//! v2 reach both (v2 also in JSON: the descriptor set is registered, which
//! reflection uses too).
//!
//! A member that reads too slowly to keep up with the room is told so
//! (RESOURCE_EXHAUSTED, with how much it missed) rather than silently
//! skipping events.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("streambridge.examples.chat");
}

use pb::chat_room_server::{ChatRoom, ChatRoomServer};
use pb::event::Kind;
use pb::{Event, MembersReply, MembersRequest, Say};

/// For reflection (and, with WebSocket protocol v2, JSON).
const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chat_descriptor.bin"));

/// Events a member may fall behind by before it is told it missed some.
const BACKLOG: usize = 1024;

/// The room: who is in it, and the stream of its events.
#[derive(Clone)]
pub struct Room {
    inner: Arc<RoomInner>,
}

struct RoomInner {
    /// Sequence numbers are handed out under this lock, so the broadcast
    /// order is the numbering order.
    state: Mutex<RoomState>,
    events: broadcast::Sender<(u64, Event)>,
    next_member: AtomicU64,
}

#[derive(Default)]
struct RoomState {
    sequence: u64,
    members: BTreeMap<u64, String>,
}

impl Default for Room {
    fn default() -> Self {
        Room {
            inner: Arc::new(RoomInner {
                state: Mutex::default(),
                events: broadcast::channel(BACKLOG).0,
                next_member: AtomicU64::new(1),
            }),
        }
    }
}

impl Room {
    /// Numbers `event` and sends it to every member; `member` is its author.
    fn publish(&self, member: u64, kind: Kind, name: &str, text: String, change: impl FnOnce(&mut RoomState)) {
        let mut state = self.inner.state.lock().unwrap();
        change(&mut state);
        state.sequence += 1;
        let event = Event {
            kind: kind as i32,
            name: name.to_string(),
            text,
            sequence: state.sequence,
        };
        // No receivers is fine: the room is empty.
        let _ = self.inner.events.send((member, event));
    }
}

/// One member's presence. Its leaving is announced exactly once: when the
/// member half-closes or its call fails (the reader sees it), or at the
/// latest when both halves of the call are gone.
struct Membership {
    room: Room,
    id: u64,
    name: String,
    left: std::sync::atomic::AtomicBool,
}

impl Membership {
    fn leave(&self) {
        if self.left.swap(true, Ordering::SeqCst) {
            return;
        }
        let id = self.id;
        self.room.publish(id, Kind::Left, &self.name, String::new(), |state| {
            state.members.remove(&id);
        });
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave();
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl ChatRoom for Room {
    type JoinStream = Events;

    async fn join(&self, request: Request<Streaming<Say>>) -> Result<Response<Events>, Status> {
        let mut says = request.into_inner();
        let name = match says.next().await {
            Some(Ok(first)) if !first.name.trim().is_empty() => first.name,
            Some(Ok(_)) => return Err(Status::invalid_argument("the first message names you: set `name`")),
            Some(Err(status)) => return Err(status),
            None => return Err(Status::invalid_argument("the stream ended before naming you")),
        };
        let id = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        // Subscribe first, so the member sees its own arrival.
        let events = self.inner.events.subscribe();
        self.publish(id, Kind::Joined, &name, String::new(), |state| {
            state.members.insert(id, name.clone());
        });
        let membership = Arc::new(Membership {
            room: self.clone(),
            id,
            name,
            left: Default::default(),
        });

        // What the member says, read until it half-closes or goes away.
        let speaker = membership.clone();
        tokio::spawn(async move {
            while let Some(Ok(say)) = says.next().await {
                speaker
                    .room
                    .publish(speaker.id, Kind::Message, &speaker.name, say.text, |_| {});
            }
            speaker.leave();
        });

        // What the member hears, until its own leaving comes round.
        let replies = futures_util::stream::unfold((events, Some(membership)), |(mut events, membership)| async move {
            let member = membership.as_ref()?.id;
            match events.recv().await {
                Ok((author, event)) if author == member && event.kind() == Kind::Left => None,
                Ok((_, event)) => Some((Ok(event), (events, membership))),
                Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                    Err(Status::resource_exhausted(format!(
                        "you fell {missed} events behind the room (it keeps {BACKLOG}); join again"
                    ))),
                    (events, None),
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn members(&self, _: Request<MembersRequest>) -> Result<Response<MembersReply>, Status> {
        let names = self.inner.state.lock().unwrap().members.values().cloned().collect();
        Ok(Response::new(MembersReply { names }))
    }
}

/// The server: streambridge's flags, the chat room instead of `DataService`.
async fn start(config: streambridge::Config) -> Result<streambridge::Server, streambridge::StartError> {
    streambridge::Server::builder(config)
        .add_service(ChatRoomServer::new(Room::default()))
        .register_file_descriptor_set(DESCRIPTORS)
        .bind()
        .await
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().init();
    let server = match start(streambridge::Config::parse()).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("chat: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(addr) = server.local_addr() {
        tracing::info!("chat room listening on {addr}: native gRPC, gRPC-Web and WebSocket");
    }
    let shutdown = server.shutdown_token();
    tokio::spawn(async move {
        streambridge::termination_signal().await;
        shutdown.cancel();
    });
    if server.run().await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use pb::chat_room_client::ChatRoomClient;

    const STEP: Duration = Duration::from_secs(20);

    async fn next(events: &mut Streaming<Event>) -> Event {
        tokio::time::timeout(STEP, events.message())
            .await
            .expect("an event in time")
            .expect("no error")
            .expect("the stream is open")
    }

    async fn join(addr: std::net::SocketAddr, name: &str) -> (mpsc::Sender<Say>, Streaming<Event>) {
        let mut client = ChatRoomClient::connect(format!("http://{addr}")).await.unwrap();
        let (say, says) = mpsc::channel(8);
        say.send(Say {
            name: name.into(),
            text: String::new(),
        })
        .await
        .unwrap();
        let events = client.join(ReceiverStream::new(says)).await.unwrap().into_inner();
        (say, events)
    }

    fn say(text: &str) -> Say {
        Say {
            name: String::new(),
            text: text.into(),
        }
    }

    #[tokio::test]
    async fn what_one_member_says_every_member_hears_in_one_order() {
        let server = start(streambridge::Config::with_listen("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = server.shutdown_token();
        tokio::spawn(server.run());

        let (ann_says, mut ann) = join(addr, "ann").await;
        let joined = next(&mut ann).await;
        assert_eq!((joined.kind(), joined.name.as_str()), (Kind::Joined, "ann"));
        let (bob_says, mut bob) = join(addr, "bob").await;
        assert_eq!(next(&mut ann).await.name, "bob", "ann sees bob arrive");
        assert_eq!(next(&mut bob).await.name, "bob");

        ann_says.send(say("hi bob")).await.unwrap();
        bob_says.send(say("hi ann")).await.unwrap();
        let heard_by_ann = [next(&mut ann).await, next(&mut ann).await];
        let heard_by_bob = [next(&mut bob).await, next(&mut bob).await];
        assert_eq!(heard_by_ann, heard_by_bob, "one order for everyone");
        let sequences: Vec<_> = heard_by_ann.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, [3, 4], "numbered without gaps");

        // The unary method, by gRPC-Web over HTTP/1.1: another transport, same service.
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<bytes::Bytes>>();
        let request = http::Request::post(format!("http://{addr}/streambridge.examples.chat.ChatRoom/Members"))
            .header("content-type", "application/grpc-web+proto")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let reply = client.request(request).await.unwrap();
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let members: MembersReply = prost::Message::decode(&body[5..5 + length]).unwrap();
        assert_eq!(members.names, ["ann", "bob"]);

        // The same method over WebSocket protocol v2 in JSON, transcoded with
        // the descriptor set registered above.
        {
            use futures_util::SinkExt;
            use tokio_tungstenite::tungstenite::Message;
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
            request
                .headers_mut()
                .insert("sec-websocket-protocol", "streambridge.v2.json".parse().unwrap());
            let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
            socket
                .send(Message::text(
                    r#"[{"call":1,"open":{"method":"/streambridge.examples.chat.ChatRoom/Members"}},{"call":1,"message":{}},{"call":1,"closeSend":{}}]"#,
                ))
                .await
                .unwrap();
            let mut records = Vec::new();
            while !records.iter().any(|r: &serde_json::Value| r.get("status").is_some()) {
                let message = tokio::time::timeout(STEP, socket.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                let batch: Vec<serde_json::Value> = serde_json::from_str(message.to_text().unwrap()).unwrap();
                records.extend(batch);
            }
            let reply = records.iter().find_map(|r| r.get("message")).expect("a reply");
            assert_eq!(reply["names"], serde_json::json!(["ann", "bob"]));
            let status = records.iter().find_map(|r| r.get("status")).unwrap();
            assert_eq!(status["code"], 0, "{records:?}");
        }

        // Bob half-closes: he leaves, his stream ends, ann is told.
        drop(bob_says);
        assert!(
            tokio::time::timeout(STEP, bob.message())
                .await
                .unwrap()
                .unwrap()
                .is_none()
        );
        let left = next(&mut ann).await;
        assert_eq!((left.kind(), left.name.as_str()), (Kind::Left, "bob"));
        drop(ann_says);
        shutdown.cancel();
    }
}
