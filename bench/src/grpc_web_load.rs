//! gRPC-Web over HTTP/1.1: half-duplex calls of ten messages each, the way a
//! browser's grpc-web client makes them (all requests in one body, replies
//! and trailers streamed back). One task per keep-alive connection, one call
//! at a time on it.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use streambridge_protocol::StreamRequest;
use tokio::net::TcpStream;

use crate::measure::{Control, TaskStats, payload};

/// Request messages per call.
pub const MESSAGES_PER_CALL: usize = 10;

/// The request body: `MESSAGES_PER_CALL` length-prefixed messages.
fn call_body(payload_size: usize) -> Bytes {
    let message = StreamRequest {
        data: payload(payload_size),
    }
    .encode_to_vec();
    let mut body = BytesMut::new();
    for _ in 0..MESSAGES_PER_CALL {
        streambridge_protocol::grpc::put_message(&mut body, &message);
    }
    body.freeze()
}

/// Counts the data frames of a gRPC-Web response body and finds
/// `grpc-status` in its trailer frame.
fn parse_response(mut body: &[u8]) -> Result<usize, String> {
    let mut messages = 0;
    while body.len() >= 5 {
        let flags = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let frame = body.get(5..5 + len).ok_or("truncated gRPC-Web frame")?;
        if flags & 0x80 != 0 {
            let trailers = String::from_utf8_lossy(frame);
            return if trailers.contains("grpc-status:0") || trailers.contains("grpc-status: 0") {
                Ok(messages)
            } else {
                Err(format!("call failed: {trailers:.120}"))
            };
        }
        messages += 1;
        body = &body[5 + len..];
    }
    Err("no trailers in the gRPC-Web response".into())
}

/// One connection making calls back to back until the control says stop.
pub async fn drive(addr: SocketAddr, payload_size: usize, control: Control) -> Result<TaskStats, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    let connection = tokio::spawn(connection);
    let body = call_body(payload_size);
    let mut stats = TaskStats::new();
    while !control.stopped() {
        let mut request = Request::post(format!("http://{addr}/DataService/BidirectionalStream"))
            // As a browser sends it; HTTP/1.1 requires it (hyper's connection API leaves it out).
            .header("host", addr.to_string())
            .header("content-type", "application/grpc-web+proto")
            .header("accept", "application/grpc-web+proto")
            .header("x-grpc-web", "1");
        if let Some(token) = crate::servers::edge::token() {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Full::new(body.clone())).map_err(|e| e.to_string())?;
        let started = Instant::now();
        sender.ready().await.map_err(|e| format!("connection: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("call: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let replies = parse_response(&bytes)?;
        if replies != MESSAGES_PER_CALL {
            return Err(format!("{replies} replies to {MESSAGES_PER_CALL} requests"));
        }
        stats.record(&control, started);
    }
    drop(sender);
    let _ = connection.await;
    Ok(stats)
}
