//! Native gRPC through streambridge with tonic's client, over real HTTP/2.

mod support;

use futures_util::StreamExt;
use streambridge::Transport;
use streambridge_protocol::{StreamRequest, StreamResponse};
use support::ServerAddr;
use support::{TestServer, within};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn request(data: impl Into<String>) -> StreamRequest {
    StreamRequest { data: data.into() }
}

/// Sends `inputs` on one stream, half-closes, and collects every reply.
async fn round_trip(server: &TestServer, inputs: Vec<String>) -> Result<Vec<String>, tonic::Status> {
    let mut client = server.grpc_client().await;
    let outbound = tokio_stream::iter(inputs.into_iter().map(request));
    let mut replies = client.bidirectional_stream(outbound).await?.into_inner();
    let mut results = Vec::new();
    while let Some(reply) = replies.next().await {
        results.push(reply?.result);
    }
    Ok(results)
}

fn expected(inputs: &[String]) -> Vec<String> {
    inputs.iter().map(|data| format!("processed: {data}")).collect()
}

#[tokio::test]
async fn the_seeds_client_gets_five_replies_then_a_clean_end() {
    let server = TestServer::start().await;
    let inputs: Vec<String> = (0..5).map(|i| format!("msg {i}")).collect();
    let replies = within("5 messages", round_trip(&server, inputs.clone())).await.unwrap();
    assert_eq!(replies, expected(&inputs));
}

#[tokio::test]
async fn five_thousand_pipelined_messages_arrive_in_order() {
    let server = TestServer::start().await;
    let inputs: Vec<String> = (0..5000).map(|i| format!("message number {i}")).collect();
    let replies = within("5000 messages", round_trip(&server, inputs.clone()))
        .await
        .unwrap();
    assert_eq!(replies, expected(&inputs));
}

#[tokio::test]
async fn thirty_two_concurrent_streams_share_one_connection() {
    let server = TestServer::start().await;
    let client = server.grpc_client().await;
    let calls = (0..32).map(|stream| {
        let mut client = client.clone();
        async move {
            let inputs: Vec<String> = (0..50).map(|i| format!("s{stream}-m{i}")).collect();
            let outbound = tokio_stream::iter(inputs.clone().into_iter().map(request));
            let replies: Vec<String> = client
                .bidirectional_stream(outbound)
                .await
                .unwrap()
                .into_inner()
                .map(|r| r.unwrap().result)
                .collect()
                .await;
            assert_eq!(replies, expected(&inputs), "stream {stream}");
        }
    });
    within("32 streams", futures_util::future::join_all(calls)).await;
}

#[tokio::test]
async fn a_one_mebibyte_message_round_trips() {
    let server = TestServer::start().await;
    let big = "x".repeat(1024 * 1024);
    let replies = within("1 MiB", round_trip(&server, vec![big.clone()])).await.unwrap();
    assert_eq!(replies, vec![format!("processed: {big}")]);
}

#[tokio::test]
async fn unicode_and_empty_data_are_echoed_exactly() {
    let server = TestServer::start().await;
    let inputs = vec![String::new(), "héllo wörld".into(), "数据流 🚀".into(), "\0nul".into()];
    let replies = within("unicode", round_trip(&server, inputs.clone())).await.unwrap();
    assert_eq!(replies, expected(&inputs));
}

#[tokio::test]
async fn each_reply_arrives_before_the_next_request_is_sent() {
    let server = TestServer::start().await;
    let mut client = server.grpc_client().await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(request("first")).await.unwrap();
    let mut replies = within("open", client.bidirectional_stream(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    for i in 0..10 {
        let reply: StreamResponse = within("reply", replies.next()).await.unwrap().unwrap();
        let sent = if i == 0 {
            "first".to_string()
        } else {
            format!("next {i}")
        };
        assert_eq!(reply.result, format!("processed: {sent}"));
        if i < 9 {
            tx.send(request(format!("next {}", i + 1))).await.unwrap();
        }
    }
    drop(tx); // CloseSend
    assert!(
        within("end", replies.next()).await.is_none(),
        "stream ends OK after CloseSend"
    );
}

#[tokio::test]
async fn an_oversize_message_is_resource_exhausted_and_other_streams_go_on() {
    let server = TestServer::start_with(|c| c.max_message_size = 1024).await;
    let error = within("oversize", round_trip(&server, vec!["ok".into(), "y".repeat(2048)]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(error.message().contains("too large"), "{error:?}");
    let replies = within("after", round_trip(&server, vec!["still fine".into()]))
        .await
        .unwrap();
    assert_eq!(replies, vec!["processed: still fine".to_string()]);
}

#[tokio::test]
async fn a_call_is_counted_while_live_and_released_when_the_client_cancels() {
    let server = TestServer::start().await;
    let mut client = server.grpc_client().await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(request("hold")).await.unwrap();
    let mut replies = client
        .bidirectional_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    within("reply", replies.next()).await.unwrap().unwrap();
    assert_eq!(server.calls.get(Transport::Grpc), 1);
    drop(replies);
    drop(tx);
    within("call released", server.calls.wait_for(Transport::Grpc, 0)).await;
}
