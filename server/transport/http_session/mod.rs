//! Protocol v2 over plain HTTP at `/ws`, for networks whose proxies refuse
//! WebSocket upgrades (docs/protocol-v2.md, "HTTP binding"):
//!
//! - `GET /ws?protocol=streambridge.v2.proto` (no `Upgrade`) opens a session
//!   and is its down-stream: a `text/event-stream` response that carries the
//!   session id, then the server's batches as events, for as long as the
//!   session lives;
//! - `POST /ws?session=ID&seq=N` carries one batch of the client's records
//!   (an empty body answers a ping), applied in `seq` order (up to
//!   [`POSTS_IN_FLIGHT`] pipelined); 204 once the session has it.
//!
//! A session is the same call machine as a WebSocket ([`wire`] makes it
//! look like one), so every rule of protocol v2 holds on it unchanged. What
//! is HTTP's own lives here: the session table and its cap, the `seq`
//! order, the POST's size limit, and the answers a client reconnects on.

mod wire;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use streambridge_protocol::v2::Encoding;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tower_http::cors::CorsLayer;
use tracing::Instrument;

use self::wire::Posted;
use crate::config::Config;
use crate::net::listener::{ConnectionLease, PeerAddr};
use crate::policy::auth::Authenticated;
use crate::policy::origin::{OriginPolicy, PREFLIGHT_MAX_AGE};
use crate::transport::Transport;
use crate::transport::websocket::{self, Protocol, SocketContext, WebSocketState};

/// POSTs one session may have in flight: a client pipelines them (each is a
/// round trip), the server applies them in `seq` order; their bodies are
/// what a session holds in memory besides its calls.
const POSTS_IN_FLIGHT: usize = 4;

/// The request credit an HTTP session's calls are kept topped up to.
const HTTP_REQUEST_CREDIT: u16 = 4096;

/// The HTTP sessions of one server; cheap to clone.
#[derive(Clone)]
pub struct HttpSessions(Arc<Sessions>);

struct Sessions {
    live: Mutex<HashMap<Box<str>, Arc<Inbox>>>,
    /// `--http-max-sessions`.
    max: usize,
    /// `--http-session-route`, with its `.`, or empty.
    prefix: String,
    /// `--request-body-timeout`: a POST body that stalls this long fails.
    body_timeout: std::time::Duration,
    /// The machine's context for sessions: the sockets' own, labelled
    /// `http`, pinging every half of `--http-session-idle-timeout`.
    context: Arc<SocketContext>,
}

/// Where a session's POSTs go, in order.
struct Inbox {
    encoding: Encoding,
    /// POSTs of the session between their start and their answer.
    posting: AtomicUsize,
    /// The `seq` the next new POST must carry, as a POST ahead of its turn
    /// waits for it.
    turn: watch::Sender<u64>,
    /// Where batches go, one POST at a time, in `seq` order.
    state: tokio::sync::Mutex<InboxState>,
}

struct InboxState {
    /// The `seq` the next new POST must carry.
    next_seq: u64,
    to_machine: mpsc::Sender<Posted>,
}

/// A POST's place among its session's in flight; freed when it is answered.
struct Posting<'a>(&'a AtomicUsize);

impl Drop for Posting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Inbox {
    /// A place for one more POST, unless [`POSTS_IN_FLIGHT`] are in flight.
    fn posting(&self) -> Option<Posting<'_>> {
        let before = self.posting.fetch_add(1, Ordering::Relaxed);
        let posting = Posting(&self.posting);
        (before < POSTS_IN_FLIGHT).then_some(posting)
    }
}

impl HttpSessions {
    pub fn new(config: &Config, sockets: &SocketContext) -> HttpSessions {
        let mut settings = (*sockets.settings).clone();
        // The machine's ping rule ("silent for a whole interval is gone";
        // a write untaken for two intervals is gone) becomes the idle timeout.
        settings.ping_interval = config.http_session_idle_timeout / 2;
        // Each POST is a browser round trip of a few milliseconds: the
        // credit a call has per round trip bounds its rate, so calls here
        // are kept topped up to four times a socket's.
        // Memory stays bounded by the session's byte budget (--ws-socket-buffer).
        settings.request_credit = HTTP_REQUEST_CREDIT;
        let context = SocketContext {
            settings: Arc::new(settings),
            transport: Transport::Http,
            ..sockets.clone()
        };
        HttpSessions(Arc::new(Sessions {
            live: Mutex::default(),
            max: config.http_max_sessions,
            prefix: config
                .http_session_route
                .as_ref()
                .map(|route| format!("{route}."))
                .unwrap_or_default(),
            body_timeout: config.request_body_timeout,
            context: Arc::new(context),
        }))
    }

    fn inbox(&self, id: &str) -> Option<Arc<Inbox>> {
        self.0.live.lock().expect("not poisoned").get(id).cloned()
    }

    fn end(&self, id: &str) {
        self.0.live.lock().expect("not poisoned").remove(id);
    }
}

/// Whether a request at `/ws` is for the HTTP binding rather than a
/// WebSocket upgrade: no `Upgrade` header, and the binding's parameters.
pub fn is_for_http_session(request: &Request) -> bool {
    !request.headers().contains_key(http::header::UPGRADE)
        && query(request, "protocol")
            .or_else(|| query(request, "session"))
            .is_some()
}

/// CORS for `/ws`, so a page served from another allowed origin can use the
/// HTTP sessions (a WebSocket is not subject to CORS: its origin is checked
/// at the upgrade): the answers carry `Access-Control-Allow-Origin`, and a
/// GET with a token (`Authorization`) passes its preflight.
pub fn cors(origins: &OriginPolicy) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(origins.cors_origins())
        .allow_methods([http::Method::GET, http::Method::POST])
        .allow_headers([AUTHORIZATION, CONTENT_TYPE])
        .max_age(PREFLIGHT_MAX_AGE)
}

/// `GET /ws?protocol=…`: opens a session; the answer is its down-stream.
pub async fn open(state: WebSocketState, request: Request) -> Response {
    if request.method() != http::Method::GET {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "an HTTP session is opened with GET /ws?protocol=… and fed with POST /ws?session=…&seq=…",
        );
    }
    let name = query(&request, "protocol").unwrap_or_default();
    let Some(encoding) = Encoding::from_name(name) else {
        let supported = Encoding::ALL.map(Encoding::name).join(", ");
        return refuse(
            StatusCode::BAD_REQUEST,
            &format!("the HTTP binding speaks protocol v2 only; protocol {name:?} is not one of: {supported}"),
        );
    };
    let (parts, _) = request.into_parts();
    let caller = match websocket::admit(&state, &parts, &[], "send `Authorization: Bearer <token>`").await {
        Ok(caller) => caller,
        Err(refusal) => return refusal,
    };
    let sessions = &state.http_sessions;
    let id = format!("{}{}", sessions.0.prefix, random_id());
    let (wire, down_stream, to_machine) = wire::session(wire::session_event(
        &id,
        encoding,
        sessions.0.context.settings.ping_interval,
    ));
    {
        let mut live = sessions.0.live.lock().expect("not poisoned");
        if live.len() >= sessions.0.max {
            drop(live);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "this server holds its most HTTP sessions ({}, --http-max-sessions); try again later",
                    sessions.0.max
                ),
            );
        }
        let inbox = Arc::new(Inbox {
            encoding,
            posting: AtomicUsize::new(0),
            turn: watch::Sender::new(0),
            state: tokio::sync::Mutex::new(InboxState {
                next_seq: 0,
                to_machine,
            }),
        });
        match live.entry(id.clone().into_boxed_str()) {
            Entry::Vacant(entry) => entry.insert(inbox),
            Entry::Occupied(_) => unreachable!("128 random bits do not repeat"),
        };
    }
    let peer = parts.extensions.get::<PeerAddr>().copied();
    let client = state
        .auth
        .limits()
        .client_address(peer.map(|peer| peer.0.ip()), &parts.headers);
    let who = Authenticated { caller, client };
    // The session holds its down-stream's connection slot for its life.
    let lease = parts.extensions.get::<ConnectionLease>().cloned();
    let span = tracing::debug_span!("http_session", peer = ?peer.map(|p| p.0), protocol = encoding.name());
    let (context, drain, ended) = (sessions.0.context.clone(), state.drain.clone(), sessions.clone());
    state.tasks.spawn(
        async move {
            let _lease = lease;
            websocket::run_v2(wire, Protocol::V2(encoding), context, &drain, who).await;
            ended.end(&id);
        }
        .instrument(span),
    );
    let mut response = Response::new(Body::new(down_stream));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    // Neither a cache nor a compressing proxy may hold the events back.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    // nginx buffers responses unless told not to, per response.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `POST /ws?session=ID&seq=N`: one batch of a session's records.
pub async fn post(state: WebSocketState, request: Request) -> Response {
    if request.method() != http::Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a session's batches are sent with POST /ws?session=…&seq=…",
        );
    }
    let (Some(id), Some(seq)) = (
        query(&request, "session").map(str::to_string),
        query(&request, "seq").and_then(|seq| seq.parse::<u64>().ok()),
    ) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "a POST to /ws needs ?session=<id from the session event>&seq=<0, 1, 2, …>",
        );
    };
    let (parts, body) = request.into_parts();
    if let Err(refusal) = websocket::check_origin(&state, &parts) {
        return refusal;
    }
    let Some(inbox) = state.http_sessions.inbox(&id) else {
        return refuse(
            StatusCode::NOT_FOUND,
            &format!(
                "no HTTP session {id} here: it ended or expired, or this request reached another instance; \
                 open a new session"
            ),
        );
    };
    // Up to POSTS_IN_FLIGHT at once; one more is refused before its body
    // is read, so a session holds at most that many bodies.
    let Some(_posting) = inbox.posting() else {
        return refuse(
            StatusCode::CONFLICT,
            &format!("{POSTS_IN_FLIGHT} POSTs of this session are in flight: send the next once one is answered"),
        );
    };
    let sessions = &state.http_sessions.0;
    let limit = sessions.context.settings.largest_batch();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<usize>().ok());
    let batch = match declared {
        Some(size) if size > limit => Err(size),
        _ => match tokio::time::timeout(sessions.body_timeout, Limited::new(body, limit).collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(error)) if error.is::<LengthLimitError>() => Err(limit + 1),
            broken => {
                // The body broke off or stalled: the client does not know
                // what arrived, so it will not reuse the session; neither do we.
                state.http_sessions.end(&id);
                return match broken {
                    Err(_) => refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body stalled (--request-body-timeout); the session ended",
                    ),
                    _ => refuse(StatusCode::BAD_REQUEST, "the request body broke off; the session ended"),
                };
            }
        },
    };
    let message = match batch {
        Err(size) => {
            // As a WebSocket message over the limit: the session fails (its
            // calls end with 8), the batch is not applied.
            let to_machine = inbox.state.lock().await.to_machine.clone();
            let _ = to_machine.send(Posted::TooLong(size, limit)).await;
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a batch of {size} bytes is larger than {limit} (--max-message-size plus 64 KiB)"),
            );
        }
        Ok(batch) => to_message(batch, inbox.encoding),
    };
    let expected = *inbox.turn.borrow();
    if seq >= expected.saturating_add(POSTS_IN_FLIGHT as u64) {
        state.http_sessions.end(&id);
        return refuse(
            StatusCode::CONFLICT,
            &format!("POST seq {seq} skips {expected}: a batch was lost, so the session ended; open a new one"),
        );
    }
    // Pipelined POSTs arrive in any order: each waits for the ones before it.
    let mut turn = inbox.turn.subscribe();
    if !matches!(
        tokio::time::timeout(sessions.body_timeout, turn.wait_for(|next| *next >= seq)).await,
        Ok(Ok(_))
    ) {
        state.http_sessions.end(&id);
        return refuse(
            StatusCode::REQUEST_TIMEOUT,
            &format!("POST seq {seq} waited for the POSTs before it (--request-body-timeout); the session ended"),
        );
    }
    let mut inbox_state = inbox.state.lock().await;
    if seq < inbox_state.next_seq {
        // A repeat of a POST already applied (a proxy or client retried it).
        return StatusCode::NO_CONTENT.into_response();
    }
    if inbox_state.to_machine.send(message).await.is_err() {
        return refuse(
            StatusCode::NOT_FOUND,
            &format!("HTTP session {id} ended before this batch reached it; open a new session"),
        );
    }
    inbox_state.next_seq += 1;
    inbox.turn.send_replace(inbox_state.next_seq);
    StatusCode::NO_CONTENT.into_response()
}

/// A POSTed body as the message a WebSocket would have brought: an empty
/// one is the answer to a ping.
fn to_message(batch: Bytes, encoding: Encoding) -> Posted {
    if batch.is_empty() {
        return Posted::Batch(Message::Pong(Bytes::new()));
    }
    match encoding {
        Encoding::Proto => Posted::Batch(Message::Binary(batch)),
        Encoding::Json => match Utf8Bytes::try_from(batch) {
            Ok(text) => Posted::Batch(Message::Text(text)),
            Err(_) => Posted::NotUtf8,
        },
    }
}

/// 128 random bits, base64url.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the system's random source works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A query parameter's value, as it is (the binding's values need no escaping).
fn query<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    crate::transport::query_param(request.uri().query(), name)
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}
