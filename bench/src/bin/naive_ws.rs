//! Benchmark peer: the naive WebSocket bridge, what most people write first.
//!
//! tokio-tungstenite with its default buffers (128 KiB read buffer per
//! socket), one task per socket that reads a frame, parses it into a
//! `serde_json::Value`, and `send`s the reply, which flushes after every
//! message. It speaks the `streambridge.v1.json` envelope
//! (docs/websocket-protocol.md) well enough for the benchmark: requests,
//! `closeSend`, the final `status`. `TCP_NODELAY` is set (as Node's `ws` does),
//! so the comparison is about writes and buffers, not Nagle's algorithm.
//!
//! Usage: `bench-naive-ws --listen 127.0.0.1:PORT`.

/// The same allocator as streambridge's binary and the other Rust peers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SUBPROTOCOL: &str = "streambridge.v1.json";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = match std::env::args().skip_while(|a| a != "--listen").nth(1) {
        Some(addr) => addr.parse()?,
        None => "127.0.0.1:8081".parse()?,
    };
    let listener = TcpListener::bind(listen).await?;
    println!("naive ws listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve_socket(stream));
    }
}

async fn serve_socket(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    #[allow(clippy::result_large_err)] // the signature tungstenite's `Callback` requires
    let choose_subprotocol = |request: &Request, mut response: Response| {
        let offered = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
        if offered {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
        }
        Ok(response)
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, choose_subprotocol).await else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            let _ = socket
                .send(Message::text(json!({"status": {"code": 3}}).to_string()))
                .await;
            break;
        };
        if let Some(data) = frame.pointer("/request/data") {
            let result = format!("processed: {}", data.as_str().unwrap_or_default());
            let reply = json!({"response": {"result": result}}).to_string();
            if socket.send(Message::text(reply)).await.is_err() {
                return;
            }
        } else if frame.get("closeSend").is_some() {
            let _ = socket
                .send(Message::text(json!({"status": {"code": 0}}).to_string()))
                .await;
            break;
        }
    }
    let _ = socket.close(None).await;
    while let Some(Ok(_)) = socket.next().await {}
}
