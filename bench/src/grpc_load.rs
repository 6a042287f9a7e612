//! Native gRPC load with tonic's client: `/DataService/BidirectionalStream`
//! calls multiplexed over a chosen number of HTTP/2 connections.
//!
//! Each stream is one task keeping a fixed number of requests in flight
//! (closed loop). The first requests are queued before the call is awaited:
//! grpc-go sends its response headers only with its first reply, so a client
//! that waits for headers before sending would wait forever.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use streambridge::grpc::DataServiceClient;
use streambridge_protocol::{StreamRequest, StreamResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::measure::{Control, TaskStats, payload};

/// One HTTP/2 connection to `addr` (each call opens its own; clones share it).
pub async fn connect(addr: SocketAddr) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("gRPC connect {addr}: {e}"))
}

/// `message` as a request, with the edge server's token when the run sends one.
fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = crate::servers::edge::token() {
        let value = format!("Bearer {token}").parse().expect("a JWT is a header value");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn check(reply: &StreamResponse, data: &str) -> Result<(), String> {
    match reply.result.strip_prefix("processed: ") {
        Some(rest) if rest == data => Ok(()),
        _ => Err(format!("wrong reply: {:.80}", reply.result)),
    }
}

/// Drives one call with `window` requests in flight until the control says
/// stop and every reply is in, then half-closes and waits for status OK.
pub async fn drive(
    channel: Channel,
    payload_size: usize,
    window: usize,
    control: Control,
) -> Result<TaskStats, String> {
    let data = payload(payload_size);
    let mut stats = TaskStats::new();
    let (sender, receiver) = mpsc::channel(window.max(1));
    let mut in_flight = VecDeque::with_capacity(window);
    for _ in 0..window {
        sender
            .try_send(StreamRequest { data: data.clone() })
            .map_err(|e| e.to_string())?;
        in_flight.push_back(Instant::now());
    }
    let mut sender = Some(sender);
    let mut client = DataServiceClient::new(channel);
    let mut replies = client
        .bidirectional_stream(with_token(ReceiverStream::new(receiver)))
        .await
        .map_err(|s| format!("call: {s}"))?
        .into_inner();
    let mut verified = false;
    while let Some(reply) = replies.message().await.map_err(|s| format!("reply: {s}"))? {
        if !verified {
            check(&reply, &data)?;
            verified = true;
        }
        let sent = in_flight.pop_front().ok_or("a reply to no request")?;
        stats.record(&control, sent);
        match &sender {
            Some(requests) if !control.stopped() => {
                requests
                    .send(StreamRequest { data: data.clone() })
                    .await
                    .map_err(|_| "request stream closed")?;
                in_flight.push_back(Instant::now());
            }
            // Half-close once the last reply is in: the server ends the call.
            Some(_) if in_flight.is_empty() => sender = None,
            _ => {}
        }
    }
    if !in_flight.is_empty() {
        return Err(format!("call ended with {} requests unanswered", in_flight.len()));
    }
    Ok(stats)
}

/// An idle call: one request and its reply, then the call stays open. The
/// returned sender keeps the request stream (and so the call) alive.
pub type IdleCall = (mpsc::Sender<StreamRequest>, Streaming<StreamResponse>);

pub async fn open_idle(channel: Channel) -> Result<IdleCall, String> {
    let (sender, receiver) = mpsc::channel(1);
    sender
        .try_send(StreamRequest { data: "idle".into() })
        .map_err(|e| e.to_string())?;
    let mut replies = DataServiceClient::new(channel)
        .bidirectional_stream(with_token(ReceiverStream::new(receiver)))
        .await
        .map_err(|s| format!("call: {s}"))?
        .into_inner();
    match replies.message().await {
        Ok(Some(reply)) => check(&reply, "idle")?,
        Ok(None) => return Err("call ended before the reply".into()),
        Err(status) => return Err(format!("reply: {status}")),
    }
    Ok((sender, replies))
}
