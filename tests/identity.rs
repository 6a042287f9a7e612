//! Identities from JWTs (`--jwt-jwks`): tokens signed here with keys made
//! here (ES256 and EdDSA by ring, RS256 by the rsa crate), a JWKS file the
//! server reads, and real clients on every transport: tonic for native
//! gRPC, hyper for gRPC-Web, tokio-tungstenite for WebSocket v1 and v2.
//! The services (the test echo, in process and as an upstream) report the
//! metadata they saw, so the claims the bridge adds, and the token it
//! removes, are checked where a service sees them.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message as _;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};
use support::upstream::{EchoClient, EchoReply, EchoRequest, EchoUpstream};
use support::ws::{Socket, Sub, assert_one_round_trip, refused_upgrade};
use support::ws2::{proto_call_outcome, proto_socket, whole_call};
use support::{ServerAddr, TestServer, within};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::Code;

const ISSUER: &str = "https://issuer.streambridge.test";
const AUDIENCE: &str = "streambridge-tests";
const UNARY: &str = "/streambridge.testing.Echo/Unary";

/// Signing keys made for one test, and the JWKS of their public halves.
struct Keys {
    es256: Vec<u8>,
    eddsa: Vec<u8>,
    rs256: Vec<u8>,
    /// A key of the same kind and kid as `es256`, not in the key set.
    stranger: Vec<u8>,
    /// The RSA key's public half as PEM: the "secret" of an HS256 forgery.
    rsa_public_pem: String,
    jwks: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn es256_key() -> (Vec<u8>, Value) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // An uncompressed point: 0x04, x, y.
    let point = pair.public_key().as_ref();
    let jwk = json!({ "kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..]), "alg": "ES256" });
    (pkcs8.as_ref().to_vec(), jwk)
}

impl Keys {
    fn new() -> Keys {
        use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
        use rsa::traits::PublicKeyParts;
        let rng = ring::rand::SystemRandom::new();
        let (es256, mut es_jwk) = es256_key();
        es_jwk["kid"] = "es".into();
        let (stranger, _) = es256_key();
        let eddsa = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed_public = Ed25519KeyPair::from_pkcs8(eddsa.as_ref())
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let public = rsa.to_public_key();
        let jwks = json!({ "keys": [
            es_jwk,
            { "kty": "OKP", "crv": "Ed25519", "x": b64(&ed_public), "kid": "ed" },
            { "kty": "RSA", "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be()), "kid": "rs", "alg": "RS256" },
        ]});
        Keys {
            es256,
            eddsa: eddsa.as_ref().to_vec(),
            rs256: rsa.to_pkcs1_der().unwrap().as_bytes().to_vec(),
            stranger,
            rsa_public_pem: public.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap(),
            jwks,
        }
    }

    fn sign(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_der(&self.es256),
            Algorithm::EdDSA => EncodingKey::from_ed_der(&self.eddsa),
            Algorithm::RS256 => EncodingKey::from_rsa_der(&self.rs256),
            other => panic!("no key for {other:?}"),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// An ES256 token for `sub`, valid for an hour.
    fn token(&self, sub: &str) -> String {
        self.sign(Algorithm::ES256, Some("es"), &claims(sub, 3600))
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Claims for `sub`, expiring `expires_in` seconds from now.
fn claims(sub: &str, expires_in: i64) -> Value {
    json!({ "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + expires_in })
}

/// A JWKS file of its own for each test.
fn jwks_file(name: &str, jwks: &Value) -> PathBuf {
    let path = std::env::temp_dir().join(format!("streambridge-jwks-{}-{name}.json", std::process::id()));
    std::fs::write(&path, jwks.to_string()).unwrap();
    path
}

fn configure(config: &mut streambridge::Config, jwks: &Path) {
    config.jwt_jwks = Some(jwks.to_path_buf());
    config.jwt_issuer = Some(ISSUER.into());
    config.jwt_audiences = vec![AUDIENCE.into()];
    config.jwt_claim_headers = vec![("sub".into(), http::HeaderName::from_static("x-user-id"))];
    config.jwt_cookie = Some("sb_token".into());
}

/// `Echo/Unary` through `server` with `authorization: Bearer <token>` (if
/// any) and a forged `x-user-id`: the metadata the echo saw, or the status.
async fn unary(
    server: &impl ServerAddr,
    token: Option<&str>,
) -> Result<std::collections::HashMap<String, String>, tonic::Status> {
    let mut client = EchoClient::new(server.grpc_channel().await);
    let mut request = tonic::Request::new(EchoRequest {
        text: "who".into(),
        ..Default::default()
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request.metadata_mut().insert("x-user-id", "mallory".parse().unwrap());
    // The token's cookie (a page on the same site sends it with every request) and another.
    let cookie = format!("theme=dark; sb_token={}", token.unwrap_or("none"));
    request.metadata_mut().insert("cookie", cookie.parse().unwrap());
    within("unary", client.unary(request))
        .await
        .map(|reply| reply.into_inner().metadata)
}

/// Valid claims for `eve` without `claim`.
fn without(claim: &str) -> Value {
    let mut claims = claims("eve", 3600);
    claims.as_object_mut().unwrap().remove(claim);
    claims
}

/// Every kind of bad token, each with what the refusal must say.
fn bad_tokens(keys: &Keys) -> Vec<(&'static str, String, &'static str)> {
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("eve", 3600).to_string().as_bytes())
    );
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("eve", 3600),
        &EncodingKey::from_secret(keys.rsa_public_pem.as_bytes()),
    )
    .unwrap();
    let mut wrong_issuer = claims("eve", 3600);
    wrong_issuer["iss"] = "https://elsewhere.test".into();
    let mut wrong_audience = claims("eve", 3600);
    wrong_audience["aud"] = "someone-else".into();
    let mut not_yet = claims("eve", 7200);
    not_yet["nbf"] = (now() + 3600).into();
    let stranger = jsonwebtoken::encode(
        &{
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some("es".into());
            header
        },
        &claims("eve", 3600),
        &EncodingKey::from_ec_der(&keys.stranger),
    )
    .unwrap();
    vec![
        // Expired beyond the 30 s leeway.
        (
            "expired",
            keys.sign(Algorithm::ES256, Some("es"), &claims("eve", -120)),
            "has expired",
        ),
        (
            "not yet valid",
            keys.sign(Algorithm::ES256, Some("es"), &not_yet),
            "not valid yet",
        ),
        (
            "wrong issuer",
            keys.sign(Algorithm::ES256, Some("es"), &wrong_issuer),
            "issuer",
        ),
        (
            "wrong audience",
            keys.sign(Algorithm::ES256, Some("es"), &wrong_audience),
            "audience",
        ),
        ("signed by another key", stranger, "signature does not verify"),
        (
            "no issuer",
            keys.sign(Algorithm::ES256, Some("es"), &without("iss")),
            "has no iss claim",
        ),
        (
            "no audience",
            keys.sign(Algorithm::ES256, Some("es"), &without("aud")),
            "has no aud claim",
        ),
        (
            "a fractional exp",
            keys.sign(Algorithm::ES256, Some("es"), &{
                let mut claims = claims("eve", 3600);
                claims["exp"] = json!(now() as f64 + 3600.5);
                claims
            }),
            "exp is not a whole number",
        ),
        (
            "unknown kid",
            keys.sign(Algorithm::ES256, Some("nope"), &claims("eve", 3600)),
            "kid \"nope\"",
        ),
        ("alg none", unsigned, "algorithm \"none\" is refused"),
        (
            "HS256 keyed with the public key",
            hs256,
            "algorithm \"HS256\" is refused",
        ),
        ("garbage", "not.a.jwt".into(), "not a well-formed JWT"),
        ("no token", String::new(), "missing bearer token"),
    ]
}

#[tokio::test]
async fn every_bad_token_is_unauthenticated_with_its_reason_and_good_ones_reach_services_as_claims() {
    let keys = Keys::new();
    let jwks = jwks_file("every-bad-token", &keys.jwks);
    let upstream = EchoUpstream::start().await;
    let upstream_url: http::Uri = upstream.url().parse().unwrap();
    let (added, _cancelled) = EchoUpstream::added_to_bridge(|c| configure(c, &jwks)).await;
    let proxy = TestServer::start_with(|c| {
        configure(c, &jwks);
        c.upstream = Some(upstream_url);
    })
    .await;
    for (bridge, which) in [(&added, "in process"), (&proxy, "upstream")] {
        for (alg, kid, sub) in [
            (Algorithm::ES256, Some("es"), "alice"),
            (Algorithm::EdDSA, Some("ed"), "bob"),
            (Algorithm::RS256, Some("rs"), "carol"),
            // No kid: any key of the token's algorithm.
            (Algorithm::RS256, None, "dave"),
        ] {
            let token = keys.sign(alg, kid, &claims(sub, 3600));
            let seen = unary(bridge, Some(&token))
                .await
                .unwrap_or_else(|s| panic!("{which} {alg:?}: {s:?}"));
            assert_eq!(
                seen.get("x-user-id").map(String::as_str),
                Some(sub),
                "{which} {alg:?}: {seen:?}"
            );
            assert!(
                !seen.contains_key("authorization"),
                "{which}: the token reached the service: {seen:?}"
            );
            assert_eq!(
                seen.get("cookie").map(String::as_str),
                Some("theme=dark"),
                "{which}: {seen:?}"
            );
            // In process the claims are also a request extension (JSON: the sub in quotes).
            let in_claims = (which == "in process").then(|| format!("\"{sub}\""));
            assert_eq!(seen.get("claims.sub"), in_claims.as_ref(), "{which}: {seen:?}");
        }
        // A token without the claim: the client's forged header is gone all the same.
        let mut anonymous = claims("x", 3600);
        anonymous.as_object_mut().unwrap().remove("sub");
        let seen = unary(bridge, Some(&keys.sign(Algorithm::ES256, Some("es"), &anonymous)))
            .await
            .unwrap();
        assert_eq!(
            seen.get("x-user-id"),
            None,
            "{which}: a forged claim header passed: {seen:?}"
        );
        for (case, token, reason) in bad_tokens(&keys) {
            let token = (!token.is_empty()).then_some(token);
            let status = unary(bridge, token.as_deref()).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{which} {case}: {status:?}");
            assert!(
                status.message().contains(reason),
                "{which} {case}: {:?}",
                status.message()
            );
            if let Some(token) = &token {
                assert!(
                    !status.message().contains(token.as_str()),
                    "{which} {case}: the token is echoed"
                );
            }
        }
    }
    // gRPC-Web goes through the same check.
    let token = keys.token("erin");
    for (authorization, expected) in [(Some(format!("Bearer {token}")), "0"), (None, "16")] {
        let mut request = http::Request::post(added.http_url(UNARY))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1");
        if let Some(authorization) = &authorization {
            request = request.header("authorization", authorization);
        }
        let mut body = bytes::BytesMut::new();
        streambridge_protocol::grpc::put_message(
            &mut body,
            &EchoRequest {
                text: "web".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let reply = support::http::send(
            &support::http::http1_client(),
            request.body(http_body_util::Full::new(body.freeze())).unwrap(),
        )
        .await;
        let result = support::http::decode_grpc_web(reply.body.clone());
        // A refusal is trailers-only: its status is in the headers.
        let status = reply
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .or(result.trailer("grpc-status"));
        assert_eq!(status, Some(expected), "{authorization:?}");
        // (The replies are read as `StreamResponse`s: field 1 is the echo's text.)
        let replies: &[&str] = if expected == "0" { &["web"] } else { &[] };
        assert_eq!(result.replies, replies, "{authorization:?}");
    }
    std::fs::remove_file(jwks).unwrap();
}

#[tokio::test]
async fn a_websocket_upgrade_needs_a_valid_token_in_the_header_a_subprotocol_entry_or_the_cookie() {
    let keys = Keys::new();
    let jwks = jwks_file("upgrade", &keys.jwks);
    let server = TestServer::start_with(|c| configure(c, &jwks)).await;
    let upgrade = |extra: Option<(&str, String)>| {
        let mut request = server.ws_url().into_client_request().unwrap();
        let mut offers = Sub::Json.name().to_string();
        if let Some(("subprotocol", token)) = &extra {
            offers = format!("{offers}, streambridge.bearer.{token}");
        }
        request
            .headers_mut()
            .insert("sec-websocket-protocol", offers.parse().unwrap());
        match extra {
            Some(("cookie", token)) => {
                request
                    .headers_mut()
                    .insert("cookie", format!("theme=dark; sb_token={token}").parse().unwrap());
            }
            Some(("header", token)) => {
                request
                    .headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            _ => {}
        }
        request
    };
    let (status, body) = refused_upgrade(upgrade(None)).await;
    assert_eq!((status, body.contains("missing bearer token")), (401, true), "{body}");
    let expired = keys.sign(Algorithm::ES256, Some("es"), &claims("eve", -120));
    let (status, body) = refused_upgrade(upgrade(Some(("subprotocol", expired.clone())))).await;
    assert_eq!((status, body.contains("has expired")), (401, true), "{body}");
    assert!(!body.contains(&expired), "the token is echoed: {body}");
    for carrier in ["subprotocol", "cookie", "header"] {
        let (mut socket, _) = within(
            carrier,
            tokio_tungstenite::connect_async(upgrade(Some((carrier, keys.token("amy"))))),
        )
        .await
        .unwrap_or_else(|e| panic!("{carrier}: {e}"));
        assert_one_round_trip(&mut socket, Sub::Json, carrier).await;
    }
    std::fs::remove_file(jwks).unwrap();
}

/// A unary `Echo/Unary` on call `call` with `metadata`, in one batch.
fn unary_records(call: u32, metadata: &[(&str, &str)]) -> Message {
    let message = EchoRequest {
        text: "v2".into(),
        ..Default::default()
    };
    whole_call(call, UNARY, metadata, message.encode_to_vec())
}

/// Reads until `call` ends: the reply's metadata if it had one, and its status.
async fn outcome(socket: &mut Socket, call: u32) -> (Option<std::collections::HashMap<String, String>>, i32, String) {
    let (messages, status) = proto_call_outcome(socket, call).await;
    let seen = messages
        .last()
        .map(|reply| EchoReply::decode(reply.clone()).unwrap().metadata);
    (seen, status.code, status.message)
}

#[tokio::test]
async fn a_v2_call_may_bring_its_own_token_and_a_socket_whose_token_expired_opens_no_more_calls() {
    let keys = Keys::new();
    let jwks = jwks_file("v2", &keys.jwks);
    let (bridge, _cancelled) = EchoUpstream::added_to_bridge(|c| {
        configure(c, &jwks);
        // The socket's token below expires in a second: no leeway.
        c.jwt_leeway = Duration::ZERO;
    })
    .await;
    let mut socket = proto_socket(&bridge, Some(&keys.token("alice"))).await;

    // The socket's identity, whatever the client claims in its metadata.
    socket
        .send(unary_records(1, &[("x-user-id", "mallory")]))
        .await
        .unwrap();
    let (seen, code, message) = outcome(&mut socket, 1).await;
    assert_eq!(code, 0, "{message}");
    let seen = seen.unwrap();
    assert_eq!(seen.get("x-user-id").map(String::as_str), Some("alice"), "{seen:?}");

    // The call's own token stands for that call, and is not passed on.
    let bob = format!(
        "Bearer {}",
        keys.sign(Algorithm::EdDSA, Some("ed"), &claims("bob", 3600))
    );
    socket.send(unary_records(3, &[("authorization", &bob)])).await.unwrap();
    let (seen, code, message) = outcome(&mut socket, 3).await;
    assert_eq!(code, 0, "{message}");
    let seen = seen.unwrap();
    assert_eq!(seen.get("x-user-id").map(String::as_str), Some("bob"), "{seen:?}");
    assert!(!seen.contains_key("authorization"), "{seen:?}");

    // A bad one ends only its call, with 16 and the reason.
    let expired = format!(
        "Bearer {}",
        keys.sign(Algorithm::ES256, Some("es"), &claims("bob", -60))
    );
    socket
        .send(unary_records(5, &[("authorization", &expired)]))
        .await
        .unwrap();
    let (seen, code, message) = outcome(&mut socket, 5).await;
    assert_eq!((seen, code), (None, 16), "{message}");
    assert!(
        message.contains("has expired") && message.contains("call's authorization"),
        "{message}"
    );

    // A socket whose token expires: new calls get 16; the socket stays.
    // Three seconds: time enough for the upgrade on a slow machine.
    let short = keys.sign(Algorithm::ES256, Some("es"), &claims("brief", 3));
    let mut brief = proto_socket(&bridge, Some(&short)).await;
    let mut call = 1;
    let message = within("the socket's token expires", async {
        loop {
            brief.send(unary_records(call, &[])).await.unwrap();
            let (_, code, message) = outcome(&mut brief, call).await;
            call += 2;
            if code == 16 {
                return message;
            }
            assert_eq!(code, 0, "{message}");
            // Wall-clock time has to pass for `exp`; the loop asks again.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(message.contains("socket's token has expired"), "{message}");
    // With a fresh token of its own, a call on that socket goes through.
    let fresh = format!("Bearer {}", keys.token("brief"));
    brief
        .send(unary_records(call, &[("authorization", &fresh)]))
        .await
        .unwrap();
    assert_eq!(outcome(&mut brief, call).await.1, 0);
    std::fs::remove_file(jwks).unwrap();
}

#[tokio::test]
async fn a_changed_key_file_is_read_again_and_a_broken_one_is_refused_at_start() {
    let keys = Keys::new();
    let jwks = jwks_file("reload", &keys.jwks);
    let server = TestServer::start_with(|c| configure(c, &jwks)).await;
    let (new_key, mut new_jwk) = es256_key();
    new_jwk["kid"] = "es-2".into();
    let token = jsonwebtoken::encode(
        &{
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some("es-2".into());
            header
        },
        &claims("fay", 3600),
        &EncodingKey::from_ec_der(&new_key),
    )
    .unwrap();
    let status = unary_builtin(&server, &token).await.unwrap_err();
    assert!(status.message().contains("kid \"es-2\""), "{status:?}");
    let mut rotated = keys.jwks.clone();
    rotated["keys"].as_array_mut().unwrap().push(new_jwk);
    std::fs::write(&jwks, rotated.to_string()).unwrap();
    // The file is looked at again at most once a second: ask until it is.
    within("the new key is used", async {
        while unary_builtin(&server, &token).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    // At start, a key set that cannot be used is an error naming the file
    // (and the key).
    let hmac = json!({ "keys": [{ "kty": "oct", "k": b64(b"secret"), "kid": "shared" }] });
    for (name, text, expected) in [
        ("garbage", "not json".to_string(), "not a JWKS"),
        ("hmac", hmac.to_string(), "kid \"shared\""),
        ("empty", r#"{"keys":[]}"#.to_string(), "no keys"),
    ] {
        let path = std::env::temp_dir().join(format!("streambridge-jwks-{}-bad-{name}.json", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let mut config = streambridge::Config::with_listen("127.0.0.1:0".parse().unwrap());
        configure(&mut config, &path);
        let error = streambridge::Core::new(&config).err().expect("refused").to_string();
        assert!(
            error.contains(&path.display().to_string()) && error.contains(expected),
            "{name}: {error}"
        );
        std::fs::remove_file(path).unwrap();
    }
    std::fs::remove_file(jwks).unwrap();
}

/// A call to the built-in service with `token`.
async fn unary_builtin(server: &impl ServerAddr, token: &str) -> Result<(), tonic::Status> {
    let mut client = server.grpc_client().await;
    let mut request = tonic::Request::new(tokio_stream::iter([streambridge_protocol::StreamRequest {
        data: "k".into(),
    }]));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut replies = within("call", client.bidirectional_stream(request)).await?.into_inner();
    within("reply", replies.next()).await.transpose()?;
    Ok(())
}

#[tokio::test]
async fn with_forward_token_only_the_token_that_was_verified_goes_on() {
    let keys = Keys::new();
    let jwks = jwks_file("forward", &keys.jwks);
    let (bridge, _cancelled) = EchoUpstream::added_to_bridge(|c| {
        configure(c, &jwks);
        c.jwt_forward_token = true;
    })
    .await;
    let mut client = EchoClient::new(bridge.grpc_channel().await);
    let good = keys.token("gina");
    let mut request = tonic::Request::new(EchoRequest {
        text: "f".into(),
        ..Default::default()
    });
    // The good token, then one the bridge cannot verify (the echo reports
    // every value of a header: the second would show).
    let forged = keys.sign(Algorithm::ES256, Some("nope"), &claims("mallory", 3600));
    for token in [&good, &forged] {
        request
            .metadata_mut()
            .append("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let seen = within("unary", client.unary(request))
        .await
        .unwrap()
        .into_inner()
        .metadata;
    assert_eq!(seen.get("authorization"), Some(&format!("Bearer {good}")), "{seen:?}");
    assert_eq!(seen.get("x-user-id").map(String::as_str), Some("gina"));
    std::fs::remove_file(jwks).unwrap();
}

/// An identity provider's JWKS endpoint, served over TLS by the test with
/// a certificate of its own CA; counts the fetches.
struct JwksServer {
    url: String,
    jwks: std::sync::Arc<std::sync::Mutex<String>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pki: support::upstream::TestPki,
}

impl JwksServer {
    async fn start(jwks: &Value) -> JwksServer {
        use rustls_pki_types::pem::PemObject;
        use std::sync::atomic::Ordering;
        let pki = support::upstream::TestPki::new("jwks");
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pki.server_cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).unwrap();
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/.well-known/jwks.json", listener.local_addr().unwrap());
        let served = std::sync::Arc::new(std::sync::Mutex::new(jwks.to_string()));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (jwks, counter) = (served.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, jwks, counter) = (acceptor.clone(), jwks.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let body = match request.uri().path() {
                            "/.well-known/jwks.json" => {
                                counter.fetch_add(1, Ordering::SeqCst);
                                jwks.lock().unwrap().clone()
                            }
                            _ => String::new(),
                        };
                        std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        JwksServer {
            url,
            jwks: served,
            fetches,
            pki,
        }
    }

    fn serve(&self, jwks: &Value) {
        *self.jwks.lock().unwrap() = jwks.to_string();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn configure(&self, config: &mut streambridge::Config) {
        configure(config, Path::new("unused"));
        config.jwt_jwks = None;
        config.jwt_jwks_url = Some(self.url.clone());
        config.jwt_jwks_ca = Some(self.pki.file("ca.pem"));
    }
}

/// An ES256 token signed by `key` under `kid`.
fn token_of(key: &[u8], kid: &str, sub: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims(sub, 3600), &EncodingKey::from_ec_der(key)).unwrap()
}

#[tokio::test]
async fn a_jwks_url_is_fetched_at_start_and_again_when_a_token_names_a_new_key() {
    let keys = Keys::new();
    let provider = JwksServer::start(&keys.jwks).await;
    // Two bridges: one for a gRPC call, one for a WebSocket upgrade, each
    // with its own first refetch (then at most one per 30 s).
    let grpc_bridge = TestServer::start_with(|c| provider.configure(c)).await;
    let ws_bridge = TestServer::start_with(|c| provider.configure(c)).await;
    assert_eq!(provider.fetches(), 2, "each bridge fetched the set at start");
    unary_builtin(&grpc_bridge, &keys.token("ann")).await.unwrap();

    // A key rotated in at the provider: the first token naming it makes the
    // bridge fetch the set again, and waits for it.
    let (new_key, mut new_jwk) = es256_key();
    new_jwk["kid"] = "es-2".into();
    let mut rotated = keys.jwks.clone();
    rotated["keys"].as_array_mut().unwrap().push(new_jwk);
    provider.serve(&rotated);
    let rotated_token = token_of(&new_key, "es-2", "bea");
    unary_builtin(&grpc_bridge, &rotated_token).await.unwrap();
    assert_eq!(provider.fetches(), 3, "one fetch for the new kid");
    let mut upgrade = ws_bridge.ws_url().into_client_request().unwrap();
    upgrade
        .headers_mut()
        .insert("authorization", format!("Bearer {rotated_token}").parse().unwrap());
    upgrade
        .headers_mut()
        .insert("sec-websocket-protocol", Sub::Json.name().parse().unwrap());
    let (mut socket, _) = within("upgrade", tokio_tungstenite::connect_async(upgrade))
        .await
        .expect("the upgrade waits for the fetch");
    assert_one_round_trip(&mut socket, Sub::Json, "rotated").await;
    assert_eq!(provider.fetches(), 4);

    // Another unknown kid within 30 s: refused, no new fetch.
    let status = unary_builtin(&grpc_bridge, &token_of(&keys.stranger, "es-3", "cy"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("kid \"es-3\""), "{status:?}");
    assert_eq!(provider.fetches(), 4, "at most one refetch per 30 s");

    // A set that cannot be fetched, or a URL in the clear, stops the start.
    let mut unreachable = streambridge::Config::with_listen("127.0.0.1:0".parse().unwrap());
    provider.configure(&mut unreachable);
    unreachable.jwt_jwks_url = Some("https://127.0.0.1:9/jwks.json".into());
    let error = streambridge::Server::bind(unreachable)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("--jwt-jwks-url https://127.0.0.1:9/jwks.json") && error.contains("cannot connect"),
        "{error}"
    );
    let mut clear = streambridge::Config::with_listen("127.0.0.1:0".parse().unwrap());
    provider.configure(&mut clear);
    clear.jwt_jwks_url = Some("http://127.0.0.1:9/jwks.json".into());
    let error = streambridge::Core::new(&clear).err().expect("refused").to_string();
    assert!(error.contains("https://"), "{error}");
}
