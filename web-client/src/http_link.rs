//! Protocol v2 over plain HTTP (docs/protocol-v2.md, "HTTP binding"), the
//! fetch-based twin of [`crate::socket`] for networks whose proxies refuse
//! WebSockets: one long `GET` brings the server's batches as server-sent
//! events, and the client's batches go up as POSTs, pipelined (up to four), in `seq`
//! order. It speaks [`SocketEvent`]s, so the connection above it cannot
//! tell it from a WebSocket.
//!
//! Batching adds no timer: a batch goes up at once when no POST is in
//! flight; beside POSTs in flight (up to [`POSTS_IN_FLIGHT`]) only a full
//! one ([`BATCH_LIMIT`]) does. Everything else waits and goes up together in
//! the next POST (an interactive round trip is one POST and the reply on the
//! open down-stream).

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use base64::Engine;
use js_sys::{Promise, Reflect, Uint8Array};
use streambridge_protocol::v2::Encoding;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{AbortController, Headers, ReadableStreamDefaultReader, RequestCache, RequestInit, Response};

use crate::codec::{BATCH_LIMIT, Frame};
use crate::promise::settle;
use crate::socket::SocketEvent;
use crate::timer::Timer;

#[wasm_bindgen]
extern "C" {
    /// The global `fetch` (a page's or a worker's).
    #[wasm_bindgen(js_name = fetch)]
    fn fetch(input: &str, init: &RequestInit) -> Promise;
}

/// POSTs in flight at once, as the server allows: each is a round trip, so
/// they are pipelined (the server applies them in `seq` order).
const POSTS_IN_FLIGHT: usize = 4;

/// How much of the queued batches one POST takes: more than a WebSocket
/// message ([`BATCH_LIMIT`]), since each POST costs a round trip; far below
/// what the server takes (`--max-message-size` + 64 KiB).
const POST_LIMIT: usize = 4 * BATCH_LIMIT;

/// The close code of a session that broke (as a WebSocket's 1006).
const ABNORMAL: u16 = 1006;

type Events = Rc<RefCell<dyn FnMut(SocketEvent)>>;

/// An open or opening HTTP session; dropping it ends the session.
pub struct HttpLink {
    state: Rc<RefCell<LinkState>>,
}

struct LinkState {
    /// `http(s)://host/ws`, from the `ws(s)://` URL.
    url: String,
    encoding: Encoding,
    /// From the `session` event; no POST before it.
    session: Option<String>,
    /// The next POST's `seq`.
    seq: u64,
    /// POSTs sent and not yet answered (at most [`POSTS_IN_FLIGHT`]).
    posting: usize,
    /// Batches written while a POST was in flight, in order.
    queued: Vec<Frame>,
    /// A `ping` came: the next POST (an empty one if there is nothing else)
    /// answers it.
    pong_owed: bool,
    /// Ends the down-stream and any POST in flight.
    abort: AbortController,
    /// Event-stream bytes not yet making a whole event.
    unparsed: Vec<u8>,
    /// Set once the session ended either way: nothing more is reported.
    ended: bool,
    /// When the down-stream last brought anything (`Date.now()`).
    last_heard: f64,
    /// Checks that the down-stream is not silent for two ping intervals
    /// (a proxy may hold it open after the server is gone).
    watchdog: Option<Timer>,
    events: Events,
}

impl HttpLink {
    /// Opens a session at `url` (`ws://` or `wss://`, as for a WebSocket)
    /// speaking `encoding`; `on_event` hears everything after.
    pub fn open(
        url: &str,
        encoding: Encoding,
        token: Option<&str>,
        on_event: impl FnMut(SocketEvent) + 'static,
    ) -> Result<HttpLink, JsValue> {
        let url = http_url(url);
        let abort = AbortController::new()?;
        let headers = Headers::new()?;
        headers.set("accept", "text/event-stream")?;
        if let Some(token) = token {
            headers.set("authorization", &format!("Bearer {token}"))?;
        }
        let init = RequestInit::new();
        init.set_method("GET");
        init.set_headers(&headers);
        init.set_cache(RequestCache::NoStore);
        init.set_signal(Some(&abort.signal()));
        let separator = if url.contains('?') { '&' } else { '?' };
        let opened = fetch(&format!("{url}{separator}protocol={}", encoding.name()), &init);
        let state = Rc::new(RefCell::new(LinkState {
            url,
            encoding,
            session: None,
            seq: 0,
            posting: 0,
            queued: Vec::new(),
            pong_owed: false,
            abort,
            unparsed: Vec::new(),
            ended: false,
            last_heard: 0.0,
            watchdog: None,
            events: Rc::new(RefCell::new(on_event)),
        }));
        let weak = Rc::downgrade(&state);
        settle(&opened, move |answer| {
            let Some(state) = weak.upgrade() else { return };
            match answer {
                Ok(response) => on_open_answer(&state, response.unchecked_into()),
                Err(error) => end(
                    &state,
                    ABNORMAL,
                    format!("the session request failed: {}", crate::describe(&error)),
                ),
            }
        });
        Ok(HttpLink { state })
    }

    /// Sends one batch: now, or after the POST in flight.
    pub fn send(&self, frame: Frame) {
        self.state.borrow_mut().queued.push(frame);
        post_next(&self.state);
    }

    /// Ends the session (the server sees its down-stream go and cancels
    /// the calls still on it).
    pub fn close(&self) {
        let mut state = self.state.borrow_mut();
        state.ended = true;
        state.abort.abort();
    }
}

impl Drop for HttpLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// `ws://host/ws` → `http://host/ws`, `wss://` → `https://`.
fn http_url(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        url.to_string()
    }
}

/// Tells the connection the session ended, once.
fn end(state: &Rc<RefCell<LinkState>>, code: u16, reason: String) {
    let events = {
        let mut state = state.borrow_mut();
        if state.ended {
            return;
        }
        state.ended = true;
        state.abort.abort();
        state.events.clone()
    };
    (events.borrow_mut())(SocketEvent::Closed { code, reason });
}

/// The answer to the session's `GET`: the down-stream, or a refusal whose
/// body says why.
fn on_open_answer(state: &Rc<RefCell<LinkState>>, response: Response) {
    if !response.ok() {
        let status = response.status();
        let weak = Rc::downgrade(state);
        let text = response.text().unwrap_or_else(|error| Promise::reject(&error));
        settle(&text, move |body| {
            if let Some(state) = weak.upgrade() {
                let body = body.ok().and_then(|body| body.as_string()).unwrap_or_default();
                end(&state, ABNORMAL, format!("HTTP {status}: {}", body.trim_end()));
            }
        });
        return;
    }
    let reader = response
        .body()
        .and_then(|body| body.get_reader().dyn_into::<ReadableStreamDefaultReader>().ok());
    match reader {
        Some(reader) => read_next(Rc::downgrade(state), reader),
        None => end(state, ABNORMAL, "the session's answer has no body".into()),
    }
}

/// Reads the down-stream's next chunk and handles its events, until it ends.
fn read_next(weak: Weak<RefCell<LinkState>>, reader: ReadableStreamDefaultReader) {
    let read = reader.read();
    settle(&read, move |chunk| {
        let Some(state) = weak.upgrade() else { return };
        if state.borrow().ended {
            return;
        }
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                return end(
                    &state,
                    ABNORMAL,
                    format!("the down-stream broke: {}", crate::describe(&error)),
                );
            }
        };
        let field = |name: &str| Reflect::get(&chunk, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED);
        if field("done").is_truthy() {
            return end(&state, ABNORMAL, "the down-stream ended without a close".into());
        }
        let bytes = field("value").dyn_into::<Uint8Array>().map(|bytes| bytes.to_vec());
        {
            let mut link = state.borrow_mut();
            link.unparsed.extend(bytes.unwrap_or_default());
            link.last_heard = js_sys::Date::now();
        }
        let events = take_events(&mut state.borrow_mut().unparsed);
        for event in events {
            on_event(&state, event);
            if state.borrow().ended {
                return;
            }
        }
        read_next(weak, reader);
    });
}

/// One server-sent event: its name (empty for a batch) and its data.
struct Event {
    name: String,
    data: String,
}

/// The whole events at the start of `unparsed`, taken out of it (what is
/// left is the start of an event still arriving). One pass and one move of
/// the rest, however many events a chunk brought.
fn take_events(unparsed: &mut Vec<u8>) -> Vec<Event> {
    let mut events = Vec::new();
    let mut start = 0;
    while let Some(end) = find_blank_line(&unparsed[start..]) {
        // The server writes UTF-8; anything else is no event of this protocol.
        let text = std::str::from_utf8(&unparsed[start..start + end]).unwrap_or_default();
        events.push(parse_event(text));
        start += end + 2;
    }
    unparsed.drain(..start);
    events
}

/// Where the first `\n\n` starts.
fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = bytes[from..].iter().position(|&b| b == b'\n') {
        let at = from + at;
        match bytes.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// One event's lines: its name and its data lines joined.
fn parse_event(text: &str) -> Event {
    let mut event = Event {
        name: String::new(),
        data: String::new(),
    };
    let mut lines = 0;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event.name = value.to_string(),
            "data" => {
                if lines > 0 {
                    event.data.push('\n');
                }
                event.data.push_str(value);
                lines += 1;
            }
            // Comments (`:`), and fields this protocol does not use.
            _ => {}
        }
    }
    event
}

fn on_event(state: &Rc<RefCell<LinkState>>, event: Event) {
    let report = |event: SocketEvent| {
        let events = state.borrow().events.clone();
        (events.borrow_mut())(event);
    };
    match event.name.as_str() {
        "session" => {
            let data = js_sys::JSON::parse(&event.data).unwrap_or(JsValue::UNDEFINED);
            let field = |name: &str| Reflect::get(&data, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED);
            let Some(session) = field("session").as_string() else {
                return end(state, ABNORMAL, "the session event has no session id".into());
            };
            state.borrow_mut().session = Some(session);
            if let Some(ping_ms) = field("pingMs").as_f64().filter(|ms| *ms > 0.0) {
                watch(Rc::downgrade(state), ping_ms);
            }
            report(SocketEvent::Open);
            post_next(state);
        }
        "" => {
            let encoding = state.borrow().encoding;
            match encoding {
                Encoding::Json => report(SocketEvent::Text(JsValue::from_str(&event.data))),
                Encoding::Proto => match base64::engine::general_purpose::STANDARD.decode(event.data.as_bytes()) {
                    Ok(batch) => report(SocketEvent::Binary(batch)),
                    Err(_) => end(state, ABNORMAL, "a proto batch event is not base64".into()),
                },
            }
        }
        "ping" => {
            state.borrow_mut().pong_owed = true;
            post_next(state);
        }
        "close" => {
            let data = js_sys::JSON::parse(&event.data).unwrap_or(JsValue::UNDEFINED);
            let field = |name: &str| Reflect::get(&data, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED);
            let code = field("code").as_f64().map_or(ABNORMAL, |code| code as u16);
            end(state, code, field("reason").as_string().unwrap_or_default());
        }
        _ => {}
    }
}

/// Every ping interval: ends the session if the down-stream brought
/// nothing, not even a ping, for two of them.
fn watch(weak: Weak<RefCell<LinkState>>, ping_ms: f64) {
    let Some(state) = weak.upgrade() else { return };
    let timer = Timer::after(ping_ms, move || {
        let Some(state) = weak.upgrade() else { return };
        let silent_ms = js_sys::Date::now() - state.borrow().last_heard;
        if silent_ms > 2.0 * ping_ms {
            // Whole milliseconds: formatting a float would add kilobytes to the package.
            let silent_ms = silent_ms as u64;
            end(
                &state,
                ABNORMAL,
                format!("the server sent nothing, not even a ping, for {silent_ms} ms"),
            );
        } else {
            watch(weak, ping_ms);
        }
    });
    state.borrow_mut().watchdog = Some(timer);
}

/// POSTs what is queued (as one batch, up to [`POST_LIMIT`] unless a
/// single batch is larger), or the answer to a ping; nothing while
/// [`POSTS_IN_FLIGHT`] are in flight or before the session is known.
fn post_next(state: &Rc<RefCell<LinkState>>) {
    let (url, body) = {
        let mut link = state.borrow_mut();
        let Some(session) = link.session.clone() else { return };
        if link.posting >= POSTS_IN_FLIGHT || link.ended || (link.queued.is_empty() && !link.pong_owed) {
            return;
        }
        // Beside a POST in flight, only a full one: each POST costs the page
        // a fetch, so small batches wait and go up together.
        let queued: usize = link.queued.iter().map(Frame::len).sum();
        if link.posting > 0 && queued < BATCH_LIMIT {
            return;
        }
        let body = merge(&mut link.queued);
        link.posting += 1;
        link.pong_owed = false;
        let separator = if link.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}session={session}&seq={}", link.url, link.seq);
        link.seq += 1;
        (url, body)
    };
    let init = RequestInit::new();
    init.set_method("POST");
    init.set_signal(Some(&state.borrow().abort.signal()));
    match &body {
        Some(Frame::Text(text)) => init.set_body(&JsValue::from_str(text)),
        Some(Frame::Binary(bytes)) => init.set_body(&Uint8Array::from(bytes.as_slice())),
        None => {}
    }
    let weak = Rc::downgrade(state);
    settle(&fetch(&url, &init), move |answer| {
        let Some(state) = weak.upgrade() else { return };
        match answer {
            Ok(response) => {
                let response: Response = response.unchecked_into();
                if response.status() == 204 {
                    state.borrow_mut().posting -= 1;
                    post_next(&state);
                } else {
                    // The session is gone (ended, expired, or on another
                    // instance) or refused the batch: it cannot be trusted.
                    let status = response.status();
                    let text = response.text().unwrap_or_else(|error| Promise::reject(&error));
                    settle(&text, move |body| {
                        let body = body.ok().and_then(|body| body.as_string()).unwrap_or_default();
                        end(
                            &state,
                            ABNORMAL,
                            format!("a POST was refused: HTTP {status}: {}", body.trim_end()),
                        );
                    });
                }
            }
            Err(error) => end(&state, ABNORMAL, format!("a POST failed: {}", crate::describe(&error))),
        }
    });
}

/// The queued batches as one POST body (batches concatenate: proto's
/// repeated records merge, JSON arrays are joined), up to [`POST_LIMIT`];
/// `None` for an empty POST.
fn merge(queued: &mut Vec<Frame>) -> Option<Frame> {
    if queued.is_empty() {
        return None;
    }
    let mut taken = 1;
    let mut size = queued[0].len();
    while let Some(next) = queued.get(taken)
        && size + next.len() <= POST_LIMIT
    {
        size += next.len();
        taken += 1;
    }
    let mut frames = queued.drain(..taken);
    let mut body = frames.next()?;
    for next in frames {
        match (&mut body, next) {
            (Frame::Binary(body), Frame::Binary(next)) => body.extend_from_slice(&next),
            (Frame::Text(body), Frame::Text(next)) => {
                // `[a,b]` and `[c]` make `[a,b,c]`.
                body.pop();
                body.push(',');
                body.push_str(next.strip_prefix('[').unwrap_or(&next));
            }
            // One connection has one encoding.
            _ => {}
        }
    }
    Some(body)
}
