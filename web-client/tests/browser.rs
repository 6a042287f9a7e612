//! The WASM client in headless Chromium (wasm-bindgen-test) against a live
//! streambridge server. `cargo xtask test` starts the server and passes its
//! WebSocket URL at compile time as `STREAMBRIDGE_TEST_WS_URL`.
//!
//! The tests call the exported API exactly as JavaScript does: promises are
//! awaited, results are the plain objects JavaScript receives.

#![cfg(target_arch = "wasm32")]

use js_sys::{Promise, Reflect};
use streambridge_client::{BidiStream, Call, DataClient};
use wasm_bindgen::convert::TryFromJsValue;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

fn server_url() -> String {
    match option_env!("STREAMBRIDGE_TEST_WS_URL") {
        Some(url) => url.to_string(),
        None => panic!("build with STREAMBRIDGE_TEST_WS_URL=ws://host:port/ws (cargo xtask test does)"),
    }
}

async fn settle(promise: Promise) -> Result<JsValue, JsValue> {
    JsFuture::from(promise).await
}

/// The server's bearer token: the test server runs with `--auth-token`.
fn token() -> &'static str {
    match option_env!("STREAMBRIDGE_TEST_TOKEN") {
        Some(token) => token,
        None => panic!("build with STREAMBRIDGE_TEST_TOKEN (cargo xtask test does)"),
    }
}

fn options_with_token(token: &str) -> JsValue {
    let options = js_sys::Object::new();
    Reflect::set(&options, &JsValue::from_str("token"), &JsValue::from_str(token)).unwrap();
    options.into()
}

async fn connect() -> DataClient {
    let client = settle(DataClient::connect(server_url(), Some(options_with_token(token()))))
        .await
        .expect("connect");
    DataClient::try_from_js_value(client).expect("a DataClient")
}

fn stream_of(client: &DataClient) -> BidiStream {
    BidiStream::try_from_js_value(client.bidirectional_stream(None).expect("stream")).expect("a BidiStream")
}

fn field(object: &JsValue, name: &str) -> JsValue {
    Reflect::get(object, &JsValue::from_str(name)).expect("field")
}

/// Reads replies until `null`; returns their `result`s.
async fn read_all(stream: &BidiStream) -> Vec<String> {
    let mut results = Vec::new();
    loop {
        let message = settle(stream.next()).await.expect("next resolves");
        if message.is_null() {
            return results;
        }
        results.push(field(&message, "result").as_string().expect("result is a string"));
    }
}

async fn status_of(stream: &BidiStream) -> (i32, String) {
    status_from(stream.finished()).await
}

/// The `{ code, message }` a `finished()` promise resolves with.
async fn status_from(finished: Promise) -> (i32, String) {
    let status = settle(finished).await.expect("finished resolves");
    (
        field(&status, "code").as_f64().expect("code") as i32,
        field(&status, "message").as_string().expect("message"),
    )
}

#[wasm_bindgen_test]
async fn two_hundred_messages_arrive_in_order_then_status_0() {
    let client = connect().await;
    let stream = stream_of(&client);
    let inputs: Vec<String> = (0..200).map(|i| format!("browser {i}")).collect();
    for data in &inputs {
        stream.send(data.clone()).expect("send");
    }
    stream.close_send();
    let expected: Vec<String> = inputs.iter().map(|d| format!("processed: {d}")).collect();
    assert_eq!(read_all(&stream).await, expected);
    assert_eq!(status_of(&stream).await, (0, String::new()));
    client.close();
}

#[wasm_bindgen_test]
async fn two_concurrent_streams_keep_their_own_replies() {
    let client = connect().await;
    let (left, right) = (stream_of(&client), stream_of(&client));
    // Interleaved: each stream answers while the other one is open and waiting.
    for i in 0..50 {
        left.send(format!("left {i}")).unwrap();
        right.send(format!("right {i}")).unwrap();
        let right_reply = settle(right.next()).await.unwrap();
        let left_reply = settle(left.next()).await.unwrap();
        assert_eq!(
            field(&right_reply, "result").as_string().unwrap(),
            format!("processed: right {i}")
        );
        assert_eq!(
            field(&left_reply, "result").as_string().unwrap(),
            format!("processed: left {i}")
        );
    }
    left.close_send();
    right.close_send();
    assert!(read_all(&left).await.is_empty() && read_all(&right).await.is_empty());
    assert_eq!(status_of(&left).await.0, 0);
    assert_eq!(status_of(&right).await.0, 0);
    client.close();
}

#[wasm_bindgen_test]
async fn an_error_status_rejects_next_and_reports_a_non_zero_code() {
    let client = connect().await;
    let stream = stream_of(&client);
    let other = stream_of(&client);
    stream.send("ok".to_string()).unwrap();
    let first = settle(stream.next()).await.expect("a reply before the error");
    assert_eq!(field(&first, "result").as_string().unwrap(), "processed: ok");
    // Over the server's 4 MiB --max-message-size: RESOURCE_EXHAUSTED for this call only.
    stream.send("x".repeat(4 * 1024 * 1024)).unwrap();
    let error = settle(stream.next())
        .await
        .expect_err("next rejects after an error status");
    assert_eq!(field(&error, "name").as_string().unwrap(), "StreamError");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 8.0);
    assert!(error.is_instance_of::<js_sys::Error>());
    let (code, message) = status_of(&stream).await;
    assert_eq!(code, 8);
    assert!(message.contains("larger than --max-message-size"), "{message}");
    // The socket and the other stream go on.
    other.send("still here".to_string()).unwrap();
    other.close_send();
    assert_eq!(read_all(&other).await, vec!["processed: still here".to_string()]);
    client.close();
}

#[wasm_bindgen_test]
async fn send_after_close_send_throws() {
    let client = connect().await;
    let stream = stream_of(&client);
    stream.send("one".to_string()).unwrap();
    stream.close_send();
    let error = stream.send("two".to_string()).expect_err("send after closeSend throws");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 9.0);
    assert_eq!(read_all(&stream).await, vec!["processed: one".to_string()]);
    let error = stream.send("three".to_string()).expect_err("send after the end throws");
    assert!(error.is_instance_of::<js_sys::Error>());
    client.close();
}

#[wasm_bindgen_test]
async fn connecting_to_a_closed_port_rejects_with_unavailable() {
    let error = settle(DataClient::connect("ws://127.0.0.1:9/ws".to_string(), None))
        .await
        .expect_err("no server there");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 14.0);
    assert!(error.is_instance_of::<js_sys::Error>());
}

#[wasm_bindgen_test]
async fn a_wrong_token_is_refused_and_no_token_too() {
    for options in [Some(options_with_token("not-the-token")), None] {
        let error = settle(DataClient::connect(server_url(), options))
            .await
            .expect_err("refused");
        // Browsers hide the HTTP 401 of a refused upgrade: it surfaces as UNAVAILABLE.
        assert_eq!(field(&error, "code").as_f64().unwrap(), 14.0);
    }
}

fn object(fields: &[(&str, JsValue)]) -> JsValue {
    let object = js_sys::Object::new();
    for (name, value) in fields {
        Reflect::set(&object, &JsValue::from_str(name), value).unwrap();
    }
    object.into()
}

async fn connect_with(fields: &[(&str, JsValue)]) -> DataClient {
    let mut all = vec![("token", JsValue::from_str(token()))];
    all.extend(fields.iter().cloned());
    let client = settle(DataClient::connect(server_url(), Some(object(&all))))
        .await
        .expect("connect");
    DataClient::try_from_js_value(client).expect("a DataClient")
}

fn call_of(client: &DataClient, method: &str, options: Option<JsValue>) -> Call {
    Call::try_from_js_value(client.call(method.to_string(), options).expect("call")).expect("a Call")
}

fn json(text: &str) -> JsValue {
    js_sys::JSON::parse(text).unwrap()
}

fn to_json(value: &JsValue) -> String {
    js_sys::JSON::stringify(value).unwrap().as_string().unwrap()
}

async fn call_status(call: &Call) -> (i32, String) {
    status_from(call.finished()).await
}

#[wasm_bindgen_test]
async fn twenty_concurrent_streams_share_one_socket() {
    let client = connect().await;
    let streams: Vec<BidiStream> = (0..20).map(|_| stream_of(&client)).collect();
    for round in 0..10 {
        for (i, stream) in streams.iter().enumerate() {
            stream.send(format!("s{i} m{round}")).unwrap();
        }
    }
    streams.iter().for_each(BidiStream::close_send);
    assert_eq!(client.socket_count(), 1);
    for (i, stream) in streams.iter().enumerate() {
        let expected: Vec<String> = (0..10).map(|round| format!("processed: s{i} m{round}")).collect();
        assert_eq!(read_all(stream).await, expected);
        assert_eq!(status_of(stream).await.0, 0);
    }
    assert_eq!(client.socket_count(), 1);
    assert_eq!(client.state(), "open");
    client.close();
    assert_eq!(client.state(), "closed");
}

#[wasm_bindgen_test]
async fn call_speaks_json_to_any_method() {
    let client = connect().await;
    let health = call_of(&client, "/grpc.health.v1.Health/Check", None);
    health.send(json("{}")).unwrap();
    health.close_send();
    let reply = settle(health.next()).await.unwrap();
    assert_eq!(to_json(&reply), r#"{"status":"SERVING"}"#);
    assert!(settle(health.next()).await.unwrap().is_null());
    assert_eq!(call_status(&health).await.0, 0);

    let data = call_of(&client, "/DataService/BidirectionalStream", None);
    data.send(json(r#"{"data":"via call()"}"#)).unwrap();
    data.close_send();
    let reply = settle(data.next()).await.unwrap();
    assert_eq!(to_json(&reply), r#"{"result":"processed: via call()"}"#);

    let unknown = call_of(&client, "/no.Such/Method", None);
    unknown.close_send();
    let (code, message) = call_status(&unknown).await;
    assert_eq!(code, 12, "{message}");

    let bad = call_of(&client, "/DataService/BidirectionalStream", None);
    bad.send(json(r#"{"data":5}"#)).unwrap();
    assert_eq!(call_status(&bad).await.0, 3);
    let error = bad.send(json("{}")).expect_err("send after the end throws");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 9.0);
    let error = call_of(&client, "/DataService/BidirectionalStream", None)
        .send(JsValue::from_str("not an object"))
        .expect_err("a string is not a message");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 3.0);
    client.close();
}

#[wasm_bindgen_test]
async fn the_proto_codec_carries_typed_streams_and_bytes() {
    let client = connect_with(&[("codec", "proto".into())]).await;
    let stream = stream_of(&client);
    stream.send("over proto".to_string()).unwrap();
    stream.close_send();
    assert_eq!(read_all(&stream).await, vec!["processed: over proto".to_string()]);
    let health = call_of(&client, "/grpc.health.v1.Health/Check", None);
    health.send(js_sys::Uint8Array::new_with_length(0).into()).unwrap();
    health.close_send();
    let reply = settle(health.next()).await.unwrap();
    // HealthCheckResponse { status: SERVING (1) }
    assert_eq!(js_sys::Uint8Array::new(&reply).to_vec(), vec![8, 1]);
    assert_eq!(call_status(&health).await.0, 0);
    let error = call_of(&client, "/grpc.health.v1.Health/Check", None)
        .send(json("{}"))
        .expect_err("with proto, messages are bytes");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 3.0);
    client.close();
}

#[wasm_bindgen_test]
async fn an_unread_stream_holds_its_window_and_does_not_stall_a_busy_one() {
    let client = connect().await;
    let window = object(&[("window", 8.into())]);
    let unread = BidiStream::try_from_js_value(client.bidirectional_stream(Some(window)).unwrap()).unwrap();
    for i in 0..300 {
        unread.send(format!("unread {i}")).unwrap();
    }
    unread.close_send();
    let busy = stream_of(&client);
    for i in 0..1000 {
        busy.send(format!("busy {i}")).unwrap();
    }
    busy.close_send();
    assert_eq!(read_all(&busy).await.len(), 1000);
    assert_eq!(status_of(&busy).await.0, 0);
    // Read now: credit flows back as replies are taken, all 300 arrive in order.
    let expected: Vec<String> = (0..300).map(|i| format!("processed: unread {i}")).collect();
    assert_eq!(read_all(&unread).await, expected);
    assert_eq!(status_of(&unread).await.0, 0);
    client.close();
}

#[wasm_bindgen_test]
async fn deadlines_and_cancel_end_one_call_only() {
    let client = connect().await;
    let late = BidiStream::try_from_js_value(
        client
            .bidirectional_stream(Some(object(&[("timeoutMs", 50.into())])))
            .unwrap(),
    )
    .unwrap();
    let cancelled = stream_of(&client);
    let survivor = stream_of(&client);
    cancelled.send("x".to_string()).unwrap();
    cancelled.cancel();
    assert_eq!(status_of(&cancelled).await.0, 1);
    let error = settle(late.next()).await.expect_err("the deadline passes");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 4.0);
    survivor.send("fine".to_string()).unwrap();
    survivor.close_send();
    assert_eq!(read_all(&survivor).await, vec!["processed: fine".to_string()]);
    client.close();
}

#[wasm_bindgen_test]
async fn close_ends_every_call_with_cancelled_and_reports_closed() {
    let client = connect().await;
    let states = js_sys::Array::new();
    let record = {
        let states = states.clone();
        wasm_bindgen::closure::Closure::<dyn FnMut(JsValue)>::new(move |state: JsValue| {
            states.push(&state);
        })
    };
    client.set_onstatechange(Some(record.as_ref().unchecked_ref::<js_sys::Function>().clone()));
    let stream = stream_of(&client);
    client.close();
    assert_eq!(status_of(&stream).await.0, 1);
    assert_eq!(states.to_vec(), vec![JsValue::from_str("closed")]);
    let late = stream_of(&client);
    assert_eq!(status_of(&late).await.0, 14, "a closed client starts no call");
    let error = settle(DataClient::connect(
        server_url(),
        Some(object(&[("codec", "xml".into())])),
    ))
    .await
    .expect_err("an unknown codec is refused");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 3.0);
}
