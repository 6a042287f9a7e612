//! The WebSocket bridge (protocol v1) with a WebSocket client library,
//! tokio-tungstenite, over real sockets. Frames are written by hand (JSON
//! literals, prost messages) so the tests pin the wire format.

mod support;

use streambridge::Transport;
use support::ServerAddr;
use support::ws::{
    Received, Sub, assert_one_round_trip, call_with, close_send_frame, connect, connect_with, next_response,
    read_to_close, refused_upgrade, request_frame, send_all,
};
use support::{TestServer, within};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Bytes, Message};

fn expected(inputs: &[String]) -> Vec<String> {
    inputs.iter().map(|data| format!("processed: {data}")).collect()
}

async fn thousand_messages_in_order_then_status_0_and_close_1000(sub: Sub) {
    let server = TestServer::start().await;
    let mut socket = connect_with(&server, sub).await;
    let inputs: Vec<String> = (0..1000).map(|i| format!("{sub:?} message {i}")).collect();
    let transcript = call_with(&mut socket, sub, &inputs).await;
    assert_eq!(transcript.responses(), expected(&inputs));
    assert_eq!(transcript.status(), (0, String::new()));
    assert_eq!(transcript.close_code(), 1000);
}

#[tokio::test]
async fn json_thousand_messages_in_order_then_status_0_and_close_1000() {
    thousand_messages_in_order_then_status_0_and_close_1000(Sub::Json).await;
}

#[tokio::test]
async fn proto_thousand_messages_in_order_then_status_0_and_close_1000() {
    thousand_messages_in_order_then_status_0_and_close_1000(Sub::Proto).await;
}

#[tokio::test]
async fn the_documented_json_frames_are_exactly_what_the_server_sends() {
    let server = TestServer::start().await;
    let mut socket = connect_with(&server, Sub::Json).await;
    send_all(
        &mut socket,
        [
            Message::text(r#"{"request":{"data":"hi"}}"#),
            Message::text(r#"{"closeSend":{}}"#),
        ],
    )
    .await;
    let mut texts = Vec::new();
    while let Some(Ok(Message::Text(text))) = within("frame", futures_util::StreamExt::next(&mut socket)).await {
        texts.push(text.to_string());
    }
    assert_eq!(
        texts,
        vec![r#"{"response":{"result":"processed: hi"}}"#, r#"{"status":{"code":0}}"#]
    );
}

#[tokio::test]
async fn each_reply_arrives_before_the_next_request_is_sent() {
    for sub in [Sub::Json, Sub::Proto] {
        let server = TestServer::start().await;
        let mut socket = connect_with(&server, sub).await;
        for i in 0..20 {
            let data = format!("turn {i}");
            send_all(&mut socket, [request_frame(sub, &data)]).await;
            assert_eq!(next_response(&mut socket, sub).await, format!("processed: {data}"));
        }
        send_all(&mut socket, [close_send_frame(sub)]).await;
        let transcript = read_to_close(&mut socket, sub).await;
        assert_eq!(
            transcript.frames,
            vec![Received::Status {
                code: 0,
                message: String::new()
            }]
        );
    }
}

/// Sends three good requests then `bad`, all in one write; expects the three
/// replies, then a status with `code`, then a close with `close_code`, and a
/// working server afterwards.
async fn bad_input_case(server: &TestServer, sub: Sub, bad: Vec<Message>, code: i32, close_code: u16) -> String {
    let mut socket = connect_with(server, sub).await;
    let inputs: Vec<String> = (0..3).map(|i| format!("before {i}")).collect();
    send_all(&mut socket, inputs.iter().map(|d| request_frame(sub, d)).chain(bad)).await;
    let transcript = read_to_close(&mut socket, sub).await;
    assert_eq!(
        transcript.responses(),
        expected(&inputs),
        "earlier replies are delivered first"
    );
    let (status_code, message) = transcript.status();
    assert_eq!(status_code, code, "status message: {message}");
    assert!(!message.is_empty(), "an error status says what was wrong");
    assert_eq!(transcript.close_code(), close_code);
    drop(socket); // after the close handshake, as any client does
    within("call released", server.calls.wait_for(Transport::WebSocket, 0)).await;
    message
}

async fn assert_still_serving(server: &TestServer) {
    for sub in [Sub::Json, Sub::Proto] {
        let mut socket = connect_with(server, sub).await;
        send_all(&mut socket, [request_frame(sub, "still here"), close_send_frame(sub)]).await;
        let transcript = read_to_close(&mut socket, sub).await;
        assert_eq!(transcript.responses(), vec!["processed: still here".to_string()]);
        assert_eq!(transcript.close_code(), 1000);
    }
}

#[tokio::test]
async fn websocket_unparsable_json_delivers_earlier_replies_then_status_3_and_close_1007() {
    let server = TestServer::start().await;
    let message = bad_input_case(&server, Sub::Json, vec![Message::text("{\"request\":")], 3, 1007).await;
    assert!(message.contains("invalid JSON"), "{message}");
    let message = bad_input_case(&server, Sub::Json, vec![Message::text("{}")], 3, 1007).await;
    assert!(message.contains("neither request nor closeSend"), "{message}");
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn websocket_unparsable_protobuf_delivers_earlier_replies_then_status_3_and_close_1007() {
    let server = TestServer::start().await;
    let garbage = Message::Binary(Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff]));
    let message = bad_input_case(&server, Sub::Proto, vec![garbage], 3, 1007).await;
    assert!(message.contains("invalid protobuf"), "{message}");
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn websocket_text_frame_with_invalid_utf8_is_status_3_and_close_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = TestServer::start().await;
    let invalid_utf8 = Message::Frame(Frame::message(
        Bytes::from_static(&[0xff, 0xfe]),
        OpCode::Data(Data::Text),
        true,
    ));
    let message = bad_input_case(&server, Sub::Json, vec![invalid_utf8], 3, 1007).await;
    assert!(message.contains("UTF-8"), "{message}");
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn websocket_request_after_close_send_is_status_3_and_close_1007() {
    let server = TestServer::start().await;
    for sub in [Sub::Json, Sub::Proto] {
        let bad = vec![close_send_frame(sub), request_frame(sub, "too late")];
        let message = bad_input_case(&server, sub, bad, 3, 1007).await;
        assert!(message.contains("after closeSend"), "{message}");
    }
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn websocket_wrong_frame_type_is_status_3_and_close_1003() {
    let server = TestServer::start().await;
    let binary_on_json = Message::Binary(Bytes::from_static(b"{}"));
    let message = bad_input_case(&server, Sub::Json, vec![binary_on_json], 3, 1003).await;
    assert!(message.contains("binary frame"), "{message}");
    let text_on_proto = Message::text(r#"{"request":{"data":"hi"}}"#);
    let message = bad_input_case(&server, Sub::Proto, vec![text_on_proto], 3, 1003).await;
    assert!(message.contains("text frame"), "{message}");
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn websocket_frame_over_the_limit_is_status_8_and_close_1009() {
    let server = TestServer::start_with(|c| c.max_message_size = 1024).await;
    let oversize_json = request_frame(Sub::Json, &"j".repeat(2000));
    let message = bad_input_case(&server, Sub::Json, vec![oversize_json], 8, 1009).await;
    assert!(message.contains("exceeds the limit of 1024 bytes"), "{message}");
    let oversize_proto = request_frame(Sub::Proto, &"p".repeat(200_000));
    bad_input_case(&server, Sub::Proto, vec![oversize_proto], 8, 1009).await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn websocket_default_limit_is_4_mib() {
    let server = TestServer::start().await;
    let mut socket = connect_with(&server, Sub::Proto).await;
    let just_under = "u".repeat(4 * 1024 * 1024 - 16);
    send_all(
        &mut socket,
        [request_frame(Sub::Proto, &just_under), close_send_frame(Sub::Proto)],
    )
    .await;
    let transcript = read_to_close(&mut socket, Sub::Proto).await;
    assert_eq!(transcript.responses(), vec![format!("processed: {just_under}")]);
    let over = Message::Binary(Bytes::from(vec![0u8; 4 * 1024 * 1024 + 1]));
    bad_input_case(&server, Sub::Proto, vec![over], 8, 1009).await;
}

#[tokio::test]
async fn a_hundred_concurrent_sockets_each_get_their_own_replies() {
    let server = TestServer::start().await;
    let sockets = (0..100).map(|n| {
        let server = &server;
        async move {
            let sub = if n % 2 == 0 { Sub::Json } else { Sub::Proto };
            let mut socket = connect_with(server, sub).await;
            let inputs: Vec<String> = (0..20).map(|i| format!("socket {n} message {i}")).collect();
            let transcript = call_with(&mut socket, sub, &inputs).await;
            assert_eq!(transcript.responses(), expected(&inputs), "socket {n}");
            assert_eq!(transcript.close_code(), 1000);
        }
    });
    within("100 sockets", futures_util::future::join_all(sockets)).await;
    within("all released", server.calls.wait_for(Transport::WebSocket, 0)).await;
}

#[tokio::test]
async fn a_socket_dropped_without_close_send_leaves_no_call_behind() {
    let server = TestServer::start().await;
    let mut socket = connect_with(&server, Sub::Json).await;
    send_all(&mut socket, [request_frame(Sub::Json, "hello")]).await;
    assert_eq!(next_response(&mut socket, Sub::Json).await, "processed: hello");
    assert_eq!(server.calls.get(Transport::WebSocket), 1);
    drop(socket); // TCP closed, no Close frame, no closeSend
    within("call released", server.calls.wait_for(Transport::WebSocket, 0)).await;

    let mut socket = connect_with(&server, Sub::Proto).await;
    send_all(&mut socket, [request_frame(Sub::Proto, "hello")]).await;
    assert_eq!(next_response(&mut socket, Sub::Proto).await, "processed: hello");
    within("close", socket.close(None)).await.unwrap(); // a Close frame, no closeSend
    // The server answers the Close (a clean close for the client), then lets go.
    let answer = within("close answer", futures_util::StreamExt::next(&mut socket)).await;
    assert!(matches!(answer, Some(Ok(Message::Close(_)))), "{answer:?}");
    within("call released", server.calls.wait_for(Transport::WebSocket, 0)).await;
}

#[tokio::test]
async fn the_first_offered_supported_subprotocol_is_selected() {
    let server = TestServer::start().await;
    let mut request = server.ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "chat, streambridge.v1.proto, streambridge.v1.json".parse().unwrap(),
    );
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "streambridge.v1.proto");
    assert_one_round_trip(&mut socket, Sub::Proto, "p").await;
}

#[tokio::test]
async fn a_client_offering_no_subprotocol_speaks_json() {
    let server = TestServer::start().await;
    let mut socket = connect(&server, &[]).await;
    assert_one_round_trip(&mut socket, Sub::Json, "j").await;
}

#[tokio::test]
async fn only_unknown_subprotocols_get_400_naming_the_supported_ones() {
    let server = TestServer::start().await;
    let mut request = server.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "chat, mqtt".parse().unwrap());
    let (status, body) = refused_upgrade(request).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("streambridge.v1.json") && body.contains("streambridge.v1.proto"),
        "{body}"
    );
}

#[tokio::test]
async fn an_upgrade_from_a_foreign_origin_is_refused_with_403() {
    let server = TestServer::start().await;
    let mut request = server.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    let (status, body) = refused_upgrade(request).await;
    assert_eq!(status, 403, "{body}");

    let mut same_origin = server.ws_url().into_client_request().unwrap();
    same_origin
        .headers_mut()
        .insert("origin", server.http_url("").parse().unwrap());
    tokio_tungstenite::connect_async(same_origin)
        .await
        .expect("the server's own origin is allowed");
}
