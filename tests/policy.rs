//! Per-method policy (`--policy`): rules that open methods to anyone, ask
//! for a caller, or for claims; checked on native gRPC, on WebSocket v2
//! calls (generic and built-in plug-ins) and at a v1 upgrade, with JWTs
//! signed here. The reload on SIGHUP is in `tests/process.rs`.

mod support;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message as _;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::json;
use support::upstream::{EchoClient, EchoRequest, EchoUpstream};
use support::ws::{Socket, Sub, refused_upgrade};
use support::ws2::{proto_call_outcome, proto_socket, whole_call};
use support::{ServerAddr, TestServer, within};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::Code;

const POLICY: &str = r#"
[[rules]]
methods = ["/streambridge.testing.Echo/Unary"]
allow = "anyone"

[[rules]]
methods = ["/streambridge.testing.Echo/ClientStream", "/DataService/*"]
allow = "authenticated"
claims = { scope = "echo:write" }

[[rules]]
methods = ["/streambridge.testing.Echo/*"]
allow = "authenticated"
"#;

/// A signing key, the JWKS of its public half, and the policy, in files.
struct Setup {
    key: Vec<u8>,
    jwks: PathBuf,
    policy: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref();
        let b64 = |bytes: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        };
        let jwks = json!({ "keys": [{ "kty": "EC", "crv": "P-256", "kid": "k", "x": b64(&point[1..33]), "y": b64(&point[33..]) }] });
        let dir = std::env::temp_dir();
        let stem = format!("streambridge-policy-{}-{name}", std::process::id());
        let setup = Setup {
            key: pkcs8.as_ref().to_vec(),
            jwks: dir.join(format!("{stem}.jwks.json")),
            policy: dir.join(format!("{stem}.toml")),
        };
        std::fs::write(&setup.jwks, jwks.to_string()).unwrap();
        std::fs::write(&setup.policy, POLICY).unwrap();
        setup
    }

    fn configure(&self, config: &mut streambridge::Config) {
        config.jwt_jwks = Some(self.jwks.clone());
        config.policy = Some(self.policy.clone());
        config.jwt_claim_headers = vec![("sub".into(), http::HeaderName::from_static("x-user-id"))];
    }

    /// A token for `sub` with `scope`.
    fn token(&self, sub: &str, scope: &str) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k".into());
        let claims = json!({ "sub": sub, "scope": scope, "exp": now + 3600 });
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.key)).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.jwks);
        let _ = std::fs::remove_file(&self.policy);
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn echo(text: &str) -> EchoRequest {
    EchoRequest {
        text: text.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn rules_open_methods_to_anyone_ask_for_a_caller_or_for_claims_on_native_grpc() {
    let setup = Setup::new("native");
    let (bridge, _cancelled) = EchoUpstream::added_to_bridge(|c| setup.configure(c)).await;
    let mut client = EchoClient::new(bridge.grpc_channel().await);
    let reader = setup.token("rita", "echo:read");
    let writer = setup.token("will", "echo:read echo:write");

    // Rule 1: anyone; a token that comes still names the caller.
    let reply = within("anonymous unary", client.unary(with_token(echo("a"), None)))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().metadata.get("x-user-id"), None);
    let reply = within("named unary", client.unary(with_token(echo("a"), Some(&reader))))
        .await
        .unwrap();
    assert_eq!(
        reply.into_inner().metadata.get("x-user-id").map(String::as_str),
        Some("rita")
    );

    // Rule 3: a caller, any.
    let status = within("anonymous stream", client.server_stream(with_token(echo("s"), None)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    within(
        "reader's stream",
        client.server_stream(with_token(echo("s"), Some(&reader))),
    )
    .await
    .unwrap();

    // Rule 2: a caller with the scope.
    let requests = || tokio_stream::iter([echo("c")]);
    let status = within(
        "reader's client stream",
        client.client_stream(with_token(requests(), Some(&reader))),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("/streambridge.testing.Echo/ClientStream") && status.message().contains("rule 2"),
        "{status:?}"
    );
    let status = within(
        "anonymous client stream",
        client.client_stream(with_token(requests(), None)),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    within(
        "writer's client stream",
        client.client_stream(with_token(requests(), Some(&writer))),
    )
    .await
    .unwrap();
    // Counted by reason: one refused for its claims, two for want of a caller.
    let text = support::metrics_text(bridge.addr).await;
    let refused = |reason: &str| {
        let sample = format!(r#"streambridge_calls_refused_total{{reason="{reason}"}}"#);
        support::metric(&text, &sample)
    };
    assert_eq!(
        (refused("permission_denied"), refused("unauthenticated")),
        (1.0, 2.0),
        "{text}"
    );
}

/// Opens `call` on `method` with one message and closeSend; returns its status code and message.
async fn v2_call(socket: &mut Socket, call: u32, method: &str, message: Vec<u8>) -> (i32, String) {
    socket.send(whole_call(call, method, &[], message)).await.unwrap();
    let (_, status) = proto_call_outcome(socket, call).await;
    (status.code, status.message)
}

#[tokio::test]
async fn a_socket_without_a_token_may_open_for_the_methods_open_to_anyone_and_the_built_in_service_obeys_the_rules() {
    let setup = Setup::new("sockets");
    let (bridge, _cancelled) = EchoUpstream::added_to_bridge(|c| setup.configure(c)).await;
    let mut anonymous = proto_socket(&bridge, None).await;
    assert_eq!(
        v2_call(
            &mut anonymous,
            1,
            "/streambridge.testing.Echo/Unary",
            echo("a").encode_to_vec()
        )
        .await
        .0,
        0
    );
    let (code, message) = v2_call(
        &mut anonymous,
        3,
        "/streambridge.testing.Echo/ServerStream",
        echo("s").encode_to_vec(),
    )
    .await;
    assert_eq!(code, 16, "{message}");

    // The built-in service, answered by its own plug-in, asks the same rules.
    let builtin = TestServer::start_with(|c| setup.configure(c)).await;
    let request = streambridge_protocol::StreamRequest { data: "d".into() }.encode_to_vec();
    let method = "/DataService/BidirectionalStream";
    let mut reader = proto_socket(&builtin, Some(&setup.token("rita", "echo:read"))).await;
    let (code, message) = v2_call(&mut reader, 1, method, request.clone()).await;
    assert_eq!(code, 7, "{message}");
    assert!(message.contains(method), "{message}");
    let mut writer = proto_socket(&builtin, Some(&setup.token("will", "echo:write"))).await;
    assert_eq!(v2_call(&mut writer, 1, method, request).await.0, 0);

    // Protocol v1 has only that method: the policy is asked at the upgrade.
    let upgrade = |token: Option<String>| {
        let mut request = builtin.ws_url().into_client_request().unwrap();
        let offers = match token {
            Some(token) => format!("{}, streambridge.bearer.{token}", Sub::Json.name()),
            None => Sub::Json.name().to_string(),
        };
        request
            .headers_mut()
            .insert("sec-websocket-protocol", offers.parse().unwrap());
        request
    };
    let (status, body) = refused_upgrade(upgrade(Some(setup.token("rita", "echo:read")))).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("rule 2"), "{body}");
    let (status, body) = refused_upgrade(upgrade(None)).await;
    assert_eq!(status, 401, "{body}");
    let (mut socket, _) = within(
        "v1 writer",
        tokio_tungstenite::connect_async(upgrade(Some(setup.token("will", "echo:write")))),
    )
    .await
    .unwrap();
    support::ws::assert_one_round_trip(&mut socket, Sub::Json, "v1").await;
}

#[tokio::test]
async fn a_policy_that_asks_for_callers_needs_a_way_for_them_to_authenticate() {
    let path = std::env::temp_dir().join(format!("streambridge-policy-{}-no-auth.toml", std::process::id()));
    std::fs::write(&path, "[[rules]]\nmethods = [\"/a.B/*\"]\nallow = \"authenticated\"\n").unwrap();
    let mut config = streambridge::Config::with_listen("127.0.0.1:0".parse().unwrap());
    config.policy = Some(path.clone());
    let error = streambridge::Core::new(&config).err().expect("refused").to_string();
    assert!(error.contains("rule 1") && error.contains("--auth-token"), "{error}");
    config.auth_token = Some("a-token-for-the-rule".into());
    assert!(streambridge::Core::new(&config).is_ok());
    std::fs::remove_file(path).unwrap();
}
