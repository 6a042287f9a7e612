//! The WASM client in headless Chromium (wasm-bindgen-test) against a live
//! streambridge server. `cargo xtask test` starts the server and passes its
//! WebSocket URL at compile time as `STREAMBRIDGE_TEST_WS_URL`.
//!
//! The tests call the exported API exactly as JavaScript does: promises are
//! awaited, results are the plain objects JavaScript receives.

#![cfg(target_arch = "wasm32")]

use js_sys::{Promise, Reflect};
use streambridge_client::{BidiStream, DataClient};
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
    BidiStream::try_from_js_value(client.bidirectional_stream().expect("stream")).expect("a BidiStream")
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
    let status = settle(stream.finished()).await.expect("finished resolves");
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
    stream.close_send().expect("closeSend");
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
    left.close_send().unwrap();
    right.close_send().unwrap();
    assert!(read_all(&left).await.is_empty() && read_all(&right).await.is_empty());
    assert_eq!(status_of(&left).await.0, 0);
    assert_eq!(status_of(&right).await.0, 0);
    client.close();
}

#[wasm_bindgen_test]
async fn an_error_status_rejects_next_and_reports_a_non_zero_code() {
    let client = connect().await;
    let stream = stream_of(&client);
    // 5 MiB is over the server's 4 MiB limit: RESOURCE_EXHAUSTED.
    stream.send("ok".to_string()).unwrap();
    stream.send("x".repeat(5 * 1024 * 1024)).unwrap();
    let first = settle(stream.next()).await.expect("the earlier reply still arrives");
    assert_eq!(field(&first, "result").as_string().unwrap(), "processed: ok");
    let error = settle(stream.next())
        .await
        .expect_err("next rejects after an error status");
    assert_eq!(field(&error, "name").as_string().unwrap(), "StreamError");
    assert_eq!(field(&error, "code").as_f64().unwrap(), 8.0);
    assert!(error.is_instance_of::<js_sys::Error>());
    let (code, message) = status_of(&stream).await;
    assert_eq!(code, 8);
    assert!(message.contains("exceeds the limit"), "{message}");
    client.close();
}

#[wasm_bindgen_test]
async fn send_after_close_send_throws() {
    let client = connect().await;
    let stream = stream_of(&client);
    stream.send("one".to_string()).unwrap();
    stream.close_send().unwrap();
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
