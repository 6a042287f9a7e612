//! A real gRPC upstream for the upstream-mode tests: a tonic server of
//! `tests/proto/echo.proto` with every call type, reflection (v1 and
//! v1alpha) and no health service, on 127.0.0.1. It reports what it saw:
//! request metadata and deadlines in its replies, and every call it ended
//! because the client went away.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("streambridge.testing");
}

#[allow(unused_imports)] // not every test file calls it
pub use pb::echo_client::EchoClient;
pub use pb::{EchoReply, EchoRequest};

const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));

/// Which reflection versions the upstream serves.
#[derive(Clone, Copy, Debug)]
pub enum Reflection {
    Both,
    /// As grpcio-reflection 1.85 does.
    V1alphaOnly,
    None,
}

/// The upstream's descriptor set (for `--descriptor-set`).
pub const ECHO_DESCRIPTORS: &[u8] = DESCRIPTORS;

/// The upstream; stops when dropped.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    /// One item per call whose client went away before it ended.
    pub cancelled: mpsc::UnboundedReceiver<&'static str>,
    /// Reflection requests received (v1 and v1alpha).
    pub reflection_requests: ReflectionCount,
    stop: CancellationToken,
    stopped: Option<tokio::task::JoinHandle<()>>,
}

impl EchoUpstream {
    /// Starts on an ephemeral port.
    pub async fn start() -> EchoUpstream {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `addr` (a port a previous upstream used, to restart it).
    pub async fn start_on(addr: SocketAddr) -> EchoUpstream {
        Self::start_with(addr, None, Reflection::Both).await
    }

    /// Starts with only the reflection versions `reflection` says.
    pub async fn start_with_reflection(reflection: Reflection) -> EchoUpstream {
        Self::start_with("127.0.0.1:0".parse().unwrap(), None, reflection).await
    }

    /// Starts with TLS: `pki`'s server certificate, and client certificates
    /// signed by its CA required (mutual TLS).
    pub async fn start_mutual_tls(pki: &TestPki) -> EchoUpstream {
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&pki.server_cert, &pki.server_key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&pki.ca_cert));
        Self::start_with("127.0.0.1:0".parse().unwrap(), Some(tls), Reflection::Both).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<tonic::transport::ServerTlsConfig>,
        served: Reflection,
    ) -> EchoUpstream {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the upstream");
        let addr = listener.local_addr().unwrap();
        let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
        let reflection =
            || tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(DESCRIPTORS);
        let stop = CancellationToken::new();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).expect("TLS settings");
        }
        let counted = ReflectionCount::default();
        let v1 = matches!(served, Reflection::Both).then(|| reflection().build_v1().unwrap());
        let v1alpha =
            matches!(served, Reflection::Both | Reflection::V1alphaOnly).then(|| reflection().build_v1alpha().unwrap());
        let counting = counted.clone();
        let mut builder = builder.layer(tower::util::MapRequestLayer::new(
            move |request: http::Request<tonic::body::Body>| {
                counting.saw(request.uri().path());
                request
            },
        ));
        let server = builder
            .add_service(pb::echo_server::EchoServer::new(Echo {
                cancelled: cancelled_tx,
            }))
            .add_optional_service(v1)
            .add_optional_service(v1alpha)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let stopped = tokio::spawn(async move { server.await.expect("upstream serves") });
        EchoUpstream {
            addr,
            cancelled,
            reflection_requests: counted,
            stop,
            stopped: Some(stopped),
        }
    }

    /// The same echo service hosted in process by a bridge
    /// (`ServerBuilder::add_service`, with its descriptors registered): the
    /// generic call path without a network hop. The receiver hears of calls
    /// the client left, as [`EchoUpstream::cancelled`] does.
    pub async fn added_to_bridge(
        adjust: impl FnOnce(&mut streambridge::Config),
    ) -> (super::TestServer, mpsc::UnboundedReceiver<&'static str>) {
        let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
        let echo = pb::echo_server::EchoServer::new(Echo {
            cancelled: cancelled_tx,
        });
        let bridge = super::TestServer::start_built(adjust, |builder| {
            builder.add_service(echo).register_file_descriptor_set(DESCRIPTORS)
        })
        .await;
        (bridge, cancelled)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and closes its connections (live calls are cut).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(stopped) = self.stopped.take() {
            // Graceful shutdown waits for live calls; there are none in the tests that stop it.
            stopped.await.unwrap();
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reflection requests an upstream received, by version, served or not;
/// each is one `ServerReflectionInfo` stream (the bridge asks one question
/// on each).
#[derive(Clone, Default)]
pub struct ReflectionCount {
    v1: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    v1alpha: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ReflectionCount {
    pub fn v1_count(&self) -> usize {
        self.v1.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn v1alpha_count(&self) -> usize {
        self.v1alpha.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn saw(&self, path: &str) {
        let count = match path {
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" => &self.v1,
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => &self.v1alpha,
            _ => return,
        };
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// PEM, also written to files for the bridge's flags.
pub struct TestPki {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub dir: std::path::PathBuf,
}

impl TestPki {
    pub fn new(name: &str) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |san: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![san.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf("127.0.0.1");
        let (client_cert, client_key) = leaf("bridge.test");
        let dir = std::env::temp_dir().join(format!("streambridge-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("client.pem"), client_cert).unwrap();
        std::fs::write(dir.join("client-key.pem"), client_key).unwrap();
        TestPki {
            ca_cert: ca_cert.pem(),
            server_cert,
            server_key,
            dir,
        }
    }

    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Echo {
    cancelled: mpsc::UnboundedSender<&'static str>,
}

/// Sends the call's name when dropped before the call finished (replied
/// or failed): the client went away (tonic drops a call's future or stream
/// when its stream resets).
#[derive(Clone)]
struct Guard {
    name: &'static str,
    tx: mpsc::UnboundedSender<&'static str>,
    finished: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Guard {
    fn new(name: &'static str, tx: &mpsc::UnboundedSender<&'static str>) -> Guard {
        Guard {
            name,
            tx: tx.clone(),
            finished: Default::default(),
        }
    }

    fn done(&self) {
        self.finished.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Only the last clone reports.
        if std::sync::Arc::strong_count(&self.finished) == 1 && !self.finished.load(std::sync::atomic::Ordering::SeqCst)
        {
            let _ = self.tx.send(self.name);
        }
    }
}

fn reply(request: &EchoRequest, metadata: &tonic::metadata::MetadataMap, text: String) -> EchoReply {
    let headers = metadata.clone().into_headers();
    // A header sent more than once is reported once, its values joined by ", ".
    let mut seen = std::collections::HashMap::<String, String>::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        seen.entry(name.to_string())
            .and_modify(|all| {
                all.push_str(", ");
                all.push_str(&value);
            })
            .or_insert(value);
    }
    let timeout_ms = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_timeout(v).as_millis() as u64)
        .unwrap_or(0);
    EchoReply {
        text,
        metadata: seen,
        timeout_ms,
        padding: vec![b'x'; request.reply_bytes as usize],
    }
}

fn parse_timeout(text: &str) -> Duration {
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        _ => Duration::from_nanos(n),
    }
}

/// `google.rpc.Status`, as `grpc-status-details-bin` carries it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// `google.rpc.ErrorInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct ErrorInfo {
    #[prost(string, tag = "1")]
    reason: String,
    #[prost(string, tag = "2")]
    domain: String,
}

/// The rich details of a failure the echo was asked for: a
/// `google.rpc.Status` holding one `google.rpc.ErrorInfo`.
pub fn failure_details(code: i32, message: &str) -> Vec<u8> {
    let info = ErrorInfo {
        reason: "ASKED".into(),
        domain: "echo.streambridge.test".into(),
    };
    prost::Message::encode_to_vec(&RpcStatus {
        code,
        message: message.into(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
            value: prost::Message::encode_to_vec(&info),
        }],
    })
}

/// The failure a request asks for: its code, a message, rich details and a
/// trailer of its own.
fn failure(request: &EchoRequest) -> Option<Status> {
    (request.fail_with != 0).then(|| {
        let message = format!("failed as asked: {}", request.text);
        let details = failure_details(request.fail_with, &message);
        let mut status = Status::with_details(tonic::Code::from_i32(request.fail_with), message, details.into());
        status
            .metadata_mut()
            .insert("x-upstream-trailer", "from-upstream".parse().unwrap());
        status
    })
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl pb::echo_server::Echo for Echo {
    type ServerStreamStream = Replies;
    type BidiStream = Replies;

    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let guard = Guard::new("unary", &self.cancelled);
        let (metadata, extensions, message) = request.into_parts();
        if let Some(status) = failure(&message) {
            guard.done();
            return Err(status);
        }
        if message.hang {
            std::future::pending::<()>().await;
        }
        guard.done();
        let mut reply = reply(&message, &metadata, message.text.clone());
        // In process, the bridge hands over the caller's verified claims.
        if let Some(claims) = extensions.get::<streambridge::Claims>() {
            let sub = claims.0.claims().get("sub").map(ToString::to_string);
            reply.metadata.insert("claims.sub".into(), sub.unwrap_or_default());
        }
        let mut response = Response::new(reply);
        response
            .metadata_mut()
            .insert("x-upstream-header", "from-upstream".parse().unwrap());
        Ok(response)
    }

    async fn server_stream(&self, request: Request<EchoRequest>) -> Result<Response<Replies>, Status> {
        let (metadata, _, message) = request.into_parts();
        let guard = Guard::new("server_stream", &self.cancelled);
        let replies = (0..message.repeat).map(|i| {
            // Only the last reply is padded: the ones before it always fit.
            let mut r = reply(&message, &metadata, format!("{} {i}", message.text));
            if i + 1 != message.repeat {
                r.padding.clear();
            }
            Some(Ok(r))
        });
        let end = failure(&message);
        if end.is_some() {
            guard.done();
        }
        let hang = message.hang;
        let items: Vec<_> = replies.chain(end.map(|status| Some(Err(status)))).collect();
        let stream = futures_util::stream::iter(items)
            .chain(futures_util::stream::once(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                guard.done();
                None
            }))
            .filter_map(std::future::ready);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn client_stream(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<EchoReply>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        let guard = Guard::new("client_stream", &self.cancelled);
        let mut texts = Vec::new();
        let mut last = EchoRequest::default();
        while let Some(message) = stream.next().await {
            last = message?;
            texts.push(last.text.clone());
        }
        guard.done();
        Ok(Response::new(reply(&last, &metadata, texts.join(","))))
    }

    async fn bidi(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<Replies>, Status> {
        let (metadata, _, stream) = request.into_parts();
        let guard = Guard::new("bidi", &self.cancelled);
        let on_error = guard.clone();
        let replies = stream
            .map(move |message| {
                let status = match message {
                    Err(status) => status,
                    Ok(message) => match failure(&message) {
                        Some(status) => status,
                        None => {
                            // Made as they are sent: a flood of them never piles up here.
                            let metadata = metadata.clone();
                            let frame_each = message.frame_each;
                            let replies = futures_util::stream::iter(0..message.repeat.max(1)).map(move |_| {
                                let mut reply = reply(&message, &metadata, message.text.clone());
                                if frame_each {
                                    // A flood of tiny messages: text and padding only.
                                    reply.metadata.clear();
                                }
                                Some(Ok(reply))
                            });
                            return if frame_each {
                                // A pending poll between replies makes tonic send what it has.
                                replies
                                    .then(|reply| async {
                                        tokio::task::yield_now().await;
                                        reply
                                    })
                                    .boxed()
                            } else {
                                replies.boxed()
                            };
                        }
                    },
                };
                on_error.done();
                futures_util::stream::iter([Some(Err(status))]).boxed()
            })
            .flatten()
            .chain(futures_util::stream::once(async move {
                guard.done();
                None
            }))
            .filter_map(std::future::ready);
        Ok(Response::new(Box::pin(replies)))
    }
}

/// A TCP relay in front of an upstream, which the test can cut: every
/// connection through it closes at once and it stops listening, which is
/// what the bridge sees when an upstream process dies.
pub struct Relay {
    pub addr: SocketAddr,
    cut: CancellationToken,
}

impl Relay {
    pub async fn start(to: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted.expect("relay accepts"),
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Relay { addr, cut }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every relayed connection and stops listening.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut.cancel();
    }
}
