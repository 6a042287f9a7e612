//! A client of protocol v2's HTTP binding written from the spec
//! (docs/protocol-v2.md, "HTTP binding"): hyper's HTTP/1.1 client, a
//! server-sent-events reader written here, and the session's `seq`.

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::http::{HttpClient, http1_client};
use super::{ServerAddr, within};

/// One server-sent event: its `event` name (empty for a batch) and its data
/// lines joined with `\n`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: String,
}

/// An open session: the down-stream being read, and the POSTs' next `seq`.
pub struct HttpLink {
    client: HttpClient,
    url: String,
    pub id: String,
    pub seq: u64,
    down: Incoming,
    buffer: BytesMut,
    /// Answer each `ping` event with an empty POST (as a live client does).
    pub answer_pings: bool,
}

/// Opens a session with `GET /ws?protocol=…` and `headers`; a refusal is
/// its status and body.
pub async fn open(
    server: &impl ServerAddr,
    protocol: &str,
    headers: &[(&str, &str)],
) -> Result<HttpLink, (StatusCode, String)> {
    let client = http1_client();
    let url = server.http_url("/ws");
    let mut request = Request::get(format!("{url}?protocol={protocol}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = within("session open", client.request(request.body(Full::default()).unwrap()))
        .await
        .expect("HTTP request");
    let (parts, body) = response.into_parts();
    if parts.status != StatusCode::OK {
        let body = within("refusal body", body.collect()).await.unwrap().to_bytes();
        return Err((parts.status, String::from_utf8_lossy(&body).into_owned()));
    }
    assert_eq!(parts.headers["content-type"], "text/event-stream");
    assert_eq!(parts.headers["cache-control"], "no-cache, no-transform");
    assert_eq!(parts.headers["x-accel-buffering"], "no");
    let mut link = HttpLink {
        client,
        url,
        id: String::new(),
        seq: 0,
        down: body,
        buffer: BytesMut::new(),
        answer_pings: true,
    };
    let first = link.next_event().await.expect("the session event");
    assert_eq!(first.name, "session", "{first:?}");
    let session: serde_json::Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(session["protocol"], protocol);
    link.id = session["session"].as_str().expect("a session id").to_string();
    Ok(link)
}

impl HttpLink {
    /// POSTs `body` with the next `seq`; moves `seq` on when it is taken.
    pub async fn post(&mut self, body: impl Into<Bytes>) -> (StatusCode, String) {
        let answer = self.post_with_seq(self.seq, body).await;
        if answer.0 == StatusCode::NO_CONTENT {
            self.seq += 1;
        }
        answer
    }

    /// POSTs `body` to this session with `seq` as it is.
    pub async fn post_with_seq(&self, seq: u64, body: impl Into<Bytes>) -> (StatusCode, String) {
        post(&self.client, &self.url, &self.id, seq, body.into(), &[]).await
    }

    /// The next event; `None` once the down-stream ends.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.take_event() {
                return Some(event);
            }
            match within("down-stream", self.down.frame()).await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event that is not a ping (pings are answered if
    /// `answer_pings`); `None` once the down-stream ends.
    pub async fn next_non_ping(&mut self) -> Option<Event> {
        loop {
            let event = self.next_event().await?;
            if event.name != "ping" {
                return Some(event);
            }
            if self.answer_pings {
                let (status, body) = self.post(Bytes::new()).await;
                assert_eq!(status, StatusCode::NO_CONTENT, "ping answer: {body}");
            }
        }
    }

    fn take_event(&mut self) -> Option<Event> {
        let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
        let block = self.buffer.split_to(end + 2);
        let text = std::str::from_utf8(&block[..end]).expect("events are UTF-8");
        let mut event = Event {
            name: String::new(),
            data: String::new(),
        };
        let mut lines = 0;
        for line in text.split('\n') {
            if line.starts_with(':') {
                continue;
            }
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
                other => panic!("unknown field {other:?} in {text:?}"),
            }
        }
        Some(event)
    }
}

/// A batch event's records as the bytes a WebSocket message would carry.
pub fn batch_bytes(event: &Event, proto: bool) -> Vec<u8> {
    if proto {
        base64::engine::general_purpose::STANDARD
            .decode(&event.data)
            .expect("proto batches are base64")
    } else {
        event.data.clone().into_bytes()
    }
}

/// `POST url?session=id&seq=seq` with `body` and `headers`.
pub async fn post(
    client: &HttpClient,
    url: &str,
    id: &str,
    seq: u64,
    body: Bytes,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut request = Request::post(format!("{url}?session={id}&seq={seq}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = within("POST", client.request(request.body(Full::new(body)).unwrap()))
        .await
        .expect("HTTP request");
    let (parts, body) = response.into_parts();
    let body = within("POST answer", body.collect()).await.unwrap().to_bytes();
    (parts.status, String::from_utf8_lossy(&body).into_owned())
}
