//! A plain HTTP client (hyper-util's) for gRPC-Web and static-file tests, and
//! a gRPC-Web body codec written from the protocol description (not tonic-web).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use streambridge_protocol::{StreamRequest, StreamResponse};

use super::within;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn http2_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

/// A response read to its end.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Reply {
    let response = within("HTTP response", client.request(request))
        .await
        .expect("HTTP request");
    let (parts, body) = response.into_parts();
    let body = within("HTTP body", body.collect()).await.expect("HTTP body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET url` over a fresh HTTP/1.1 client.
pub async fn get(url: String) -> Reply {
    send(&http1_client(), Request::get(url).body(Full::default()).unwrap()).await
}

/// Length-prefixed gRPC-Web data frames, one per request.
pub fn grpc_web_body(requests: &[&str]) -> Bytes {
    let mut body = BytesMut::new();
    for data in requests {
        let message = StreamRequest { data: data.to_string() }.encode_to_vec();
        streambridge_protocol::grpc::put_message(&mut body, &message);
    }
    body.freeze()
}

/// A decoded gRPC-Web response body: the replies and the trailers.
#[derive(Debug, Default)]
pub struct GrpcWebResult {
    pub replies: Vec<String>,
    pub trailers: Vec<(String, String)>,
}

impl GrpcWebResult {
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Decodes a binary gRPC-Web response body.
pub fn decode_grpc_web(mut body: Bytes) -> GrpcWebResult {
    let mut result = GrpcWebResult::default();
    while body.has_remaining() {
        assert!(body.len() >= 5, "truncated frame header in response");
        let flags = body.get_u8();
        let length = body.get_u32() as usize;
        let payload = body.split_to(length);
        if flags & 0x80 == 0 {
            result
                .replies
                .push(StreamResponse::decode(payload).expect("StreamResponse").result);
        } else {
            for line in String::from_utf8(payload.to_vec())
                .unwrap()
                .split("\r\n")
                .filter(|l| !l.is_empty())
            {
                let (name, value) = line.split_once(':').expect("trailer line");
                result
                    .trailers
                    .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    result
}

/// Decodes a grpc-web-text body: base64 chunks, each padded, concatenated.
pub fn decode_grpc_web_text(body: &[u8]) -> GrpcWebResult {
    let mut binary = BytesMut::new();
    let text = std::str::from_utf8(body).expect("base64 is ASCII");
    let mut rest = text;
    while !rest.is_empty() {
        // A chunk ends after its padding, or at the end of the body.
        let end = rest
            .find('=')
            .map(|i| i + rest[i..].chars().take_while(|&c| c == '=').count())
            .unwrap_or(rest.len());
        binary.put_slice(&STANDARD.decode(&rest[..end]).expect("valid base64 chunk"));
        rest = &rest[end..];
    }
    decode_grpc_web(binary.freeze())
}
